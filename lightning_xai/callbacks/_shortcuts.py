"""ShortcutMonitor (named regions) and ShortcutDiscovery (no region named): probe-set callbacks over the test of
:mod:`lightning_xai.shortcuts`.

Both keep ``config.reference_samples`` training samples (stratified by class, from the training batches of the first
epoch they see) whose content is pasted into the probe samples; without them (``validate()``/``test()`` without a
fit, unlabelled or non-image batches) the probe samples give the content. The edits are planned once per probe set and
reference set (the plan depends on the inputs only), every forward pass runs in ``compute`` (each rank its share of
the probe samples) and ``report`` only decides and logs.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from typing_extensions import override

from lightning_utilities.core.rank_zero import rank_zero_warn
from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from lightning_xai._utils import Passes, check_choice, expected
from lightning_xai.attribution import method_pass_counts
from lightning_xai.attribution._registry import output_only
from lightning_xai.callbacks import _shared as shared
from lightning_xai.callbacks._batches import (BATCH_FIX, Buckets, choose_stratified, class_labels, collect_rows,
                                              extract_xy)
from lightning_xai.callbacks._checks import (SampleCheckedCallback, check_method_layers, check_method_options,
                                             resolve_method)
from lightning_xai.callbacks._ranks import split_rows
from lightning_xai._logging import log_image
from lightning_xai.render import RED, evidence_figure, maps_figure, share_maps
from lightning_xai.shortcuts import InterventionPlan, ShortcutConfig, Verdict, decide, plan_interventions, run_plan
from lightning_xai.shortcuts._api import (DISCOVERY_PRESETS, SELECTED, _proposals, candidate_verdict,
                                          discovery_level, evidence_rank)
from lightning_xai.shortcuts import region_metrics
from lightning_xai.shortcuts._regions import normalize_regions, region_masks
from lightning_xai.shortcuts._hotspots import class_mean_maps

if TYPE_CHECKING:
    import lightning.pytorch as pl

ACTIONS = ("warn", "stop", "log")
EVIDENCE_ROWS = 4  # probe samples shown in an evidence figure: those the region's content pulled most
SHOWN_CANDIDATES = 3  # discovery logs the evidence of its strongest candidates every run
ATTRIBUTION_STATS = {"share_ratio": "attribution share inside the region over its area share (1: no more than "
                                    "anywhere else); never raises an alarm"}


def _canonical(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """The samples sorted by label, then content: the same set gives the same plan whatever order the training batches
    (one process, or several ranks' shares) brought it in."""
    keys = [(int(label), tuple(row)) for label, row in zip(y.tolist(), x.flatten(1).tolist())]
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
    return x[order].contiguous(), y[order].contiguous()


class _ShortcutCallback(SampleCheckedCallback):
    """What both shortcut callbacks share: options, reference samples, plans, actions and evidence figures."""

    area = "shortcut"

    def __init__(self, method: Any, action: str, config: Optional[ShortcutConfig], probe_samples: int,
                 **kwargs: Any) -> None:
        super().__init__(probe_samples=probe_samples, **kwargs)
        with refuse_bad_options():
            check_choice("action", action, ACTIONS)
            if config is not None and not isinstance(config, ShortcutConfig):
                raise TypeError(expected("config", "a lightning_xai.shortcuts.ShortcutConfig or None",
                                         type(config).__name__))
            self.method = resolve_method("method", method)
        check_method_options(*self.method, ndim=4)
        self.action = action
        self.config = config if config is not None else ShortcutConfig()
        self.alarms: List[Dict[str, Any]] = []  # every alarm acted on so far: region, epoch, figures, reason
        self._streaks: Dict[str, int] = {}
        self.reference_x: Optional[Tensor] = None
        self.reference_y: Optional[Tensor] = None
        self._buckets: Buckets = {}
        self._collect_epoch: Optional[int] = None
        self._no_references = False
        self._plans: Dict[str, Tuple[Any, ...]] = {}  # region -> (probe inputs, references, plan)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(alarms=[dict(a) for a in self.alarms], streaks=dict(self._streaks), reference_x=self.reference_x,
                     reference_y=self.reference_y, no_references=self._no_references)
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.alarms = [dict(a) for a in state_dict.get("alarms", [])]
        self._streaks = {str(k): int(v) for k, v in state_dict.get("streaks", {}).items()}
        if state_dict.get("reference_x") is not None:
            self.reference_x, self.reference_y = state_dict["reference_x"], state_dict["reference_y"]
        self._no_references = bool(state_dict.get("no_references", False))

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_images(x: Tensor) -> None:
        if x.ndim != 4 or not x.is_floating_point():
            raise MisconfigurationException(expected("the shortcut callbacks' probe inputs",
                                                     "float images of shape (N, C, H, W)", x))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.probe_x is not None:
            self.check_images(self.probe_x)
        check_method_layers(pl_module, *self.method)

    @override
    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        self.check_images(x)
        super().check_sample(pl_module, x)
        check_method_options(*self.method, sample=x)

    def edits_per_sample(self) -> int:
        """Forward passes per probe sample and region: donor draws x (region + controls) x (edit + placebo)."""
        return self.config.donor_draws * (1 + self.config.num_controls) * 2

    def regions_tested(self) -> int:
        """Regions (or candidates) tested per run."""
        raise NotImplementedError

    @override
    def folds_model(self) -> bool:
        """The attribution method is a built-in one that needs the model's output alone (the edits' passes do)."""
        return output_only(self.method[0], self.method[1])

    @override
    def estimated_passes(self, trainer: Optional["pl.Trainer"] = None) -> Optional[Passes]:
        """Probe samples x (a prediction's forward, the attribution's passes and the edits' forwards of every
        region), the folding check's passes (every run) and the channels-last check's forwards (once per fit)."""
        rows, shape = self.probe_size()
        passes = method_pass_counts(*self.method, shape)
        if passes is None:
            return None
        return (rows * (Passes(forward=1 + self.regions_tested() * self.edits_per_sample()) + passes)
                + self.probe_check_passes(trainer))

    # ------------------------------------------------------------------ reference samples (training batches)
    @property
    def _wants_references(self) -> bool:
        return self.config.reference_samples > 0 and self.reference_x is None and not self._no_references

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._wants_references or not self.active(trainer):
            return
        if self._collect_epoch is None:
            self._collect_epoch = trainer.current_epoch
        if trainer.current_epoch != self._collect_epoch:
            return
        with self.guard("collecting reference samples from a training batch", trainer.current_epoch, BATCH_FIX,
                        skips_run=False):
            try:
                x, y = extract_xy(batch, self.batch_to_xy)
            except Exception:  # noqa: BLE001 - a batch format it cannot read: the probe samples give the content
                self._no_references, self._buckets = True, {}
                return
            y = class_labels(y, x.shape[0], self) if x.ndim >= 1 else None
            if y is None or x.ndim != 4 or not x.is_floating_point():
                self._no_references, self._buckets = True, {}
                return
            collect_rows(self._buckets, x, y, self.config.reference_samples)

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Fix the reference samples (once, identical on every rank) from what the training batches gave."""
        super().on_validation_epoch_start(trainer, pl_module)
        if not self._wants_references or self._collect_epoch is None or trainer.sanity_checking:
            return
        chosen = self.guarded(lambda: choose_stratified(trainer, self._buckets, self.config.reference_samples),
                              "choosing the reference samples", trainer.current_epoch)
        self._buckets = {}
        if chosen is not None and chosen[0] is not None and chosen[1] is not None:
            self.reference_x, self.reference_y = _canonical(chosen[0], chosen[1].long())
        else:
            self._no_references = True

    # ------------------------------------------------------------------ the run
    def _rows(self, pl_module: "pl.LightningModule", x: Tensor) -> Tuple[int, int]:
        """This rank's rows ``[start, stop)`` of the probe set (``x`` is that share, see ``work_split``)."""
        n = self.probe_x.shape[0]
        if x.shape[0] == n:
            return 0, n
        start, stop, _ = split_rows(n, *self.work_split(pl_module.trainer))
        if stop - start != x.shape[0]:
            raise RuntimeError(f"the probe share has {x.shape[0]} rows, expected {stop - start}")
        return start, stop

    def _donors(self, x: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """The samples giving the pasted content: the reference samples when kept and of the probe images' shape."""
        ref = self.reference_x
        if ref is not None and ref.shape[1:] == x.shape[1:]:
            return ref.to(x.device, x.dtype), self.reference_y.cpu()
        return x, labels.cpu()

    def _plan(self, name: str, x: Tensor, labels: Tensor, masks: Tensor, donors: Tensor, donor_labels: Tensor,
              donor_masks: Tensor) -> InterventionPlan:
        """The plan of ``name``, kept while the probe set and the donors are the same tensors and masks."""
        kept = self._plans.get(name)
        if (kept is not None and kept[0] is self.probe_x and kept[1] is self.reference_x and torch.equal(kept[2], masks)
                and torch.equal(kept[3], donor_masks) and torch.equal(kept[4], labels)):
            return kept[5]
        plan = plan_interventions(x.cpu(), labels, donors.cpu(), donor_labels, masks.cpu(), donor_masks.cpu(),
                                  self.config, selected=self._selected(name))
        self._plans[name] = (self.probe_x, self.reference_x, masks.cpu(), donor_masks.cpu(), labels.clone(), plan)
        return plan

    def _selected(self, name: str) -> bool:
        """Whether region ``name``'s per-sample masks were chosen for unusual content (discovery's candidates)."""
        return False

    def _run_plan(self, pl_module: "pl.LightningModule", name: str, x: Tensor, labels: Tensor, masks: Tensor,
                  donors: Tensor, donor_labels: Tensor, donor_masks: Tensor, rows: Tuple[int, int],
                  results: Dict[str, Tensor]) -> None:
        plan = self._plan(name, x, labels, masks, donors, donor_labels, donor_masks)
        out = run_plan(self.logits_fn(pl_module, x), x, donors, plan, rows=rows, batch_size=self.config.batch_size)
        results[f"{name}/logp"], results[f"{name}/pred"] = out["logp"], out["pred"]

    def _verdict(self, name: str, results: Dict[str, Tensor], config: ShortcutConfig) -> Verdict:
        plan = self._plans[name][5]
        return decide({"logp": results[f"{name}/logp"], "pred": results[f"{name}/pred"]}, plan.targets(), config)

    def _act(self, trainer: "pl.Trainer", fired: Dict[str, Verdict], epoch: int) -> None:
        """Count streaks (a run without a region's alarm breaks its streak) and act on those reaching ``patience``."""
        self._streaks = {name: self._streaks.get(name, 0) + 1 for name in fired}
        for name, verdict in fired.items():
            if self._streaks[name] < self.config.patience:
                continue
            self.alarms.append({"region": name, "epoch": int(epoch), "reason": verdict.reason, **verdict.stats})
            if self.action in ("warn", "stop"):
                rank_zero_warn(f"{type(self).__name__}: region {name!r} looks like a shortcut at epoch {epoch}: "
                               f"{verdict.reason}." + (" Stopping training." if self.action == "stop" else ""),
                               category=RuntimeWarning)
            if self.action == "stop":
                trainer.should_stop = True

    def _log_evidence(self, trainer: "pl.Trainer", name: str, x: Tensor, results: Dict[str, Tensor],
                      verdict: Verdict, epoch: int, what: str) -> None:
        """The probe samples the region's content pulled most: the region (red) and control places (cyan), the sample
        with the donor's content pasted in, the prediction before and after; then the two tests' figures."""
        plan = self._plans[name][5]
        donors = self._plans[name][1] if self._plans[name][1] is not None else self.probe_x
        logp = results[f"{name}/logp"].double()
        pull = (logp[:, 0, 0, 0] - logp[:, 0, 0, 1]).nan_to_num(-math.inf)  # first draw, region
        order = sorted(range(pull.shape[0]), key=lambda i: (-float(pull[i]), i))[:EVIDENCE_ROWS]
        order = [i for i in order if math.isfinite(float(pull[i]))]
        if not order:
            return
        real = ~plan.placebo & (plan.draw == 0)
        index, controls, same_place = [], [], []
        for i in order:
            mine = real & (plan.recipient == i)
            index.append(int(torch.nonzero(mine & (plan.place == 0))[0]))
            others = mine & (plan.place > 0)
            moved = others & (plan.donor == plan.donor[index[-1]])  # rolled places; the rest: other donors' content
            same_place.append(int((others & ~moved).sum()))
            ctl = torch.nonzero(moved).view(-1)
            controls.append(plan.masks(ctl) if ctl.numel() else torch.zeros(0, *x.shape[-2:], dtype=torch.bool))
        index_t = torch.tensor(index)
        k = max(c.shape[0] for c in controls)
        ctl_masks = torch.zeros(len(order), max(k, 1), *x.shape[-2:], dtype=torch.bool)
        for r, c in enumerate(controls):
            ctl_masks[r, :c.shape[0]] = c
        edited = plan.edited(x.cpu(), donors.cpu(), index_t)
        before = results["pred"].cpu()
        targets = plan.target[index_t]
        after = results[f"{name}/pred"][order, 0, 0, 0]
        captions = [[f"pred {int(before[i])} → {int(a)} (donor's label {int(t)})",
                     f"pull {float(pull[i]):+.2f} nats"] + ([f"{k} control(s): same-class content here"] if k else [])
                    for i, a, t, k in zip(order, after, targets, same_place)]
        s = verdict.stats
        grey = (0.45, 0.55, 0.7)
        bars = [("specific pull (nats)", [("region", s["pull"], RED),
                                          ("control places (mean)", s["control_pull"], grey)])]
        notes = [verdict.reason, f"tests at level {self.config.alpha:g} (pooled, Student's t: z >= "
                 f"{self.config.z(len(x)):.2f}) and effect >= {self.config.min_pull:.3f} nats; samples shown: the "
                 f"{len(order)} the region's content pulled most"]
        notes = [n[:1].upper() + n[1:] + ("" if n.endswith(".") else ".") for n in notes if n]  # one sentence each
        fig = evidence_figure(x.cpu()[order], plan.masks(index_t), ctl_masks, edited,
                              title=f"{what} · {name} · epoch {epoch} · {'ALARM' if verdict.alarm else 'no alarm'}",
                              subtitle="another class' content pasted into the region (and, for comparison, at control "
                                       "places or, for a per-sample region, other same-class content pasted there); "
                                       "a shortcut pulls the prediction toward that class from the region only",
                              captions=captions, bars=[b for b in bars if not math.isnan(b[1][1][1])] or bars[:0],
                              notes=notes)
        log_image(trainer, self.tag(name, "evidence"), fig)


class ShortcutMonitor(_ShortcutCallback):
    """Does the model use what is in a region you name (where it should not look)? A probe-set callback.

    Every explained epoch, for every region, the test of :mod:`lightning_xai.shortcuts` (see docs/shortcuts.md):
    other classes' content is pasted into the region of each probe sample, paired with a placebo paste; the alarm
    fires when the pasted content pulls predictions toward its own label (test 1) more than the same edit at the
    typical other place of the region's shape does (test 2), both at level ``config.alpha`` with an effect of at least
    ``config.min_pull`` nats. Every region gets a verdict and its ``reason``; attribution inside the region is logged
    beside it (``share_ratio``) and never raises an alarm.

    Args:
        regions: a region spec or a dict ``name -> spec``. A spec is a mask ``(H, W)`` or ``(N, H, W)`` (one per probe
            sample), a box ``(top, left, height, width)``, a preset (``"border"``, ``"corners"``, ``"top_left"``, ...,
            ``"center"``) or a callable ``inputs -> masks`` (applied to the kept training samples too, so a mark at a
            different place in every image is pasted where the donor has it).
        method: attribution method of the ``share_ratio`` figure (see :func:`lightning_xai.attribution.get_method`).
        action: on an alarm, ``"warn"`` (default), ``"stop"`` (sets ``trainer.should_stop``, like EarlyStopping) or
            ``"log"`` (the ``alarm`` scalar only).
        config: :class:`~lightning_xai.shortcuts.ShortcutConfig` (draws, controls, level, effect, patience, reference
            samples, seed).
        probe_samples: probe samples (stratified by class).
        **kwargs: the options every callback shares (``every_n_epochs``, ``probe``, ``on_error``, ``prefix``, ...).

    Tags (``prefix="xai"``): ``xai/shortcut/<region>/{alarm, pull, pull_z, control_pull, excess, excess_z, flip,
    controls, share_ratio}`` (meanings: :data:`lightning_xai.shortcuts._test.STATS`) and the image
    ``xai/shortcut/<region>/evidence`` every run.

    Example::

        >>> monitor = ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, action="stop")
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=5)  # doctest: +SKIP
    """

    def __init__(self, regions: Any, method: Any = "saliency", action: str = "warn",
                 config: Optional[ShortcutConfig] = None, probe_samples: int = 128, **kwargs: Any) -> None:
        with refuse_bad_options():
            self.regions = normalize_regions(regions)
            if not self.regions:
                raise ValueError(expected("regions", "a region spec or a dict name -> spec (to look for regions "
                                          "without naming one, use ShortcutDiscovery)", regions))
        super().__init__(method, action, config, probe_samples, **kwargs)
        given = self.probe_x.shape[0] if self.probe_x is not None else None
        for name, spec in self.regions.items():
            if isinstance(spec, Tensor) and spec.ndim == 3 and spec.shape[0] != given:
                raise MisconfigurationException(expected(
                    f"region {name!r}", "one mask (H, W) for every sample, or one per probe sample (N, H, W) with "
                    + ("`probe=` given as N samples" if given is None else f"N = {given}, the `probe` samples"), spec))

    def regions_tested(self) -> int:
        return len(self.regions)

    @override
    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        super().check_sample(pl_module, x)
        for name, spec in self.regions.items():
            try:
                with refuse_bad_options():
                    region_masks(spec[:1] if isinstance(spec, Tensor) and spec.ndim == 3 else spec, x, name)
            except MisconfigurationException:
                raise
            except Exception as err:  # noqa: BLE001 - a region callable that fails on a probe image
                raise MisconfigurationException(expected(f"region {name!r}", "a callable inputs -> masks that runs on "
                                                         "the probe images", f"{type(err).__name__}: {err}")) from err

    def _region_masks(self, name: str, x: Tensor, donors: Tensor) -> Tuple[Tensor, Tensor, bool]:
        """Masks of the probe samples and of the donors; a per-sample mask tensor has none for other samples, so the
        probe samples give the content then (third value: whether they do)."""
        spec = self.regions[name]
        masks = region_masks(spec, x, name).cpu()
        if isinstance(spec, Tensor) and spec.ndim == 3:
            return masks, masks, True
        return masks, region_masks(spec, donors, name).cpu(), donors is x

    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        self.check_images(x)
        rows = self._rows(pl_module, x)
        forward = self.logits_fn(pl_module, x)
        pred = shared.logits(self, pl_module, forward, x).argmax(1)
        maps = shared.attribute(self, pl_module, self.method, forward, x, y if y is not None else pred).detach()
        results: Dict[str, Tensor] = {"pred": pred}
        whole = self.probe_x.to(x.device, x.dtype)
        labels = self.probe_y if self.probe_y is not None else None
        if labels is None:  # no labels: the model's predictions of the whole probe set (every rank the same)
            with torch.no_grad():
                labels = torch.cat([forward(whole[i:i + self.config.batch_size]).argmax(1).cpu()
                                    for i in range(0, whole.shape[0], self.config.batch_size)])
        labels = labels.cpu()
        for name in self.regions:
            donors, donor_labels = self._donors(whole, labels)
            masks, donor_masks, own = self._region_masks(name, whole, donors)
            results[f"{name}/share_ratio"] = region_metrics(maps, masks[rows[0]:rows[1]].to(maps.device))["share_ratio"]
            if own:
                donors, donor_labels = whole, labels
            self._run_plan(pl_module, name, whole, labels, masks, donors, donor_labels, donor_masks, rows, results)
        return results

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        metrics: Dict[str, float] = {}
        fired: Dict[str, Verdict] = {}
        for name in self.regions:
            verdict = self._verdict(name, results, self.config)
            for key, value in verdict.stats.items():
                metrics[self.tag(name, key)] = value
            metrics[self.tag(name, "share_ratio")] = float(results[f"{name}/share_ratio"].float().nanmean())
            if verdict.alarm:
                fired[name] = verdict
            if trainer.is_global_zero:
                self._log_evidence(trainer, name, x, results, verdict, epoch, "shortcut check")
        self._act(trainer, fired, epoch)
        return metrics


class ShortcutDiscovery(_ShortcutCallback):
    """Which regions might hold a shortcut, when you cannot name one? A probe-set callback.

    Every explained epoch it proposes candidate regions from the inputs (the presets ``"corners"`` and ``"border"``,
    where tags and frames sit; each sample's flat background; each sample's atypical corner; a pattern pasted
    identically into several images) and two from the model (an input-independent hotspot of ``method``'s maps, and
    each sample's attribution peak, where a mark that moves from image to image would be; both shown, never alarmed on),
    tests each as :class:`ShortcutMonitor` tests a named region at level ``alpha / (number of candidates)``, logs the
    evidence of the ``3`` strongest for a person to judge and raises an alarm only when a candidate passes both tests:
    content the model reads more than typical places of its shape, which object content spread over the image
    does not give.

    Args:
        method: attribution method of the hotspot and attribution-peak candidates and the class maps (default
            Input x Gradient).
        action: ``"warn"`` (default), ``"stop"`` or ``"log"``.
        config, probe_samples, **kwargs: as for :class:`ShortcutMonitor`.

    Tags (``prefix="xai"``): ``xai/shortcut/discovery/{alarm, candidates}``, per candidate
    ``xai/shortcut/<candidate>/{found, alarm, pull, pull_z, control_pull, excess, excess_z, flip, controls, rank}``
    (candidates: ``corners, border, flat_background, atypical_corner, stamp, hotspot, attribution_peak``), the images
    ``xai/shortcut/<candidate>/evidence`` of the strongest three and ``xai/shortcut/class_maps``.
    """

    CANDIDATES = DISCOVERY_PRESETS + ("flat_background", "atypical_corner", "stamp", "hotspot", "attribution_peak")

    def __init__(self, method: Any = "input_x_gradient", action: str = "warn",
                 config: Optional[ShortcutConfig] = None, probe_samples: int = 128, **kwargs: Any) -> None:
        super().__init__(method, action, config, probe_samples, **kwargs)
        self._found: Dict[str, Tensor] = {}

    def regions_tested(self) -> int:
        return len(self.CANDIDATES)  # at most; a candidate that is not found this run costs nothing

    @override
    def estimated_passes(self, trainer: Optional["pl.Trainer"] = None) -> Optional[Passes]:
        """The probe set's passes (see the base class) and the donors' attribution maps."""
        passes = super().estimated_passes(trainer)
        donors = method_pass_counts(*self.method, self.probe_size()[1])
        if passes is None or donors is None:
            return passes
        return passes + self.config.reference_samples * donors

    def _selected(self, name: str) -> bool:
        return name in SELECTED

    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        """The whole probe set's maps on every rank (candidates are proposed from the whole set), then this rank's
        share of every candidate's edits."""
        self.check_images(x)
        rows = self._rows(pl_module, x)
        forward = self.logits_fn(pl_module, x)
        whole = self.probe_x.to(x.device, x.dtype)
        pred_all = shared.logits(self, pl_module, forward, whole).argmax(1)
        labels = (self.probe_y if self.probe_y is not None else pred_all).cpu()
        maps = shared.attribute(self, pl_module, self.method, forward, whole, labels.to(whole.device)).detach()
        donors, donor_labels = self._donors(whole, labels)
        donor_maps = maps if donors is whole else shared.attribute(
            self, pl_module, self.method, forward, donors, donor_labels.to(donors.device)).detach()
        proposals = _proposals(whole.cpu(), labels, donors.cpu(), maps, donor_maps)
        self._found = {name: masks for name, (masks, _) in proposals.items()}
        results: Dict[str, Tensor] = {"pred": pred_all[rows[0]:rows[1]],
                                      "maps": maps.float().abs().sum(1)[rows[0]:rows[1]]}
        for name, (masks, donor_masks) in proposals.items():
            self._run_plan(pl_module, name, whole, labels, masks, donors, donor_labels, donor_masks, rows, results)
        return results

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        found = [name for name in self.CANDIDATES if name in self._found]
        level = discovery_level(self.config, len(found))
        tested = {name: self._verdict(name, results, level) for name in found}
        verdicts = {name: candidate_verdict(name, verdict) for name, verdict in tested.items()}
        ranked = sorted(found, key=lambda n: (*evidence_rank(n, tested[n]), n))
        metrics: Dict[str, float] = {self.tag("discovery", "candidates"): float(len(found))}
        for name in self.CANDIDATES:
            metrics[self.tag(name, "found")] = float(name in verdicts)
        for rank, name in enumerate(ranked, 1):
            metrics.update({self.tag(name, k): v for k, v in verdicts[name].stats.items()})
            metrics[self.tag(name, "rank")] = float(rank)
        fired = {name: verdicts[name] for name in ranked if verdicts[name].alarm}
        metrics[self.tag("discovery", "alarm")] = float(bool(fired))
        if trainer.is_global_zero:
            # the top of the ranking, and every candidate that alarms (shown-only ones that would have alarmed may
            # rank beside them)
            shown = ranked[:SHOWN_CANDIDATES] + [n for n in ranked[SHOWN_CANDIDATES:] if verdicts[n].alarm]
            for name in shown:
                self._log_evidence(trainer, name, x, results, verdicts[name], epoch, f"shortcut discovery (rank "
                                   f"{ranked.index(name) + 1})")
            self._log_class_maps(trainer, results["maps"], y if y is not None else results["pred"], epoch)
        self._act(trainer, fired, epoch)
        return metrics

    def _log_class_maps(self, trainer: "pl.Trainer", maps: Tensor, labels: Tensor, epoch: int) -> None:
        means = class_mean_maps(maps.cpu(), labels.cpu())
        classes = sorted(means)
        stack = share_maps(torch.stack([means[c] for c in classes]), signed=False)
        log_image(trainer, self.tag("class_maps"), maps_figure(
            stack, title=f"where each class' attribution sits · epoch {epoch}",
            subtitle=f"mean {self.method[0]} map of each class' probe samples, one colour scale: a place every class "
                     "attends to is a candidate",
            captions=[[f"class {c}"] for c in classes], label="× an even share of the map's |attribution|"))
