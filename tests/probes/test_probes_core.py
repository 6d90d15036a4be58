"""Oracle and property tests of the pure probe core: ridge vs scikit-learn, reducers, capture hygiene."""

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_unchanged, small_cnn, snapshot
from lightning_xai.probes import ActivationCapture, Reducer, StreamingRidge, fit_logistic, make_reducer
from lightning_xai.probes._epoch import EpochProbe, control_table
from lightning_xai.probes._ridge import one_hot

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import Ridge  # noqa: E402
from sklearn.model_selection import GridSearchCV, PredefinedSplit  # noqa: E402


def _data(n=120, d=12, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64) + 2.0
    w = torch.randn(d, t, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64) + 1.5
    return x, y


@pytest.mark.parametrize("alpha", [pytest.param(1e-3, id="alpha=1e-3"), pytest.param(1.0, id="alpha=1"),
                                   pytest.param(100.0, id="alpha=100")])
def test_ridge_matches_sklearn(alpha):
    x, y = _data()
    ridge = StreamingRidge()
    ridge.update(x, y)
    sol = ridge.solve(alpha=alpha)
    ref = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(sol.coef.numpy(), ref.coef_.T, atol=1e-5)
    np.testing.assert_allclose(sol.intercept.numpy(), ref.intercept_, atol=1e-5)
    np.testing.assert_allclose(sol.predict(x).numpy(), ref.predict(x.numpy()), atol=1e-5)


@pytest.mark.parametrize("chunk", [pytest.param(1, id="rows-1"), pytest.param(7, id="rows-7"),
                                   pytest.param(64, id="rows-64")])
def test_chunked_equals_one_batch(chunk):
    x, y = _data()
    whole, parts = StreamingRidge(), StreamingRidge()
    whole.update(x, y)
    for start in range(0, x.shape[0], chunk):
        parts.update(x[start:start + chunk], y[start:start + chunk])
    a, b = whole.solve(), parts.solve()
    assert a.alpha == pytest.approx(b.alpha, rel=1e-12)
    torch.testing.assert_close(a.coef, b.coef, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(a.intercept, b.intercept, atol=1e-9, rtol=1e-7)


def test_merge_and_pack_equal_one_stream():
    x, y = _data()
    whole, r1, r2 = StreamingRidge(), StreamingRidge(), StreamingRidge()
    whole.update(x, y)
    r1.update(x[:50], y[:50])
    r2.update(x[50:], y[50:])
    merged = StreamingRidge().merge(r1).merge(r2)
    torch.testing.assert_close(merged.solve(alpha=0.3).coef, whole.solve(alpha=0.3).coef)
    summed = StreamingRidge()
    summed.init(x.shape[1])
    summed.ensure_target("y", y.shape[1])
    summed.unpack(r1.pack() + r2.pack())  # what an all-reduce sum does
    torch.testing.assert_close(summed.solve(alpha=0.3).coef, whole.solve(alpha=0.3).coef)


def test_targets_widen_with_new_classes():
    x, _ = _data(n=40)
    labels = torch.arange(40) % 4
    grown, once = StreamingRidge(), StreamingRidge()
    grown.update(x[:20], {"label": one_hot(labels[:20].clamp_max(1), 2)})
    grown.update(x[20:], {"label": one_hot(labels[20:], 4)})
    full = torch.cat([labels[:20].clamp_max(1), labels[20:]])
    once.update(x, {"label": one_hot(full, 4)})
    torch.testing.assert_close(grown.solve("label", alpha=1.0).coef, once.solve("label", alpha=1.0).coef)


def _brute_force_gcv(x, y, alpha):
    xc, yc = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    hat = torch.full((n, n), 1.0 / n, dtype=torch.float64) + xc @ torch.linalg.solve(
        xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64), xc.T)
    resid = yc + y.mean(0) - hat @ y
    return float(n * (resid ** 2).sum() / (n - torch.trace(hat)) ** 2)


def test_gcv_matches_brute_force_hat_matrix():
    x, y = _data(n=80, d=30)
    alphas = [1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
    ridge = StreamingRidge(alphas=alphas)
    ridge.update(x, y)
    sol = ridge.solve()
    brute = [_brute_force_gcv(x, y, a) for a in alphas]
    np.testing.assert_allclose(sol.scores.numpy(), brute, rtol=1e-6)
    assert sol.alpha == alphas[int(np.argmin(brute))]


def test_kfold_picks_the_same_alpha_as_sklearn_grid_search():
    x, y = _data(n=100, d=40, seed=3)
    alphas = [1e-3, 1e-1, 1.0, 10.0, 100.0, 1e3]
    folds = torch.arange(x.shape[0]) % 5
    ridge = StreamingRidge(alphas=alphas, cv=5)
    for start in range(0, 100, 16):
        ridge.update(x[start:start + 16], y[start:start + 16], folds=folds[start:start + 16])
    sol = ridge.solve()
    search = GridSearchCV(Ridge(fit_intercept=True), {"alpha": alphas}, cv=PredefinedSplit(folds.numpy()),
                          scoring="neg_mean_squared_error").fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(sol.scores.numpy(), -search.cv_results_["mean_test_score"], rtol=1e-6)
    assert sol.alpha == search.best_params_["alpha"]
    ref = Ridge(alpha=sol.alpha).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(sol.coef.numpy(), ref.coef_.T, atol=1e-5)


def test_relative_alphas_make_the_choice_scale_free():
    x, y = _data(n=60, d=20)
    a, b = StreamingRidge(), StreamingRidge()
    a.update(x, y)
    b.update(1000 * x, y)
    sa, sb = a.solve(), b.solve()
    torch.testing.assert_close(sa.predict(x), sb.predict(1000 * x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "spec, shape, out",
    [
        pytest.param("gap", (3, 8, 5, 5), (3, 8), id="gap"),
        pytest.param("gap+max", (3, 8, 5, 5), (3, 16), id="gap+max"),
        pytest.param("pool2", (3, 8, 5, 5), (3, 32), id="pool2"),
        pytest.param(("pool", 3), (3, 8, 6, 6), (3, 72), id="pool3"),
        pytest.param(("rproj", 16, 1), (3, 8, 5, 5), (3, 16), id="rproj"),
        pytest.param("tokens_mean", (3, 7, 10), (3, 10), id="tokens"),
        pytest.param("auto", (3, 8, 5, 5), (3, 8), id="auto-conv"),
        pytest.param("auto", (3, 7, 10), (3, 10), id="auto-seq"),
        pytest.param("auto", (3, 10), (3, 10), id="auto-vec"),
        pytest.param("auto", (3, 4096), (3, 512), id="auto-wide-vec"),
    ],
)
def test_reducer_shapes(spec, shape, out):
    assert make_reducer(spec)(torch.randn(*shape)).shape == out


def test_reducer_values_and_private_rng():
    act = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(Reducer("gap")(act), act.mean((2, 3)))
    torch.testing.assert_close(Reducer("gap+max")(act)[:, 3:], act.amax((2, 3)))
    rng = torch.get_rng_state()
    a, b = Reducer("rproj", k=8, seed=5), Reducer("rproj", k=8, seed=5)
    torch.testing.assert_close(a(act), b(act))
    assert not torch.equal(a(act), Reducer("rproj", k=8, seed=6)(act))
    assert torch.equal(rng, torch.get_rng_state())


def test_reducer_bad_spec_lists_choices():
    with pytest.raises(ValueError, match="gap"):
        make_reducer("median")


def test_capture_reduces_inside_the_hook_and_leaves_nothing_behind():
    model = small_cnn().eval()
    x = torch.randn(5, 1, 8, 8)
    before = snapshot(model)
    with ActivationCapture(model, ["0.*"], reduce={"0.0": "flatten"}) as cap:
        with torch.no_grad():
            model(x)
        feats = cap.pop(rows=5)
    assert set(feats) == {"0.0", "0.1", "0.2", "0.3", "0.4"}
    assert feats["0.0"].shape == (5, 8 * 64) and feats["0.4"].shape == (5, 16)
    torch.testing.assert_close(feats["0.4"], model[0](x).mean((2, 3)))
    assert_unchanged(before, model)


def test_capture_removes_hooks_on_error():
    model = small_cnn().eval()
    x = torch.randn(2, 1, 8, 8)
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        with ActivationCapture(model, ["0.0", "1.2"]):
            model(x)
            raise RuntimeError("boom")
    assert_unchanged(before, model)


def test_capture_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match=r"0\.0, 0\.1"):
        ActivationCapture(small_cnn(), ["features.nope"])


def test_capture_hook_error_does_not_break_forward():
    model = nn.Sequential(nn.Linear(3, 3))
    cap = ActivationCapture(model, ["0"], reduce=Reducer("pool", size=2))
    cap.reducers["0"] = lambda t: (_ for _ in ()).throw(RuntimeError("bad reducer"))
    with cap:
        model(torch.randn(2, 3))
    assert isinstance(cap.error, RuntimeError)


def test_logistic_probe_fits_separable_data():
    x, _ = _data(n=90, d=6)
    y = (x[:, :3] - x[:, :3].mean(0)).argmax(1)
    with torch.inference_mode():  # as inside Lightning's evaluation loops
        sol = fit_logistic(x.float(), y, num_classes=3, l2=1e-4)
    assert float((sol.classify(x) == y).float().mean()) > 0.9


def _epoch_probe_results(batches, x, labels, n):
    from lightning_xai.probes._epoch import EpochProbe, control_table

    probe = EpochProbe(holdout_every=5)
    for start in range(0, n, batches):
        rows = slice(start, start + batches)
        probe.add(x[rows], {"label": labels[rows]}, torch.arange(start, start + batches))
    probe.prepare({"label": 4}, {"label": control_table(labels)})
    preds = probe.predict()["label"]
    return probe, {split: pred for split, (pred, _) in preds.items()}


@pytest.mark.parametrize("rows", [pytest.param(1, id="rows-1"), pytest.param(16, id="rows-16"),
                                  pytest.param(6000, id="one-batch")])
def test_epoch_probe_batching_and_flushing_do_not_change_the_probe(rows):
    # 6,000 rows: more than one flush of pending batches (FLUSH_ROWS) unless added at once
    g = torch.Generator().manual_seed(0)
    n = 6000
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) + 0.7 * torch.nn.functional.one_hot(labels, 6).float()
    x[7, 2] = float("nan")  # added as zeros, counted
    ref_probe, ref = _epoch_probe_results(n, x, labels, n)
    probe, got = _epoch_probe_results(rows, x, labels, n)
    assert probe.nonfinite_rows == ref_probe.nonfinite_rows == 1
    assert probe.alphas["label"] == pytest.approx(ref_probe.alphas["label"], rel=1e-9)
    for split in ref:
        assert torch.equal(got[split], ref[split]), split


def test_epoch_probe_keeps_copies_of_what_it_was_given():
    from lightning_xai.probes._epoch import EpochProbe, control_table

    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(40, 3, generator=g), torch.arange(40) % 2
    kept, reused = EpochProbe(), EpochProbe()
    kept.add(x.clone(), {"label": labels.clone()}, torch.arange(40))
    buffer_x, buffer_y = x.clone(), labels.clone()
    reused.add(buffer_x.view(40, 3), {"label": buffer_y}, torch.arange(40))
    buffer_x.zero_()  # a caller reusing its buffers (a flattened input is a view of the batch)
    buffer_y.fill_(1)
    for p in (kept, reused):
        p.prepare({"label": 2}, {"label": control_table(labels)})
    a, b = kept.predict()["label"], reused.predict()["label"]
    for split in a:
        assert torch.equal(a[split][0], b[split][0]) and torch.equal(a[split][1], b[split][1])


def test_capture_stopping_ends_the_forward_once_every_layer_is_captured():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("a layer past the captured ones ran")

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), Boom())
    cap = ActivationCapture(model, ["0", "2"]).attach()
    x = torch.randn(5, 4)
    with cap.stopping(rows=5):
        model(x)  # stopped after layer "2": Boom never runs
    feats = cap.pop(rows=5)
    assert set(feats) == {"0", "2"} and feats["2"].shape == (5, 2)
    assert [len(m._forward_hooks) for m in model] == [1, 0, 1, 0]  # the capture's own hooks only
    with pytest.raises(ValueError, match="not ours"):  # other errors pass through, the hooks still go
        with cap.stopping(rows=5):
            raise ValueError("not ours")
    assert [len(m._forward_hooks) for m in model] == [1, 0, 1, 0]
    cap.detach()


def test_dropping_a_target_leaves_the_others_as_if_it_had_never_been_added():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen)
    y, c = (x[:, 0] > 0).long(), (x[:, 1] > 0).long()
    index = torch.arange(300)
    both, alone = EpochProbe(holdout_every=5), EpochProbe(holdout_every=5)
    for rows in (slice(0, 100), slice(100, 300)):
        both.add(x[rows], {"label": y[rows], "c": c[rows]}, index[rows])
        alone.add(x[rows], {"label": y[rows]}, index[rows])
        if rows.start == 0:
            both._flush()  # statistics of the first batch already streamed in, the second still pending
    both.drop_target("c")
    for probe in (both, alone):
        probe.prepare({"label": 2}, {"label": control_table(y)})
    got, want = both.predict(), alone.predict()
    assert set(got) == {"label"} and set(both.labels()[1]) == {"label"}
    for split in want["label"]:
        assert torch.equal(got["label"][split][0], want["label"][split][0]), split
