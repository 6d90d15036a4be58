"""Shared machinery for every lightning_xai callback.

:class:`XAICallback` holds what each monitor needs and none should write twice: cadence
(``every_n_epochs``, a run at fit end, sanity-check and ``fast_dev_run`` skipping), the error policy
(``on_error``), the strategy check, the model's logits function, the "do no harm" context (eval
mode, gradients enabled even under ``inference_mode``, global RNG forked) and the split of work over
ranks with results gathered back. :class:`ProbeSetCallback` adds the fixed probe set: chosen once
(stratified by class from the validation batches Lightning already loads, or given by the user),
kept in the callback's ``state_dict`` so a resumed run explains the same samples.

A subclass implements ``compute`` (per-sample results on this rank's share of the probe set) and
``report`` (log images on rank zero, return scalars that every rank logs through ``pl_module.log``).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from typing_extensions import override

from lightning_xai._lightning import (CALLBACK_BASES, FITTING, TESTING, MisconfigurationException, is_a,
                                     refuse_bad_options)
from lightning_xai._utils import (check_bool, check_choice, check_positive_int, eager_compiled, expected, forked_rng,
                                  gradient_context, is_compiled, preserve_modes, select_output, two_class_logits)
from lightning_xai.callbacks import cost
from lightning_xai.logging import log_scalars, logging_step, warn_once

if TYPE_CHECKING:
    import lightning.pytorch as pl

BatchToXY = Callable[[Any], Tuple[Tensor, Optional[Tensor]]]
_X_KEYS = ("x", "input", "inputs", "image", "images", "data", "input_ids")
_Y_KEYS = ("y", "label", "labels", "target", "targets")
TARGETS = ("label", "prediction")  # besides a class index


def extract_xy(batch: Any, batch_to_xy: Optional[BatchToXY] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Inputs and labels from a batch: ``(x, y, ...)`` tuples/lists, dicts with common keys, a bare tensor,
    or whatever ``batch_to_xy(batch)`` returns.

    Raises:
        ValueError: when the batch format is not understood; the message says how to pass ``batch_to_xy``.
    """
    if batch_to_xy is not None:
        out = batch_to_xy(batch)
        if isinstance(out, Tensor):
            return out, None
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor)):
            raise ValueError(expected("batch_to_xy(batch)", "a tensor or a pair (inputs, labels or None)", type(out).__name__))
        return out[0], out[1]
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch and isinstance(batch[k], Tensor)), None)
        y = next((batch[k] for k in _Y_KEYS if k in batch and isinstance(batch[k], Tensor)), None)
        if x is not None:
            return x, y
        keys = list(batch.keys())
    else:
        keys = type(batch).__name__
    raise ValueError(
        expected("batch", f"a tensor, a tuple/list (inputs, labels, ...) or a dict with one of the keys {_X_KEYS}; "
                 "pass `batch_to_xy=lambda batch: (inputs, labels)` for other formats", keys)
    )


BATCH_FIX = ("pass `batch_to_xy=lambda batch: (inputs, labels)` for batches that are not (inputs, labels, ...) "
             "tuples or dicts with common keys")


def class_labels(y: Optional[Tensor], n: int, owner: Any = None) -> Optional[Tensor]:
    """``y`` when it holds one class index per sample (shape ``(n,)``, integer or integral values), else None with
    a one-time warning: multi-label ``(n, classes)`` or per-pixel targets are not classes to stratify or explain by
    (``target="label"`` then explains the prediction)."""
    if y is None:
        return None
    if y.ndim == 1 and y.shape[0] == n and (not y.is_floating_point() or bool((y == y.round()).all())):
        return y
    warn_once("not-classes", f"{type(owner).__name__ if owner is not None else 'lightning_xai'}: the labels of the "
              f"validation batches (shape {tuple(y.shape)}) are not one class index per sample; they are ignored "
              "(the probe set is chosen without classes, and target='label' explains the predicted class).",
              owner=owner)
    return None


def split_rows(n: int, world: int, rank: int) -> Tuple[int, int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` rows and how many of its results to keep.

    A rank whose share is empty (fewer rows than ranks) still computes one row, the last, so its results
    have the right shapes for the gather; it keeps none of them.
    """
    per_rank = -(-n // world)
    start = min(rank * per_rank, n)
    stop = min(start + per_rank, n)
    if start == stop and n > 0:
        return n - 1, n, 0
    return start, stop, stop - start


def first_loader(loaders: Any) -> Any:
    """The first of Lightning's dataloaders (a loader, or a list/tuple of them; None when there are none)."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _stack_from_ranks(trainer: "pl.Trainer", tensor: Tensor) -> Tensor:
    """``tensor`` (the same shape on every rank) from every rank, stacked: ``(world, ...)``.

    Under ``torch.distributed`` this is its plain ``all_gather``, not the strategy's: Lightning's goes through the
    autograd ``all_gather`` of ``torch.distributed.nn``, which torch deprecates (a warning on every rank), and we
    need no gradient. gloo has no int16 all_gather: int16 travels as int32. Without a process group the strategy's
    own gather is used.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return trainer.strategy.all_gather(tensor)
    sent = tensor.to(torch.int32) if tensor.dtype == torch.int16 else tensor.contiguous()
    out = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(out, sent)
    return torch.stack(out).to(tensor.dtype)


def gather_rows(trainer: "pl.Trainer", tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (rows may differ per rank) from every rank, rank-major, on every rank.

    The ranks first agree on the trailing shape and dtype: a rank without rows may pass any empty tensor
    (e.g. ``torch.empty(0)``) and takes them from the ranks that have rows. When ranks with rows disagree,
    every rank raises the same ``ValueError``, so none is left waiting in a collective.
    """
    if trainer.world_size <= 1:
        return tensor
    strategy = trainer.strategy
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
              torch.int32, torch.int64, torch.bool)
    max_dims = 8
    # (rows, dtype code, trailing ndim, trailing shape padded with -1); code -1: a tensor no rank can gather
    rows = int(tensor.shape[0]) if tensor.ndim else 0
    code = dtypes.index(tensor.dtype) if tensor.dtype in dtypes and 1 <= tensor.ndim <= max_dims + 1 else -1
    desc = torch.full((3 + max_dims,), -1, dtype=torch.long)
    desc[0], desc[1], desc[2] = rows, code, max(tensor.ndim - 1, 0)
    if code >= 0:
        desc[3: 3 + tensor.ndim - 1] = torch.tensor(tensor.shape[1:], dtype=torch.long)
    table = _stack_from_ranks(trainer, desc.to(strategy.root_device)).view(trainer.world_size, -1).cpu()  # (world, 3 + max_dims)
    sizes = table[:, 0].tolist()
    full = [r for r, s in enumerate(sizes) if s > 0]
    if not full:
        return tensor
    ref = table[full[0]]
    if int(ref[1]) < 0 or any(not torch.equal(table[r, 1:], ref[1:]) for r in full):
        raise ValueError(expected("gather_rows' tensors", f"the same trailing shape and a dtype of {dtypes} on every "
                                  "rank with rows", {r: (tuple(table[r, 3: 3 + int(table[r, 2])].tolist()),
                                                         dtypes[int(table[r, 1])] if table[r, 1] >= 0 else "unsupported")
                                                     for r in full}))
    dtype, shape = dtypes[int(ref[1])], tuple(int(s) for s in ref[3: 3 + int(ref[2])])
    if rows == 0:
        tensor = torch.empty((0,) + shape, dtype=dtype, device=tensor.device)
    padded = torch.zeros((int(max(sizes)),) + shape, dtype=dtype, device=strategy.root_device)
    padded[:rows] = tensor.to(strategy.root_device)
    gathered = _stack_from_ranks(trainer, padded)  # (world, max_rows, ...)
    return torch.cat([gathered[r, : int(s)] for r, s in enumerate(sizes)]).to(tensor.device)


def gather_shares(trainer: "pl.Trainer", results: Dict[str, Tensor], keep: int) -> Dict[str, Tensor]:
    """Every rank's share of per-row results, whole on every rank: the first ``keep`` rows of each tensor of
    ``results`` (see :func:`split_rows`) gathered rank-major. Every rank passes the same keys, in the same order."""
    return {k: gather_rows(trainer, v[:keep]) for k, v in results.items()}


Buckets = Dict[int, List[Tuple[Tensor, Optional[Tensor]]]]  # class (-1: no labels) -> (sample, label) in loading order


def collect_rows(buckets: Buckets, x: Tensor, y: Optional[Tensor], per_class: int) -> None:
    """Add CPU copies of the rows of a batch to ``buckets``, at most ``per_class`` per class, in loading order."""
    labels = torch.full((x.shape[0],), -1, dtype=torch.long) if y is None else y.detach().view(-1).long().cpu()
    for key in labels.unique().tolist():  # per class: one copy of the rows still wanted
        bucket = buckets.setdefault(int(key), [])
        wanted = per_class - len(bucket)
        if wanted > 0:
            rows = (labels == key).nonzero().view(-1)[:wanted]
            label = None if y is None else torch.tensor(int(key))
            bucket.extend((row, label) for row in x.detach()[rows.to(x.device)].cpu().clone().unbind(0))


def _stratified(buckets: Buckets, n: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Round-robin over sorted classes, each class in loading order; rows grouped by class."""
    ordered = [buckets[k] for k in sorted(buckets)]
    chosen: List[Tuple[Tensor, Optional[Tensor]]] = []
    depth = 0
    while len(chosen) < n and any(depth < len(b) for b in ordered):
        chosen.extend(b[depth] for b in ordered if depth < len(b))
        depth += 1
    chosen = chosen[:n]
    if not chosen:
        return torch.empty(0), None
    has_y = chosen[0][1] is not None
    order = sorted(range(len(chosen)), key=lambda i: int(chosen[i][1]) if has_y else i)
    x = torch.stack([chosen[i][0] for i in order])
    y = torch.stack([chosen[i][1] for i in order]) if has_y else None
    return x, y


def choose_stratified(trainer: "pl.Trainer", buckets: Buckets, n: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``n`` rows chosen stratified by class from ``buckets`` (see :func:`collect_rows`), identical on every rank:
    under DDP every rank saw a different shard, so all candidates are gathered and chosen from again. ``(None, None)``
    when no rank has any."""
    if trainer.world_size <= 1:
        x, y = _stratified(buckets, n)
        return (None, None) if x.numel() == 0 else (x, y)
    try:  # a rank that fails here still joins the first collective, where every rank learns of it
        x, y = _stratified(buckets, n)
        local_error: Optional[Exception] = None
    except Exception as err:  # noqa: BLE001 - re-raised on every rank below
        x, y, local_error = torch.empty(0), None, err
    status = torch.tensor([x.shape[0], int(local_error is not None)], device=trainer.strategy.root_device)
    count, failures = (int(v) for v in trainer.strategy.reduce(status, reduce_op="sum").tolist())
    if failures:
        raise local_error if local_error is not None else RuntimeError(
            f"another rank failed to choose its probe-set candidates ({failures} of {trainer.world_size} ranks)")
    if count == 0:
        return None, None
    x_all = gather_rows(trainer, x)
    y_all = gather_rows(trainer, y if y is not None else torch.full((x.shape[0],), -1, dtype=torch.long))
    merged: Buckets = {}
    for i in range(x_all.shape[0]):
        key = int(y_all[i])
        bucket = merged.setdefault(key, [])
        if len(bucket) < n:
            bucket.append((x_all[i], None if key < 0 else y_all[i]))
    x, y = _stratified(merged, n)
    return (None, None) if x.numel() == 0 else (x, y)


class XAICallback(*CALLBACK_BASES):  # type: ignore[misc]  # both Lightning packages' Callback
    """Base class of all lightning_xai monitors (see the module docstring).

    The cadence is deterministic: a validation epoch is explained when its index among the fit's validation
    epochs (``current_epoch // check_val_every_n_epoch``) is a multiple of ``every_n_epochs``, and at the end of
    ``fit`` if the last validated epoch was not; the same epochs on any machine and after a resume. Nothing is
    skipped to save time: each run logs its cost as ``<prefix>/<area>/seconds`` and the end of ``fit`` prints a
    table of every callback's runs and share of the fit's wall time (:mod:`lightning_xai.callbacks.cost`).

    Args:
        every_n_epochs: explain every n-th validation epoch (the first one included).
        run_on_fit_end: also explain the last validated epoch at the end of ``fit`` if the cadence skipped it.
        on_error: ``"warn"`` (default) warns once with the exception and skips that epoch's explanation,
            never losing the training run; ``"raise"`` re-raises.
        prefix: root of every tag this callback logs (``<prefix>/<area>/...``).
        output_key: picks the logits from a model returning a tuple/list (an int) or dict (a key).
        forward: ``forward(pl_module, inputs) -> logits`` for anything else; overrides ``output_key``.
    """

    #: Strategy class names (either Lightning package): one device, the DDP family, and ModelParallelStrategy
    #: (FSDP2 ``fully_shard`` / tensor parallel), where every rank takes part in every pass (see :meth:`work_split`).
    supported_strategies = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")
    sharded_strategies = ("ModelParallelStrategy",)
    area = "xai"  # tag area below the prefix, e.g. "attribution"

    def __init__(
        self,
        every_n_epochs: int = 1,
        run_on_fit_end: bool = True,
        on_error: str = "warn",
        prefix: str = "xai",
        output_key: Union[None, int, str] = None,
        forward: Optional[Callable[[Any, Tensor], Tensor]] = None,
    ) -> None:
        super().__init__()
        with refuse_bad_options():
            check_positive_int("every_n_epochs", every_n_epochs)
            check_bool("run_on_fit_end", run_on_fit_end)
            check_choice("on_error", on_error, ("warn", "raise"))
            if not isinstance(prefix, str) or not prefix.strip("/"):
                raise MisconfigurationException(expected("prefix", "a non-empty str", prefix))
            if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, (int, str))):
                raise TypeError(expected("output_key", "None, an int (tuple/list outputs) or a str (dict outputs)",
                                         type(output_key).__name__))
            if forward is not None and not callable(forward):
                raise TypeError(expected("forward", "a callable (pl_module, inputs) -> logits", forward))
        self.every_n_epochs = every_n_epochs
        self.run_on_fit_end = run_on_fit_end
        self.on_error = on_error
        self.prefix = prefix.strip("/")
        self.output_key = output_key
        self.forward = forward
        self.last_explained_epoch: int = -2  # -1 is used for "before training"
        self.errors: int = 0
        self._last_validated_epoch: Optional[int] = None
        self._last_attempted_epoch: Optional[int] = None
        self._run_start: Optional[float] = None  # perf_counter() at the start of the current run's timed work
        self._failed = False  # a failure on this rank since the ranks last agreed (see `agree`)
        self._warned_failures: set = set()
        self._rank_note = ""  # " on rank r" under DDP, in failure warnings
        self.sharded = False  # set at setup: a sharded strategy needs every rank in every pass

    # ------------------------------------------------------------------ naming and state
    def tag(self, *parts: Any) -> str:
        """``<prefix>/<area>/<parts...>``."""
        return "/".join([self.prefix, self.area] + [str(p) for p in parts if p != ""])

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area)

    @override
    def state_dict(self) -> Dict[str, Any]:
        return {"last_explained_epoch": self.last_explained_epoch, "errors": self.errors}

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.last_explained_epoch = int(state_dict.get("last_explained_epoch", -2))
        self.errors = int(state_dict.get("errors", 0))

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        strategy = trainer.strategy
        if (is_a(strategy, "FSDPStrategy", "DeepSpeedStrategy") or type(strategy).__name__.startswith("DeepSpeed")
                or not is_a(strategy, *self.supported_strategies)):
            raise MisconfigurationException(
                expected(f"{type(self).__name__}'s strategy",
                         "a single-device strategy, DDP ('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook') or "
                         "ModelParallelStrategy (FSDP2 fully_shard); FSDP1 ('fsdp') and DeepSpeed are not supported: "
                         "shard the model with ModelParallelStrategy instead", type(strategy).__name__))
        self.sharded = is_a(strategy, *self.sharded_strategies)
        if is_compiled(pl_module) and not hasattr(torch.compiler, "set_stance"):
            raise MisconfigurationException(
                expected(f"{type(self).__name__}'s torch version", "torch >= 2.6 (torch.compiler.set_stance) for a "
                         "torch.compile'd model; or pass the uncompiled module", torch.__version__))
        precision = str(getattr(trainer, "precision", "32-true"))
        if precision in ("16-true", "bf16-true") or precision.startswith("transformer-engine"):
            raise MisconfigurationException(
                expected(f"{type(self).__name__}'s Trainer precision", "one that keeps float32 or float64 weights "
                         "('32-true', '64-true', '16-mixed', 'bf16-mixed'): explanations need input gradients, which "
                         "underflow in half precision", precision))
        self._rank_note = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
        if stage == "fit":
            cost.book(trainer, new_fit=True).register(id(self), self.cost_name())

    def cost_name(self) -> str:
        """This callback's row in the end-of-fit cost table: its class, and its prefix when not the default."""
        name = type(self).__name__
        return name if self.prefix == "xai" else f"{name} ({self.prefix})"

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        book = cost.book(trainer)
        if not book.finished:  # the first callback torn down reports for all of them
            book.finished = True
            if trainer.is_global_zero and book.names:
                cost.print_table(book)

    # ------------------------------------------------------------------ model access
    def logits_fn(self, pl_module: "pl.LightningModule") -> Callable[[Tensor], Tensor]:
        """``inputs -> logits (N, classes)`` for the unwrapped module, honouring ``forward``/``output_key``; a model
        with one binary logit is seen as two classes (:func:`~lightning_xai._utils.two_class_logits`)."""
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)

        def cast(x: Tensor) -> Tensor:  # probe inputs are float32; a 64-true model takes float64
            return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != dtype else x

        if self.forward is not None:
            user = self.forward
            return lambda x: two_class_logits(user(pl_module, cast(x)))
        key = self.output_key
        return lambda x: two_class_logits(select_output(pl_module(cast(x)), key))

    @contextlib.contextmanager
    def explain_context(self, pl_module: "pl.LightningModule") -> Iterator[None]:
        """Eval mode with every flag restored, gradients on (even under ``inference_mode``), every global RNG
        forked (Python's, NumPy's, torch's), compiled modules run eagerly (so forward hooks fire and nothing is
        recompiled)."""
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with forked_rng(devices), eager_compiled(), gradient_context(), \
                preserve_modes(pl_module, eval_mode=True):
            yield

    # ------------------------------------------------------------------ cadence
    def active(self, trainer: "pl.Trainer") -> bool:
        """False during the sanity check and under ``fast_dev_run`` (quiet)."""
        return not trainer.sanity_checking and not trainer.fast_dev_run

    def due(self, trainer: "pl.Trainer") -> bool:
        """Whether this validation epoch is on the cadence (always, under ``validate()``/``test()``)."""
        if trainer.state.fn != FITTING:
            return True
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return self.scheduled(trainer, epoch) or (self.run_on_fit_end and last)

    def scheduled(self, trainer: "pl.Trainer", epoch: int) -> bool:
        """Whether ``epoch`` is on the cadence: its index among the fit's validation epochs is a multiple of
        ``every_n_epochs`` (a function of the epoch number alone, so a resumed run explains the same epochs)."""
        every_val = trainer.check_val_every_n_epoch or 1  # None: validation by steps, in every epoch
        return (epoch // every_val) % self.every_n_epochs == 0

    def estimated_work(self, trainer: Optional["pl.Trainer"] = None) -> Optional[float]:
        """The model passes one run takes (over all ranks), in sample forward+backward equivalents (a forward
        alone counts 1/3), for the benchmarks' floors. ``None`` (the default): not known."""
        return None

    @contextlib.contextmanager
    def timed(self, trainer: "pl.Trainer", epoch: Optional[int] = None, run: bool = True) -> Iterator[None]:
        """Add the enclosed work's wall time to this callback's cost (``epoch`` given: a new run starts;
        ``run=False``: a one-off cost outside any run, e.g. copying the model at fit start)."""
        book = cost.book(trainer)
        if epoch is not None:
            book.begin(id(self))
        self._run_start = start = time.perf_counter()
        try:
            yield
        finally:
            self._run_start = None
            book.charge(id(self), time.perf_counter() - start, run=run)

    def run_seconds(self, trainer: "pl.Trainer") -> float:
        """Seconds the current run has taken so far (what ``<prefix>/<area>/seconds`` reports)."""
        book = cost.book(trainer)
        ongoing = 0.0 if self._run_start is None else time.perf_counter() - self._run_start
        return book.current.get(id(self), 0.0) + ongoing

    @contextlib.contextmanager
    def guard(self, what: str, epoch: Optional[int], fix: str = "", skips_run: bool = True) -> Iterator[None]:
        """Run the body under the ``on_error`` policy. ``"raise"``: exceptions propagate. ``"warn"``: an exception
        ends the body, is counted, and is warned about on the rank where it happened (naming the callback, the
        epoch, what failed and ``fix``); with ``skips_run`` it also marks this rank as failed, so the next
        :meth:`agree` makes every rank skip the run together (no rank is left waiting in a collective).
        A bad option (:class:`~lightning_xai._lightning.MisconfigurationException`) always propagates: it is the
        same on every rank and would fail every run."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - the policy decides
            if self.on_error == "raise" or isinstance(err, MisconfigurationException):
                raise
            self.errors += 1
            self._failed = self._failed or skips_run
            self._warn_failure(err, what, epoch, fix)

    def guarded(self, fn: Callable[[], Any], what: str, epoch: Optional[int], fix: str = "") -> Any:
        """``fn()`` under :meth:`guard`; None when it failed and was skipped."""
        with self.guard(what, epoch, fix):
            return fn()
        return None

    def _warn_failure(self, err: BaseException, what: str, epoch: Optional[int], fix: str) -> None:
        key = (what, type(err).__name__)
        if key in self._warned_failures:
            return
        self._warned_failures.add(key)
        when = "" if epoch is None else f" at epoch {epoch}"
        hint = f" {fix.rstrip('.')}." if fix else ""
        warnings.warn(
            f"{type(self).__name__} failed while {what}{when}{self._rank_note} and skipped it: "
            f"{type(err).__name__}: {err}.{hint} Training goes on; pass on_error='raise' to stop instead "
            "(shown once per kind of failure).", RuntimeWarning, stacklevel=2)

    def work_split(self, trainer: "pl.Trainer") -> Tuple[int, int]:
        """``(world, rank)`` over which a run's work is shared out (the distributed policy, in one place).

        Under DDP every rank holds the whole model: each explains its contiguous share of the probe set
        (:func:`split_rows`) and the shares are gathered on every rank (:func:`gather_shares`), so the figures
        equal one process's. Under a sharded strategy a forward pass needs every rank, in the same order and the
        same number of times: every rank explains the whole probe set in lockstep (``(1, 0)``: nothing to split or
        gather) and rank zero logs.
        """
        if self.sharded or trainer.world_size <= 1:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def agree(self, trainer: "pl.Trainer", ok: bool = True) -> bool:
        """True when ``ok`` and no failure was recorded since the last agreement, on every rank (one all-reduce
        under DDP, so call it on every rank at the same point). Clears the recorded failure."""
        ok = bool(ok) and not self._failed
        self._failed = False
        if trainer.world_size > 1:
            failed = torch.tensor([0.0 if ok else 1.0], device=trainer.strategy.root_device)
            ok = float(trainer.strategy.reduce(failed, reduce_op="sum").item()) == 0
        return ok

    # ------------------------------------------------------------------ logging helpers
    def log_metrics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", metrics: Mapping[str, Any],
                    via_module: bool = True, seconds: bool = False) -> None:
        """Scalars through ``pl_module.log`` (monitorable) or, where that is not allowed, to every logger;
        ``seconds=True`` (a run's last call) adds the run's cost so far as ``<prefix>/<area>/seconds``."""
        metrics = {k: float(v) for k, v in metrics.items()}
        if seconds:
            metrics[self.tag("seconds")] = self.run_seconds(trainer)
        if not metrics:
            return
        fitting = trainer.state.fn == FITTING
        if via_module:  # into trainer.callback_metrics (EarlyStopping/ModelCheckpoint) and what validate() returns
            for name, value in metrics.items():
                pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False, add_dataloader_idx=False,
                              logger=not fitting)
        if (fitting or not via_module) and trainer.is_global_zero:  # in fit: at the images' step (logging_step)
            log_scalars(trainer, metrics)

    def step(self, trainer: "pl.Trainer") -> int:
        return logging_step(trainer)


    # ------------------------------------------------------------------ the run and its hooks
    def begin_run(self, trainer: "pl.Trainer", via_module: bool) -> int:
        """The epoch a run explains (at fit end: the last validated one); records the attempt."""
        epoch = trainer.current_epoch
        if not via_module and self._last_validated_epoch is not None:
            epoch = self._last_validated_epoch
        self._last_attempted_epoch = epoch
        return epoch

    def explain(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", via_module: bool = True) -> None:
        """Explain and log once; ``via_module=False`` where ``pl_module.log`` is not allowed (fit end)."""
        raise NotImplementedError

    def _on_eval_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.active(trainer):
            return
        self._last_validated_epoch = trainer.current_epoch
        if self.due(trainer):
            self._run(trainer, pl_module, trainer.current_epoch, via_module=True)

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int, via_module: bool) -> None:
        """One run: the ranks first agree that none failed since the last run (else all skip it together), then
        :meth:`explain` under the error policy, timed."""
        with self.timed(trainer, epoch):
            if not self.agree(trainer):
                self._last_attempted_epoch = epoch
                return
            with self.guard("explaining", epoch):
                self.explain(trainer, pl_module, via_module=via_module)

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._on_eval_epoch_end(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._on_eval_epoch_end(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if (self.run_on_fit_end and self.active(trainer) and self._last_validated_epoch is not None
                and self._last_validated_epoch != self._last_attempted_epoch):
            self._run(trainer, pl_module, self._last_validated_epoch, via_module=False)


class ProbeSetCallback(XAICallback):
    """An :class:`XAICallback` that explains a fixed probe set.

    Args:
        probe: ``None`` (default: ``probe_samples`` samples chosen stratified by class from the first
            validation batches), a tensor of inputs, a pair ``(inputs, labels)``, or a list of indices
            into the validation dataset.
        probe_samples: how many samples to choose when ``probe`` is None.
        batch_to_xy: ``batch -> (inputs, labels)`` for batch formats :func:`extract_xy` does not know.
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward: see :class:`XAICallback`.
    """

    def __init__(
        self,
        probe: Union[None, Tensor, Tuple[Tensor, Tensor], Sequence[int]] = None,
        probe_samples: int = 32,
        batch_to_xy: Optional[BatchToXY] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        with refuse_bad_options():
            check_positive_int("probe_samples", probe_samples)
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise MisconfigurationException(expected("batch_to_xy", "a callable batch -> (inputs, labels)", batch_to_xy))
        self.probe_samples = probe_samples
        self.batch_to_xy = batch_to_xy
        self.probe_x: Optional[Tensor] = None
        self.probe_y: Optional[Tensor] = None
        self._probe_indices: Optional[List[int]] = None
        self._candidates: Buckets = {}
        self._collecting = False
        if probe is not None:
            self._set_user_probe(probe)

    def _set_user_probe(self, probe: Any) -> None:
        if isinstance(probe, Tensor):
            x, y = probe, None
        elif isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], Tensor):
            x, y = probe
        elif isinstance(probe, (tuple, list, range)) and all(isinstance(i, int) and not isinstance(i, bool) for i in probe):
            if len(probe) == 0:
                raise MisconfigurationException(expected("probe", "a non-empty list of dataset indices", list(probe)))
            self._probe_indices = list(probe)
            return
        else:
            raise MisconfigurationException(
                expected("probe", "None, a tensor of inputs, a pair (inputs, labels) or a list of dataset indices",
                         type(probe).__name__))
        if x.ndim < 2 or x.shape[0] == 0:
            raise MisconfigurationException(expected("probe", "inputs with a batch dimension and at least one sample", x))
        if not (x.is_floating_point() or self.accepts_integer_inputs):
            raise MisconfigurationException(expected("probe", "floating-point inputs", x))
        if y is not None and (not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]):
            raise MisconfigurationException(expected("probe labels", f"a tensor of shape ({x.shape[0]},)", y))
        self.probe_x = x.detach().clone().cpu()
        self.probe_y = None if y is None else y.detach().clone().long().cpu()

    accepts_integer_inputs = False  # token-id models override

    # ------------------------------------------------------------------ the class explained per sample
    @staticmethod
    def check_target(target: Any) -> None:
        """``target`` must be ``"label"``, ``"prediction"`` or a class index."""
        if not (target in TARGETS or (isinstance(target, int) and not isinstance(target, bool) and target >= 0)):
            raise MisconfigurationException(expected("target", "'label', 'prediction' or a class index (int >= 0)", target))

    def targets_for(self, target: Union[str, int], preds: Tensor, y: Optional[Tensor]) -> Tensor:
        """Per-sample classes to explain: the labels, the predictions or a fixed class (labels fall back to
        predictions, with one warning, when the probe set has none)."""
        if isinstance(target, int):
            return torch.full_like(preds, target)
        if target == "label" and y is not None:
            return y
        if target == "label":
            warn_once("nolabel", f"{type(self).__name__}(target='label') found no labels in the probe set; "
                                 "explaining the predicted class instead.", owner=self)
        return preds

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["probe_x"] = self.probe_x
        state["probe_y"] = self.probe_y
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("probe_x") is not None:
            self.probe_x = state_dict["probe_x"]
            self.probe_y = state_dict.get("probe_y")

    # ------------------------------------------------------------------ collecting the probe set
    @property
    def has_probe(self) -> bool:
        return self.probe_x is not None

    def probe_size(self) -> Tuple[int, Optional[Tuple[int, ...]]]:
        """Rows of the probe set (``probe_samples`` until it is chosen) and the shape of one sample (None until then)."""
        if self.probe_x is None:
            return self.probe_samples, None
        return int(self.probe_x.shape[0]), tuple(self.probe_x.shape[1:])

    def _collect(self, trainer: "pl.Trainer", batch: Any, dataloader_idx: int) -> None:
        if self.has_probe or trainer.sanity_checking or dataloader_idx != 0 or self._probe_indices is not None:
            return
        with self.guard("reading a validation batch for the probe set", trainer.current_epoch, BATCH_FIX,
                        skips_run=False):  # a batch it cannot read adds no candidates; the others still do
            x, y = extract_xy(batch, self.batch_to_xy)
            collect_rows(self._candidates, x, class_labels(y, x.shape[0], self), self.probe_samples)

    @override
    def _on_eval_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.active(trainer) and not self.has_probe and trainer.state.fn == FITTING:
            # fixed after the first validation epoch even when the cadence skips it: no more collecting per batch,
            # and a class with fewer validation samples than `probe_samples` is not collected twice
            with self.guard("choosing the probe set", trainer.current_epoch):
                self.finalize_probe(trainer)
        super()._on_eval_epoch_end(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, batch, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, batch, dataloader_idx)

    def finalize_probe(self, trainer: "pl.Trainer") -> bool:
        """Fix the probe set (once); identical on every rank. Returns False if there is nothing to explain."""
        if self.has_probe:
            return True
        if self._probe_indices is not None:
            self._load_indices(trainer)
            return True
        x, y = choose_stratified(trainer, self._candidates, self.probe_samples)
        if x is None or x.numel() == 0:
            warn_once("empty", f"{type(self).__name__}: the validation data gave no samples to explain; "
                               "nothing is logged until it does (or pass `probe=`).", owner=self)
            return False
        self.probe_x, self.probe_y = x, y
        self._candidates = {}
        return True

    def _load_indices(self, trainer: "pl.Trainer") -> None:
        loader = first_loader(trainer.val_dataloaders if trainer.state.fn != TESTING else trainer.test_dataloaders)
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise MisconfigurationException("`probe` was given as dataset indices, but no validation dataset was found.")
        size = len(dataset)
        bad = [i for i in self._probe_indices if not -size <= i < size]
        if bad:
            raise MisconfigurationException(expected("probe", f"indices into the validation dataset of {size} samples", bad))
        from torch.utils.data import default_collate

        with forked_rng():  # a dataset drawing random augmentations must not move training's random streams
            x, y = extract_xy(default_collate([dataset[i] for i in self._probe_indices]), self.batch_to_xy)
        y = class_labels(y, x.shape[0], self)
        self.probe_x = x.detach().clone().cpu()
        self.probe_y = None if y is None else y.detach().clone().long().view(-1).cpu()

    # ------------------------------------------------------------------ the run
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        """Per-sample results for rows ``x`` (this rank's share); every value has ``x.shape[0]`` rows."""
        raise NotImplementedError

    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        """Log images/text (rank zero only) and return the scalars to log; called on every rank."""
        raise NotImplementedError

    def explain(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", via_module: bool = True) -> None:
        """Split the probe set over ranks, compute, gather, report; under the error policy."""
        epoch = self.begin_run(trainer, via_module)
        ready = self.guarded(lambda: self.finalize_probe(trainer), "choosing the probe set", epoch)
        if not self.agree(trainer, bool(ready)):
            return
        with torch.inference_mode(False):  # normal tensors, usable by autograd even in validate()/test()
            x_all = self.probe_x.to(pl_module.device).clone()
            y_all = None if self.probe_y is None else self.probe_y.to(pl_module.device).clone()
        world, rank = self.work_split(trainer)
        start, stop, keep = split_rows(x_all.shape[0], world, rank)

        def _compute() -> Dict[str, Tensor]:
            with self.explain_context(pl_module):
                return self.compute(pl_module, x_all[start:stop], None if y_all is None else y_all[start:stop])

        results = self.guarded(_compute, "explaining the probe samples", epoch)
        if not self.agree(trainer, results is not None):  # all ranks skip when any failed: none waits in a gather
            return
        if world > 1:
            results = gather_shares(trainer, results, keep)
        metrics = self.guarded(lambda: self.report(trainer, pl_module, x_all, y_all, results, epoch), "logging", epoch)
        if metrics is not None:
            self.log_metrics(trainer, pl_module, metrics, via_module=via_module, seconds=True)
        self.last_explained_epoch = epoch
