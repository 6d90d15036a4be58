"""ProjectionMonitor: watch classes separate layer by layer while the model trains.

Every validation epoch, the probe set's activations at the chosen layers go to TensorBoard's
projector (PCA / t-SNE / UMAP views in the "Projector" tab, with labels and image thumbnails), plus a
PCA scatter image per layer coloured by class and a class-separation score per layer::

    trainer = Trainer(callbacks=[ProjectionMonitor(layers=["net.0.*", "net.1.3"])])

The maths lives in :mod:`lightning_xai.projections`; this file only composes and logs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import check_bool, check_positive_int, expected
from lightning_xai.callbacks._checks import SampleCheckedCallback, check_layer_names
from lightning_xai._logging import log_embedding, log_image, tensorboard_writers, warn_once
from lightning_xai.probes import make_reducer
from lightning_xai.projections import SEPARATION_METHODS, capture_activations, class_separation, pca
from lightning_xai.render import scatter_image

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ProjectionMonitor(SampleCheckedCallback):
    """Logs per-layer projections of a fixed probe set: projector embeddings, PCA scatters, separation.

    A probe-set callback (:class:`~lightning_xai.callbacks.ProbeSetCallback`): the probe set is chosen once; each run
    computes the layers' activations (``compute``) then the projections and scalars (``report``).

    Args:
        layers: dotted layer names or glob patterns (``"encoder.layers.*"``) of the LightningModule.
        reduce: how a layer's activations become one row per sample, the probes' reducer specs:
            ``"auto"`` (default: global average pooling of ``(N, C, H, W)`` maps, mean over the tokens of
            ``(N, T, E)`` sequences, 2-D outputs as they are up to 1024 wide, else a seeded random
            projection), ``"flatten"``, ``"gap"``, ``"tokens_mean"``, ``"pool<s>"``, ``("rproj", k)`` or a
            :class:`~lightning_xai.probes.Reducer`.
        separation: class-separation score, ``"silhouette"`` (default, in ``[-1, 1]``) or
            ``"variance_ratio"`` (Calinski-Harabasz), computed on the reduced activations with the
            labels (the predictions when the probe set has no labels).
        projector: write the activations to TensorBoard's projector (``SummaryWriter.add_embedding``).
        scatter: log a PCA scatter image per layer.
        thumbnails: attach the inputs as projector sprites when they are images ``(N, C, H, W)``.
        thumbnail_size: short side, in pixels, of each sprite.
        class_names: names for the class indices in the scatter legend and the projector metadata.
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.ProbeSetCallback`).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback`.

    Tags (with the default ``prefix="xai"``):
        ``xai/projection/<layer>/pca`` (image), ``xai/projection/<layer>/separation`` and
        ``xai/projection/<layer>/pca_variance`` (share of variance on the first two components) as
        scalars, and projector embeddings named ``xai/projection/<layer>``.

    Raises:
        MisconfigurationException: for bad arguments, or (in ``setup``) layer names the model does not
            have; the message lists the valid names.

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = ProjectionMonitor(layers=["net.1.3"], probe_samples=64)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=3)  # doctest: +SKIP
    """

    area = "projection"

    def __init__(
        self,
        layers: Sequence[str],
        reduce: Any = "auto",
        separation: str = "silhouette",
        projector: bool = True,
        scatter: bool = True,
        thumbnails: bool = True,
        thumbnail_size: int = 28,
        class_names: Optional[Sequence[str]] = None,
        probe_samples: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_samples=probe_samples, **kwargs)
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) and n for n in layers):
            raise MisconfigurationException(
                expected("layers", "a non-empty list of layer names or glob patterns", layers))
        with refuse_bad_options():
            make_reducer(reduce)
        if separation not in SEPARATION_METHODS:
            raise MisconfigurationException(
                expected("separation", "one of " + ", ".join(repr(s) for s in SEPARATION_METHODS), separation))
        with refuse_bad_options():
            for name, value in (("projector", projector), ("scatter", scatter), ("thumbnails", thumbnails)):
                check_bool(name, value)
            check_positive_int("thumbnail_size", thumbnail_size)
        if class_names is not None and (not isinstance(class_names, (list, tuple))
                                        or not all(isinstance(c, str) for c in class_names)):
            raise MisconfigurationException(expected("class_names", "a list of str", class_names))
        self.layer_patterns = list(layers)
        self.layers: List[str] = []
        self.reduce = reduce
        self.separation = separation
        self.projector = bool(projector)
        self.scatter = bool(scatter)
        self.thumbnails = bool(thumbnails)
        self.thumbnail_size = thumbnail_size
        self.class_names = None if class_names is None else list(class_names)

    accepts_integer_inputs = True  # any input the model takes: images, token ids, tabular rows

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, layers=self.layer_patterns)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.layers = check_layer_names(pl_module, "layers", self.layer_patterns)

    # ------------------------------------------------------------------ compute / report
    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        logits_fn = self.logits_fn(pl_module, x)
        preds: List[Tensor] = []
        feats = capture_activations(pl_module, x, self.layers, reduce=self.reduce,
                                    forward=lambda inp: preds.append(logits_fn(inp).argmax(1)))
        results = {f"act/{name}": f for name, f in feats.items()}
        results["pred"] = torch.cat(preds)
        return results

    def _name(self, c: int) -> str:
        return self.class_names[c] if self.class_names is not None and 0 <= c < len(self.class_names) else str(c)

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        labels = (y if y is not None else results["pred"]).cpu()
        metrics: Dict[str, float] = {}
        projections = {}
        for name in self.layers:
            feats = results[f"act/{name}"].cpu()
            score = float(class_separation(feats, labels, self.separation))
            if torch.isfinite(torch.tensor(score)):
                metrics[self.tag(name, "separation")] = score
            if feats.shape[0] >= 2:
                projections[name] = pca(feats, n_components=2)
                metrics[self.tag(name, "pca_variance")] = float(projections[name].explained_variance_ratio.sum())
        if not trainer.is_global_zero:
            return metrics
        step = self.step(trainer)
        if self.scatter:
            what = "label" if y is not None else "prediction"
            for name, res in projections.items():
                ev = res.explained_variance_ratio.tolist()
                image = scatter_image(res.projected, labels, title=f"{name}, epoch {epoch} (colour: {what})",
                                      xlabel=f"PC 1 ({ev[0]:.0%})", ylabel=f"PC 2 ({ev[1]:.0%})",
                                      class_names=self.class_names)
                log_image(trainer, self.tag(name, "pca"), image, step=step)
        if self.projector:
            self._write_projector(trainer, x, y, results, step)
        return metrics

    def _write_projector(self, trainer: "pl.Trainer", x: Tensor, y: Optional[Tensor], results: Dict[str, Tensor],
                         step: int) -> None:
        if not tensorboard_writers(trainer):
            warn_once("noprojector", "ProjectionMonitor: no TensorBoardLogger is attached, so the projector "
                                     "embeddings are skipped (the PCA images and scalars are still logged).",
                      owner=self)
            return
        preds = results["pred"].cpu().tolist()
        if y is not None:
            header: Optional[List[str]] = ["label", "prediction"]
            metadata: List[Any] = [[self._name(int(a)), self._name(int(b))] for a, b in zip(y.cpu().tolist(), preds)]
        else:
            header, metadata = None, [self._name(int(p)) for p in preds]
        sprites = self._sprites(x)
        for name in self.layers:
            log_embedding(trainer, self.tag(name), results[f"act/{name}"], step, metadata=metadata, header=header,
                          thumbnails=sprites)

    def _sprites(self, x: Tensor) -> Optional[Tensor]:
        if not self.thumbnails or x.ndim != 4 or not x.is_floating_point():
            return None
        from lightning_xai.render import to_display, upscale

        return upscale(to_display(x.detach().cpu()), self.thumbnail_size)  # (N, 3, H', W')
