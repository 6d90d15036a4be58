"""Every option refused before training: attribution-method options checked by the methods' own validators,
and the options that need the model or the data checked on the first sample a callback sees.

:func:`check_method_options` runs a built-in method's validator (``_integrated_gradients_validate_args``, ...,
through :func:`~lightning_xai.attribution._registry.validate_options`). Without data it runs it on placeholder inputs
(a stride-0 view of one zero, sized so the options' own shapes fit), so only what needs the real input shape waits:
the occlusion window against the input's sides, a baseline tensor's broadcast, LIME segments against the image.
:class:`SampleCheckedCallback` runs those, and whatever a subclass adds in :meth:`~SampleCheckedCallback.check_sample`,
on one sample before training.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_xai._lightning import MisconfigurationException, MisconfigurationTypeError, refuse_bad_options
from lightning_xai._utils import expected, resolve_layer, resolve_layer_patterns, select_output, two_class_logits
from lightning_xai.attribution import _registry as registry
from lightning_xai.attribution import get_method
from lightning_xai.attribution._common import as_baseline
from lightning_xai.attribution._grad_cam import default_layer
from lightning_xai.callbacks._batches import extract_xy
from lightning_xai.callbacks._probe_set import ProbeSetCallback

if TYPE_CHECKING:
    import lightning.pytorch as pl

PLACEHOLDER_SIDE = 32  # sides of the placeholder inputs without data (large enough for the default LIME grid)


def _placeholder_model(x: Tensor) -> Tensor:  # the validators only check that the model is callable
    raise AssertionError("the placeholder model is never called")


def _placeholder(name: str, options: Mapping[str, Any], ndim: int) -> Tensor:
    """Zero inputs of ``ndim`` dims, one sample, as a stride-0 view (no memory), sized so the options' own shapes
    fit: LIME's ``segments`` and ``grid``, the largest occlusion ``window``/``stride``."""
    sides = [PLACEHOLDER_SIDE] * (ndim - 1)
    if name == "lime" and isinstance(options.get("segments"), Tensor) and options["segments"].ndim in (2, 3):
        segments = options["segments"]
        return torch.zeros(()).expand(segments.shape[0] if segments.ndim == 3 else 1, 1, *segments.shape[-2:])
    keys = {"occlusion": ("window", "stride"), "lime": ("grid",)}.get(name, ())
    given = [options.get(key) for key in keys]
    sizes = [v for spec in given for v in (spec if isinstance(spec, (tuple, list)) else [spec])
             if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    if sizes:
        sides = [max(sizes) if name == "occlusion" else max(sizes + sides)] * (ndim - 1)
    return torch.zeros(()).expand(1, *sides)


def _check_baseline_shape(baseline: Any, x: Tensor) -> None:
    """A baseline tensor must broadcast to one sample's shape (any leading size: the probe set's rows)."""
    if isinstance(baseline, Tensor):
        one = torch.zeros(()).expand(*x.shape[1:])
        trailing = baseline.shape[-one.ndim:] if baseline.ndim >= one.ndim else baseline.shape
        as_baseline(torch.zeros(()).expand(*trailing), one.unsqueeze(0))  # raises naming `baseline`


def resolve_method(option: str, spec: Any) -> Tuple[str, Callable[..., Any], Dict[str, Any]]:
    """:func:`~lightning_xai.attribution.get_method`, refusing a bad spec with a message that names ``option`` (the
    callback's argument, e.g. ``discovery_method``) where ``get_method`` names its own ``method``."""
    try:
        return get_method(spec)
    except (TypeError, ValueError, ImportError) as err:
        message = str(err).replace("Expected `method`", f"Expected `{option}`", 1)
        raise (MisconfigurationTypeError if isinstance(err, TypeError) else MisconfigurationException)(message) from err


def check_method_options(name: str, fn: Callable[..., Any], options: Mapping[str, Any], sample: Optional[Tensor] = None,
                         ndim: int = 4) -> None:
    """Refuse options a built-in attribution method would refuse, before it runs, by the method's own validator
    (:func:`~lightning_xai.attribution._registry.validate_options`).

    Args:
        name, fn, options: a resolved method spec (:func:`~lightning_xai.attribution.get_method`); Captum
            adapters and user callables are not checked (their options are their own).
        sample: one input ``(1, ...)`` as the method will see it; None checks what needs no data, on placeholder
            inputs of ``ndim`` dims (``4``: images, ``3``: token embeddings, ``2``: tabular rows).

    Raises:
        MisconfigurationException: with the method's own message, naming the option.
    """
    row = registry.METHODS.get(name)
    if row is None or row.fn is not fn:
        return
    opts = dict(options)
    with refuse_bad_options():
        if sample is None:  # a generator's device is checked against the data's
            opts = {k: v for k, v in opts.items() if not isinstance(v, torch.Generator)}
            x = _placeholder(name, opts, ndim)
        else:
            x = sample
            if isinstance(opts.get("segments"), Tensor) and opts["segments"].ndim == 3:  # one per probe sample
                opts["segments"] = opts["segments"][:1]
        registry.validate_options(name, fn, opts, _placeholder_model, x)
        if sample is not None:
            _check_baseline_shape(opts.get("baseline"), x)


def check_method_layers(pl_module: nn.Module, name: str, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Refuse a Grad-CAM ``layer`` the model does not have (the message lists the valid names), or a model without a
    convolution to default to."""
    if name != "grad_cam" or registry.METHODS[name].fn is not fn:
        return
    layer = options.get("layer")
    with refuse_bad_options():
        if layer is None:
            default_layer(pl_module)
        else:
            resolve_layer(pl_module, layer, "layer")


class SampleCheckedCallback(ProbeSetCallback):
    """A :class:`~lightning_xai.callbacks.ProbeSetCallback` whose options that need the model or the data are
    refused before training.

    The checks run once per ``fit``/``validate``/``test``, on one sample: the user's probe set at the start (when
    it was given as tensors), else the first batch of the first validation (test) loop, which in ``fit`` is
    Lightning's sanity check (with ``num_sanity_val_steps=0``: the first validation epoch, after training's first
    epoch). ``probe=[indices]`` are read there and checked against the validation dataset. The base checks are the
    model's output through ``forward``/``output_key`` and ``target`` against its number of classes (one no-grad
    forward of one sample, in eval mode with every flag restored, global RNGs forked); subclasses add theirs in
    :meth:`check_sample`.
    """

    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        """Refuse options that do not fit the model or a sample ``x (1, ...)`` (on the module's device)."""
        classes = self.num_classes(pl_module, x)
        target = getattr(self, "target", None)
        if classes is not None and isinstance(target, int) and not isinstance(target, bool) and target >= classes:
            raise MisconfigurationException(expected("target", f"a class index below {classes} (the model's number "
                                                     "of classes), 'label' or 'prediction'", target))

    def num_classes(self, pl_module: "pl.LightningModule", x: Tensor) -> Optional[int]:
        """The model's number of classes on ``x``, through ``forward``/``output_key`` (an output they cannot read is
        refused); None when the model itself fails on ``x`` under ``on_error="warn"`` (the runs report that)."""
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
        try:
            with self.explain_context(pl_module), torch.no_grad():
                x = x.clone()  # a normal tensor, also from an inference-mode batch
                x = x.to(dtype) if dtype is not None and x.is_floating_point() else x  # as logits_fn casts
                out = pl_module(x) if self.forward is None else self.forward(pl_module, x)
        except Exception:  # noqa: BLE001 - the model's own failure, not an option's: the policy decides
            if self.on_error == "raise":
                raise
            return None
        with refuse_bad_options():
            logits = two_class_logits(out if self.forward is not None else select_output(out, self.output_key))
        return int(logits.shape[1])

    def _check_once(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        self._sample_checked = True
        self.check_sample(pl_module, x[:1].detach().to(pl_module.device))

    def _check_probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not getattr(self, "_sample_checked", False) and self.probe_x is not None and self.probe_x.shape[0]:
            self._check_once(pl_module, self.probe_x)

    def _check_batch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                     dataloader_idx: int) -> None:
        if getattr(self, "_sample_checked", False) or dataloader_idx != 0:
            return
        if self.probe_x is None and self._probe_indices is not None:
            self._load_indices(trainer)  # refuses indices outside the validation dataset
            self._check_probe(trainer, pl_module)
            return
        try:
            x, _ = extract_xy(batch, self.batch_to_xy)
        except Exception:  # noqa: BLE001 - a batch it cannot read is reported by the collection, under on_error
            return
        if x.ndim >= 1 and x.shape[0]:
            self._check_once(pl_module, x)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._sample_checked = False

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        self._check_probe(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_validation_start(trainer, pl_module)
        self._check_probe(trainer, pl_module)

    @override
    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_test_start(trainer, pl_module)
        self._check_probe(trainer, pl_module)

    @override
    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._check_batch(trainer, pl_module, batch, dataloader_idx)

    @override
    def on_test_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self._check_batch(trainer, pl_module, batch, dataloader_idx)


def check_layer_names(pl_module: nn.Module, name: str, patterns: Sequence[str]) -> List[str]:
    """The layers matching ``patterns`` (option ``name``), in model order; a pattern matching none is refused with
    the valid names listed."""
    with refuse_bad_options():
        return resolve_layer_patterns(pl_module, list(patterns), name=name)
