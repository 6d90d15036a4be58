"""Sample-level explanations (pure torch): which training samples support a prediction, which look mislabelled,
which validation samples the training data barely covers.

After TrustAI's analysis tools: cosine feature similarity (:func:`cosine_topk`, :func:`support`),
representer points (:func:`representer_points`, Yeh et al. 2018) and the helpers that capture
penultimate features (:func:`capture_features`).
"""
from lightning_xai.samples.features import (
    capture_features,
    dataset_features,
    first_samples,
    last_linear,
    read_samples,
    resolve_feature_layer,
)
from lightning_xai.samples.representer import RepresenterFit, representer_points, representer_values, suspect_scores
from lightning_xai.samples.similarity import cosine_topk, support, unit_rows

__all__ = [
    "RepresenterFit",
    "capture_features",
    "cosine_topk",
    "dataset_features",
    "first_samples",
    "last_linear",
    "read_samples",
    "representer_points",
    "representer_values",
    "resolve_feature_layer",
    "support",
    "suspect_scores",
    "unit_rows",
]
