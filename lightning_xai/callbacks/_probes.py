"""LinearProbeMonitor: linear probes on every chosen layer, each validation epoch, with baselines.

Alain & Bengio (2016, https://arxiv.org/abs/1610.01644) plotted linear-probe accuracy per layer as
training goes on; Hewitt & Liang (2019, https://arxiv.org/abs/1909.03368) showed raw probe accuracy
misleads without controls (on digits raw pixels already probe at 0.92, an untrained CNN at 0.93, and
flattened conv maps memorise shuffled labels). So next to each layer's held-out accuracy this monitor
logs a control task (shuffled labels, same probe capacity), the selectivity (accuracy minus control
accuracy), a probe on the raw input and one on the untrained model, and warns when a probe memorises.

Features are captured by forward hooks during the validation passes Lightning runs anyway (no extra
forward pass; the untrained baseline costs one extra forward of the first probed epoch), reduced at
once to a bounded size, and the streamed ridge statistics are summed over processes under DDP.
"""
from __future__ import annotations

import contextlib
import copy
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_xai import _layout as layout
from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from torchmetrics.functional.classification import multiclass_accuracy
from typing_extensions import override

from lightning_xai._utils import (Passes, check_bool, check_choice, check_int, check_positive_int, check_real,
                                  eager_compiled, expected, is_compiled, preserve_modes)
from lightning_xai.callbacks import _cost as cost
from lightning_xai.callbacks._base import RunKey, as_run_key, run_key, run_labels
from lightning_xai.callbacks._batches import BATCH_FIX, BatchToXY, class_labels, extract_xy, first_loader
from lightning_xai.callbacks._ranks import gather_rows
from lightning_xai.callbacks._streaming import StreamingCallback
from lightning_xai._logging import add_custom_scalars, log_image, log_text, markdown_table, warn_once
from lightning_xai.probes import ActivationCapture, Reducer, make_reducer
from lightning_xai.probes._reduce import input_reducer
from lightning_xai.probes._epoch import EpochProbe, control_table
from lightning_xai.probes._reduce import ReduceSpec
from lightning_xai.render import matrix_figure, spread

LABEL = "label"
INPUT = "input"
UNTRAINED = "untrained/"
METRICS = ("accuracy", "selectivity", "control_accuracy")
MATRIX_EPOCHS = 10  # epoch columns of the probe figures (evenly spread beyond): ~10 px text in TensorBoard's card
INPUT_MAX_DIM = 256  # raw inputs wider than this are average-pooled (images) or projected for the input baseline

if TYPE_CHECKING:
    import lightning.pytorch as pl


def _layer_of(source: str) -> str:
    """The layer a probe's source reads: ``"untrained/net.1"`` and ``"net.1"`` read ``"net.1"``."""
    return source[len(UNTRAINED):] if source.startswith(UNTRAINED) else source


class LinearProbeMonitor(StreamingCallback):
    """Per-layer linear probes with controls and baselines, logged every validation epoch.

    A streaming callback (:class:`~lightning_xai.callbacks.StreamingCallback`): on the cadence's epochs, hooks
    attached at the epoch's start capture each validation batch's features (:meth:`update`); the epoch's end fits
    the probes (``compute``) and logs them (``report``).

    Args:
        layers: dotted layer names or glob patterns (``"net.0.*"``) of the LightningModule; an
            unknown name fails at ``setup`` and lists the valid names. A layer that does not run in
            ``validation_step`` is left out of that epoch's probes (one warning).
        reduce: feature reducer for every layer, or ``{layer: spec}``: ``"auto"`` (conv maps -> global
            average pool, sequences -> token mean, vectors wider than ``max_dim`` -> random projection),
            ``"gap"``, ``"gap+max"``, ``"pool2"``/``("pool", s)``, ``("rproj", k, seed)``, ``"tokens_mean"``,
            ``"flatten"``.
        concepts: extra per-sample properties to probe, ``{name: batch -> (N,) class indices >= 0}`` (integer,
            bool, or floats with whole values; e.g. "has a watermark"); each gets the same metrics under
            ``<layer>/<name>/...``. A concept that raises or returns anything else is dropped for the rest of the fit
            (one warning; ``on_error="raise"`` raises instead); the other probes go on.
        batch_to_xy: ``batch -> (inputs, labels)`` for batch formats
            :func:`~lightning_xai.callbacks.extract_xy` does not know.
        solver: ``"ridge"`` (streamed closed form, default) or ``"logistic"`` (a few L-BFGS steps).
        alphas: ridge strengths to choose from (``None``: a grid relative to the feature scale).
        cv: how the ridge strength is chosen: ``"gcv"`` or ``k`` folds.
        holdout_every: every n-th validation sample (by index) is held out for scoring the probe.
        input_baseline: also probe the raw input (computed on the first probed epoch, logged every epoch);
            inputs wider than 256 values are average-pooled (images) or randomly projected first.
        untrained_baseline: also probe the model as it was at fit start (one extra forward pass over the
            validation data, on the first probed epoch only).
        memorization_threshold: warn (once per layer) when the control probe's accuracy on its own
            training rows reaches this.
        max_dim: widest feature kept without projection by ``"auto"``.
        seed: seed of random projections and of the control-label permutation (private generators).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback` (``forward(pl_module, x)`` is also how the
            untrained copy is run).

    Tags (``prefix="xai"``), per layer and for ``input``:
        ``xai/probe/<layer>/accuracy``, ``.../selectivity``, ``.../control_accuracy``,
        ``.../control_train_accuracy``, ``.../untrained_accuracy``, ``.../untrained_selectivity``,
        ``xai/probe/<layer>/<concept>/...``; images ``xai/probe/heatmap`` (rows: input then layers;
        columns: untrained, then epochs) and ``xai/probe/heatmap_selectivity``; text ``xai/probe/table``.

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = LinearProbeMonitor(layers=["net.0.*"])
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=3)  # doctest: +SKIP
    """

    area = "probe"
    computing = "fitting probes"
    reporting = "logging probes"

    def __init__(
        self,
        layers: Sequence[str],
        reduce: Union[ReduceSpec, Mapping[str, ReduceSpec]] = "auto",
        concepts: Optional[Mapping[str, Callable[[Any], Tensor]]] = None,
        batch_to_xy: Optional[BatchToXY] = None,
        solver: str = "ridge",
        alphas: Optional[Sequence[float]] = None,
        cv: Union[str, int] = "gcv",
        holdout_every: int = 5,
        input_baseline: bool = True,
        untrained_baseline: bool = True,
        memorization_threshold: float = 0.9,
        max_dim: int = 1024,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) for n in layers):
            raise MisconfigurationException(
                expected("layers", "a non-empty list of layer names or glob patterns", layers))
        if concepts is not None and not isinstance(concepts, Mapping):
            raise MisconfigurationException(expected(
                "concepts", "None or a mapping name -> callable batch -> LongTensor (N,)", type(concepts).__name__))
        concepts = dict(concepts or {})
        for name, fn in concepts.items():
            if not isinstance(name, str) or not name or name == LABEL or "/" in name or not callable(fn):
                raise MisconfigurationException(
                    expected("concepts", f"a mapping of names (not {LABEL!r}, no '/') to callables "
                             "batch -> LongTensor (N,)", name))
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise MisconfigurationException(
                expected("batch_to_xy", "a callable batch -> (inputs, labels)", batch_to_xy))
        with refuse_bad_options():
            check_choice("solver", solver, ("ridge", "logistic"))
            check_positive_int("holdout_every", holdout_every)
            check_positive_int("max_dim", max_dim)
            if holdout_every < 2:
                raise ValueError(expected("holdout_every", "an int >= 2", holdout_every))
            check_bool("input_baseline", input_baseline)
            check_bool("untrained_baseline", untrained_baseline)
            check_real("memorization_threshold", memorization_threshold, 0, 1, low_open=True)
            check_int("seed", seed)
            for spec in (reduce.values() if isinstance(reduce, Mapping) else [reduce]):  # names: at setup
                make_reducer(spec)
            EpochProbe(alphas=alphas, cv=cv)  # validates alphas and cv now rather than at the first epoch
        self.layer_patterns = list(layers)
        self.reduce = reduce
        self.concepts = concepts
        self.batch_to_xy = batch_to_xy
        self.solver, self.alphas, self.cv, self.holdout_every = solver, alphas, cv, holdout_every
        self.input_baseline, self.untrained_baseline = input_baseline, untrained_baseline
        self.memorization_threshold = memorization_threshold
        self.max_dim, self.seed = max_dim, seed
        # results kept in the state_dict: {source: {epoch: {metric: value}}} and {source: {metric: value}}
        self.history: Dict[str, Dict[RunKey, Dict[str, float]]] = {}  # layer -> (epoch, step) -> metrics
        self.baselines: Dict[str, Dict[str, float]] = {}
        self.layers: List[str] = []
        self._capture: Optional[ActivationCapture] = None
        self._untrained: Optional[nn.Module] = None
        self._untrained_capture: Optional[ActivationCapture] = None
        self._input_reducer: Optional[Reducer] = None
        self._probes: Dict[str, EpochProbe] = {}
        self._seen = 0
        self._absent: set = set()  # layers that did not run in a validation batch of this epoch: not probed
        self._dropped: Dict[str, str] = {}  # concepts that failed in this fit (name -> why): not probed any more
        self._collecting = False
        self._running = False  # a run started this validation epoch (finished on every rank, even after a failure)
        self._layout_done = False
        self._eager = contextlib.ExitStack()  # holds the eager stance over a probed epoch of a compiled model

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, layers=tuple(self.layer_patterns))

    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["history"] = {k: {as_run_key(e): dict(m) for e, m in v.items()} for k, v in self.history.items()}
        state["baselines"] = {k: dict(v) for k, v in self.baselines.items()}
        state["dropped_concepts"] = dict(self._dropped)
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = {k: {as_run_key(e): dict(m) for e, m in v.items()}
                        for k, v in state_dict.get("history", {}).items()}
        self.baselines = {k: dict(v) for k, v in state_dict.get("baselines", {}).items()}
        self._dropped = {str(k): str(v) for k, v in state_dict.get("dropped_concepts", {}).items()}

    # ------------------------------------------------------------------ setup and teardown
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        with refuse_bad_options():
            self._capture = ActivationCapture(pl_module, self.layer_patterns,
                                              self.reduce, max_dim=self.max_dim, seed=self.seed)
        self._dropped = {}
        self._capture.raise_errors = self.on_error == "raise"
        self.layers = list(self._capture.names)
        if INPUT in self.layers:
            raise MisconfigurationException(
                expected("layers", f"names other than {INPUT!r} (used by the input baseline)", INPUT))

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.untrained_baseline or trainer.fast_dev_run or trainer.ckpt_path is not None:
            return
        if self.sharded:
            warn_once("sharded-untrained", "LinearProbeMonitor: no untrained baseline under "
                      f"{type(trainer.strategy).__name__} (it probes a copy of the model, and a sharded model cannot "
                      "be copied); pass untrained_baseline=False to silence this.", owner=self)
            return
        if any(k.startswith(UNTRAINED) for k in self.baselines):
            return
        with self.timed(trainer, run=False):
            self._copy_untrained(trainer, pl_module)

    def _copy_untrained(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # the weights as they are before any optimizer step; the trainer is shared, not copied
        self._untrained = copy.deepcopy(pl_module, memo={id(trainer): trainer})
        # Trainer.fit(torch.compile(module)) stores compiled step functions on the instance; they are bound to
        # the original module, so the copy would run the trained weights. The copy uses the class's own methods.
        for name in ("forward", "training_step", "validation_step", "test_step", "predict_step"):
            self._untrained.__dict__.pop(name, None)
        for p in self._untrained.parameters():
            p.requires_grad_(False)
        self._untrained_capture = ActivationCapture(self._untrained, self.layers, self._reducers_for_copy(),
                                                    max_dim=self.max_dim, seed=self.seed)

    @override
    def estimated_passes(self, trainer: Optional["pl.Trainer"] = None) -> Optional[Passes]:
        """The model passes of the current run (between runs: of the next one). While the untrained copy made at fit
        start waits to be probed, a forward of it per validation sample (at most: it ends after the deepest probed
        layer); else none: the features come from the validation forward Lightning runs anyway, and capturing,
        reducing and fitting them is no model pass; the channels-last check of the copy adds at most
        :data:`~lightning_xai._layout.CHECK_PASSES` x :data:`~lightning_xai._layout.CHECK_ROWS` forwards on each rank.
        None when the validation set is not known (no trainer) or has no length."""
        if not self._wants_untrained():
            return Passes()
        if trainer is None:  # the validation set is not known
            return None
        try:
            rows = len(first_loader(trainer.val_dataloaders).dataset)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - no loader, an iterable dataset: not known
            return None
        return Passes(forward=rows) + self.layout_check_passes(self._untrained, None,
                                                               [layout.CHECK_ROWS] * trainer.world_size)

    def _reducers_for_copy(self) -> Dict[str, Reducer]:
        return dict(self._capture.reducers)  # same reducers, so projections match the trained layers

    def _release(self) -> None:
        for cap in (self._capture, self._untrained_capture):
            if cap is not None:
                cap.detach()
        self._eager.close()
        self._collecting = False

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._release()
        self._probes = {}
        self._running = False

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._release()
        self._probes = {}
        self._untrained = self._untrained_capture = None

    # ------------------------------------------------------------------ collecting
    def _wants_input(self) -> bool:
        return self.input_baseline and INPUT not in self.baselines

    def _wants_untrained(self) -> bool:
        return self._untrained is not None and not any(k.startswith(UNTRAINED) for k in self.baselines)

    def _start(self, trainer: "pl.Trainer") -> None:
        if self._capture is None or not self.active(trainer) or not self.due(trainer):
            return
        cost.book(trainer).begin(id(self))  # a new run: its cost is counted afresh
        self._running = True  # on every rank alike (the cadence is deterministic): all of them finish the run
        self._probes = {}
        self._seen = 0
        self._absent = set()
        if is_compiled(trainer.lightning_module):
            # a compiled validation_step ignores hooks added after it was built: run this epoch's steps eagerly
            self._eager.enter_context(eager_compiled())
        self._capture.attach()
        if self._wants_untrained():
            self._untrained_capture.attach()
        self._collecting = True

    def _new_probe(self) -> EpochProbe:
        return EpochProbe(alphas=self.alphas, cv=self.cv, holdout_every=self.holdout_every, solver=self.solver)

    def _batch_start(self) -> None:
        if self._collecting:
            self._capture.clear()  # drop features from forwards outside validation_step (e.g. other callbacks)
            self._capture.take_seconds()  # their hook time too: it was charged to whoever ran those forwards

    @override
    def update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, dataloader_idx: int) -> None:
        """Capture and reduce this batch's features (hooks fired in ``validation_step``) and add them to the probes."""
        if not self._collecting:
            return
        if dataloader_idx != 0:
            self._capture.clear()
            return
        with self.timed(trainer):
            cost.book(trainer).charge(id(self), self._capture.take_seconds())  # the hooks in validation_step
            ok = self.guarded(lambda: self._collect(trainer, pl_module, batch) or True, "capturing activations",
                              trainer.current_epoch, BATCH_FIX + ", and `concepts` functions that return an integer "
                              "tensor of shape (batch,)")
        if not ok:  # give up on this epoch's probes, keep training
            self._release()
            self._probes = {}

    def _collect(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        if self._capture.error is not None:
            err, self._capture.error = self._capture.error, None
            raise err
        x, y = extract_xy(batch, self.batch_to_xy)
        n = x.shape[0]
        y = class_labels(y, n, self)
        feats = self._capture.pop(rows=n)
        self._absent.update(name for name in self.layers if name not in feats)
        for name in self._absent:  # a layer probed only where it ran would be scored on other samples than the rest
            feats.pop(name, None)
            self._probes.pop(name, None)
            self._probes.pop(UNTRAINED + name, None)
        labels: Dict[str, Tensor] = {} if y is None else {LABEL: y}
        for name, fn in self.concepts.items():
            if name in self._dropped:
                continue
            try:
                labels[name] = self._concept(fn, batch, name, n)
            except Exception as err:  # noqa: BLE001 - the concept's own failure: drop it, keep the other probes
                if self.on_error == "raise":
                    raise
                self._drop_concept(name, err, trainer.current_epoch)
        # global index, as a DistributedSampler(shuffle=False) interleaves samples over ranks
        world, rank = max(trainer.world_size, 1), trainer.global_rank
        index = (torch.arange(self._seen, self._seen + n, device=x.device) * world + rank).long()
        self._seen += n
        if self._absent:
            ran = [name for name in self.layers if name not in self._absent]
            warn_once(f"absent-{sorted(self._absent)}", f"LinearProbeMonitor: the layers {sorted(self._absent)} did "
                      f"not run in validation_step (or ran with another batch size) at epoch {trainer.current_epoch}; "
                      f"they are not probed this epoch" + (f" (the layers {ran} are)." if ran else "."), owner=self)
        if not labels:
            warn_once("skip", "LinearProbeMonitor skipped validation batches: the batches carry no labels and no "
                      "`concepts` were given.", owner=self)
            return
        if self._wants_untrained() and len(self._absent) < len(self.layers):
            feats.update({k: v for k, v in self._run_untrained(pl_module, x).items()
                          if _layer_of(k) not in self._absent})
        if self._wants_input():
            if x.is_floating_point():
                if self._input_reducer is None:
                    self._input_reducer = input_reducer(tuple(x.shape), max_dim=min(self.max_dim, INPUT_MAX_DIM),
                                                        seed=self.seed)
                feats[INPUT] = self._input_reducer(x).float()
            else:
                warn_once("int-input", "LinearProbeMonitor: integer inputs (token ids) have no input baseline.",
                          owner=self)
        for key, f in feats.items():
            probe = self._probes.get(key)
            if probe is None:
                probe = self._probes[key] = self._new_probe()
            probe.add(f, labels, index)

    def _concept(self, fn: Callable[[Any], Tensor], batch: Any, name: str, n: int) -> Tensor:
        """The concept's classes for this batch: ``(n,)`` indices >= 0 (integer or bool, or floats with whole
        values, such as 0./1.)."""
        out = fn(batch)
        want = f"class indices >= 0: a tensor of shape ({n},), integer or bool, or floats with whole values"
        if not isinstance(out, Tensor) or out.shape != (n,):
            raise ValueError(expected(f"concepts[{name!r}](batch)", want,
                                      out if isinstance(out, Tensor) else type(out).__name__))
        if out.is_complex():
            raise ValueError(expected(f"concepts[{name!r}](batch)", want, f"values such as {out[0].item()}"))
        if out.is_floating_point():
            whole = torch.isfinite(out) & (out == out.round())
            if not bool(whole.all()):
                raise ValueError(expected(f"concepts[{name!r}](batch)", want,
                                          f"values such as {out[~whole][0].item()}"))
        out = out.long()
        if out.numel() and int(out.min()) < 0:
            raise ValueError(expected(f"concepts[{name!r}](batch)", want, f"values down to {int(out.min())}"))
        return out

    def _drop_concept(self, name: str, err: BaseException, epoch: int) -> None:
        """Stop probing concept ``name`` for the rest of the fit (its probes of this epoch too), with one
        warning; the labels and the other concepts go on."""
        self._dropped[name] = (f"the concept {name!r} failed at epoch {epoch}{self._rank_note} and is not probed "
                               f"from now on ({type(err).__name__}: {err})")
        for probe in self._probes.values():
            probe.drop_target(name)
        self._warn_dropped(name)

    def _warn_dropped(self, name: str) -> None:
        warn_once(f"concept-{name}", f"LinearProbeMonitor: {self._dropped[name]}; the other probes go on.", owner=self)

    def _run_untrained(self, pl_module: "pl.LightningModule", x: Tensor) -> Dict[str, Tensor]:
        model = self._untrained.to(x.device)
        capture = self._untrained_capture
        devices = [x.device] if x.device.type == "cuda" else []

        def features(inputs: Tensor) -> Dict[str, Tensor]:
            capture.clear()
            with capture.stopping(rows=inputs.shape[0]):  # its layers past the deepest probed one: unused
                if self.forward is not None:
                    self.forward(model, inputs)
                else:
                    model(inputs)
            return capture.pop(rows=inputs.shape[0])

        with torch.random.fork_rng(devices=devices), torch.no_grad(), preserve_modes(model, eval_mode=True):
            error = capture.error  # the layout check's failures are its own answer, not the probe's
            fast = self._use_channels_last(model, features, x, remember=False)
            capture.error = error
            feats = features(layout.channels_last(x) if fast else x)
        return {UNTRAINED + k: v for k, v in feats.items()}

    # ------------------------------------------------------------------ fitting and logging
    def _finish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._running:
            return
        self._running = False
        with self.timed(trainer):
            if not self.agree(trainer):  # a rank failed while collecting: every rank skips this run's fit
                self._release()
                self._probes = {}
                return
            with self.guard("fitting probes", trainer.current_epoch):
                self._finish_run(trainer, pl_module)

    def _finish_run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._release()
        self.finish(trainer, pl_module, trainer.current_epoch)

    @override
    def compute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                epoch: int) -> Dict[str, Dict[str, Dict[str, float]]]:
        """Fit the probes of this epoch's features: ``{source: {target: {metric: value}}}`` (see :meth:`_fit`)."""
        probes, self._probes = self._probes, {}
        if self._untrained is not None and any(k.startswith(UNTRAINED) for k in probes):
            self._untrained = self._untrained_capture = None  # used once; free the copy
        return self._fit(trainer, probes)

    def _sum(self, trainer: "pl.Trainer", tensor: Tensor) -> Tensor:
        if trainer.world_size <= 1:
            return tensor
        return trainer.strategy.reduce(tensor.to(trainer.strategy.root_device), reduce_op="sum").to(tensor.device)

    def _agree_sources(self, trainer: "pl.Trainer", probes: Dict[str, EpochProbe]) -> None:
        """Under DDP, make every rank probe the same sources and targets (in place), so every rank joins the same
        gathers and all-reduces below: a layer that did not run or a concept that failed on any rank is left out on
        all of them, and a rank that saw no validation batch gets empty probes of the widths the others saw."""
        local = {key: (p.ridge.dim, sorted(p.labels()[1])) for key, p in probes.items() if p.ridge.dim is not None}
        everyone: List[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, (local, sorted(self._absent), dict(self._dropped)))
        for rank, (_, absent, dropped) in enumerate(everyone):  # rank zero warns for what another rank found
            for name in sorted(set(absent) - self._absent):
                self._absent.add(name)
                warn_once(f"absent-{name}-rank", f"LinearProbeMonitor: the layer {name!r} did not run in "
                          f"validation_step on rank {rank} at epoch {trainer.current_epoch}; it is not probed this "
                          "epoch, on any rank.", owner=self)
            for name, why in dropped.items():
                if name not in self._dropped:
                    self._dropped[name] = why
                    self._warn_dropped(name)
        for key in [k for k in probes if _layer_of(k) in self._absent]:
            del probes[key]
        for probe in probes.values():
            for name in self._dropped:
                probe.drop_target(name)
        device = trainer.strategy.root_device
        for seen, _, _ in everyone:
            for key, (dim, names) in seen.items():
                names = [name for name in names if name not in self._dropped]
                if key not in probes and _layer_of(key) not in self._absent:
                    empty = torch.zeros(0, dtype=torch.long, device=device)
                    probes[key] = self._new_probe()
                    probes[key].add(torch.zeros(0, dim, device=device), {name: empty for name in names}, empty)

    def _fit(self, trainer: "pl.Trainer", probes: Dict[str, EpochProbe]) -> Dict[str, Dict[str, Dict[str, float]]]:
        """``{source: {target: {metric: value}}}`` for every source probed this epoch."""
        world = max(trainer.world_size, 1)
        if world > 1:
            self._agree_sources(trainer, probes)
        for key, probe in probes.items():  # NaN/inf features were added as zeros: the probe says little
            if probe.nonfinite_rows:
                warn_once(f"nonfinite-{key}", f"LinearProbeMonitor: {probe.nonfinite_rows} validation samples gave "
                          f"NaN/inf features at {key!r} (NaN/inf inputs or an unstable layer); they enter the probe as "
                          "zeros, so its accuracy there is not meaningful.", owner=self)
        reference = next((probes[k] for k in self.layers + [INPUT] if k in probes), None)
        if reference is None or (world == 1 and reference.n_train < 2):
            if len(self._absent) < len(self.layers):  # else the layers' absence was the warning
                warn_once("empty", "LinearProbeMonitor: too few labelled validation samples to fit probes.",
                          owner=self)
            return {}
        # every source saw the same rows: take labels once, gather them over ranks, build the control task
        index, labels = reference.labels()
        names = sorted(labels)
        rows = torch.stack([index] + [labels[k] for k in names], dim=1)  # (N, 1 + targets)
        if world > 1:
            rows = gather_rows(trainer, rows)
        size = int(rows[:, 0].max()) + 1
        num_classes, tables = {}, {}
        for j, name in enumerate(names):
            table = torch.full((size,), -1, dtype=torch.long, device=rows.device)
            table[rows[:, 0]] = rows[:, 1 + j]
            num_classes[name] = max(int(table.max()) + 1, 2)
            tables[name] = control_table(table, seed=self.seed)
        keys = sorted(probes)
        for key in keys:
            probes[key].prepare(num_classes, tables)
        if world > 1:  # one all-reduce for every source's statistics
            packs = [probes[k].pack() for k in keys]
            total = self._sum(trainer, torch.cat(packs))
            offset = 0
            for k, p in zip(keys, packs):
                probes[k].unpack(total[offset: offset + p.numel()])
                offset += p.numel()
        gather = (lambda t: gather_rows(trainer, t)) if world > 1 else None
        splits = ("holdout", "train", "control_holdout", "control_train")
        counts, layout = [], []
        for key in keys:
            preds = probes[key].predict(gather)
            for name in names:
                for split in splits:
                    pred, true = preds[name][split]
                    counts.append(self._correct(pred, true, num_classes[name]))
                    layout.append((key, name, split))
        totals = self._sum(trainer, torch.stack(counts).to(rows.device)).view(-1, 2).cpu()
        out: Dict[str, Dict[str, Dict[str, float]]] = {}
        for (key, name, split), (correct, n) in zip(layout, totals.tolist()):
            out.setdefault(key, {}).setdefault(name, {})[split] = correct / n if n else float("nan")
        for key in keys:
            for name in names:
                m = out[key][name]
                m["alpha"] = probes[key].alphas[name]
        return out

    @staticmethod
    def _correct(pred: Tensor, true: Tensor, num_classes: int) -> Tensor:
        """``(correct, rows)`` as float64 ``(2,)``: the micro accuracy's counts (summed over ranks)."""
        if not true.numel():
            return torch.zeros(2, dtype=torch.float64)
        if int(true.min()) < 0 or int(true.max()) >= num_classes:  # torchmetrics names what is wrong with them
            multiclass_accuracy(pred, true, num_classes=num_classes, average="micro")
        return torch.tensor([float((pred == true).sum()), float(true.numel())], dtype=torch.float64)

    def _metric_tag(self, source: str, target: str, metric: str) -> str:
        return self.tag(source, metric) if target == LABEL else self.tag(source, target, metric)

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
               results: Dict[str, Dict[str, Dict[str, float]]], epoch: int) -> Dict[str, float]:
        run = run_key(trainer, epoch)
        for key, per_target in results.items():
            flat = {}
            for target, m in per_target.items():
                prefix = "" if target == LABEL else target + "/"
                flat[prefix + "accuracy"] = m["holdout"]
                flat[prefix + "control_accuracy"] = m["control_holdout"]
                flat[prefix + "selectivity"] = m["holdout"] - m["control_holdout"]
                flat[prefix + "train_accuracy"] = m["train"]
                flat[prefix + "control_train_accuracy"] = m["control_train"]
                flat[prefix + "alpha"] = m["alpha"]
                if m["control_train"] >= self.memorization_threshold:
                    src = _layer_of(key) + " (untrained)" if key.startswith(UNTRAINED) else key
                    warn_once(
                        f"memorize-{key}-{target}",
                        f"LinearProbeMonitor: the probe on {src!r} memorises shuffled labels of {target!r} "
                        f"(control train accuracy {m['control_train']:.2f} >= {self.memorization_threshold}); its "
                        "accuracy says little about the representation. Reduce the features (reduce='gap' or "
                        "('rproj', k)), probe more validation samples, or raise the ridge strength.",
                        owner=self,
                    )
            if key == INPUT or key.startswith(UNTRAINED):
                self.baselines[key] = flat
            else:
                self.history.setdefault(key, {})[run] = flat
        metrics: Dict[str, float] = {}
        targets = [LABEL] + sorted(c for c in self.concepts if c not in self._dropped)
        shown = ("accuracy", "selectivity", "control_accuracy", "control_train_accuracy")
        for key in [INPUT] + self.layers:
            for target in targets:
                p = "" if target == LABEL else target + "/"
                if key == INPUT and key in self.baselines:
                    for m in shown:
                        if p + m in self.baselines[key]:
                            metrics[self._metric_tag(key, target, m)] = self.baselines[key][p + m]
                elif run in self.history.get(key, {}):
                    for m in shown:
                        if p + m in self.history[key][run]:
                            metrics[self._metric_tag(key, target, m)] = self.history[key][run][p + m]
                base = self.baselines.get(UNTRAINED + key)
                if base and p + "accuracy" in base:
                    metrics[self._metric_tag(key, target, "untrained_accuracy")] = base[p + "accuracy"]
                    metrics[self._metric_tag(key, target, "untrained_selectivity")] = base[p + "selectivity"]
        if trainer.is_global_zero:
            self._log_layout(trainer, metrics)
            self._log_figures(trainer, epoch)
        return metrics

    def _log_layout(self, trainer: "pl.Trainer", metrics: Mapping[str, float]) -> None:
        if self._layout_done:
            return
        charts: Dict[str, list] = {}
        for metric in METRICS + ("untrained_accuracy",):
            tags = sorted(t for t in metrics if t.endswith("/" + metric)
                          and t.count("/") == self.tag("x", metric).count("/"))
            if tags:
                charts[metric] = ["Multiline", [re.escape(t) for t in tags]]
        add_custom_scalars(trainer, {self.tag(): charts})
        self._layout_done = True

    def heatmap_values(self, metric: str = "accuracy") -> Tuple[Tensor, List[str], List[str]]:
        """The Alain-Bengio figure as numbers: ``(rows, cols)`` values, row names (input, layers), column names.

        Columns are ``"untrained"`` (when available) and then the probed epochs (``"epoch@step"`` for the runs of an
        epoch probed more than once, see :func:`~lightning_xai.callbacks._base.run_labels`); missing cells are NaN.
        """
        probed = sorted({e for v in self.history.values() for e in v})
        has_untrained = any(k.startswith(UNTRAINED) for k in self.baselines)
        runs = (["untrained"] if has_untrained else []) + probed
        cols = (["untrained"] if has_untrained else []) + run_labels(probed)
        rows = ([INPUT] if INPUT in self.baselines else []) + self.layers
        values = torch.full((len(rows), len(cols)), float("nan"))
        for i, row in enumerate(rows):
            for j, run in enumerate(runs):
                if row == INPUT:
                    values[i, j] = self.baselines[INPUT].get(metric, float("nan"))
                elif run == "untrained":
                    values[i, j] = self.baselines.get(UNTRAINED + row, {}).get(metric, float("nan"))
                else:
                    values[i, j] = self.history.get(row, {}).get(run, {}).get(metric, float("nan"))
        return values, rows, cols

    def _log_figures(self, trainer: "pl.Trainer", epoch: int) -> None:
        figures = (("accuracy", self.tag("heatmap"), "linear-probe accuracy (held-out, %)", "viridis", 0.0, "{:.0f}",
                    "held-out accuracy of a linear probe, % (chance: 100 over the number of classes)"),
                   ("selectivity", self.tag("heatmap_selectivity"), "probe selectivity (points)", "RdBu_r", -100.0,
                    "{:+.0f}", "selectivity: accuracy minus the accuracy on shuffled labels, in % points "
                               "(Hewitt & Liang 2019)"))
        for metric, tag, what, cmap, lo, fmt, label in figures:
            values, rows, cols = self.heatmap_values(metric)
            if values.numel() == 0:
                continue
            keep = [j for j, c in enumerate(cols) if c == "untrained"] + \
                spread([j for j, c in enumerate(cols) if c != "untrained"], MATRIX_EPOCHS)
            more = len(cols) - len(keep)
            shown = ["init" if cols[j] == "untrained" else cols[j] for j in keep]
            fig = matrix_figure(100 * values[:, keep], rows, shown,
                                title=f"{what} · epoch {epoch}",
                                subtitle="rows: the raw input, then each probed layer; columns: init (the model before "
                                         "training), then each probed epoch" +
                                         (" (epoch@step where an epoch was probed more than once)"
                                          if any("@" in c for c in shown) else "") +
                                         (f" ({more} {'runs' if any('@' in c for c in cols) else 'epochs'} left "
                                          "out, evenly spread)" if more else ""),
                                cmap=cmap, lo=lo, hi=100.0, fmt=fmt, label=label, corner="layer \\ epoch")
            log_image(trainer, tag, fig)
        values, rows, cols = self.heatmap_values("accuracy")
        sel, _, _ = self.heatmap_values("selectivity")
        table = [[r] + [f"{float(values[i, j]):.3f} ({float(sel[i, j]):+.3f})" for j in range(len(cols))]
                 for i, r in enumerate(rows)]
        log_text(trainer, self.tag("table"),
                 "Held-out probe accuracy (selectivity) per layer (rows, as in the heatmap) and epoch (columns).\n\n"
                 + markdown_table(["layer"] + cols, table))

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        with self.guard("attaching activation hooks", trainer.current_epoch):
            self._start(trainer)

    @override
    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_start()

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        try:
            self._finish(trainer, pl_module)
        finally:
            self._release()

    @override
    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        with self.guard("attaching activation hooks", trainer.current_epoch):
            self._start(trainer)

    @override
    def on_test_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_start()

    @override
    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        try:
            self._finish(trainer, pl_module)
        finally:
            self._release()
