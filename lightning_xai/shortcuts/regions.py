"""Region specs to masks: user masks, boxes, named presets, callables, and control regions of equal area.

A *region* says where a suspected shortcut lives. Every spec becomes a boolean mask ``(N, H, W)``
for a batch of images ``(N, C, H, W)``:

* a tensor ``(H, W)`` (shared) or ``(N, H, W)`` (per sample); non-zero entries are inside;
* a box ``(top, left, height, width)`` in pixels;
* a preset name: ``"border"`` (a ring of width ``max(1, round(min(H, W) / 8))``), ``"corners"`` (four
  squares of side ``max(1, round(min(H, W) / 4))``), ``"top_left"``, ``"top_right"``,
  ``"bottom_left"``, ``"bottom_right"`` (one such square) or ``"center"`` (a centred square of half
  the short side);
* a callable ``inputs (N, C, H, W) -> masks (H, W) or (N, H, W)``.

Control regions are the same shape moved elsewhere (:func:`translates`): every in-bounds shift of
the mask that does not overlap it (:func:`shifted_copies`). Where none fits but the mask has several
pieces (the four ``"corners"``), each piece is moved on its own (:func:`component_shifts`), so the
controls stay as compact as the region. Where neither fits (a border ring, a large background) they are
random pixel sets of equal area drawn from outside the region first (:func:`scattered`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import expected

RegionSpec = Union[Tensor, Tuple[int, int, int, int], str, Callable[[Tensor], Tensor]]
PRESETS = ("border", "corners", "top_left", "top_right", "bottom_left", "bottom_right", "center")
SUSPECTS = ("corners", "border")  # presets where source tags and frames usually sit: unknown-region mode checks them


def preset_mask(name: str, size: Tuple[int, int]) -> Tensor:
    """The mask ``(H, W)`` of a named preset (see the module docstring for the sizes).

    Raises:
        ValueError: for an unknown name; the message lists the presets.

    Example:
        >>> preset_mask("top_left", (8, 8)).sum().item()
        4
    """
    if name not in PRESETS:
        raise ValueError(expected("region", "a box, a mask, a callable or one of the presets " + ", ".join(map(repr, PRESETS)), name))
    h, w = size
    mask = torch.zeros(h, w, dtype=torch.bool)
    side = max(1, round(min(h, w) / 4))
    if name == "border":
        b = max(1, round(min(h, w) / 8))
        mask[:b, :] = mask[-b:, :] = mask[:, :b] = mask[:, -b:] = True
    elif name == "center":
        s = max(1, min(h, w) // 2)
        top, left = (h - s) // 2, (w - s) // 2
        mask[top:top + s, left:left + s] = True
    else:
        corners = {"top_left": (0, 0), "top_right": (0, w - side), "bottom_left": (h - side, 0),
                   "bottom_right": (h - side, w - side)}
        chosen = corners.values() if name == "corners" else [corners[name]]
        for top, left in chosen:
            mask[top:top + side, left:left + side] = True
    return mask


def box_mask(box: Tuple[int, int, int, int], size: Tuple[int, int]) -> Tensor:
    """The mask ``(H, W)`` of a box ``(top, left, height, width)``, clipped to the image."""
    top, left, bh, bw = (int(v) for v in box)
    h, w = size
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[max(top, 0):max(min(top + bh, h), 0), max(left, 0):max(min(left + bw, w), 0)] = True
    return mask


def _is_box(spec: Any) -> bool:
    return (isinstance(spec, (tuple, list)) and len(spec) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) for v in spec))


def validate_region(name: str, spec: Any, label: Optional[str] = None) -> None:
    """Check a region spec without data (shape checks need the inputs and happen in :func:`region_masks`).

    Raises:
        ValueError / TypeError: with the house message naming the region (``label``, default ``region '<name>'``)
            and the accepted kinds.
    """
    what = "a mask tensor (H, W) or (N, H, W), a box (top, left, height, width), a preset name or a callable"
    label = label or f"region {name!r}"
    if isinstance(spec, Tensor):
        if spec.ndim not in (2, 3) or spec.numel() == 0:
            raise ValueError(expected(label, what, spec))
        if not bool((spec != 0).any()):
            raise ValueError(expected(label, "a mask with at least one pixel inside", "an empty mask"))
    elif _is_box(spec):
        if spec[0] < 0 or spec[1] < 0 or spec[2] <= 0 or spec[3] <= 0:
            raise ValueError(expected(label, "a box with top, left >= 0 and positive height and width", tuple(spec)))
    elif isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(expected(label, "a box, a mask, a callable or one of the presets "
                                      + ", ".join(map(repr, PRESETS)), spec))
    elif not callable(spec):
        raise TypeError(expected(label, what, type(spec).__name__))


def normalize_regions(regions: Any) -> Dict[str, RegionSpec]:
    """``None`` -> ``{}``; a dict ``name -> spec`` is validated; a preset name is named after itself; any
    other single spec is named ``"region"``.
    """
    if regions is None:
        return {}
    if isinstance(regions, Mapping):
        out: Dict[str, RegionSpec] = {}
        for name, spec in regions.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(expected("region name", "a non-empty str without '/'", name))
            validate_region(name, spec)
            out[name] = spec
        if not out:
            raise ValueError(expected("regions", "None or a non-empty dict name -> region", "an empty dict"))
        return out
    name = regions if isinstance(regions, str) else "region"
    validate_region(name, regions, label="regions")
    return {name: regions}


def region_masks(spec: RegionSpec, inputs: Tensor, name: str = "region") -> Tensor:
    """Boolean masks ``(N, H, W)`` of ``spec`` for images ``inputs (N, C, H, W)``.

    Raises:
        ValueError: when a mask's shape does not fit the inputs, or a box is not inside the images.
    """
    if inputs.ndim != 4:
        raise ValueError(expected("inputs", "images of shape (N, C, H, W)", inputs))
    n, _, h, w = inputs.shape
    if isinstance(spec, str):
        mask = preset_mask(spec, (h, w))
    elif _is_box(spec):
        top, left, bh, bw = spec
        if top < 0 or left < 0 or top + bh > h or left + bw > w:
            raise ValueError(expected(f"region {name!r}", f"a box (top, left, height, width) inside the {h}x{w} images",
                                      tuple(spec)))
        mask = box_mask(tuple(spec), (h, w))
    elif isinstance(spec, Tensor):
        mask = spec
    elif callable(spec):
        mask = spec(inputs)
        if not isinstance(mask, Tensor):
            raise ValueError(expected(f"region {name!r}(inputs)", "a mask tensor (H, W) or (N, H, W)", type(mask).__name__))
    else:
        raise TypeError(expected(f"region {name!r}", "a mask, a box, a preset name or a callable", type(spec).__name__))
    if tuple(mask.shape) not in ((h, w), (n, h, w)):  # before expanding, which would raise torch's own error
        raise ValueError(expected(f"region {name!r}", f"a mask of shape ({h}, {w}) or ({n}, {h}, {w})", mask))
    mask = mask.detach().to(inputs.device) != 0
    if mask.ndim == 2:
        mask = mask.unsqueeze(0).expand(n, h, w)
    return mask.contiguous()


def shift_mask(mask: Tensor, dy: int, dx: int) -> Tensor:
    """``mask (H, W)`` moved by ``(dy, dx)`` pixels; what leaves the image is dropped."""
    h, w = mask.shape
    out = torch.zeros_like(mask)
    src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def shifted_copies(mask: Tensor, max_candidates: int = 64, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Shifted copies of ``mask (H, W)`` that stay in bounds and do not overlap it ``(S, H, W)``, or None
    when no shift fits. At most ``max_candidates`` are kept (a random subset drawn from ``generator``)."""
    h, w = mask.shape
    rows = mask.any(1).nonzero().view(-1)
    cols = mask.any(0).nonzero().view(-1)
    if rows.numel() == 0:
        return mask.new_zeros((0, h, w))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    shifts = [(dy, dx) for dy in range(-r0, h - r1) for dx in range(-c0, w - c1) if (dy, dx) != (0, 0)]
    keep = [s for s in shifts if not bool((shift_mask(mask, *s) & mask).any())]
    if not keep:
        return None
    if len(keep) > max_candidates:
        order = torch.randperm(len(keep), generator=generator)[:max_candidates].tolist()
        keep = [keep[i] for i in sorted(order)]
    return torch.stack([shift_mask(mask, *s) for s in keep])


def translates(mask: Tensor, max_candidates: int = 64, generator: Optional[torch.Generator] = None) -> Tensor:
    """Control regions for ``mask (H, W)``: shifted copies of equal area that do not overlap it ``(S, H, W)``.

    All in-bounds shifts are enumerated and at most ``max_candidates`` are kept (a random subset drawn
    from ``generator``). When no shift fits, the pieces are moved one by one (:func:`component_shifts`);
    when that fails too, :func:`scattered` pixel sets are returned instead.
    """
    shifted = shifted_copies(mask, max_candidates, generator)
    if shifted is None:
        shifted = component_shifts(mask, max_candidates, generator)
    return scattered(mask, max_candidates, generator) if shifted is None else shifted


def connected_components(mask: Tensor) -> Tuple[Tensor, int]:
    """Labels of the 8-connected pieces of ``mask (H, W)``: ``(H, W)`` long, 0 outside, ``1..count`` numbered in the
    raster order of each piece's first pixel, and ``count``.

    Example:
        >>> labels, count = connected_components(preset_mask("corners", (8, 8)))
        >>> count, labels[0, 0].item(), labels[7, 7].item()
        (4, 1, 4)
    """
    h, w = mask.shape
    inside = (mask != 0).cpu().tolist()
    labels = [[0] * w for _ in range(h)]
    count = 0
    for r in range(h):
        for c in range(w):
            if not inside[r][c] or labels[r][c]:
                continue
            count += 1
            labels[r][c] = count
            stack = [(r, c)]
            while stack:  # flood fill over the 8 neighbours
                i, j = stack.pop()
                for a in range(max(i - 1, 0), min(i + 2, h)):
                    for b in range(max(j - 1, 0), min(j + 2, w)):
                        if inside[a][b] and not labels[a][b]:
                            labels[a][b] = count
                            stack.append((a, b))
    return torch.tensor(labels, dtype=torch.long, device=mask.device).view(h, w), count


def _misses(occupied: Tensor, piece: Tensor) -> Tensor:
    """Where the box ``piece (h, w)`` can go without touching ``occupied (..., H, W)``: boolean maps of its top-left
    corners ``(..., H - h + 1, W - w + 1)``."""
    h, w = piece.shape
    height, width = occupied.shape[-2:]
    rows, cols = height - h + 1, width - w + 1
    offsets = piece.nonzero().tolist()
    if len(offsets) > 16:  # one cross-correlation counts the occupied pixels each corner would cover (exact integers)
        lead = occupied.shape[:-2]
        hits = F.conv2d(occupied.reshape(-1, 1, height, width).float(), piece.float().view(1, 1, h, w))
        return (hits == 0).view(*lead, rows, cols)
    hit = torch.zeros(*occupied.shape[:-2], rows, cols, dtype=torch.bool)
    for dy, dx in offsets:  # the corners that put pixel (dy, dx) of the piece on an occupied one
        hit |= occupied[..., dy:dy + rows, dx:dx + cols]
    return ~hit


_PIECES: Dict[Tuple[Tuple[int, int], bytes], Any] = {}  # mask -> its pieces (see _pieces)
_PIECES_BYTES = [0]  # what the cache holds, about; it is emptied rather than grow past _PIECES_MAX_BYTES
_PIECES_MAX_BYTES = 64 * 2 ** 20


def _pieces(region: Tensor) -> Optional[Tuple[Tensor, int, list, list, list]]:
    """What :func:`component_shifts` needs of ``region (H, W)`` bool (CPU) that does not depend on the draws, cached
    (the same masks come back on every epoch and every donor draw): ``(labels, count, crops, frees, halos)``, with
    each piece's bounding-box crop, the top-left corners where it misses the region, and the offsets ``(dy, dx)``
    of the piece and its 8 neighbours; None when :func:`component_shifts` has no answer (fewer than two pieces, a
    piece larger than the rest of the image, or one with no place off the region). Treat as read-only. The cache
    is emptied when it would pass 64 MiB (a 224 x 224 mask of ten pieces takes about 1 MiB)."""
    key = (tuple(region.shape), region.contiguous().numpy().tobytes())
    if key in _PIECES:
        return _PIECES[key]
    labels, count = connected_components(region)
    found = None
    if count >= 2 and int(torch.bincount(labels.flatten())[1:].max()) <= int((~region).sum()):
        crops, frees, halos = [], [], []
        for c in range(1, count + 1):
            piece = labels == c
            rows, cols = piece.any(1).nonzero().view(-1), piece.any(0).nonzero().view(-1)
            crops.append(piece[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1])
            frees.append(_misses(region, crops[-1]))  # (H - h + 1, W - w + 1)
            if not bool(frees[-1].any()):
                break
            grown = ~_misses(F.pad(crops[-1], (2, 2, 2, 2)), torch.ones(3, 3, dtype=torch.bool))  # piece + neighbours
            halos.append(grown.nonzero().unbind(1))
        else:
            found = (labels, count, crops, frees, halos)
    size = len(key[1]) + (0 if found is None else labels.numel() * 8 + sum(f.numel() for f in found[3])
                          + sum(2 * d.numel() * 8 for d, _ in found[4]))
    if _PIECES_BYTES[0] + size > _PIECES_MAX_BYTES:
        _PIECES.clear()
        _PIECES_BYTES[0] = 0
    _PIECES[key] = found
    _PIECES_BYTES[0] += size
    return found


def piece_labels(mask: Tensor) -> Tuple[Tensor, int]:
    """:func:`connected_components` of ``mask (H, W)`` on the CPU, the numbering :func:`component_shifts` gives its
    pieces (``by_piece=True``), cached with its other per-mask work where it has an answer.

    Example:
        >>> labels, count = piece_labels(preset_mask("corners", (8, 8)))
        >>> count, labels[7, 7].item()
        (4, 4)
    """
    region = mask.detach().cpu() != 0
    pieces = _pieces(region)
    return connected_components(region) if pieces is None else (pieces[0], pieces[1])


def component_shifts(mask: Tensor, max_candidates: int = 64, generator: Optional[torch.Generator] = None,
                     by_piece: bool = False, attempts: Optional[int] = None) -> Optional[Tensor]:
    """Controls for a region of several pieces where no shifted copy of the whole fits: each piece moved on its own
    ``(S, H, W)``, or None.

    Each candidate moves every 8-connected piece (:func:`connected_components`) by its own random in-bounds shift,
    drawn uniformly among the placements that miss the region and keep at least one pixel away from the pieces
    already moved (pieces are placed largest first). A candidate therefore has the region's area and the
    region's pieces, none of which overlaps the region. Four corner squares become four squares elsewhere, as
    compact as the region, where pixel sets (:func:`scattered`) would move a convolutional network far less for the
    same input change. ``attempts`` layouts are drawn at once from ``generator`` (a draw fails when a piece finds no
    room); the first ``max_candidates`` distinct ones are kept.

    Args:
        mask: the region ``(H, W)``.
        max_candidates: at most this many candidates ``S``.
        generator: all the randomness (the placements); the same seed gives the same candidates.
        by_piece: return each moved piece on its own ``(S, P, H, W)``, piece ``p`` being label ``p + 1`` of
            :func:`connected_components` (``.any(1)`` is the default output).
        attempts: how many layouts to draw (default ``4 * max_candidates``); the cost grows with it.

    Returns:
        The candidates ``(S, H, W)`` (or ``(S, P, H, W)``) with ``1 <= S <= max_candidates``, or None when the mask
        has fewer than two pieces, some piece has no placement off the region, or no draw succeeds.

    Example:
        >>> cands = component_shifts(preset_mask("corners", (8, 8)), 5, torch.Generator().manual_seed(0))
        >>> cands.shape, cands.flatten(1).sum(1).tolist()
        (torch.Size([5, 8, 8]), [16, 16, 16, 16, 16])
    """
    region = mask.detach().cpu() != 0
    pieces = _pieces(region)
    if pieces is None:  # fewer than two pieces, a piece larger than the rest of the image (a background: nowhere
        return None     # to go) or one with no place off the region
    _, count, crops, frees, halos = pieces
    h, w = region.shape
    draws = 4 * max_candidates if attempts is None else attempts
    halo = torch.zeros(draws, h + 2, w + 2, dtype=torch.bool)  # the moved pieces and their 8 neighbours, padded by 1
    corner = torch.zeros(draws, count, 2, dtype=torch.long)  # top-left of each moved piece
    alive = torch.ones(draws, dtype=torch.bool)
    every = torch.arange(draws).view(-1, 1)
    for c in sorted(range(count), key=lambda c: -int(crops[c].sum())):  # largest first, as in greedy packing
        allowed = frees[c] & _misses(halo[:, 1:-1, 1:-1], crops[c])  # (D, H - h + 1, W - w + 1)
        score = torch.where(allowed, torch.rand(allowed.shape, generator=generator), torch.tensor(-1.0))
        best = score.flatten(1).argmax(1)  # (D,) uniform among the allowed placements
        top, left = best // allowed.shape[2], best % allowed.shape[2]
        alive &= allowed.flatten(1).any(1)  # a draw fails when a piece finds no room
        dy, dx = halos[c]  # at (top, left) of the padded halo: the piece at (top, left) of the image
        halo[every, top.view(-1, 1) + dy, left.view(-1, 1) + dx] = True
        corner[:, c, 0], corner[:, c, 1] = top, left
    tried = alive.nonzero().view(-1)
    if tried.numel() == 0:
        return None
    # the first max_candidates distinct layouts, in draw order: each layout's first draw, the earliest ones
    _, layout = torch.unique(corner[tried].flatten(1), dim=0, return_inverse=True)
    first = torch.full((int(layout.max()) + 1,), tried.numel(), dtype=torch.long).scatter_reduce(
        0, layout, torch.arange(tried.numel()), "amin")
    keep = tried[first.sort().values[:max_candidates]]  # (S,)
    out = torch.zeros(keep.numel(), count, h, w, dtype=torch.bool)  # (S, P, H, W)
    for c in range(count):
        dy, dx = crops[c].nonzero().unbind(1)
        out[torch.arange(keep.numel()).view(-1, 1), c, corner[keep, c, 0].view(-1, 1) + dy, corner[keep, c, 1].view(-1, 1) + dx] = True
    return (out if by_piece else out.any(1)).to(mask.device)


def scattered(mask: Tensor, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``count`` random pixel sets ``(count, H, W)`` of the same area as ``mask``, outside it where possible."""
    h, w = mask.shape
    flat = mask.view(-1)
    area = int(flat.sum())
    outside, inside = (~flat).nonzero().view(-1), flat.nonzero().view(-1)
    out = torch.zeros(count, h * w, dtype=torch.bool, device=mask.device)
    for k in range(count):
        pick_out = outside[torch.randperm(outside.numel(), generator=generator)[:area].to(outside.device)]
        rest = area - pick_out.numel()
        pick_in = inside[torch.randperm(inside.numel(), generator=generator)[:rest].to(inside.device)]
        out[k, pick_out] = True
        out[k, pick_in] = True
    return out.view(count, h, w)


def iou(a: Tensor, b: Tensor) -> float:
    """Intersection over union of two boolean masks of the same shape."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else 0.0
