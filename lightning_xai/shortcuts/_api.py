"""One call per job: :func:`check_region` (a region the user names) and :func:`discover` (no region named).

Both plan the edits (:func:`~lightning_xai.shortcuts._test.plan_interventions`), run them
(:func:`~lightning_xai.shortcuts._test.run_plan`) and decide (:func:`~lightning_xai.shortcuts._test.decide`).
Discovery proposes candidate regions from the inputs alone (presets where tags and frames sit, flat backgrounds,
each sample's atypical corner, patterns pasted identically into several images) and, given attribution maps, two
from the model (an input-independent hotspot; with the donors' maps too, each sample's attribution peak). Every
candidate goes through the same test at level ``alpha / (number of candidates)`` (Bonferroni), so a clean model
raises a discovery alarm with probability at most ``alpha`` per run; candidates are ranked by the evidence
(``excess_z``, else ``pull_z``) for a person to judge. The candidates from the model are ranked and shown, never
alarmed on (:func:`candidate_verdict`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import expected, preserve_modes, two_class_logits
from lightning_xai.shortcuts._test import (InterventionPlan, ShortcutConfig, Verdict, decide, plan_interventions,
                                           run_plan)
from lightning_xai.shortcuts._corners import atypical_corners, find_stamps, stamp_donor_masks
from lightning_xai.shortcuts._hotspots import attribution_peaks, find_hotspot, flat_background
from lightning_xai.shortcuts._regions import region_masks

Forward = Union[nn.Module, Callable[[Tensor], Tensor]]
DISCOVERY_PRESETS = ("corners", "border")  # where source tags and frames usually sit
SHOWN_ONLY = ("hotspot", "attribution_peak")  # ranked and shown, never alarmed on (see :func:`candidate_verdict`)
SELECTED = ("flat_background", "atypical_corner", "stamp")  # per-sample windows chosen for unusual content


@dataclass
class Candidate:
    """A region discovery proposes: its ``name``, its masks over the probe samples ``(N, H, W)``, the test's
    ``verdict`` and the ``plan`` that was run (for evidence pictures)."""

    name: str
    masks: Tensor
    verdict: Verdict
    plan: InterventionPlan


def evidence_rank(name: str, verdict: Verdict) -> Tuple[int, float]:
    """The sort key of candidate ``name`` from its test's ``verdict`` (before :func:`candidate_verdict`), strongest
    first: candidates whose test passes (alarms, and shown-only candidates that would have alarmed), then the other
    candidates by the excess z over controls (else the pull z; a candidate without either after them), then the
    shown-only candidates whose test does not pass. How a shown-only candidate was chosen biases its test towards a
    pull (:func:`candidate_verdict`), so its z does not compare with the other candidates'; it comes first only on
    evidence strong enough to pass."""
    z = verdict.stats.get("excess_z", float("nan"))
    z = z if z == z else verdict.stats.get("pull_z", float("nan"))
    tier = 0 if verdict.alarm else 2 if name in SHOWN_ONLY else 1
    return tier, -z if z == z else math.inf


def candidate_verdict(name: str, verdict: Verdict) -> Verdict:
    """A discovery candidate's verdict. The candidates found from the model's attribution maps are ranked and shown
    for a person to judge but raise no alarm: the ``hotspot`` (where every class attends) is also where objects sit
    when they are centred, a fixed region over the object whose rolled controls land on background; each sample's
    ``attribution_peak`` is where that sample's content tells the model most, so it out-pulls other same-class content
    at those pixels by construction. Neither test can tell a shortcut there from the object."""
    if name not in SHOWN_ONLY or not verdict.alarm:
        return verdict
    why = {"hotspot": "where every class attends may be where the objects sit",
           "attribution_peak": "each sample's most telling content is there by construction"}.get(
        name, "it is found from the model's attribution maps")
    return Verdict(False, {**verdict.stats, "alarm": 0.0}, verdict.reason + f"; {name} is shown, not alarmed on: "
                   + why)


def discovery_level(config: ShortcutConfig, candidates: int) -> ShortcutConfig:
    """``config`` at level ``alpha / candidates`` (Bonferroni over the candidates tested)."""
    return replace(config, alpha=config.alpha / max(candidates, 1))


def _context(model: Forward) -> Any:
    return preserve_modes(model) if isinstance(model, nn.Module) else nullcontext()


def _donor_set(forward: Callable[[Tensor], Tensor], x: Tensor, y: Optional[Tensor], donor_x: Optional[Tensor],
               donor_y: Optional[Tensor], batch_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Probe labels (predictions where none) and the donors (the probe set itself where none are given)."""
    def predict(inputs: Tensor) -> Tensor:
        return torch.cat([two_class_logits(forward(inputs[i:i + batch_size])).argmax(1).cpu()
                          for i in range(0, inputs.shape[0], batch_size)])
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(expected("probe_x", "float images of shape (N, C, H, W)", x))
    y = predict(x) if y is None else y.long().cpu()
    if donor_x is None:
        return x, y, x, y
    if donor_x.ndim != 4 or donor_x.shape[1:] != x.shape[1:]:
        raise ValueError(expected("donor_x", f"images of shape (M, {', '.join(map(str, x.shape[1:]))})", donor_x))
    donor_y = predict(donor_x) if donor_y is None else donor_y.long().cpu()
    return x, y, donor_x, donor_y


def test_masks(forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, donor_x: Tensor, donor_y: Tensor,
               masks: Tensor, donor_masks: Tensor, config: ShortcutConfig,
               selected: bool = False) -> Tuple[Verdict, InterventionPlan]:
    """Plan, run and decide for given masks (the shared step of both jobs); ``selected`` as in
    :func:`~lightning_xai.shortcuts._test.plan_interventions`."""
    plan = plan_interventions(x, y, donor_x, donor_y, masks, donor_masks, config, selected=selected)
    effects = run_plan(forward, x, donor_x, plan, batch_size=config.batch_size)
    return decide(effects, plan.targets(), config), plan


def check_region(model: Forward, probe_x: Tensor, probe_y: Optional[Tensor], donor_x: Optional[Tensor],
                 donor_y: Optional[Tensor], region: Any, config: ShortcutConfig = ShortcutConfig(),
                 seed: Optional[int] = None) -> Verdict:
    """Does ``model`` read class evidence from ``region``, beyond what ordinary content gives? (See
    :mod:`lightning_xai.shortcuts._test` for the test.) Every region gets a verdict.

    Args:
        model: a module (run in eval mode, its flags restored) or a function ``inputs -> logits``.
        probe_x, probe_y: probe samples ``(N, C, H, W)`` and their labels (None: the model's predictions).
        donor_x, donor_y: samples giving the pasted content (kept training samples) and their labels; None: the
            probe samples.
        region: a mask ``(H, W)`` or ``(N, H, W)``, a box ``(top, left, height, width)``, a preset name or a callable
            ``inputs -> masks`` (applied to the donors too, so a per-sample mark is pasted where the donor has it).
        seed: overrides ``config.seed``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        >>> x = torch.rand(16, 1, 8, 8); y = torch.arange(16) % 2
        >>> check_region(net, x, y, None, None, (0, 0, 2, 2)).alarm in (True, False)
        True
    """
    config = config if seed is None else replace(config, seed=seed)
    with _context(model), torch.no_grad():
        x, y, dx, dy = _donor_set(model, probe_x, probe_y, donor_x, donor_y, config.batch_size)
        masks = region_masks(region, x).cpu()
        if isinstance(region, Tensor) and region.ndim == 3 and donor_x is not None:
            dx, dy = x, y  # one mask per probe sample: none for other samples, so probe samples give the content
        donor_masks = masks if dx is x else region_masks(region, dx).cpu()
        return test_masks(model, x, y, dx, dy, masks, donor_masks, config)[0]


def discover(model: Forward, probe_x: Tensor, probe_y: Optional[Tensor], donor_x: Optional[Tensor],
             donor_y: Optional[Tensor], config: ShortcutConfig = ShortcutConfig(), seed: Optional[int] = None,
             maps: Optional[Tensor] = None, donor_maps: Optional[Tensor] = None) -> List[Candidate]:
    """Propose candidate shortcut regions and test each (module docstring); ranked, strongest evidence first.

    Args:
        model, probe_x, probe_y, donor_x, donor_y, seed: as in :func:`check_region`.
        maps: attribution maps of the probe samples ``(N, H, W)`` or ``(N, C, H, W)``; with them an input-independent
            hotspot is also proposed.
        donor_maps: the donors' maps (the same method, each donor's own label); with ``maps`` each sample's
            attribution peak is also proposed (a window where a moving mark the model reads would be).
    """
    config = config if seed is None else replace(config, seed=seed)
    with _context(model), torch.no_grad():
        x, y, dx, dy = _donor_set(model, probe_x, probe_y, donor_x, donor_y, config.batch_size)
        if donor_maps is None and donor_x is None and maps is not None:
            donor_maps = maps  # the probe samples give the content
        proposals = _proposals(x.cpu(), y, dx.cpu(), maps, donor_maps)
        level = discovery_level(config, len(proposals))
        found = []
        for name, (masks, donor_masks) in proposals.items():
            verdict, plan = test_masks(model, x, y, dx, dy, masks, donor_masks, level, selected=name in SELECTED)
            found.append((evidence_rank(name, verdict), Candidate(name, masks, candidate_verdict(name, verdict), plan)))
    return [c for _, c in sorted(found, key=lambda kc: kc[0])]


def _proposals(x: Tensor, y: Tensor, dx: Tensor, maps: Optional[Tensor],
               donor_maps: Optional[Tensor] = None) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Candidate name -> (probe masks, donor masks)."""
    out: Dict[str, Tuple[Tensor, Tensor]] = {}
    for name in DISCOVERY_PRESETS:
        out[name] = (region_masks(name, x), region_masks(name, dx))
    flat, donor_flat = flat_background(x), flat_background(dx)
    if flat is not None:
        none = torch.zeros_like(dx[:, 0], dtype=torch.bool)
        out["flat_background"] = (flat, donor_flat if donor_flat is not None else none)
    out["atypical_corner"] = (atypical_corners(x), atypical_corners(dx))
    stamps = find_stamps(x)
    if stamps is not None:
        out["stamp"] = (stamps.masks, stamp_donor_masks(dx, stamps))
    if maps is not None:
        spot = find_hotspot(maps.detach().float().abs().cpu(), y, inputs=x)
        if spot.mask is not None:
            out["hotspot"] = (region_masks(spot.mask, x), region_masks(spot.mask, dx))
        if donor_maps is not None:
            out["attribution_peak"] = (attribution_peaks(maps), attribution_peaks(donor_maps))
    return out
