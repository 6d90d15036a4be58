"""AttributionMonitor: heatmaps of a fixed probe set, logged every validation epoch.

Add it to a Trainer, open TensorBoard, and watch where the model looks as it trains::

    trainer = Trainer(callbacks=[AttributionMonitor(methods=("saliency", "smoothgrad", "integrated_gradients"))])

Per method and epoch it logs a figure (per probe sample ``input | heatmap | overlay`` under its label,
prediction, confidence and the class explained, on one colour scale with its colour bar), a figure of a
few probe samples' heatmaps over all explained epochs so far, a text table with the same labels, and
scalars that EarlyStopping/ModelCheckpoint can monitor: the share of attribution in the top 5 % of
pixels, and for Integrated Gradients the median relative completeness gap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._lightning import MisconfigurationException, MisconfigurationTypeError, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import Passes, check_choice, check_int, check_real, eager_compiled, expected
from lightning_xai.attribution import is_signed, method_pass_counts
from lightning_xai.attribution._registry import PinnedOptions, output_only
from lightning_xai.callbacks import _shared as shared
from lightning_xai.callbacks._base import RunKey, as_run_key, run_key, run_labels
from lightning_xai.callbacks._checks import (SampleCheckedCallback, check_method_layers, check_method_options,
                                             resolve_method)
from lightning_xai._logging import log_image, log_text, markdown_table, warn_once
from lightning_xai.render import (MAX_COLUMNS, attribution_figure, evolution_figure, pool_to, robust_max, share_maps,
                                  spread)
from lightning_xai.render._maps import one_thread

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


SCALE_MODES = ("fixed", "per_sample")
EVOLUTION_SIDE = 64  # px: evolution maps are kept area-pooled to at most this side (float16) in the state


class AttributionMonitor(SampleCheckedCallback):
    """Logs attribution heatmaps of a fixed probe set to TensorBoard (and other image loggers).

    A probe-set callback (:class:`~lightning_xai.callbacks.ProbeSetCallback`): the probe set is chosen once; each run
    computes the attribution maps (``compute``) then the figures and scalars (``report``).

    Args:
        methods: attribution methods: names (``"saliency"``, ``"input_x_gradient"``, ``"smoothgrad"``,
            ``"integrated_gradients"``, ``"occlusion"``, ``"grad_cam"``, ``"lime"``), ``(name, options)``
            pairs such as ``("grad_cam", {"layer": "features.3"})``, or Captum ``Attribution`` objects.
            Randomised methods draw the same noise every epoch (seed 0, or the ``generator`` option, which
            restarts from its state at construction), so maps change only when the model does, and a run
            resumed from a checkpoint logs what an uninterrupted one would.
        target: the class explained per sample: ``"label"`` (default), ``"prediction"``, or a class index.
        denormalize: maps normalised inputs back to display values (e.g. undo ImageNet normalisation).
        outlier_perc: percentile of the largest ``|values|`` clipped: the fixed scale is the
            ``100 - outlier_perc`` percentile over the probe set, a per-sample scale each map's own.
        scale: ``"fixed"`` (default): every heatmap of a method on one colour scale, set at the first
            explained epoch and kept (in the checkpoint too), so a colour means the same for every sample
            and epoch. Maps are shown as each pixel's share of its map's ``|attribution|`` in multiples
            of an even share (:func:`~lightning_xai.render.share_maps`), a unit that does not grow with
            the gradients as the model trains. ``"per_sample"``: each map on its own scale.
        evolution_samples: probe samples (evenly spaced over the probe set) shown over the epochs in
            ``<method>/evolution``; ``0`` logs no evolution figure.
        top_fraction: fraction of pixels for the concentration figure (default 5 %).
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.ProbeSetCallback`).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback`.

    Tags (with the default ``prefix="xai"``):
        ``xai/attribution/<method>`` and ``xai/attribution/<method>/evolution`` (images: rows are probe
        samples, columns the input and each explained epoch), ``xai/attribution/probes`` (text),
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
        scale: str = "fixed",
        evolution_samples: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        one = isinstance(methods, str) or (isinstance(methods, tuple) and len(methods) == 2
                                           and isinstance(methods[1], dict))
        if one:
            methods = [methods]
        if not isinstance(methods, (list, tuple)):
            raise MisconfigurationTypeError(expected("methods", "a method spec or a list of them (see `get_method`)",
                                                     type(methods).__name__))
        methods = list(methods)
        if not methods:
            raise MisconfigurationException(expected("methods", "at least one attribution method", methods))
        self.methods: List[Tuple[str, Callable, Dict[str, Any]]] = [resolve_method("methods", spec) for spec in methods]
        names = [m[0] for m in self.methods]
        if len(set(names)) != len(names):
            raise MisconfigurationException(expected("methods", "methods with distinct names", names))
        for name, fn, options in self.methods:  # what needs the image size waits for the first sample
            check_method_options(name, fn, options, ndim=4)
        self.check_target(target)
        if denormalize is not None and not callable(denormalize):
            raise MisconfigurationException(expected("denormalize", "a callable inputs -> display values", denormalize))
        with refuse_bad_options():
            check_real("outlier_perc", outlier_perc, 0, 50, high_open=True)
            check_real("top_fraction", top_fraction, 0, 1, low_open=True, high_open=True)
        # a torch.Generator in the options restarts every epoch, so no figure depends on the epochs before it
        self._fresh_options = {name: PinnedOptions(options) for name, _, options in self.methods}
        self.target = target
        self.denormalize = denormalize
        self.outlier_perc = outlier_perc
        self.top_fraction = top_fraction
        with refuse_bad_options():
            check_choice("scale", scale, SCALE_MODES)
            check_int("evolution_samples", evolution_samples, minimum=0)
        self.scale = scale
        self.evolution_samples = evolution_samples
        # figure state, kept in the checkpoint so a resumed run draws what an uninterrupted one would:
        self.scales: Dict[str, Tuple[float, int]] = {}  # method -> (fixed scale, the epoch it was set at)
        # method -> run (epoch, global step) -> maps of the evolution rows (k, h, w)
        self.evolution: Dict[str, Dict[RunKey, Tensor]] = {}
        self.evolution_preds: Dict[RunKey, Tensor] = {}  # run -> (prediction, confidence) of those rows (k, 2)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, methods=[m[0] for m in self.methods])

    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["scales"] = {name: [float(s), int(e)] for name, (s, e) in self.scales.items()}
        state["evolution"] = {name: dict(per) for name, per in self.evolution.items()}
        state["evolution_preds"] = dict(self.evolution_preds)
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.scales = {str(n): (float(s), int(e)) for n, (s, e) in state_dict.get("scales", {}).items()}
        self.evolution = {str(n): {as_run_key(e): t for e, t in per.items()}
                          for n, per in state_dict.get("evolution", {}).items()}
        self.evolution_preds = {as_run_key(e): t for e, t in state_dict.get("evolution_preds", {}).items()}

    @override
    def folds_model(self) -> bool:
        """Every method is a built-in one that needs the model's output alone (not Grad-CAM, a user callable or a
        Captum adapter)."""
        return all(output_only(name, fn) for name, fn, _ in self.methods)

    @override
    def estimated_passes(self, trainer: Optional["pl.Trainer"] = None) -> Optional[Passes]:
        """Probe samples x (the prediction's forward + every method's passes), the folding check's passes (every
        run) and the channels-last check's forwards (once per fit); None if a method's is unknown."""
        rows, shape = self.probe_size()
        passes = [method_pass_counts(name, fn, {"return_delta": name == "integrated_gradients", **options}, shape)
                  for name, fn, options in self.methods]
        if any(p is None for p in passes):
            return None
        return rows * sum(passes, Passes(forward=1)) + self.probe_check_passes(trainer)

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
        for name, fn, options in self.methods:
            check_method_layers(pl_module, name, fn, options)

    @override
    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        """Images, ``target`` against the classes, and the method options that need the image size."""
        self.check_images(x)
        super().check_sample(pl_module, x)
        for name, fn, options in self.methods:
            check_method_options(name, fn, options, sample=x)

    # ------------------------------------------------------------------ compute / report
    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        self.check_images(x)
        forward = self.logits_fn(pl_module, x)
        with eager_compiled():  # a compiled model runs as is, not recompiled for eval mode
            probs = shared.logits(self, pl_module, forward, x).float().softmax(1)
        conf, preds = probs.max(1)
        target = self.targets_for(self.target, preds, y)
        results: Dict[str, Tensor] = {"pred": preds, "conf": conf, "target": target,
                                      "target_prob": probs.gather(1, target.view(-1, 1)).squeeze(1)}
        for name, fn, _ in self.methods:
            opts = self._fresh_options[name]()
            wants_delta = name == "integrated_gradients" and "return_delta" not in opts
            if wants_delta:
                opts["return_delta"] = True
            out = shared.attribute(self, pl_module, (name, fn, opts), forward, x, target)
            attr, delta = (out if wants_delta else (out, None))
            attr = attr.detach()
            results[f"attr/{name}"] = attr
            with one_thread():  # small element-wise work: see lightning_xai.render._maps.one_thread
                results[f"top_share/{name}"] = top_share(attr, self.top_fraction)
            if delta is not None:
                total = attr.flatten(1).sum(1)
                results[f"gap/{name}"] = delta.abs() / (total - delta).abs().clamp_min(1e-12)  # |δ| / |f(x) − f(b)|
        return results

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        """Scalars, figures and the probe table, drawn with one torch thread (no model pass here; see
        :func:`lightning_xai.render._maps.one_thread`)."""
        with one_thread():
            return self._report(trainer, x, y, results, epoch)

    def _report(self, trainer: "pl.Trainer", x: Tensor, y: Optional[Tensor], results: Dict[str, Tensor],
                epoch: int) -> Dict[str, float]:
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
                                               f"at epoch {epoch}; they are drawn as 0 and left out of the scalars.",
                          owner=self)
            metrics[self.tag(name, f"top{pct}_share")] = float(results[f"top_share/{name}"].nanmean())
            if f"gap/{name}" in results:
                metrics[self.tag(name, "completeness_gap")] = float(results[f"gap/{name}"].nanmedian())
        self._figures(trainer, x, y, results, epoch)
        if trainer.is_global_zero:
            log_text(trainer, self.tag("probes"), self._table(y, results, epoch))
        return metrics

    # ------------------------------------------------------------------ figures
    def _evolution_rows(self, n: int) -> Tensor:
        """The probe rows shown over the epochs: ``evolution_samples`` evenly spaced (the probe set is grouped by
        class, so they come from different classes)."""
        k = min(self.evolution_samples, n)
        return torch.linspace(0, n - 1, k).round().long().unique() if k else torch.zeros(0, dtype=torch.long)

    def _figures(self, trainer: "pl.Trainer", x: Tensor, y: Optional[Tensor], results: Dict[str, Tensor],
                 epoch: int) -> None:
        """Per method: the probe figure and the evolution figure. The scale and the evolution maps are state, updated
        on every rank alike (the results are whole on every rank); drawing and logging happen on rank zero."""
        x_cpu = x.detach().cpu()
        pred, conf, target = (results[k].detach().cpu() for k in ("pred", "conf", "target"))
        rows = self._evolution_rows(x.shape[0])
        key = run_key(trainer, epoch)
        if rows.numel():
            self.evolution_preds[key] = torch.stack([pred[rows].float(), conf[rows].float()], 1)
        labels = ["–"] * x.shape[0] if y is None else [str(int(v)) for v in y.cpu().tolist()]
        captions = [[f"label {label} · pred {p}", f"conf {c:.2f} · expl. {t}"]  # Python numbers: no per-item tensor op
                    for label, p, c, t in zip(labels, pred.tolist(), conf.tolist(), target.tolist())]
        target_desc = f"class {self.target}" if isinstance(self.target, int) else f"the {self.target}"
        for name, fn, options in self.methods:
            signed = is_signed(fn, options)
            values = share_maps(results[f"attr/{name}"].cpu(), signed, size=tuple(x.shape[-2:]))  # (N, H, W)
            scale, note = None, ""
            if self.scale == "fixed":
                if name not in self.scales:
                    self.scales[name] = (robust_max(values, self.outlier_perc), epoch)
                scale, since = self.scales[name]
                note = f"; scale fixed at epoch {since}"
            if rows.numel():
                self.evolution.setdefault(name, {})[key] = pool_to(values[rows], EVOLUTION_SIDE).half()
            if not trainer.is_global_zero:
                continue
            fig = attribution_figure(x_cpu, values, signed, title=f"{name} · epoch {epoch}",
                                     subtitle=f"class explained: {target_desc}", captions=captions, scale=scale,
                                     outlier_perc=self.outlier_perc, denormalize=self.denormalize, scale_note=note)
            log_image(trainer, self.tag(name), fig)
            if rows.numel():
                log_image(trainer, self.tag(name, "evolution"),
                          self._evolution_figure(name, x_cpu[rows], rows, y, signed, scale, note))

    def _evolution_figure(self, name: str, inputs: Tensor, rows: Tensor, y: Optional[Tensor], signed: bool,
                          scale: Optional[float], note: str) -> Any:
        epochs = sorted(self.evolution[name])
        labels = dict(zip(epochs, run_labels(epochs)))
        shown = spread(epochs, MAX_COLUMNS)
        columns = [(labels[e], self.evolution[name][e].float()) for e in shown]
        preds = [self.evolution_preds.get(e) for e in shown]
        preds = [None if p is None else p.tolist() for p in preds]  # (k, 2) each
        cell_captions = [[[]] + [[] if p is None or i >= len(p) else [f"{int(p[i][0])}", f"{p[i][1]:.2f}"]
                                 for p in preds] for i in range(rows.numel())]
        row_labels = [[f"#{r}", "label " + ("–" if y is None else str(int(y[r])))] for r in rows.tolist()]
        what = "runs" if any("@" in label for label in labels.values()) else "epochs"  # as LinearProbeMonitor's
        more = f" ({len(shown)} of {len(epochs)} explained {what}, evenly spread)" if len(shown) < len(epochs) \
            else ""
        subtitle = ("each cell: the heatmap over the input at that epoch; below it the predicted class and its "
                    "probability")
        if what == "runs":
            subtitle += "; columns: epoch@step where an epoch was explained more than once"
        return evolution_figure(inputs, columns, signed, title=f"{name} over the epochs{more}",
                                subtitle=subtitle, scale=scale, outlier_perc=self.outlier_perc,
                                row_labels=row_labels, cell_captions=cell_captions, denormalize=self.denormalize,
                                scale_note=note)

    def _table(self, y: Optional[Tensor], results: Dict[str, Tensor], epoch: int) -> str:
        target_desc = f"class {self.target}" if isinstance(self.target, int) else self.target
        pred, conf, target, prob = (results[k].tolist() for k in ("pred", "conf", "target", "target_prob"))
        labels = ["-"] * len(pred) if y is None else [int(v) for v in y.tolist()]
        rows = [[i, labels[i], pred[i], f"{conf[i]:.3f}", target[i], f"{prob[i]:.3f}"] for i in range(len(pred))]
        head = f"Epoch {epoch}: rows of the attribution images, top to bottom (explained class: {target_desc}).\n\n"
        columns = ["row", "label", "prediction", "confidence", "explained class", "p(explained)"]
        return head + markdown_table(columns, rows)
