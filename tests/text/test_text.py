"""Token attributions: Captum oracle, completeness, planted token, rendering, hygiene, TokenAttributionMonitor."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_unchanged, hook_count, read_events, snapshot, tiny_trainer
from lightning_xai.text import attribution_markdown, token_attributions, token_share, tokens_markdown
from lightning_xai.text._attribution import EmbeddingSwap
from lightning_xai.text.synthetic import SPURIOUS, VOCAB, spurious_token_data


class TinyText(nn.Module):
    """Embedding -> (optional 1-layer transformer encoder) -> mean over tokens -> linear."""

    def __init__(self, vocab_size=len(VOCAB), dim=16, classes=2, transformer=False):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True) if transformer else None
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        e = self.embedding(ids)  # (N, T, E)
        if self.encoder is not None:
            e = self.encoder(e)
        return self.head(e.mean(1))


def _ids(n=4, t=7):
    return torch.randint(1, len(VOCAB), (n, t))


# --------------------------------------------------------------------------- oracles and properties
@pytest.mark.parametrize("transformer", [pytest.param(False, id="mean-pool"), pytest.param(True, id="transformer")])
def test_ig_equals_captum_layer_integrated_gradients(transformer):
    captum_attr = pytest.importorskip("captum.attr")
    model = TinyText(transformer=transformer).eval()
    ids, target = _ids(), torch.tensor([0, 1, 1, 0])
    pad = torch.zeros_like(ids)
    ours = token_attributions(model, ids, target, embedding_layer="embedding", steps=64, baseline="pad")
    lig = captum_attr.LayerIntegratedGradients(model, model.embedding)
    ref = lig.attribute(ids, baselines=pad, target=target, n_steps=64, method="gausslegendre").sum(-1)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("baseline, transformer", [
    pytest.param("pad", True, id="pad-transformer"),
    # zero embeddings sit on LayerNorm's singularity (a constant vector), where 64 steps are not enough
    pytest.param("zero", False, id="zero-mean-pool"),
])
def test_ig_completeness(baseline, transformer):
    model = TinyText(transformer=transformer).eval()
    ids = _ids(3, 9)
    attr, delta = token_attributions(model, ids, 1, embedding_layer=model.embedding, steps=64, baseline=baseline,
                                     return_delta=True)
    with torch.no_grad():
        fx = model(ids)[:, 1]
        if baseline == "pad":
            fb = model(torch.zeros_like(ids))[:, 1]
        else:
            fb = model.head(torch.zeros(3, 16))[:, 1]
    torch.testing.assert_close(attr.sum(1), fx - fb, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(delta, attr.sum(1) - (fx - fb), rtol=1e-3, atol=1e-5)


def test_saliency_is_summed_absolute_embedding_gradient():
    model = TinyText().eval()
    ids = _ids()
    ours = token_attributions(model, ids, 1, embedding_layer="embedding", method="saliency")
    emb = model.embedding(ids).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.head(emb.mean(1))[:, 1].sum(), emb)
    torch.testing.assert_close(ours, grad.abs().sum(-1))


def test_pad_positions_get_zero_with_pad_baseline_and_ids_are_per_sample():
    model = TinyText(transformer=True).eval()
    ids = _ids(2, 6)
    ids[0, 4:] = 0
    attr = token_attributions(model, ids, None, embedding_layer="embedding", steps=16)
    assert torch.equal(attr[0, 4:], torch.zeros(2))
    single = token_attributions(model, ids[1:], None, embedding_layer="embedding", steps=16)
    torch.testing.assert_close(attr[1:], single)  # per-sample independence


def test_hooks_removed_and_state_untouched_even_on_error():
    model = TinyText(transformer=True)
    model.eval()
    model.head.train()  # mixed flags must come back exactly
    ids = _ids()
    model.embedding.weight.grad = torch.ones_like(model.embedding.weight)
    before = snapshot(model)
    token_attributions(model, ids, 0, embedding_layer="embedding", steps=8)
    token_attributions(model, ids, 0, embedding_layer="embedding", method="saliency")
    assert_unchanged(before, model)

    def broken(x):
        model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        token_attributions(model, ids, 0, embedding_layer="embedding", forward=broken)
    assert hook_count(model) == 0
    assert_unchanged(before, model)


def test_bad_arguments():
    model = TinyText()
    with pytest.raises(ValueError, match="one of the model's layers: embedding"):
        token_attributions(model, _ids(), 0, embedding_layer="embed")
    with pytest.raises(TypeError, match="input_ids"):
        token_attributions(model, torch.rand(2, 3), 0, embedding_layer="embedding")
    with pytest.raises(ValueError, match="method"):
        token_attributions(model, _ids(), 0, embedding_layer="embedding", method="grad_cam")
    with pytest.raises(ValueError, match="Expected `baseline`"):
        token_attributions(model, _ids(), 0, embedding_layer="embedding", baseline="mask")


def _train_planted(steps=80, seed=0):
    torch.manual_seed(seed)
    model = TinyText()
    data = spurious_token_data(256, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(data.input_ids), data.labels).backward()
        opt.step()
    return model.eval()


def test_planted_token_gets_the_largest_share():
    model = _train_planted()
    probe = spurious_token_data(32, shortcut="random", seed=1)
    attr = token_attributions(model, probe.input_ids, probe.labels, embedding_layer="embedding", steps=16)
    shares = {}
    for tok in probe.input_ids.unique().tolist():
        shares[VOCAB[tok]] = float(token_share(attr, probe.input_ids, tok).nanmean())
    best = max(shares, key=shares.get)
    assert best == SPURIOUS, shares
    assert shares[SPURIOUS] > 0.3


def test_token_share_and_markdown_rendering():
    ids = torch.tensor([[2, 1, 0], [3, 4, 5]])
    attr = torch.tensor([[0.1, 0.9, 0.0], [0.5, -0.25, 0.25]])
    share = token_share(attr, ids, 1)
    assert share[0].item() == pytest.approx(0.9) and torch.isnan(share[1])
    vocab = ["<pad>", "zz", "a|b", "x*", "y", "z"]
    md = attribution_markdown(ids, attr, vocab, labels=torch.tensor(
        [1, 0]), preds=torch.tensor([1, 1]), skip_ids=[0], top_k=1)
    assert "**zz**(+0.90)" in md and "<pad>" not in md
    assert "a\\|b(+0.10)" in md and "**x\\***(+0.50)" in md and "y(-0.25)" in md
    assert tokens_markdown(["a"], torch.tensor([0.0])) == "**a**(+0.00)"
    from tensorboard.plugin_util import markdown_to_safe_html

    html = markdown_to_safe_html(md)
    assert "<strong>zz</strong>(+0.90)" in html and "<table>" in html and html.count("<tr>") == 3


def test_embedding_swap_capture_and_replace():
    model = TinyText().eval()
    ids = _ids(2, 5)
    with EmbeddingSwap(model.embedding) as swap:
        emb = swap.capture(model, ids)
        out = swap.run(model, ids, torch.zeros_like(emb))
    torch.testing.assert_close(emb, model.embedding(ids))
    torch.testing.assert_close(out, model.head(torch.zeros(2, 16)))
    assert hook_count(model) == 0


# --------------------------------------------------------------------------- callback
import pytorch_lightning as pl  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


class TextModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyText(transformer=True)

    def forward(self, ids):
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_acc", (self(ids).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def _fit_text(tmp_path, callbacks, epochs=2):
    pl.seed_everything(0, workers=True)
    module = TextModule()
    train = DataLoader(TensorDataset(*spurious_token_data(128).tensors()), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(*spurious_token_data(32, shortcut="random", seed=1).tensors()), batch_size=32)
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs)
    trainer.fit(module, train, val)
    return module, trainer


def test_token_attribution_monitor_logs_text_and_scalars_and_does_no_harm(tmp_path):
    from lightning_xai.callbacks._text import TokenAttributionMonitor

    monitor = TokenAttributionMonitor("net.embedding", vocab=list(VOCAB), watch_tokens=["zz", "missing"],
                                      options={"steps": 16}, probe_samples=8)
    watched, _ = _fit_text(tmp_path / "a", [monitor])
    plain, _ = _fit_text(tmp_path / "b", [])
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), k
    assert hook_count(watched) == 0

    acc = read_events(os.path.join(str(tmp_path / "a"), "tb", "version_0"))
    assert "xai/text/integrated_gradients/text_summary" in acc.Tags()["tensors"]
    texts = acc.Tensors("xai/text/integrated_gradients/text_summary")
    assert len(texts) == 2
    md = texts[-1].tensor_proto.string_val[0].decode()
    assert md.count("\n| ") == 1 + 8 and "(+" in md and "**" in md  # table header + a row per probe sentence
    share = acc.Scalars("xai/text/integrated_gradients/share/zz")
    assert len(share) == 2 and 0 <= share[-1].value <= 1
    gap = acc.Scalars("xai/text/integrated_gradients/completeness_gap")
    assert gap[-1].value < 0.05
    assert not any("missing" in t for t in acc.Tags()["scalars"])


def test_token_attribution_monitor_bad_config(tmp_path):
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_xai.callbacks._text import TokenAttributionMonitor

    with pytest.raises(MisconfigurationException, match="method"):
        TokenAttributionMonitor("net.embedding", vocab=list(VOCAB), method="occlusion")
    with pytest.raises(MisconfigurationException, match="vocab"):
        TokenAttributionMonitor("net.embedding", vocab="abc")
    with pytest.raises(MisconfigurationException, match="one of the model's layers"):
        _fit_text(tmp_path, [TokenAttributionMonitor("net.embed", vocab=list(VOCAB))], epochs=1)


def test_monitors_work_under_validate_inference_mode(tmp_path):
    """trainer.validate() runs under torch.inference_mode(); the probe ids are inference tensors there."""
    from lightning_xai.callbacks._projections import ProjectionMonitor
    from lightning_xai.callbacks._text import TokenAttributionMonitor

    val = DataLoader(TensorDataset(*spurious_token_data(32, shortcut="random", seed=1).tensors()), batch_size=32)
    callbacks = [TokenAttributionMonitor("net.embedding", vocab=list(VOCAB), watch_tokens=[1], options={"steps": 8},
                                         probe_samples=8, on_error="raise"),
                 ProjectionMonitor(layers=["net.encoder"], on_error="raise", projector=False)]
    module = TextModule()
    before = snapshot(module)
    metrics = tiny_trainer(tmp_path, callbacks=callbacks).validate(module, val, verbose=False)[0]
    assert 0 <= metrics["xai/text/integrated_gradients/share/zz"] <= 1
    assert metrics["xai/text/integrated_gradients/completeness_gap"] < 0.05
    assert "xai/projection/net.encoder/separation" in metrics
    before["rng"] = torch.get_rng_state()  # the DataLoader iterator draws its base seed from the global RNG
    assert_unchanged(before, module)
