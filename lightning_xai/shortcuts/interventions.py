r"""Interventions, the ground truth of reliance: replace a region and see how much the predictions move.

For each sample the region is filled (``"mean"``: the probe set's mean image there; ``"blur"``: a
Gaussian blur of the sample itself; ``"swap"``: another probe sample's region, see :func:`transplant`) and the model
is run again. The same fill is applied to *control regions*: shifted copies of the region placed
elsewhere (:func:`~lightning_xai.shortcuts.regions.shifted_copies`). With ``placement="matched"`` (the
default) the controls of a sample are the placements where the fill changes the input by about as
much as it does in the region, so "the region moves the predictions more than its controls" means the
model is more sensitive there per unit of input change, not that the region happens to hold more
ink. Where no shifted copy of the whole region fits but it has several pieces (the four ``"corners"``), each
piece is moved on its own (:func:`~lightning_xai.shortcuts.regions.component_shifts`) and matched piece by
piece: the controls stay as compact as the region (scattered pixels move a convolutional network much less
for the same input change, so the region looked special), and a control's change is spread over its pieces
as the region's is (a mark in one corner is compared with one changed square and three quiet ones, not four
half-changed squares). Where neither fits (one piece: a background, a border ring), the controls are random
pixel sets outside the region whose fill changes the input as much (:func:`change_matched_sets`): equal-area
sets would have to cover the object. ``"random"`` draws the placements uniformly.

Each edit is scored per sample by the flip of the prediction and by the *output shift*, the total
variation distance between the predicted distributions before and after,
:math:`\tfrac12 \lVert p(x) - p(x') \rVert_1 \in [0, 1]`. The shift is continuous, so it moves
while a shortcut is being learned, before predictions flip.

Split over processes: with ``rows=(start, stop)`` the edits are planned for the whole set (partners, controls,
the mean image, every random draw) and the model runs on rows ``start:stop`` only, so the figures of each row do not
depend on how the set is shared out; the union of the shares is the one-process result.

Swap partners: sample ``i`` receives the region of the probe sample whose content there differs most
from its own (the "paste the watermark onto a car" test of Lapuschkin et al. 2019,
https://www.nature.com/articles/s41467-019-08987-4): an insertion where ``i`` lacks a mark the partner
has, a removal or a change of code otherwise. Controls of ``i`` use the same partner.
All randomness (control placement, tie breaks) comes from the ``generator`` passed in.

Controls stay off the partner's own region. A control pastes the partner's pixels at the control's place; where
the partner's region lies there (a mark in another corner, a background that is most of the image) the control
would paste the suspect content itself, and a model that reads it wherever it is (a mark in a random corner, a
background intensity) moves as much for the control as for the region: the region would look unspecial exactly
when the shortcut does not depend on its position. Fixed regions are unaffected (the partner's region is the region
itself, which no control covers). Where nothing but the partner's region changes the input as much as the region's
edit (bright marks on plain images), a sample's controls may still cover it: controls that cannot match give no
verdict at all (:func:`control_masks`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import check_choice, check_positive_int, chunks, expected, two_class_logits
from lightning_xai.attribution import gaussian_blur
from lightning_xai.shortcuts.alarm import MIN_MATCH
from lightning_xai.shortcuts.regions import component_shifts, piece_labels, scattered, shifted_copies

FILLS = ("mean", "blur", "swap")
PLACEMENTS = ("matched", "random")


def region_contents(x: Tensor, masks: Tensor) -> Optional[Tensor]:
    """Each sample's pixels inside its region in raster order ``(N, C, A)``, or None when the areas differ."""
    areas = masks.flatten(1).sum(1)
    if not bool((areas == areas[0]).all()):
        return None
    n, c = x.shape[:2]
    return x.flatten(2).transpose(1, 2)[masks.flatten(1)].view(n, -1, c).transpose(1, 2)  # (N, C, A)


def _positions(masks: Tensor) -> Tuple[Tensor, Tensor]:
    """Raster positions of each region, padded ``(N, A_max)``, and the areas ``(N,)``."""
    flat = masks.flatten(1)
    areas = flat.sum(1)
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)  # region pixels first, in raster order
    return order[:, :max(int(areas.max()), 1)], areas


def _resampled(x: Tensor, positions: Tensor, areas: Tensor, target: int, sources: Tensor,
               k: Optional[Tensor] = None) -> Tensor:
    """The region contents of ``sources`` stretched to the area of sample ``target`` ``(S, C, A_target)``:
    pixel ``k`` of the target's region gets pixel ``floor(k * A_j / A_target)`` of source ``j``'s region
    (only the target pixels ``k`` when given)."""
    a = int(areas[target])
    k = torch.arange(a, device=x.device) if k is None else k
    idx = positions[sources].gather(1, (k.unsqueeze(0) * areas[sources].unsqueeze(1)) // max(a, 1))  # (S, A)
    flat = x.flatten(2)[sources]  # (S, C, HW)
    return flat.gather(2, idx.unsqueeze(1).expand(-1, x.shape[1], -1))


def transplant(x: Tensor, masks: Tensor, partners: Tensor) -> Tensor:
    """Images whose region holds the partner's region content ``(N, C, H, W)``.

    Pixel ``k`` of sample ``i``'s region, in raster order, gets pixel ``k`` of partner ``j``'s region, so a
    mark in another corner moves with its layout intact. When the areas differ (per-sample masks such as a
    background) the partner's region content is stretched to fit: pixel ``k`` gets pixel
    ``floor(k A_j / A_i)`` of ``j``'s region, so the region receives the partner's region content (its
    background), never pixels from outside the partner's region (its object).
    """
    contents = region_contents(x, masks)
    if contents is not None:
        out = x.flatten(2).transpose(1, 2).clone()  # (N, HW, C)
        out[masks.flatten(1)] = contents[partners].transpose(1, 2).reshape(-1, x.shape[1])
        return out.transpose(1, 2).reshape(x.shape)
    positions, areas = _positions(masks)
    out = x.flatten(2).clone()  # (N, C, HW)
    for i in range(x.shape[0]):
        j = partners[i:i + 1]
        if int(j) == i or int(areas[i]) == 0 or int(areas[j]) == 0:  # its own content, or nothing to swap
            continue
        out[i][:, positions[i, :int(areas[i])]] = _resampled(x, positions, areas, i, j)[0]
    return out.view(x.shape)


def swap_partners(x: Tensor, masks: Tensor, generator: Optional[torch.Generator] = None,
                  groups: Optional[Tensor] = None, pool: Optional[Tensor] = None) -> Tensor:
    """For each sample, the index of the other sample whose region content differs most from its own ``(N,)``.

    Region contents are compared as :func:`transplant` would move them (raster order, stretched when the
    areas differ; then on at most 256 evenly spaced pixels of each region). Ties (e.g. identical blank regions) are broken at random with ``generator``. A single
    sample is its own partner (the swap changes nothing). With ``groups (N,)``, partners come from the
    same group where it has another member. With ``pool (N,)`` bool, partners come from the samples marked
    in it only, and only the samples outside it are given one (the others' entries are meaningless).
    """
    n = x.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    contents = region_contents(x, masks)
    if contents is not None:
        flat = contents.flatten(1).double()  # (N, C * A)
        dist = torch.cdist(flat, flat) ** 2
    else:
        positions, areas = _positions(masks)
        everyone = torch.arange(n, device=x.device)
        dist = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for i in range(n):
            a = int(areas[i])
            if a == 0 or (pool is not None and bool(pool[i])):
                continue
            # at most 256 evenly spaced pixels of the region: enough to rank partners, bounded for large images
            k = torch.linspace(0, a - 1, min(a, 256), device=x.device).round().long()
            own = x.flatten(2)[i][:, positions[i, k]]  # (C, k)
            dist[i] = ((_resampled(x, positions, areas, i, everyone, k) - own).double() ** 2).flatten(1).sum(1) * (a / k.numel())
        dist[:, areas == 0] = -float("inf")  # an empty region has nothing to give
    jitter = torch.rand(n, n, generator=generator, dtype=torch.float64).to(x.device) * 1e-6 * (dist[dist.isfinite()].abs().max() + 1e-12)
    dist = dist + jitter
    if groups is not None:  # partners from the same group (e.g. class) where the group has another member
        same = groups.view(-1, 1) == groups.view(1, -1)
        same.fill_diagonal_(False)
        dist = torch.where(same | ~same.any(1, keepdim=True), dist, torch.full_like(dist, -float("inf")))
    if pool is not None:
        dist[:, ~pool.to(dist.device)] = -float("inf")
    dist.fill_diagonal_(-float("inf"))
    return dist.argmax(1)


def fill_source(x: Tensor, fill: str, partners: Optional[Tensor] = None, reference: Optional[Tensor] = None,
                sigma: Optional[float] = None) -> Tensor:
    """What a region is filled with, as full images ``(N, C, H, W)`` (only pixels inside the region are used).

    Args:
        x: images ``(N, C, H, W)``.
        fill: ``"mean"`` (``reference`` ``(C, H, W)``, default the mean of ``x``), ``"blur"`` (Gaussian, ``sigma``
            default ``max(1, min(H, W) / 16)``) or ``"swap"`` (``x[partners]``).
    """
    check_choice("fill", fill, FILLS)
    if fill == "mean":
        ref = x.mean(0) if reference is None else reference.to(x)
        return ref.unsqueeze(0).expand_as(x)
    if fill == "blur":
        return gaussian_blur(x, sigma if sigma is not None else max(1.0, min(x.shape[-2:]) / 16))
    if partners is None:
        raise ValueError(expected("partners", "a LongTensor (N,) of swap partners for fill='swap'", None))
    return x[partners]


def change_matched_sets(mask: Tensor, change_map: Tensor, target: float, count: int,
                        generator: Optional[torch.Generator] = None, avoid: Optional[Tensor] = None) -> Tensor:
    """``count`` random pixel sets outside ``mask (H, W)`` whose fill changes the input about ``target`` ``(count, H, W)``.

    Each set is the prefix of a random order of the outside pixels whose summed change ``change_map (H, W)``
    is closest to ``target``, at most the region's area. Used as controls where no shifted copy of the
    region fits (a background, a border): equal-area sets would have to cover the object and change the
    input far more than the region's fill does, so they are matched on the change instead of the area.
    ``avoid (H, W)``: pixels placed after all the others in each order, so a set takes them only when the others
    cannot reach the target (the swap partner's own region, see :func:`control_masks`).
    """
    h, w = mask.shape
    free = ~mask.reshape(-1)
    last = torch.zeros_like(free) if avoid is None else free & avoid.reshape(-1)
    first, later = (free & ~last).nonzero().view(-1), last.nonzero().view(-1)
    outside = torch.cat([first, later])
    area = int(mask.sum())
    out = torch.zeros(count, h * w, dtype=torch.bool, device=mask.device)
    if outside.numel() == 0:
        return out.view(count, h, w)
    per_pixel = change_map.reshape(-1)[outside].double()

    def order() -> Tensor:
        head = torch.randperm(first.numel(), generator=generator)
        if later.numel() == 0:
            return head[:max(area, 1)]
        return torch.cat([head, first.numel() + torch.randperm(later.numel(), generator=generator)])[:max(area, 1)]

    orders = torch.stack([order() for _ in range(count)]).to(outside.device)  # (count, A)
    total = per_pixel[orders].cumsum(1)  # (count, A)
    cut = (total - target).abs().argmin(1, keepdim=True)  # the last pixel of each set
    take = torch.arange(orders.shape[1], device=orders.device).view(1, -1) <= cut
    out[torch.arange(count, device=out.device).view(-1, 1).expand_as(orders)[take], outside[orders[take]]] = True
    return out.view(count, h, w)


def control_masks(masks: Tensor, change_map: Tensor, num_controls: int, placement: str = "matched",
                  generator: Optional[torch.Generator] = None, max_candidates: int = 64,
                  region_change: Optional[Tensor] = None, avoid: Optional[Tensor] = None,
                  enough: float = MIN_MATCH) -> Tensor:
    r"""Control regions ``(N, K, H, W)``: equal-area placements of each sample's region elsewhere.

    Args:
        masks: region masks ``(N, H, W)``.
        change_map: per-pixel squared input change the fill causes ``(N, H, W)`` (used by ``"matched"``).
        num_controls: ``K``.
        placement: ``"matched"`` picks, per sample, the candidates whose input change is closest to the
            region's; ``"random"`` picks candidates at random. The candidates are the shifted copies of the region
            (:func:`~lightning_xai.shortcuts.regions.shifted_copies`), or where none fits its pieces moved one
            by one (:func:`~lightning_xai.shortcuts.regions.component_shifts`, up to ``4 * max_candidates`` distinct
            layouts); these are matched piece by piece,
            :math:`\sum_p |\Delta x(\text{moved}_p) - \Delta x_{region} \, s_p|` with :math:`s_p` piece
            :math:`p`'s share of the region's change. Where neither fits (one piece, such as a border ring or a
            background), ``"matched"`` draws :func:`change_matched_sets` outside the region and ``"random"``
            :func:`~lightning_xai.shortcuts.regions.scattered` sets. With fewer than ``K`` candidates they are
            reused.
        region_change: the region's own input change ``(N,)`` (default: ``change_map`` summed over the region).
        avoid: pixels ``(N, H, W)`` the controls of each sample stay off: candidates covering any come after all
            others, and change-matched sets take them last. With ``"matched"``, a sample none of whose other
            candidates changes the input at least ``enough`` times as much as its region's edit keeps them all in the
            ranking: its controls could not match otherwise, and the alarm gives no verdict on unmatched controls
            (``enough`` defaults to the alarm's :data:`~lightning_xai.shortcuts.alarm.MIN_MATCH`). :func:`intervene`
            passes the swap partner's own region (see the module docstring).
    """
    check_choice("placement", placement, PLACEMENTS)
    n, h, w = masks.shape
    if avoid is not None and (avoid.shape != masks.shape or avoid.dtype != torch.bool):
        raise ValueError(expected("avoid", f"None or a boolean tensor of shape ({n}, {h}, {w})", avoid))
    out = torch.zeros(n, num_controls, h, w, dtype=torch.bool, device=masks.device)
    unique, inverse = torch.unique(masks.flatten(1), dim=0, return_inverse=True)
    for u in range(unique.shape[0]):
        mask = unique[u].view(h, w)
        cands = shifted_copies(mask.cpu(), max_candidates, generator)
        moved = own = None
        if cands is None:  # the pieces moved one by one, kept apart so that each is matched to its own; matching each
            # piece needs a larger pool than matching one shape: every distinct layout of the usual draws is kept
            moved = component_shifts(mask.cpu(), 4 * max_candidates, generator, by_piece=True,
                                     attempts=4 * max_candidates)  # (S, P, H, W)
            if moved is not None:
                cands, moved = moved.any(1), moved.to(masks.device).flatten(2).to(change_map.dtype)  # (S, P, HW)
                labels, count = piece_labels(mask)  # as component_shifts numbered them
                own = (labels.flatten() == torch.arange(1, count + 1).view(-1, 1)).to(device=masks.device, dtype=change_map.dtype)
        rows = (inverse == u).nonzero().view(-1)
        if cands is None and placement == "matched":
            for i in rows.tolist():
                target = float((change_map[i] * mask).sum()) if region_change is None else float(region_change[i])
                out[i] = change_matched_sets(mask, change_map[i], target, num_controls, generator,
                                             None if avoid is None else avoid[i])
            continue
        cands = (scattered(mask.cpu(), max_candidates, generator) if cands is None else cands).to(masks.device)  # (S, H, W)
        if cands.shape[0] == 0:
            continue
        cf = cands.flatten(1).to(change_map.dtype)  # (S, HW)
        noise = torch.rand(rows.numel(), cands.shape[0], generator=generator).to(masks.device)  # (R, S)
        if placement == "matched":
            cm = change_map[rows].flatten(1)  # (R, HW)
            target = ((cm * masks[rows].flatten(1)).sum(1) if region_change is None else region_change[rows].to(cm))  # (R,)
            cand_change = cm @ cf.T  # (R, S) the input change of each candidate's fill
            if moved is None:
                score = (cand_change - target.view(-1, 1)).abs()  # (R, S)
            else:  # per piece: the change each moved piece makes against its own piece's share of the target
                share = cm @ own.T  # (R, P)
                total = share.sum(1, keepdim=True)
                share = torch.where(total > 0, share * (target.view(-1, 1) / total.clamp_min(torch.finfo(total.dtype).tiny)),
                                    target.view(-1, 1).expand_as(share) / share.shape[1])
                score = (torch.einsum("sph,rh->rsp", moved, cm) - share.unsqueeze(1)).abs().sum(2)  # (R, S)
            score = score + noise * 1e-6 * (score.max(1, keepdim=True).values + 1e-12)  # random tie breaks
        else:
            score = noise
        if avoid is not None:  # candidates covering avoided pixels come last, unless no other changes the input enough
            hit = (avoid[rows].flatten(1).to(cf.dtype) @ cf.T) > 0  # (R, S)
            if placement == "matched":
                fits = cand_change >= enough * target.view(-1, 1)  # (R, S)
                hit = hit & (fits & ~hit).any(1, keepdim=True)
            score = score + hit.to(score.dtype) * (score.max() + 1)
        order = score.argsort(1)
        pick = order[:, torch.arange(num_controls, device=order.device) % order.shape[1]]  # (R, K)
        out[rows] = cands[pick]
    return out


class _EditedRows:
    """The edited inputs of every sample, row ``i * (1 + K) + j``: sample ``i`` with its region filled (``j = 0``) or
    its control ``j`` filled, made only for the rows asked for (``rows[a:b]``): all ``N * (1 + K)`` at once would hold
    ``1 + K`` copies of the probe set (about 110 MB for 256 CIFAR-sized samples, 8 controls and 4 donor draws)."""

    def __init__(self, x: Tensor, region_edit: Tensor, source: Tensor, controls: Tensor) -> None:
        self.x, self.region_edit, self.source, self.controls = x, region_edit, source, controls
        self.k1 = controls.shape[1] + 1
        self.shape = (x.shape[0] * self.k1,) + tuple(x.shape[1:])

    def __getitem__(self, rows: slice) -> Tensor:
        index = torch.arange(self.shape[0], device=self.x.device)[rows]
        i, j = index // self.k1, index % self.k1  # sample, edit (0: the region)
        mask = self.controls[i, (j - 1).clamp(min=0)].unsqueeze(1)  # (R, 1, H, W)
        out = torch.where(mask, self.source[i], self.x[i])  # (R, C, H, W)
        first = j == 0
        out[first] = self.region_edit[i[first]]
        return out


def _predict(forward: Callable[[Tensor], Tensor], x: Any, batch_size: Optional[int]) -> Tensor:
    """Float32 logits ``(N, classes)`` of ``x`` (a tensor, or anything with ``shape`` that is sliced into rows, such as
    :class:`_EditedRows`) (one logit per sample read as two classes, as
    :func:`~lightning_xai._utils.class_probs` does)."""
    logits = []
    with torch.no_grad():
        for a, b in chunks(x.shape[0], batch_size):
            logits.append(two_class_logits(forward(x[a:b])).float())
    return torch.cat(logits)


def intervene(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    masks: Tensor,
    y: Optional[Tensor] = None,
    fill: str = "swap",
    num_controls: int = 8,
    placement: str = "matched",
    generator: Optional[torch.Generator] = None,
    reference: Optional[Tensor] = None,
    sigma: Optional[float] = None,
    batch_size: Optional[int] = 256,
    max_candidates: int = 64,
    groups: Optional[Tensor] = None,
    rows: Optional[Tuple[int, int]] = None,
    donors: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    donor_draws: int = 1,
    min_match: float = MIN_MATCH,
    return_edits: bool = False,
) -> Dict[str, Tensor]:
    """Replace the region (and its controls) in every sample and record what the model does.

    Forward-only: ``R * (1 + G * (1 + K))`` rows in batches of ``batch_size``, under ``torch.no_grad``, where ``R`` is
    the number of rows run (``N`` unless ``rows`` is given) and ``G`` the number of donor groups (1 without donors):
    the intact inputs once, then the region and its ``K`` controls edited for each group.

    Args:
        forward: ``inputs -> logits (N, classes)``.
        x: images ``(N, C, H, W)``; masks: the region ``(N, H, W)`` bool; y: labels ``(N,)`` or None.
        fill, reference, sigma: see :func:`fill_source`. num_controls, placement, max_candidates: see
            :func:`control_masks`. generator: private randomness (tie breaks, placements).
        min_match: the match the alarm will ask of the controls (:func:`~lightning_xai.shortcuts.alarm.shortcut_alarm`):
            a sample whose controls could not reach it off the swap partner's region may use that region
            (``enough`` of :func:`control_masks`).
        rows: ``(start, stop)``: plan the edits on all of ``x`` (partners, controls and every random draw as without
            ``rows``) but run the model on rows ``start:stop`` only, one process' share of a probe set.
        donors: ``(inputs (D, C, H, W), masks (D, H, W), labels (D,))``, swap only: the region content comes from these
            samples (training samples, say) instead of the other samples of ``x``, the one whose region content differs
            most from the receiver's (stretched as in :func:`transplant` where the areas differ; the controls take the
            same donor's pixels at their own places). Adds ``gain (N,)`` and ``control_gain (N, K)``: the change of the
            probability of the donor's label, which a learned shortcut raises (the region holds what went with that
            label in training) and an incidental sensitivity does not; and ``log_gain (N,)``, ``control_log_gain
            (N, K)``: the change of the *log*-probability of the donor's label, the same pull without the saturation
            of probabilities on samples confidently predicted as another class.
        donor_draws: with ``donors``, deal them into this many interleaved groups (in an order fixed by their labels
            and contents, so the groups do not depend on the order the donors come in); each sample receives the content of the most different donor of each group in turn, with
            controls drawn afresh, and its figures are the means over these edits (flips and correctness become
            shares). One edit per sample rests on a single donor: averaging a few makes the gain steadier. Costs that
            many times the forward passes.
        return_edits: also return what was edited, to show it: ``edited (N, C, H, W)`` the inputs with the region
            filled, ``controls (N, K, H, W)`` the control masks and ``region_pred (N,)`` the prediction on the edited
            input (with ``donors``, the first group's).

    Returns:
        Per-sample tensors of the rows run (``R`` of them, written ``N`` here; ``partner`` indexes all of ``x``): ``pred (N,)`` the prediction on the intact input, ``flip (N,)`` whether it changed
        when the region was filled, ``shift (N,)`` the output shift (total variation distance), ``delta (N, classes)``
        the change of the predicted probabilities, ``prob_drop (N,)`` the drop of the originally predicted class'
        probability, ``change (N,)`` the squared input change, ``control_flip (N, K)``, ``control_shift (N, K)``,
        ``control_delta (N, K, classes)``, ``control_prob_drop (N, K)`` and ``control_change (N, K)`` the same for
        the controls, ``partner (N,)`` (swap only, else -1; with ``donors`` an index into them, the first group's);
        with labels also ``correct (N,)``, ``region_correct (N,)`` and ``control_correct (N, K)``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> x, masks = torch.rand(6, 1, 4, 4), torch.zeros(6, 4, 4, dtype=torch.bool)
        >>> masks[:, :2, :2] = True
        >>> out = intervene(net, x, masks, num_controls=2, generator=torch.Generator().manual_seed(0))
        >>> out["control_flip"].shape
        torch.Size([6, 2])
    """
    check_choice("fill", fill, FILLS)
    check_positive_int("num_controls", num_controls)
    if x.ndim != 4:
        raise ValueError(expected("x", "images of shape (N, C, H, W)", x))
    n, _, h, w = x.shape
    if masks.shape != (n, h, w) or masks.dtype != torch.bool:
        raise ValueError(expected("masks", f"a boolean tensor of shape ({n}, {h}, {w})", masks))
    start, stop = _intervene_validate_rows(rows, n)
    check_positive_int("donor_draws", donor_draws)
    if isinstance(min_match, bool) or not (isinstance(min_match, (int, float)) and min_match >= 0):
        raise ValueError(expected("min_match", "a float >= 0", min_match))
    x = x.detach()
    base = _predict(forward, x[start:stop], batch_size)  # the intact inputs, once for every draw
    plan = dict(fill=fill, num_controls=num_controls, placement=placement, generator=generator, reference=reference,
                sigma=sigma, batch_size=batch_size, max_candidates=max_candidates, groups=groups, rows=(start, stop),
                enough=min_match, return_edits=return_edits)
    if donors is None:
        return _edit(forward, x, masks, y, base, **plan)
    donor_y = _intervene_validate_donors(donors, x, fill)
    draws = min(donor_draws, donors[0].shape[0])
    if draws == 1:
        return _edit(forward, x, masks, y, base, donors=(donors[0], donors[1], donor_y), **plan)
    order = _canonical_order(donors[0], donor_y)  # the groups do not depend on the order donors come in
    parts = [order[m::draws] for m in range(draws)]
    outs = [_edit(forward, x, masks, y, base, donors=tuple(t[part.to(t.device)] for t in (donors[0], donors[1], donor_y)),
                  **plan) for part in parts]
    return _mean_over_draws(outs, parts[0])


def _edit(forward: Callable[[Tensor], Tensor], x: Tensor, masks: Tensor, y: Optional[Tensor], base_logits: Tensor, *,
          fill: str, num_controls: int, placement: str, generator: Optional[torch.Generator], reference: Optional[Tensor],
          sigma: Optional[float], batch_size: Optional[int], max_candidates: int, groups: Optional[Tensor], enough: float,
          rows: Tuple[int, int], donors: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
          return_edits: bool = False) -> Dict[str, Tensor]:
    """One edit of every sample (region and controls) for :func:`intervene`, its arguments checked there;
    ``base_logits``: the logits of the intact rows ``rows``; ``donors``: one group's, labels long."""
    n = x.shape[0]
    start, stop = rows
    if donors is not None:
        donor_y = donors[2]
        every = torch.cat([x, donors[0].detach().to(x)])
        every_masks = torch.cat([masks, donors[1].to(masks.device)])
        pool = torch.arange(every.shape[0], device=x.device) >= n
        partners = swap_partners(every, every_masks, generator, pool=pool)[:n]
        source = every[partners]  # (N, C, H, W)
        region_edit = transplant(every, every_masks, torch.cat([partners, torch.arange(n, every.shape[0], device=x.device)]))[:n]
        partners = partners - n  # indices into the donors
    else:
        partners = swap_partners(x, masks, generator, groups) if fill == "swap" else None
        source = fill_source(x, fill, partners, reference, sigma)  # (N, C, H, W), position by position
        region_edit = transplant(x, masks, partners) if fill == "swap" else torch.where(masks.unsqueeze(1), source, x)
    change_map = ((source - x) ** 2).sum(1)  # (N, H, W)
    region_change = ((region_edit - x) ** 2).flatten(1).sum(1)  # (N,)
    # where the partner keeps its own region (its mark in another corner, its background) a control would paste
    # the suspect content itself: controls stay off it
    avoid = every_masks[partners + n] if donors is not None else masks[partners] if fill == "swap" else None
    controls = control_masks(masks, change_map, num_controls, placement, generator, max_candidates,
                             region_change, avoid, enough)  # (N, K, H, W)
    if (start, stop) != (0, n):  # the plan above is the whole set's; the model runs on this share only
        x, source, change_map, region_edit = x[start:stop], source[start:stop], change_map[start:stop], region_edit[start:stop]
        region_change, controls = region_change[start:stop], controls[start:stop]
        partners = None if partners is None else partners[start:stop]
        y = None if y is None else y[start:stop]
        n = stop - start
    k1 = num_controls + 1
    edits = _EditedRows(x, region_edit, source, controls)  # the N * (1 + K) edited inputs, built a batch at a time
    logits = torch.cat([base_logits, _predict(forward, edits, batch_size)])  # (N + N * (1 + K), classes)
    probs = logits.softmax(1)
    base, after = probs[:n], probs[n:].view(n, k1, -1)  # (N, classes), (N, 1 + K, classes)
    pred = base.argmax(1)
    pred_after = after.argmax(2)  # (N, 1 + K)
    flip = (pred_after != pred.unsqueeze(1)).float()
    delta = after - base.unsqueeze(1)  # (N, 1 + K, classes)
    shift = 0.5 * delta.abs().sum(2)  # (N, 1 + K) total variation distance
    p0 = base.gather(1, pred.view(-1, 1))  # (N, 1)
    drop = p0 - after.gather(2, pred.view(-1, 1, 1).expand(n, k1, 1)).squeeze(2)
    control_change = (change_map.unsqueeze(1) * controls).flatten(2).sum(2)  # (N, K)
    out = {"pred": pred, "flip": flip[:, 0], "prob_drop": drop[:, 0], "control_flip": flip[:, 1:],
           "control_prob_drop": drop[:, 1:], "shift": shift[:, 0], "control_shift": shift[:, 1:],
           "delta": delta[:, 0], "control_delta": delta[:, 1:], "change": region_change, "control_change": control_change,
           "partner": partners if partners is not None else torch.full((n,), -1, dtype=torch.long, device=x.device)}
    if return_edits:
        out.update(edited=region_edit, controls=controls, region_pred=pred_after[:, 0])
    if y is not None:
        y = y.to(pred.device).long()
        correct = (pred_after == y.unsqueeze(1)).float()
        out.update(correct=(pred == y).float(), region_correct=correct[:, 0], control_correct=correct[:, 1:])
    if donors is not None:
        label = donor_y.to(pred.device)[partners.to(pred.device)].view(n, 1, 1).expand(n, k1, 1)
        gain = delta.gather(2, label).squeeze(2)  # (N, 1 + K)
        logp = logits.log_softmax(1)  # exact where a probability is too small for float32
        log_delta = logp[n:].view(n, k1, -1) - logp[:n].unsqueeze(1)  # (N, 1 + K, classes)
        log_gain = log_delta.gather(2, label).squeeze(2)  # (N, 1 + K)
        out.update(gain=gain[:, 0], control_gain=gain[:, 1:], log_gain=log_gain[:, 0], control_log_gain=log_gain[:, 1:])
    return out


EDITS = ("edited", "controls", "region_pred")  # what intervene(..., return_edits=True) adds


def _canonical_order(x: Tensor, labels: Tensor) -> Tensor:
    """An order of samples that depends on their labels and contents only ``(D,)``: by label, then by a fixed
    projection of the content (as the same samples gathered from DDP ranks arrive in another order)."""
    flat = x.detach().flatten(1).float()  # no copy of float32 images, however large
    weights = torch.frac(torch.sin(torch.arange(1, flat.shape[1] + 1, dtype=torch.float64) * 12.9898) * 43758.5453)
    key = (flat @ weights.to(device=flat.device, dtype=flat.dtype)).cpu()
    by_content = torch.argsort(key, stable=True)
    return by_content[torch.argsort(labels.cpu()[by_content], stable=True)].to(x.device)


def _mean_over_draws(outs: List[Dict[str, Tensor]], first: Tensor) -> Dict[str, Tensor]:
    """One result from the per-group results of ``intervene(..., donor_draws=...)``: float figures averaged, the
    prediction kept, ``partner`` the first group's donor as an index into all donors (``first``: that group's indices),
    the edits (``return_edits``) the first group's."""
    merged = {key: torch.stack([o[key].float() for o in outs]).mean(0) for key in outs[0]
              if key not in ("pred", "partner", "correct") + EDITS}
    merged.update({key: outs[0][key] for key in EDITS if key in outs[0]})
    merged["pred"] = outs[0]["pred"]
    merged["partner"] = first.to(outs[0]["partner"].device)[outs[0]["partner"]]
    if "correct" in outs[0]:
        merged["correct"] = outs[0]["correct"]
    return merged


def _intervene_validate_donors(donors: Any, x: Tensor, fill: str) -> Tensor:
    """The donors' labels (long), after checking ``donors`` against the receivers ``x``."""
    if fill != "swap":
        raise ValueError(expected("fill", "'swap' when donors are given (they give the region content)", fill))
    ok = isinstance(donors, (tuple, list)) and len(donors) == 3 and all(isinstance(t, Tensor) for t in donors)
    if ok:
        dx, dm, dy = donors
        d = dx.shape[0]
        ok = (dx.ndim == 4 and d > 0 and tuple(dx.shape[1:]) == tuple(x.shape[1:]) and dm.dtype == torch.bool
              and tuple(dm.shape) == (d,) + tuple(x.shape[2:]) and tuple(dy.shape) == (d,))
    if not ok:
        raise ValueError(expected("donors", f"(inputs (D, {', '.join(map(str, x.shape[1:]))}), bool masks (D, "
                                            f"{', '.join(map(str, x.shape[2:]))}), labels (D,)) with D >= 1",
                                  type(donors).__name__ if not isinstance(donors, (tuple, list)) else
                                  [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in donors]))
    return donors[2].long()


def _intervene_validate_rows(rows: Optional[Tuple[int, int]], n: int) -> Tuple[int, int]:
    if rows is None:
        return 0, n
    ok = isinstance(rows, (tuple, list)) and len(rows) == 2 and all(isinstance(r, int) and not isinstance(r, bool)
                                                                       for r in rows)
    if not ok or not 0 <= rows[0] < rows[1] <= n:
        raise ValueError(expected("rows", f"a pair (start, stop) of ints with 0 <= start < stop <= {n}", rows))
    return int(rows[0]), int(rows[1])


def intervention_summary(results: Dict[str, Tensor]) -> Dict[str, float]:
    """Probe-set figures from :func:`intervene` outputs: ``flip_rate``, ``control_flip_rate``, ``prob_drop``,
    ``control_prob_drop`` and, with labels, ``acc``, ``acc_drop`` and ``control_acc_drop`` (accuracy before
    minus after; positive when the fill hurts)."""
    out = {"flip_rate": float(results["flip"].mean()), "control_flip_rate": float(results["control_flip"].mean()),
           "prob_drop": float(results["prob_drop"].mean()),
           "control_prob_drop": float(results["control_prob_drop"].mean())}
    if "correct" in results:
        acc = float(results["correct"].mean())
        out.update(acc=acc, acc_drop=acc - float(results["region_correct"].mean()),
                   control_acc_drop=acc - float(results["control_correct"].mean()))
    return out
