"""Pure cores of lightning_xai.samples: oracles, properties, planted label errors, sparse samples, hygiene."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_unchanged, small_cnn, snapshot
from lightning_xai.samples import capture_features, cosine_topk, representer_points, support, suspect_scores
from lightning_xai.samples._features import last_linear, read_samples, resolve_feature_layer
from lightning_xai.samples._representer import representer_values


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("m, n, d, k, chunk", [
    pytest.param(7, 50, 5, 3, None, id="one-block"),
    pytest.param(33, 200, 16, 10, 8, id="chunked"),
    pytest.param(4, 12, 3, 12, 1, id="k-equals-n"),
])
def test_cosine_topk_matches_sklearn(m, n, d, k, chunk):
    from sklearn.neighbors import NearestNeighbors

    q, keys = torch.randn(m, d, generator=_gen(1)), torch.randn(n, d, generator=_gen(2))
    values, indices = cosine_topk(q, keys, k, chunk_size=chunk)
    nn_ = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(keys.numpy().astype(np.float64))
    dist, idx = nn_.kneighbors(q.numpy().astype(np.float64))
    np.testing.assert_array_equal(indices.numpy(), idx)
    np.testing.assert_allclose(values.numpy(), 1.0 - dist, atol=1e-5)
    np.testing.assert_allclose(support(q, keys, k, chunk_size=chunk).numpy(), (1.0 - dist).mean(1), atol=1e-5)


def test_cosine_topk_is_scale_invariant_and_rejects_bad_args():
    q, keys = torch.randn(5, 4, generator=_gen(3)), torch.randn(20, 4, generator=_gen(4))
    v1, i1 = cosine_topk(q, keys, 4)
    v2, i2 = cosine_topk(3.0 * q, keys * torch.rand(20, 1, generator=_gen(5)) + 0.0, 4)
    assert torch.equal(i1, i2) and torch.allclose(v1, v2, atol=1e-6)
    with pytest.raises(ValueError, match="Expected `k` to be at most the number of keys"):
        cosine_topk(q, keys, 21)
    with pytest.raises(ValueError, match="Expected `keys` to be features of dimension 4"):
        cosine_topk(q, torch.randn(3, 5), 1)
    with pytest.raises(ValueError, match="Expected `k` to be a positive int"):
        cosine_topk(q, keys, 0)


# --------------------------------------------------------------------------- representer points
@pytest.mark.parametrize("targets, fit_bias, lam", [
    pytest.param("probs", True, 1e-3, id="probs-bias"),
    pytest.param("probs", False, 1e-2, id="probs-nobias"),
    pytest.param("labels", True, 1e-3, id="labels-bias"),
])
def test_representer_decomposition_reproduces_refit_logits(targets, fit_bias, lam):
    f = torch.randn(300, 12, generator=_gen(6)).relu()
    logits = f @ torch.randn(12, 5, generator=_gen(7))
    tg = logits.softmax(1) if targets == "probs" else logits.argmax(1)
    fit = representer_points(f, tg, lam=lam, fit_bias=fit_bias)
    test = torch.randn(9, 12, generator=_gen(8)).relu()
    vals = representer_values(fit, test)  # (M, N, C)
    assert vals.shape == (9, 300, 5)
    scale = fit.logits(test).abs().max()
    torch.testing.assert_close(vals.sum(1), fit.logits(test), atol=1e-9 * float(scale) + 1e-12, rtol=0)
    assert fit.grad_norm < 1e-10 and fit.stationarity_gap < 1e-8 * float(fit.weight.abs().max())
    # per-target form agrees with the full tensor
    pred = fit.logits(test).argmax(1)
    torch.testing.assert_close(representer_values(fit, test, pred), vals[torch.arange(9), :, pred])
    # alpha is -(1/(2 lam n)) dL/dz at the solution
    p = tg if targets == "probs" else F.one_hot(tg, 5).double()
    expected_alpha = (p.double() - fit.logits(f).softmax(1)) / (2 * lam * 300)
    torch.testing.assert_close(fit.alpha, expected_alpha)


def test_representer_lbfgs_path_for_many_weights():
    from lightning_xai.samples import _representer as R

    f = torch.randn(200, 30, generator=_gen(9))
    y = torch.randint(0, 4, (200,), generator=_gen(10))
    old = R._NEWTON_MAX_PARAMS
    R._NEWTON_MAX_PARAMS = 10  # force L-BFGS
    try:
        fit = representer_points(f, y, lam=1e-2, tol=1e-9)
    finally:
        R._NEWTON_MAX_PARAMS = old
    exact = representer_points(f, y, lam=1e-2)
    torch.testing.assert_close(fit.weight, exact.weight, atol=1e-6, rtol=0)
    test = torch.randn(4, 30, generator=_gen(11))
    torch.testing.assert_close(fit.values(test).sum(1), fit.logits(test), atol=1e-5, rtol=0)


def test_representer_rejects_bad_args():
    f = torch.randn(10, 3)
    with pytest.raises(ValueError, match="Expected `lam` to be a positive float"):
        representer_points(f, torch.zeros(10, dtype=torch.long), lam=0.0)
    with pytest.raises(ValueError, match="Expected `targets`"):
        representer_points(f, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected `labels`"):
        suspect_scores(torch.randn(10, 2, dtype=torch.float64), None, mode="label")


def test_representer_works_under_inference_mode():
    f = torch.randn(40, 3, generator=_gen(12))
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    with torch.inference_mode():
        fit = representer_points(f, (f[:, 0] > 0).long(), lam=1e-2)
    assert fit.grad_norm < 1e-10 and not fit.alpha.is_inference()
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------- planted label errors and sparse samples
def _train_mlp(x, y, epochs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(*net)  # same init for every run of the test
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def flipped_digits():
    from lightning_xai.datasets import load_digits_tensors

    x, y = load_digits_tensors()
    x_tr, y_tr, x_va = x[:800], y[:800].clone(), x[800:900]
    g = _gen(1)
    flipped = torch.randperm(800, generator=g)[:40]  # 5 %
    y_tr[flipped] = (y_tr[flipped] + torch.randint(1, 10, (40,), generator=g)) % 10
    net = _train_mlp(x_tr, y_tr)
    with torch.no_grad():
        feats, logits = capture_features(net, last_linear(net), x_tr)
    return dict(x=x_tr, y=y_tr, x_val=x_va, flipped=flipped, net=net, feats=feats, logits=logits)


def test_flipped_labels_rank_high_by_alpha(flipped_digits):
    d = flipped_digits
    k = d["flipped"].numel()
    fit = representer_points(d["feats"], d["y"], lam=1e-3, num_classes=10)
    top = suspect_scores(fit.alpha, d["y"]).topk(k).indices
    precision = np.isin(top.numpy(), d["flipped"].numpy()).mean()
    assert precision > 0.6, precision  # random ranking: 0.05
    top_norm = suspect_scores(fit.alpha, mode="norm").topk(k).indices
    assert np.isin(top_norm.numpy(), d["flipped"].numpy()).mean() > 0.6


def test_out_of_distribution_probe_has_low_support(flipped_digits):
    d = flipped_digits
    net = d["net"]
    noise = torch.rand(20, 1, 8, 8, generator=_gen(13))
    with torch.no_grad():
        f_in, _ = capture_features(net, last_linear(net), d["x_val"])
        f_out, _ = capture_features(net, last_linear(net), noise)
    s_in, s_out = support(f_in, d["feats"], 10), support(f_out, d["feats"], 10)
    assert s_out.median() < s_in.median()
    assert (s_out.mean() < s_in.quantile(0.25)), (s_out.mean(), s_in.quantile(0.25))


# --------------------------------------------------------------------------- feature capture and hygiene
def test_feature_layer_resolution():
    net = small_cnn()
    assert resolve_feature_layer(net) == ("1.4", "input")
    assert resolve_feature_layer(net, "1.3") == ("1.3", "output")
    with pytest.raises(ValueError, match="one of the model's layers: 0, 0.0"):
        resolve_feature_layer(net, "head")
    with pytest.raises(ValueError, match="no nn.Linear"):
        last_linear(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_capture_matches_manual_penultimate_and_leaves_no_trace():
    net = small_cnn()
    net.train()
    x = torch.rand(10, 1, 8, 8, generator=_gen(14))
    before = snapshot(net)
    with torch.no_grad():
        feats, out = capture_features(net, "1.4", x, batch_size=3)
        with_output, _ = capture_features(net, "1.3", x, capture="output")
    assert_unchanged(before, net)  # eval for the call, train flags and BatchNorm buffers restored/untouched
    net.eval()
    with torch.no_grad():
        manual = net[1][:4](net[0](x))
    torch.testing.assert_close(feats, manual)
    torch.testing.assert_close(with_output, manual)
    torch.testing.assert_close(out, net(x))


def test_capture_removes_hooks_after_an_exception():
    net = small_cnn()
    x = torch.rand(2, 1, 8, 8, generator=_gen(15))
    before = snapshot(net)

    def failing(x):
        net(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture_features(net, "1.4", x, forward=failing)
    assert_unchanged(before, net)


def test_read_samples_uses_dataset_indexing_only():
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10))
    rng = torch.get_rng_state()
    x, y = read_samples(ds, [3, 1, 7], lambda b: (b[0], b[1]), batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert x.view(-1).tolist() == [3.0, 1.0, 7.0] and y.tolist() == [3, 1, 7]
