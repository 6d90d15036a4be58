"""Streaming callbacks: read the validation batches as Lightning runs them, then finish at the epoch's end.

Nothing is chosen in advance: :meth:`StreamingCallback.update` sees each batch of the first validation (or test)
dataloader as it passes, and the epoch's end finishes the run: ``compute`` (every model pass the finish needs) then
``report`` (log, no model pass), each under the error policy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from typing_extensions import override

from lightning_xai.callbacks._base import XAICallback

if TYPE_CHECKING:
    import lightning.pytorch as pl


class StreamingCallback(XAICallback):
    """An :class:`~lightning_xai.callbacks.XAICallback` of the streaming kind: per validation batch, then a finish
    at the epoch's end.

    A subclass implements :meth:`update` (one batch), :meth:`compute` (the run's results) and :meth:`report`
    (log them). The finish runs on the cadence's epochs through :meth:`explain`; a subclass whose per-batch work
    only happens on those epochs (e.g. activation hooks attached at the epoch's start) calls :meth:`finish` itself.
    """

    kind = "streaming"
    #: what the failure warnings say was being done in :meth:`compute` and :meth:`report`
    computing = "explaining"
    reporting = "logging"

    def update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, dataloader_idx: int) -> None:
        """Take one validation (or test) batch into account."""

    def compute(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int) -> Any:
        """The run's results from what :meth:`update` saw (every model pass of the finish happens here); falsy when
        there is nothing to report."""
        raise NotImplementedError

    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", results: Any,
               epoch: int) -> Dict[str, float]:
        """Log figures (rank zero only) and return the scalars to log; called on every rank, no model pass."""
        raise NotImplementedError

    def finish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: int,
               via_module: bool = True) -> None:
        """``compute`` then ``report``, each under the error policy; the scalars logged with the run's cost."""
        results = self.guarded(lambda: self.compute(trainer, pl_module, epoch), self.computing, epoch)
        if not results:
            return
        metrics = self.guarded(lambda: self.report(trainer, pl_module, results, epoch), self.reporting, epoch)
        if metrics is not None:
            self.log_metrics(trainer, pl_module, metrics, via_module=via_module, seconds=True)
        self.last_explained_epoch = epoch

    def explain(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", via_module: bool = True) -> None:
        """Finish the run of the epoch the cadence chose (see :meth:`finish`)."""
        self.finish(trainer, pl_module, self.begin_run(trainer, via_module), via_module)

    @override
    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.update(trainer, pl_module, batch, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.update(trainer, pl_module, batch, dataloader_idx)
