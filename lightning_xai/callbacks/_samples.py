"""SampleInfluenceMonitor: which training samples support each prediction, which look mislabelled,
which validation samples the training data barely covers.

After TrustAI's sample-level analysis tools. Every ``every_n_epochs`` validation epochs (and at fit end)
it reads the first ``max_train_samples`` training samples by dataset index, captures their penultimate
features with a forward hook, and logs:

* ``neighbours``: each probe sample next to its ``k`` most similar training samples (cosine of features),
* ``representers``: each probe next to the training samples that push its predicted logit up the most and
  down the most (representer points, Yeh et al. 2018),
* ``suspects``: the training samples with the largest ``|alpha_{i, y_i}|``, likely label errors,
* ``sparse``: the probe samples with the lowest support (mean cosine of their nearest training features).

Images get a coloured frame per training cell: green when its label is the probe's predicted class, red
otherwise (a legend says so); each cell is captioned with its label and value, and the same figures are in
a markdown table logged beside each image.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import check_choice, check_positive_int, check_real, expected, forked_rng
from lightning_xai.callbacks import _shared as shared
from lightning_xai.callbacks._checks import SampleCheckedCallback
from lightning_xai.callbacks._batches import class_labels, extract_xy
from lightning_xai._logging import log_image, log_text, markdown_table, warn_once
from lightning_xai.render import Figure, fit_cells, grid_figure, to_display
from lightning_xai.samples import (RepresenterFit, capture_features, cosine_topk, dataset_features, representer_points,
                                   support, suspect_scores)
from lightning_xai.samples._features import first_samples, read_samples, resolve_feature_layer
from lightning_xai.samples._representer import SUSPECT_MODES

_GREEN = (0.1, 0.7, 0.2)
_RED = (0.85, 0.1, 0.1)
_GREY = (0.6, 0.6, 0.6)

if TYPE_CHECKING:
    import lightning.pytorch as pl


_LEGEND = ((_GREEN, "labelled as the probe's prediction", "frame"), (_RED, "labelled otherwise", "frame"))


SHOWN_GAP = 5e-4  # representer values are shown to 3 decimals: a decomposition gap this large can change one


def _train_dataset(trainer: "pl.Trainer") -> Optional[Any]:
    """The dataset behind the trainer's (first) train dataloader, also under ``validate``/``test`` if defined."""
    loaders = getattr(trainer, "train_dataloader", None)
    if loaders is None:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        try:
            loaders = source.dataloader() if source is not None and source.is_defined() else None
        except Exception:  # noqa: BLE001 - a module without train data under validate()/test()
            loaders = None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return getattr(loaders, "dataset", None)


class SampleInfluenceMonitor(SampleCheckedCallback):
    """Logs sample-level explanations: supporting neighbours, representer points, suspect labels and sparse samples.

    A probe-set callback (:class:`~lightning_xai.callbacks.ProbeSetCallback`): the probe set is chosen once; each run
    computes features of the probe set and the training subset (``compute``) then the neighbour figures (``report``).

    Args:
        layer: dotted name of the feature layer (relative to the LightningModule, e.g. ``"net.1.3"``); default:
            the last ``nn.Linear``, whose *input* is taken. An unknown name lists the valid ones.
        capture: ``"input"`` or ``"output"`` of ``layer`` (default: input for the automatic layer, output for a
            named one).
        k: training neighbours shown per probe sample.
        support_k: neighbours averaged into a probe's support (sparse samples have low support).
        num_representers: excitatory and inhibitory training samples shown per probe (each).
        num_suspects: training samples shown in the suspect grid and table.
        num_sparse: lowest-support probe samples shown.
        lam: L2 strength of the representer refit.
        suspect_mode: ``"label"`` ranks by ``|alpha_{i, y_i}|`` of a refit on the given labels (the paper's
            label-error setting); ``"norm"`` by ``||alpha_i||`` (used automatically when there are no labels).
        max_train_samples: training samples used: the first ``n`` of the train dataset by index (deterministic;
            the train DataLoader is never iterated).
        train_data: a ``Dataset`` or an ``(inputs, labels)`` pair to use instead of the trainer's train dataset
            (needed under ``trainer.validate()``/``test()`` when the module defines no ``train_dataloader``).
        batch_size: samples per forward pass over the training data.
        denormalize: maps normalised inputs back to display values.
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.ProbeSetCallback`).
        every_n_epochs: cadence (default 5: each run is a pass over up to ``max_train_samples`` samples).
        run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback`.

    Tags (with the default ``prefix="xai"``):
        images ``xai/samples/neighbours``, ``xai/samples/representers``, ``xai/samples/suspects``,
        ``xai/samples/sparse``; text tables under the same tags plus ``/table``; scalars
        ``xai/samples/mean_support``, ``xai/samples/min_support``, ``xai/samples/neighbour_agreement``
        (share of neighbours labelled with the probe's prediction), ``xai/samples/refit_agreement`` (the
        refit layer's predictions on the training samples agree with the model's) and
        ``xai/samples/decomposition_gap`` (max ``|Theta f_t - sum_i alpha_i f_i^T f_t|`` over the probes).

    Attributes:
        suspects: dataset indices of the training samples ranked most suspicious at the last run (LongTensor).
        suspect_values: their scores.

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = SampleInfluenceMonitor(k=8, max_train_samples=2000, every_n_epochs=5)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=10)  # doctest: +SKIP
    """

    area = "samples"

    def __init__(
        self,
        layer: Optional[str] = None,
        capture: Optional[str] = None,
        k: int = 8,
        support_k: int = 10,
        num_representers: int = 4,
        num_suspects: int = 32,
        num_sparse: int = 8,
        lam: float = 1e-3,
        suspect_mode: str = "label",
        max_train_samples: Optional[int] = 2000,
        train_data: Union[None, Dataset, Tuple[Tensor, Tensor]] = None,
        batch_size: int = 256,
        denormalize: Optional[Callable[[Tensor], Tensor]] = None,
        probe_samples: int = 16,
        every_n_epochs: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_samples=probe_samples, every_n_epochs=every_n_epochs, **kwargs)
        with refuse_bad_options():
            for name, value in (("k", k), ("support_k", support_k), ("num_representers", num_representers),
                                ("num_suspects", num_suspects), ("num_sparse", num_sparse), ("batch_size", batch_size)):
                check_positive_int(name, value)
            check_positive_int("max_train_samples", max_train_samples, allow_none=True)
            check_choice("suspect_mode", suspect_mode, SUSPECT_MODES)
            if capture is not None:
                check_choice("capture", capture, ("input", "output"))
            check_real("lam", lam, low=0, low_open=True)
        if layer is not None and not isinstance(layer, str):
            raise MisconfigurationException(expected("layer", "a dotted layer name (str) or None",
                                                     type(layer).__name__))
        if denormalize is not None and not callable(denormalize):
            raise MisconfigurationException(expected("denormalize", "a callable inputs -> display values", denormalize))
        if isinstance(train_data, (tuple, list)):
            if not (len(train_data) == 2 and all(isinstance(t, Tensor) for t in train_data)
                    and train_data[0].shape[0] == train_data[1].shape[0]):
                raise MisconfigurationException(expected(
                    "train_data", "a Dataset or a pair (inputs, labels) of tensors with the same number of rows",
                    type(train_data).__name__))
            train_data = TensorDataset(*train_data)
        elif train_data is not None and not hasattr(train_data, "__getitem__"):
            raise MisconfigurationException(expected("train_data", "a Dataset or a pair (inputs, labels)",
                                                     type(train_data).__name__))
        self.layer = layer
        self.capture = capture
        self.k = k
        self.support_k = support_k
        self.num_representers = num_representers
        self.num_suspects = num_suspects
        self.num_sparse = num_sparse
        self.lam = float(lam)
        self.suspect_mode = suspect_mode
        self.max_train_samples = max_train_samples
        self.train_data = train_data
        self.batch_size = batch_size
        self.denormalize = denormalize
        self.suspects: Optional[Tensor] = None
        self.suspect_values: Optional[Tensor] = None
        self._layer: Optional[Tuple[str, str]] = None
        self._dataset: Optional[Any] = None
        self._bank: Dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["suspects"] = self.suspects
        state["suspect_values"] = self.suspect_values
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.suspects = state_dict.get("suspects")
        self.suspect_values = state_dict.get("suspect_values")

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        with refuse_bad_options():
            self._layer = resolve_feature_layer(pl_module, self.layer, self.capture)

    # ------------------------------------------------------------------ the run
    @override
    def explain(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", via_module: bool = True) -> None:
        dataset = self.train_data if self.train_data is not None else _train_dataset(trainer)
        if dataset is None or len(dataset) == 0:
            warn_once("notrain", "SampleInfluenceMonitor found no training data to compare with (under "
                                 "validate()/test() pass `train_data=`); nothing is logged.", owner=self)
            return
        if self.k > len(dataset) or self.support_k > len(dataset):
            warn_once("small", f"SampleInfluenceMonitor: `k`/`support_k` exceed the {len(dataset)} "
                               "training samples; they are reduced to fit.", owner=self)
        self._dataset = dataset
        try:
            super().explain(trainer, pl_module, via_module)
        finally:
            self._dataset = None
            self._bank = {}

    def _to_xy(self, batch: Any) -> Tuple[Tensor, Optional[Tensor]]:
        return extract_xy(batch, self.batch_to_xy)

    def _train_bank(self, pl_module: "pl.LightningModule", forward: Callable[[Tensor], Tensor]) -> Dict[str, Any]:
        """Features, labels, model predictions (``forward``: the logits function) and the two representer refits of
        the training subset."""
        layer, capture = self._layer or resolve_feature_layer(pl_module, self.layer, self.capture)
        indices = first_samples(self._dataset, self.max_train_samples)
        feats, logits, labels = dataset_features(pl_module, layer, self._dataset, indices, self._to_xy,
                                                 forward=forward, capture=capture,
                                                 batch_size=self.batch_size, device=pl_module.device)
        if labels is not None and labels.shape != (feats.shape[0],):  # not one class per sample: warned, ignored
            labels = class_labels(labels, feats.shape[0], self)
        finite = torch.isfinite(feats).all(1) & torch.isfinite(logits.float()).all(1)
        if labels is not None and labels.is_floating_point():
            finite &= torch.isfinite(labels)  # a NaN label is no class to rank the sample by
        if not bool(finite.all()):  # NaN/inf inputs or labels (or a diverged model): no neighbour, representer or rank
            bad = [indices[i] for i in (~finite).nonzero().view(-1).tolist()]
            if len(bad) == len(indices):
                raise ValueError(f"every one of the {len(bad)} training samples compared with gave NaN/inf features, "
                                 "outputs or labels (NaN/inf data, or a diverged model)")
            warn_once("nonfinite-train", f"SampleInfluenceMonitor: {len(bad)} of {len(indices)} training samples gave "
                      f"NaN/inf features, outputs or labels (dataset indices {bad[:10]}"
                      f"{' ...' if len(bad) > 10 else ''}: NaN/inf data?); they are left out of the neighbours, "
                      "representers and rankings.", owner=self)
            keep = finite.nonzero().view(-1)
            indices = [indices[i] for i in keep.tolist()]
            feats, logits = feats[keep], logits[keep]
            labels = None if labels is None else labels[keep]
        labels = class_labels(labels, feats.shape[0], self)
        labels = None if labels is None else labels.long()
        probs = logits.float().softmax(1)
        # the paper's refit: the model's probabilities as targets, so the decomposition explains the model
        fit = representer_points(feats, probs, lam=self.lam)
        if labels is not None and self.suspect_mode == "label":
            # label errors: refit on the given labels; a label the smooth refit cannot reproduce gets a large |alpha|
            fit_labels = representer_points(feats, labels, lam=self.lam, num_classes=probs.shape[1])
            scores = suspect_scores(fit_labels.alpha, labels.clamp(0, probs.shape[1] - 1), mode="label")
            refit_pred = fit_labels.logits(feats).argmax(1)
        else:
            scores = suspect_scores(fit.alpha, mode="norm")
            refit_pred = fit.logits(feats).argmax(1)
        order = scores.argsort(descending=True)[: self.num_suspects]
        return {"indices": torch.tensor(indices, dtype=torch.long), "features": feats, "labels": labels,
                "pred": logits.argmax(1), "fit": fit, "suspects": order, "suspect_scores": scores[order],
                "suspect_refit_pred": refit_pred[order],
                "refit_agreement": float((fit.logits(feats).argmax(1) == logits.argmax(1)).double().mean())}

    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        layer, capture = self._layer or resolve_feature_layer(pl_module, self.layer, self.capture)
        with torch.no_grad():
            forward = self.logits_fn(pl_module, x)
            feats, logits = capture_features(pl_module, layer, x, forward=forward, capture=capture,
                                             batch_size=self.batch_size)
            shared.warn_not_finite(self, pl_module, logits, "outputs (logits)")  # before the bank, which needs some
            bank = self._train_bank(pl_module, forward)
            self._bank = bank
            probs = logits.float().softmax(1)
            conf, pred = probs.max(1)
            n_train = bank["features"].shape[0]
            nn_sim, nn_idx = cosine_topk(feats, bank["features"], min(self.k, n_train))
            sup = support(feats, bank["features"], min(self.support_k, n_train))
            fit: RepresenterFit = bank["fit"]
            values = fit.values(feats, target=pred)  # (M, N): alpha_{i, pred} f_i^T f_t
            refit_logit = fit.logits(feats).gather(1, pred.view(-1, 1)).squeeze(1)
            gap = (refit_logit - values.sum(1)).abs()
            r = min(self.num_representers, n_train)
            pos_val, pos_idx = values.topk(r, dim=1)
            neg_val, neg_idx = (-values).topk(r, dim=1)
        return {"pred": pred, "conf": conf, "nn_idx": nn_idx, "nn_sim": nn_sim, "support": sup,
                "pos_idx": pos_idx, "pos_val": pos_val.float(), "neg_idx": neg_idx, "neg_val": (-neg_val).float(),
                "refit_logit": refit_logit.float(), "gap": gap.double()}

    # ------------------------------------------------------------------ report
    def _train_images(self, rows: Tensor) -> Tensor:
        """Training inputs for bank rows (the bank's ``indices`` give their dataset indices), read under a forked
        RNG."""
        flat = self._bank["indices"][rows.reshape(-1).cpu()].tolist()  # bank rows -> dataset indices
        with forked_rng():
            x, _ = read_samples(self._dataset, flat, self._to_xy, batch_size=self.batch_size)
        return x.reshape(tuple(rows.shape) + tuple(x.shape[1:]))

    def _cells(self, images: Tensor) -> Tensor:
        """Display cells ``(N, 3, H', W')`` at the figures' cell size."""
        return fit_cells(to_display(images.cpu(), self.denormalize))

    def _label_of(self, rows: Tensor) -> List[Optional[int]]:
        labels = self._bank.get("labels")
        return [None if labels is None else int(labels[i]) for i in rows.reshape(-1).tolist()]

    def _feature_name(self) -> str:
        """``"<capture> of <layer>"``, the features the neighbours are found in (once resolved at setup)."""
        return "model's" if self._layer is None else f"{self._layer[1]} of {self._layer[0]!r}"

    def _colour(self, label: Optional[int], pred: int) -> Tuple[float, float, float]:
        return _GREY if label is None else (_GREEN if label == pred else _RED)

    def _rows_figure(self, probe_x: Tensor, probe_captions: Sequence[Sequence[str]], pred: Tensor,
                     groups: Sequence[Tuple[str, Tensor, Tensor, str]], title: str, subtitle: str) -> Figure:
        """A row per probe: the probe, then the training samples of each group ``(header, dataset rows (N, r),
        values (N, r), format)``, each framed by label agreement and captioned with its label and value."""
        rows, captions, frames = [], [], []
        for i in range(probe_x.shape[0]):
            cells, caps, colours = [self._cells(probe_x[i:i + 1])], [list(probe_captions[i])], [_GREY]
            for _, idx, values, fmt in groups:
                cells.append(self._cells(self._train_images(idx[i])))
                labels = self._label_of(idx[i])
                caps += [[f"y {'–' if lab is None else lab}", fmt.format(float(v))]
                         for lab, v in zip(labels, values[i])]
                colours += [self._colour(lab, int(pred[i])) for lab in labels]
            rows.append(torch.cat(cells))
            captions.append(caps)
            frames.append(colours)
        headers, spans, start = ["probe"], [], 1
        for name, idx, _, _ in groups:
            headers += [str(j + 1) for j in range(idx.shape[1])]
            spans.append((start, start + idx.shape[1], name))
            start += idx.shape[1]
        return grid_figure(torch.stack(rows), title=title, subtitle=subtitle, headers=headers, groups=spans,
                           cell_captions=captions, frames=frames, dividers=[s for s, _, _ in spans],
                           legend=((_GREY, "probe sample", "frame"),) + _LEGEND)

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        bank = self._bank
        pred, sup = results["pred"].cpu(), results["support"].cpu()
        nn_idx, pos_idx, neg_idx = results["nn_idx"].cpu(), results["pos_idx"].cpu(), results["neg_idx"].cpu()
        nn_labels = torch.tensor([[-1 if v is None else v for v in self._label_of(row)] for row in nn_idx])
        self.suspects = bank["indices"][bank["suspects"].cpu()].clone()
        self.suspect_values = bank["suspect_scores"].detach().float().cpu().clone()
        finite = torch.isfinite(sup) & torch.isfinite(results["gap"].cpu())
        if not bool(finite.all()):
            warn_once("nonfinite-probe", f"SampleInfluenceMonitor: {int((~finite).sum())} probe samples gave NaN/inf "
                      f"features or outputs at epoch {epoch} (NaN/inf inputs?); they are left out of the scalars.",
                      owner=self)
        metrics = {
            self.tag("mean_support"): float(sup[finite].mean()) if bool(finite.any()) else float("nan"),
            self.tag("min_support"): float(sup[finite].min()) if bool(finite.any()) else float("nan"),
            self.tag("refit_agreement"): bank["refit_agreement"],
            self.tag("decomposition_gap"): float(results["gap"].cpu()[finite].max()) if bool(finite.any())
            else float("nan"),
        }
        gap = metrics[self.tag("decomposition_gap")]
        if gap >= SHOWN_GAP:
            warn_once("gap", f"SampleInfluenceMonitor: the representer values of a probe sample add up to its refit "
                      f"logit only within {gap:.2g} at epoch {epoch} (the refit did not converge: more than "
                      "4096 weights use L-BFGS); the values shown are approximate. A narrower `layer`, fewer "
                      "`max_train_samples` or a larger `lam` make it exact.", owner=self)
        if bank["labels"] is not None:
            metrics[self.tag("neighbour_agreement")] = float((nn_labels == pred.view(-1, 1))[finite].double().mean())
        if not trainer.is_global_zero:
            return metrics
        step = self.step(trainer)
        ylab = [None] * x.shape[0] if y is None else y.cpu().tolist()
        images = x.ndim == 4 and x.is_floating_point()
        x_cpu = x.detach().cpu()

        # neighbours
        cos = cosine_format(results["nn_sim"].cpu())
        rows = [[i, ylab[i], int(pred[i]), f"{float(results['conf'][i]):.2f}", f"{float(sup[i]):.3f}",
                 ", ".join(f"#{int(bank['indices'][j])}:{lab} ({cos.format(float(s))})" for j, lab, s in
                           zip(nn_idx[i], self._label_of(nn_idx[i]), results["nn_sim"][i].cpu()))]
                for i in range(x.shape[0])]
        log_text(trainer, self.tag("neighbours", "table"), markdown_table(
            ["probe", "label", "pred", "conf", "support", "nearest training samples #index:label (cosine)"], rows),
            step)
        probe_caps = [[f"label {'–' if ylab[i] is None else ylab[i]}", f"pred {int(pred[i])}"]
                      for i in range(x.shape[0])]
        if images:
            log_image(trainer, self.tag("neighbours"), self._rows_figure(
                x_cpu, probe_caps, pred, [("most similar training samples", nn_idx, results["nn_sim"].cpu(), cos)],
                f"nearest training samples · epoch {epoch}",
                f"by cosine similarity of the features ({self._feature_name()}; value under each)"), step)

        # representers
        rows = [[i, ylab[i], int(pred[i]), f"{float(results['refit_logit'][i]):.3f}",
                 ", ".join(f"#{int(bank['indices'][j])}:{lab} ({float(v):+.3f})" for j, lab, v in
                           zip(pos_idx[i], self._label_of(pos_idx[i]), results["pos_val"][i].cpu())),
                 ", ".join(f"#{int(bank['indices'][j])}:{lab} ({float(v):+.3f})" for j, lab, v in
                           zip(neg_idx[i], self._label_of(neg_idx[i]), results["neg_val"][i].cpu()))]
                for i in range(x.shape[0])]
        log_text(trainer, self.tag("representers", "table"), markdown_table(
            ["probe", "label", "pred", "refit logit", "excitatory #index:label (value)",
             "inhibitory #index:label (value)"], rows), step)
        if images:
            log_image(trainer, self.tag("representers"), self._rows_figure(
                x_cpu, probe_caps, pred, [("push the predicted logit up", pos_idx, results["pos_val"].cpu(), "{:+.3g}"),
                                          ("push it down", neg_idx, results["neg_val"].cpu(), "{:+.3g}")],
                f"representer points · epoch {epoch}",
                "training samples whose representer value (under each) adds most to, and takes most from, the "
                "probe's predicted logit (Yeh et al. 2018)"), step)

        # suspects
        sus = bank["suspects"].cpu()
        rows = [[rank, int(bank["indices"][j]), lab, int(bank["pred"][j]), int(bank["suspect_refit_pred"][r]),
                 f"{float(bank['suspect_scores'][r]):.4g}"]
                for r, (rank, j, lab) in enumerate(zip(range(1, len(sus) + 1), sus.tolist(), self._label_of(sus)))]
        log_text(trainer, self.tag("suspects", "table"), markdown_table(
            ["rank", "index", "given label", "model pred", "refit pred", "abs(alpha)"], rows), step)
        if images:
            given = self._label_of(sus)
            captions = [[f"#{int(bank['indices'][j])}", f"given {'–' if lab is None else lab}",
                         f"model {int(bank['pred'][j])}"] for j, lab in zip(sus.tolist(), given)]
            cells = self._cells(self._train_images(sus)).unsqueeze(1)  # (S, 1, 3, h, w)
            fig = grid_figure(cells, title=f"suspected label errors · epoch {epoch}",
                              subtitle="training samples ranked by |α| of their given label in the representer refit, "
                                       "most suspicious first; caption: dataset index, given label, model's prediction",
                              cell_captions=[[c] for c in captions], ncols=min(len(sus), 8),
                              frames=[[self._colour(lab, int(bank["pred"][j]))] for j, lab in zip(sus.tolist(), given)],
                              legend=((_GREEN, "model agrees with the label", "frame"),
                                      (_RED, "model predicts another class", "frame")))
            log_image(trainer, self.tag("suspects"), fig, step)

        # sparse
        low = sup.argsort()[: self.num_sparse]
        rows = [[int(i), ylab[int(i)], int(pred[i]), f"{float(sup[i]):.3f}"] for i in low]
        log_text(trainer, self.tag("sparse", "table"), markdown_table(["probe", "label", "pred", "support"], rows),
                 step)
        if images:
            caps = [probe_caps[int(i)] + [f"support {float(sup[i]):.2f}"] for i in low]
            log_image(trainer, self.tag("sparse"), self._rows_figure(
                x_cpu[low], caps, pred[low], [("nearest training samples", nn_idx[low], results["nn_sim"].cpu()[low],
                                               cos)],
                f"least covered probe samples · epoch {epoch}",
                "lowest support (mean cosine to the nearest training features) first"), step)
        return metrics


def cosine_format(sims: Tensor) -> str:
    """The format of the cosines ``(N, k)`` shown under each probe's neighbours: two decimals, or three or four where
    two would show a row's different values as equal (post-ReLU features of few dimensions put every neighbour at
    0.99-something).

    Example:
        >>> cosine_format(torch.tensor([[0.9, 0.8]])), cosine_format(torch.tensor([[0.9991, 0.9962]]))
        ('{:.2f}', '{:.3f}')
    """
    for decimals in (2, 3):
        if all(len({round(v, decimals) for v in row}) == len(set(row)) for row in sims.double().tolist()):
            return f"{{:.{decimals}f}}"
    return "{:.4f}"
