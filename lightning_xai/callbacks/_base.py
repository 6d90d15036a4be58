"""The small base every lightning_xai callback shares.

:class:`XAICallback` holds what each callback needs and none should write twice: cadence (``every_n_epochs``, a run at
fit end, sanity-check and ``fast_dev_run`` skipping), the error policy (``on_error``, :meth:`~XAICallback.guard`,
:meth:`~XAICallback.agree`), tags (``<prefix>/<area>/...``), ``state_dict``, the strategy and precision checks, the
model's logits function, the "do no harm" context (eval mode, gradients enabled even under ``inference_mode``, global
RNGs forked) and where a run's work goes over ranks (:meth:`~XAICallback.work_split`).

Every callback is one of two kinds, each a subclass of this base:

* :class:`~lightning_xai.callbacks.ProbeSetCallback`: choose a probe set once, then each run computes on it (every
  model pass) and reports (logs, no model pass).
* :class:`~lightning_xai.callbacks.StreamingCallback`: reads the validation batches as Lightning runs them, then
  finishes at the epoch's end: compute, then report.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from typing_extensions import override

from lightning_xai import _fold as folding
from lightning_xai import _layout as layout
from lightning_xai._lightning import CALLBACK_BASES, FITTING, MisconfigurationException, is_a, refuse_bad_options
from lightning_xai._utils import (Passes, check_bool, check_choice, check_positive_int, eager_compiled, expected,
                                  forked_rng, gradient_context, is_compiled, preserve_modes, select_output,
                                  two_class_logits)
from lightning_xai.callbacks import _cost as cost
from lightning_xai._logging import log_scalars, logging_step

if TYPE_CHECKING:
    import lightning.pytorch as pl

RunKey = Tuple[int, int]  # (epoch, global step) of a run: sorted, the runs in the order they happened


def run_key(trainer: "pl.Trainer", epoch: int) -> RunKey:
    """The key of the run explaining ``epoch`` now: ``(epoch, global step)``. An epoch validated more than once
    (``val_check_interval`` below 1, or validation by steps) gives one key per validation."""
    return int(epoch), int(trainer.global_step)


def as_run_key(key: Any) -> RunKey:
    """A stored key as a :data:`RunKey`; a bare epoch (a checkpoint from before runs were told apart) gets step -1."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), -1


def run_labels(keys: Sequence[RunKey]) -> List[str]:
    """Column names for runs: ``"e"`` for the only run of epoch ``e``, ``"e@s"`` (epoch @ global step) for each run
    of an epoch validated more than once.

    Example:
        >>> run_labels([(0, 8), (0, 16), (1, 32)])
        ['0@8', '0@16', '1']
    """
    runs = Counter(e for e, _ in keys)
    return [str(e) if runs[e] == 1 or s < 0 else f"{e}@{s}" for e, s in keys]


class XAICallback(*CALLBACK_BASES):  # type: ignore[misc]  # both Lightning packages' Callback
    """Base class of all lightning_xai callbacks (see the module docstring); a callback subclasses one of its two
    kinds, :class:`~lightning_xai.callbacks.ProbeSetCallback` or :class:`~lightning_xai.callbacks.StreamingCallback`,
    and implements :meth:`explain` through it.

    The cadence is deterministic: a validation epoch is explained when its index among the fit's validation
    epochs (``current_epoch // check_val_every_n_epoch``) is a multiple of ``every_n_epochs``, and at the end of
    ``fit`` if the last validated epoch was not; the same epochs on any machine and after a resume. Nothing is
    skipped to save time: each run logs its cost as ``<prefix>/<area>/seconds`` and the end of ``fit`` prints a
    table of every callback's runs and share of the fit's wall time (:mod:`lightning_xai.callbacks._cost`).

    Args:
        every_n_epochs: explain every n-th validation epoch (the first one included).
        run_on_fit_end: also explain the last validated epoch at the end of ``fit`` if the cadence skipped it.
        on_error: ``"warn"`` (default) warns once with the exception and skips that epoch's explanation,
            never losing the training run; ``"raise"`` re-raises.
        prefix: root of every tag this callback logs (``<prefix>/<area>/...``).
        output_key: picks the logits from a model returning a tuple/list (an int) or dict (a key).
        forward: ``forward(pl_module, inputs) -> logits`` for anything else; overrides ``output_key``.
        channels_last: the memory layout of the explanation passes on images. ``"auto"`` (default): a model with a
            2-D convolution explaining 4-D CPU float inputs runs them in channels-last layout when a check on the
            first run's inputs (16 rows, 12 forwards, once per fit; its verdict is kept in checkpoints) gives the
            same logits both ways to a relative 1e-3 and a forward at least 10 % faster (2.2x on a CIFAR-sized CNN),
            else in its own. Like cuDNN's ``benchmark``, the timing could choose differently in another run (the
            explanations then differ by float rounding), so with deterministic algorithms on
            (``Trainer(deterministic=True)``) ``"auto"`` keeps the model's layout. ``True``: always channels-last
            for 4-D inputs (no check); ``False``: never. See :mod:`lightning_xai._layout`.
        fold_batchnorm: whether the explanation passes fold each BatchNorm into the convolution before it (a
            traced copy of the forward computing the same function with fewer layers; the model itself is not
            changed). ``"auto"`` (default) and ``True``: fold where the callback's passes need nothing but the
            model's output (not for Grad-CAM or layer objectives) and the folded copy's logits and input gradients
            agree with the model's on the run's inputs (16 rows, 2 forward+backward passes, every run); ``"auto"``
            not with deterministic algorithms on nor on a sharded strategy, like ``channels_last``. ``False``:
            never. See :mod:`lightning_xai._fold`.
    """

    #: Strategy class names (either Lightning package): one device, the DDP family, and ModelParallelStrategy
    #: (FSDP2 ``fully_shard`` / tensor parallel), where every rank takes part in every pass (see :meth:`work_split`).
    supported_strategies = ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy")
    sharded_strategies = ("ModelParallelStrategy",)
    area = "xai"  # tag area below the prefix, e.g. "attribution"
    kind = ""  # "probe set" or "streaming": which of the two lifecycles (see the module docstring)

    def __init__(
        self,
        every_n_epochs: int = 1,
        run_on_fit_end: bool = True,
        on_error: str = "warn",
        prefix: str = "xai",
        output_key: Union[None, int, str] = None,
        forward: Optional[Callable[[Any, Tensor], Tensor]] = None,
        channels_last: Union[str, bool] = "auto",
        fold_batchnorm: Union[str, bool] = "auto",
    ) -> None:
        super().__init__()
        with refuse_bad_options():
            check_positive_int("every_n_epochs", every_n_epochs)
            check_bool("run_on_fit_end", run_on_fit_end)
            check_choice("on_error", on_error, ("warn", "raise"))
            if not isinstance(prefix, str) or not prefix.strip("/"):
                raise (ValueError if isinstance(prefix, str) else TypeError)(expected("prefix", "a non-empty str",
                                                                                      prefix))
            if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, (int, str))):
                raise TypeError(expected("output_key", "None, an int (tuple/list outputs) or a str (dict outputs)",
                                         type(output_key).__name__))
            if forward is not None and not callable(forward):
                raise TypeError(expected("forward", "a callable (pl_module, inputs) -> logits", forward))
            for name, value in (("channels_last", channels_last), ("fold_batchnorm", fold_batchnorm)):
                if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
                    raise (ValueError if isinstance(value, str) else TypeError)(
                        expected(name, "'auto', True or False", value))
        self.every_n_epochs = every_n_epochs
        self.run_on_fit_end = run_on_fit_end
        self.on_error = on_error
        self.prefix = prefix.strip("/")
        self.output_key = output_key
        self.forward = forward
        self.channels_last = channels_last
        self.fold_batchnorm = fold_batchnorm
        # module id -> its folded copy (None: nothing folds); (module id, row shape, dtype, run) -> the copy agrees
        self._folds: Dict[int, Optional[folding.Folded]] = {}
        self._fold_agrees: Dict[Tuple[Any, ...], bool] = {}
        self._layouts: Dict[Tuple[Any, ...], bool] = {}  # (module id, row shape, dtype) -> runs channels-last
        # (row shape, dtype name) -> the timing's verdict on the explained model, kept in checkpoints so a resumed fit
        # computes in the layout the run began with
        self._layout_speed: Dict[Tuple[Tuple[int, ...], str], bool] = {}
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
        return {"last_explained_epoch": self.last_explained_epoch, "errors": self.errors,
                "channels_last": [[list(shape), dtype, fast] for (shape, dtype), fast in self._layout_speed.items()]}

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.last_explained_epoch = int(state_dict.get("last_explained_epoch", -2))
        self.errors = int(state_dict.get("errors", 0))
        self._layout_speed = {(tuple(int(s) for s in shape), str(dtype)): bool(fast)
                              for shape, dtype, fast in state_dict.get("channels_last", [])}

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
        self._layouts, self._layout_speed = {}, {}  # a checkpoint's verdicts are loaded after this
        self._folds, self._fold_agrees = {}, {}
        if stage == "fit":
            cost.book(trainer, new_fit=True).register(id(self), self.cost_name())

    def cost_name(self) -> str:
        """This callback's row in the end-of-fit cost table: its class, and its prefix when not the default."""
        name = type(self).__name__
        return name if self.prefix == "xai" else f"{name} ({self.prefix})"

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._folds, self._fold_agrees = {}, {}  # the folded copies hold the model's modules
        if stage != "fit":
            return
        book = cost.book(trainer)
        if not book.finished:  # the first callback torn down reports for all of them
            book.finished = True
            if trainer.is_global_zero and book.names:
                cost.print_table(book)

    # ------------------------------------------------------------------ model access
    def logits_fn(self, pl_module: "pl.LightningModule",
                  example: Optional[Tensor] = None) -> Callable[[Tensor], Tensor]:
        """``inputs -> logits (N, classes)`` for the unwrapped module, honouring ``forward``/``output_key``; a model
        with one binary logit is seen as two classes (:func:`~lightning_xai._utils.two_class_logits`).

        With ``example`` (inputs like the ones to explain), the passes run with BatchNorm folded as
        ``fold_batchnorm`` says (when :meth:`folds_model` allows it) and 4-D inputs in channels-last layout as
        ``channels_last`` says; under ``"auto"`` :func:`lightning_xai._layout.choose` decides on ``example``'s
        first rows, once per module, row shape and dtype in a fit (call this inside :meth:`explain_context`)."""
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)

        def cast(x: Tensor) -> Tensor:  # probe inputs are float32; a 64-true model takes float64
            return x.to(dtype) if dtype is not None and x.is_floating_point() and x.dtype != dtype else x

        user, key = self.forward, self.output_key

        def plain(x: Tensor) -> Tensor:
            if user is not None:
                return two_class_logits(user(pl_module, cast(x)))
            return two_class_logits(select_output(pl_module(cast(x)), key))

        fn = (None if example is None else self._folded(pl_module, plain, example, cast)) or plain
        if example is None or not self._use_channels_last(pl_module, fn, example):
            return fn
        return lambda x: fn(layout.channels_last(x) if x.ndim == 4 else x)

    def _use_channels_last(self, module: Any, fn: Callable[[Tensor], Any], example: Tensor,
                           remember: bool = True) -> bool:
        """Whether ``fn``'s passes on inputs like ``example`` run channels-last (see ``channels_last``): decided
        once per fit for each module, row shape and dtype. ``remember``: the module is the explained model, whose
        timing verdict a checkpoint keeps; a resumed fit then only checks that the layouts agree."""
        if self.channels_last is True:
            return example.ndim == 4
        if not self._layout_checked() or not layout.eligible(module, example):
            return False
        key = (id(module), tuple(example.shape[1:]), example.dtype)
        if key not in self._layouts:
            speed_key = (key[1], str(example.dtype))
            if remember and speed_key in self._layout_speed:
                self._layouts[key] = self._layout_speed[speed_key] and layout.agrees(fn, example)
            else:
                self._layouts[key] = layout.choose(fn, example)
                if remember:
                    self._layout_speed[speed_key] = self._layouts[key]
        return self._layouts[key]

    def layout_check_passes(self, module: Any, row_shape: Optional[Tuple[int, ...]], rows: Sequence[int],
                            dtype: torch.dtype = torch.float32) -> Passes:
        """The forwards of the channels-last check still to come (see ``channels_last``): for each rank with
        ``rows`` inputs of ``row_shape``, :data:`~lightning_xai._layout.CHECK_PASSES` forwards of
        :data:`~lightning_xai._layout.CHECK_ROWS` of them (at most), once per fit for each module, shape and dtype;
        two (the comparison) after a resume whose checkpoint chose channels-last, none if it chose the default
        layout; none under ``True``/``False``, a sharded strategy or deterministic algorithms.
        ``row_shape`` None (not known yet): images, checked unless one was for this module."""
        if not self._layout_checked() or module is None:
            return Passes()
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        done = (any(k[0] == id(module) for k in self._layouts) if row_shape is None
                else (id(module), tuple(row_shape), dtype) in self._layouts)
        if done or not layout.eligible(module, torch.empty((0, *(row_shape or (1, 1, 1))), dtype=dtype,
                                                           device=device)):
            return Passes()
        kept = None if row_shape is None else self._layout_speed.get((tuple(row_shape), str(dtype)))
        passes = layout.CHECK_PASSES if kept is None else layout.AGREE_PASSES if kept else 0
        return Passes(forward=sum(passes * min(layout.CHECK_ROWS, r) for r in rows))

    def folds_model(self) -> bool:
        """Whether this callback's passes need nothing from the model but its output (no hooks on its layers), so
        that they may run on a folded copy (see ``fold_batchnorm``). Subclasses that can say so override this."""
        return False

    def _fold_checked(self) -> bool:
        """Whether ``fold_batchnorm`` folds here: on (``True``, or ``"auto"`` without deterministic algorithms and
        off sharded strategies), no user ``forward`` (it may use anything of the module), and :meth:`folds_model`."""
        if self.fold_batchnorm is False or self.forward is not None or not self.folds_model():
            return False
        return self.fold_batchnorm is True or self._rounding_may_change()

    def _fold_of(self, module: Any) -> Optional[folding.Folded]:
        """``module``'s folded copy with the module's current weights (traced once per fit, again if the module
        took new parameter objects), None when nothing folds."""
        if id(module) in self._folds:
            found = self._folds[id(module)]
            if found is None or found.refresh():
                return found
            # traced with tensors the module no longer holds: its verdicts go, and it is traced again
            self._fold_agrees = {k: v for k, v in self._fold_agrees.items() if k[0] != id(module)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing warns about what it records as constants; agrees() judges
            found = self._folds[id(module)] = folding.fold(module)
        return found

    def _folded(self, module: Any, plain: Callable[[Tensor], Tensor], example: Tensor,
                cast: Callable[[Tensor], Tensor]) -> Optional[Callable[[Tensor], Tensor]]:
        """``plain`` (``inputs -> logits`` of the module) computed by the module's folded copy, its weights refreshed
        from the module's; None to run the module itself. The copy must agree with ``plain`` on ``example``'s first
        rows (:func:`lightning_xai._fold.agrees`, in every run: the module's other state may change between runs)."""
        if not self._fold_checked() or not isinstance(example, Tensor):
            return None
        found = self._fold_of(module)
        if found is None:
            return None
        model, output_key = found.module, self.output_key  # the one module it captures (attribution looks it up)

        def folded(x: Tensor) -> Tensor:
            return two_class_logits(select_output(model(cast(x)), output_key))

        trainer = getattr(module, "_trainer", None)
        run = None if trainer is None else cost.book(trainer).runs.get(id(self))
        key = (id(module), tuple(example.shape[1:]), example.dtype, run)
        if key not in self._fold_agrees:
            verdict = folding.agrees(plain, folded, example)
            self._fold_agrees = {k: v for k, v in self._fold_agrees.items() if k[3] == run}
            self._fold_agrees[key] = verdict
        return folded if self._fold_agrees[key] else None

    def fold_check_passes(self, module: Any, rows: Sequence[int]) -> Passes:
        """The folding check's passes in a run (see ``fold_batchnorm``): for each rank with ``rows`` inputs,
        :data:`~lightning_xai._fold.AGREE_PASSES` forward+backward passes of
        :data:`~lightning_xai._layout.CHECK_ROWS` of them (at most), in every run on a model that folds."""
        if not self._fold_checked() or module is None or self._fold_of(module) is None:
            return Passes()
        return Passes(gradient=sum(folding.AGREE_PASSES * min(layout.CHECK_ROWS, r) for r in rows))

    def _layout_checked(self) -> bool:
        """Whether ``channels_last="auto"`` checks the layout here (see :meth:`_rounding_may_change`)."""
        return self.channels_last is not True and self.channels_last is not False and self._rounding_may_change()

    def _rounding_may_change(self) -> bool:
        """Whether ``"auto"`` may change the passes' float rounding (layout, folding): not on a sharded strategy
        (every rank must run the same passes) nor with deterministic algorithms on (a timing could choose differently
        in another run, and results must repeat)."""
        return not self.sharded and not torch.are_deterministic_algorithms_enabled()

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

    def estimated_passes(self, trainer: Optional["pl.Trainer"] = None) -> Optional[Passes]:
        """The model passes one run takes (over all ranks), counted per sample: forwards alone and forward+backward
        passes, for the benchmarks' floors (each priced at its measured cost). ``None`` (the default): not known."""
        return None

    def estimated_work(self, trainer: Optional["pl.Trainer"] = None) -> Optional[float]:
        """:meth:`estimated_passes` in sample forward+backward equivalents (a forward alone counts 1/3)."""
        passes = self.estimated_passes(trainer)
        return None if passes is None else passes.equivalent

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
        (:func:`~lightning_xai.callbacks._ranks.split_rows`) and the shares are gathered on every rank
        (:func:`~lightning_xai.callbacks._ranks.gather_shares`), so the figures equal one process's. Under a
        sharded strategy a forward pass needs every rank, in the same order and the same number of times: every
        rank explains the whole probe set in lockstep (``(1, 0)``: nothing to split or gather) and rank zero logs.
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
            with warnings.catch_warnings():
                # logger=True puts a value in what validate() returns, with or without a logger; without one,
                # Lightning would warn once per name that none is configured
                warnings.filterwarnings("ignore", message=r".*but have no logger configured")
                for name, value in metrics.items():
                    pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False,
                                  add_dataloader_idx=False, logger=not fitting)
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
