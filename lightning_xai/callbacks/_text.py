"""TokenAttributionMonitor: which tokens a sequence classifier relies on, every validation epoch.

Token attributions are taken at the embedding layer (see :mod:`lightning_xai.text`) and logged to
TensorBoard's text tab as a table of the probe sentences with each token's share of the attribution::

    trainer = Trainer(callbacks=[TokenAttributionMonitor(embedding_layer="embedding", vocab=itos,
                                                         watch_tokens=["zz"])])

With ``watch_tokens`` it also logs, per token, the mean share of attribution the token receives in
the probe sentences that contain it: a scalar that rises when the model learns a spurious token.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_xai._lightning import MisconfigurationException, refuse_bad_options
from typing_extensions import override

from lightning_xai._utils import check_choice, check_positive_int, eager_compiled, expected, resolve_layer
from lightning_xai.attribution import get_method
from lightning_xai.attribution._registry import PinnedOptions
from lightning_xai.callbacks._checks import SampleCheckedCallback, check_method_options
from lightning_xai._logging import log_text, warn_once
from lightning_xai.text import (BASELINES, TOKEN_METHODS, attribution_markdown, decode_tokens, token_attributions,
                                token_share)
from lightning_xai.text._render import Vocab

if TYPE_CHECKING:
    import lightning.pytorch as pl


class TokenAttributionMonitor(SampleCheckedCallback):
    """Logs token attributions of a fixed probe set of token-id sequences.

    A probe-set callback (:class:`~lightning_xai.callbacks.ProbeSetCallback`): the probe set is chosen once; each run
    computes the token attributions (``compute``) then the highlighted text and scalars (``report``).

    Args:
        embedding_layer: dotted name (or the module) of the layer whose output is the token
            embeddings ``(N, T, E)``, e.g. ``"model.embeddings.word_embeddings"``.
        vocab: a list mapping ids to token strings, or a callable ``id -> str``.
        method: ``"integrated_gradients"`` (default), ``"saliency"``, ``"input_x_gradient"`` or ``"smoothgrad"``.
        options: keyword options for the method, e.g. ``{"steps": 32}`` for Integrated Gradients; checked by the
            method's validator at construction (``baseline`` is the argument below, ``return_delta`` the callback's).
        target: the class explained per sample: ``"label"`` (default), ``"prediction"`` or a class index.
        baseline: Integrated Gradients baseline: ``"pad"`` (default), ``"zero"``, or token ids ``(T,)``.
        pad_token_id: padding id: used by ``baseline="pad"`` and left out of the rendered sentences.
        watch_tokens: tokens (strings or ids) whose attribution share is logged as a scalar.
        top_k: tokens shown in bold per sentence.
        probe, probe_samples, batch_to_xy: the probe set (see :class:`~lightning_xai.callbacks.ProbeSetCallback`).
        every_n_epochs, run_on_fit_end, on_error, prefix, output_key, forward, channels_last, fold_batchnorm: see
            :class:`~lightning_xai.callbacks.XAICallback` (``forward(pl_module, input_ids)`` must
            run the embedding layer).

    Tags (with the default ``prefix="xai"``):
        ``xai/text/<method>`` (text), ``xai/text/<method>/share/<token>`` (scalar per watched token) and,
        for Integrated Gradients, ``xai/text/integrated_gradients/completeness_gap`` (median of
        ``|sum of attributions - (f(x) - f(baseline))| / |f(x) - f(baseline)|``).

    Example::

        >>> from lightning.pytorch import Trainer  # or: from pytorch_lightning import Trainer
        >>> monitor = TokenAttributionMonitor("embedding", vocab=["<pad>", "zz", "good", "bad"], watch_tokens=["zz"])
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=3)  # doctest: +SKIP
    """

    area = "text"
    accepts_integer_inputs = True

    def __init__(
        self,
        embedding_layer: Union[str, nn.Module],
        vocab: Vocab,
        method: str = "integrated_gradients",
        options: Optional[Mapping[str, Any]] = None,
        target: Union[str, int] = "label",
        baseline: Union[str, Tensor] = "pad",
        pad_token_id: int = 0,
        watch_tokens: Sequence[Union[str, int]] = (),
        top_k: int = 3,
        probe_samples: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_samples=probe_samples, **kwargs)
        if not isinstance(embedding_layer, (str, nn.Module)) or embedding_layer == "":
            raise MisconfigurationException(
                expected("embedding_layer", "a dotted layer name or an nn.Module", embedding_layer))
        words = isinstance(vocab, (list, tuple)) and vocab and all(isinstance(v, str) for v in vocab)
        if not (callable(vocab) or words):
            raise MisconfigurationException(expected("vocab", "a non-empty list of str or a callable id -> str",
                                                     type(vocab).__name__))
        with refuse_bad_options():
            check_choice("method", method, tuple(TOKEN_METHODS))
        if options is not None and not isinstance(options, Mapping):
            raise MisconfigurationException(expected("options", "a dict of keyword options", type(options).__name__))
        reserved = [key for key in ("baseline", "return_delta") if key in (options or {})]
        if reserved:
            raise MisconfigurationException(expected("options", "method options other than 'baseline' (the `baseline` "
                                                     "argument) and 'return_delta' (set by the callback)", reserved))
        with refuse_bad_options():  # unknown names, then values, by the method's own validator (on embeddings)
            name, fn, checked = get_method((method, dict(options or {})))
        check_method_options(name, fn, checked, ndim=3)
        self.check_target(target)
        if not (isinstance(baseline, Tensor) and not baseline.is_floating_point() or baseline in BASELINES):
            raise MisconfigurationException(
                expected("baseline", "'pad', 'zero' or a LongTensor of token ids", baseline))
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise MisconfigurationException(expected("pad_token_id", "an int", pad_token_id))
        if isinstance(watch_tokens, (str, int)) and not isinstance(watch_tokens, bool):
            watch_tokens = [watch_tokens]
        if not isinstance(watch_tokens, (list, tuple)) or not all(
                isinstance(t, (str, int)) and not isinstance(t, bool) for t in watch_tokens):
            raise MisconfigurationException(expected("watch_tokens", "a list of token strings or ids", watch_tokens))
        with refuse_bad_options():
            check_positive_int("top_k", top_k)
        self.embedding_layer = embedding_layer
        self.vocab = vocab
        self.method = method
        self.options = dict(options or {})
        self._fresh_options = PinnedOptions(self.options)  # a generator restarts every epoch
        self.target = target
        self.baseline = baseline
        self.pad_token_id = pad_token_id
        self.watch_tokens = list(watch_tokens)
        self.top_k = top_k

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, area=self.area, method=self.method)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        with refuse_bad_options():
            resolve_layer(pl_module, self.embedding_layer, name="embedding_layer")
        if self.probe_x is not None:
            self.check_ids(self.probe_x)

    @override
    def check_sample(self, pl_module: "pl.LightningModule", x: Tensor) -> None:
        """Token ids, and ``target`` against the classes."""
        self.check_ids(x)
        super().check_sample(pl_module, x)

    @staticmethod
    def check_ids(x: Tensor) -> None:
        """Raise a clear error for probe inputs that are not token ids ``(N, T)``."""
        if x.ndim != 2 or x.is_floating_point():
            raise MisconfigurationException(
                expected("TokenAttributionMonitor's probe inputs", "integer token ids of shape (N, T); for images use "
                         "AttributionMonitor, for tabular rows TabularAttributionMonitor", x))

    # ------------------------------------------------------------------ compute / report
    @override
    def compute(self, pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor]) -> Dict[str, Tensor]:
        self.check_ids(x)
        forward = self.logits_fn(pl_module)
        with torch.no_grad(), eager_compiled():  # a compiled model runs as is, not recompiled for eval mode
            preds = forward(x).argmax(1)
        target = self.targets_for(self.target, preds, y)
        ig = self.method == "integrated_gradients"
        options = self._fresh_options()
        if ig:
            options.setdefault("return_delta", True)
            options["baseline"] = self.baseline
        out = token_attributions(pl_module, x, target, embedding_layer=self.embedding_layer, method=self.method,
                                 pad_token_id=self.pad_token_id, forward=forward, **options)
        results = {"pred": preds, "target": target}
        if ig and options["return_delta"]:
            attr, delta = out
            results["gap"] = delta.abs() / (attr.sum(1) - delta).abs().clamp_min(1e-12)  # |δ| / |f(x) − f(b)|
        else:
            attr = out
        results["attr"] = attr
        return results

    def _watch_ids(self, x: Tensor) -> Dict[str, int]:
        """``{token string: id}`` for the watched tokens (strings are looked up among the probe set's ids)."""
        present = sorted(set(int(i) for i in x.view(-1).tolist()))
        names = dict(zip(present, decode_tokens(present, self.vocab)))
        out: Dict[str, int] = {}
        for tok in self.watch_tokens:
            if isinstance(tok, int):
                out[decode_tokens([tok], self.vocab)[0]] = tok
                continue
            ids = [i for i, name in names.items() if name == tok]
            if not ids and isinstance(self.vocab, (list, tuple)) and tok in self.vocab:
                ids = [list(self.vocab).index(tok)]
            if ids:
                out[tok] = ids[0]
            else:
                warn_once(f"watch-{tok}", f"TokenAttributionMonitor: watched token {tok!r} is not in the "
                                          "vocabulary or the probe set; its share is not logged.", owner=self)
        return out

    @override
    def report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", x: Tensor, y: Optional[Tensor],
               results: Dict[str, Tensor], epoch: int) -> Dict[str, float]:
        attr, x_cpu = results["attr"].cpu(), x.cpu()
        metrics: Dict[str, float] = {}
        for name, token_id in self._watch_ids(x_cpu).items():
            share = token_share(attr, x_cpu, token_id)
            if bool(torch.isfinite(share).any()):
                metrics[self.tag(self.method, "share", name)] = float(share.nanmean())
        if "gap" in results:
            metrics[self.tag(self.method, "completeness_gap")] = float(results["gap"].nanmedian())
        if trainer.is_global_zero:
            header = (f"Epoch {epoch}, {self.method}: each token with its signed share of the sentence's total "
                      f"|attribution|; the top {self.top_k} in bold (explained class: {self.target}).")
            text = attribution_markdown(x_cpu, attr, self.vocab, labels=y, preds=results["pred"],
                                        skip_ids=[self.pad_token_id], top_k=self.top_k, header=header)
            log_text(trainer, self.tag(self.method), text)
        return metrics
