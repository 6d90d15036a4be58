"""Tests of the pure feature-visualisation core (lightning_xai.featvis)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_unchanged, small_cnn, snapshot
from lightning_xai.featvis import (L1, L2, Blur, FourierParam, GeneratorParam, Jitter, Objective, Pad, PixelParam,
                                   RandomRotate, RandomScale, TotalVariation, channel, class_logit, direction,
                                   diversity, layer_objective, neuron, render)
from lightning_xai.featvis._objectives import objectives_from_spec
from lightning_xai.featvis._param import color_correlation


# --------------------------------------------------------------------------- data and models
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    return x, torch.tensor(d.target)


def flat_cnn() -> nn.Sequential:
    """Two convs and a linear head over the whole 8x8 map, so the class evidence keeps its layout.

    (``small_cnn`` pools each 4x4 quadrant to one value: its class images are quadrant textures that
    satisfy the classifier but need not resemble the class means.)
    """
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 64, 10))


def _train(model: nn.Module, x, y, epochs: int = 12, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def digits_net(digits):
    x, y = digits
    torch.manual_seed(0)
    net = _train(flat_cnn(), x, y)
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() > 0.95
    return net


def _corr(a, b):
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


# --------------------------------------------------------------------------- acceptance on digits
def test_digits_class_images_are_their_class(digits, digits_net):
    x, y = digits
    images, acts, history = render(digits_net, list(range(10)), (1, 8, 8))  # the defaults
    assert images.shape == (10, 1, 8, 8) and acts.shape == (10,)
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        p = F.softmax(digits_net(images), 1)[torch.arange(10), torch.arange(10)]
    assert int((p >= 0.99).sum()) >= 9, p
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    nearest = _corr(images, means).argmax(1)
    assert int((nearest == torch.arange(10)).sum()) >= 9, nearest
    torch.testing.assert_close(acts, digits_net(images).detach()[torch.arange(10), torch.arange(10)])


def test_objective_rises_tenfold():
    net = _gabor_bank([0.0, math.pi / 3, 2 * math.pi / 3])
    objs = [channel("1", c) for c in range(3)]
    _, acts, history = render(net, objs, (1, 24, 24), steps=64)
    start = history["objective"][0]
    assert bool((start > 0).all()), start
    assert bool((acts >= 10 * start).all()), (start, acts)
    assert history["objective"].shape == (64, 3) and history["loss"].shape == (64,)


def test_seed_reproduces_exactly(digits_net):
    kw = dict(steps=16, transforms=[Jitter(1), RandomScale(), RandomRotate(10)])
    a = render(digits_net, [3, 5], (1, 8, 8), seed=7, **kw)
    b = render(digits_net, [3, 5], (1, 8, 8), seed=7, **kw)
    c = render(digits_net, [3, 5], (1, 8, 8), seed=8, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.activations, b.activations)
    assert not torch.equal(a.images, c.images)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(render(digits_net, 2, (1, 8, 8), steps=8, generator=g1).images,
                       render(digits_net, 2, (1, 8, 8), steps=8, generator=g2).images)


def _high_freq_fraction(images, cutoff=0.25):
    x = images - images.mean((2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum((0, 1))
    h, w = power.shape
    f = (torch.fft.fftfreq(h).view(-1, 1) ** 2 + torch.fft.fftfreq(w).view(1, -1) ** 2).sqrt()
    return float(power[f > cutoff].sum() / power.sum())


def test_fourier_leaves_less_high_frequency_energy_than_pixels():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    objs = [channel("2", c) for c in range(4)]
    kw = dict(steps=48, regularizers=[], transforms=[])
    fourier = render(net, objs, (3, 32, 32), param="fourier", **kw)
    pixel = render(net, objs, (3, 32, 32), param="pixel", **kw)
    assert _high_freq_fraction(fourier.images) < 0.75 * _high_freq_fraction(pixel.images)
    assert bool((fourier.activations > fourier.history["objective"][0]).all())


def _gabor_bank(thetas, size=9, freq=0.2, sigma=2.5):
    r = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    kernels = []
    for t in thetas:
        g = (torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
             * torch.cos(2 * math.pi * freq * (xx * math.cos(t) + yy * math.sin(t))))
        kernels.append(g - g.mean())  # zero mean: a flat image gives no response
    conv = nn.Conv2d(1, len(thetas), size, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.stack(kernels).unsqueeze(1))
    return nn.Sequential(conv, nn.ReLU())


def test_gabor_filter_orientation_and_frequency_recovered():
    thetas = [0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4]
    freq, n = 0.2, 32
    net = _gabor_bank(thetas, freq=freq)
    images, _, _ = render(net, [channel("1", i) for i in range(4)], (1, n, n), steps=256, param="pixel")
    for k, theta in enumerate(thetas):
        x = images[k, 0] - images[k, 0].mean()
        power = torch.fft.fft2(x).abs()
        iy, ix = divmod(int(power.argmax()), n)
        peak = torch.tensor([ix if ix <= n // 2 else ix - n, iy if iy <= n // 2 else iy - n], dtype=torch.float32)
        ideal = freq * n * torch.tensor([math.cos(theta), math.sin(theta)])  # (kx, ky) of the filter's wave
        off = torch.minimum((peak - ideal).abs().max(), (peak + ideal).abs().max())  # the spectrum is symmetric
        assert off <= 1.0, (k, peak, ideal)  # within one FFT bin on each axis


def test_shortcut_mark_follows_planted_code(digits):
    from scipy.stats import spearmanr

    x, y = digits
    xs = x.clone()
    code = (y.float() + 1) / 10  # class c -> corner brightness (c + 1) / 10
    xs[:, 0, :2, :2] = code.view(-1, 1, 1)
    torch.manual_seed(0)
    net = _train(flat_cnn(), xs, y, epochs=10)
    images, _, _ = render(net, list(range(10)), (1, 8, 8))
    mark = images[:, 0, :2, :2].mean((1, 2))
    rho = spearmanr(mark.numpy(), code.unique().numpy()).correlation
    assert abs(rho) >= 0.9, (rho, mark)


def test_generator_prior_decodes_to_target_class(digits, digits_net):
    x, _ = digits
    flat = x.flatten(1)
    mean = flat.mean(0)
    _, s, vt = torch.linalg.svd(flat - mean, full_matrices=False)
    k = 12
    basis = vt[:k] * (s[:k] / math.sqrt(len(flat))).view(-1, 1)  # unit-variance codes

    def decoder(z):  # a fixed PCA decoder: codes (K, 12) -> images (K, 1, 8, 8)
        return (mean + z @ basis).view(-1, 1, 8, 8)

    param = GeneratorParam(decoder, (k,), sd=0.5, decay=0.99, clip=(-3.0, 3.0))
    images, acts, _ = render(digits_net, list(range(10)), (1, 8, 8), param=param, steps=128, lr=0.1, regularizers=[])
    assert param.code.abs().max() <= 3.0
    recon = decoder(param.code.detach()).clamp(0, 1)
    torch.testing.assert_close(images, recon)
    with torch.no_grad():
        pred = digits_net(images).argmax(1)
    assert int((pred == torch.arange(10)).sum()) >= 9, pred


# --------------------------------------------------------------------------- objectives and parts
def test_objective_algebra():
    acts = {"a": torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2),
            "logits": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    c0 = channel("a", 0)
    torch.testing.assert_close(c0(acts), torch.tensor([1.5, 13.5]))
    torch.testing.assert_close(channel("a", 0, "sum")(acts), torch.tensor([6.0, 54.0]))
    combo = 2 * c0 - class_logit(1) + 1.0
    torch.testing.assert_close(combo(acts), torch.tensor([2 * 1.5 - 2 + 1, 2 * 13.5 - 4 + 1]))
    assert set(combo.layers) == {"a", "logits"}
    torch.testing.assert_close(neuron("a", 1, 0, 1)(acts), torch.tensor([5.0, 17.0]))
    torch.testing.assert_close(layer_objective("a")(acts), acts["a"].flatten(1).pow(2).mean(1))
    torch.testing.assert_close(direction("a", torch.tensor([1.0, 0.0, 0.0]))(acts), c0(acts))
    div = diversity("a")(acts)
    assert div.shape == (2,) and bool((div <= 0).all())
    with pytest.raises(ValueError, match="Expected `reduction`"):
        channel("a", 0, "max")


def test_objectives_from_spec():
    name, objs = objectives_from_spec(("logits", range(3)))
    assert name == "logits" and len(objs) == 3
    name, objs = objectives_from_spec(("features.3", "channels", range(8)))
    assert name == "features.3" and len(objs) == 8 and objs[0].layers == ("features.3",)
    assert len(objectives_from_spec(("0", "layer"))[1]) == 1
    assert len(objectives_from_spec(("mine", [channel("0", 1)]))[1]) == 1
    with pytest.raises(ValueError, match="Expected `targets`"):
        objectives_from_spec(("features.3", "filters", [1]))


def test_diversity_lowers_feature_similarity():
    net = _gabor_bank([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
    base = [channel("1", 0)] * 4
    kw = dict(steps=48, seed=0, param="pixel")
    same = render(net, base, (1, 16, 16), **kw).images
    spread = render(net, [o + 1.0 * diversity("1") for o in base], (1, 16, 16), **kw).images
    with torch.no_grad():
        div = diversity("1")
        assert div({"1": net(spread)}).mean() > div({"1": net(same)}).mean() + 0.05


def test_regularizers_and_transforms_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    for t in (Jitter(2), RandomScale((0.8, 1.2)), RandomRotate(20)):
        assert t(x, g).shape == x.shape
    assert Pad(2)(x, g).shape == (3, 3, 20, 20)
    torch.testing.assert_close(Jitter(0)(x, g), x)
    for r in (L1(1.0), L2(1.0), TotalVariation(1.0), Blur(1.0)):
        assert r(x).shape == (3,) and bool((r(x) >= 0).all())
    assert float(TotalVariation(1.0)(torch.ones(1, 1, 4, 4))) == 0.0
    m = color_correlation(x)
    torch.testing.assert_close(m @ m.T, torch.cov(x.transpose(0, 1).flatten(1)), atol=1e-4, rtol=1e-3)


def test_value_range_grayscale_and_colour():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    lo, hi = torch.tensor([-1.0, -2.0, 0.0]), torch.tensor([1.0, 0.0, 3.0])
    imgs = render(net, [channel("1", 0)], (3, 12, 12), steps=4, value_range=(lo, hi)).images
    assert bool((imgs >= lo.view(1, 3, 1, 1)).all() and (imgs <= hi.view(1, 3, 1, 1)).all())
    gray = render(net, [channel("1", 1)], (3, 12, 12), steps=4, param=PixelParam(grayscale=True)).images
    torch.testing.assert_close(gray[:, 0], gray[:, 2])
    dec = render(net, [channel("1", 1)], (3, 12, 12), steps=4, param=FourierParam(color_matrix=torch.eye(3))).images
    assert dec.shape == (1, 3, 12, 12)


def test_inference_mode_and_forward_callable(digits_net):
    with torch.inference_mode():
        out = render(lambda x: {"logits": digits_net(x)}, [1, 2], (1, 8, 8), steps=8,
                     forward=lambda x: digits_net(x))
    assert out.images.shape == (2, 1, 8, 8)
    wrapped = lambda x: (digits_net(x), None)  # noqa: E731
    out = render(digits_net, [1], (1, 8, 8), steps=4, forward=lambda x: wrapped(x)[0])
    assert out.activations.shape == (1,)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        pytest.param(dict(steps=0), ValueError, "Expected `steps` to be a positive int", id="steps"),
        pytest.param(dict(lr=-1.0), ValueError, "Expected `lr`", id="lr"),
        pytest.param(dict(input_shape=(8, 8)), ValueError, "Expected `input_shape`", id="shape"),
        pytest.param(dict(param="wavelet"), ValueError, "Expected `param` to be 'fourier', 'pixel'", id="param"),
        pytest.param(dict(objectives=[]), ValueError, "Expected `objectives`", id="empty"),
        pytest.param(dict(objectives=[channel("features.9", 0)]),
                     ValueError, "layers: 0, 0.0, 0.1", id="unknown-layer"),
        pytest.param(dict(value_range=(1.0, 0.0)), ValueError, "Expected `value_range`", id="range"),
    ],
)
def test_invalid_arguments(kwargs, err, match):
    args = dict(objectives=[0], input_shape=(1, 8, 8))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        render(small_cnn(), args.pop("objectives"), args.pop("input_shape"), **args)


# --------------------------------------------------------------------------- hygiene
def _bn_model_with_grads():
    model = small_cnn(batchnorm=True, dropout=0.5)
    model.train()
    model[1].eval()  # a mixed train/eval state to restore exactly
    model[0][0].weight.requires_grad_(False)  # and a mixed requires_grad state
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_render_leaves_model_and_process_unchanged(param):
    model = _bn_model_with_grads()
    before = snapshot(model)
    objs = [class_logit(1), channel("0.3", 2), neuron("0.0", 1) + 0.1 * diversity("0.0")]
    render(model, objs, (1, 8, 8), steps=6, param=param)
    assert_unchanged(before, model)


def test_generator_param_leaves_generator_unchanged():
    model = _bn_model_with_grads()
    gen_net = nn.Sequential(nn.Linear(4, 64), nn.BatchNorm1d(64), nn.Unflatten(1, (1, 8, 8)))
    gen_net.train()
    before, before_g = snapshot(model), snapshot(gen_net)
    render(model, [1, 2], (1, 8, 8), steps=5, param=GeneratorParam(gen_net, (4,), decay=0.9, clip=(-2, 2)))
    assert_unchanged(before, model)
    assert_unchanged(before_g, gen_net)


class _Boom(nn.Module):
    def __init__(self, after: int) -> None:
        super().__init__()
        self.calls, self.after = 0, after

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom")
        return x


def test_render_restores_state_after_exception():
    model = _bn_model_with_grads()
    model[0].insert(1, _Boom(after=3))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        render(model, [0, 1], (1, 8, 8), steps=10, param="pixel")
    assert_unchanged(before, model)


def test_objective_class_rejects_non_callables():
    with pytest.raises(TypeError, match="Expected `fn`"):
        Objective(3)  # type: ignore[arg-type]


def test_num_threads_is_restored():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = render(small_cnn(), [0], (1, 8, 8), steps=2, num_threads=1)
        assert torch.get_num_threads() == 2 and out.images.shape == (1, 1, 8, 8)
        with pytest.raises(ValueError, match="Expected `num_threads`"):
            render(small_cnn(), [0], (1, 8, 8), steps=2, num_threads=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("transforms", [
    pytest.param(lambda: [Jitter(2), RandomScale((0.95, 1.05)), RandomRotate(5.0), Jitter(1)], id="default-32px"),
    pytest.param(lambda: [RandomRotate(20), RandomScale((0.8, 1.2))], id="rotate-then-scale"),
    pytest.param(lambda: [Jitter(0), Jitter(3), RandomScale((1.0, 1.3))], id="jitter-0-is-identity"),
])
def test_compose_resamples_once_with_the_product_of_the_matrices(transforms):
    """On a linear ramp bilinear interpolation is exact, so one resampling with the composed matrix gives what
    applying the transforms one by one gives, wherever no step samples outside the image; the draws are the same."""
    from lightning_xai.featvis import Compose

    h, w = 64, 72
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    ramp = torch.stack([0.3 * xx + 0.1 * yy, -0.2 * xx + 0.5 * yy + 3.0]).unsqueeze(0).repeat(5, 1, 1, 1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    one_by_one = ramp
    for t in transforms():
        one_by_one = t(one_by_one, g1)
    fused = Compose(transforms())(ramp, g2)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same draws, in the same order
    inner = (slice(None), slice(None), slice(20, h - 20), slice(20, w - 20))  # no step reaches the border
    torch.testing.assert_close(fused[inner], one_by_one[inner], atol=1e-9, rtol=0)
    assert fused.shape == ramp.shape


def test_compose_resamples_once_per_run_of_affine_transforms(monkeypatch):
    from lightning_xai.featvis import Compose
    from lightning_xai.featvis import _transforms

    calls = []
    original = _transforms.F.grid_sample
    monkeypatch.setattr(_transforms.F, "grid_sample", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 20)
    Compose([Jitter(2), RandomScale(), RandomRotate(5.0), Jitter(1)])(x, g)
    assert len(calls) == 1
    calls.clear()  # a Pad or a different padding mode ends a run
    out = Compose([Jitter(1), Pad(2), RandomRotate(5.0), RandomScale(padding_mode="zeros")])(x, g)
    assert len(calls) == 3 and out.shape == (2, 3, 24, 24)


@pytest.mark.parametrize("size", [pytest.param((32, 32), id="square"), pytest.param((12, 20), id="wide")])
def test_affine_resampling_matches_affine_grid(size):
    """``_affine``'s grid is ``F.affine_grid``'s (``align_corners=False``), computed as one matrix product."""
    from lightning_xai.featvis._transforms import _affine

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, *size, generator=g)
    theta = torch.eye(2, 3).repeat(4, 1, 1) + 0.1 * torch.randn(4, 2, 3, generator=g)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    torch.testing.assert_close(_affine(x, theta, "reflection"), expected, atol=1e-5, rtol=0)


def test_fourier_mixes_colours_in_the_frequency_domain_as_after_the_inverse_transform():
    """The spectrum is held channel-major and mixed before ``irfft2``: the same images as ``M irfft2(S * U)`` with the
    spectrum drawn image-major and the colours mixed in pixel space (``einsum('kchw,dc->kdhw')``), then the sigmoid
    into the value range; the same start as drawn before."""
    param = FourierParam()
    param.build((4, 3, 10, 12), (0.0, 2.0), torch.Generator().manual_seed(0), torch.device("cpu"))
    start = torch.randn(4, 3, 10, 12 // 2 + 1, 2, generator=torch.Generator().manual_seed(0)) * 0.01
    assert param.spectrum.shape == (3, 4, 10, 7, 2) and torch.equal(param.spectrum.transpose(0, 1), start)
    with torch.no_grad():
        param.spectrum.normal_(generator=torch.Generator().manual_seed(1))
        spectrum = param.spectrum.transpose(0, 1)  # (K, C, H, W//2+1, 2)
        scale = param._scale[..., 0]  # (H, W//2+1)
        u = torch.fft.irfft2(torch.view_as_complex(spectrum.contiguous()) * scale, s=(10, 12), norm="ortho")
        expected = 2.0 * torch.sigmoid(torch.einsum("kchw,dc->kdhw", u, param._mix))
        out = param()
    torch.testing.assert_close(out, expected)
    assert out.shape == (4, 3, 10, 12) and out.is_contiguous()


def test_pixel_colour_mixing_is_the_channel_matrix_product():
    """``PixelParam`` mixes decorrelated channels with the colour matrix, ``einsum('kchw,dc->kdhw')``, then the
    sigmoid into the value range."""
    param = PixelParam(decorrelate=True)
    g = torch.Generator().manual_seed(0)
    param.build((4, 3, 10, 12), (0.0, 2.0), g, torch.device("cpu"))
    with torch.no_grad():
        expected = 2.0 * torch.sigmoid(torch.einsum("kchw,dc->kdhw", param.pixels, param._mix))
        out = param()
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous()


def _torch_adam(tensor, grads, lr):
    p = tensor.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    for g in grads:
        p.grad = g
        opt.step()
    return p.detach()


@pytest.mark.parametrize("fused", [pytest.param(True, id="fused"), pytest.param(False, id="no-fused-kernel")])
def test_adam_is_torch_adam(monkeypatch, fused):
    """The render's Adam takes torch.optim.Adam's steps (default betas and eps); where torch has no fused kernel for
    the tensors (older torch on CPU, some dtypes) it falls back to the plain update from the same state."""
    from lightning_xai.featvis import _optimize

    if not fused:
        functional = _optimize.adam

        def no_fused(*args, fused=False, **kwargs):
            if fused:
                torch._foreach_add_(args[5], 1)  # as torch's fused path does before its kernel
                raise RuntimeError("`fused=True` is not supported here")
            return functional(*args, fused=fused, **kwargs)

        monkeypatch.setattr(_optimize, "adam", no_fused)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 5, 4, generator=g)
    grads = [torch.randn(3, 5, 4, generator=g) * 10.0 ** -i for i in range(6)]
    x = start.clone().requires_grad_(True)
    adam = _optimize._Adam([x], lr=0.05)
    for grad in grads:
        adam.step([grad])
    assert adam.fused is fused
    torch.testing.assert_close(x.detach(), _torch_adam(start, grads, 0.05), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reg", [
    pytest.param(lambda: L1(0.3), id="L1"), pytest.param(lambda: L1(0.3, center=0.4), id="L1-centre"),
    pytest.param(lambda: L2(0.2, center=0.1), id="L2"), pytest.param(lambda: TotalVariation(0.7), id="TV"),
    pytest.param(lambda: Blur(0.5, sigma=0.8), id="blur"),
])
def test_closed_form_regularizer_gradients_are_autograds(reg):
    """Each built-in regulariser's closed-form ``penalty_and_grad`` is its penalty and autograd's gradient of it,
    ties (``X = c``, flat neighbours) included."""
    from lightning_xai.featvis._transforms import _autograd_penalty_and_grad

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 7, 9, generator=g)
    x[:, :, 2:4, 3:6] = 0.4  # ties: equal neighbours and values at L1's centre
    r = reg()
    value, grad = r.penalty_and_grad(x)
    want_value, want_grad = _autograd_penalty_and_grad(r, x)
    torch.testing.assert_close(value, want_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-9)
    assert not value.requires_grad and not grad.requires_grad


def test_regularizer_subclass_with_its_own_penalty_takes_autograds_gradient():
    class Shifted(L1):
        def penalty(self, images):
            return (images - 0.5).abs().flatten(1).mean(1)

    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    _, grad = Shifted(1.0).penalty_and_grad(x)
    torch.testing.assert_close(grad, (x - 0.5).sign() / 16)


def test_class_objectives_take_the_constant_gradient_with_the_same_images(digits_net):
    """Objectives that are all class logits enter the backward pass as the constant one-hot gradient at the logits;
    ``+ 0.0`` (an exact no-op) takes the general path, through the objectives: the same images, activations and
    history bit for bit, and a bad class index is still refused."""
    from lightning_xai.featvis._objectives import class_indices

    plain = [class_logit(c) for c in (3, 5, 0)]
    assert class_indices(plain) == [3, 5, 0] and class_indices([o + 0.0 for o in plain]) is None
    a = render(digits_net, plain, (1, 8, 8), steps=16, seed=3)
    b = render(digits_net, [o + 0.0 for o in plain], (1, 8, 8), steps=16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.activations, b.activations)
    assert torch.equal(a.history["objective"], b.history["objective"])
    assert torch.equal(a.history["loss"], b.history["loss"])
    with pytest.raises(ValueError, match="class index"):
        render(digits_net, [class_logit(10)], (1, 8, 8), steps=2)


def test_loss_history_is_the_objectives_and_penalties_at_each_step(digits_net):
    """``history['loss']`` is minus the objectives plus the regularisers' penalties of the step's image, summed over
    the images, for closed-form and traced (plain callable) regularisers alike."""
    traced = lambda images: 0.05 * images.flatten(1).pow(2).mean(1)  # noqa: E731
    param = FourierParam()  # the first step's image: the parametrisation's start, drawn first from the seed
    param.build((2, 1, 8, 8), (0.0, 1.0), torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad():
        start = param()
    for regs in ([L1(0.05), TotalVariation(0.05)], [traced], [L1(0.05), traced], []):
        out = render(digits_net, [1, 4], (1, 8, 8), steps=1, regularizers=regs, transforms=[], seed=0)
        penalty = sum((r(start).sum() for r in regs), torch.tensor(0.0))
        torch.testing.assert_close(out.history["loss"][0], penalty - out.history["objective"][0].sum())


def test_compose_calls_a_transform_that_has_its_own_call():
    """A subclass of an affine transform that overrides ``__call__`` is called, not folded into the matrix product."""
    from lightning_xai.featvis import Compose

    class Flipped(Jitter):
        def __call__(self, images, generator):
            return images.flip(-1)

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = Compose([Flipped(1)])(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, x.flip(-1))


def test_affine_draws_are_the_transforms_matrices():
    """``draw`` gives each image's matrix as Python floats: whole-pixel shifts within the range (the image spans 2),
    zooms within the scales, rotations within the angle; a subclass that overrides ``theta`` is composed from it."""
    from lightning_xai.featvis import Compose

    g = torch.Generator().manual_seed(0)
    for a, b, tx, c, d, ty in Jitter(3).draw(50, 16, 20, g):
        assert (a, b, c, d) == (1.0, 0.0, 0.0, 1.0)
        assert abs(tx * 20 / 2 - round(tx * 20 / 2)) < 1e-12 and abs(tx * 20 / 2) <= 3 and abs(ty * 16 / 2) <= 3
    for a, b, tx, c, d, ty in RandomScale((0.8, 1.25)).draw(50, 16, 16, g):
        assert a == d and 0.8 <= a <= 1.25 and (b, tx, c, ty) == (0.0, 0.0, 0.0, 0.0)
    for a, b, tx, c, d, ty in RandomRotate(10.0).draw(50, 16, 16, g):
        assert math.isclose(a * a + c * c, 1.0) and (a, b) == (d, -c) and abs(math.degrees(math.atan2(c, a))) <= 10

    class Mirror(Jitter):
        def theta(self, images, generator):
            return torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(images.shape[0], 2, 3)

    x = torch.rand(2, 1, 6, 6, generator=g)
    torch.testing.assert_close(Compose([Mirror(1), RandomScale((1.0, 1.0))])(x, g), x.flip(-1))
