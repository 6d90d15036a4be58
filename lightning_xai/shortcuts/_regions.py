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
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import expected

RegionSpec = Union[Tensor, Tuple[int, int, int, int], str, Callable[[Tensor], Tensor]]
PRESETS = ("border", "corners", "top_left", "top_right", "bottom_left", "bottom_right", "center")


def preset_mask(name: str, size: Tuple[int, int]) -> Tensor:
    """The mask ``(H, W)`` of a named preset (see the module docstring for the sizes).

    Raises:
        ValueError: for an unknown name; the message lists the presets.

    Example:
        >>> preset_mask("top_left", (8, 8)).sum().item()
        4
    """
    if name not in PRESETS:
        raise ValueError(expected("region", "a box, a mask, a callable or one of the presets "
                                  + ", ".join(map(repr, PRESETS)), name))
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
            raise ValueError(expected(f"region {name!r}(inputs)", "a mask tensor (H, W) or (N, H, W)",
                                      type(mask).__name__))
    else:
        raise TypeError(expected(f"region {name!r}", "a mask, a box, a preset name or a callable", type(spec).__name__))
    if tuple(mask.shape) not in ((h, w), (n, h, w)):  # before expanding, which would raise torch's own error
        raise ValueError(expected(f"region {name!r}", f"a mask of shape ({h}, {w}) or ({n}, {h}, {w})", mask))
    mask = mask.detach().to(inputs.device) != 0
    if mask.ndim == 2:
        mask = mask.unsqueeze(0).expand(n, h, w)
    return mask.contiguous()
