"""Feature visualisation (pure torch): what does a filter detect, what does a class look like to the model.

:func:`render` runs gradient ascent on an image parametrisation (:class:`FourierParam`,
:class:`PixelParam`, :class:`GeneratorParam`) to maximise objectives (:func:`channel`,
:func:`neuron`, :func:`layer_objective`, :func:`class_logit`, :func:`direction`, weighted sums and
:func:`diversity`) under random transforms and regularisers.
"""

from lightning_xai.featvis._objectives import (Objective, channel, class_logit, direction, diversity, layer_objective,
                                               neuron)
from lightning_xai.featvis._optimize import FeatureVisResult, render
from lightning_xai.featvis._param import FourierParam, GeneratorParam, Parametrization, PixelParam, make_param
from lightning_xai.featvis._transforms import (L1, L2, Blur, Compose, Jitter, Pad, RandomRotate, RandomScale,
                                               Regularizer, TotalVariation, default_regularizers, default_transforms)

__all__ = [
    "Objective",
    "channel",
    "class_logit",
    "direction",
    "diversity",
    "layer_objective",
    "neuron",
    "FeatureVisResult",
    "render",
    "FourierParam",
    "GeneratorParam",
    "Parametrization",
    "PixelParam",
    "make_param",
    "L1",
    "L2",
    "Blur",
    "Compose",
    "Jitter",
    "Pad",
    "RandomRotate",
    "RandomScale",
    "Regularizer",
    "TotalVariation",
    "default_regularizers",
    "default_transforms",
]
