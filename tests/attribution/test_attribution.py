"""Attribution cores, layers 1-2: oracles (Captum, autograd, closed forms) and properties
(completeness, chunk-size invariance, per-sample independence, LIME recovery)."""

import pytest
import torch
from torch import nn

from helpers import small_cnn
from lightning_xai.attribution import (grad_cam, input_x_gradient, integrated_gradients, lime, occlusion, saliency,
                                       smoothgrad)
from lightning_xai.attribution._integrated_gradients import quadrature
from lightning_xai.attribution._occlusion import occlusion_windows


@pytest.fixture
def captum_attr():
    return pytest.importorskip("captum.attr")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 1, 12, 12, generator=g)


def _target(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


# --------------------------------------------------------------------------- oracles
def test_saliency_equals_autograd(cnn, batch):
    t = _target(cnn, batch)
    x = batch.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(cnn(x).gather(1, t.view(-1, 1)).sum(), x)
    assert torch.equal(saliency(cnn, batch, t, abs=False), ref)
    assert torch.equal(saliency(cnn, batch, t), ref.abs())
    assert torch.equal(input_x_gradient(cnn, batch, t), batch * ref)


def test_saliency_equals_captum(captum_attr, cnn, batch):
    t = _target(cnn, batch)
    assert torch.equal(saliency(cnn, batch, t), captum_attr.Saliency(cnn).attribute(batch, target=t))
    ref = captum_attr.InputXGradient(cnn).attribute(batch, target=t)
    torch.testing.assert_close(input_x_gradient(cnn, batch, t), ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", [
    pytest.param("gausslegendre", id="gausslegendre"),
    pytest.param("riemann_left", id="left"),
    pytest.param("riemann_right", id="right"),
    pytest.param("riemann_middle", id="middle"),
])
@pytest.mark.parametrize("baseline", [pytest.param(0.0, id="zero"), pytest.param(0.5, id="grey")])
def test_integrated_gradients_matches_captum(captum_attr, cnn, batch, method, baseline):
    t = _target(cnn, batch)
    ours, delta = integrated_gradients(cnn, batch, t, baseline=baseline, steps=24, method=method, return_delta=True)
    ref, ref_delta = captum_attr.IntegratedGradients(cnn).attribute(
        batch, baselines=baseline, target=t, n_steps=24, method=method, return_convergence_delta=True)
    assert (ours - ref).abs().max() <= 1e-6
    assert (delta - ref_delta).abs().max() <= 1e-6


@pytest.mark.parametrize("window,stride,captum_window,captum_stride", [
    pytest.param((4, 4), (2, 2), (1, 4, 4), (1, 2, 2), id="4x4-s2"),
    pytest.param(5, 3, (1, 5, 5), (1, 3, 3), id="5x5-s3-cropped-border"),
    pytest.param((3, 6), (3, 4), (1, 3, 6), (1, 3, 4), id="3x6-s3x4"),
])
def test_occlusion_matches_captum(captum_attr, cnn, batch, window, stride, captum_window, captum_stride):
    t = _target(cnn, batch)
    ours = occlusion(cnn, batch, t, window=window, stride=stride, baseline=0.25)
    ref = captum_attr.Occlusion(cnn).attribute(batch, sliding_window_shapes=captum_window, strides=captum_stride,
                                               baselines=0.25, target=t)
    assert (ours - ref).abs().max() <= 1e-6


def test_occlusion_per_channel_window_matches_captum(captum_attr):
    torch.manual_seed(0)
    model = small_cnn(in_channels=3).eval()
    x = torch.rand(3, 3, 10, 10)
    t = _target(model, x)
    ours = occlusion(model, x, t, window=(1, 4, 4), stride=(1, 2, 2))
    ref = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2), target=t)
    assert (ours - ref).abs().max() <= 1e-6
    # default: windows span all channels
    assert occlusion_windows((3, 28, 28)) == ((3, 7, 7), (3, 3, 3))
    assert occlusion_windows((1, 8, 8)) == ((1, 2, 2), (1, 2, 2))


def test_occlusion_non_overlapping_patch_is_score_drop(cnn, batch):
    t = _target(cnn, batch)
    attr = occlusion(cnn, batch, t, window=4, stride=4)
    occluded = batch.clone()
    occluded[:, :, 4:8, 8:12] = 0
    with torch.no_grad():
        drop = cnn(batch).gather(1, t.view(-1, 1)) - cnn(occluded).gather(1, t.view(-1, 1))
    assert torch.allclose(attr[:, :, 4:8, 8:12], drop.view(-1, 1, 1, 1).expand(-1, 1, 4, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("relu", [pytest.param(True, id="relu"), pytest.param(False, id="signed")])
@pytest.mark.parametrize("layer", [pytest.param("0.3", id="last-conv"), pytest.param("0.2", id="relu-layer")])
def test_grad_cam_matches_captum(captum_attr, cnn, batch, relu, layer):
    t = _target(cnn, batch)
    module = dict(cnn.named_modules())[layer]
    raw = captum_attr.LayerGradCam(cnn, module).attribute(batch, target=t, relu_attributions=relu)
    assert torch.equal(grad_cam(cnn, batch, t, layer=layer, relu=relu, upsample=False), raw)
    up = captum_attr.LayerAttribution.interpolate(raw, (12, 12), "bilinear")
    assert (grad_cam(cnn, batch, t, layer=module, relu=relu) - up).abs().max() <= 1e-7


def test_grad_cam_default_layer_is_last_conv(cnn, batch):
    t = _target(cnn, batch)
    assert torch.equal(grad_cam(cnn, batch, t), grad_cam(cnn, batch, t, layer="0.3"))


def test_smoothgrad_zero_noise_equals_saliency(captum_attr, cnn, batch):
    t = _target(cnn, batch)
    for abs_ in (True, False):
        ref = saliency(cnn, batch, t, abs=abs_)
        assert (smoothgrad(cnn, batch, t, samples=5, noise=0.0, abs=abs_) - ref).abs().max() <= 1e-7
    assert smoothgrad(cnn, batch, t, samples=5, noise=0.0, kind="vargrad").abs().max() <= 1e-7
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(cnn))
    ref = nt.attribute(batch, target=t, nt_type="smoothgrad", nt_samples=5, stdevs=0.0)
    assert (smoothgrad(cnn, batch, t, samples=5, noise=0.0) - ref).abs().max() <= 1e-7


@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in ("smoothgrad", "smoothgrad_sq", "vargrad")])
def test_smoothgrad_family_from_the_same_draws(cnn, batch, kind):
    """Reference: the documented draw (one randn of (samples, *shape[1:]) from a seeded generator)."""
    t, samples, noise = _target(cnn, batch), 6, 0.2
    eps = torch.randn((samples,) + tuple(batch.shape[1:]), generator=torch.Generator().manual_seed(7))
    flat = batch.flatten(1)
    sigma = (noise * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1)
    grads = torch.stack([saliency(cnn, batch + sigma * eps[s], t) for s in range(samples)])  # (S, N, ...)
    ref = {"smoothgrad": grads.mean(0), "smoothgrad_sq": (grads ** 2).mean(0),
           "vargrad": (grads ** 2).mean(0) - grads.mean(0) ** 2}[kind]
    ours = smoothgrad(cnn, batch, t, samples=samples, noise=noise,
                      kind=kind, generator=torch.Generator().manual_seed(7))
    assert (ours - ref).abs().max() <= 1e-6
    again = smoothgrad(cnn, batch, t, samples=samples, noise=noise, kind=kind, generator=7)
    assert torch.equal(ours, again)


# --------------------------------------------------------------------------- closed forms (float64)
class Quadratic(nn.Module):
    """f(x) = sum c * x**power, one output column."""

    def __init__(self, c: torch.Tensor, power: int) -> None:
        super().__init__()
        self.c, self.power = c, power

    def forward(self, x):
        return (self.c * x ** self.power).flatten(1).sum(1, keepdim=True)


@pytest.mark.parametrize("method", [pytest.param(m, id=m) for m in (
    "gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")])
def test_integrated_gradients_linear_closed_form(method):
    torch.manual_seed(0)
    model = nn.Linear(20, 3).double()
    x, b = torch.randn(5, 20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    attr, delta = integrated_gradients(model, x, 2, baseline=b, steps=7, method=method, return_delta=True)
    assert attr.dtype == torch.float64
    assert (attr - model.weight[2].detach() * (x - b)).abs().max() <= 1e-12
    assert delta.abs().max() <= 1e-12


@pytest.mark.parametrize("steps", [pytest.param(s, id=f"n{s}") for s in (1, 4, 32)])
def test_integrated_gradients_square_closed_form_gausslegendre(steps):
    c = torch.linspace(-2, 3, 16, dtype=torch.float64).view(1, 4, 4)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    attr = integrated_gradients(Quadratic(c, 2), x, 0, steps=steps)
    assert (attr - c * x ** 2).abs().max() <= 1e-12


@pytest.mark.parametrize("steps", [pytest.param(s, id=f"n{s}") for s in (2, 5, 17)])
def test_true_trapezoid_closed_form(steps):
    """f = sum c x^3, zero baseline: the trapezoid rule gives c x^3 (1 + h^2 / 2) with h = 1/(n-1)."""
    c = torch.linspace(-1, 2, 8, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    attr = integrated_gradients(Quadratic(c, 3), x, 0, steps=steps, method="riemann_trapezoid")
    h = 1.0 / (steps - 1)
    assert (attr - c * x ** 3 * (1 + h * h / 2)).abs().max() <= 1e-12
    alphas, weights = quadrature("riemann_trapezoid", steps)
    assert abs(float(weights.sum()) - 1.0) <= 1e-15 and float(alphas[0]) == 0.0 and float(alphas[-1]) == 1.0


# --------------------------------------------------------------------------- properties
@pytest.fixture(scope="module")
def trained_cnn():
    """small_cnn after a few Adam steps on digits: realistic (non-tiny) score gaps for completeness."""
    from lightning_xai.datasets import load_digits_tensors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = load_digits_tensors()
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for i in range(20):
        idx = torch.arange(i * 64, i * 64 + 64) % 1024
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval(), x[1500:1532]


def test_integrated_gradients_completeness(trained_cnn):
    model, x = trained_cnn
    t = _target(model, x)
    attr, delta = integrated_gradients(model, x, t, steps=64, return_delta=True)
    with torch.no_grad():
        gap = model(x).gather(1, t.view(-1, 1)).squeeze(1) - \
                    model(torch.zeros_like(x)).gather(1, t.view(-1, 1)).squeeze(1)
    assert float((delta.abs() / gap.abs()).median()) <= 1e-2
    assert torch.equal(delta, attr.flatten(1).sum(1) - gap)


def _all_methods():
    return [
        pytest.param(saliency, {}, "batch_size", id="saliency"),
        pytest.param(input_x_gradient, {}, "batch_size", id="input_x_gradient"),
        pytest.param(smoothgrad, {"samples": 5}, "batch_size", id="smoothgrad"),
        pytest.param(smoothgrad, {"samples": 5, "kind": "vargrad"}, "batch_size", id="vargrad"),
        pytest.param(integrated_gradients, {"steps": 8}, "internal_batch_size", id="integrated_gradients"),
        pytest.param(integrated_gradients, {"steps": 8, "baseline": "uniform"}, "internal_batch_size", id="ig-uniform"),
        pytest.param(integrated_gradients, {"steps": 8, "baseline": "blur"}, "internal_batch_size", id="ig-blur"),
        pytest.param(occlusion, {"window": 4, "stride": 2}, "perturbations_per_eval", id="occlusion"),
        pytest.param(grad_cam, {"layer": "0.3"}, "batch_size", id="grad_cam"),
        pytest.param(lime, {"samples": 24, "grid": (3, 3)}, "batch_size", id="lime"),
    ]


@pytest.mark.parametrize("fn,options,cap", _all_methods())
def test_chunk_size_invariance(cnn, batch, fn, options, cap):
    t = _target(cnn, batch)
    ref = fn(cnn, batch, t, **options)
    for size in (1, 5, 64):
        assert (fn(cnn, batch, t, **options, **{cap: size}) - ref).abs().max() <= 1e-6, size


@pytest.mark.parametrize("fn,options,cap", _all_methods())
def test_each_sample_independent_of_batch_mates(cnn, batch, fn, options, cap):
    t = _target(cnn, batch)
    full = fn(cnn, batch, t, **options)
    for i in (0, 4):
        alone = fn(cnn, batch[i:i + 1], t[i:i + 1], **options)
        assert (alone - full[i:i + 1]).abs().max() <= 1e-6


def test_lime_recovers_segment_weights():
    """f = sum_s w_s * mean(x over segment s) is linear in the segments: LIME returns w_s * mean_s(x)."""
    weights = torch.tensor([3.0, -1.0, 0.5, 2.0, -2.5, 0.0, 1.0, 4.0, -0.5])
    segments = torch.arange(9).view(3, 3).repeat_interleave(3, 0).repeat_interleave(3, 1)  # 9x9, 3x3 patches
    onehot = nn.functional.one_hot(segments.flatten(), 9).double()  # (81, 9)
    mean_op = (onehot / onehot.sum(0)).float()  # pixel -> segment mean

    def model(x):
        score = (x.flatten(1) @ mean_op) @ weights  # (N,)
        return torch.stack([score, -score], 1)

    x = 0.5 + torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(0))
    attr = lime(model, x, 0, segments=segments, samples=200)
    expected = (x.flatten(1) @ mean_op) * weights  # (N, 9)
    got = attr[:, 0, ::3, ::3].flatten(1)  # one pixel per segment
    assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argsort(1), expected.argsort(1))
    # painted: constant within each segment, equal in every channel
    assert torch.equal(attr, got.gather(1, segments.flatten().expand(2, -1)).view(2, 1, 9, 9))
    # the default grid gives the same answer when it matches the segments
    assert torch.allclose(lime(model, x, 0, grid=(3, 3), samples=200), attr)
