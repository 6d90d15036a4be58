"""One place for pictures: every image a callback logs is drawn here.

* maps and inputs as pixels (torch): colour maps, the colour scale of attribution maps
  (:func:`share_maps`: multiples of an even share, the unit of the fixed scale), overlays, cell sizes;
* figures a person reads on their own (:mod:`._figures`): a title, column headers, labels under every
  cell, a colour bar with its scale; text drawn with PIL in one pass, sized for TensorBoard's image card,
  and the :class:`Layout` of every text and region returned beside the image;
* charts with axes (scatter, bars) drawn with matplotlib's Agg canvas.
"""
from lightning_xai.render._canvas import CARD_WIDTH, Figure, Layout, TextBox, font_size
from lightning_xai.render._figures import (CYAN, MAX_COLUMNS, RED, attribution_colorbar, attribution_figure,
                                           auto_columns, evidence_figure, evolution_figure, grid_figure, image_figure,
                                           maps_figure, matrix_figure, spread)
from lightning_xai.render._maps import (DIVERGING_CMAP, SEQUENTIAL_CMAP, apply_colormap, fit_cells, heat, make_grid,
                                        normalize_maps, outline, overlay, pool_to, reduce_maps, robust_max,
                                        share_maps, to_display, upscale)
from lightning_xai.render._plots import barh_image, figure_to_image, scatter_image
from lightning_xai.render._sections import ColorBar

__all__ = [
    "CARD_WIDTH",
    "CYAN",
    "ColorBar",
    "DIVERGING_CMAP",
    "Figure",
    "Layout",
    "MAX_COLUMNS",
    "RED",
    "SEQUENTIAL_CMAP",
    "TextBox",
    "apply_colormap",
    "attribution_colorbar",
    "attribution_figure",
    "auto_columns",
    "barh_image",
    "evidence_figure",
    "evolution_figure",
    "figure_to_image",
    "fit_cells",
    "font_size",
    "grid_figure",
    "heat",
    "image_figure",
    "make_grid",
    "maps_figure",
    "matrix_figure",
    "normalize_maps",
    "outline",
    "overlay",
    "pool_to",
    "reduce_maps",
    "robust_max",
    "scatter_image",
    "share_maps",
    "spread",
    "to_display",
    "upscale",
]
