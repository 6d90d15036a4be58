"""Pure-torch shortcut core: region specs, metrics against hand-computed values, interventions on hand-built
models, the alarm rule, SpRAy, hotspots and the randomisation check."""

import pytest
import torch
from torch import nn

from helpers import assert_unchanged, snapshot, small_cnn
from lightning_xai.shortcuts.alarm import shortcut_alarm
from lightning_xai.shortcuts.hotspots import find_hotspot
from lightning_xai.shortcuts.interventions import control_masks, intervene, intervention_summary, swap_partners
from lightning_xai.shortcuts.metrics import attribution_share, pointing_game, region_metrics, relevance_rank, share_ratio
from lightning_xai.shortcuts.regions import (component_shifts, connected_components, iou, normalize_regions, preset_mask, region_masks,
                                             shifted_copies, translates)
from lightning_xai.shortcuts.sanity import randomisation_check, spearman
from lightning_xai.shortcuts.spray import spray


# --------------------------------------------------------------------------- regions
@pytest.mark.parametrize("spec, expected_sum", [
    pytest.param("border", 28, id="border"),
    pytest.param("corners", 16, id="corners"),
    pytest.param("top_left", 4, id="top_left"),
    pytest.param("center", 16, id="center"),
    pytest.param((1, 2, 3, 2), 6, id="box"),
    pytest.param(torch.eye(8), 8, id="tensor"),
    pytest.param(lambda x: x[:, 0] > 0.5, None, id="callable"),
])
def test_region_masks(spec, expected_sum):
    x = torch.rand(3, 1, 8, 8)
    masks = region_masks(spec, x)
    assert masks.shape == (3, 8, 8) and masks.dtype == torch.bool
    if expected_sum is not None:
        assert int(masks[0].sum()) == expected_sum
    else:
        assert torch.equal(masks, x[:, 0] > 0.5)


def test_region_errors():
    with pytest.raises(ValueError, match="presets"):
        preset_mask("nowhere", (8, 8))
    with pytest.raises(ValueError, match="Expected `region 'a'`"):
        normalize_regions({"a": torch.zeros(8, 8)})
    with pytest.raises(TypeError):
        normalize_regions(3.0)
    with pytest.raises(ValueError, match="shape"):
        region_masks(torch.ones(5, 8, 8), torch.rand(3, 1, 8, 8))
    assert list(normalize_regions("border")) == ["border"]
    assert list(normalize_regions((0, 0, 2, 2))) == ["region"]


def test_translates_equal_area_and_disjoint():
    mask = preset_mask("top_left", (8, 8))
    cands = translates(mask, max_candidates=100)
    assert cands.shape[0] == 49 - 4  # 7x7 in-bounds shifts minus the 4 (incl. no shift) that overlap the 2x2
    assert bool((cands.flatten(1).sum(1) == 4).all())
    assert not bool((cands & mask).any())
    ring = translates(preset_mask("border", (8, 8)), max_candidates=5, generator=torch.Generator().manual_seed(0))
    assert ring.shape[0] == 5 and bool((ring.flatten(1).sum(1) == 28).all())  # scattered fallback, equal area


def pieces(mask):
    """The 8-connected pieces of ``mask (H, W)`` as sorted (height, width, pixels) keys of their bounding-box crops."""
    labels, count = connected_components(mask)
    out = []
    for c in range(1, count + 1):
        piece = labels == c
        rows, cols = piece.any(1).nonzero().view(-1), piece.any(0).nonzero().view(-1)
        crop = piece[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
        out.append((crop.shape[0], crop.shape[1], tuple(crop.flatten().tolist())))
    return sorted(out)


def test_connected_components_hand_made():
    labels, count = connected_components(preset_mask("corners", (8, 8)))
    assert count == 4
    assert labels[0, 0] == 1 and labels[0, 7] == 2 and labels[7, 0] == 3 and labels[7, 7] == 4 and labels[3, 3] == 0
    assert [int((labels == c).sum()) for c in range(1, 5)] == [4, 4, 4, 4]
    diagonal = torch.eye(5, dtype=torch.bool)  # touching at corners only: one piece under 8-connectivity
    assert connected_components(diagonal)[1] == 1
    gap = torch.zeros(5, 5, dtype=torch.bool)
    gap[0, 0] = gap[0, 2] = gap[4, 4] = True
    labels, count = connected_components(gap)
    assert count == 3 and labels[0, 2] == 2 and labels[4, 4] == 3
    assert connected_components(torch.zeros(4, 4, dtype=torch.bool))[1] == 0
    assert connected_components(preset_mask("border", (8, 8)))[1] == 1


def odd_pieces():
    """8x8: an L (3 px), a 1x3 bar and a single pixel, spread so that no shifted copy of the whole fits."""
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 0] = mask[1, 0] = mask[1, 1] = True
    mask[7, 4:7] = True
    mask[3, 7] = True
    return mask


@pytest.mark.parametrize("mask", [pytest.param(preset_mask("corners", (8, 8)), id="corners"),
                                  pytest.param(odd_pieces(), id="odd_pieces")])
def test_component_shifts_move_each_piece(mask):
    assert shifted_copies(mask) is None  # the case component_shifts is for
    cands = component_shifts(mask, max_candidates=20, generator=torch.Generator().manual_seed(0))
    assert cands.shape == (20, 8, 8) and cands.dtype == torch.bool
    assert torch.equal(cands.flatten(1).sum(1), torch.full((20,), int(mask.sum())))  # the region's area
    assert not bool((cands & mask).any())  # off the region
    for cand in cands:
        assert pieces(cand) == pieces(mask)  # the same pieces, moved
    layers = component_shifts(mask, max_candidates=20, generator=torch.Generator().manual_seed(0), by_piece=True)
    labels, count = connected_components(mask)
    assert layers.shape == (20, count, 8, 8) and torch.equal(layers.any(1), cands)
    assert len({str(layer.flatten().tolist()) for layer in layers}) == 20  # distinct layouts of the pieces
    for p in range(count):  # layer p is piece p + 1, moved
        assert all(pieces(layer) == pieces(labels == p + 1) for layer in layers[:, p])
    again = component_shifts(mask, max_candidates=20, generator=torch.Generator().manual_seed(0))
    other = component_shifts(mask, max_candidates=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cands, again) and not torch.equal(cands, other)


def test_large_pieces_placements_match_brute_force():
    from lightning_xai.shortcuts import regions

    g = torch.Generator().manual_seed(0)
    occupied = torch.rand(3, 12, 12, generator=g) < 0.15
    for piece in (torch.ones(5, 5, dtype=torch.bool), torch.rand(3, 4, generator=g) < 0.6):  # counted / pixel by pixel
        got = regions._misses(occupied, piece)
        h, w = piece.shape
        want = torch.tensor([[[not bool((occupied[b, r:r + h, c:c + w] & piece).any()) for c in range(12 - w + 1)]
                              for r in range(12 - h + 1)] for b in range(3)])
        assert torch.equal(got, want)
    mask = torch.zeros(16, 16, dtype=torch.bool)  # two 5x5 squares (25 px each), no shifted copy of the whole fits
    mask[:5, :5] = mask[11:, 11:] = True
    mask[:5, 11:] = True
    assert shifted_copies(mask) is None
    regions._PIECES.clear()
    cands = component_shifts(mask, max_candidates=10, generator=torch.Generator().manual_seed(0))
    cached = component_shifts(mask, max_candidates=10, generator=torch.Generator().manual_seed(0))
    assert len(regions._PIECES) == 1 and torch.equal(cands, cached)  # the pieces are worked out once
    assert cands.shape[0] >= 1 and not bool((cands & mask).any())
    for cand in cands:
        assert pieces(cand) == pieces(mask)  # three 5x5 squares, moved apart from each other


def test_component_shifts_none():
    assert component_shifts(preset_mask("top_left", (8, 8))) is None  # one piece
    assert component_shifts(preset_mask("border", (8, 8))) is None  # a ring is one piece
    block = torch.zeros(4, 4, dtype=torch.bool)
    block[:, 0] = block[:, 2:] = True  # a 4x1 bar and a 4x2 block: the block has no place off the region
    assert component_shifts(block) is None
    bars = torch.zeros(3, 3, dtype=torch.bool)
    bars[:, 0] = bars[:, 2] = True  # two 3x1 bars: each fits on the middle column only, so never both at once
    assert component_shifts(bars, generator=torch.Generator().manual_seed(0)) is None
    rng = torch.get_rng_state()
    component_shifts(preset_mask("corners", (8, 8)), 4, torch.Generator().manual_seed(0))
    assert torch.equal(rng, torch.get_rng_state())  # private randomness only
    assert translates(preset_mask("corners", (8, 8)), 4, torch.Generator().manual_seed(0)).flatten(1).sum(1).tolist() == [16] * 4


@pytest.mark.parametrize("placement", ["matched", "random"])
def test_controls_of_corners_are_compact(placement):
    """The four corners fit no shifted copy: their controls are four 2x2 squares elsewhere (not scattered pixels),
    and ``"matched"`` picks among them the one whose input change is closest to the region's."""
    masks = region_masks("corners", torch.zeros(5, 1, 8, 8))
    change = torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(2))
    ctrl = control_masks(masks, change, 6, placement, torch.Generator().manual_seed(0))
    assert ctrl.shape == (5, 6, 8, 8) and not bool((ctrl & masks.unsqueeze(1)).any())
    square = [(2, 2, (True,) * 4)] * 4
    assert all(pieces(c) == square for c in ctrl.flatten(0, 1))
    if placement == "matched":  # matched piece by piece: each moved square against its own corner's change
        moved = component_shifts(masks[0], 256, torch.Generator().manual_seed(0), by_piece=True, attempts=256)  # control_masks'
        assert moved.shape[0] > 64  # draws: every distinct layout of 4 * max_candidates draws, a pool for per-piece matching
        labels, _ = connected_components(masks[0])
        differs = []
        for i in range(5):
            own = torch.stack([(change[i] * (labels == p)).sum() for p in range(1, 5)])  # (4,)
            gap = (torch.einsum("sphw,hw->sp", moved.float(), change[i]) - own).abs().sum(1)  # (S,)
            assert torch.equal(ctrl[i, 0], moved[gap.argmin()].any(0))  # the closest first
            total = (torch.einsum("shw,hw->s", moved.any(1).float(), change[i]) - own.sum()).abs()
            differs.append(bool(gap.argmin() != total.argmin()))
        assert any(differs)  # (not the picks of matching the total change only)


# --------------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    maps = torch.tensor([[[4.0, 1.0, 0.0, 0.0],
                          [1.0, 2.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 2.0]]]).unsqueeze(1)  # (1, 1, 4, 4), total 10
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # holds 4 + 1 + 1 + 2 = 8
    assert attribution_share(maps, mask).item() == pytest.approx(0.8)
    assert share_ratio(maps, mask).item() == pytest.approx(0.8 / (4 / 16))
    # top-4 pixels: 4, 2 (in), 2 (out, at (3,3)), then one of the 1s (in): ties resolved by pixel order
    assert relevance_rank(maps, mask).item() == pytest.approx(0.75)
    assert pointing_game(maps, mask).item() == 1.0
    assert pointing_game(maps, ~mask).item() == 0.0
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert torch.isnan(attribution_share(maps, empty)).all()
    out = region_metrics(-maps, mask)  # absolute relevance: the sign does not matter
    assert out["share"].item() == pytest.approx(0.8)


# --------------------------------------------------------------------------- interventions
class CornerModel(nn.Module):
    """Hand-built: class = brightness of the top-left 2x2 corner (``uses=True``) or of the centre (``uses=False``)."""

    def __init__(self, uses: bool) -> None:
        super().__init__()
        self.uses = uses
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        v = x[:, 0, :2, :2].mean((1, 2)) if self.uses else x[:, 0, 3:5, 3:5].mean((1, 2))
        centres = torch.linspace(0, 1, 5, device=x.device)
        return -self.scale * (v.unsqueeze(1) - centres) ** 2 * 50


def corner_data(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2
    y = torch.arange(n) % 5
    level = y.float() / 4
    x[:, 0, :2, :2] = level.view(-1, 1, 1)
    x[:, 0, 3:5, 3:5] = level.view(-1, 1, 1)  # the "object" encodes the class too
    return x, y


@pytest.mark.parametrize("fill", ["swap", "mean"])
def test_intervention_on_model_using_region(fill):
    x, y = corner_data()
    masks = region_masks("top_left", x)
    model = CornerModel(uses=True)
    before = snapshot(model)
    out = intervene(model, x, masks, y, fill=fill, num_controls=4, generator=torch.Generator().manual_seed(0))
    assert_unchanged(before, model)
    summary = intervention_summary(out)
    assert summary["acc"] == 1.0
    assert summary["flip_rate"] >= 0.7 and summary["acc_drop"] >= 0.7
    assert summary["control_flip_rate"] == 0.0  # the controls never touch the corner
    assert shortcut_alarm(out["flip"], out["control_flip"]).fired
    assert shortcut_alarm(out["shift"], out["control_shift"], change=out["change"], control_change=out["control_change"]).fired


def test_intervention_on_model_ignoring_region():
    x, y = corner_data()
    masks = region_masks("top_left", x)
    out = intervene(CornerModel(uses=False), x, masks, y, num_controls=8, placement="matched",
                    generator=torch.Generator().manual_seed(0))
    summary = intervention_summary(out)
    assert summary["flip_rate"] == 0.0 and summary["acc_drop"] == 0.0
    assert summary["control_flip_rate"] > 0.0  # matched controls land on the centre, which the model reads
    assert not shortcut_alarm(out["flip"], out["control_flip"]).fired
    assert float(out["shift"].max()) < 1e-6  # the model does not read the corner: its outputs do not move at all
    assert not shortcut_alarm(out["shift"], out["control_shift"], change=out["change"], control_change=out["control_change"]).fired


def test_swap_partner_differs_most():
    x = torch.zeros(3, 1, 4, 4)
    x[0, 0, 0, 0], x[1, 0, 0, 0], x[2, 0, 0, 0] = 0.0, 0.4, 1.0
    masks = region_masks((0, 0, 1, 1), x)
    assert swap_partners(x, masks).tolist() == [2, 2, 0]


def test_controls_matched_and_private_rng():
    x, _ = corner_data(10)
    masks = region_masks("top_left", x)
    change = torch.zeros(10, 8, 8)
    change[:, 6:, 6:] = 1.0  # only the bottom-right 2x2 changes as much as the region
    change[:, :2, :2] = 1.0
    rng = torch.get_rng_state()
    ctrl = control_masks(masks, change, 3, "matched", torch.Generator().manual_seed(0))
    assert torch.equal(rng, torch.get_rng_state())
    assert bool(ctrl[:, 0, 6:, 6:].all())  # best match first
    assert not bool((ctrl & masks.unsqueeze(1)).any())


@pytest.mark.parametrize("fill, placement, region", [
    pytest.param("swap", "matched", "box", id="swap-matched-box"),
    pytest.param("swap", "matched", "background", id="swap-matched-background"),
    pytest.param("mean", "random", "box", id="mean-random-box"),
    pytest.param("blur", "matched", "background", id="blur-matched-background"),
])
def test_intervention_shares_add_up_to_the_whole_set(fill, placement, region):
    """Split invariance: the rows of a split run (plan on the whole set, model on a share, as each DDP rank does)
    put together are the whole-set run, whatever the split; so the figures do not depend on the process count."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    x, y = torch.rand(9, 1, 8, 8), torch.randint(0, 5, (9,))
    masks = region_masks((0, 0, 2, 3), x) if region == "box" else torch.rand(9, 8, 8) > 0.6  # unequal areas
    kwargs = dict(fill=fill, placement=placement, num_controls=3)
    whole = intervene(net, x, masks, y, generator=torch.Generator().manual_seed(5), **kwargs)
    for split in ([(0, 5), (5, 9)], [(0, 3), (3, 6), (6, 9)], [(8, 9)]):
        parts = [intervene(net, x, masks, y, generator=torch.Generator().manual_seed(5), rows=r, **kwargs) for r in split]
        start, stop = split[0][0], split[-1][1]
        for key, value in whole.items():
            got = torch.cat([p[key] for p in parts])
            assert got.shape == value[start:stop].shape, key
            assert torch.allclose(got.float(), value[start:stop].float(), atol=1e-6), (split, key)
    with pytest.raises(ValueError, match="rows"):
        intervene(net, x, masks, y, rows=(4, 4))
    with pytest.raises(ValueError, match="rows"):
        intervene(net, x, masks, y, rows=(0, 10))


# --------------------------------------------------------------------------- alarm
def test_alarm_rule():
    n = 100
    strong = (torch.arange(n) < 50).float()
    assert shortcut_alarm(strong, torch.zeros(n, 4)).fired
    # an effect no larger than the controls' does not fire
    assert not shortcut_alarm(strong, strong.view(-1, 1).repeat(1, 4)).fired
    assert not shortcut_alarm(strong, torch.full((n, 4), 0.5)).fired
    # a small excess does not fire, nor a large one on too few samples
    assert not shortcut_alarm((torch.arange(n) < 5).float(), torch.zeros(n, 4)).fired
    assert not shortcut_alarm(torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3, 2)).fired
    d = shortcut_alarm(strong, torch.zeros(n, 4))
    assert d.excess == pytest.approx(0.5) and d.effect == 0.5 and d.control_effect == 0.0
    with pytest.raises(ValueError, match="control_effect"):
        shortcut_alarm(strong, torch.zeros(n + 1, 4))


def test_attribution_concentration_without_effect_does_not_fire():
    """Input x Gradient-style mass sits on a bright corner the model ignores: no alarm, the intervention decides."""
    x, y = corner_data()
    x[:, 0, :2, :2] = 1.0  # bright, constant patch
    model = CornerModel(uses=False)
    masks = region_masks("top_left", x)
    fake_maps = x.clone()  # "attribution" proportional to the input: concentrated on the patch
    assert float(share_ratio(fake_maps, masks).mean()) > 2
    out = intervene(model, x, masks, y, generator=torch.Generator().manual_seed(0))
    assert not shortcut_alarm(out["flip"], out["control_flip"]).fired
    assert not shortcut_alarm(out["shift"], out["control_shift"], change=out["change"], control_change=out["control_change"]).fired


# --------------------------------------------------------------------------- SpRAy and hotspots
def test_spray_two_strategies_and_one():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(30, 8, 8, generator=g) * 0.1
    a[:15, :2, :2] += 1.0
    a[15:, 5:, 5:] += 1.0
    res = spray(a, generator=torch.Generator().manual_seed(0))
    assert res.n_clusters == 2
    assert len(set(res.labels[:15].tolist())) == 1 and len(set(res.labels[15:].tolist())) == 1
    assert res.labels[0] != res.labels[-1]
    one = spray(torch.rand(30, 8, 8, generator=g) * 0.1 + 1.0, generator=torch.Generator().manual_seed(0))
    assert one.n_clusters == 1


def test_hotspot_found_and_absent():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    maps = torch.rand(40, 1, 8, 8, generator=g) * 0.2
    for c in range(4):  # each class attends to its own place ...
        maps[labels == c, 0, 2 + c % 2 * 2: 4 + c % 2 * 2, 2 + c // 2 * 2: 4 + c // 2 * 2] += 1.0
    assert find_hotspot(maps, labels).mask is None
    maps[:, 0, 6:, :2] += 1.5  # ... and all of them to the bottom-left corner
    found = find_hotspot(maps, labels).mask
    truth = torch.zeros(8, 8, dtype=torch.bool)
    truth[6:, :2] = True
    assert iou(found, truth) >= 0.5


# --------------------------------------------------------------------------- randomisation check
def test_spearman_hand_computed():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert spearman(a, a).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([[1.0, 3.0, 2.0, 4.0]])).item() == pytest.approx(0.8)


def test_randomisation_check_hygiene_and_values():
    from lightning_xai.attribution import saliency

    model = small_cnn(batchnorm=True)
    model.train()
    x = torch.rand(6, 1, 8, 8)
    before = snapshot(model)
    res = randomisation_check(model, saliency, x, target=torch.arange(6) % 10, layers=2)
    assert_unchanged(before, model)
    assert -1.0 <= res.correlation <= 1.0 and res.layers == ["1.2", "1.4"]

    def constant_method(m, inputs, target=None):  # ignores the model: the check must flag it
        return inputs.clone()

    res = randomisation_check(model, constant_method, x, target=0, layers=2)
    assert res.correlation == pytest.approx(1.0) and res.insensitive
