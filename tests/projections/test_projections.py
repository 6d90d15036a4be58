"""Layer projections: PCA and separation oracles (scikit-learn), capture hygiene, ProjectionMonitor end to end."""
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
