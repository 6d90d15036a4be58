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

from lightning_xai._lightning import MisconfigurationException, MisconfigurationTypeError, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import check_bool, check_choice, check_positive_int, expected
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
        class_names: names for the class indices in the scatter legend and the projector metadata, one per class
            of the model's output (checked on the first sample, before training).
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.ProbeSetCallback`).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback`.

    Tags (with the default ``prefix="xai"``):
        ``xai/projection/<layer>/pca`` (image), ``xai/projection/<layer>/separation`` and
        ``xai/projection/<layer>/pca_variance`` (share of variance on the first two components) as
        scalars, and projector embeddings named ``xai/projection/<layer>``.

    Probe samples whose activations at a layer hold NaN/inf (NaN/inf inputs, an unstable layer) are left out of
    that layer's scatter, separation score and projector embedding, with one warning saying how many and when; the
    scatter's title says how many it leaves out.

    Raises:
        MisconfigurationException: for bad arguments (also a ``TypeError`` for a wrong type, else a ``ValueError``),
            layer names the model does not have (in ``setup``; the message lists the valid names), or
            ``class_names`` not one per class of the model's output (on the first sample, before training).

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
        what = "a non-empty list of layer names or glob patterns"
        if not isinstance(layers, (list, tuple)) or not all(isinstance(n, str) for n in layers):
            raise MisconfigurationTypeError(expected("layers", what, layers))
        if not layers or not all(layers):
            raise MisconfigurationException(expected("layers", what, layers))
        with refuse_bad_options():
            make_reducer(reduce)  # a spec that is not a str, tuple or Reducer: a TypeError
            check_choice("separation", separation, SEPARATION_METHODS)
            for name, value in (("projector", projector), ("scatter", scatter), ("thumbnails", thumbnails)):
                check_bool(name, value)
            check_positive_int("thumbnail_size", thumbnail_size)
        if class_names is not None and (not isinstance(class_names, (list, tuple))
                                        or not all(isinstance(c, str) for c in class_names)):
            raise MisconfigurationTypeError(expected("class_names", "a list of str, one per class", class_names))
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

    @override
    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        """The model's output, and ``class_names`` against its number of classes."""
        super().check_sample(pl_module, x)
        if self.class_names is None:
            return
        classes = self.num_classes(pl_module, x)
        if classes is not None and len(self.class_names) != classes:
            raise MisconfigurationException(  # expected() would quote the list
                f"Expected `class_names` to be a list of {classes} names, one per class of the model's output, but got "
                f"{self.class_names} ({len(self.class_names)} names).")

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
        finite = {name: torch.isfinite(results[f"act/{name}"].cpu()).all(1) for name in self.layers}  # (N,) each
        self._warn_left_out(x, finite, epoch)
        metrics: Dict[str, float] = {}
        projections = {}
        for name in self.layers:
            keep = finite[name]  # rows with NaN/inf activations are left out of every view
            feats = results[f"act/{name}"].cpu()[keep]
            score = float(class_separation(feats, labels[keep], self.separation))
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
                title = f"{name}, epoch {epoch} (colour: {what})"
                left_out = int((~finite[name]).sum())
                if left_out:
                    title += f"\n{left_out} of {len(labels)} samples left out: NaN/inf activations"
                image = scatter_image(res.projected, labels[finite[name]], title=title,
                                      xlabel=f"PC 1 ({ev[0]:.0%})", ylabel=f"PC 2 ({ev[1]:.0%})",
                                      class_names=self.class_names)
                log_image(trainer, self.tag(name, "pca"), image, step=step)
        if self.projector:
            self._write_projector(trainer, x, y, results, finite, step)
        return metrics

    def _warn_left_out(self, x: Tensor, finite: Dict[str, Tensor], epoch: int) -> None:
        """Warn once when some probe samples have NaN/inf activations: how many, at which layers, at which epoch,
        and how many of their inputs hold NaN/inf (NaN/inf inputs or an unstable layer)."""
        bad = {name: int((~keep).sum()) for name, keep in finite.items() if not bool(keep.all())}
        if not bad:
            return
        n = x.shape[0]
        by_count: Dict[int, List[str]] = {}
        for name, count in bad.items():
            by_count.setdefault(count, []).append(repr(name))
        (count, names), *others = by_count.items()  # "3 of the 16 ... at 'a' and 'b', 5 at 'c'"
        where = f"{count} of the {n} probe samples have NaN/inf activations at {' and '.join(names)}" + "".join(
            f", {c} at {' and '.join(more)}" for c, more in others)
        inputs = int((~torch.isfinite(x.reshape(n, -1).cpu())).any(1).sum()) if x.is_floating_point() else 0
        if inputs and max(bad.values()) <= inputs:
            cause = f"{inputs} of the {n} probe inputs hold NaN/inf"
        else:
            cause = (f"only {inputs} of the {n} probe inputs hold NaN/inf" if inputs else "the probe inputs are finite"
                     ) + ": an unstable layer, or has training diverged?"
        warn_once("nonfinite", f"ProjectionMonitor: {where} at epoch {epoch} ({cause}); they are left out of that "
                               "layer's PCA scatter (its title says how many), separation score and projector "
                               "embedding, which show the other samples; a layer without any finite sample logs none "
                               "of them. Warned once.", owner=self)

    def _write_projector(self, trainer: "pl.Trainer", x: Tensor, y: Optional[Tensor], results: Dict[str, Tensor],
                         finite: Dict[str, Tensor], step: int) -> None:
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
            keep = finite[name]  # (N,): rows with NaN/inf activations left out, with their metadata and sprites
            if not bool(keep.any()):
                continue
            rows = keep.nonzero().view(-1).tolist()
            log_embedding(trainer, self.tag(name), results[f"act/{name}"].cpu()[keep], step,
                          metadata=[metadata[i] for i in rows], header=header,
                          thumbnails=None if sprites is None else sprites[keep])

    def _sprites(self, x: Tensor) -> Optional[Tensor]:
        if not self.thumbnails or x.ndim != 4 or not x.is_floating_point():
            return None
        from lightning_xai.render import to_display, upscale

        return upscale(to_display(x.detach().cpu()), self.thumbnail_size)  # (N, 3, H', W')
