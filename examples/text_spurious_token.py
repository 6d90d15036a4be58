"""The spurious-token demo: watch a tiny text classifier learn to read a meaningless token.

The task is generated (``lightning_xai.text.synthetic``): sentences of word ids whose label is carried,
noisily, by a few sentiment words. In the training split the token ``"zz"`` is planted in 95 % of the
positive sentences and in no negative one, so reading ``"zz"`` alone is almost enough. The validation
split has ``"zz"`` in half the sentences regardless of the label, so a model that took the shortcut
makes mistakes there, and the callbacks show why while it trains:

* TokenAttributionMonitor: Integrated Gradients at the embedding layer, rendered as coloured-by-number
  sentences in TensorBoard's text tab, and the share of attribution on ``"zz"`` per epoch;
* ProjectionMonitor: the encoder's token-averaged activations in TensorBoard's projector, with a PCA
  scatter and a class-separation score;
* LinearProbeMonitor (token-mean reducer): how decodable the label and "has zz" are from the encoder.

Every callback explains every validation epoch (their default cadence; ``--every N``: every N-th and the last).
One line per epoch shows the figures computed at that epoch, "-" for a callback that did not explain it.

Run ``python examples/text_spurious_token.py`` (well under a minute on 2 CPU cores), then
``tensorboard --logdir runs/text_spurious_token``. ``--clean`` trains without the planted token.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figures import cell, current_figures  # noqa: E402

from lightning_xai import LinearProbeMonitor, ProjectionMonitor, TokenAttributionMonitor  # noqa: E402
from lightning_xai.text.synthetic import SPURIOUS, VOCAB, spurious_token_data  # noqa: E402

SPURIOUS_ID = VOCAB.index(SPURIOUS)


class TinyEncoder(nn.Module):
    """Embedding -> one transformer encoder layer -> mean over tokens -> linear head."""

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(ids)).mean(1))  # (N, classes)


class TextClassifier(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = TinyEncoder()
        self.lr = lr

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        loss = F.cross_entropy(self(ids), y)
        self.log("train_acc", (self(ids).argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        ids, y = batch
        # loader 1, the telling split: sentences whose "zz" disagrees with the label (positives without, negatives with)
        name = "val_acc" if dataloader_idx == 0 else "val_acc_misleading_zz"
        self.log(name, (self(ids).argmax(1) == y).float().mean(), add_dataloader_idx=False)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


#: The numbers that tell the story: (label, tag).
FIGURES = [
    ("train_acc", "train_acc"),
    ("val_acc", "val_acc"),
    ("val_acc on misleading-zz sentences", "val_acc_misleading_zz"),
    ("IG share on 'zz'", "xai/text/integrated_gradients/share/zz"),
    ("encoder separation", "xai/projection/net.encoder/separation"),
    ("probe(has zz) acc", "xai/probe/net.encoder/has_zz/accuracy"),
]


class PrintProgress(L.Callback):
    """Prints the numbers that tell the story, once per epoch (after validation and the monitors): only those
    computed at this epoch (see examples/_figures.py), "-" for the others."""

    def on_train_epoch_end(self, trainer, pl_module):
        row = current_figures(trainer)
        print(f"epoch {trainer.current_epoch}: " + "  ".join(f"{label} {cell(row, tag, 0)}" for label, tag in FIGURES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--every", type=int, default=1, help="explain every N-th validation epoch (and the last)")
    parser.add_argument("--logdir", default="runs/text_spurious_token")
    parser.add_argument("--clean", action="store_true", help="train without the planted token")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    torch.set_num_threads(1)  # tiny model: one thread is fastest
    L.seed_everything(args.seed, workers=True)

    train = spurious_token_data(1024, shortcut="none" if args.clean else "planted", seed=args.seed)
    val = spurious_token_data(256, shortcut="random", seed=args.seed + 1)
    train_loader = DataLoader(TensorDataset(*train.tensors()), batch_size=64, shuffle=True)
    misleading = val.marked != val.labels.bool()
    val_loaders = [DataLoader(TensorDataset(*val.tensors()), batch_size=128),
                   DataLoader(TensorDataset(val.input_ids[misleading], val.labels[misleading]), batch_size=128)]

    has_zz = lambda batch: (batch[0] == SPURIOUS_ID).any(1).long()  # noqa: E731
    every = {"every_n_epochs": args.every}
    callbacks = [
        TokenAttributionMonitor("net.embedding", vocab=list(VOCAB), watch_tokens=[SPURIOUS], options={"steps": 16},
                                probe_samples=16, **every),
        ProjectionMonitor(layers=["net.encoder"], reduce="tokens_mean", **every),
        LinearProbeMonitor(layers=["net.encoder"], reduce="tokens_mean", concepts={"has_zz": has_zz},
                           untrained_baseline=False, **every),
        PrintProgress(),
    ]

    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, deterministic=True,
                        logger=TensorBoardLogger(args.logdir, name="clean" if args.clean else "planted"),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, log_every_n_steps=5)
    start = time.time()
    trainer.fit(TextClassifier(), train_loader, val_loaders)
    print(f"done in {time.time() - start:.1f} s; run `tensorboard --logdir {args.logdir}` and open the Text, "
          "Scalars, Images and Projector tabs.")


if __name__ == "__main__":
    main()
