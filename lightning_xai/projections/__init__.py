"""Layer projections, pure torch: capture activations, reduce them, PCA, class-separation scores.

These feed :class:`lightning_xai.callbacks.projections.ProjectionMonitor`, which sends each layer's
probe-set activations to TensorBoard's projector and logs a PCA scatter and a separation score.
"""
from lightning_xai.projections.activations import REDUCTIONS, capture_activations, reduce_activations
from lightning_xai.projections.pca import PCAResult, pca
from lightning_xai.projections.separation import SEPARATION_METHODS, class_separation, silhouette_score, variance_ratio

__all__ = [
    "PCAResult",
    "REDUCTIONS",
    "SEPARATION_METHODS",
    "capture_activations",
    "class_separation",
    "pca",
    "reduce_activations",
    "silhouette_score",
    "variance_ratio",
]
