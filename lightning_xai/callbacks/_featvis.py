"""FeatureVisMonitor: the model draws what its filters detect and what each class looks like to it.

Every few validation epochs (and at the end of ``fit``) the callback runs activation maximisation for
each target set and logs one image grid per set, so TensorBoard's step slider shows the filters and
class images forming over training::

    trainer = Trainer(callbacks=[FeatureVisMonitor(targets=[("logits", range(10)),
                                                            ("features.3", "channels", range(8))])])

The maths lives in :mod:`lightning_xai.featvis`; this file only composes and logs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai import _layout as layout
from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import Passes, check_int, check_positive_int, check_real, expected, resolve_layer
from lightning_xai.callbacks import _shared as shared
from lightning_xai.callbacks._batches import BatchToXY, extract_xy
from lightning_xai.callbacks._streaming import StreamingCallback
from lightning_xai.featvis import Objective, make_param, render
from lightning_xai.featvis._objectives import OUTPUT, class_logit, objectives_from_spec
from lightning_xai._logging import log_image, warn_once
from lightning_xai.render import image_figure
from lightning_xai.render._maps import one_thread

if TYPE_CHECKING:
    import lightning.pytorch as pl

DEFAULT_CLASSES = 10  # the default target set's most class images: one grid row or two, each cell still readable


class FeatureVisMonitor(StreamingCallback):
    """Logs activation-maximisation images of class logits, channels or neurons while the model trains.

    A streaming callback (:class:`~lightning_xai.callbacks.StreamingCallback`): the validation batches give the
    input shape and value range (:meth:`update`, until both are known); on the cadence's epochs the epoch's end
    renders every target set (``compute``) and logs the grids (``report``).

    Args:
        targets: target sets, each logged as one grid. ``"logits"`` (the default): one image per class logit of the
            model output, for its first :data:`DEFAULT_CLASSES` classes (a model with one binary logit has two:
            class 1 raises it, class 0 lowers it), read off the model at the first run. Forms of a list of sets:
            ``("logits", [0, ..., 9])`` (these class logits of the model output; a class the output does not have
            is an error at each run), ``"logits"`` (as above), ``(layer, "channels", indices)``,
            ``(layer, "neurons", indices)``
            (centre unit of each channel), ``(layer, "layer")`` (DeepDream), or ``(label, [Objective, ...])``.
            Layer names are dotted names of the LightningModule's submodules.
        every_n_epochs: render every n-th validation epoch (default 5: rendering is slow on CPU), and
            at the end of ``fit``.
        steps: optimiser steps per render.
        lr: Adam learning rate.
        param: ``"fourier"`` (default), ``"pixel"`` or a :class:`~lightning_xai.featvis.Parametrization`.
        transforms: random transforms (``None``: sized to the input, see
            :func:`~lightning_xai.featvis.default_transforms`; ``[]``: none).
        regularizers: image penalties (``None``: ``[L1(0.05), TotalVariation(0.05)]``; ``[]``: none).
        input_shape: ``(C, H, W)`` of one input; ``None`` takes it from the first validation batch.
        value_range: ``(lo, hi)`` of the inputs (floats or per-channel tensors); ``None`` takes the
            min and max of the first validation batch.
        seed: seed of the private generator; the same start every epoch, so changes between epochs
            come from the model. Each target set starts its own generator from it, so under DDP the sets
            are shared out over the ranks (largest first, to the least loaded rank) and the images are
            the same as in one process; the ranks first agree on the input shape and widen the value range
            to what every rank saw.
        batch_to_xy: ``batch -> (inputs, labels)`` for batch formats the base does not know.
        ncols: images per grid row (default: about as many rows as columns; fewer when labels need the width).
        min_side: cells are upscaled (nearest) so their short side is at least this many pixels.
        num_threads: CPU intra-op threads while rendering (restored after); ``1`` is much faster for
            small models on a busy CPU. ``None`` leaves the setting alone.
        run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback`.

    Tags (with the default ``prefix="xai"``):
        ``xai/featvis/<label>`` (image grid, one cell per target) and ``xai/featvis/<label>/activation``
        (scalar, the mean objective reached over the set, via ``pl_module.log``), where ``<label>`` is
        ``logits`` or the layer name.

    Raises:
        MisconfigurationException: for bad arguments, (in ``setup``) layer names the model does not have (the
            message lists the valid names), or (at the first validation batch, the sanity check's by default)
            inputs that are not float images ``(N, C, H, W)`` when ``input_shape`` is not given.

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = FeatureVisMonitor(targets=[("logits", range(10))], every_n_epochs=5)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=20)  # doctest: +SKIP
    """

    area = "featvis"
    computing = "explaining"

    def __init__(
        self,
        targets: Union[str, Sequence[Any]] = "logits",
        every_n_epochs: int = 5,
        steps: int = 256,
        lr: float = 0.05,
        param: Any = "fourier",
        transforms: Optional[Sequence[Any]] = None,
        regularizers: Optional[Sequence[Any]] = None,
        input_shape: Optional[Sequence[int]] = None,
        value_range: Optional[Tuple[Any, Any]] = None,
        seed: int = 0,
        batch_to_xy: Optional[BatchToXY] = None,
        ncols: Optional[int] = None,
        min_side: int = 64,
        num_threads: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, **kwargs)
        if _is_logits(targets):
            targets = [targets]
        # "logits": the set is cut to the model's classes at the first run (until then: the most it can hold)
        self._classes_to_read = isinstance(targets, list) and any(_is_logits(t) for t in targets)
        if self._classes_to_read:
            targets = [("logits", tuple(range(DEFAULT_CLASSES))) if _is_logits(t) else t for t in targets]
        if isinstance(targets, tuple) and targets and isinstance(targets[0], str):
            targets = [targets]  # a single spec
        if not isinstance(targets, (list, tuple)) or not targets:
            raise MisconfigurationException(expected("targets", "'logits' or a non-empty list of target specs",
                                                     repr(targets)))
        self.target_sets: List[Tuple[str, List[Objective]]] = []
        with refuse_bad_options():
            for spec in targets:
                self.target_sets.append(objectives_from_spec(spec))
            check_positive_int("steps", steps)
            check_positive_int("ncols", ncols, allow_none=True)
            check_positive_int("min_side", min_side)
            check_positive_int("num_threads", num_threads, allow_none=True)
            make_param(param)
            check_int("seed", seed)
        for name, value, what in (("transforms", transforms, "callables (images, generator) -> images"),
                                  ("regularizers", regularizers, "callables images -> (K,)")):
            if value is not None and (not isinstance(value, (list, tuple)) or not all(callable(v) for v in value)):
                raise MisconfigurationException(expected(name, f"None or a list of {what}", value))
        labels = [label for label, _ in self.target_sets]
        if len(set(labels)) != len(labels):
            raise MisconfigurationException(
                expected("targets", "target sets with distinct labels (layer names)", labels))
        with refuse_bad_options():
            check_real("lr", lr, 0, low_open=True)
        if input_shape is not None and (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3
                                        or not all(isinstance(s, int) and s > 0 for s in input_shape)):
            raise MisconfigurationException(
                expected("input_shape", "(C, H, W) with positive ints or None", repr(input_shape)))
        if value_range is not None:
            _check_value_range(value_range, None if input_shape is None else input_shape[0])
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise MisconfigurationException(
                expected("batch_to_xy", "a callable batch -> (inputs, labels)", batch_to_xy))
        self.steps, self.lr, self.param, self.seed = steps, float(lr), param, seed
        self.transforms = None if transforms is None else list(transforms)
        self.regularizers = None if regularizers is None else list(regularizers)
        self.input_shape: Optional[Tuple[int, int, int]] = None if input_shape is None else tuple(input_shape)
        self.value_range = value_range
        self._user_shape, self._user_range = input_shape is not None, value_range is not None
        self.batch_to_xy = batch_to_xy
        self.ncols, self.min_side, self.num_threads = ncols, min_side, num_threads
        self.last_activations: Dict[str, Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, targets=[lb for lb, _ in self.target_sets])

    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        state["value_range"] = None if self.value_range is None else [_plain(v) for v in self.value_range]
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if not self._user_shape and state_dict.get("input_shape") is not None:
            self.input_shape = tuple(state_dict["input_shape"])
        if not self._user_range and state_dict.get("value_range") is not None:
            self.value_range = tuple(state_dict["value_range"])

    @override
    def folds_model(self) -> bool:
        """Every objective reads the model's output alone (class logits by default), no layer."""
        return all(key == OUTPUT for _, objs in self.target_sets for obj in objs for key in obj.layers)

    @override
    def estimated_passes(self, trainer: Optional["pl.Trainer"] = None) -> Optional[Passes]:
        """Per image (one per target of every set) a forward+backward at each of the ``steps`` optimiser steps and a
        forward of the final image; the same over all ranks (each set renders on one of them); and on every rank the
        folding check's passes (every run) and the channels-last check's forwards (once per fit). Before the first
        run, ``targets="logits"`` counts :data:`DEFAULT_CLASSES` images and, on every rank, the forward of one input
        that reads the model's classes."""
        passes = sum(len(objs) for _, objs in self.target_sets) * Passes(forward=1, gradient=self.steps)
        if self._classes_to_read:  # the set may then be smaller
            passes = passes + Passes(forward=1 if trainer is None else trainer.world_size)
        if trainer is None or self.input_shape is None:
            return passes
        checks = [layout.CHECK_ROWS] * trainer.world_size
        return (passes + self.fold_check_passes(trainer.lightning_module, checks)
                + self.layout_check_passes(trainer.lightning_module, self.input_shape, checks))

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        for _, objs in self.target_sets:
            for obj in objs:
                for layer in obj.layers:
                    if layer == OUTPUT:
                        continue
                    with refuse_bad_options():
                        resolve_layer(pl_module, layer, "targets")

    # ------------------------------------------------------------------ input shape and range from the data
    def _observe(self, batch: Any, dataloader_idx: int) -> None:
        if dataloader_idx != 0 or (self.input_shape is not None and self.value_range is not None):
            return
        x, _ = extract_xy(batch, self.batch_to_xy)
        if self.input_shape is None and (x.ndim != 4 or not x.is_floating_point()):
            raise MisconfigurationException(expected(
                "FeatureVisMonitor's inputs", "float images of shape (N, C, H, W): it renders images (for a model that "
                "takes images in another form, pass `input_shape=(C, H, W)` and a `forward`)", x))
        if self.input_shape is None:
            self.input_shape = tuple(int(s) for s in x.shape[1:])
        if self.value_range is None:
            lo, hi = float(x.detach().min()), float(x.detach().max())
            self.value_range = (lo, hi if hi > lo else lo + 1.0)

    @override
    def update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, dataloader_idx: int) -> None:
        """Take the input shape and value range from the first batch (when not given)."""
        what = "reading a test batch" if trainer.testing else "reading a validation batch"
        with self.guard(what, trainer.current_epoch, "pass `input_shape=` and `value_range=`", skips_run=False):
            self._observe(batch, dataloader_idx)

    # ------------------------------------------------------------------ the run
    def _owners(self, world: int) -> Dict[str, int]:
        """The rank that renders each target set: the largest sets first, each to the least loaded rank."""
        loads, owners = [0] * world, {}
        for label, objs in sorted(self.target_sets, key=lambda t: -len(t[1])):
            owners[label] = loads.index(min(loads))
            loads[owners[label]] += len(objs)
        return owners

    def _agree_input(self, trainer: "pl.Trainer") -> None:
        """Under DDP: every rank takes the input shape seen first (by rank) and the widest value range seen,
        so all ranks render alike even when one of them saw no validation batch."""
        seen = (self.input_shape, None if self.value_range is None else [_plain(v) for v in self.value_range])
        everyone: List[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, seen)
        shapes = [shape for shape, _ in everyone if shape is not None]
        if self.input_shape is None and shapes:
            self.input_shape = tuple(shapes[0])
        ranges = [r for _, r in everyone if r is not None]
        if ranges and not self._user_range:
            lo = torch.stack([torch.as_tensor(r[0], dtype=torch.float64) for r in ranges]).amin(0)
            hi = torch.stack([torch.as_tensor(r[1], dtype=torch.float64) for r in ranges]).amax(0)
            self.value_range = (_plain(lo), _plain(hi))

    def _gather(self, trainer: "pl.Trainer", results: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """Every rank's renders on every rank, in target-set order; None on every rank when any rank failed."""
        local = None if results is None else {label: res._replace(images=res.images.cpu(),
                                                                  activations=res.activations.cpu(),
                                                                  history={k: v.cpu() for k, v in res.history.items()})
                                              for label, res in results.items()}
        everyone: List[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, local)
        if any(part is None for part in everyone):
            return None
        merged = {label: res for part in everyone for label, res in part.items()}
        return {label: merged[label] for label, _ in self.target_sets}

    def _read_classes(self, pl_module: "pl.LightningModule") -> None:
        """Cut the default target set to the classes of the model's output (one forward of one input)."""
        with self.explain_context(pl_module), torch.no_grad():
            one = torch.rand(1, *self.input_shape, generator=torch.Generator().manual_seed(0))
            classes = int(self.logits_fn(pl_module)(one.to(pl_module.device)).shape[1])
        self.target_sets = [(label, [class_logit(c) for c in range(min(classes, DEFAULT_CLASSES))])
                            if label == "logits" else (label, objs) for label, objs in self.target_sets]
        self._classes_to_read = False

    def _render_all(self, pl_module: "pl.LightningModule", labels: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        results = {}
        with self.explain_context(pl_module):
            # the layout check's inputs: any images of the input shape (their values only need to be the same twice)
            example = torch.rand(layout.CHECK_ROWS, *self.input_shape, generator=torch.Generator().manual_seed(0))
            forward = self.logits_fn(pl_module, example.to(pl_module.device))
            for label, objs in self.target_sets:
                if labels is not None and label not in labels:
                    continue
                results[label] = render(pl_module, objs, self.input_shape, steps=self.steps, lr=self.lr,
                                        param=self.param, transforms=self.transforms, regularizers=self.regularizers,
                                        seed=self.seed, value_range=self.value_range, forward=forward,
                                        num_threads=self.num_threads)
        return results

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", results: Dict[str, Any],
               epoch: int) -> Dict[str, float]:
        """The mean activation reached per target set; the grids logged on rank zero."""
        for res in results.values():
            shared.warn_not_finite(self, pl_module, res.activations, "objectives reached (feature visualisation)",
                                   rows="images")
        metrics = {self.tag(label, "activation"): float(res.activations.mean()) for label, res in results.items()}
        self.last_activations = {label: res.activations.detach().cpu() for label, res in results.items()}
        if trainer.is_global_zero:
            with one_thread():  # no model pass here: see lightning_xai.render._maps.one_thread
                self._log_grids(trainer, results, epoch)
        return metrics

    def _log_grids(self, trainer: "pl.Trainer", results: Dict[str, Any], epoch: int) -> None:
        """One image grid per target set, to every image logger."""
        step = self.step(trainer)
        c = self.input_shape[0]
        lo, hi = (torch.as_tensor(v, dtype=torch.float32).reshape(-1).view(1, -1, 1, 1).expand(1, c, 1, 1)
                  for v in self.value_range)
        for label, res in results.items():
            images = ((res.images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)  # (K, C, H, W) in [0, 1]
            log_image(trainer, self.tag(label), self._figure(label, images, res.activations, epoch), step=step)

    def _figure(self, label: str, images: Tensor, activations: Tensor, epoch: int) -> Any:
        """The grid of one target set: each image above what it maximises and the value reached."""
        objs = dict(self.target_sets)[label]
        captions = [[_cell_name(obj.name), f"{float(a):.3g}"]
                    for obj, a in zip(objs, activations.detach().float().cpu())]
        return image_figure(images, title=f"feature visualisation · {label} · epoch {epoch}",
                            subtitle="each cell: the input that maximises the target below it, and the value reached",
                            captions=captions, ncols=self.ncols, min_side=self.min_side)

    @override
    def compute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int) -> Optional[Dict[str, Any]]:
        """Render every target set. Under DDP the target sets are shared out over the ranks and the renders
        gathered; a set renders the same on any rank (its own seeded generator). None when a rank failed or the
        input shape is unknown."""
        if trainer.world_size > 1:
            self._agree_input(trainer)
        world, rank = self.work_split(trainer)
        if self.input_shape is None or self.value_range is None:
            warn_once("noshape", "FeatureVisMonitor: no validation batch was seen, so the input shape and "
                                 "range are unknown; pass `input_shape=` and `value_range=`. Skipping.", owner=self)
            return None
        if self._classes_to_read:  # on every rank: the same model, the same classes
            if not self.guarded(lambda: self._read_classes(pl_module) or True, "reading the model's classes", epoch,
                                "The model must take images of `input_shape` (or pass a `forward` that does)"):
                return None
        owners = self._owners(world)
        mine = [label for label, owner in owners.items() if owner == rank]
        results = self.guarded(lambda: self._render_all(pl_module, mine), "rendering feature visualisations", epoch)
        if world > 1:  # every rank joins the gather, also one that failed, so none waits
            results = self._gather(trainer, results)
        return results


def _is_logits(spec: Any) -> bool:
    """Whether a target spec is ``"logits"``: every class of the output (up to :data:`DEFAULT_CLASSES`)."""
    return isinstance(spec, str) and spec == "logits"


def _cell_name(objective_name: str) -> str:
    """A cell's label from its objective's name: ``class:3`` -> ``class 3``, ``layer:5`` -> ``channel 5``,
    ``layer:5@c`` -> ``neuron 5``, ``layer:all`` -> ``whole layer``; other names as they are."""
    head, _, tail = objective_name.rpartition(":")
    if head == "class":
        return f"class {tail}"
    if head and tail == "all":
        return "whole layer"
    if head and tail.isdigit():
        return f"channel {tail}"
    if head and tail.endswith("@c") and tail[:-2].isdigit():
        return f"neuron {tail[:-2]}"
    if "@" in tail and tail.split("@")[0].isdigit():
        return f"neuron {tail.split('@')[0]}"
    return objective_name


def _check_value_range(value_range: Any, channels: Optional[int]) -> None:
    """Refuse a ``value_range`` that is not ``(lo, hi)`` of numbers or per-channel float tensors with ``lo < hi``."""
    def bound(v: Any) -> bool:
        if isinstance(v, Tensor):
            return v.ndim <= 1 and v.is_floating_point()
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    what = "None or a pair (lo, hi) of floats or per-channel float tensors (C,), with lo < hi"
    if not (isinstance(value_range, (tuple, list)) and len(value_range) == 2 and all(map(bound, value_range))):
        raise MisconfigurationException(expected("value_range", what, value_range))
    lo, hi = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in value_range)
    sizes = {1, channels if channels is not None else max(lo.numel(), hi.numel())}
    if lo.numel() not in sizes or hi.numel() not in sizes or not bool((lo < hi).all()):
        per_channel = "" if channels is None else f", scalars or {channels} per channel (input_shape)"
        raise MisconfigurationException(expected("value_range", what + per_channel, value_range))


def _plain(v: Any) -> Union[float, List[float]]:
    if isinstance(v, Tensor):
        return v.detach().cpu().reshape(-1).tolist() if v.numel() > 1 else float(v)
    return float(v)
