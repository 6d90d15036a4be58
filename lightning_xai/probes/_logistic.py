"""Multinomial logistic-regression probes fitted with a few L-BFGS steps on stored features.

Slower than the closed-form ridge probe (``9-65 ms`` against ``<= 12 ms`` per layer on digits) and
usually within a few points of accuracy; offered for users who want the softmax probes of Alain &
Bengio (2016, https://arxiv.org/abs/1610.01644). Pure torch; gradients are enabled locally (also
inside ``torch.inference_mode``) and flow only into the probe's own fresh parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import check_positive_int, expected, gradient_context


@dataclass
class LogisticSolution:
    """``predict(X) = ((X - mean) / std) @ weight + bias`` (logits)."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    l2: float

    def predict(self, x: Tensor) -> Tensor:
        return ((x.to(self.weight.dtype) - self.mean) / self.std) @ self.weight + self.bias

    def classify(self, x: Tensor) -> Tensor:
        return self.predict(x).argmax(dim=1)


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 50) -> LogisticSolution:
    r"""Fit a softmax probe by L-BFGS on standardised features.

    .. math:: \min_{W, b} \frac1n \sum_i -\log \operatorname{softmax}(W^\top \tilde x_i + b)_{y_i}
       + \frac{\lambda}{2} \|W\|_F^2

    Args:
        x: features ``(N, d)``.
        y: labels ``(N,)`` in ``[0, num_classes)``.
        num_classes: number of classes.
        l2: :math:`\lambda`.
        max_iter: L-BFGS iterations.

    Returns:
        A :class:`LogisticSolution`.

    Example:
        >>> x = torch.randn(64, 3); y = (x[:, 0] > 0).long()
        >>> float((fit_logistic(x, y, 2).classify(x) == y).float().mean()) > 0.9
        True
    """
    check_positive_int("num_classes", num_classes)
    check_positive_int("max_iter", max_iter)
    if not l2 >= 0:
        raise ValueError(expected("l2", "a non-negative float", l2))
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(expected("x, y", "features (N, d) and labels (N,)", (tuple(x.shape), tuple(y.shape))))
    with gradient_context():
        xf = x.detach().clone().to(torch.float32)
        mean = xf.mean(0)
        std = xf.std(0, unbiased=False).clamp_min(1e-6)
        xs = (xf - mean) / std
        labels = y.detach().clone().long()
        weight = torch.zeros(x.shape[1], num_classes, requires_grad=True, device=x.device)
        bias = torch.zeros(num_classes, requires_grad=True, device=x.device)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xs @ weight + bias, labels) + 0.5 * l2 * (weight * weight).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return LogisticSolution(weight.detach(), bias.detach(), mean, std, float(l2))
