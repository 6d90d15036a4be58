"""Feature visualisation (pure torch): what does a filter detect, what does a class look like to the model.

:func:`render` runs gradient ascent on an image parametrisation (:class:`FourierParam`,
:class:`PixelParam`, :class:`GeneratorParam`) to maximise objectives (:func:`channel`,
:func:`neuron`, :func:`layer_objective`, :func:`class_logit`, :func:`direction`, weighted sums and
:func:`diversity`) under random transforms and regularisers.
"""
from lightning_xai.featvis.objectives import (OUTPUT, Objective, channel, class_logit, direction, diversity,
                                              layer_objective, neuron, objectives_from_spec)
from lightning_xai.featvis.optimize import FeatureVisResult, render
from lightning_xai.featvis.param import (IMAGENET_COLOR_SQRT, FourierParam, GeneratorParam, Parametrization,
                                         PixelParam, color_correlation, make_param)
from lightning_xai.featvis.transforms import (L1, L2, Blur, Compose, Jitter, Pad, RandomRotate, RandomScale,
                                              Regularizer, TotalVariation, default_regularizers, default_transforms,
                                              gaussian_blur)

__all__ = [
    "OUTPUT", "Objective", "channel", "class_logit", "direction", "diversity", "layer_objective", "neuron",
    "objectives_from_spec", "FeatureVisResult", "render", "IMAGENET_COLOR_SQRT", "FourierParam", "GeneratorParam",
    "Parametrization", "PixelParam", "color_correlation", "make_param", "L1", "L2", "Blur", "Compose", "Jitter",
    "Pad", "RandomRotate", "RandomScale", "Regularizer", "TotalVariation", "default_regularizers",
    "default_transforms", "gaussian_blur",
]
