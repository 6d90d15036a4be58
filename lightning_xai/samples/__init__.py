"""Sample-level explanations (pure torch): which training samples support a prediction, which look mislabelled,
which validation samples the training data barely covers.

After TrustAI's analysis tools: cosine feature similarity (:func:`cosine_topk`, :func:`support`),
representer points (:func:`representer_points`, Yeh et al. 2018) and the helpers that capture
penultimate features (:func:`capture_features`).
"""

from lightning_xai.samples._features import capture_features, dataset_features
from lightning_xai.samples._representer import RepresenterFit, representer_points, suspect_scores
from lightning_xai.samples._similarity import cosine_topk, support

__all__ = [
    "RepresenterFit",
    "capture_features",
    "cosine_topk",
    "dataset_features",
    "representer_points",
    "support",
    "suspect_scores",
]
