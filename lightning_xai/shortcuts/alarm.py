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
class: the tag pulls towards class 0, the controls move the outputs as much in every direction), and vetoes a
shift alarm whose content clearly goes *against* its training labels. Measured with ``bench/shortcuts.py``'s
known regions (seeds 0-8 used to design it, 9-14 held out, 5 epochs, 4 variants, both validation splits): the
shift rule alone detected 115 of 120 shortcut runs with 2 false alarms on 120 clean runs (a random-corner model
after one epoch, 33 % accurate, shift z 9.2, gain z -4.5); with the gain 120 of 120 and 0 false alarms. Over the
clean checks of seeds 0-8 the gain's largest z was 2.7 (excess +0.041). In unknown-region mode, where each of up
to six candidate regions is checked, the gain only vetoes: as a second trigger it fired on clean background models
(seeds 3-5). The gain is slower to reach z >= 3 than the shift on some early epochs, so the shift stays: 54 of 60
gap epochs were on time with both, 53 with the shift alone.
:data:`MIN_GAIN` = 0.01 mirrored :data:`MIN_EXCESS` of the time; no threshold was tuned on the held-out seeds.

Several donors per sample (``donor_draws`` of :func:`~lightning_xai.shortcuts.interventions.intervene`, 4 in
ShortcutMonitor), designed on seeds 6-11 of the callback's benchmark runs: a single donor's content makes the gain of
a sample depend on which donor it drew. With one donor, a clean watermark model (seed 8) reached gain z 3.2 (excess
+0.047, a false alarm); averaged over four, the clean watermark models' largest gain z over seeds 0-11 fell from 3.1
to -0.3, and the watermark model of seed 10 reached gain z >= 3 three epochs earlier. A veto of the gain by a
clearly negative shift (z <= -3) was tried against that false alarm: with four donors it acted on no check of
seeds 0-11, and on seed 12 it held back a watermark model whose tag moved the outputs less than the controls (shift
z -4.7, gain z 3.8), which is what the gain is for, so it was dropped; over the clean-model checks of seeds 0-14 with
four donors (600 known-region checks, and the decisive candidate of 600 unknown-region ones) no gain reached z 3
(largest 2.5, an unknown-region candidate, where the gain only vetoes).

**The trigger in log-probability, the veto in probability.** A tag that pulls towards class 0 raises p(0) by
little on a sample confidently predicted as another class (the probability saturates), but its log-probability by
as much as anywhere. Measured on the known-region checks of ``bench/shortcuts.py``'s models, seeds 0-17, replayed
offline (4 donors; 720 checks of shortcut models, 720 of clean ones): with the probability gain as the trigger 4 of
72 alarms came after the gap epoch, with the log-probability gain 2 (the watermarks of seeds 2 and 12, log gain z
4.3 and 4.1 at their gap epochs where the probability gain had 2.7 and 0.8; in the benchmark itself both fire at
epoch 0); the clean models' largest z fell from -0.5 to -4.3. As a veto the log gain would be too strict: it fell
to z <= -3 under 11 shift alarms of shortcut models at epochs 0-1, against the 3 clean-model alarms the veto exists
for, so the probability gain keeps the veto. The change of the *centred logit* (the logit minus the mean logit) was
also measured: as good on the benchmark's regions, but on user-named presets (``border``, ``corners``,
``top_left``, ``bottom_right`` on the clean models of seeds 0-5, 480 checks) it fired on 45 (the logit of a class
the model does not consider can move without changing any probability), the log-probability gain on 2 and the
probability gain on 7 (a named corner that holds digit strokes on some samples carries their label: a limitation
of every gain). :data:`MIN_LOG_GAIN` = 0.02 nats lies between the clean models' largest excess (-0.017) and the
smallest excess of a shortcut check reaching z 3 (+0.022).

The shift is used rather than the share of flipped predictions because it is continuous: while a
shortcut is being learned it moves the outputs before it flips them, and on clean models the change-matched
controls keep it at or below the region's (flips are still logged). The last condition (checked when the
input changes are given) keeps the comparison fair: controls that could not change the input at least half
as much as the region's edit did (painting a whole background white, with only small regions left
elsewhere) cannot show that the region is special.

Defaults (:data:`MIN_EXCESS` = 0.02, :data:`MIN_Z` = 3.0, :data:`MIN_MATCH` = 0.5) come from
``bench/shortcuts.py`` (planted-shortcut digits, 4 variants x 3 seeds x 5 epochs, shortcut absent from
and present in validation, 256 probe samples, swap fill, 8 change-matched controls). Over the first 120
known-region checks of clean models the largest excess was +0.002 and the largest z 0.6; a run with 512
probe samples reached +0.008 and z 2.7 (a random-corner model after one epoch), so an alarm needs an excess
of at least 0.01 *and* z >= 3. The threshold became 0.02 when the controls stopped covering the swap partner's own
region (:mod:`~lightning_xai.shortcuts.interventions`): with the cleaner controls, over the 960 known-region checks
of clean models of seeds 0-23, the largest excess at z >= 3 that the gain does not veto was +0.013 (a random-corner
model after one epoch, z 3.3, gain z -0.9); every threshold from 0.015 to 0.035 gave the same alarms on those seeds
(no false alarm, every shortcut found, every known-region alarm by the validation gap), 0.01 fired on that model
and 0.04 made three alarms an epoch late. Seeds 24-29, run after the choice: the same, the closest clean check
+0.016 at z 4.0. By the last epoch (seeds 0-29) the learned shortcuts other than the watermark reached excess 0.11-0.90 at z
4.9-130 (the watermarks, found by the gain: -0.02-0.26). ``MIN_MATCH`` = 0.5 is what removed the unknown-region
false alarms of flat-background candidates on noisy clean digits (their best controls reached 0.29-0.31 of the
region's input change); every known-region check of the benchmark has a match of at least 0.70 (the random corner,
whose controls stay off the partner's mark; 0.80 for the others).

Logit-scale effects (the largest change of a centred log-probability, or its L2 norm) were measured against the
shift on the same checks, seeds 0-5 (``bench/shortcut_effects.py``): the largest one reached z >= 3 at every gap
epoch where the shift missed 3 of 24, but also on 2 of 240 clean-model checks (clean random-corner models after one
epoch, z up to 5.3, where the shift's largest z was 2.3). The shift is kept: a late alarm costs an epoch, a false
alarm with ``action="stop"`` costs the run.
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

