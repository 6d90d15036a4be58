"""Shortcut detection in pure torch: region masks, region metrics, interventions, the alarm rule, SpRAy
clustering, input-independent hotspots, per-sample corner candidates (atypical corners, stamps) and the parameter-randomisation check.

Imports torch only (and :mod:`lightning_xai.attribution`), never Lightning.
"""
from lightning_xai.shortcuts._api import Candidate, check_region, discover
from lightning_xai.shortcuts._test import InterventionPlan, ShortcutConfig, Verdict, decide, plan_interventions, run_plan
from lightning_xai.shortcuts.alarm import MIN_EXCESS, MIN_MATCH, MIN_Z, AlarmDecision, paired_z, shortcut_alarm
from lightning_xai.shortcuts.corners import (StampResult, atypical_corners, corner_side, corner_windows, find_stamps,
                                             stamp_donor_masks)
from lightning_xai.shortcuts.hotspots import MAX_ETA2, HotspotResult, class_eta2, consistency_map, find_hotspot, flat_background
from lightning_xai.shortcuts.interventions import (FILLS, PLACEMENTS, change_matched_sets, control_masks, fill_source, intervene,
                                                   intervention_summary, swap_partners, transplant)
from lightning_xai.shortcuts.metrics import attribution_share, pointing_game, region_metrics, relevance_rank, share_ratio
from lightning_xai.shortcuts.regions import (PRESETS, SUSPECTS, box_mask, component_shifts, connected_components, iou,
                                             normalize_regions, preset_mask, region_masks, scattered, shifted_copies, translates)
from lightning_xai.shortcuts.sanity import SANITY_THRESHOLD, SanityResult, randomisation_check, spearman
from lightning_xai.shortcuts.spray import SprayResult, class_mean_maps, downsample_maps, spray, spray_by_class

__all__ = [
    "Candidate", "InterventionPlan", "ShortcutConfig", "Verdict", "check_region", "decide", "discover",
    "plan_interventions", "run_plan",
    "FILLS", "MAX_ETA2", "MIN_EXCESS", "MIN_MATCH", "MIN_Z", "PLACEMENTS", "PRESETS", "SANITY_THRESHOLD", "SUSPECTS",
    "AlarmDecision", "HotspotResult", "SanityResult", "SprayResult", "StampResult", "atypical_corners", "attribution_share",
    "box_mask", "component_shifts", "connected_components", "corner_side", "corner_windows", "find_stamps", "stamp_donor_masks",
    "change_matched_sets", "class_eta2", "class_mean_maps", "consistency_map", "control_masks", "downsample_maps",
    "fill_source", "find_hotspot", "flat_background", "intervene", "intervention_summary", "iou",
    "normalize_regions", "paired_z", "pointing_game", "preset_mask", "randomisation_check", "region_masks", "region_metrics",
    "relevance_rank", "scattered", "share_ratio", "shifted_copies", "shortcut_alarm", "spearman", "spray",
    "spray_by_class", "swap_partners", "translates", "transplant",
]
