"""Every lightning_xai callback together under DDP (2 gloo processes on CPU), against the same fit in one process.

Three spawned runs, each compared with a one-process run of the same callbacks on the same data:

* ``test_ddp_stack_matches_one_process_and_logs_once``: all eight callbacks, validation data split by
  Lightning's ``DistributedSampler``, user-given probe sets of 7 rows (4 on rank 0, 3 on rank 1) and of
  1 row (rank 1 has none). Every image, text and scalar tag is written once, by rank zero, and equals the
  one-process figure; every rank ends with the same scalars.
* ``test_ddp_rank_without_validation_batches``: rank 1's validation loader yields nothing at all while the
  default probe set is collected from validation batches (the case where the candidates' gather used to
  mismatch shapes), with the streaming LinearProbeMonitor and a FeatureVisMonitor that reads its input
  shape and range from the data.
* ``test_ddp_unknown_region_checks_are_shared_and_match_one_process``: ShortcutDiscovery; each candidate's
  edits run half of the samples on each rank.

The image and tabular/token callbacks share one LightningModule: the tabular and token heads are extra
frozen submodules reached through each callback's ``forward=``.
"""
import glob
import io
import json
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from helpers import DigitsModule, digits_data, is_timing, read_events, small_cnn, tiny_trainer
from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,
                           SampleInfluenceMonitor, ShortcutDiscovery, ShortcutMonitor, TabularAttributionMonitor,
                           TokenAttributionMonitor)

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
VOCAB = ["<pad>", "t1", "t2", "t3", "t4", "t5", "t6", "t7"]
FEATURES = [f"f{i}" for i in range(6)]


class DumpMetrics(Callback):
    """Every rank writes its ``xai/`` callback metrics after each validation run (the last one stays)."""

    def __init__(self, path):
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("xai/")}
        metrics["world_size"] = trainer.world_size
        with open(f"{self.path}.rank{trainer.global_rank}.json", "w", encoding="utf-8") as fh:
            json.dump(metrics, fh)


class StackModule(DigitsModule):
    """The digits CNN plus frozen tabular and token heads (frozen: DDP needs no gradient for them)."""

    def __init__(self):
        super().__init__(small_cnn(batchnorm=False), lr=0.0)  # lr 0: the same weights in every run
        gen = torch.Generator().manual_seed(1)
        self.tab = nn.Sequential(nn.Linear(len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 3))
        self.tok = nn.Sequential(nn.Embedding(len(VOCAB), 4), nn.Flatten(), nn.Linear(4 * 6, 3))
        for p in list(self.tab.parameters()) + list(self.tok.parameters()):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen))
            p.requires_grad_(False)


def tab_forward(module, x):
    return module.tab(x)


def tok_forward(module, ids):
    return module.tok(ids)


class RankZeroOnly(IterableDataset):
    """All samples, in order, on global rank 0; nothing on any other rank."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return iter(())
        return zip(self.x, self.y)


def _fit(tmp_path, name, callbacks, val_loader, **kwargs):
    pl.seed_everything(0)
    train, _ = digits_data(n_train=128, n_val=0)
    path = str(tmp_path / name)
    # every training sample once in both runs (one process: 4 batches of 32; DDP: 2 per rank), so ShortcutMonitor keeps
    # the same reference samples
    batches = 4 if kwargs.get("devices", 1) == 1 else 2
    trainer = tiny_trainer(tmp_path / name, callbacks=list(callbacks) + [DumpMetrics(path)], max_epochs=1,
                           limit_train_batches=batches, **kwargs)
    trainer.fit(StackModule(), DataLoader(train, batch_size=32), val_loader)
    ranks = sorted(glob.glob(f"{path}.rank*.json"))
    out = []
    for file in ranks:
        with open(file, encoding="utf-8") as fh:
            out.append(json.load(fh))
    return out


def _events(log_dir):
    """``{kind: {tag: [values in step order]}}`` of the event files under ``log_dir``: encoded images,
    text strings and scalar values."""
    acc = read_events(log_dir)
    tags = acc.Tags()
    return {
        "images": {t: [e.encoded_image_string for e in acc.Images(t)] for t in tags["images"]},
        "text": {t: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)]
                 for t in tags["tensors"] if t.endswith("text_summary")},
        "scalars": {t: [e.value for e in acc.Scalars(t)] for t in tags["scalars"]},
    }


def _pixels(png):
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png))).astype("int16"))


def _assert_same_figures(single_dir, ddp_dir, single, ddp_ranks, expect):
    """The DDP run logged every tag once, as one process did, with the same values."""
    one, two = _events(single_dir), _events(ddp_dir)
    differing = set()
    assert len(glob.glob(os.path.join(ddp_dir, "events.out.tfevents.*"))) == 1  # one writer: rank zero
    for kind in ("images", "text", "scalars"):
        assert two[kind].keys() == one[kind].keys(), kind
        for tag, values in two[kind].items():
            if not tag.startswith("xai/") or is_timing(tag):
                continue
            assert len(values) == 1, f"{tag} logged {len(values)} times"
            if kind == "scalars":
                if values[0] != pytest.approx(one[kind][tag][0], rel=1e-5, abs=1e-6, nan_ok=True):
                    differing.add(tag)
            elif kind == "images":
                # a rank computes its rows in smaller batches, so float sums may round differently: a map value
                # on a quantisation boundary can land one of 255 levels apart, nothing more
                mine, theirs = _pixels(values[0]), _pixels(one[kind][tag][0])
                assert mine.shape == theirs.shape and (mine - theirs).abs().max() <= 1, \
                    f"{kind} {tag} differs from the one-process run"
            else:
                assert values == one[kind][tag], f"{kind} {tag} differs from the one-process run"
    assert not differing, f"scalars differ from one process: {sorted(differing)}"
    logged = set(one["images"]) | set(one["text"]) | set(one["scalars"])
    for tag in expect:
        assert any(t == tag or t.startswith(tag + "/") for t in logged), f"nothing logged under {tag}"
    # the callback metrics: the same on every rank, and the same as in one process
    (metrics,) = single
    assert metrics.pop("world_size") == 1 and len(ddp_ranks) == 2
    for rank, got in enumerate(ddp_ranks):
        assert got.pop("world_size") == 2
        assert got.keys() == metrics.keys(), rank
        for key, value in metrics.items():
            if is_timing(key):
                continue
            assert got[key] == pytest.approx(ddp_ranks[0][key], rel=1e-6, nan_ok=True), (rank, key)  # ranks agree
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), (rank, key)


def _stack(val):
    """All eight callbacks; user-given probe sets of 7 rows (4 + 3 per rank) and 1 row (none on rank 1)."""
    gen = torch.Generator().manual_seed(2)
    images = (val.tensors[0][:7], val.tensors[1][:7])
    rows = (torch.randn(1, len(FEATURES), generator=gen), torch.tensor([1]))
    ids = (torch.randint(1, len(VOCAB), (7, 6), generator=gen), torch.randint(0, 3, (7,), generator=gen))
    callbacks = [
        AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 8}), "occlusion"), probe=images),
        ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe=images, action="log"),
        ProjectionMonitor(layers=["net.1.3"], probe=images),
        SampleInfluenceMonitor(layer="net.1.4", k=3, max_train_samples=64, probe=images),
        LinearProbeMonitor(layers=["net.0.3", "net.1.3"]),
        FeatureVisMonitor(targets=[("logits", list(range(4))), ("net.0.3", "channels", list(range(3)))],
                          every_n_epochs=1, steps=12, min_side=16),
        TabularAttributionMonitor(feature_names=FEATURES, forward=tab_forward, probe=rows,
                                  method=("integrated_gradients", {"steps": 8})),
        TokenAttributionMonitor("tok.0", vocab=VOCAB, forward=tok_forward, probe=ids, watch_tokens=["t1"],
                                options={"steps": 8}),
    ]
    for callback in callbacks:
        callback.on_error = "raise"  # a failure in a spawned process fails the test instead of a warning there
    return callbacks


@pytest.mark.slow
@needs_gloo
def test_ddp_stack_matches_one_process_and_logs_once(tmp_path):
    _, val = digits_data(n_train=128, n_val=200)  # 200 = 2 ranks x 2 batches x 50: no padded duplicates
    single = _fit(tmp_path, "single", _stack(val), DataLoader(val, batch_size=50))
    ddp = _fit(tmp_path, "ddp", _stack(val), DataLoader(val, batch_size=50), devices=2, strategy="ddp_spawn")
    expect = ["xai/attribution/saliency", "xai/attribution/integrated_gradients", "xai/attribution/occlusion",
              "xai/shortcut/corner/share_ratio", "xai/projection/net.1.3", "xai/samples", "xai/probe/net.0.3/accuracy",
              "xai/probe/heatmap", "xai/featvis/logits", "xai/featvis/net.0.3", "xai/tabular", "xai/text"]
    _assert_same_figures(str(tmp_path / "single" / "tb" / "version_0"), str(tmp_path / "ddp" / "tb" / "version_0"),
                         single, ddp, expect)
    acc = read_events(tmp_path / "ddp" / "tb" / "version_0")
    assert acc.Images("xai/attribution/saliency")[0].height == _probe_figure_height(7)  # all 7 probe rows gathered


@pytest.mark.slow
@needs_gloo
def test_ddp_rank_without_validation_batches(tmp_path):
    """Rank 1 sees no validation batch: the default probe set comes from rank 0's candidates alone, as in one
    process over the same loader; LinearProbeMonitor and FeatureVisMonitor take widths, shapes and ranges
    from rank 0."""
    _, val = digits_data(n_train=128, n_val=150)

    def callbacks():
        return [AttributionMonitor(methods=("saliency",), probe_samples=12, on_error="raise"),
                ProjectionMonitor(layers=["net.1.3"], probe_samples=12, on_error="raise"),
                LinearProbeMonitor(layers=["net.1.3"], on_error="raise"),
                FeatureVisMonitor(targets=["logits", ("net.0.3", "channels", [0])], every_n_epochs=1,
                                  steps=8, min_side=16, on_error="raise")]  # the classes read on every rank

    loader = DataLoader(RankZeroOnly(*val.tensors), batch_size=50)
    single = _fit(tmp_path, "single", callbacks(), loader)
    ddp = _fit(tmp_path, "ddp", callbacks(), loader, devices=2, strategy="ddp_spawn")
    _assert_same_figures(str(tmp_path / "single" / "tb" / "version_0"), str(tmp_path / "ddp" / "tb" / "version_0"),
                         single, ddp, ["xai/attribution/saliency", "xai/projection/net.1.3",
                                       "xai/probe/net.1.3/accuracy", "xai/featvis/logits", "xai/featvis/net.0.3"])
    acc = read_events(tmp_path / "ddp" / "tb" / "version_0")
    assert acc.Images("xai/attribution/saliency")[0].height == _probe_figure_height(12)  # 12 rows, all from rank 0


def _probe_figure_height(rows):
    """The height of AttributionMonitor's saliency figure of ``rows`` probe digits (its layout depends on the number
    of rows, not on their values)."""
    from lightning_xai.render import attribution_figure

    fig = attribution_figure(torch.rand(rows, 1, 8, 8), torch.rand(rows, 8, 8), False, title="saliency · epoch 0",
                             subtitle="class explained: the label", scale=1.0,
                             captions=[["label 0 · pred 0", "conf 0.00 · expl. 0"]] * rows,
                             scale_note="; scale fixed at epoch 0")
    return fig.layout.height


def test_every_callback_pickles():
    """ddp_spawn pickles the Trainer with its callbacks to start the processes: every callback of the stack
    must survive it (FeatureVisMonitor's objectives too, and they still compute the same)."""
    import pickle

    _, val = digits_data(n_train=0, n_val=16)
    for callback in _stack(val):
        copy = pickle.loads(pickle.dumps(callback))
        assert type(copy) is type(callback)
        if isinstance(callback, FeatureVisMonitor):
            acts = {"logits": torch.randn(4, 10), "net.0.3": torch.randn(4, 16, 8, 8)}
            for (label, objs), (label2, objs2) in zip(callback.target_sets, copy.target_sets):
                assert label == label2
                assert all(torch.equal(a(acts), b(acts)) for a, b in zip(objs, objs2))


def test_featvis_target_sets_are_shared_out_over_ranks():
    monitor = FeatureVisMonitor(targets=[("logits", [0, 1]), ("net.0.3", "channels", [0, 1, 2, 3]),
                                         ("net.0.1", "channels", [0]), ("net.1.3", "neurons", [0, 1])])
    assert monitor._owners(1) == {"logits": 0, "net.0.3": 0, "net.0.1": 0, "net.1.3": 0}
    # the largest set first, each to the least loaded rank (ties: the lower rank): loads 4 | 2, 4 | 4, 5 | 4
    assert monitor._owners(2) == {"net.0.3": 0, "logits": 1, "net.1.3": 1, "net.0.1": 0}
    assert sorted(monitor._owners(8).values()) == [0, 1, 2, 3]  # more ranks than sets: the rest only gather


def test_split_rows_covers_every_row_once():
    from lightning_xai.callbacks._ranks import split_rows

    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            kept = []
            for rank in range(world):
                start, stop, keep = split_rows(n, world, rank)
                assert 0 <= keep <= stop - start and (stop - start >= 1 or n == 0)
                kept.extend(range(start, start + keep))
            assert kept == list(range(n)), (n, world)


class RowCountingShortcutDiscovery(ShortcutDiscovery):
    """A ShortcutDiscovery that appends, per candidate's edits, the samples planned and the rows this rank ran to a
    file per rank (``{path}.rank{r}.rows``)."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def _run_plan(self, pl_module, name, x, labels, masks, donors, donor_labels, donor_masks, rows, results):
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        with open(f"{self.path}.rank{rank}.rows", "a", encoding="utf-8") as fh:
            fh.write(f"{x.shape[0]} {rows[1] - rows[0]}\n")
        return super()._run_plan(pl_module, name, x, labels, masks, donors, donor_labels, donor_masks, rows, results)


@pytest.mark.slow
@needs_gloo
def test_ddp_unknown_region_checks_are_shared_and_match_one_process(tmp_path):
    """Unknown-region mode: each candidate's intervention runs half the samples on each rank, and every figure
    (alarms, shifts, z-scores of every candidate) equals a one-process run."""
    _, val = digits_data(n_train=128, n_val=200)
    images = (val.tensors[0][:15], val.tensors[1][:15])

    def monitor(name):
        return [RowCountingShortcutDiscovery(str(tmp_path / name), probe=images, action="log", on_error="raise")]

    single = _fit(tmp_path, "single", monitor("single"), DataLoader(val, batch_size=50))
    ddp = _fit(tmp_path, "ddp", monitor("ddp"), DataLoader(val, batch_size=50), devices=2, strategy="ddp_spawn")
    _assert_same_figures(str(tmp_path / "single" / "tb" / "version_0"), str(tmp_path / "ddp" / "tb" / "version_0"),
                         single, ddp, ["xai/shortcut/discovery/alarm", "xai/shortcut/corners/pull_z",
                                       "xai/shortcut/border/excess", "xai/shortcut/atypical_corner/rank"])

    def counts(name, rank):
        with open(tmp_path / f"{name}.rank{rank}.rows", encoding="utf-8") as fh:
            return [tuple(int(v) for v in line.split()) for line in fh]

    one, (zero, first) = counts("single", 0), (counts("ddp", 0), counts("ddp", 1))
    assert len(one) >= 3 and all(planned == ran for planned, ran in one)  # at least the presets and atypical corners
    assert [p for p, _ in zero] == [p for p, _ in first] == [p for p, _ in one]  # the same candidates, all samples
    for (planned, ran0), (_, ran1) in zip(zero, first):
        assert (ran0, ran1) == (-(-planned // 2), planned // 2)  # each rank ran its half


class DumpFolds(Callback):
    """Every rank writes, after each validation epoch, whether each callback's run used the folded copy."""

    def __init__(self, path):
        self.path = path

    def on_validation_epoch_end(self, trainer, pl_module):
        verdicts = {type(cb).__name__: list(cb._fold_agrees.values()) + [cb.errors]
                    for cb in trainer.callbacks if hasattr(cb, "_fold_agrees")}
        with open(f"{self.path}.rank{trainer.global_rank}.epoch{trainer.current_epoch}.json", "w",
                  encoding="utf-8") as fh:
            json.dump(verdicts, fh)


class BatchNormModule(DigitsModule):
    def __init__(self):
        super().__init__(small_cnn(batchnorm=True))


@needs_gloo
def test_ddp_ranks_fold_batchnorm_each_for_itself(tmp_path):
    """Without deterministic algorithms every rank folds its own copy, checks it in each run and uses it; nothing
    fails (on_error="raise" would end the spawned fit)."""
    pl.seed_everything(0)
    train, val = digits_data(n_train=128, n_val=64)
    path = str(tmp_path / "folds")
    callbacks = [AttributionMonitor(probe_samples=8, evolution_samples=0, on_error="raise"),
                 ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=16, action="log", on_error="raise"),
                 FeatureVisMonitor(targets=[("logits", (0, 3))], steps=4, on_error="raise", every_n_epochs=1)]
    trainer = tiny_trainer(tmp_path, callbacks=callbacks + [DumpFolds(path)], logger=False, devices=2,
                           strategy="ddp_spawn", deterministic=False, max_epochs=2)
    trainer.fit(BatchNormModule(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))
    files = sorted(glob.glob(f"{path}.rank*.epoch*.json"))
    assert len(files) == 4  # 2 ranks x 2 epochs
    for file in files:
        with open(file, encoding="utf-8") as fh:
            verdicts = json.load(fh)
        assert verdicts == {"AttributionMonitor": [True, 0], "ShortcutMonitor": [True, 0],
                            "FeatureVisMonitor": [True, 0]}, (file, verdicts)
