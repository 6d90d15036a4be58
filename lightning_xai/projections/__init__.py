"""Layer projections, pure torch: capture activations (with the probes core's hooks and reducers), PCA,
class-separation scores.

These feed :class:`lightning_xai.ProjectionMonitor`, which sends each layer's
probe-set activations to TensorBoard's projector and logs a PCA scatter and a separation score.
"""

from lightning_xai.projections._activations import capture_activations
from lightning_xai.projections._pca import PCAResult, pca
from lightning_xai.projections._separation import SEPARATION_METHODS, class_separation, silhouette_score, variance_ratio

__all__ = [
    "PCAResult",
    "SEPARATION_METHODS",
    "capture_activations",
    "class_separation",
    "pca",
    "silhouette_score",
    "variance_ratio",
]
