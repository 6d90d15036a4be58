"""Attribution maps in pure torch: gradients, SmoothGrad, Integrated Gradients, occlusion, Grad-CAM and LIME.

Every method is called as ``method(model, inputs, target=None, **options)`` and returns a detached
tensor shaped like ``inputs`` (Grad-CAM: ``(N, 1, H, W)``). The model is explained in eval mode with
every ``training`` flag restored after (a model in train mode gets a warning), so BatchNorm buffers
stay as they were and a sample's map does not depend on its batch-mates. The calls have no other side
effects: no ``param.grad``, no hooks left behind, the global RNG untouched, ``inputs`` never
modified; they work under ``torch.no_grad()`` and ``torch.inference_mode()``; and the rows per
forward pass are capped by an argument that does not change the result.

This package imports torch only (no Lightning, TensorBoard or matplotlib); Captum is imported
lazily by :func:`from_captum`.
"""

from lightning_xai._utils import Passes
from lightning_xai.attribution._grad_cam import grad_cam
from lightning_xai.attribution._gradient import input_x_gradient, saliency, smoothgrad
from lightning_xai.attribution._integrated_gradients import gaussian_blur, integrated_gradients
from lightning_xai.attribution._lime import grid_segments, lime
from lightning_xai.attribution._occlusion import occlusion
from lightning_xai.attribution._registry import (METHODS, CaptumMethod, Method, from_captum, get_method, is_signed,
                                                 method_pass_counts, method_passes)

__all__ = [
    "METHODS",
    "Method",
    "Passes",
    "CaptumMethod",
    "from_captum",
    "gaussian_blur",
    "get_method",
    "grad_cam",
    "grid_segments",
    "input_x_gradient",
    "integrated_gradients",
    "is_signed",
    "lime",
    "method_pass_counts",
    "method_passes",
    "occlusion",
    "saliency",
    "smoothgrad",
]
