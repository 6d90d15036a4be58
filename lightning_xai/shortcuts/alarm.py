"""The shortcut alarm: fires when filling a region moves the predictions clearly more than filling its controls.

The decision rests on the intervention alone. Attribution figures are logged beside it and used to
propose candidate regions, but they neither raise nor veto an alarm: attribution concentration
without an intervention effect is a false alarm (Adebayo et al. 2022,
https://openreview.net/forum?id=xNOVfCCvDpM), and a model was measured that loses half its accuracy
without its shortcut while plain saliency puts less than the region's area share on it.

Rule, with ``d_n = shift_n - mean_k control_shift_{n,k}`` per probe sample (paired by sample), where the
shift is the total variation distance between the predicted distributions before and after the fill
(:func:`~lightning_xai.shortcuts.interventions.intervene`):

.. math:: \text{alarm} \iff \bar d \ge \text{min\_excess} \;\wedge\; \bar d / (s_d / \sqrt{N}) \ge \text{min\_z}
          \;\wedge\; \overline{\max_k \Delta x_{k}} \ge \text{min\_match} \cdot \overline{\Delta x}_{region}

**The training-label gain.** When the swapped-in content comes from labelled training samples (``donors`` of
:func:`~lightning_xai.shortcuts.interventions.intervene`; ShortcutMonitor's ``reference_samples``), each edit also
records ``g_n``, how much it raised the probability of the donor's training label. A learned shortcut raises it:
the region holds what went with that label in training. A passing sensitivity to a bright mark, or a region
coded at random in training, does not; controls on the object raise it a little (object content carries its
label). With ``e_n = g_n - mean_k control_g_{n,k}``:

.. math:: \text{alarm} \iff \big(\text{shift rule} \wedge z_e > -\text{min\_z}\big) \;\vee\;
          \big(\bar\ell \ge \text{min\_log\_gain} \wedge z_\ell \ge \text{min\_z}\big),
          \quad \text{both under the match guard}

where ``l_n`` is the same paired difference for the *log-probability* of the donor's label (``log_gain`` of
:func:`~lightning_xai.shortcuts.interventions.intervene`); without it (older callers) the probability gain fires
instead, ``e_bar >= min_gain`` at ``z_e >= min_z``.

The gain finds shortcuts that move the outputs less than edits on the object do (a watermark on part of one
class: the tag pulls towards its class, the controls move the outputs as much in every direction), and vetoes a
shift alarm whose content clearly goes *against* its training labels. In unknown-region mode the gain only vetoes,
except for a pasted ``"stamp"``. Each sample's figures average ``donor_draws`` donors, so a sample's gain does not
rest on the one donor it drew. The trigger is the gain in log-probability (it does not saturate on samples
confidently predicted as another class); the veto is the gain in probability.

The shift (total variation) is used rather than the share of flipped predictions because it is continuous: while a
shortcut is being learned it moves the outputs before it flips them (flips are still logged). The match condition
keeps the comparison fair: controls that could not change the input at least ``min_match`` times as much as the
region's edit cannot show that the region is special.

Defaults: :data:`MIN_Z` = 3 (a one-sided paired z test at about the 0.1 % level per check); :data:`MIN_EXCESS`,
:data:`MIN_GAIN`, :data:`MIN_LOG_GAIN` and :data:`MIN_MATCH` are minimal effect sizes that were chosen on the
planted-shortcut benchmark ``bench/shortcuts.py``; how, seed by seed, is recorded in ``docs/shortcuts_history.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import Tensor

from lightning_xai._utils import expected

MIN_EXCESS = 0.02
MIN_Z = 3.0
MIN_MATCH = 0.5
MIN_GAIN = 0.01
MIN_LOG_GAIN = 0.02


@dataclass
class AlarmDecision:
    """Outcome of :func:`shortcut_alarm` (plain floats, identical wherever the same inputs are given).

    ``effect`` and ``control_effect`` are the mean per-sample effects of the region's and the controls' fill
    (the output shift, :func:`~lightning_xai.shortcuts.interventions.intervene`'s ``shift``)."""

    fired: bool
    excess: float
    z: float
    effect: float
    control_effect: float
    match: float = float("nan")
    gain_excess: float = float("nan")
    gain_z: float = float("nan")
    log_gain_excess: float = float("nan")
    log_gain_z: float = float("nan")

    def as_dict(self) -> Dict[str, float]:
        return {"alarm": float(self.fired), "excess": self.excess, "z": self.z, "shift": self.effect,
                "control_shift": self.control_effect, "match": self.match, "gain_excess": self.gain_excess,
                "gain_z": self.gain_z, "log_gain_excess": self.log_gain_excess, "log_gain_z": self.log_gain_z}


def _shortcut_alarm_validate_args(effect: Tensor, control_effect: Tensor, min_excess: float, min_z: float) -> None:
    if effect.ndim != 1 or effect.numel() == 0:
        raise ValueError(expected("effect", "a non-empty tensor of shape (N,)", effect))
    if control_effect.ndim != 2 or control_effect.shape[0] != effect.shape[0] or control_effect.shape[1] == 0:
        raise ValueError(expected("control_effect", f"a tensor of shape ({effect.shape[0]}, K) with K >= 1", control_effect))
    if not (isinstance(min_excess, (int, float)) and 0 < min_excess <= 1):
        raise ValueError(expected("min_excess", "a float in (0, 1]", min_excess))
    if not (isinstance(min_z, (int, float)) and min_z >= 0):
        raise ValueError(expected("min_z", "a float >= 0", min_z))


def paired_z(d: Tensor) -> Tuple[float, float]:
    """Mean of paired differences ``(N,)`` and its z-score (standard error floored at ``1 / N``), the statistic every
    figure of :func:`shortcut_alarm` is judged by.

    Example:
        >>> import torch
        >>> excess, z = paired_z(0.1 + 0.5 * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(50))
        >>> round(excess, 3), round(z, 2)
        (0.1, 1.99)
        >>> excess, z = paired_z(torch.full((100,), 0.02, dtype=torch.float64))  # no spread: the floor 1/N keeps z finite
        >>> round(excess, 3), round(z, 2)
        (0.02, 2.0)
    """
    n = d.numel()
    excess = float(d.mean())
    se = max(float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0, 1.0 / n)
    return excess, excess / se


def _gain_z(name: str, gain: Tensor, control_gain: Tensor, effect: Tensor,
            control_effect: Tensor) -> Tuple[float, float]:
    """:func:`paired_z` of a gain ``(N,)`` minus its controls' mean ``(N, K)``, after checking the shapes against the
    effect's (``name``: the argument's name in :func:`shortcut_alarm`)."""
    if gain.shape != effect.shape or control_gain.shape != control_effect.shape:
        raise ValueError(expected(f"{name}, control_{name}", f"tensors of shapes {tuple(effect.shape)} and "
                                  f"{tuple(control_effect.shape)}", (tuple(gain.shape), tuple(control_gain.shape))))
    return paired_z(gain.double() - control_gain.double().mean(1))


def shortcut_alarm(effect: Tensor, control_effect: Tensor, min_excess: float = MIN_EXCESS, min_z: float = MIN_Z,
                   change: Optional[Tensor] = None, control_change: Optional[Tensor] = None,
                   min_match: float = MIN_MATCH, gain: Optional[Tensor] = None,
                   control_gain: Optional[Tensor] = None, min_gain: float = MIN_GAIN,
                   gain_fires: bool = True, log_gain: Optional[Tensor] = None,
                   control_log_gain: Optional[Tensor] = None, min_log_gain: float = MIN_LOG_GAIN) -> AlarmDecision:
    """Decide whether a region is a shortcut from per-sample intervention outcomes.

    Args:
        effect: ``(N,)`` per-sample effect in ``[0, 1]`` of filling the region: the output shift
            (total variation distance between the predicted distributions before and after) or 1.0 where
            the prediction flipped.
        control_effect: ``(N, K)`` the same for ``K`` control regions.
        min_excess: smallest mean excess of the region's effect over its controls'.
        min_z: smallest paired z-score of that excess (its standard error is ``s_d / sqrt(N)``,
            floored at ``1 / N`` so that identical outcomes do not divide by zero).
        change, control_change: the input change ``(N,)`` and ``(N, K)`` the fills made (from
            :func:`~lightning_xai.shortcuts.interventions.intervene`). When given, the comparison counts
            only if the best-matched controls changed the input at least ``min_match`` times as much as
            the region did (``match`` = mean over samples of the largest control change / mean region
            change); otherwise no alarm: a larger region edit moving the outputs more says nothing about a shortcut.
        gain, control_gain: ``(N,)`` and ``(N, K)``: how much each edit raised the probability of the label of the
            sample whose content was pasted in (a training sample, see ``donors`` of
            :func:`~lightning_xai.shortcuts.interventions.intervene`). When given, a shift alarm is vetoed when the
            region's gain falls short of the controls' at ``z <= -min_z``; without ``log_gain`` the alarm also fires
            when the region's gain exceeds the controls' by ``min_gain`` at ``z >= min_z`` (see the module docstring).
        min_gain: smallest mean excess of the region's gain over its controls' (used to fire without ``log_gain``).
        gain_fires: whether the gain alone can fire (``False``: it only vetoes, as for the many candidate regions of
            unknown-region mode, where a second trigger per candidate raised clean-model false alarms).
        log_gain, control_log_gain: ``(N,)`` and ``(N, K)``: the same pull measured on the log-probability of the
            donor's label (:func:`~lightning_xai.shortcuts.interventions.intervene`'s ``log_gain``). When given, it is
            the gain that fires (excess ``>= min_log_gain`` at ``z >= min_z``): it does not saturate on samples
            confidently predicted as another class, so it reaches ``z >= min_z`` earlier (see the module docstring).
        min_log_gain: smallest mean excess of the region's log gain over its controls' (in nats).

    Returns:
        :class:`AlarmDecision` (``fired``, ``excess``, ``z``, ``effect``, ``control_effect``, ``match``, ``gain_excess``,
        ``gain_z``, ``log_gain_excess``, ``log_gain_z``).

    Example:
        >>> import torch
        >>> effect = torch.tensor([1.0] * 30 + [0.0] * 10)
        >>> shortcut_alarm(effect, torch.zeros(40, 4)).fired
        True
        >>> shortcut_alarm(effect, torch.ones(40, 4)).fired  # controls move the outputs as much: no alarm
        False
    """
    _shortcut_alarm_validate_args(effect, control_effect, min_excess, min_z)
    excess, z = paired_z(effect.double() - control_effect.double().mean(1))
    match = float("nan")
    if change is not None and control_change is not None:
        match = float(control_change.double().amax(1).mean()) / max(float(change.double().mean()), 1e-12)
    fired = excess >= min_excess and z >= min_z
    gain_excess = gain_z = float("nan")
    if gain is not None and control_gain is not None:
        if not (isinstance(min_gain, (int, float)) and 0 < min_gain <= 1):
            raise ValueError(expected("min_gain", "a float in (0, 1]", min_gain))
        gain_excess, gain_z = _gain_z("gain", gain, control_gain, effect, control_effect)
        fired = fired and gain_z > -min_z
        if log_gain is None:
            fired = fired or (gain_fires and gain_excess >= min_gain and gain_z >= min_z)
    log_excess = log_z = float("nan")
    if log_gain is not None or control_log_gain is not None:
        if log_gain is None or control_log_gain is None:
            given = tuple(None if t is None else tuple(t.shape) for t in (log_gain, control_log_gain))
            raise ValueError(expected("log_gain, control_log_gain", "both tensors, or neither", given))
        if not (isinstance(min_log_gain, (int, float)) and min_log_gain > 0):
            raise ValueError(expected("min_log_gain", "a float > 0", min_log_gain))
        log_excess, log_z = _gain_z("log_gain", log_gain, control_log_gain, effect, control_effect)
        fired = fired or (gain_fires and log_excess >= min_log_gain and log_z >= min_z)
    fired = fired and not match < min_match
    return AlarmDecision(bool(fired), excess, z, float(effect.double().mean()), float(control_effect.double().mean()), match,
                         gain_excess, gain_z, log_excess, log_z)

