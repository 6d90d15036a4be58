"""AttributionMonitor: heatmaps of a fixed probe set, logged every validation epoch.

Add it to a Trainer, open TensorBoard, and watch where the model looks as it trains::

    trainer = Trainer(callbacks=[AttributionMonitor(methods=("saliency", "smoothgrad", "integrated_gradients"))])

Per method and epoch it logs one image (a row per probe sample: input | heatmap | overlay), a text
table with each row's label, prediction, confidence and the class explained, and scalars that
EarlyStopping/ModelCheckpoint can monitor: the share of attribution in the top 5 % of pixels, and for
Integrated Gradients the median relative completeness gap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._lightning import MisconfigurationException
from typing_extensions import override

from lightning_xai._utils import eager_compiled, expected
from lightning_xai.attribution import PinnedOptions, get_method, is_signed, method_passes
from lightning_xai.callbacks.base import ProbeSetCallback
from lightning_xai.logging import log_image, log_text, markdown_table, warn_once
from lightning_xai.render import attribution_grid

if TYPE_CHECKING:
    import lightning.pytorch as pl



def top_share(maps: Tensor, fraction: float = 0.05) -> Tensor:
    """Per sample, the share of total ``|attribution|`` held by the top ``fraction`` of pixels.

    Maps ``(N, C, H, W)`` are reduced over channels with ``sum |a|`` first. A uniform map gives
    ``fraction``; a map with all its mass on a few pixels gives 1.
    """
    flat = torch.nan_to_num(maps.detach().float().abs()).sum(1).flatten(1) if maps.ndim == 4 else \
        torch.nan_to_num(maps.detach().float().abs()).flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    total = flat.sum(1).clamp_min(1e-30)
    return flat.topk(k, dim=1).values.sum(1) / total


class AttributionMonitor(ProbeSetCallback):
    """Logs attribution heatmaps of a fixed probe set to TensorBoard (and other image loggers).

    Args:
        methods: attribution methods: names (``"saliency"``, ``"input_x_gradient"``, ``"smoothgrad"``,
            ``"integrated_gradients"``, ``"occlusion"``, ``"grad_cam"``, ``"lime"``), ``(name, options)``
            pairs such as ``("grad_cam", {"layer": "features.3"})``, or Captum ``Attribution`` objects.
            Randomised methods draw the same noise every epoch (seed 0, or the ``generator`` option, which
            restarts from its state at construction), so maps change only when the model does, and a run
            resumed from a checkpoint logs what an uninterrupted one would.
        target: the class explained per sample: ``"label"`` (default), ``"prediction"``, or a class index.
        denormalize: maps normalised inputs back to display values (e.g. undo ImageNet normalisation).
        outlier_perc: percentile of the largest ``|values|`` clipped in each heatmap.
        top_fraction: fraction of pixels for the concentration figure (default 5 %).
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.base.ProbeSetCallback`).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward: see
            :class:`~lightning_xai.callbacks.base.XAICallback`.

    Tags (with the default ``prefix="xai"``):
        ``xai/attribution/<method>`` (image), ``xai/attribution/probes`` (text),
        ``xai/attribution/<method>/top5_share`` and ``xai/attribution/integrated_gradients/completeness_gap``
        (scalars).

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 16})))
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=1, logger=False)  # doctest: +SKIP
    """

    area = "attribution"

    def __init__(
        self,
        methods: Sequence[Any] = ("saliency", "smoothgrad", "integrated_gradients"),
        target: Union[str, int] = "label",
        denormalize: Optional[Callable[[Tensor], Tensor]] = None,
        outlier_perc: float = 1.0,
        top_fraction: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(methods, (str, tuple)) and (isinstance(methods, str) or (len(methods) == 2 and isinstance(methods[1], dict))):
            methods = [methods]
        methods = list(methods)
        if not methods:
            raise MisconfigurationException(expected("methods", "at least one attribution method", methods))
        self.methods: List[Tuple[str, Callable, Dict[str, Any]]] = []
        for spec in methods:
            try:
                self.methods.append(get_method(spec))
            except (ValueError, TypeError, ImportError) as err:
                raise MisconfigurationException(str(err)) from err
        names = [m[0] for m in self.methods]
        if len(set(names)) != len(names):
            raise MisconfigurationException(expected("methods", "methods with distinct names", names))
        self.check_target(target)
        if denormalize is not None and not callable(denormalize):
            raise MisconfigurationException(expected("denormalize", "a callable inputs -> display values", denormalize))
        if not 0 <= outlier_perc < 50:
            raise MisconfigurationException(expected("outlier_perc", "a float in [0, 50)", outlier_perc))
        if not 0 < top_fraction < 1:
            raise MisconfigurationException(expected("top_fraction", "a float in (0, 1)", top_fraction))
        # a torch.Generator in the options restarts every epoch, so no figure depends on the epochs before it
        self._fresh_options = {name: PinnedOptions(options) for name, _, options in self.methods}
        self.target = target
        self.denormalize = denormalize
        self.outlier_perc = outlier_perc
        self.top_fraction = top_fraction

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, methods=[m[0] for m in self.methods])

    @override
    def estimated_work(self, trainer: Optional["pl.Trainer"] = None) -> Optional[float]:
        """Probe samples x (the prediction's forward + every method's passes); None if a method's is unknown."""
        rows, shape = self.probe_size()
        passes = [method_passes(name, fn, {"return_delta": name == "integrated_gradients", **options}, shape)
                  for name, fn, options in self.methods]
        if any(p is None for p in passes):
            return None
        return rows * (1 / 3 + sum(passes))

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_images(x: Tensor) -> None:
        """Raise a clear error for inputs that are not images ``(N, C, H, W)`` of floats."""
        if x.ndim != 4 or not x.is_floating_point():
            raise MisconfigurationException(
                expected("AttributionMonitor's probe inputs", "float images of shape (N, C, H, W); for token ids use "
                         "TokenAttributionMonitor, for tabular rows TabularAttributionMonitor", x))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.probe_x is not None:
            self.check_images(self.probe_x)

    # ------------------------------------------------------------------ compute / report
    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        self.check_images(x)
        forward = self.logits_fn(pl_module)
        with torch.no_grad(), eager_compiled():  # a compiled model runs as is, not recompiled for eval mode
            probs = forward(x).float().softmax(1)
        conf, preds = probs.max(1)
        target = self.targets_for(self.target, preds, y)
        results: Dict[str, Tensor] = {"pred": preds, "conf": conf, "target": target,
                                      "target_prob": probs.gather(1, target.view(-1, 1)).squeeze(1)}
        for name, fn, _ in self.methods:
            opts = self._fresh_options[name]()
            wants_delta = name == "integrated_gradients" and "return_delta" not in opts
            if wants_delta:
                opts["return_delta"] = True
            out = fn(forward, x, target, **opts)
            attr, delta = (out if wants_delta else (out, None))
            attr = attr.detach()
            results[f"attr/{name}"] = attr
            results[f"top_share/{name}"] = top_share(attr, self.top_fraction)
            if delta is not None:
                total = attr.flatten(1).sum(1)
                results[f"gap/{name}"] = delta.abs() / (total - delta).abs().clamp_min(1e-12)  # |δ| / |f(x) − f(b)|
        return results

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        metrics: Dict[str, float] = {}
        pct = int(round(self.top_fraction * 100))
        if not bool(torch.isfinite(x).all()):
            warn_once("nonfinite-inputs", f"AttributionMonitor: the probe inputs contain NaN/inf at epoch {epoch}; "
                                          "they are drawn as 0 and their maps are not meaningful.", owner=self)
        for name, _, options in self.methods:
            attr = results[f"attr/{name}"]
            finite = torch.isfinite(attr)
            if not bool(finite.all()):
                warn_once(f"nonfinite-{name}", f"AttributionMonitor: method {name!r} gave NaN/inf attributions "
                                               f"at epoch {epoch}; they are drawn as 0 and left out of the scalars.", owner=self)
            metrics[self.tag(name, f"top{pct}_share")] = float(results[f"top_share/{name}"].nanmean())
            if f"gap/{name}" in results:
                metrics[self.tag(name, "completeness_gap")] = float(results[f"gap/{name}"].nanmedian())
        if trainer.is_global_zero:
            x_cpu = x.detach().cpu()
            for name, _, options in self.methods:
                grid = attribution_grid(x_cpu, [results[f"attr/{name}"].cpu()], [is_signed(name, options)],
                                        denormalize=self.denormalize, outlier_perc=self.outlier_perc)
                log_image(trainer, self.tag(name), grid)
            log_text(trainer, self.tag("probes"), self._table(y, results, epoch))
        return metrics

    def _table(self, y: Optional[Tensor], results: Dict[str, Tensor], epoch: int) -> str:
        target_desc = f"class {self.target}" if isinstance(self.target, int) else self.target
        rows = []
        for i in range(results["pred"].shape[0]):
            rows.append([i, "-" if y is None else int(y[i]), int(results["pred"][i]), f"{float(results['conf'][i]):.3f}",
                         int(results["target"][i]), f"{float(results['target_prob'][i]):.3f}"])
        head = f"Epoch {epoch}: rows of the attribution images, top to bottom (explained class: {target_desc}).\n\n"
        return head + markdown_table(["row", "label", "prediction", "confidence", "explained class", "p(explained)"], rows)
