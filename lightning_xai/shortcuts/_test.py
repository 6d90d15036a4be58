"""The named-region test: does the model read class evidence from a region, beyond what ordinary content gives?

**Edit.** For a probe sample ``x_i`` (the *recipient*, label ``y_i``) and a donor ``r_j`` (a kept training sample,
label ``t_j != y_i``), the region's content of the donor replaces the recipient's. With ``A`` the recipient's region
mask and ``B`` the donor's (equal for a fixed region; per sample for a callable):

* a *compact* region (donor masks cover at most :data:`COMPACT` of the image on average: a mark, a glyph) is
  *transplanted*: ``x' = r_j`` on ``A | B``, ``x_i`` elsewhere (a watermark moves with its pixels);
* a *large* region (a background, a frame) is replaced *in place*: ``x' = r_j`` where the recipient, the donor and
  the placebo donor (below) all have the region, ``x_i`` elsewhere. Pasting only where both donors have it keeps
  the donors' objects out: whatever shape the pasted area has, the real edit and its placebo share it. A per-sample
  large mask (a background drawn around each image's object) loses its edge ring first (pixels with a neighbour
  outside it; one pixel, the resolution of a mask's edge), and then each next ring for as long as the rings are
  measurably unlike the ring inside them (:func:`_halo_depth`): they carry the faint edge of the object they border
  (anti-aliasing, interpolation, blur), object content rather than background. Its donors are pasted turned by 180
  degrees: donors are training samples, and a model that memorised a training image's background (its noise, pixel by
  pixel) is pulled toward that image's label by it in place; turned, the content keeps what a background shortcut is
  (a colour, an intensity, a texture's orientation and period) and loses what was memorised where it sat.

**Specific pull.** Each edit is paired with a *placebo*: the same edit at the same place with the content of a
donor ``r_k`` whose label is not ``t_j`` (preferably ``y_i``). The pull of the pair is

.. math:: g = \\log p_{t_j}(x'_{ij}) - \\log p_{t_j}(x'_{ik}),

how much more the donor's content raised its own label than content of another label did. Both edits change
the same pixels in the same way, so whatever the edit does regardless of the content's class (removing
the recipient's evidence, an unusual patch) cancels. Per recipient the pulls of ``donor_draws`` pairs are
averaged (``G_i``).

**Controls.** For a fixed region, the same pair of edits is repeated at ``num_controls`` other places: the union of
the masks rolled by an offset where it does not overlap itself (where no offset does, as for a frame or a border
ring, where it overlaps itself by at most half: mostly elsewhere). Of ``8 * num_controls`` random such offsets the
controls are *dose-matched*: the places where the edit pastes at least as much of the donor's content as the region's
own edit does (the squared distance of the pasted donor pixels from the donor's median colour), as little more as was
found, then, where too few do, the ones that paste the most. For ordinary content, pasting at least as much of it
moves the prediction at least as much.

For a per-sample region (a mark that moves, a box drawn around each image's object) the region's place is chosen by
the donor's own content, so a rolled copy is not like it (a box centred on an object pixel, rolled, mostly lands on
background). Its controls come first from *same-class content at the same pixels*: other donors of the real donor's
class (and of the placebo's class, for the placebo) pasted at the pair's own pixels, whose own region does not lie
there (it would carry the region's content: a mark), clear of them first, then covering at most half of them. The
question becomes: does this donor's content in its region pull harder than other same-class content at the same
pixels? A mark does (other donors have ordinary content there); a part of an object does not (other donors of the
class have their object there too). Controls of both kinds are dose-matched; same-class content reaching the region's
dose comes first, then rolled places reaching it (a window chosen for its extreme content, such as a corner the object
reaches into, finds its match on the object elsewhere), then the closest of either.

``C_i`` is the mean pull of the recipient's controls. A per-sample region covering most of the image (a background)
has no controls: every donor's background covers its pixels, and a rolled copy lands mostly on background again,
the region's own kind of content.

**Verdict.** Two one-sided tests over the ``N`` recipients (intersection-union: the alarm needs both to reject, so
its false-alarm rate under either null is at most their level):

1. *use*: H0 ``E[G] <= 0`` (the region's content carries no class evidence the model reads). Statistic
   ``z = mean(G) / (sd(G) / sqrt(n))`` over the ``n`` recipients tested, referred to Student's t with ``n - 1``
   degrees of freedom (its distribution when the ``G_i`` are normal; the standard normal only as ``n`` grows: a
   per-class test sees a few dozen recipients, where the normal's critical value would be far too low).
2. *beyond ordinary content*: H0 ``E[G - C] <= 0`` (the region pulls no harder than a typical place of its shape
   carrying as much content). Same statistic on ``G_i - C_i``; skipped, and said so, when the region has no controls.

Both run pooled over the donors' classes at level ``alpha / 2``, and for each donor class on its own (a watermark
on some classes only pulls toward those) at ``alpha / (2 C)``: by Bonferroni the ``1 + C`` pairs of tests keep the
false-alarm rate at most ``alpha``. Each mean must also reach ``min_pull`` nats, the minimal effect: ``log 1.05``, a
5 % rise of the donor label's probability, the scale of the 5-point accuracy loss that makes a shortcut matter.
``alpha`` defaults to ``1e-4`` (pooled, over 128 recipients, ``z >= 4.02``; per class, with 10 classes and about 28
recipients, ``z >= 5.4``): a dozen checks per fit (epochs x regions) keep the chance of a false alarm in a clean fit
near 0.1 %.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import expected, two_class_logits

COMPACT = 0.25  # donor masks covering at most this share of the image (on average) are transplanted, else replaced
TRIES_PER_CONTROL = 8  # random offsets drawn per control kept
MAX_OVERLAP = 0.5  # a control of a region no offset clears may overlap it by at most this share: mostly elsewhere
HALO_LEVEL = 0.05  # a per-sample background's edge ring unlike the ring inside it at this level is the object's edge


@dataclass(frozen=True)
class ShortcutConfig:
    """Options of the shortcut test (see the module docstring for what each one means).

    Args:
        donor_draws: donors (each paired with a placebo) pasted into every probe sample.
        num_controls: control places per (probe sample, donor).
        alpha: level of the family of tests of one region at one epoch (pooled tests at ``alpha / 2``, per class at
            ``alpha / (2 C)``; each one-sided against Student's t).
        min_pull: minimal effect in nats for both tests.
        patience: runs in a row a region must fire before the callback acts (like EarlyStopping's).
        reference_samples: training samples kept (stratified by class) to give the pasted content; ``0`` pastes
            other probe samples' content instead.
        batch_size: edited inputs per forward pass.
        seed: seed of the plan's private generator (donors, placebos, control places).
    """

    donor_draws: int = 2
    num_controls: int = 6
    alpha: float = 1e-4
    min_pull: float = math.log(1.05)
    patience: int = 1
    reference_samples: int = 256
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("donor_draws", "num_controls", "patience", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(expected(f"ShortcutConfig.{name}", "a positive int", value))
        for name in ("reference_samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(expected(f"ShortcutConfig.{name}", "an int >= 0", value))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < 0.5:
            raise ValueError(expected("ShortcutConfig.alpha", "a float in (0, 0.5)", self.alpha))
        if isinstance(self.min_pull, bool) or not isinstance(self.min_pull, (int, float)) or not self.min_pull >= 0:
            raise ValueError(expected("ShortcutConfig.min_pull", "a float >= 0 (nats)", self.min_pull))

    def z(self, samples: int) -> float:
        """The critical value of the pooled tests over ``samples`` probe samples: Student's t quantile
        ``t_{samples - 1}^{-1}(1 - alpha / 2)`` (see :func:`decide`)."""
        return t_critical(self.alpha / 2, samples - 1)


@dataclass
class InterventionPlan:
    """What to edit, before any forward pass: edit ``e`` pastes donor ``donor[e]``'s content into probe sample
    ``recipient[e]`` at place ``place[e]`` (0: the region, ``1..K``: controls, the masks rolled by ``offset[e]``), and
    the log-probability of class ``target[e]`` is read. A draw's real edit and its placebo share ``recipient``,
    ``draw``, ``place`` and ``offset`` and differ in ``placebo``. The edit's pixels are the recipient's mask and the
    donor-side mask ``donor_masks[b_mask[e]]`` (in place: also ``donor_masks[c_mask[e]]``, its partner's), rolled by
    ``offset[e]``. At the region and at the rolled controls of a fixed region ``b_mask`` is the edit's own donor; at
    the controls of a per-sample region it is the donor the control donor stands for (its content pasted there). When
    ``turned``, the donors' content and masks are turned by 180 degrees first (a background drawn per image)."""

    recipient: Tensor
    donor: Tensor
    target: Tensor
    place: Tensor
    draw: Tensor
    placebo: Tensor
    offset: Tensor
    b_mask: Tensor
    c_mask: Tensor
    recipient_masks: Tensor
    donor_masks: Tensor
    in_place: bool
    num_recipients: int
    num_draws: int
    num_controls: int
    turned: bool = False

    def __len__(self) -> int:
        return int(self.recipient.shape[0])

    def targets(self) -> Tensor:
        """The target class of every probe sample's draws ``(N, donor_draws)`` (-1 where a draw does not exist)."""
        out = torch.full((self.num_recipients, self.num_draws), -1, dtype=torch.long)
        out[self.recipient, self.draw] = self.target
        return out

    def edited(self, inputs: Tensor, donors: Tensor, index: Tensor) -> Tensor:
        """The edited inputs of edits ``index`` ``(len(index), C, H, W)``."""
        x = inputs.index_select(0, self.recipient[index].to(inputs.device))
        r = donors.index_select(0, self.donor[index].to(donors.device)).to(x)
        r = r.flip(-2, -1) if self.turned else r
        return torch.where(self.masks(index).to(x.device).unsqueeze(1), r, x, out=x)

    def masks(self, index: Tensor) -> Tensor:
        """The pixels edit ``index`` changes ``(len(index), H, W)``: the union of its recipient-side and donor-side
        masks (in place: where those and the partner's donor-side mask all hold), rolled by its offset."""
        a = self.recipient_masks.index_select(0, self.recipient[index])
        b = self.donor_masks.index_select(0, self.b_mask[index])
        if self.in_place:  # the pixels both donors of the pair have in the region
            c = self.donor_masks.index_select(0, self.c_mask[index])
            b, c = (b.flip(-2, -1), c.flip(-2, -1)) if self.turned else (b, c)
            return _rolled(a & b & c, self.offset[index])
        return _rolled(a | b, self.offset[index])


def _rolled(masks: Tensor, offsets: Tensor) -> Tensor:
    """Each mask ``(B, H, W)`` rolled by its offset ``(B, 2)`` (as :func:`torch.roll`, wrapping around): its rows
    picked in rolled order, then each row's columns."""
    b, h, w = masks.shape
    iy = (torch.arange(h).view(1, h) - offsets[:, :1]) % h  # (B, H)
    ix = (torch.arange(w).view(1, w) - offsets[:, 1:]) % w  # (B, W)
    rows = masks[torch.arange(b).view(b, 1), iy]
    return rows.gather(2, ix.view(b, 1, w).expand(b, h, w))


def _pick(pool: Tensor, generator: torch.Generator) -> int:
    return int(pool[torch.randint(pool.numel(), (1,), generator=generator)])


def plan_interventions(inputs: Tensor, labels: Tensor, donors: Tensor, donor_labels: Tensor, recipient_masks: Tensor,
                       donor_masks: Tensor, config: ShortcutConfig = ShortcutConfig(),
                       generator: Optional[torch.Generator] = None, selected: bool = False) -> InterventionPlan:
    """Plan the edits of the test (module docstring): donors, placebos and control places for every probe sample.

    Args:
        inputs: probe samples ``(N, C, H, W)``; labels: their classes ``(N,)``.
        donors: samples giving the pasted content ``(M, C, H, W)``; donor_labels: their classes ``(M,)``.
        recipient_masks: ``(N, H, W)`` bool; donor_masks: ``(M, H, W)`` bool.
        generator: the private generator (default: seeded with ``config.seed``).
        selected: the per-sample masks were chosen where each sample's content is most unusual (discovery's
            atypical corner, stamps): such content is more distinctive than other same-class content at those
            pixels by construction, so the controls are rolled places only, as for a fixed region.

    Raises:
        ValueError: on shapes that do not fit; the message names the argument.
    """
    if inputs.ndim != 4 or donors.ndim != 4 or donors.shape[1:] != inputs.shape[1:]:
        shape = ", ".join(map(str, inputs.shape[1:]))
        raise ValueError(expected("donors", f"images of the probe samples' shape (M, {shape})",
                                  donors))
    n, _, h, w = inputs.shape
    m = donors.shape[0]
    for name, value, size in (("labels", labels, n), ("donor_labels", donor_labels, m)):
        if value.shape != (size,):
            raise ValueError(expected(name, f"a tensor of shape ({size},)", value))
    for name, value, size in (("recipient_masks", recipient_masks, n), ("donor_masks", donor_masks, m)):
        if value.shape != (size, h, w):
            raise ValueError(expected(name, f"a bool tensor of shape ({size}, {h}, {w})", value))
    gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    labels, donor_labels = labels.long().cpu(), donor_labels.long().cpu()
    recipient_masks, donor_masks = recipient_masks.bool().cpu(), donor_masks.bool().cpu()
    in_place = float(donor_masks.float().mean()) > COMPACT
    by_class = {int(c): torch.nonzero(donor_labels == c).view(-1) for c in donor_labels.unique()}
    classes = sorted(by_class)
    rows = []  # (recipient, draw, donor, placebo donor, target)
    for i in range(n):
        others = [c for c in classes if c != int(labels[i])]
        if not others:
            continue
        order = torch.randperm(len(others), generator=gen).tolist()
        for d in range(config.donor_draws):
            t = others[order[d % len(others)]]
            j = _pick(by_class[t], gen)
            placebo_pool = by_class.get(int(labels[i]))
            if placebo_pool is None:  # no donor of the recipient's class: one of a third class
                third = [c for c in others if c != t]
                if not third:
                    continue
                placebo_pool = by_class[third[int(torch.randint(len(third), (1,), generator=gen))]]
            rows.append((i, d, j, _pick(placebo_pool, gen), t))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return InterventionPlan(empty, empty, empty, empty, empty, empty.bool(), torch.zeros(0, 2, dtype=torch.long),
                                empty, empty, recipient_masks, donor_masks, in_place, n, config.donor_draws,
                                config.num_controls)
    rec, draw, don, pla, tgt = (torch.tensor(col, dtype=torch.long) for col in zip(*rows))
    per_sample = _per_sample(recipient_masks) or _per_sample(donor_masks)
    drawn = per_sample and not selected  # a region drawn per sample by a rule (a mark, a box around the object)
    if drawn and in_place:  # a per-sample mask's edge rings that carry the content it borders are left out
        for _ in range(_halo_depth(torch.cat([inputs.cpu(), donors.cpu()]), torch.cat([recipient_masks, donor_masks]))):
            recipient_masks, donor_masks = _inner(recipient_masks), _inner(donor_masks)
    k = config.num_controls
    still = torch.zeros(rec.shape[0], 2, dtype=torch.long)
    places = [(still, torch.ones(rec.shape[0], dtype=torch.bool), don, pla)]
    if not (drawn and in_place):  # a background drawn per image: every place is more of its kind, no control
        offsets, rolled_reached = _control_offsets(inputs.cpu(), donors.cpu(), rec, don, pla, recipient_masks,
                                                   donor_masks, in_place, k, gen)  # (P, K, 2), -1 where missing
    if drawn and not in_place:  # same-class content at the pair's pixels, then rolled places; reaching the dose first
        picked, picked_reached = _content_controls(donors.cpu(), donor_labels, rec, don, pla, recipient_masks,
                                                   donor_masks, in_place, k)  # (P, K, 2), -1 where missing
        slot = torch.arange(k).view(1, k)
        rank = torch.cat([torch.where(picked_reached, slot, 2 * k + slot), torch.where(rolled_reached, k + slot,
                                                                                       3 * k + slot)], 1).double()
        rank = rank.where(torch.cat([picked[..., 0] >= 0, offsets[..., 0] >= 0], 1), torch.tensor(math.inf))
        order = torch.argsort(rank, dim=1, stable=True)[:, :k]
        ok = torch.isfinite(rank.gather(1, order))
        content = order < k
        idx = order % k
        at = torch.arange(rec.shape[0]).view(-1, 1)
        offset = torch.where(content.unsqueeze(-1), torch.zeros_like(offsets), offsets[at, idx].clamp_min(0))
        real = torch.where(content, picked[at, idx, 0], don.view(-1, 1)).clamp_min(0)
        placebo_donor = torch.where(content, picked[at, idx, 1], pla.view(-1, 1)).clamp_min(0)
        places += [(offset[:, c], ok[:, c], real[:, c], placebo_donor[:, c]) for c in range(k)]
    elif not drawn:
        places += [(offsets[:, c].clamp_min(0), offsets[:, c, 0] >= 0, don, pla) for c in range(k)]
    keys = ("recipient", "donor", "target", "place", "draw", "placebo", "offset", "b_mask", "c_mask")
    cols: Dict[str, list] = {key: [] for key in keys}
    for place, (offset, ok, real, placebo_donor) in enumerate(places):
        for placebo, source, b_mask, c_mask in ((False, real, don, pla), (True, placebo_donor, pla, don)):
            count = int(ok.sum())
            cols["recipient"].append(rec[ok])
            cols["donor"].append(source[ok])
            cols["target"].append(tgt[ok])
            cols["place"].append(torch.full((count,), place, dtype=torch.long))
            cols["draw"].append(draw[ok])
            cols["placebo"].append(torch.full((count,), placebo, dtype=torch.bool))
            cols["offset"].append(offset[ok])
            cols["b_mask"].append(b_mask[ok])
            cols["c_mask"].append(c_mask[ok])
    return InterventionPlan(**{k: torch.cat(v) for k, v in cols.items()}, recipient_masks=recipient_masks,
                            donor_masks=donor_masks, in_place=in_place, num_recipients=n, num_draws=config.donor_draws,
                            num_controls=config.num_controls, turned=drawn and in_place)


def _inner(masks: Tensor) -> Tensor:
    """The pixels of each mask ``(N, H, W)`` whose 8 neighbours are all in it (the image's edge counts as inside)."""
    outside = torch.nn.functional.max_pool2d((~masks).float().unsqueeze(1), 3, stride=1, padding=1)
    return outside.squeeze(1) == 0


def _halo_depth(images: Tensor, masks: Tensor) -> int:
    """How many edge rings of per-sample large masks ``(N, H, W)`` to leave out: the object a background borders spills
    its faint edge into it (anti-aliasing, interpolation, blur) by an unknown width.

    Ring 1 (pixels with a neighbour outside the mask) always goes: one pixel is the resolution of a mask's edge. Each
    next ring ``k`` goes too while it is unlike the ring inside it, ``k + 1``: per image, ``D_i`` is the mean over ring
    ``k`` of ``||x - m_i||^2`` minus its mean over ring ``k + 1``, with ``m_i`` the image's median colour over the
    pixels deeper still (neither ring, so neither is fitted by it); H0 ``E[D] <= 0`` (ring ``k`` is no further from
    the background's colour than the next), one-sided t-test at :data:`HALO_LEVEL`. An object's spill fades inwards,
    so it fails H0; noise, a tint or a texture do not. Leaving out a ring that is background costs a little power;
    pasting one that is object content can raise a false alarm, hence a liberal level. Rings stop going when fewer
    than half of the masks' pixels would be left (the region stays mostly tested).
    """
    depth, current = 1, _inner(masks)
    half = 0.5 * float(masks.sum())
    while True:
        inside = _inner(current)
        deeper = _inner(inside)
        if float(inside.sum()) < half:
            return depth
        ring, next_ring = current & ~inside, inside & ~deeper
        rows = ring.any(2).any(1) & next_ring.any(2).any(1) & deeper.any(2).any(1)
        if int(rows.sum()) < 2:
            return depth
        centre = images.where(deeper.unsqueeze(1), torch.tensor(float("nan"))).flatten(2).nanmedian(2).values
        sq = (images - centre.view(*centre.shape, 1, 1)).pow(2).sum(1)
        gap = ((sq * ring).sum((1, 2)) / ring.sum((1, 2)).clamp_min(1)
               - (sq * next_ring).sum((1, 2)) / next_ring.sum((1, 2)).clamp_min(1))[rows].double()
        _, t = _z(gap)
        if not t_tail(t, float(rows.sum()) - 1) <= HALO_LEVEL:
            return depth
        depth, current = depth + 1, inside


def _per_sample(masks: Tensor) -> bool:
    """Whether the masks differ between samples (a region given per sample, e.g. by a callable)."""
    return masks.shape[0] > 1 and not bool((masks == masks[:1]).all())


def _content(images: Tensor) -> Tensor:
    """Per pixel, the squared distance of each image's pixel from the image's median colour ``(N, H, W)``: the content
    a paste of it carries (an object's strokes, a mark), rather than its background."""
    median = images.flatten(2).median(2).values.view(images.shape[0], -1, 1, 1)
    return (images - median).pow(2).sum(1)


def _control_offsets(inputs: Tensor, donors: Tensor, rec: Tensor, don: Tensor, pla: Tensor, recipient_masks: Tensor,
                     donor_masks: Tensor, in_place: bool, count: int, gen: torch.Generator,
                     block: int = 32) -> Tuple[Tensor, Tensor]:
    """Per pair, ``count`` roll offsets ``(P, count, 2)`` (-1 where fewer exist) of the union of its masks that do not
    overlap it, dose-matched among ``TRIES_PER_CONTROL * count`` draws (module docstring), and whether each reached
    the region's dose ``(P, count)``."""
    p = rec.shape[0]
    h, w = inputs.shape[-2:]
    tries = TRIES_PER_CONTROL * count
    offsets = torch.stack([torch.randint(h, (p, tries), generator=gen),
                           torch.randint(w, (p, tries), generator=gen)], -1)
    out = torch.full((p, count, 2), -1, dtype=torch.long)
    reached = torch.zeros(p, count, dtype=torch.bool)
    for start in range(0, p, block):  # bounded memory: (block * tries) edited images at a time
        q = slice(start, min(start + block, p))
        b = rec[q].shape[0]
        flat = offsets[q].reshape(-1, 2)
        union = recipient_masks[rec[q]] | donor_masks[don[q]] | donor_masks[pla[q]]
        union_t = union.repeat_interleave(tries, 0)
        area = union_t.flatten(1).sum(1)
        overlap = (_rolled(union_t, flat) & union_t).flatten(1).sum(1).double() / area.clamp_min(1)
        moved = (flat != 0).any(1) & (area > 0)
        clear = (overlap == 0) & moved
        # where no offset clears the region (a frame, a border), offsets that overlap it by at most half
        clear_somewhere = clear.view(b, tries).any(1, keepdim=True).expand(b, tries).reshape(-1)
        free = torch.where(clear_somewhere, clear, (overlap <= MAX_OVERLAP) & moved)
        a = _rolled(recipient_masks[rec[q]].repeat_interleave(tries, 0), flat)
        d = _rolled(donor_masks[don[q]].repeat_interleave(tries, 0), flat)
        content = _content(donors[don[q]])  # (b, H, W): how far each donor pixel is from the donor's usual colour
        pasted = (a & d) if in_place else (a | d)
        change = (content.repeat_interleave(tries, 0) * pasted).flatten(1).sum(1)
        own_pasted = (recipient_masks[rec[q]] & donor_masks[don[q]]) if in_place else (
            recipient_masks[rec[q]] | donor_masks[don[q]])
        own = (content * own_pasted).flatten(1).sum(1).repeat_interleave(tries)  # the region's own edit
        # dose-matched: the places whose edit changes the recipient at least as much as the region's, as little more
        # as was found; then, where too few do, the ones that change it most
        gap = change - own
        key = torch.where(gap >= 0, gap, (own.max() + 1) - gap)
        key = torch.where(free, key, torch.full_like(key, math.inf)).view(b, tries)
        order = torch.argsort(key, dim=1, stable=True)[:, :count]
        chosen = offsets[q].gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
        ok = torch.isfinite(key.gather(1, order))
        out[q] = torch.where(ok.unsqueeze(-1), chosen, torch.full_like(chosen, -1))
        reached[q] = ok & (gap.view(b, tries).gather(1, order) >= 0)
    return out, reached


def _content_controls(donors: Tensor, donor_labels: Tensor, rec: Tensor, don: Tensor, pla: Tensor,
                      recipient_masks: Tensor, donor_masks: Tensor, in_place: bool,
                      count: int) -> Tuple[Tensor, Tensor]:
    """Per pair, ``count`` control donors of a per-sample region ``(P, count, 2)`` (-1 where fewer exist): for the real
    edit, other donors of the real donor's class, and for the placebo, of the placebo's class, whose content is pasted
    at the pair's own pixels. A candidate's own region should not cover those pixels (it would carry the region's
    content there): clear of them first, then covering at most half of them. Within that, dose-matched: the
    candidates pasting at least as much content as the donor it stands for, as little more as was found, then the
    ones pasting the most. Also whether both of a control's donors reached their dose ``(P, count)``."""
    p = rec.shape[0]
    out = torch.full((p, count, 2), -1, dtype=torch.long)
    reached = torch.ones(p, count, dtype=torch.bool)
    content = _content(donors).flatten(1).double()  # (M, H * W)
    regions = donor_masks.flatten(1).double()
    a = recipient_masks[rec].flatten(1)
    for side, (own, partner) in enumerate(((don, pla), (pla, don))):
        b, c = donor_masks[own].flatten(1), donor_masks[partner].flatten(1)
        pasted = (a & b & c) if in_place else (a | b)  # (P, H * W): the pixels this side's edit changes
        dose = pasted.double() @ content.T  # (P, M): each donor's content there
        own_dose = dose.gather(1, own.view(-1, 1))
        # the share of each candidate's own region that lies on the pasted pixels
        theirs = pasted.double() @ regions.T / regions.sum(1).clamp_min(1).view(1, -1)
        usable = (donor_labels.view(1, -1) == donor_labels[own].view(-1, 1)) & (pasted.any(1, keepdim=True))
        usable[torch.arange(p), own] = False
        clear, near = (theirs == 0) & usable, (theirs <= MAX_OVERLAP) & usable
        gap = dose - own_dose
        reach = gap >= 0
        tier = torch.where(clear & reach, 0, torch.where(near & reach, 1, torch.where(clear, 2, 3))).double()
        key = torch.where(near, tier * (gap.abs().max() + 1) + gap.abs(), torch.full_like(gap, math.inf))
        order = torch.argsort(key, dim=1, stable=True)[:, :count]
        ok = torch.isfinite(key.gather(1, order))
        out[..., side] = torch.where(ok, order, torch.full_like(order, -1))
        reached &= ok & (reach.gather(1, order))
    both = (out >= 0).all(-1, keepdim=True)
    return torch.where(both, out, torch.full_like(out, -1)), reached & both.squeeze(-1)


def run_plan(forward: Callable[[Tensor], Tensor], inputs: Tensor, donors: Tensor, plan: InterventionPlan,
             rows: Optional[Tuple[int, int]] = None, batch_size: int = 256) -> Dict[str, Tensor]:
    """The forward passes of the edits of probe samples ``rows`` (``[start, stop)``, default all), laid out per
    probe sample: ``"logp"`` the log-probability of the edit's target class and ``"pred"`` the predicted class, each
    ``(stop - start, donor_draws, 1 + num_controls, 2)`` (place 0: the region; last axis: real edit, placebo), on the
    CPU; NaN (``"pred"``: -1) where an edit does not exist."""
    start, stop = rows if rows is not None else (0, plan.num_recipients)
    shape = (stop - start, plan.num_draws, plan.num_controls + 1, 2)
    logp = torch.full(shape, float("nan"))
    pred = torch.full(shape, -1, dtype=torch.long)
    index = torch.nonzero((plan.recipient >= start) & (plan.recipient < stop)).view(-1)
    for first in range(0, index.numel(), batch_size):
        part = index[first:first + batch_size]
        with torch.no_grad():
            logits = two_class_logits(forward(plan.edited(inputs, donors, part))).float()
        lsm = torch.log_softmax(logits, dim=1).cpu()
        at = (plan.recipient[part] - start, plan.draw[part], plan.place[part], plan.placebo[part].long())
        logp[at] = lsm.gather(1, plan.target[part].view(-1, 1)).view(-1)
        pred[at] = lsm.argmax(1)
    return {"logp": logp, "pred": pred}


@dataclass
class Verdict:
    """The outcome of the test for one region: ``alarm``, the figures in ``stats`` (each a scalar tag; see
    :data:`STATS`) and ``reason``, one sentence saying why."""

    alarm: bool
    stats: Dict[str, float] = field(default_factory=dict)
    reason: str = ""


STATS = {
    "alarm": "1 when the region is judged a shortcut this run",
    "pull": "mean specific pull (nats): how much a donor's region content raises the donor's label beyond a placebo",
    "pull_z": "z of the pull (test 1: does the model read class evidence from the region?)",
    "control_pull": "mean pull of the control places (nats); NaN without controls",
    "excess": "pull minus control_pull (nats), per probe sample",
    "excess_z": "z of the excess (test 2: beyond ordinary content?); NaN without controls",
    "flip": "share of edits that turn the prediction into the donor's label, minus the placebo's",
    "controls": "mean number of control places per probe sample",
    "class": "the donor class whose content in the region pulls hardest (-1: none tested)",
}


def _z(values: Tensor) -> Tuple[float, float]:
    """The mean of ``values`` and its one-sample t statistic; NaN (no test) without two values to estimate a spread
    from."""
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan")
    sd = float(values.std(unbiased=True))
    if sd == 0.0:
        return mean, (math.inf if mean > 0 else 0.0)
    return mean, mean / (sd / math.sqrt(n))


def _both_tests(pull: Tensor, keep: Tensor) -> Dict[str, float]:
    """Test 1 and test 2 over the probe samples, from the draws ``keep`` ``(N, D)`` of ``pull (N, D, places)``."""
    region = pull[:, :, 0]
    exists = ~torch.isnan(region) & keep
    tested = exists.any(1)
    g = region.where(exists, torch.zeros_like(region)).sum(1)[tested] / exists.sum(1)[tested]
    ctl = pull[:, :, 1:]
    counted = (~torch.isnan(ctl)).sum(2)
    typical = ctl.nan_to_num(0).sum(2) / counted.clamp_min(1)  # (N, D): the mean control place's pull
    controlled = (counted > 0) & exists
    with_controls = controlled.any(1)
    per = controlled.sum(1).clamp_min(1)
    c = typical.where(controlled, torch.zeros_like(typical)).sum(1) / per
    d = (region.where(controlled, torch.zeros_like(region)).sum(1) / per - c)[with_controls]
    pull_mean, pull_z = _z(g)
    excess, excess_z = _z(d)
    return {"pull": pull_mean, "pull_z": pull_z, "excess": excess, "excess_z": excess_z,
            "control_pull": float(c[with_controls].mean()) if bool(with_controls.any()) else float("nan"),
            "tested": float(g.numel()), "with_controls": float(with_controls.sum())}


def _fires(t: Dict[str, float], level: float, min_pull: float, movable: bool) -> Tuple[bool, bool, bool]:
    """(test 1 rejects, these samples have controls, test 2 rejects or has nothing to run on), each test at one-sided
    ``level`` against Student's t with (samples - 1) degrees of freedom, and neither on fewer than two samples.

    ``movable``: some probe sample's region has a control place. A region no control place fits (too large to move)
    is judged on test 1 alone; a movable one needs test 2 too, so samples with fewer than two controlled ones (a rare
    donor class) cannot fire."""
    uses = t["pull_z"] >= t_critical(level, t["tested"] - 1) and t["pull"] >= min_pull
    has_controls = t["with_controls"] >= 2
    if has_controls:
        beyond = t["excess_z"] >= t_critical(level, t["with_controls"] - 1) and t["excess"] >= min_pull
    else:
        beyond = not movable
    return uses, has_controls, beyond


def t_tail(t: float, df: float) -> float:
    """``P(T > t)`` for Student's ``T`` with ``df`` degrees of freedom.

    ``P(T > t) = I_x(df/2, 1/2) / 2`` with ``x = df / (df + t^2)`` for ``t >= 0`` (``I`` the regularised incomplete
    beta function, evaluated by its continued fraction with the modified Lentz method), and ``1 - P(T > -t)`` below 0.
    """
    if t != t or df != df or df <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if t < 0:
        return 1.0 - t_tail(-t, df)
    return 0.5 * _beta_regularised(df / (df + t * t), df / 2, 0.5)


def _beta_regularised(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` (continued fraction, modified Lentz method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the continued fraction converges fast below this point
        return 1.0 - _beta_regularised(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * frac / a


@functools.lru_cache(maxsize=4096)
def t_critical(alpha: float, df: float) -> float:
    """The one-sided critical value ``t`` with ``P(T > t) = alpha`` for Student's ``T`` with ``df`` degrees of
    freedom (bisection on :func:`t_tail`; ``inf`` when ``df < 1``)."""
    if not df >= 1:
        return math.inf
    lo, hi = 0.0, 1.0
    while t_tail(hi, df) > alpha:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if t_tail(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9 * hi:
            break
    return hi


def decide(effects: Dict[str, Tensor], targets: Tensor, config: ShortcutConfig = ShortcutConfig()) -> Verdict:
    """The verdict from the forward passes of a plan (:func:`run_plan` of every probe sample) and the edits' target
    classes laid out alike (:meth:`InterventionPlan.targets`).

    The two tests run pooled over every donor class at level ``alpha / 2`` and for each donor class ``t`` on its own
    (the draws whose donor is of class ``t``; a mark on some classes only pulls toward those) at ``alpha / (2 C)``
    for ``C`` classes: by Bonferroni the family of ``1 + C`` tests keeps the false-alarm rate at most ``alpha``.
    """
    nan = float("nan")
    logp = effects["logp"].double()  # (N, D, P, 2)
    pull = logp[..., 0] - logp[..., 1]  # (N, D, P)
    exists = ~torch.isnan(pull[:, :, 0])
    if not bool(exists.any()):
        return Verdict(False, {"alarm": 0.0, "pull": nan, "pull_z": nan, "control_pull": nan, "excess": nan,
                               "excess_z": nan, "flip": nan, "controls": 0.0, "class": -1.0},
                       "no probe sample could be given content of another class: nothing to test")
    pooled = _both_tests(pull, exists)
    classes = sorted(int(c) for c in targets[exists].unique())
    level_pooled = config.alpha / 2
    level_class = config.alpha / (2 * max(len(classes), 1))
    per_class = {c: _both_tests(pull, exists & (targets == c)) for c in classes}
    hits = (effects["pred"][:, :, 0] == targets.unsqueeze(-1)).double()  # (N, D, 2): predicted the donor's label
    flip = float(hits[..., 0][exists].mean() - hits[..., 1][exists].mean())
    places = (~torch.isnan(pull[:, :, 1:])).sum(2).double()

    def strength(t: Dict[str, float]) -> float:
        z = min(t["pull_z"], t["excess_z"]) if t["with_controls"] >= 2 else t["pull_z"]
        return z if z == z else -math.inf

    best = max(classes, key=lambda c: (strength(per_class[c]), -c)) if classes else -1
    movable = pooled["with_controls"] > 0
    uses, has_controls, beyond = _fires(pooled, level_pooled, config.min_pull, movable)
    firing_classes = [c for c in classes if all(_fires(per_class[c], level_class, config.min_pull, movable)[::2])]
    alarm = bool((uses and beyond) or firing_classes)
    stats = {k: pooled[k] for k in ("pull", "pull_z", "control_pull", "excess", "excess_z")}
    stats.update(flip=flip, controls=float(places[exists].mean()), **{"class": float(best)})
    if uses and beyond:
        reason = (f"pasting the region's content from other classes pulls predictions toward their labels by "
                  f"{pooled['pull']:+.3f} nats (z {pooled['pull_z']:.1f})"
                  + (f", {pooled['excess']:+.3f} more than typical other places of its shape "
                     f"(z {pooled['excess_z']:.1f})"
                     if has_controls else "; the region is too large to move, so no control place could tell it from "
                     "ordinary content") + f"; it flips {flip:.2f} of them")
    elif firing_classes:
        t = per_class[firing_classes[0]]
        reason = (f"pasting the region's content from class {firing_classes[0]} pulls predictions toward that class by "
                  f"{t['pull']:+.3f} nats (z {t['pull_z']:.1f}), {t['excess']:+.3f} more than typical other places of "
                  f"its shape (z {t['excess_z']:.1f}); over all classes the pull is {pooled['pull']:+.3f}")
    elif not uses:
        one = per_class[best]
        reason = (f"the region's content pulls predictions toward its donor's label by {pooled['pull']:+.3f} nats "
                  f"(z {pooled['pull_z']:.1f}; strongest class {best}: z {one['pull_z']:.1f}); an alarm "
                  f"needs >= {config.min_pull:.3f} at z >= {t_critical(level_pooled, pooled['tested'] - 1):.2f} "
                  f"(class {best}: {t_critical(level_class, one['tested'] - 1):.2f})")
    else:
        reason = (f"the model reads class evidence from the region (pull {pooled['pull']:+.3f} nats, z "
                  f"{pooled['pull_z']:.1f}), but no more than from typical places of its shape (excess "
                  f"{pooled['excess']:+.3f}, z {pooled['excess_z']:.1f}; an alarm needs z >= "
                  f"{t_critical(level_pooled, pooled['with_controls'] - 1):.2f})")
    stats["alarm"] = float(alarm)
    return Verdict(alarm, stats, reason)
