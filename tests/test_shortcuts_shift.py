"""The output-shift alarm, stretched swaps and change-matched controls for per-sample regions (a background),
the flat-background candidate and the eta^2 gate of hotspots, on hand-built data and models."""

import pytest
import torch
from torch import nn

from helpers import assert_unchanged, snapshot
from lightning_xai.shortcuts.alarm import shortcut_alarm
from lightning_xai.shortcuts.hotspots import find_hotspot, flat_background
from lightning_xai.shortcuts.interventions import change_matched_sets, intervene, swap_partners, transplant


def background_set(n=80, seed=0):
    """8x8 images: a class-coded flat background (level 0.05 + 0.1 y) and a per-sample blob of noisy ink that
    encodes the class too (its mean brightness), with its own size, so the background masks differ in area."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = (0.05 + 0.1 * y.float()).view(n, 1, 1, 1).expand(n, 1, 8, 8).clone()
    masks = torch.ones(n, 8, 8, dtype=torch.bool)
    for i in range(n):
        side = 3 + i % 3
        top, left = int(torch.randint(0, 8 - side + 1, (1,), generator=g)), int(torch.randint(0, 8 - side + 1, (1,), generator=g))
        ink = 0.6 + 0.1 * float(y[i]) + 0.05 * torch.rand(side, side, generator=g)
        x[i, 0, top:top + side, left:left + side] = ink
        masks[i, top:top + side, left:left + side] = False
    return x, y, masks


class LevelReader(nn.Module):
    """Hand-built: reads the class from the darkest pixels (the background, ``uses=True``) or the brightest (the ink)."""

    def __init__(self, uses: bool) -> None:
        super().__init__()
        self.uses = uses
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        flat = x.flatten(1)
        v = flat.min(1).values if self.uses else flat.max(1).values - 0.55
        centres = 0.05 + 0.1 * torch.arange(4, dtype=x.dtype, device=x.device)
        return -self.scale * (v.unsqueeze(1) - centres) ** 2 * 2000


def test_transplant_stretches_the_partners_region_content():
    x, _, masks = background_set(6)
    partners = torch.tensor([1, 2, 3, 4, 5, 0])
    out = transplant(x, masks, partners)
    for i, j in enumerate(partners.tolist()):
        got = out[i, 0][masks[i]]
        assert torch.allclose(got, torch.full_like(got, float(x[j, 0][masks[j]][0])))  # the partner's background only
        assert torch.equal(out[i, 0][~masks[i]], x[i, 0][~masks[i]])  # the object is untouched
    # equal areas: raster order, exactly the partner's pixels
    box = torch.zeros(6, 8, 8, dtype=torch.bool)
    box[:, :2, :2] = True
    assert torch.equal(transplant(x, box, partners)[:, :, :2, :2], x[partners][:, :, :2, :2])


def test_swap_partner_with_unequal_areas_differs_most():
    x, y, masks = background_set(8)
    partners = swap_partners(x, masks, torch.Generator().manual_seed(0))
    level = y.float()
    assert torch.equal((level[partners] - level).abs(), torch.maximum(level, 3 - level))  # the farthest background level


def test_change_matched_sets_disjoint_and_matched():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, :5] = True  # 40 pixels: no shifted copy fits
    change = torch.full((8, 8), 0.5)
    sets = change_matched_sets(mask, change, target=3.0, count=4, generator=torch.Generator().manual_seed(0))
    assert sets.shape == (4, 8, 8) and not bool((sets & mask).any())
    assert torch.equal(sets.flatten(1).sum(1), torch.full((4,), 6))  # 6 pixels x 0.5 = the target change


@pytest.mark.parametrize("uses", [True, False], ids=["reads_background", "reads_ink"])
def test_background_alarm_on_per_sample_masks(uses):
    x, y, masks = background_set()
    model = LevelReader(uses)
    before = snapshot(model)
    out = intervene(model, x, masks, y, num_controls=6, generator=torch.Generator().manual_seed(0))
    assert_unchanged(before, model)
    assert bool(((out["shift"] >= 0) & (out["shift"] <= 1 + 1e-6)).all())
    assert not bool((out["control_change"] > 1.5 * out["change"].unsqueeze(1) + 1e-6).any())  # no control edits far more
    decision = shortcut_alarm(out["shift"], out["control_shift"], change=out["change"], control_change=out["control_change"])
    assert decision.fired == uses
    if not uses:
        assert decision.effect < 1e-3  # the ink reader does not care about the background at all


def test_shift_alarm_needs_more_than_the_controls():
    n = 200
    effect = torch.full((n,), 0.3)
    assert shortcut_alarm(effect, torch.full((n, 4), 0.2)).fired
    assert not shortcut_alarm(effect, torch.full((n, 4), 0.3)).fired  # as large as the controls'
    assert not shortcut_alarm(effect, torch.full((n, 4), 0.295)).fired  # consistent but below min_excess
    noisy = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 0.1
    assert not shortcut_alarm(noisy, torch.full((n, 4), 0.05)).fired  # mean excess 0 (noise only)
    # controls that could not change the input comparably: no verdict however large the effect
    d = shortcut_alarm(effect, torch.zeros(n, 4), change=torch.ones(n), control_change=torch.full((n, 4), 0.2))
    assert not d.fired and d.match == pytest.approx(0.2)


def test_flat_background_candidate():
    x, _, masks = background_set(10)
    assert torch.equal(flat_background(x), masks)
    noise = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert flat_background(noise) is None


def test_hotspot_dropped_where_the_content_tells_the_classes_apart():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    maps = torch.rand(40, 1, 8, 8, generator=g) * 0.2
    maps[:, 0, 6:, :2] += 1.5  # every class attends to the bottom-left corner
    x = torch.rand(40, 1, 8, 8, generator=g) * 0.2
    assert find_hotspot(maps, labels, inputs=x).mask is not None  # the content there is class-independent noise
    x[:, 0, 6:, :2] = (labels.float() / 3).view(-1, 1, 1)  # now the corner shows the class: it is the object
    assert find_hotspot(maps, labels, inputs=x).mask is None
