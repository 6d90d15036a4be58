"""The training-label gain: interventions with donor samples, and how the alarm weighs the gain."""
import pytest
import torch
from torch import nn

from lightning_xai.shortcuts import intervene, shortcut_alarm


class CornerCode(nn.Module):
    """Class = the top-left 2x2 level (0.2 + 0.2 c), or (``corner=False``) the centre level, on 8x8 images."""

    def __init__(self, corner: bool = True) -> None:
        super().__init__()
        self.corner = corner

    def forward(self, x):
        v = x[:, 0, :2, :2].mean((1, 2)) if self.corner else x[:, 0, 3:5, 3:5].mean((1, 2))
        centres = 0.2 + 0.2 * torch.arange(5, dtype=x.dtype)
        return -200 * (v.unsqueeze(1) - centres) ** 2


def coded(n, seed, code_is_label):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.1
    y = torch.arange(n) % 5
    code = y if code_is_label else torch.randint(0, 5, (n,), generator=g)
    x[:, 0, :2, :2] = (0.2 + 0.2 * code.float()).view(-1, 1, 1)
    x[:, 0, 3:5, 3:5] = (0.2 + 0.2 * y.float()).view(-1, 1, 1)
    return x, y


def corner_masks(n):
    m = torch.zeros(n, 8, 8, dtype=torch.bool)
    m[:, :2, :2] = True
    return m


def test_donor_content_and_gain_by_hand():
    x, y = coded(20, 0, code_is_label=False)  # receivers: random codes
    dx, dy = coded(10, 1, code_is_label=True)  # donors: the code is the label
    out = intervene(CornerCode(), x, corner_masks(20), y, num_controls=3, generator=torch.Generator().manual_seed(0),
                    donors=(dx, corner_masks(10), dy))
    assert out["partner"].min() >= 0 and out["partner"].max() < 10  # indices into the donors
    assert out["gain"].shape == (20,) and out["control_gain"].shape == (20, 3)
    # the corner reader now reads the donor's code = the donor's label: p(donor label) goes to ~1
    donor_label = dy[out["partner"]]
    p0 = torch.softmax(CornerCode()(x), 1).gather(1, donor_label.view(-1, 1)).squeeze(1)
    assert torch.allclose(out["gain"], 1 - p0, atol=1e-3)
    # the controls leave the top-left corner alone, so the corner reader does not move
    assert out["control_gain"].abs().max() < 1e-3
    # each receiver got the donor whose corner differs most from its own
    own, donors = x[:, 0, :2, :2].flatten(1), dx[:, 0, :2, :2].flatten(1)
    dist = torch.cdist(own, donors)
    assert torch.allclose(dist.gather(1, out["partner"].view(-1, 1)).squeeze(1), dist.amax(1))  # ties broken at random


def test_log_gain_by_hand():
    x, y = coded(20, 0, code_is_label=False)
    dx, dy = coded(10, 1, code_is_label=True)
    model = CornerCode()
    out = intervene(model, x, corner_masks(20), y, num_controls=3, generator=torch.Generator().manual_seed(0),
                    donors=(dx, corner_masks(10), dy))
    assert out["log_gain"].shape == (20,) and out["control_log_gain"].shape == (20, 3)
    edited = x.clone()
    edited[:, :, :2, :2] = dx[out["partner"]][:, :, :2, :2]  # same area: the donor's corner, pixel for pixel
    label = dy[out["partner"]].view(-1, 1)
    by_hand = (model(edited).log_softmax(1) - model(x).log_softmax(1)).gather(1, label).squeeze(1)
    assert torch.allclose(out["log_gain"], by_hand, atol=1e-4)
    assert out["control_log_gain"].abs().max() < 1e-4  # the controls leave the corner alone
    # where the receiver was already confident in the donor's label, neither gain moves; elsewhere the log gain is
    # large while the probability gain is at most 1
    moved = by_hand.abs() > 1
    assert bool(moved.any()) and bool((out["log_gain"][moved] > out["gain"][moved]).all())
    # a binary model with one logit z is read as the two logits (-z/2, z/2): log p(1) = log sigmoid(z)
    binary = lambda t: 10 * (t[:, 0, :2, :2].mean((1, 2)) - 0.5)  # noqa: E731
    yb, db = (y % 2), (dy % 2)
    out = intervene(binary, x, corner_masks(20), yb, num_controls=2, generator=torch.Generator().manual_seed(0),
                    donors=(dx, corner_masks(10), db))
    edited = x.clone()
    edited[:, :, :2, :2] = dx[out["partner"]][:, :, :2, :2]
    sign = 2 * db[out["partner"]].float() - 1  # +1 for class 1, -1 for class 0
    logsig = torch.nn.functional.logsigmoid
    assert torch.allclose(out["log_gain"], logsig(sign * binary(edited)) - logsig(sign * binary(x)), atol=1e-4)


def test_donor_draws_average_one_draw_per_group():
    x, y = coded(20, 0, code_is_label=False)
    dx, dy = coded(12, 1, code_is_label=True)
    dm = corner_masks(12)
    gen = torch.Generator().manual_seed(5)
    out = intervene(CornerCode(), x, corner_masks(20), y, num_controls=3, generator=gen, donors=(dx, dm, dy), donor_draws=3)
    # by hand: the donors dealt into three groups in their canonical order (label, then content), one draw per group
    # with the same generator in turn, the per-sample figures averaged
    from lightning_xai.shortcuts.interventions import _canonical_order

    order = _canonical_order(dx, dy)
    assert sorted(order.tolist()) == list(range(12)) and dy[order].tolist() == sorted(dy.tolist())
    gen = torch.Generator().manual_seed(5)
    draws = [intervene(CornerCode(), x, corner_masks(20), y, num_controls=3, generator=gen,
                       donors=(dx[g], dm[g], dy[g])) for g in (order[0::3], order[1::3], order[2::3])]
    for key in ("gain", "control_gain", "shift", "control_shift", "change", "flip", "region_correct"):
        assert torch.allclose(out[key], torch.stack([d[key].float() for d in draws]).mean(0)), key
    assert torch.equal(out["partner"], order[0::3][draws[0]["partner"]])  # an index into all donors
    assert torch.equal(out["pred"], draws[0]["pred"]) and torch.equal(out["correct"], draws[0]["correct"])
    # the same donors in another order (as gathered from DDP ranks): the same figures
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    again = intervene(CornerCode(), x, corner_masks(20), y, num_controls=3, generator=torch.Generator().manual_seed(5),
                      donors=(dx[perm], dm[perm], dy[perm]), donor_draws=3)
    assert torch.equal(again["gain"], out["gain"]) and torch.equal(perm[again["partner"]], out["partner"])
    with pytest.raises(ValueError, match="donor_draws"):
        intervene(CornerCode(), x, corner_masks(20), y, donors=(dx, dm, dy), donor_draws=0)


@pytest.mark.parametrize("draws", [1, 2])
def test_donors_rows_share_is_the_whole_result(draws):
    x, y = coded(12, 0, code_is_label=False)
    dx, dy = coded(6, 1, code_is_label=True)
    kw = dict(num_controls=2, donors=(dx, corner_masks(6), dy), donor_draws=draws)
    whole = intervene(CornerCode(False), x, corner_masks(12), y, generator=torch.Generator().manual_seed(3), **kw)
    parts = [intervene(CornerCode(False), x, corner_masks(12), y, generator=torch.Generator().manual_seed(3), rows=r, **kw)
             for r in ((0, 5), (5, 12))]
    for key in ("gain", "control_gain", "shift", "partner"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])


@pytest.mark.parametrize("donors, fill, match", [
    ((torch.rand(3, 1, 8, 8), torch.zeros(3, 8, 8, dtype=torch.bool), torch.zeros(3)), "mean", "fill"),
    ((torch.rand(3, 1, 4, 4), torch.zeros(3, 4, 4, dtype=torch.bool), torch.zeros(3)), "swap", r"\(D, 1, 8, 8\)"),
    ((torch.rand(3, 1, 8, 8), torch.zeros(3, 8, 8), torch.zeros(3)), "swap", "bool masks"),
    ((torch.rand(3, 1, 8, 8), torch.zeros(3, 8, 8, dtype=torch.bool)), "swap", "donors"),
])
def test_bad_donors(donors, fill, match):
    with pytest.raises(ValueError, match=match):
        intervene(CornerCode(), torch.rand(4, 1, 8, 8), corner_masks(4), fill=fill, donors=donors)


def _decide(shift_excess, gain_excess, n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = lambda: 0.01 * torch.randn(n, generator=g)  # noqa: E731
    control = torch.full((n, 4), 0.2)
    return shortcut_alarm(0.2 + shift_excess + noise(), control, gain=0.1 + gain_excess + noise(), control_gain=control - 0.1)


def test_alarm_weighs_the_gain():
    assert _decide(0.0, 0.0).fired is False
    assert _decide(0.05, 0.0).fired is True  # shift alone, no evidence against: fires
    assert _decide(0.05, -0.05).fired is False  # shift, but the content goes against its training labels: vetoed
    both = _decide(0.0, 0.05)
    assert both.fired is True and both.gain_z >= 3 and abs(both.z) < 3  # gain alone fires
    assert _decide(0.0, 0.005).fired is False  # below min_gain
    tag = _decide(-0.05, 0.05)  # a tag on one class moves the outputs less than edits on the object, yet pulls to its label
    assert tag.fired is True and tag.z <= -3 and tag.gain_z >= 3
    d = _decide(0.05, -0.05).as_dict()
    assert d["gain_excess"] == pytest.approx(-0.05, abs=0.01) and d["gain_z"] <= -3


def _decide_log(prob_excess, log_excess, n=100, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    noise = lambda scale: scale * torch.randn(n, generator=g)  # noqa: E731
    control = torch.full((n, 4), 0.2)
    return shortcut_alarm(0.2 + noise(0.01), control, gain=prob_excess + noise(0.01), control_gain=control * 0,
                          log_gain=log_excess + noise(0.1), control_log_gain=control * 0, **kw)


def test_alarm_log_gain_fires_and_probability_gain_vetoes():
    # a tag read by a model confident in another class: the label's probability barely moves, its log does
    tag = _decide_log(0.003, 0.5)
    assert tag.fired is True and tag.gain_z < 3 and tag.log_gain_z >= 3 and abs(tag.z) < 3
    assert tag.as_dict()["log_gain_excess"] == pytest.approx(0.5, abs=0.05)
    # with the log gain given, the probability gain no longer fires on its own
    assert _decide_log(0.05, 0.0).fired is False
    assert _decide_log(0.0, -0.5).fired is False  # content going against its training label
    assert _decide_log(0.003, 0.5, gain_fires=False).fired is False  # unknown-region candidates: vetoes only
    assert _decide_log(0.003, 0.5, min_log_gain=1.0).fired is False  # excess below min_log_gain
    # the shift still fires, and the probability gain still vetoes it
    g = torch.Generator().manual_seed(1)
    control = torch.full((100, 4), 0.2)
    shift = 0.25 + 0.01 * torch.randn(100, generator=g)
    zero = torch.zeros(100)
    assert shortcut_alarm(shift, control, gain=zero, control_gain=control * 0, log_gain=zero,
                          control_log_gain=control * 0).fired is True
    vetoed = shortcut_alarm(shift, control, gain=zero - 0.05 + 0.01 * torch.randn(100, generator=g),
                            control_gain=control * 0, log_gain=zero, control_log_gain=control * 0)
    assert vetoed.fired is False and vetoed.z >= 3 and vetoed.gain_z <= -3
    with pytest.raises(ValueError, match="log_gain"):
        shortcut_alarm(shift, control, gain=zero, control_gain=control, log_gain=zero)
    with pytest.raises(ValueError, match="min_log_gain"):
        shortcut_alarm(shift, control, log_gain=zero, control_log_gain=control, min_log_gain=0)


def test_alarm_gain_shapes_and_without_gain():
    effect, control = torch.rand(10), torch.rand(10, 3)
    with pytest.raises(ValueError, match="gain"):
        shortcut_alarm(effect, control, gain=torch.rand(9), control_gain=torch.rand(10, 3))
    with pytest.raises(ValueError, match="min_gain"):
        shortcut_alarm(effect, control, gain=effect, control_gain=control, min_gain=0)
    d = shortcut_alarm(effect, control)
    assert d.gain_excess != d.gain_excess and d.gain_z != d.gain_z  # NaN without gains


def test_gain_only_vetoes_when_told():
    g = torch.Generator().manual_seed(0)
    n, control = 100, torch.full((100, 4), 0.2)
    effect = 0.2 + 0.01 * torch.randn(n, generator=g)
    gain = 0.15 + 0.01 * torch.randn(n, generator=g)
    assert shortcut_alarm(effect, control, gain=gain, control_gain=control - 0.1).fired is True
    assert shortcut_alarm(effect, control, gain=gain, control_gain=control - 0.1, gain_fires=False).fired is False
    vetoed = shortcut_alarm(effect + 0.05, control, gain=gain - 0.1, control_gain=control - 0.1, gain_fires=False)
    assert vetoed.fired is False and vetoed.z >= 3
