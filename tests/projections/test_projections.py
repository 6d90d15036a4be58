"""Layer projections: PCA and separation oracles (scikit-learn), capture hygiene, ProjectionMonitor end to end."""
import math
import os

import pytest
import torch

from helpers import (DigitsModule, assert_unchanged, digits_loaders, hook_count, read_events, small_cnn, snapshot,
                     tiny_trainer)
from lightning_xai.projections import capture_activations, class_separation, pca, silhouette_score, variance_ratio

sklearn = pytest.importorskip("sklearn")


# --------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("n, d, k", [pytest.param(50, 6, 3, id="tall"), pytest.param(12, 40, 4, id="wide"),
                                     pytest.param(30, 2, 2, id="all-components")])
def test_pca_matches_sklearn(n, d, k):
    from sklearn.decomposition import PCA

    x = torch.randn(n, d) @ torch.randn(d, d) + 3.0
    ours = pca(x, n_components=k)
    ref = PCA(n_components=k, svd_solver="full").fit(x.double().numpy())
    torch.testing.assert_close(ours.explained_variance.double(), torch.tensor(
        ref.explained_variance_), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.explained_variance_ratio.double(), torch.tensor(ref.explained_variance_ratio_),
                               rtol=1e-5, atol=1e-6)
    comps = torch.tensor(ref.components_, dtype=torch.float32)
    signs = torch.sign((ours.components * comps).sum(1, keepdim=True))  # components equal up to sign
    torch.testing.assert_close(ours.components, comps * signs, rtol=1e-4, atol=1e-5)
    proj = torch.tensor(ref.transform(x.double().numpy()), dtype=torch.float32)
    torch.testing.assert_close(ours.projected, proj * signs.T, rtol=1e-4, atol=1e-4)


def test_pca_sign_convention_is_deterministic():
    x = torch.randn(20, 5)
    a, b = pca(x, 3), pca(-x, 3)
    torch.testing.assert_close(a.components, b.components)  # flipping the data does not flip the axes
    pivot = a.components.abs().argmax(1)
    assert bool((a.components.gather(1, pivot.view(-1, 1)) > 0).all())


def test_pca_pads_missing_components_and_validates():
    res = pca(torch.randn(3, 5), n_components=4)  # only 3 samples: at most 3 components (the last ~0)
    assert res.projected.shape == (3, 4) and res.components.shape == (4, 5)
    with pytest.raises(ValueError, match="Expected `features` to be at least 2 rows"):
        pca(torch.randn(1, 5))
    with pytest.raises(ValueError, match="n_components"):
        pca(torch.randn(4, 5), n_components=0)


def test_pca_refuses_non_finite_features_by_name():
    x = torch.randn(6, 3)
    x[1, 0], x[4, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="Expected `features` to be finite, but got 2 rows holding NaN/inf"):
        pca(x)  # not linalg.svd's "failed to converge"


@pytest.mark.parametrize("classes", [pytest.param(2, id="two-classes"), pytest.param(5, id="five-classes")])
def test_separation_matches_sklearn(classes):
    from sklearn.metrics import calinski_harabasz_score
    from sklearn.metrics import silhouette_score as sk_silhouette

    labels = torch.arange(60) % classes
    x = torch.randn(60, 7) + labels.float().unsqueeze(1)
    labels[0] = classes  # a class with a single sample (silhouette 0 by convention)
    assert float(silhouette_score(x, labels)) == pytest.approx(sk_silhouette(x.numpy(), labels.numpy()), abs=1e-5)
    assert float(variance_ratio(x, labels)) == pytest.approx(
        calinski_harabasz_score(x.numpy(), labels.numpy()), rel=1e-5)


def test_separation_grows_with_distance_and_handles_one_class():
    labels = torch.arange(40) % 2
    noise = torch.randn(40, 3)
    near = class_separation(noise + 0.1 * labels.unsqueeze(1), labels)
    far = class_separation(noise + 10 * labels.unsqueeze(1), labels)
    assert float(far) > 0.8 > float(near)
    assert torch.isnan(class_separation(noise, torch.zeros(40, dtype=torch.long)))
    with pytest.raises(ValueError, match="method"):
        class_separation(noise, labels, "kmeans")


# --------------------------------------------------------------------------- capture
def test_capture_matches_manual_forward_and_batching():
    net = small_cnn().eval()
    x = torch.rand(10, 1, 8, 8)
    acts = capture_activations(net, x, ["1.3", "0.3"], reduce="flatten")
    with torch.no_grad():
        manual = net[1][:4](net[0](x))
    torch.testing.assert_close(acts["1.3"], manual)
    assert acts["0.3"].shape == (10, 16 * 8 * 8)
    assert list(acts) == ["0.3", "1.3"]  # model order
    assert capture_activations(net, x, ["0.3"])["0.3"].shape == (10, 16)  # "auto": global average pooling
    chunked = capture_activations(net, x, ["1.3"], batch_size=3)
    torch.testing.assert_close(chunked["1.3"], acts["1.3"])


def test_capture_unknown_layer_lists_names():
    with pytest.raises(ValueError, match=r"matching the model.s layers: 0, 0\.0"):
        capture_activations(small_cnn(), torch.rand(2, 1, 8, 8), ["nope"])


def test_capture_leaves_no_trace_even_on_error():
    net = small_cnn()
    net.train()
    x = torch.rand(4, 1, 8, 8)
    before = snapshot(net)
    capture_activations(net, x, ["0.1", "1.3"])
    assert_unchanged(before, net)

    def broken(inp):
        net(inp)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture_activations(net, x, ["0.1"], forward=broken)
    assert hook_count(net) == 0
    assert_unchanged(before, net)


# --------------------------------------------------------------------------- callback
def _fit(tmp_path, callbacks, seed=0, epochs=2):
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True)
    model = DigitsModule()
    train, val = digits_loaders(n_train=128, n_val=64)
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs)
    trainer.fit(model, train, val)
    return model, trainer


def test_projection_monitor_writes_projector_images_and_scalars(tmp_path):
    from lightning_xai.callbacks._projections import ProjectionMonitor

    monitor = ProjectionMonitor(layers=["net.0.3", "net.1.3"], reduce="flatten", probe_samples=20)
    _, trainer = _fit(tmp_path, [monitor])
    log_dir = os.path.join(str(tmp_path), "tb", "version_0")
    config = open(os.path.join(log_dir, "projector_config.pbtxt")).read()
    assert config.count("embeddings {") == 4  # 2 layers x 2 epochs
    assert "xai/projection/net.1.3:" in config
    n = monitor.probe_x.shape[0]
    assert n == 20
    steps = sorted(d for d in os.listdir(log_dir) if d.isdigit())
    assert len(steps) == 2
    emb_dirs = os.listdir(os.path.join(log_dir, steps[-1]))
    assert len(emb_dirs) == 2
    dims = {}
    for sub in emb_dirs:
        folder = os.path.join(log_dir, steps[-1], sub)
        rows = open(os.path.join(folder, "tensors.tsv")).read().strip().split("\n")
        assert len(rows) == n
        dims[sub] = len(rows[0].split("\t"))
        meta = open(os.path.join(folder, "metadata.tsv")).read().strip().split("\n")
        assert meta[0] == "label\tprediction" and len(meta) == n + 1
        assert os.path.exists(os.path.join(folder, "sprite.png"))
    assert sorted(dims.values()) == [32, 16 * 8 * 8]

    acc = read_events(log_dir)
    for layer in ("net.0.3", "net.1.3"):
        images = acc.Images(f"xai/projection/{layer}/pca")
        assert len(images) == 2 and images[-1].width > 100
        sep = acc.Scalars(f"xai/projection/{layer}/separation")
        assert len(sep) == 2 and -1 <= sep[-1].value <= 1
        assert 0 < acc.Scalars(f"xai/projection/{layer}/pca_variance")[-1].value <= 1
    assert trainer.callback_metrics["xai/projection/net.1.3/separation"] is not None

    # a resumed run explains the same probe set: the state is plain tensors and loads with weights_only
    path = os.path.join(str(tmp_path), "state.pt")
    torch.save(monitor.state_dict(), path)
    fresh = ProjectionMonitor(layers=["net.0.3", "net.1.3"])
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.probe_x, monitor.probe_x) and torch.equal(fresh.probe_y, monitor.probe_y)
    assert fresh.state_key == monitor.state_key != ProjectionMonitor(layers=["net.0.3"]).state_key


def test_projection_monitor_does_no_harm(tmp_path):
    from lightning_xai.callbacks._projections import ProjectionMonitor

    plain, _ = _fit(tmp_path / "a", [])
    watched, _ = _fit(tmp_path / "b", [ProjectionMonitor(layers=["net.0.1", "net.1.3"], probe_samples=16)])
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), k
    assert hook_count(watched) == 0


def test_projection_monitor_compute_hygiene_and_bad_layer(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_xai.callbacks._projections import ProjectionMonitor

    module = DigitsModule()
    module.train()
    module.net[0][0].weight.grad = torch.ones_like(module.net[0][0].weight)
    cb = ProjectionMonitor(layers=["net.1.*"])
    cb.layers = ["net.1.1", "net.1.3"]
    x = torch.rand(6, 1, 8, 8)
    before = snapshot(module)
    with cb.explain_context(module):
        out = cb.compute(module, x, None)
    assert out["act/net.1.3"].shape == (6, 32) and out["pred"].shape == (6,)
    assert_unchanged(before, module)

    trainer = tiny_trainer(tmp_path, callbacks=[ProjectionMonitor(layers=["net.9"])])
    train, val = digits_loaders(n_train=32, n_val=32)
    with pytest.raises(MisconfigurationException, match="one of the model's layers|matching the model's layers"):
        trainer.fit(DigitsModule(), train, val)
    with pytest.raises(MisconfigurationException, match="reduce"):
        ProjectionMonitor(layers=["net.0"], reduce="max")


# --------------------------------------------------------------------------- bad inputs and bad options
def _nan_probe(n=16, bad=(0, 5, 9)):
    """``n`` validation digits as a probe set, the rows ``bad`` with one NaN pixel each."""
    _, val = digits_loaders(n_train=32, n_val=n)
    x, y = (t.clone() for t in val.dataset.tensors)
    x[list(bad), 0, 2, 2] = float("nan")
    return x, y


def _tsv(log_dir, step_dir, layer, name):
    folder = os.path.join(log_dir, step_dir, f"xai_projection_{layer}")
    return open(os.path.join(folder, name)).read().strip().split("\n")


def test_nan_inputs_are_left_out_of_every_view_with_one_warning(tmp_path):
    """NaN pixels in 3 of 16 probe samples: one warning saying how many and when; the scatter, the scalars and the
    projector show the 13 others, exactly as a probe set without the 3 would (not linalg.svd's "non-finite")."""
    import warnings

    from lightning_xai import ProjectionMonitor

    x, y = _nan_probe()
    keep = torch.isfinite(x.flatten(1)).all(1)
    runs = {}
    for name, probe in (("nan", (x, y)), ("clean", (x[keep], y[keep]))):
        monitor = ProjectionMonitor(layers=["net.0.3", "net.1.3"], probe=probe, on_error="raise")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, trainer = _fit(tmp_path / name, [monitor])
        said = [str(w.message) for w in caught if "NaN/inf" in str(w.message)]
        runs[name] = (monitor, trainer.logger.log_dir, said)
    monitor, log_dir, said = runs["nan"]
    assert monitor.errors == 0 and monitor.last_explained_epoch == 1
    assert len(said) == 1, said
    assert said[0].startswith("ProjectionMonitor: 3 of the 16 probe samples have NaN/inf activations at "
                              "'net.0.3' and 'net.1.3' at epoch 0"), said[0]
    assert "left out" in said[0] and "3 of the 16 probe inputs hold NaN/inf" in said[0], said[0]
    assert runs["clean"][2] == []
    acc, clean = read_events(log_dir), read_events(runs["clean"][1])
    for layer in ("net.0.3", "net.1.3"):
        for tag in (f"xai/projection/{layer}/separation", f"xai/projection/{layer}/pca_variance"):
            values = [e.value for e in acc.Scalars(tag)]
            assert len(values) == 2 and all(math.isfinite(v) for v in values), tag
            assert values == [e.value for e in clean.Scalars(tag)], tag
        assert len(acc.Images(f"xai/projection/{layer}/pca")) == 2
        steps = sorted(d for d in os.listdir(log_dir) if d.isdigit())
        assert len(steps) == 2
        for step in steps:
            rows = _tsv(log_dir, step, layer, "tensors.tsv")
            assert rows == _tsv(runs["clean"][1], step, layer, "tensors.tsv")  # the 13 finite rows, no NaN
            assert len(rows) == 13 and "nan" not in "".join(rows).lower()
            meta = _tsv(log_dir, step, layer, "metadata.tsv")
            assert meta == _tsv(runs["clean"][1], step, layer, "metadata.tsv") and len(meta) == 14


def test_pca_scatter_says_how_many_samples_it_leaves_out(tmp_path):
    from lightning_xai import ProjectionMonitor

    x, y = _nan_probe()
    monitor = ProjectionMonitor(layers=["net.1.3"], probe=(x, y), projector=False, on_error="raise")
    titles = []
    import lightning_xai.callbacks._projections as module

    real = module.scatter_image

    def spy(points, labels, **kwargs):
        titles.append((points.shape[0], labels.shape[0], kwargs["title"]))
        return real(points, labels, **kwargs)

    module.scatter_image = spy
    try:
        with pytest.warns(RuntimeWarning, match="NaN/inf"):
            _fit(tmp_path, [monitor], epochs=1)
    finally:
        module.scatter_image = real
    assert titles == [(13, 13, "net.1.3, epoch 0 (colour: label)\n3 of 16 samples left out: NaN/inf activations")]


def test_all_non_finite_rows_log_nothing_for_that_layer_and_do_not_fail(tmp_path):
    from lightning_xai import ProjectionMonitor

    x, y = _nan_probe(n=4, bad=(0, 1, 2, 3))
    monitor = ProjectionMonitor(layers=["net.1.3"], probe=(x, y), on_error="raise")
    with pytest.warns(RuntimeWarning, match="4 of the 4 probe samples have NaN/inf"):
        _, trainer = _fit(tmp_path, [monitor], epochs=1)
    assert monitor.errors == 0 and monitor.last_explained_epoch == 0
    log_dir = trainer.logger.log_dir
    assert not any(d.isdigit() for d in os.listdir(log_dir))  # no projector embedding of zero rows
    assert not [t for t in read_events(log_dir).Tags()["scalars"] if "projection/net.1.3" in t]


class _UnstableInEval(DigitsModule):
    """Finite inputs, NaN/inf activations outside training (as an unstable layer would give)."""

    def forward(self, x):
        return super().forward(x if self.training else x * float("inf"))


def test_nan_activations_from_finite_inputs_blame_the_layer_not_the_inputs(tmp_path):
    from lightning_xai import ProjectionMonitor

    train, val = digits_loaders(n_train=32, n_val=32)
    monitor = ProjectionMonitor(layers=["net.1.3"], probe_samples=8, on_error="raise")
    with pytest.warns(RuntimeWarning, match=r"8 of the 8 probe samples have NaN/inf activations at 'net.1.3' at epoch "
                                            r"0 \(the probe inputs are finite: an unstable layer, or has training "
                                            r"diverged\?\)"):
        tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1).fit(_UnstableInEval(), train, val)
    assert monitor.errors == 0 and monitor.last_explained_epoch == 0


class _NoTraining:
    """Counts training batches: a refused option must stop the fit before the first."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Counter(pl.Callback):
            steps = 0

            def on_train_batch_start(self, *args, **kwargs):
                self.steps += 1

        return Counter()


@pytest.mark.parametrize("probe", [pytest.param(None, id="sanity-check-batch"),
                                   pytest.param("tensors", id="probe-tensors")])
@pytest.mark.parametrize("names", [pytest.param(["zero", "one"], id="short"),
                                   pytest.param([str(c) for c in range(11)], id="long")])
def test_class_names_not_one_per_class_are_refused_before_training(tmp_path, names, probe):
    from lightning_xai import ProjectionMonitor
    from lightning_xai._lightning import MisconfigurationException

    train, val = digits_loaders(n_train=32, n_val=32)
    given = None if probe is None else tuple(t[:8] for t in val.dataset.tensors)
    counter = _NoTraining()
    monitor = ProjectionMonitor(layers=["net.1.3"], class_names=names, probe=given)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor, counter], logger=False, max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(MisconfigurationException) as info:
        trainer.fit(DigitsModule(), train, val)
    assert str(info.value) == (f"Expected `class_names` to be a list of 10 names, one per class of the model's output, "
                               f"but got {names} ({len(names)} names)."), str(info.value)
    assert counter.steps == 0


def test_class_names_one_per_class_name_the_projector_metadata(tmp_path):
    from lightning_xai import ProjectionMonitor

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    monitor = ProjectionMonitor(layers=["net.1.3"], class_names=names, probe_samples=10)
    _, trainer = _fit(tmp_path, [monitor], epochs=1)
    log_dir = trainer.logger.log_dir
    (step,) = [d for d in os.listdir(log_dir) if d.isdigit()]
    meta = _tsv(log_dir, step, "net.1.3", "metadata.tsv")
    assert {row.split("\t")[0] for row in meta[1:]} <= set(names) and len(meta) == 11


@pytest.mark.parametrize("option, value", [
    pytest.param("separation", 3, id="separation-int"),
    pytest.param("separation", None, id="separation-none"),
    pytest.param("layers", 3, id="layers-int"),
    pytest.param("layers", [3], id="layers-of-int"),
    pytest.param("reduce", 3, id="reduce-int"),
    pytest.param("reduce", {"net.1.3": "gap"}, id="reduce-dict"),
    pytest.param("class_names", "abc", id="class-names-str"),
    pytest.param("class_names", [1, 2], id="class-names-of-int"),
    pytest.param("projector", "yes", id="projector-str"),
    pytest.param("thumbnail_size", 2.0, id="thumbnail-size-float"),
])
def test_a_wrong_type_is_a_type_error(option, value):
    from lightning_xai import ProjectionMonitor
    from lightning_xai._lightning import MisconfigurationException, MisconfigurationTypeError

    kwargs = {"layers": ["net.1.3"], option: value}
    with pytest.raises(MisconfigurationTypeError) as info:
        ProjectionMonitor(**kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, MisconfigurationException)
    assert str(info.value).startswith(f"Expected `{option}` to be "), str(info.value)


@pytest.mark.parametrize("option, value", [
    pytest.param("separation", "x", id="separation-unknown"),
    pytest.param("layers", [], id="layers-empty"),
    pytest.param("layers", [""], id="layers-empty-name"),
    pytest.param("reduce", "median", id="reduce-unknown"),
    pytest.param("thumbnail_size", 0, id="thumbnail-size-zero"),
])
def test_a_wrong_value_of_the_right_type_is_a_value_error(option, value):
    from lightning_xai import ProjectionMonitor
    from lightning_xai._lightning import MisconfigurationException

    with pytest.raises(MisconfigurationException) as info:
        ProjectionMonitor(**{"layers": ["net.1.3"], option: value})
    assert isinstance(info.value, ValueError) and not isinstance(info.value, TypeError), type(info.value).__mro__
    assert str(info.value).startswith(f"Expected `{option}` to be "), str(info.value)
