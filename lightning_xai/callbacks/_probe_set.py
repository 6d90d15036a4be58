"""Probe-set callbacks: choose the probe set once, then each run computes on it and reports.

The probe set is chosen stratified by class from the validation batches Lightning already loads (or given by the
user), identical on every rank, and kept in the callback's ``state_dict`` so a resumed run explains the same samples.
A run splits it over ranks (:meth:`~lightning_xai.callbacks.XAICallback.work_split`), calls ``compute`` on this
rank's share under the do-no-harm context (every model pass of the run happens here), gathers the shares and calls
``report`` (log images on rank zero, return scalars that every rank logs through ``pl_module.log``; no model pass).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from typing_extensions import override

from lightning_xai._lightning import (FITTING, TESTING, MisconfigurationException, MisconfigurationTypeError,
                                      refuse_bad_options)
from lightning_xai._utils import Passes, check_positive_int, expected, forked_rng
from lightning_xai.callbacks._base import XAICallback
from lightning_xai.callbacks._batches import (BATCH_FIX, BatchToXY, Buckets, choose_stratified, class_labels,
                                              collect_rows, extract_xy, first_loader)
from lightning_xai.callbacks._ranks import gather_shares, split_rows
from lightning_xai._logging import warn_once

if TYPE_CHECKING:
    import lightning.pytorch as pl

TARGETS = ("label", "prediction")  # besides a class index


class ProbeSetCallback(XAICallback):
    """An :class:`~lightning_xai.callbacks.XAICallback` of the probe-set kind: choose the probe set once, then each
    run computes on it (:meth:`compute`, every model pass) and reports (:meth:`report`, no model pass).

    Args:
        probe: ``None`` (default: ``probe_samples`` samples chosen stratified by class from the first
            validation batches), a tensor of inputs, a pair ``(inputs, labels)``, or a list of indices
            into the validation dataset.
        probe_samples: how many samples to choose when ``probe`` is None.
        batch_to_xy: ``batch -> (inputs, labels)`` for batch formats :func:`extract_xy` does not know.
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback`.
    """

    kind = "probe set"

    def __init__(
        self,
        probe: Union[None, Tensor, Tuple[Tensor, Tensor], Sequence[int]] = None,
        probe_samples: int = 32,
        batch_to_xy: Optional[BatchToXY] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        with refuse_bad_options():
            check_positive_int("probe_samples", probe_samples)
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise MisconfigurationTypeError(
                expected("batch_to_xy", "a callable batch -> (inputs, labels)", batch_to_xy))
        self.probe_samples = probe_samples
        self.batch_to_xy = batch_to_xy
        self.probe_x: Optional[Tensor] = None
        self.probe_y: Optional[Tensor] = None
        self._probe_indices: Optional[List[int]] = None
        self._candidates: Buckets = {}
        self._collecting = False
        if probe is not None:
            self._set_user_probe(probe)

    def _set_user_probe(self, probe: Any) -> None:
        if isinstance(probe, Tensor):
            x, y = probe, None
        elif isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], Tensor):
            x, y = probe
        elif (isinstance(probe, (tuple, list, range))
              and all(isinstance(i, int) and not isinstance(i, bool) for i in probe)):
            if len(probe) == 0:
                raise MisconfigurationException(expected("probe", "a non-empty list of dataset indices", list(probe)))
            self._probe_indices = list(probe)
            return
        else:
            raise MisconfigurationTypeError(
                expected("probe", "None, a tensor of inputs, a pair (inputs, labels) or a list of dataset indices",
                         type(probe).__name__))
        if x.ndim < 2 or x.shape[0] == 0:
            raise MisconfigurationException(
                expected("probe", "inputs with a batch dimension and at least one sample", x))
        if not (x.is_floating_point() or self.accepts_integer_inputs):
            raise MisconfigurationException(expected("probe", "floating-point inputs", x))
        if y is not None and (not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]):
            raise MisconfigurationException(expected("probe labels", f"a tensor of shape ({x.shape[0]},)", y))
        self.probe_x = x.detach().clone().cpu()
        self.probe_y = None if y is None else y.detach().clone().long().cpu()

    accepts_integer_inputs = False  # token-id models override

    # ------------------------------------------------------------------ the class explained per sample
    @staticmethod
    def check_target(target: Any) -> None:
        """``target`` must be ``"label"``, ``"prediction"`` or a class index."""
        if not (target in TARGETS or (isinstance(target, int) and not isinstance(target, bool) and target >= 0)):
            wrong_type = isinstance(target, bool) or not isinstance(target, (str, int))
            raise (MisconfigurationTypeError if wrong_type else MisconfigurationException)(
                expected("target", "'label', 'prediction' or a class index (int >= 0)", target))

    def targets_for(self, target: Union[str, int], preds: Tensor, y: Optional[Tensor]) -> Tensor:
        """Per-sample classes to explain: the labels, the predictions or a fixed class (labels fall back to
        predictions, with one warning, when the probe set has none)."""
        if isinstance(target, int):
            return torch.full_like(preds, target)
        if target == "label" and y is not None:
            return y
        if target == "label":
            warn_once("nolabel", f"{type(self).__name__}(target='label') found no labels in the probe set; "
                                 "explaining the predicted class instead.", owner=self)
        return preds

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["probe_x"] = self.probe_x
        state["probe_y"] = self.probe_y
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("probe_x") is not None:
            self.probe_x = state_dict["probe_x"]
            self.probe_y = state_dict.get("probe_y")

    # ------------------------------------------------------------------ collecting the probe set
    @property
    def has_probe(self) -> bool:
        return self.probe_x is not None

    def probe_check_passes(self, trainer: Optional["pl.Trainer"]) -> Passes:
        """The folding check's passes and the channels-last check's forwards in the next run on the probe set (each
        rank checks on its share)."""
        rows, shape = self.probe_size()
        if trainer is None:
            return Passes()
        world = trainer.world_size
        shares = [stop - start for start, stop, _ in (split_rows(rows, world, r) for r in range(world))]
        dtype = torch.float32 if self.probe_x is None else self.probe_x.dtype
        return (self.fold_check_passes(trainer.lightning_module, shares)
                + self.layout_check_passes(trainer.lightning_module, shape, shares, dtype))

    def probe_size(self) -> Tuple[int, Optional[Tuple[int, ...]]]:
        """Rows of the probe set (``probe_samples`` until it is chosen) and the shape of one sample (None until
        then)."""
        if self.probe_x is None:
            return self.probe_samples, None
        return int(self.probe_x.shape[0]), tuple(self.probe_x.shape[1:])

    def _collect(self, trainer: "pl.Trainer", batch: Any, dataloader_idx: int) -> None:
        if self.has_probe or trainer.sanity_checking or dataloader_idx != 0 or self._probe_indices is not None:
            return
        with self.guard("reading a validation batch for the probe set", trainer.current_epoch, BATCH_FIX,
                        skips_run=False):  # a batch it cannot read adds no candidates; the others still do
            x, y = extract_xy(batch, self.batch_to_xy)
            collect_rows(self._candidates, x, class_labels(y, x.shape[0], self), self.probe_samples)

    @override
    def _on_eval_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.active(trainer) and not self.has_probe and trainer.state.fn == FITTING:
            # fixed after the first validation epoch even when the cadence skips it: no more collecting per batch,
            # and a class with fewer validation samples than `probe_samples` is not collected twice
            with self.guard("choosing the probe set", trainer.current_epoch):
                self.finalize_probe(trainer)
        super()._on_eval_epoch_end(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, batch, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(trainer, batch, dataloader_idx)

    def finalize_probe(self, trainer: "pl.Trainer") -> bool:
        """Fix the probe set (once); identical on every rank. Returns False if there is nothing to explain."""
        if self.has_probe:
            return True
        if self._probe_indices is not None:
            self._load_indices(trainer)
            return True
        x, y = choose_stratified(trainer, self._candidates, self.probe_samples)
        if x is None or x.numel() == 0:
            warn_once("empty", f"{type(self).__name__}: the validation data gave no samples to explain; "
                               "nothing is logged until it does (or pass `probe=`).", owner=self)
            return False
        self.probe_x, self.probe_y = x, y
        self._candidates = {}
        return True

    def _load_indices(self, trainer: "pl.Trainer") -> None:
        loader = first_loader(trainer.val_dataloaders if trainer.state.fn != TESTING else trainer.test_dataloaders)
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise MisconfigurationException(
                "`probe` was given as dataset indices, but no validation dataset was found.")
        size = len(dataset)
        bad = [i for i in self._probe_indices if not -size <= i < size]
        if bad:
            raise MisconfigurationException(
                expected("probe", f"indices into the validation dataset of {size} samples", bad))
        from torch.utils.data import default_collate

        with forked_rng():  # a dataset drawing random augmentations must not move training's random streams
            x, y = extract_xy(default_collate([dataset[i] for i in self._probe_indices]), self.batch_to_xy)
        y = class_labels(y, x.shape[0], self)
        self.probe_x = x.detach().clone().cpu()
        self.probe_y = None if y is None else y.detach().clone().long().view(-1).cpu()

    # ------------------------------------------------------------------ the run
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        """Per-sample results for rows ``x`` (this rank's share); every value has ``x.shape[0]`` rows."""
        raise NotImplementedError

    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        """Log images/text (rank zero only) and return the scalars to log; called on every rank."""
        raise NotImplementedError

    def explain(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", via_module: bool = True) -> None:
        """Split the probe set over ranks, compute, gather, report; under the error policy."""
        epoch = self.begin_run(trainer, via_module)
        ready = self.guarded(lambda: self.finalize_probe(trainer), "choosing the probe set", epoch)
        if not self.agree(trainer, bool(ready)):
            return
        with torch.inference_mode(False):  # normal tensors, usable by autograd even in validate()/test()
            x_all = self.probe_x.to(pl_module.device).clone()
            y_all = None if self.probe_y is None else self.probe_y.to(pl_module.device).clone()
        world, rank = self.work_split(trainer)
        start, stop, keep = split_rows(x_all.shape[0], world, rank)

        def _compute() -> Dict[str, Tensor]:
            with self.explain_context(pl_module):
                return self.compute(pl_module, x_all[start:stop], None if y_all is None else y_all[start:stop])

        results = self.guarded(_compute, "explaining the probe samples", epoch)
        if not self.agree(trainer, results is not None):  # all ranks skip when any failed: none waits in a gather
            return
        if world > 1:
            results = gather_shares(trainer, results, keep)
        metrics = self.guarded(lambda: self.report(trainer, pl_module, x_all, y_all, results, epoch), "logging", epoch)
        if metrics is not None:
            self.log_metrics(trainer, pl_module, metrics, via_module=via_module, seconds=True)
        self.last_explained_epoch = epoch
