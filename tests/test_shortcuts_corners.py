"""Per-sample corner candidates of unknown-region mode: the atypical corner (a mark in a different corner per image)
and the stamp (a tag pasted into a few images): found from the inputs, then confirmed or not by the intervention, on
hand-built models that read the mark and on ones that ignore it."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import DigitsModule, read_events, tiny_trainer
from lightning_xai.callbacks.shortcuts import ShortcutMonitor
from lightning_xai.shortcuts import atypical_corners, corner_windows, find_stamps, stamp_donor_masks
from lightning_xai.shortcuts.alarm import shortcut_alarm
from lightning_xai.shortcuts.interventions import change_matched_sets, control_masks, intervene
from lightning_xai.shortcuts.regions import iou

TAG = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def random_corner_set(n=200, seed=0, random_code=False, texture=0.3):
    """8x8 noisy images (uniform in [0, texture]), a 3x3 mark in a random corner whose level 0.2 + 0.2 c codes the class c
    (or a random class), and a centre blob coding the class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * texture
    y = torch.arange(n) % 5
    code = torch.randint(0, 5, (n,), generator=g) if random_code else y
    corner = torch.randint(0, 4, (n,), generator=g)
    windows = corner_windows((8, 8), 3)
    truth = windows[corner]  # (N, 8, 8)
    x[:, 0][truth] = (0.2 + 0.2 * code.float()).view(-1, 1, 1).expand(n, 8, 8)[truth]
    x[:, 0, 3:5, 3:5] = (0.2 + 0.2 * y.float()).view(-1, 1, 1)
    return x, y, truth


def stamp_set(n=200, seed=0, share=0.5):
    """8x8 noisy images (uniform in [0, 1]) with a centre blob coding the class; ``share`` of class 0 carries the tag in the bottom right."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % 5
    x[:, 0, 3:5, 3:5] = (0.2 + 0.2 * y.float()).view(-1, 1, 1)
    tagged = (y == 0) & (torch.rand(n, generator=g) < share)
    x[tagged, 0, -3:, -3:] = TAG
    return x, y, tagged


def test_atypical_corner_finds_each_samples_mark():
    x, y, truth = random_corner_set()
    masks = atypical_corners(x)
    assert masks.shape == (200, 8, 8) and int(masks[0].sum()) == 9
    hits = torch.tensor([iou(m, t) for m, t in zip(masks, truth)])
    assert float((hits >= 0.5)[y > 0].float().mean()) >= 0.95  # class 0 (level 0.2) hides in the noise (up to 0.3)


def test_stamps_found_exactly_and_not_on_noise_or_flat_marks():
    x, _, tagged = stamp_set()
    res = find_stamps(x)
    assert torch.equal(res.carriers, tagged)
    truth = torch.zeros(8, 8, dtype=torch.bool)
    truth[-3:, -3:] = True
    assert all(iou(m, truth) == 1.0 for m in res.masks)  # non-carriers get the carriers' window
    assert find_stamps(torch.rand(200, 1, 8, 8)) is None  # noise never repeats
    flat, _, _ = random_corner_set()  # uniform marks repeat, but are left to atypical_corners
    assert find_stamps(flat) is None
    x[:3, 0, :3, :3] = TAG  # three copies: fewer than min_copies + 1 carriers in that corner
    assert torch.equal(find_stamps(x).carriers, tagged)


def test_a_near_flat_background_corner_is_not_a_stamp():
    # one background level per class (as the planted-background digits): a corner of background with one stroke pixel
    # recurs in every image of that level, but it is not a pasted pattern; a tag on the same images is
    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.arange(n) % 10
    x = (0.35 * y.float() / 9).view(n, 1, 1, 1).repeat(1, 1, 8, 8)
    x[:, 0, 3:5, 3:5] = torch.rand(n, 2, 2, generator=g)  # the object
    x[:, 0, 2, 2] = x[:, 0, 0, 0] + 0.2  # a stroke end in the top-left window, close to the level
    x[1::2, 0, :3, :3] = torch.rand(n // 2, 3, 3, generator=g)  # the object reaches the corner in half of the images
    assert find_stamps(x) is None
    x[::10, 0, -3:, -3:] = TAG
    res = find_stamps(x)
    assert res is not None and res.carriers.nonzero().view(-1).tolist() == list(range(0, n, 10))


def test_stamp_donor_masks():
    x, _, tagged = stamp_set()
    probe = find_stamps(x)
    truth = torch.zeros(8, 8, dtype=torch.bool)
    truth[-3:, -3:] = True
    plain = torch.rand(30, 1, 8, 8)  # no stamps of their own: the window most probe carriers use
    assert torch.equal(stamp_donor_masks(plain, probe), truth.expand(30, 8, 8))
    assert torch.equal(stamp_donor_masks(plain, probe, own=None), truth.expand(30, 8, 8))
    own = x.clone()
    own[:, 0, -3:, -3:] = torch.rand(200, 3, 3)
    own[tagged, 0, :3, :3] = TAG  # their own tags sit top left
    masks = stamp_donor_masks(own, probe)
    assert torch.equal(masks[tagged], corner_windows((8, 8))[0].expand(int(tagged.sum()), 8, 8))
    told_none = stamp_donor_masks(own, probe, own=None)  # the caller knows (cached) they carry none
    assert torch.equal(told_none, truth.expand(200, 8, 8))
    assert torch.equal(stamp_donor_masks(own, probe, own=find_stamps(own)), masks)  # given, as found here
    with pytest.raises(ValueError, match="'find'"):
        stamp_donor_masks(own, probe, own="search")
    with pytest.raises(TypeError, match="find_stamps result"):
        stamp_donor_masks(own, probe, own=masks)


def test_corner_errors():
    with pytest.raises(ValueError, match="side"):
        corner_windows((8, 8), 9)
    with pytest.raises(ValueError, match="min_copies"):
        find_stamps(torch.rand(4, 1, 8, 8), min_copies=0)
    with pytest.raises(ValueError, match="inputs"):
        atypical_corners(torch.rand(4, 8, 8))


def test_controls_stay_off_the_avoided_pixels_where_they_can():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:3, :3] = True
    change = torch.ones(1, 8, 8)
    avoid = torch.zeros(1, 8, 8, dtype=torch.bool)
    avoid[0, -3:, -3:] = True  # the partner's mark, bottom right
    ctl = control_masks(mask.unsqueeze(0), change, 6, generator=torch.Generator().manual_seed(0), avoid=avoid)
    assert not bool((ctl & avoid.unsqueeze(1)).any()) and torch.equal(ctl.flatten(2).sum(2), torch.full((1, 6), 9))
    everywhere = ~mask.unsqueeze(0)  # nothing else is left: the controls are still drawn (checked by their match)
    assert bool(control_masks(mask.unsqueeze(0), change, 6, generator=torch.Generator().manual_seed(0),
                              avoid=everywhere).any())
    big = torch.zeros(8, 8, dtype=torch.bool)
    big[:, :5] = True  # no shifted copy fits: change-matched sets, which take avoided pixels last
    avoid = torch.zeros(8, 8, dtype=torch.bool)
    avoid[:, 5:7] = True  # 16 of the 24 pixels outside
    sets = change_matched_sets(big, torch.full((8, 8), 0.5), target=3.0, count=4,
                               generator=torch.Generator().manual_seed(0), avoid=avoid)
    assert not bool((sets & (avoid | big)).any()) and torch.equal(sets.flatten(1).sum(1), torch.full((4,), 6))
    sets = change_matched_sets(big, torch.full((8, 8), 0.5), target=6.0, count=4,
                               generator=torch.Generator().manual_seed(0), avoid=avoid)
    assert torch.equal((sets & ~avoid).flatten(1).sum(1), torch.full((4,), 8))  # all 8 free pixels, then 4 avoided
    assert torch.equal(sets.flatten(1).sum(1), torch.full((4,), 12))


def test_controls_stay_off_the_donors_mark_unless_nothing_else_matches():
    # a model that reads a mark wherever it is: a control pasting the donor's pixels at the donor's own corner would
    # paste its mark, and move the model as much as the region's swap does
    x, y, truth = random_corner_set(n=100, texture=0.6)
    donors = random_corner_set(n=100, seed=1, texture=0.6)
    out = intervene(CornerReader(True), x, truth, y, generator=torch.Generator().manual_seed(0),
                    donors=(donors[0], donors[2], donors[1]))
    assert float(out["flip"].mean()) > 0.9
    assert float(out["control_flip"].mean()) < 0.06, "controls pasted the donor's mark"  # 0.154 when they could
    # on plain images (texture 0.3) only the donor's mark changes the input as much as the swap: controls may take
    # it rather than leave the alarm without a verdict (match 0.47 when they could not)
    x, y, truth = random_corner_set(n=100)
    donors = random_corner_set(n=100, seed=1)
    out = intervene(CornerReader(True), x, truth, y, generator=torch.Generator().manual_seed(0),
                    donors=(donors[0], donors[2], donors[1]))
    decision = shortcut_alarm(out["shift"], out["control_shift"], change=out["change"], control_change=out["control_change"])
    assert decision.match >= 0.5 and decision.fired
    strict = intervene(CornerReader(True), x, truth, y, generator=torch.Generator().manual_seed(0),
                       donors=(donors[0], donors[2], donors[1]), min_match=0.0)  # any other candidate is enough
    decision = shortcut_alarm(strict["shift"], strict["control_shift"], change=strict["change"],
                              control_change=strict["control_change"])
    assert decision.match < 0.5 and not decision.fired  # no verdict
    with pytest.raises(ValueError, match="min_match"):
        intervene(CornerReader(True), x, truth, y, min_match=-1.0)


def test_an_avoided_candidate_is_used_when_only_it_changes_the_input_enough():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :3, :3] = True
    avoid = torch.zeros(1, 8, 8, dtype=torch.bool)
    avoid[0, -3:, -3:] = True
    change = torch.full((1, 8, 8), 0.01)
    change[0, :3, :3] = 1.0  # the region's edit: 9
    change[0, -3:, -3:] = 1.0  # only the avoided corner changes the input as much
    ctl = control_masks(mask, change, 2, generator=torch.Generator().manual_seed(0), avoid=avoid)
    assert torch.equal(ctl[0, 0], avoid[0])  # the best match, kept: the others reach 0.09 of the region's change
    change[0, 3:6, :3] = 0.6  # a square on the left edge reaches 0.6 of it (>= MIN_MATCH): the avoided corner comes last
    ctl = control_masks(mask, change, 2, generator=torch.Generator().manual_seed(0), avoid=avoid)
    assert not bool((ctl & avoid.unsqueeze(1)).any())
    with pytest.raises(ValueError, match=r"`avoid` to be None or a boolean tensor of shape \(1, 8, 8\)"):
        control_masks(mask, change, 2, avoid=avoid[0])


class CornerReader(nn.Module):
    """Reads the class from the brightest 3x3 corner (the mark) or from the centre blob."""

    def __init__(self, corner: bool) -> None:
        super().__init__()
        self.corner = corner
        self.lin = nn.Linear(1, 5)
        with torch.no_grad():  # logits -50 (v - centre_c)^2 expanded
            centres = 0.2 + 0.2 * torch.arange(5).float()
            self.lin.weight.copy_((100 * centres).view(5, 1))
            self.lin.bias.copy_(-50 * centres ** 2)

    def forward(self, x):
        if self.corner:
            v = torch.stack([x[:, 0, :3, :3], x[:, 0, :3, -3:], x[:, 0, -3:, :3], x[:, 0, -3:, -3:]], 1).mean((2, 3)).amax(1)
        else:
            v = x[:, 0, 3:5, 3:5].mean((1, 2))
        return self.lin(v.unsqueeze(1))


class BothReader(nn.Module):
    """The sum of the logits of a corner reader and a centre-blob reader."""

    def __init__(self) -> None:
        super().__init__()
        self.corner, self.centre = CornerReader(True), CornerReader(False)

    def forward(self, x):
        return self.corner(x) + self.centre(x)


class TagReader(CornerReader):
    """Reads the centre blob (softly: logits scaled by 0.1), and (``uses_tag``) says class 0 when the bottom-right
    corner matches the tag."""

    def __init__(self, uses_tag: bool) -> None:
        super().__init__(corner=False)
        self.uses_tag = uses_tag

    def forward(self, x):
        logits = 0.1 * super().forward(x)
        if self.uses_tag:
            match = 1 - (x[:, 0, -3:, -3:] - TAG).abs().mean((1, 2))  # 1 on the tag
            logits = logits + 40 * (match > 0.9).float().unsqueeze(1) * torch.nn.functional.one_hot(torch.zeros_like(match).long(), 5)
        return logits


class Frozen(DigitsModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, net, x, y, train=None):
    """One epoch of a frozen ``net``; validation on ``(x, y)``, training on ``train`` (default the same)."""
    monitor = ShortcutMonitor(probe_samples=100, action="log")
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    train_loader = loader if train is None else DataLoader(TensorDataset(*train), batch_size=50)
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Frozen(net), train_loader, loader)
    return monitor, read_events(tmp_path / "tb" / "version_0")


@pytest.mark.parametrize("reads", [True, False], ids=["reads_corner", "ignores_corner"])
def test_unknown_region_random_corner(tmp_path, reads):
    # the shortcut absent from validation (random codes), planted in training; texture lets controls change the
    # input as much as the swap
    x, y, _ = random_corner_set(random_code=True, texture=0.8)
    train = random_corner_set(seed=1, texture=0.8)[:2]
    monitor, acc = _fit(tmp_path, CornerReader(reads), x, y, train)
    alarm = acc.Scalars("xai/shortcut/atypical_corner/alarm")[-1].value
    assert acc.Scalars("xai/shortcut/atypical_corner/found")[-1].value == 1.0
    if reads:
        assert alarm == 1.0 and "atypical_corner" in [a["region"] for a in monitor.alarms]
    else:
        assert alarm == 0.0 and not monitor.alarms


@pytest.mark.parametrize("planted", [True, False], ids=["planted_in_training", "random_in_training"])
def test_gain_follows_the_training_code(tmp_path, planted):
    # the model reads the centre blob and the corner code; the gain (does the swapped-in training content raise its own
    # label more than controls do?) is clearly positive only when the code went with the label in training
    x, y, _ = random_corner_set(random_code=True, texture=0.8)
    train = random_corner_set(seed=1, random_code=not planted, texture=0.8)[:2]
    monitor, acc = _fit(tmp_path, BothReader(), x, y, train)
    gain_z = acc.Scalars("xai/shortcut/atypical_corner/gain_z")[-1].value
    assert monitor.reference_x is not None and monitor.reference_x.shape[0] == 200
    log_z = acc.Scalars("xai/shortcut/atypical_corner/log_gain_z")[-1].value
    if planted:
        assert gain_z >= 3 and log_z >= 3
    else:
        assert abs(gain_z) < 3 and log_z < 3  # no evidence for the code: the shift alone decides
    assert acc.Scalars("xai/shortcut/atypical_corner/alarm")[-1].value == 1.0  # the shift fires in both


@pytest.mark.parametrize("reads", [True, False], ids=["reads_tag", "ignores_tag"])
def test_unknown_region_stamp(tmp_path, reads):
    x, y, tagged = stamp_set()
    monitor, acc = _fit(tmp_path, TagReader(reads), x, y)
    assert acc.Scalars("xai/shortcut/stamp/found")[-1].value == 1.0
    carriers = acc.Scalars("xai/shortcut/stamp/carriers")[-1].value
    assert 0.02 <= carriers <= 0.2  # about a tenth of the probe samples carry the tag
    alarm = acc.Scalars("xai/shortcut/stamp/alarm")[-1].value
    gain_z = acc.Scalars("xai/shortcut/stamp/gain_z")[-1].value  # the training samples' stamps were swapped in
    log_z = acc.Scalars("xai/shortcut/stamp/log_gain_z")[-1].value  # the same pull on the log-probability
    if reads:
        assert alarm == 1.0 and "stamp" in [a["region"] for a in monitor.alarms]
        assert gain_z >= 3 and log_z >= 3  # pasting a class-0 training image's tag raises class 0
    else:
        assert alarm == 0.0 and not monitor.alarms
        assert gain_z < 3 and log_z < 3  # (controls on the centre blob paste content that carries its label)
