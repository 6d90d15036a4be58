"""Shortcut detection in pure torch (imports torch and :mod:`lightning_xai.attribution` only, never Lightning).

Two jobs: :func:`check_region` answers "does the model read class evidence from this region, beyond what ordinary
content gives?" for a region the user names; :func:`discover` proposes candidate regions and tests each. Both are a
*plan* (:func:`plan_interventions`: what to edit, with which donors, placebos and control places), its *run*
(:func:`run_plan`: the forward passes) and a *decision* (:func:`decide`), with the options in one
:class:`ShortcutConfig`. The test, its null hypotheses and where each constant comes from: docs/shortcuts.md.
"""
from lightning_xai.shortcuts._api import Candidate, check_region, discover
from lightning_xai.shortcuts._metrics import region_metrics
from lightning_xai.shortcuts._test import (InterventionPlan, ShortcutConfig, Verdict, decide, plan_interventions,
                                           run_plan)

__all__ = ["Candidate", "InterventionPlan", "ShortcutConfig", "Verdict", "check_region", "decide", "discover",
           "plan_interventions", "region_metrics", "run_plan"]
