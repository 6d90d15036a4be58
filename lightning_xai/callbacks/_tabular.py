"""TabularAttributionMonitor: which input features a model on tabular rows relies on, every epoch.

Per validation epoch, an attribution method (Integrated Gradients by default) explains a fixed probe
set of rows ``(N, F)``; the mean ``|attribution|`` per feature, overall and per class, is drawn as a
horizontal bar chart and logged as one scalar per feature::

    trainer = Trainer(callbacks=[TabularAttributionMonitor(feature_names=["age", "income", ...])])

The attribution maths is :mod:`lightning_xai.attribution`'s; the chart is drawn by
:func:`lightning_xai.render.barh_image`.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import check_bool, check_positive_int, eager_compiled, expected
from lightning_xai.attribution import METHODS
from lightning_xai.attribution._registry import PinnedOptions
from lightning_xai.callbacks._checks import SampleCheckedCallback, check_method_options, resolve_method
from lightning_xai._logging import log_image, warn_once
from lightning_xai.render import barh_image
from lightning_xai.render._plots import barh_rows

ROW_METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "smoothgrad", "occlusion")  # built-ins for rows

if TYPE_CHECKING:
    import lightning.pytorch as pl


def feature_importance(attributions: Tensor,
                       classes: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], List[int]]:
    r"""Mean absolute attribution per feature, overall and per class.

    :math:`I_f = \frac{1}{N}\sum_i |A_{i,f}|` and :math:`I_{c,f}` the same mean over the rows of class :math:`c`.

    Args:
        attributions: ``(N, F)``.
        classes: ``(N,)`` class per row (labels or predictions), or None.

    Returns:
        ``(overall (F,), per_class (C, F) or None, the class values in order)``. Non-finite values count as 0.

    Example:
        >>> overall, per_class, cls = feature_importance(torch.tensor([[1.0, -2.0], [3.0, 0.0]]), torch.tensor([0, 1]))
        >>> overall.tolist(), per_class.tolist(), cls
        ([2.0, 1.0], [[1.0, 2.0], [3.0, 0.0]], [0, 1])
    """
    mag = torch.nan_to_num(attributions.detach().float().abs(), nan=0.0, posinf=0.0, neginf=0.0)  # (N, F)
    overall = mag.mean(0)
    if classes is None:
        return overall, None, []
    values = sorted(set(int(c) for c in classes.view(-1).tolist()))
    per_class = torch.stack([mag[classes.view(-1) == c].mean(0) for c in values])  # (C, F)
    return overall, per_class, values


class TabularAttributionMonitor(SampleCheckedCallback):
    """Logs per-feature attributions of a fixed probe set of tabular rows as a bar chart and scalars.

    A probe-set callback (:class:`~lightning_xai.callbacks.ProbeSetCallback`): the probe set is chosen once; each run
    computes the per-feature attributions (``compute``) then the bar chart and scalars (``report``).

    Args:
        feature_names: one name per input column ``F``; distinct, also as scalar tags (``/`` becomes ``_``).
        method: an attribution method spec of :func:`lightning_xai.attribution.get_method` that runs on rows:
            a name (``"integrated_gradients"`` default, ``"saliency"``, ``"input_x_gradient"``, ``"smoothgrad"``,
            ``"occlusion"``; not the image methods ``"grad_cam"`` and ``"lime"``), a ``(name, options)`` pair (the
            options are checked by the method's validator at construction), a Captum ``Attribution`` object or
            a callable.
        target: the class explained per row: ``"label"`` (default), ``"prediction"`` or a class index.
        per_class: also draw a bar per class (explained with the same ``target``; classes are the
            labels, or the predictions when the probe set has none); at most ``max_classes`` of them.
        max_classes: above this many classes only the overall bars are drawn (the chart says so and a warning is
            given once).
        max_features: the chart shows the features with the largest overall bars, at most this many
            (every feature still gets its scalar). ``None`` (default): as many as keep the chart about one
            TensorBoard card tall: 30 with the overall bars alone, fewer with per-class bars (13 with 10 classes;
            see docs/tabular.md).
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.ProbeSetCallback`).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback`.

    Tags (with the default ``prefix="xai"``):
        ``xai/tabular/<method>`` (bar-chart image) and ``xai/tabular/<method>/<feature>`` (mean
        ``|attribution|`` of each feature over the probe set; ``/`` in names becomes ``_``).

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = TabularAttributionMonitor(feature_names=["age", "income", "debt"])
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=3)  # doctest: +SKIP
    """

    area = "tabular"

    def __init__(
        self,
        feature_names: Sequence[str],
        method: Any = "integrated_gradients",
        target: Union[str, int] = "label",
        per_class: bool = True,
        max_classes: int = 10,
        max_features: Optional[int] = None,
        probe_samples: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_samples=probe_samples, **kwargs)
        if isinstance(feature_names, str) or not isinstance(feature_names, (list, tuple)) or not feature_names \
                or not all(isinstance(f, str) and f for f in feature_names):
            raise MisconfigurationException(
                expected("feature_names", "a non-empty list of non-empty str", feature_names))
        if len(set(feature_names)) != len(feature_names):
            raise MisconfigurationException(expected("feature_names", "distinct names", list(feature_names)))
        tags: Dict[str, str] = {}
        for name in feature_names:  # one scalar tag per feature: names that give the same tag would lose a value
            tag = self._scalar_name(name)
            other = tags.setdefault(tag, name)
            if other != name:
                raise MisconfigurationException(expected(
                    "feature_names", f"names that give distinct scalar tags ('/' becomes '_'), not two giving {tag!r}",
                    [other, name]))
        self.method_name, self.method_fn, self.method_options = resolve_method("method", method)
        builtin = self.method_name in METHODS and METHODS[self.method_name].fn is self.method_fn
        if builtin and self.method_name not in ROW_METHODS:
            raise MisconfigurationException(expected(
                "method", "a method that runs on (N, F) rows: " + ", ".join(map(repr, ROW_METHODS)) + ", a (name, "
                "options) pair of one, a Captum Attribution object or a callable", self.method_name))
        check_method_options(self.method_name, self.method_fn, self.method_options, ndim=2)
        self.check_target(target)
        with refuse_bad_options():
            check_bool("per_class", per_class)
            check_positive_int("max_classes", max_classes)
            if max_features is not None:
                check_positive_int("max_features", max_features)
        self._fresh_options = PinnedOptions(self.method_options)  # a generator restarts every epoch
        self.feature_names = list(feature_names)
        self.target = target
        self.per_class = bool(per_class)
        self.max_classes = max_classes
        self.max_features = max_features

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, method=self.method_name)

    def check_rows(self, x: Tensor) -> None:
        """Raise a clear error unless ``x`` is float rows ``(N, F)`` with one column per feature name; warn (once)
        when some rows hold NaN/inf (their attributions count as 0 in the bars and scalars)."""
        if x.ndim != 2 or not x.is_floating_point() or x.shape[1] != len(self.feature_names):
            raise MisconfigurationException(
                expected("TabularAttributionMonitor's probe inputs",
                         f"float rows of shape (N, {len(self.feature_names)}), one column per name in "
                         "`feature_names`", x))
        finite = torch.isfinite(x).all(1)
        if not bool(finite.all()):
            warn_once("nonfinite-rows", f"TabularAttributionMonitor: {int((~finite).sum())} of the {x.shape[0]} probe "
                                        "rows hold NaN/inf values; their attributions are not meaningful and count "
                                        "as 0 in the bars and scalars.", owner=self)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.probe_x is not None:
            self.check_rows(self.probe_x)

    @override
    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        """Rows with one column per feature name, ``target`` against the classes, the method options on a row."""
        self.check_rows(x)
        super().check_sample(pl_module, x)
        check_method_options(self.method_name, self.method_fn, self.method_options, sample=x)

    # ------------------------------------------------------------------ compute / report
    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        self.check_rows(x)
        forward = self.logits_fn(pl_module)
        with torch.no_grad(), eager_compiled():  # a compiled model runs as is, not recompiled for eval mode
            preds = forward(x).argmax(1)
        target = self.targets_for(self.target, preds, y)
        attr = self.method_fn(forward, x, target, **self._fresh_options())
        if isinstance(attr, tuple):  # (attributions, delta) when the options ask for the gap
            attr = attr[0]
        return {"attr": attr.detach().float(), "pred": preds}

    def _scalar_name(self, feature: str) -> str:
        return re.sub(r"/+", "_", feature)

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        classes = (y if y is not None else results["pred"]).cpu()
        overall, per_class, values = feature_importance(results["attr"].cpu(), classes if self.per_class else None)
        metrics = {self.tag(self.method_name, self._scalar_name(f)): float(v)
                   for f, v in zip(self.feature_names, overall.tolist())}
        if trainer.is_global_zero:
            log_image(trainer, self.tag(self.method_name), self._chart(overall, per_class, values, y is not None,
                                                                       int(classes.numel()), epoch))
        return metrics

    def _chart(self, overall: Tensor, per_class: Optional[Tensor], values: List[int], labelled: bool,
               rows: int, epoch: int) -> Any:
        """The bar chart: the top features by overall bar, the overall bar in grey and one per class when there
        are at most ``max_classes`` classes; the title says how many features are shown, the subtitle what the
        bars average over."""
        drawn = per_class is not None and len(values) <= self.max_classes
        series = 1 + len(values) if drawn else 1
        limit = self.max_features if self.max_features is not None else barh_rows(series, overall_first=True)
        order = overall.argsort(descending=True)[:limit]
        total, shown = len(self.feature_names), int(order.numel())
        bars = overall[order].unsqueeze(0)  # (1, shown)
        names = ["all"]
        if drawn:
            bars = torch.cat([bars, per_class[:, order]])  # (1 + C, shown)
            names += [f"class {c}" for c in values]
        which = (f"top {shown} of {total} features by mean |attribution|" if shown < total
                 else f"mean |attribution| of all {total} features")
        target = {"label": "each row's label" if labelled else "each row's predicted class (no labels)",
                  "prediction": "each row's predicted class"}.get(self.target, f"class {self.target}")  # type: ignore
        grouped = "label" if labelled else "prediction"
        notes = [f"Explained: {target}.", f"Bars: all {rows} probe rows"]
        if drawn:
            notes[-1] = f"Bars: all {rows} probe rows (grey), the rows of each class by {grouped} (colours)."
        elif per_class is not None:
            notes[-1] += f" only: {len(values)} classes > max_classes={self.max_classes}, so no per-class bars."
            warn_once("too-many-classes", f"TabularAttributionMonitor: the probe rows hold {len(values)} classes, "
                                          f"more than max_classes={self.max_classes}; the bar chart shows only the "
                                          "bars over all rows. Raise `max_classes` to draw one bar per class.",
                      owner=self)
        else:
            notes[-1] += "."
        return barh_image(bars, [self.feature_names[i] for i in order.tolist()],
                          title=f"{self.method_name}, epoch {epoch}: {which}",
                          xlabel="mean |attribution|", series=names, subtitle=" ".join(notes), overall_first=True,
                          card=True)
