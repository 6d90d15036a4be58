"""ShortcutMonitor: catch a spurious feature mid-training, with an alarm that rests on interventions.

Every explained validation epoch, on a fixed probe set (default 256 samples, stratified by class):

* **known regions** (``regions=``): attribution share, share over area, relevance rank and pointing game
  of ``method`` (default saliency) inside each region; then the intervention: the region is filled
  (default: swapped with the most different probe sample's region) and so are ``num_controls`` control
  regions elsewhere that the fill changes about as much; the output shift, flip rate and accuracy drop of
  both are logged and :func:`~lightning_xai.shortcuts.alarm.shortcut_alarm` decides on the output shift.
  With ``reference_samples`` (default 256) training samples kept from the first training epoch, the swapped-in
  content comes from them instead, and the alarm also weighs the *gain*: how much each edit raises the
  training label of the sample whose content was pasted in (a learned shortcut raises it, a passing sensitivity
  to the region does not); its log-probability can fire the alarm, its probability can veto a shift alarm.
  Attribution figures never raise or veto an alarm.
* **unknown regions** (``regions=None``, or ``find_regions=True``): per-class mean maps of
  ``discovery_method`` (default Input x Gradient) are logged as an image; SpRAy counts each class'
  strategies; an input-independent hotspot, if any, becomes the candidate region ``"hotspot"``, and a
  flat background (pixels of one exact value covering a quarter of the image or more, per sample) the
  candidate ``"flat_background"``, and the presets ``"corners"`` and ``"border"`` (where source tags and
  frames usually sit) the candidates ``"preset_corners"`` and ``"preset_border"``; two per-sample
  candidates chosen from the inputs alone (:mod:`lightning_xai.shortcuts.corners`): ``"atypical_corner"``,
  each sample's corner window whose content departs most from the probe set's there (a mark in a different
  corner per image), and ``"stamp"``, the corner window of a non-uniform pattern pasted identically into
  several probe images (a source tag on a tenth of them); each goes through the same intervention check.
* **self-check** (``sanity_check=True``): at the first explained epoch, the parameter-randomisation
  check of each method; a method whose maps barely change is named in a warning.

Under DDP each rank runs the model on its share of the probe set only, for the named regions and for the
unknown-region candidates alike; the edits (swap partners, controls, every random draw) are planned on the whole
probe set with a generator seeded alike on every rank, so the figures are those of one process.

On an alarm, ``action="warn"`` warns on rank zero (region, epoch, figures), ``"stop"`` also sets
``trainer.should_stop`` on every rank (like EarlyStopping), ``"log"`` only logs. The ``alarm`` scalar
of each region is logged every time, through ``pl_module.log``, so EarlyStopping can monitor it. With
``patience=p`` the action waits until a region has fired in ``p`` runs in a row (the scalar still logs each run).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_utilities.core.rank_zero import rank_zero_warn
from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import check_bool, check_choice, check_int, check_positive_int, check_real, expected
from lightning_xai.attribution import method_passes
from lightning_xai.callbacks import shared
from lightning_xai.callbacks._checks import (SampleCheckedCallback, check_layer_names, check_method_layers,
                                            check_method_options, resolve_method)
from lightning_xai.callbacks._batches import BATCH_FIX, Buckets, choose_stratified, class_labels, collect_rows, extract_xy
from lightning_xai.callbacks._ranks import gather_shares, split_rows
from lightning_xai.logging import log_image
from lightning_xai.render import CYAN, RED, evidence_figure, maps_figure, share_maps
from lightning_xai.shortcuts import (FILLS, MIN_EXCESS, MIN_MATCH, MIN_Z, PLACEMENTS, SANITY_THRESHOLD, SUSPECTS,
                                     atypical_corners, class_mean_maps, find_hotspot, find_stamps, flat_background,
                                     intervene, intervention_summary,
                                     normalize_regions, randomisation_check, region_masks, region_metrics,
                                     shortcut_alarm, spray_by_class, stamp_donor_masks)

ACTIONS = ("warn", "stop", "log")
HOTSPOT = "hotspot"
FLAT = "flat_background"
ATYPICAL = "atypical_corner"
STAMP = "stamp"
CANDIDATES = (HOTSPOT, FLAT, ATYPICAL, STAMP) + tuple(f"preset_{name}" for name in SUSPECTS)  # region names of unknown-region mode
EVIDENCE_ROWS = 4  # probe samples shown in a region's evidence figure: those whose prediction moved most
INTERVENTION_KEYS = ("flip", "control_flip", "shift", "control_shift", "change", "control_change", "region_correct",
                     "control_correct", "correct", "gain", "control_gain", "log_gain", "control_log_gain")

if TYPE_CHECKING:
    import lightning.pytorch as pl


def _strongest(shift: Tensor, rows: Tensor) -> Tensor:
    """Indices of the ``EVIDENCE_ROWS`` largest ``shift`` values, ties broken by the lower of ``rows``."""
    order = sorted(range(shift.shape[0]), key=lambda i: (-float(shift[i]), int(rows[i])))
    return torch.tensor(order[:EVIDENCE_ROWS], dtype=torch.long)


class ShortcutMonitor(SampleCheckedCallback):
    """Watches for shortcuts (spurious features) while a classifier trains; see the module docstring.

    Args:
        regions: where a suspected shortcut lives: ``None`` (look for one), a region spec, or a dict
            ``name -> spec``. A spec is a mask ``(H, W)`` or ``(N, H, W)`` (one per probe sample), a box
            ``(top, left, height, width)``, a preset (``"border"``, ``"corners"``, ``"top_left"``, ...,
            ``"center"``) or a callable ``inputs -> masks``.
        method: attribution method for the region figures (see :func:`lightning_xai.attribution.get_method`).
        discovery_method: attribution method for class maps, SpRAy and hotspots (unknown-region mode).
        fill: ``"swap"`` (default), ``"mean"`` or ``"blur"``; see :mod:`lightning_xai.shortcuts.interventions`.
        num_controls: control regions per sample. placement: ``"matched"`` (default) or ``"random"``.
        action: ``"warn"`` (default), ``"stop"`` or ``"log"``.
        reference_samples: training samples (stratified by class, from the training batches of the first epoch the
            monitor sees) that give the swapped-in region content and their labels for the gain test (see
            :mod:`lightning_xai.shortcuts.alarm`); ``0`` swaps within the probe set and decides on the shift alone, as
            does a fit whose training batches carry no labels, ``fill`` other than ``"swap"``, per-sample mask regions
            (their masks exist for the probe samples only) and ``validate()``/``test()`` without a previous fit. In
            unknown-region mode the gain only vetoes, except for the ``"stamp"`` candidate (a pasted pattern found in
            the inputs, as specific as a named region), where it also fires as in known-region mode.
        donor_draws: with reference samples, each probe sample receives the region content of this many of them (the
            most different of each of ``donor_draws`` interleaved groups) and its figures are the means, so a
            sample's gain does not rest on the one donor it drew. The interventions cost that many times the forward
            passes.
        patience: runs of the monitor in a row in which a region must fire before ``action`` is taken (like
            EarlyStopping's patience; epochs off the cadence do not break a streak). The ``alarm`` scalar
            logs every run's verdict. ``1`` acts at the first firing run (default: an alarm as early as the
            benchmark allows); ``2`` ignores a single firing run, such as a barely trained model's passing
            sensitivity to a bright mark, at the cost of acting one run later.
        min_excess, min_z, min_match: alarm thresholds (defaults documented in :mod:`lightning_xai.shortcuts.alarm`).
        find_regions: run unknown-region mode; default: when ``regions`` is None.
        spray: cluster each class' maps (SpRAy) in unknown-region mode. max_clusters: its largest k.
        sanity_check: run the parameter-randomisation check at the first explained epoch.
        sanity_layers: top layers re-initialised by the check. sanity_threshold: mean Spearman rho at or
            above which a method is reported as not explaining the model.
        seed: seed of the private generator (control placement, tie breaks, k-means).
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.base.ProbeSetCallback`);
            interventions are forward-only, so the default probe set is larger (256).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward: see
            :class:`~lightning_xai.callbacks.base.XAICallback`.

    Tags (``prefix="xai"``): per region ``xai/shortcut/<region>/{alarm, excess, z, shift, control_shift, gain_excess,
    gain_z, log_gain_excess, log_gain_z, flip_rate, control_flip_rate, match, acc_drop, control_acc_drop, share,
    share_ratio, rank, pointing}`` (``*gain_*`` are NaN without reference samples); unknown-region
    mode adds ``xai/shortcut/{hotspot, flat_background, atypical_corner, stamp, preset_corners,
    preset_border}/{found, alarm, ...}``, ``xai/shortcut/hotspot/peak``, ``xai/shortcut/stamp/carriers`` (share of
    the probe samples carrying a stamp),
    ``xai/shortcut/spray/class_<c>/strategies``, ``xai/shortcut/spray/max_strategies`` and the images
    ``xai/shortcut/class_maps``,
    ``xai/shortcut/spray/class_<c>`` and ``xai/shortcut/hotspot/score``; images ``xai/shortcut/<region>/evidence``
    (every run for named regions, and for a candidate when its alarm fires): the region and the control regions
    outlined on the probe samples whose prediction moved most, those samples with the region replaced, and the
    measured effect of region and controls side by side; the self-check logs
    ``xai/shortcut/sanity/<method>/spearman``.

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, action="stop")
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=5)  # doctest: +SKIP
    """

    area = "shortcut"

    def __init__(
        self,
        regions: Any = None,
        method: Any = "saliency",
        discovery_method: Any = "input_x_gradient",
        fill: str = "swap",
        num_controls: int = 8,
        placement: str = "matched",
        action: str = "warn",
        patience: int = 1,
        reference_samples: int = 256,
        donor_draws: int = 4,
        min_excess: float = MIN_EXCESS,
        min_z: float = MIN_Z,
        min_match: float = MIN_MATCH,
        find_regions: Optional[bool] = None,
        spray: bool = True,
        max_clusters: int = 4,
        sanity_check: bool = False,
        sanity_layers: Union[int, Sequence[str]] = 1,
        sanity_threshold: float = SANITY_THRESHOLD,
        seed: int = 0,
        probe_samples: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_samples=probe_samples, **kwargs)
        with refuse_bad_options():
            self.regions = normalize_regions(regions)
            check_choice("fill", fill, FILLS)
            check_choice("placement", placement, PLACEMENTS)
            check_choice("action", action, ACTIONS)
            self.method = resolve_method("method", method)
            self.discovery_method = resolve_method("discovery_method", discovery_method)
            for name, value in (("patience", patience), ("num_controls", num_controls), ("donor_draws", donor_draws),
                                ("max_clusters", max_clusters)):
                check_positive_int(name, value)
            check_real("min_excess", min_excess, 0, 1, low_open=True)
            check_real("min_z", min_z, 0)
            check_real("min_match", min_match, 0)
            check_real("sanity_threshold", sanity_threshold, 0, 1, low_open=True)
            for name, value in (("spray", spray), ("sanity_check", sanity_check)):
                check_bool(name, value)
            if find_regions is not None:
                check_bool("find_regions", find_regions)
            check_int("seed", seed)
        for name, fn, options in (self.method, self.discovery_method):  # what needs the image size: first sample
            check_method_options(name, fn, options, ndim=4)
        for reserved in CANDIDATES:
            if reserved in self.regions:
                raise MisconfigurationException(expected("region names", f"names other than {CANDIDATES} (reserved)", reserved))
        self._check_per_sample_masks()
        if isinstance(reference_samples, bool) or not isinstance(reference_samples, int) or reference_samples < 0:
            raise MisconfigurationException(expected("reference_samples", "an int >= 0 (0: no training samples kept)",
                                                     reference_samples))
        if not (isinstance(sanity_layers, int) and not isinstance(sanity_layers, bool) and sanity_layers > 0) and not (
                isinstance(sanity_layers, (list, tuple)) and sanity_layers
                and all(isinstance(n, str) and n for n in sanity_layers)):
            raise MisconfigurationException(expected("sanity_layers", "a positive int (top layers) or a non-empty list "
                                                     "of layer names or glob patterns", sanity_layers))
        self.fill, self.num_controls, self.placement, self.action = fill, num_controls, placement, action
        self.min_excess, self.min_z, self.min_match = float(min_excess), float(min_z), float(min_match)
        self.last_hotspot: Optional[Tensor] = None  # the latest candidate region of unknown-region mode (H, W)
        self.find_regions = (not self.regions) if find_regions is None else bool(find_regions)
        self.use_spray, self.max_clusters = bool(spray), int(max_clusters)
        self.sanity_check, self.sanity_layers, self.sanity_threshold = bool(sanity_check), sanity_layers, float(sanity_threshold)
        self.seed = int(seed)
        self.patience, self.donor_draws = patience, donor_draws
        self.alarms: List[Dict[str, Any]] = []  # every alarm acted on so far: region, epoch, figures
        self._streaks: Dict[str, int] = {}  # region -> runs in a row it has fired
        self._sanity_done = False
        self._rows: Tuple[int, int] = (0, 0)
        self._corner_cache: Optional[Tuple[Tensor, Tensor, Any]] = None  # (probe inputs, atypical corners, stamps)
        self.reference_samples = reference_samples
        self.reference_x: Optional[Tensor] = None  # training samples giving the swapped-in content, and their labels
        self.reference_y: Optional[Tensor] = None
        self._reference_buckets: Buckets = {}
        self._collect_epoch: Optional[int] = None  # the training epoch the references are collected in
        self._no_references = False  # the training batches could not give any (unlabelled, not images): shift alone
        self._reference_cache: Optional[Tuple[Any, ...]] = None  # (references, flat, atypical, stamps)
        self._evidence: Dict[str, Dict[str, Tensor]] = {}  # region -> this run's edits of a few samples, to show

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, regions=sorted(self.regions))

    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["alarms"] = [dict(a) for a in self.alarms]
        state["streaks"] = dict(self._streaks)
        state["sanity_done"] = self._sanity_done
        state["reference_x"], state["reference_y"] = self.reference_x, self.reference_y
        state["no_references"] = self._no_references
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.alarms = [dict(a) for a in state_dict.get("alarms", [])]
        self._streaks = {str(k): int(v) for k, v in state_dict.get("streaks", {}).items()}
        self._sanity_done = bool(state_dict.get("sanity_done", False))
        if state_dict.get("reference_x") is not None:
            self.reference_x, self.reference_y = state_dict["reference_x"], state_dict["reference_y"]
        self._no_references = bool(state_dict.get("no_references", False))

    # ------------------------------------------------------------------ checks
    @override
    def estimated_work(self, trainer: Optional["pl.Trainer"] = None) -> Optional[float]:
        """Probe samples x (prediction + attribution passes + one forward per filled region and control), with
        the unknown-region candidates counted as ``CANDIDATES`` and the fills repeated ``donor_draws`` times when
        reference samples are kept; None if a method's passes are unknown."""
        rows, shape = self.probe_size()
        per_sample = 1 / 3
        draws = self.donor_draws if self.reference_samples > 0 and self.fill == "swap" and not self._no_references else 1
        modes = [(self.method, len(self.regions))] if self.regions else []
        if self.find_regions:
            modes.append((self.discovery_method, len(CANDIDATES)))
        for (name, fn, options), fills in modes:
            passes = method_passes(name, fn, options, shape)
            if passes is None:
                return None
            per_sample += passes + fills * draws * (1 + self.num_controls) / 3
        return rows * per_sample

    @staticmethod
    def check_images(x: Tensor) -> None:
        if x.ndim != 4 or not x.is_floating_point():
            raise MisconfigurationException(expected("ShortcutMonitor's probe inputs", "float images of shape (N, C, H, W)", x))

    def _check_region_shapes(self, x: Tensor) -> None:
        for name, spec in self.regions.items():
            try:
                region_masks(spec, x, name)
            except (ValueError, TypeError) as err:
                raise MisconfigurationException(f"{err} Per-sample masks (N, H, W) need `probe=` with N samples.") from err

    def _check_per_sample_masks(self) -> None:
        """Per-sample masks ``(N, H, W)`` need a probe set given as ``N`` samples (tensors or dataset indices)."""
        given = self.probe_x.shape[0] if self.probe_x is not None else (
            len(self._probe_indices) if self._probe_indices is not None else None)
        for name, spec in self.regions.items():
            if isinstance(spec, Tensor) and spec.ndim == 3 and spec.shape[0] != given:
                raise MisconfigurationException(expected(
                    f"region {name!r}", "one mask (H, W) for every sample, or one per probe sample (N, H, W) with "
                    + ("`probe=` given as N samples" if given is None else f"N = {given}, the `probe` samples"), spec))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.sanity_check and self.sharded:
            raise MisconfigurationException(
                expected("sanity_check", f"False under {type(trainer.strategy).__name__} (the check re-initialises "
                         "layers of a copy of the model, and a sharded model cannot be copied)", self.sanity_check))
        if self.probe_x is not None:
            self.check_images(self.probe_x)
            self._check_region_shapes(self.probe_x)
        for name, fn, options in (self.method, self.discovery_method):
            check_method_layers(pl_module, name, fn, options)
        if not isinstance(self.sanity_layers, int):
            check_layer_names(pl_module, "sanity_layers", self.sanity_layers)

    @override
    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        """Images, every region against the image size (boxes inside, masks of its shape, callables giving
        such masks) and the method options that need the image size."""
        self.check_images(x)
        super().check_sample(pl_module, x)
        for name, spec in self.regions.items():
            if isinstance(spec, Tensor) and spec.ndim == 3:
                spec = spec[:1]  # one mask per probe sample: the shape of one
            try:
                with refuse_bad_options():
                    region_masks(spec, x, name)
            except MisconfigurationException:
                raise
            except Exception as err:  # noqa: BLE001 - a region callable that fails on a probe image
                raise MisconfigurationException(expected(f"region {name!r}", "a callable inputs -> masks that runs on "
                                                         "the probe images", f"{type(err).__name__}: {err}")) from err
        for name, fn, options in (self.method, self.discovery_method):
            check_method_options(name, fn, options, sample=x)

    # ------------------------------------------------------------------ reference samples (training batches)
    @property
    def _wants_references(self) -> bool:
        return self.reference_samples > 0 and self.fill == "swap" and self.reference_x is None and not self._no_references

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
        try:
            x, y = extract_xy(batch, self.batch_to_xy)
        except Exception:  # noqa: BLE001 - a batch format we cannot read: no references, the shift alone decides
            self._no_references = True
            self._reference_buckets = {}
            return
        y = class_labels(y, x.shape[0], self) if x.ndim >= 1 else None
        if y is None or x.ndim != 4 or not x.is_floating_point():
            self._no_references = True  # unlabelled or not images: nothing to weigh a gain against
            self._reference_buckets = {}
            return
        with self.guard("collecting reference samples from a training batch", trainer.current_epoch, BATCH_FIX,
                        skips_run=False):
            collect_rows(self._reference_buckets, x, y, self.reference_samples)

    def _finalize_references(self, trainer: "pl.Trainer") -> None:
        """Fix the reference samples (once, identical on every rank) from what the training batches gave."""
        if not self._wants_references or self._collect_epoch is None:
            return
        x, y = choose_stratified(trainer, self._reference_buckets, self.reference_samples)
        self._reference_buckets = {}
        if x is not None and y is not None and self.probe_x is not None and x.shape[1:] == self.probe_x.shape[1:]:
            self.reference_x, self.reference_y = x, y.long()
        else:
            self._no_references = True

    def _donors(self, spec: Any, name: str, device: torch.device,
                per_reference: bool = False) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """The reference samples with their masks of region ``spec`` (a mask, box, preset or callable; with
        ``per_reference``, the masks of the reference samples themselves), or None where they cannot be had."""
        if self.reference_x is None or self.fill != "swap" or spec is None:
            return None
        x = self.reference_x.to(device)
        if per_reference:
            masks = spec
        elif isinstance(spec, Tensor) and spec.ndim == 3:
            return None  # one mask per probe sample: none for the references
        else:
            masks = region_masks(spec, x, name)
        if not bool(masks.flatten(1).any(1).any()):
            return None
        return x, masks.to(device), self.reference_y.to(device)

    # ------------------------------------------------------------------ compute (this rank's rows)
    @override
    def explain(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", via_module: bool = True) -> None:
        ready = self.guarded(lambda: self.finalize_probe(trainer), "choosing the probe set", trainer.current_epoch)
        if not self.agree(trainer, bool(ready)):  # every rank goes on to the references' gather, or none
            return
        if ready:
            start, stop, _ = split_rows(self.probe_x.shape[0], *self.work_split(trainer))
            self._rows = (start, stop)
            self._finalize_references(trainer)
        super().explain(trainer, pl_module, via_module)

    def _masks(self, name: str, x: Tensor, rows: Optional[Tuple[int, int]] = None) -> Tensor:
        spec = self.regions[name]
        if isinstance(spec, Tensor) and spec.ndim == 3:  # one mask per probe sample: this rank's rows
            start, stop = rows if rows is not None else self._rows
            if spec.shape[0] != self.probe_x.shape[0]:
                raise MisconfigurationException(expected(f"region {name!r}", f"{self.probe_x.shape[0]} masks, one per probe sample", spec))
            spec = spec[start:stop]
        return region_masks(spec, x, name)

    def _generator(self) -> torch.Generator:
        """The generator of the known-region interventions, seeded alike on every rank: each rank plans the edits of
        the whole probe set with it, so the figures do not depend on the number of processes."""
        return torch.Generator().manual_seed(self.seed * 1000)

    def _intervene(self, forward: Callable[[Tensor], Tensor], x: Tensor, masks: Tensor, y: Optional[Tensor],
                   generator: torch.Generator, rows: Optional[Tuple[int, int]] = None,
                   donors: Optional[Tuple[Tensor, Tensor, Tensor]] = None, evidence: Optional[str] = None) -> Dict[str, Tensor]:
        """:func:`intervene`; with ``evidence`` (a region name), the edits of the ``EVIDENCE_ROWS`` samples run here
        whose prediction moved most are kept for that region's evidence figure (see :meth:`_gather_evidence`)."""
        out = intervene(forward, x, masks.to(x.device), y, fill=self.fill, num_controls=self.num_controls,
                        placement=self.placement, generator=generator, rows=rows, donors=donors,
                        donor_draws=self.donor_draws, min_match=self.min_match, return_edits=evidence is not None)
        if evidence is not None:
            start, stop = rows if rows is not None else (0, x.shape[0])
            top = _strongest(out["shift"].detach().cpu(), torch.arange(start, stop))
            self._evidence[evidence] = {
                "row": top + start, "inputs": x[start:stop][top.to(x.device)].detach().cpu(),
                "masks": masks[start:stop][top.to(masks.device)].cpu(), "controls": out.pop("controls")[top].cpu(),
                "edited": out.pop("edited")[top].cpu(), "region_pred": out.pop("region_pred")[top].cpu(),
                "pred": out["pred"][top].cpu(), "shift": out["shift"][top].cpu(),
                "control_shift": out["control_shift"][top].cpu()}
        return out

    def _gather_evidence(self, trainer: "pl.Trainer", region: str) -> Optional[Dict[str, Tensor]]:
        """This run's evidence of ``region``: the ``EVIDENCE_ROWS`` samples whose prediction moved most (ties: the
        lower row). Under DDP each rank kept its own strongest rows; they are gathered (call this on every rank) and
        picked from again, so the figure shows what one process would."""
        ev = self._evidence.pop(region, None)
        if trainer.world_size > 1:
            everyone: List[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, ev)
            parts = [part for part in everyone if part is not None and part["row"].numel()]
            ev = {key: torch.cat([part[key] for part in parts]) for key in parts[0]} if parts else None
        if ev is None or ev["row"].numel() == 0:
            return None
        top = _strongest(ev["shift"], ev["row"])
        return {key: value[top] for key, value in ev.items()}

    def _whole_set(self, x: Tensor, y: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], Optional[Tuple[int, int]]]:
        """The whole probe set and this rank's rows in it when ``x`` is this rank's share of it (the interventions
        are planned on the whole set), else ``(x, y, None)``."""
        start, stop = self._rows
        whole = self.probe_x
        if whole is None or stop - start != x.shape[0] or whole.shape[1:] != x.shape[1:]:
            return x, y, None
        whole = whole.to(device=x.device, dtype=x.dtype)
        if not torch.equal(whole[start:stop], x):
            return x, y, None
        labels = None if y is None or self.probe_y is None else self.probe_y.to(y.device)
        if y is not None and (labels is None or not torch.equal(labels[start:stop], y)):
            return x, y, None
        return whole, labels, (start, stop)

    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        self.check_images(x)
        forward = self.logits_fn(pl_module)
        gen = self._generator()
        pred = shared.logits(self, pl_module, forward, x).argmax(1)
        target = y if y is not None else pred
        results: Dict[str, Tensor] = {"pred": pred}
        if self.regions:
            maps = shared.attribute(self, pl_module, self.method, forward, x, target).detach()
            whole_x, whole_y, rows = self._whole_set(x, y)
            for region in self.regions:
                masks = self._masks(region, x)
                for key, value in region_metrics(maps, masks).items():
                    results[f"{region}/{key}"] = value
                whole_masks = masks if rows is None else self._masks(region, whole_x, rows=(0, whole_x.shape[0]))
                donors = self._donors(self.regions[region], region, x.device)
                out = self._intervene(forward, whole_x, whole_masks, whole_y, gen, rows, donors,  # planned on the whole set
                                      evidence=region)
                for key in INTERVENTION_KEYS:
                    if key in out:
                        results[f"{region}/{key}"] = out[key]
        if self.find_regions:
            maps = shared.attribute(self, pl_module, self.discovery_method, forward, x, target)
            results["discovery"] = maps.detach().float().abs().sum(1, keepdim=True)
        if self.sanity_check and not self._sanity_done:
            for name, fn, options in self._sanity_methods():
                res = randomisation_check(pl_module, fn, x, target, layers=self.sanity_layers,
                                          threshold=self.sanity_threshold, seed=self.seed, method_options=options,
                                          forward=lambda m, inputs: self.logits_fn(m)(inputs),
                                          shared=(pl_module.trainer,))
                results[f"sanity/{name}"] = res.per_sample.float().to(x.device)
                self._sanity_layer_names = res.layers
        return results

    def _sanity_methods(self) -> List[Tuple[str, Callable, Dict[str, Any]]]:
        methods = [self.method] if self.regions else []
        if self.find_regions and self.discovery_method[0] not in [m[0] for m in methods]:
            methods.append(self.discovery_method)
        return methods

    # ------------------------------------------------------------------ report (all rows, every rank)
    def _region_figures(self, region: str, results: Dict[str, Tensor], gain_fires: bool = True) -> Tuple[Dict[str, float], bool]:
        decision = shortcut_alarm(results[f"{region}/shift"], results[f"{region}/control_shift"], self.min_excess, self.min_z,
                                  results[f"{region}/change"], results[f"{region}/control_change"], self.min_match,
                                  results.get(f"{region}/gain"), results.get(f"{region}/control_gain"),
                                  gain_fires=gain_fires, log_gain=results.get(f"{region}/log_gain"),
                                  control_log_gain=results.get(f"{region}/control_log_gain"))
        figures = decision.as_dict()
        out = {"flip": results[f"{region}/flip"], "control_flip": results[f"{region}/control_flip"]}
        if f"{region}/correct" in results:
            out.update(correct=results[f"{region}/correct"], region_correct=results[f"{region}/region_correct"],
                       control_correct=results[f"{region}/control_correct"])
        out["prob_drop"] = out["control_prob_drop"] = torch.zeros(1)
        summary = intervention_summary(out)
        for key in ("flip_rate", "control_flip_rate", "acc_drop", "control_acc_drop"):
            if key in summary:
                figures[key] = summary[key]
        for key in ("share", "share_ratio", "rank", "pointing"):
            if f"{region}/{key}" in results:
                figures[key] = float(results[f"{region}/{key}"].nanmean())
        return figures, decision.fired

    def _agree(self, trainer: "pl.Trainer", fired: bool) -> bool:
        if trainer.world_size <= 1:
            return fired
        flag = torch.tensor([1.0 if fired else 0.0], device=trainer.strategy.root_device)
        return float(trainer.strategy.reduce(flag, reduce_op="max").item()) > 0

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        metrics: Dict[str, float] = {}
        fired: Dict[str, Dict[str, float]] = {}
        for region in self.regions:
            figures, alarm = self._region_figures(region, results)
            alarm = self._agree(trainer, alarm)
            figures["alarm"] = float(alarm)
            metrics.update({self.tag(region, k): v for k, v in figures.items()})
            if alarm:
                fired[region] = figures
            evidence = self._gather_evidence(trainer, region)
            if trainer.is_global_zero:
                self._log_evidence(trainer, region, figures, alarm, epoch, evidence)
        if self.find_regions:
            labels = y if y is not None else results["pred"]
            fired.update(self._discover(trainer, pl_module, x, y, labels, results["discovery"], metrics, epoch))
        sanity = {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("sanity/")}
        if sanity:
            self._sanity_done = True
            for name, rho in sanity.items():
                mean = float(rho.nanmean())
                metrics[self.tag("sanity", name, "spearman")] = mean
                if mean >= self.sanity_threshold:
                    rank_zero_warn(
                        f"ShortcutMonitor: the maps of {name!r} barely change when the top layer(s) "
                        f"{getattr(self, '_sanity_layer_names', [])} are re-initialised (mean Spearman rho {mean:.2f} >= "
                        f"{self.sanity_threshold}); they show the input more than the model, so do not read its shortcut "
                        "figures as evidence (Adebayo et al. 2018).", category=RuntimeWarning)
        self._streaks = {region: self._streaks.get(region, 0) + 1 for region in fired}  # a run without it breaks a streak
        for region, figures in fired.items():
            if self._streaks[region] >= self.patience:
                self._raise_alarm(trainer, region, figures, epoch)
        self._evidence = {}  # what was not shown (candidates that did not fire) is not kept
        return metrics

    def _discover(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
                  labels: Tensor, maps: Tensor, metrics: Dict[str, float], epoch: int) -> Dict[str, Dict[str, float]]:
        """Class maps, SpRAy and the candidate checks (hotspot, flat background, atypical corner, stamp, presets);
        returns the figures of the candidates whose alarm fired."""
        gen = torch.Generator().manual_seed(self.seed)
        maps, labels = maps.cpu(), labels.cpu()
        means = class_mean_maps(maps, labels)
        if self.use_spray:
            clusters = spray_by_class(maps, labels, max_clusters=self.max_clusters, generator=gen)
            for c, res in clusters.items():
                metrics[self.tag("spray", f"class_{c}", "strategies")] = float(res.n_clusters)
            metrics[self.tag("spray", "max_strategies")] = float(max(r.n_clusters for r in clusters.values()))
        spot = find_hotspot(maps, labels, inputs=x.detach().cpu())
        self.last_hotspot = spot.mask
        metrics[self.tag(HOTSPOT, "peak")] = spot.peak
        flat = flat_background(x.detach().cpu())
        atypical, stamps = self._corner_candidates(x.detach().cpu())
        candidates = {HOTSPOT: None if spot.mask is None else spot.mask.unsqueeze(0).expand(x.shape[0], -1, -1).contiguous(),
                      FLAT: flat, ATYPICAL: atypical, STAMP: None if stamps is None else stamps.masks}
        metrics[self.tag(STAMP, "carriers")] = 0.0 if stamps is None else float(stamps.carriers.float().mean())
        for name in SUSPECTS:
            candidates[f"preset_{name}"] = region_masks(name, x.detach().cpu())
        donor_specs: Dict[str, Any] = {HOTSPOT: spot.mask}
        if self.reference_x is not None:
            donor_specs[FLAT], donor_specs[ATYPICAL], ref_stamps = self._reference_candidates()
            if stamps is not None:
                donor_specs[STAMP] = stamp_donor_masks(self.reference_x, stamps, own=ref_stamps)
            donor_specs.update({f"preset_{name}": name for name in SUSPECTS})
        fired: Dict[str, Dict[str, float]] = {}
        for name, masks in candidates.items():
            metrics[self.tag(name, "found")] = float(masks is not None)
            alarm = False
            if masks is not None:
                rows = masks.flatten(1).any(1)  # samples where the candidate exists (a flat background may not)
                # every rank plans the edits of all these samples with the same generator and runs its share of them
                world, rank = self.work_split(trainer)
                share = split_rows(int(rows.sum()), world, rank) if world > 1 and bool(rows.any()) else None
                with self.explain_context(pl_module):
                    out = self._intervene(self.logits_fn(pl_module), x[rows.to(x.device)], masks[rows].to(x.device),
                                          None if y is None else y[rows.to(y.device)], gen,
                                          rows=None if share is None else share[:2],
                                          donors=self._donors(donor_specs.get(name), name, x.device,
                                                              per_reference=name in (FLAT, ATYPICAL, STAMP)),
                                          evidence=name)
                if share is not None:
                    out = gather_shares(trainer, out, share[2])
                res = {f"{name}/{k}": v for k, v in out.items()}
                for key, value in region_metrics(maps[rows], masks[rows]).items():
                    res[f"{name}/{key}"] = value
                figures, alarm = self._region_figures(name, res, gain_fires=name == STAMP)
                figures["area"] = float(masks[rows].float().mean())
                metrics.update({self.tag(name, k): v for k, v in figures.items() if k != "alarm"})
            alarm = self._agree(trainer, alarm)
            metrics[self.tag(name, "alarm")] = float(alarm)
            if alarm:
                fired[name] = {**figures, "alarm": 1.0}
                evidence = self._gather_evidence(trainer, name)
                if trainer.is_global_zero:
                    self._log_evidence(trainer, name, figures, True, epoch, evidence)
        if trainer.is_global_zero:
            self._log_discovery_images(trainer, means, spot, clusters if self.use_spray else None, epoch)
        return fired

    def _corner_candidates(self, x: Tensor) -> Tuple[Tensor, Any]:
        """The atypical corners and the stamps of the probe set; they depend on the inputs only, so they are kept
        while the probe set is the same (compared by value: a resumed or re-chosen probe set recomputes them)."""
        cached = self._corner_cache
        if cached is not None and cached[0].shape == x.shape and torch.equal(cached[0], x):
            return cached[1], cached[2]
        atypical, stamps = atypical_corners(x), find_stamps(x)
        self._corner_cache = (x.clone(), atypical, stamps)
        return atypical, stamps

    def _reference_candidates(self) -> Tuple[Optional[Tensor], Tensor, Any]:
        """The flat backgrounds, atypical corners and stamps of the reference samples; they depend on the inputs only,
        so they are kept while the reference samples are the same tensor (finalising or loading them makes a new one)."""
        cached = self._reference_cache
        if cached is None or cached[0] is not self.reference_x:
            ref = self.reference_x
            cached = (ref, flat_background(ref), atypical_corners(ref), find_stamps(ref))
            self._reference_cache = cached
        return cached[1], cached[2], cached[3]

    def _log_discovery_images(self, trainer: "pl.Trainer", means: Dict[int, Tensor], spot: Any, clusters: Any,
                              epoch: int) -> None:
        method = self.discovery_method[0]
        classes = sorted(means)
        stack = share_maps(torch.stack([means[c] for c in classes]), signed=False)  # (K, h, w), x an even share
        log_image(trainer, self.tag("class_maps"), maps_figure(
            stack, title=f"where each class' attribution sits · epoch {epoch}",
            subtitle=f"mean {method} map of each class' probe samples, one colour scale",
            captions=[[f"class {c}"] for c in classes], label="× an even share of the map's |attribution|").image)
        found = spot.mask is not None
        log_image(trainer, self.tag(HOTSPOT, "score"), maps_figure(
            spot.score.unsqueeze(0), title=f"input-independent hotspot · epoch {epoch}",
            subtitle=f"peak {spot.peak:.2f}: " + ("a candidate region was found (outlined)" if found else
                                                 "no region qualifies as a hotspot"),
            captions=[["all classes"]], masks=None if not found else spot.mask.unsqueeze(0), min_side=160,
            label="geometric mean over classes of the class-mean map, × an even share",
            legend=[(CYAN, "hotspot region", "frame")] if found else ()).image)
        if clusters:
            for c, res in clusters.items():
                counts = torch.bincount(res.labels.view(-1).long().cpu(), minlength=res.n_clusters).tolist()
                log_image(trainer, self.tag("spray", f"class_{c}"), maps_figure(
                    share_maps(res.mean_maps, signed=False), title=f"SpRAy · class {c} · epoch {epoch}",
                    subtitle=f"{res.n_clusters} strateg{'y' if res.n_clusters == 1 else 'ies'}: clusters of the "
                             f"class' {method} maps, each cluster's mean map",
                    captions=[[f"strategy {k + 1}: {counts[k]} sample{'s' if counts[k] != 1 else ''}"]
                              for k in range(res.mean_maps.shape[0])],
                    label="× an even share of the map's |attribution|").image)

    def _log_evidence(self, trainer: "pl.Trainer", region: str, figures: Dict[str, float], alarm: bool,
                      epoch: int, ev: Optional[Dict[str, Tensor]]) -> None:
        """The evidence figure of ``region``: what was replaced where, and what it did, next to the controls."""
        if ev is None:
            return
        captions = [[f"pred {int(p)} → {int(q)} · shift {float(s):.2f}", f"controls: shift {float(c.mean()):.2f}"]
                    for p, q, s, c in zip(ev["pred"], ev["region_pred"], ev["shift"], ev["control_shift"])]
        grey = (0.45, 0.55, 0.7)
        bars = [("output shift (mean)", [("region", figures["shift"], RED), ("controls", figures["control_shift"], grey)])]
        if "flip_rate" in figures:
            bars.append(("flip rate", [("region", figures["flip_rate"], RED),
                                       ("controls", figures["control_flip_rate"], grey)]))
        if "acc_drop" in figures:
            bars.append(("accuracy drop", [("region", figures["acc_drop"], RED),
                                           ("controls", figures["control_acc_drop"], grey)]))
        gain = figures.get("gain_excess", float("nan"))
        notes = [f"excess shift {figures['excess']:+.3f} (alarm from {self.min_excess:g}), z {figures['z']:.1f} "
                 f"(from {self.min_z:g}), control match {figures['match']:.2f}"
                 + ("" if gain != gain else f"; gain excess {gain:+.3f} (z {figures['gain_z']:.1f})"),
                 f"samples shown: the {ev['inputs'].shape[0]} whose prediction moved most"]
        fig = evidence_figure(
            ev["inputs"], ev["masks"], ev["controls"], ev["edited"],
            title=f"shortcut check · {region} · epoch {epoch} · {'ALARM' if alarm else 'no alarm'}",
            subtitle="the region is replaced, and so are control regions that change the input as much; a shortcut "
                     "moves the predictions more through the region than through the controls",
            captions=captions, bars=bars, notes=notes, denormalize=None)
        log_image(trainer, self.tag(region, "evidence"), fig.image)

    def _raise_alarm(self, trainer: "pl.Trainer", region: str, figures: Dict[str, float], epoch: int) -> None:
        record = {"region": region, "epoch": int(epoch), **{k: float(v) for k, v in figures.items()}}
        self.alarms.append(record)
        if self.action in ("warn", "stop"):
            acc = f", accuracy drop {figures['acc_drop']:.2f} vs {figures['control_acc_drop']:.2f}" if "acc_drop" in figures else ""
            share = f"; attribution share ratio {figures['share_ratio']:.2f}" if "share_ratio" in figures else ""
            gain = figures.get("gain_excess", float("nan"))
            gain = "" if gain != gain else (f"; it raises the probability of the training label of the pasted content "
                                            f"by {gain:+.3f} more than the controls (z {figures['gain_z']:.1f}; "
                                            f"log-probability {figures['log_gain_excess']:+.3f}, "
                                            f"z {figures['log_gain_z']:.1f})")
            rank_zero_warn(
                f"ShortcutMonitor: region {region!r} looks like a shortcut at epoch {epoch}: replacing it moves the probe "
                f"predictions by {figures['shift']:.3f} (total variation) vs {figures['control_shift']:.3f} for control regions "
                f"(excess {figures['excess']:.3f}, z {figures['z']:.1f}) and flips {figures['flip_rate']:.2f} of them vs "
                f"{figures['control_flip_rate']:.2f}{acc}{gain}{share}."
                + (" Stopping training." if self.action == "stop" else ""), category=RuntimeWarning)
        if self.action == "stop":
            should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)
            trainer.should_stop = trainer.should_stop or should_stop

    # ------------------------------------------------------------------ on demand
    def run_sanity_check(self, pl_module: "pl.LightningModule", inputs: Optional[Tensor] = None,
                         target: Any = None) -> Dict[str, float]:
        """The parameter-randomisation check now, on ``inputs`` (default: the probe set); returns mean rho per method."""
        x = self.probe_x if inputs is None else inputs
        if x is None:
            raise MisconfigurationException("run_sanity_check needs `inputs` (no probe set has been chosen yet).")
        if target is None and inputs is None and self.probe_y is not None:
            target = self.probe_y
        x = x.to(pl_module.device)
        out: Dict[str, float] = {}
        with self.explain_context(pl_module):
            for name, fn, options in self._sanity_methods() or [self.method]:
                res = randomisation_check(pl_module, fn, x, None if target is None else target.to(x.device) if isinstance(target, Tensor) else target,
                                          layers=self.sanity_layers, threshold=self.sanity_threshold, seed=self.seed,
                                          method_options=options, forward=lambda m, inp: self.logits_fn(m)(inp),
                                          shared=(pl_module.trainer,))
                out[name] = res.correlation
        return out
