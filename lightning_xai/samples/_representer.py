"""Representer point selection: a prediction as a weighted sum over the training samples.

Yeh et al., 2018, "Representer Point Selection for Explaining Deep Neural Networks"
(https://arxiv.org/abs/1811.09720). The last linear layer is refitted with L2 on frozen penultimate
features ``f_i``; at its stationary point the weights are a combination of the training features,
so every logit splits into one term per training sample. Pure torch, float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import check_choice, check_positive_int, chunks, expected, gradient_context, single_thread

SUSPECT_MODES = ("label", "norm")


@dataclass
class RepresenterFit:
    """A refitted last layer and its representer weights.

    Attributes:
        weight: refitted weights ``Theta`` ``(C, D')``, float64 (``D' = D + 1`` when ``fit_bias``: the
            bias is the last column, applied to a constant feature of 1).
        alpha: representer weights ``(N, C)``, float64: ``Theta = sum_i alpha_i f_i^T``.
        features: the training features used, ``(N, D')`` float64 (with the constant column when ``fit_bias``).
        lam: the L2 strength.
        fit_bias: whether a constant feature was appended.
        loss: the final objective value.
        grad_norm: max-abs gradient of the objective at the end (0 at the exact stationary point).
        stationarity_gap: ``max |Theta - alpha^T F|``, how far the decomposition is from exact.
        iterations: optimiser iterations used.
    """

    weight: Tensor
    alpha: Tensor
    features: Tensor
    lam: float
    fit_bias: bool
    loss: float
    grad_norm: float
    stationarity_gap: float
    iterations: int

    def augment(self, features: Tensor) -> Tensor:
        """Features ``(M, D)`` as float64 on the fit's device, with the constant column when ``fit_bias``."""
        f = features.detach().to(device=self.weight.device, dtype=torch.float64)
        return torch.cat([f, torch.ones_like(f[:, :1])], dim=1) if self.fit_bias else f

    def logits(self, features: Tensor) -> Tensor:
        """The refitted layer's logits ``Theta f_t`` ``(M, C)``."""
        return self.augment(features) @ self.weight.T

    def values(self, features: Tensor, target: Union[None, int, Tensor] = None) -> Tensor:
        """Representer values: see :func:`representer_values`."""
        return representer_values(self, features, target)


def _check_float_matrix(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.ndim != 2 or not value.is_floating_point():
        raise ValueError(expected(name, "a float tensor of shape (N, D)", value if isinstance(value, Tensor)
                                  else type(value).__name__))


def _representer_points_validate_args(features: Tensor, targets: Tensor, lam: float, max_iter: int, tol: float) -> None:
    _check_float_matrix("features", features)
    if not isinstance(targets, Tensor):
        raise TypeError(expected("targets", "a tensor of probabilities (N, C) or class indices (N,)",
                                 type(targets).__name__))
    if targets.shape[0] != features.shape[0] or targets.ndim not in (1, 2):
        n = features.shape[0]
        raise ValueError(expected("targets", f"probabilities ({n}, C) or class indices ({n},)",
                                  targets))
    if targets.ndim == 2 and not targets.is_floating_point():
        raise ValueError(expected("targets", "float probabilities when 2-D", targets))
    if targets.ndim == 1 and targets.is_floating_point():
        raise ValueError(expected("targets", "integer class indices when 1-D", targets))
    if features.shape[0] == 0:
        raise ValueError(expected("features", "at least one training sample", features))
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
        raise ValueError(expected("lam", "a positive float", lam))
    check_positive_int("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(expected("tol", "a positive float", tol))


def _objective(weight: Tensor, f: Tensor, p: Tensor, lam: float) -> Tensor:
    logp = torch.log_softmax(f @ weight.T, dim=1)  # (N, C)
    return -(p * logp).sum(1).mean() + lam * weight.pow(2).sum()


_NEWTON_MAX_PARAMS = 4096  # exact Hessian (params x params, float64) up to 128 MB


def _hessian(s: Tensor, f: Tensor, lam: float) -> Tensor:
    """Hessian of the objective w.r.t. ``vec(Theta)`` (row-major ``(C, D)``): ``(C*D, C*D)``."""
    n, c, d = f.shape[0], s.shape[1], f.shape[1]
    a = (torch.diag_embed(s) - s.unsqueeze(2) * s.unsqueeze(1)).reshape(n, c * c)  # (N, C*C) softmax Jacobians
    hess = torch.zeros(c * c, d * d, dtype=f.dtype, device=f.device)
    for start, stop in chunks(n, max(1, (1 << 22) // (d * d))):  # outer products in ~32 MB blocks
        outer = (f[start:stop].unsqueeze(2) * f[start:stop].unsqueeze(1)).reshape(stop - start, d * d)
        hess += a[start:stop].T @ outer  # (C*C, D*D)
    hess = hess.reshape(c, c, d, d).permute(0, 2, 1, 3).reshape(c * d, c * d) / n
    return hess + 2.0 * lam * torch.eye(c * d, dtype=f.dtype, device=f.device)


def _newton(weight: Tensor, f: Tensor, p: Tensor, lam: float, max_iter: int, tol: float) -> Tuple[Tensor, int]:
    """Damped Newton with Armijo backtracking: the objective is strongly convex (``lam > 0``), so this
    converges globally and, near the optimum, quadratically: the gradient drops to rounding level and the
    representer decomposition becomes exact to ~1e-12."""
    n = f.shape[0]
    loss = _objective(weight, f, p, lam)
    for it in range(1, max_iter + 1):
        s = torch.softmax(f @ weight.T, dim=1)  # (N, C)
        grad = 2.0 * lam * weight + (s - p).T @ f / n  # (C, D)
        if float(grad.abs().max()) <= tol:
            return weight, it - 1
        chol = torch.linalg.cholesky(_hessian(s, f, lam))  # symmetric positive definite
        step = torch.cholesky_solve(grad.reshape(-1, 1), chol).reshape(weight.shape)
        slope, t = float((grad * step).sum()), 1.0
        while True:
            candidate = weight - t * step
            new_loss = _objective(candidate, f, p, lam)
            if float(new_loss) <= float(loss) - 1e-4 * t * slope:
                break
            if abs(float(new_loss) - float(loss)) <= 1e-13 * max(1.0, abs(float(loss))):
                # the loss no longer resolves the step at float64 precision: decide by the gradient
                s_new = torch.softmax(f @ candidate.T, dim=1)
                grad_new = 2.0 * lam * candidate + (s_new - p).T @ f / n
                if float(grad_new.abs().max()) < float(grad.abs().max()):
                    break
            t *= 0.5
            if t < 1e-10:
                return weight, it  # no descent left
        weight, loss = candidate, new_loss
    return weight, max_iter


def _representer_points_compute(features: Tensor, targets: Tensor, num_classes: Optional[int], lam: float,
                                fit_bias: bool, max_iter: int, tol: float,
                                init: Optional[Tensor]) -> RepresenterFit:
    with gradient_context():
        f = features.detach().to(torch.float64).clone()  # a normal tensor even under inference_mode
        if fit_bias:
            f = torch.cat([f, torch.ones_like(f[:, :1])], dim=1)  # (N, D + 1)
        if targets.ndim == 1:
            c = int(num_classes) if num_classes is not None else int(targets.max()) + 1
            p = torch.zeros(f.shape[0], c, dtype=torch.float64, device=f.device)
            p[torch.arange(f.shape[0], device=f.device), targets.to(f.device).long()] = 1.0
        else:
            p = targets.detach().to(device=f.device, dtype=torch.float64).clone()
        n, c = f.shape[0], p.shape[1]
        weight = torch.zeros(c, f.shape[1], dtype=torch.float64, device=f.device)
        if init is not None and tuple(init.shape) == (c, f.shape[1]):
            weight = init.detach().to(weight).clone()
        iterations = 0
        if c * f.shape[1] > _NEWTON_MAX_PARAMS:  # too many parameters for an exact Hessian: L-BFGS
            weight.requires_grad_(True)
            opt = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                                    tolerance_change=0.0, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad()  # the private `weight` only; model parameters are never touched
                loss = _objective(weight, f, p, lam)
                loss.backward()
                return loss

            opt.step(closure)
            iterations = int(opt.state[weight].get("n_iter", 0))
            weight = weight.detach()
        with torch.no_grad():
            if c * f.shape[1] <= _NEWTON_MAX_PARAMS:
                with single_thread(f.device.type == "cpu"):  # many small ops and a small Cholesky
                    weight, iterations = _newton(weight, f, p, lam, max_iter, tol)
            z = f @ weight.T  # (N, C) pre-softmax logits
            dl_dz = torch.softmax(z, dim=1) - p  # d CE(softmax(z_i), p_i) / d z_i
            alpha = -dl_dz / (2.0 * lam * n)  # (N, C)
            gap = float((weight - alpha.T @ f).abs().max())
            loss = float(_objective(weight, f, p, lam))
            grad = 2.0 * lam * weight + dl_dz.T @ f / n
    return RepresenterFit(weight=weight, alpha=alpha, features=f, lam=float(lam), fit_bias=fit_bias, loss=loss,
                          grad_norm=float(grad.abs().max()), stationarity_gap=gap, iterations=iterations)


def representer_points(
    features: Tensor,
    targets: Tensor,
    lam: float = 1e-3,
    fit_bias: bool = True,
    num_classes: Optional[int] = None,
    max_iter: int = 500,
    tol: float = 1e-12,
    init: Optional[Tensor] = None,
) -> RepresenterFit:
    r"""Refit a softmax layer with L2 on frozen features and return its representer weights.

    Minimises, in float64 by damped Newton steps (exact Hessian, up to 4096 weights) or else full-batch
    L-BFGS,

    .. math:: \frac{1}{n} \sum_i \mathrm{CE}(\mathrm{softmax}(\Theta f_i), p_i) + \lambda \lVert \Theta \rVert^2,

    then sets

    .. math:: \alpha_i = -\frac{1}{2 \lambda n} \frac{\partial L}{\partial z_i}
              = \frac{p_i - \mathrm{softmax}(z_i)}{2 \lambda n}

    with :math:`z_i = \Theta f_i`. At the stationary point :math:`\Theta = \sum_i \alpha_i f_i^\top`, so each
    logit of a test sample decomposes exactly as :math:`\Theta f_t = \sum_i \alpha_i\, f_i^\top f_t`
    (Yeh et al., 2018, https://arxiv.org/abs/1811.09720). The decomposition needs a layer without a
    separate bias; ``fit_bias=True`` appends a constant feature instead (its weight acts as the bias).

    Args:
        features: frozen penultimate features ``(N, D)``.
        targets: the targets ``p_i``: the model's probabilities ``(N, C)`` (the paper's choice, so the refit
            mimics the model) or class indices ``(N,)`` (one-hot labels).
        lam: L2 strength :math:`\lambda > 0`.
        fit_bias: append a constant feature of 1 (see above).
        num_classes: number of classes when ``targets`` are indices (default: ``max + 1``).
        max_iter: Newton or L-BFGS iterations at most.
        tol: stop when the max-abs gradient is below this.
        init: optional starting weights ``(C, D')`` (e.g. the model's own last layer).

    Returns:
        A :class:`RepresenterFit`; ``fit.stationarity_gap`` says how exact the decomposition is.

    Raises:
        ValueError: on shapes that do not match or non-positive ``lam``.

    Example:
        >>> f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> fit = representer_points(f, (f[:, 0] > 0).long(), lam=1e-2)
        >>> bool((fit.logits(f) - fit.values(f).sum(1)).abs().max() < 1e-6)
        True
    """
    _representer_points_validate_args(features, targets, lam, max_iter, tol)
    return _representer_points_compute(features, targets, num_classes, float(lam), bool(fit_bias), max_iter,
                                       float(tol), init)


def representer_values(fit: RepresenterFit, features: Tensor, target: Union[None, int, Tensor] = None) -> Tensor:
    r"""Each training sample's share of each test logit: :math:`\alpha_{i c}\, f_i^\top f_t`.

    Args:
        fit: a :class:`RepresenterFit`.
        features: test features ``(M, D)`` (without the constant column; it is added when ``fit_bias``).
        target: None for every class, an int for one class, or a LongTensor ``(M,)`` with one class per test sample.

    Returns:
        ``(M, N, C)`` when ``target`` is None, else ``(M, N)``. Summed over the training axis it gives
        the refitted logits (:meth:`RepresenterFit.logits`) up to ``fit.stationarity_gap``.
        Positive values are *excitatory* training samples (they push towards the class), negative ones
        *inhibitory*.
    """
    _check_float_matrix("features", features)
    expected_dim = fit.features.shape[1] - (1 if fit.fit_bias else 0)
    if features.shape[1] != expected_dim:
        raise ValueError(expected("features", f"features of dimension {expected_dim}", features))
    sim = fit.augment(features) @ fit.features.T  # (M, N) f_t^T f_i
    if target is None:
        return sim.unsqueeze(2) * fit.alpha.unsqueeze(0)  # (M, N, C)
    if isinstance(target, int) and not isinstance(target, bool):
        return sim * fit.alpha[:, target].unsqueeze(0)
    if isinstance(target, Tensor) and target.ndim == 1 and target.shape[0] == features.shape[0]:
        return sim * fit.alpha[:, target.to(fit.alpha.device).long()].T  # (M, N)
    raise ValueError(expected("target", f"None, a class index or a LongTensor of shape ({features.shape[0]},)", target))


def suspect_scores(alpha: Tensor, labels: Optional[Tensor] = None, mode: str = "label") -> Tensor:
    r"""How suspicious each training sample is, from its representer weights (Yeh et al., Sec. 4.1).

    ``mode="label"``: :math:`|\alpha_{i, y_i}|` (the paper's choice for finding label errors: a sample
    whose given label the smooth refit cannot reproduce gets a large weight on that label);
    ``mode="norm"``: :math:`\lVert \alpha_i \rVert_2`, which needs no labels.

    Args:
        alpha: representer weights ``(N, C)``.
        labels: given labels ``(N,)`` (required for ``mode="label"``).
        mode: ``"label"`` or ``"norm"``.

    Returns:
        ``(N,)`` scores, larger is more suspicious.
    """
    check_choice("mode", mode, SUSPECT_MODES)
    _check_float_matrix("alpha", alpha)
    if mode == "norm":
        return alpha.norm(dim=1)
    if labels is None or labels.ndim != 1 or labels.shape[0] != alpha.shape[0]:
        raise ValueError(expected("labels", f"a LongTensor of shape ({alpha.shape[0]},) for mode='label'", labels))
    return alpha.gather(1, labels.to(alpha.device).long().view(-1, 1)).squeeze(1).abs()
