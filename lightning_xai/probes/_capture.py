"""Capture reduced activations of chosen layers with forward hooks, during forward passes that run anyway.

:class:`ActivationCapture` registers one forward hook per layer (all held in a :class:`HookSet`, so
they go away on :meth:`ActivationCapture.detach` or when a ``with`` block exits, even on error). The
hook detaches the output, applies the layer's :class:`~lightning_xai.probes._reduce.Reducer` at once
(so a large map is never kept), and queues the ``(N, k)`` features until :meth:`pop` collects them.

Pure torch.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import HookSet, expected, resolve_layer_patterns
from lightning_xai.probes._reduce import ReduceSpec, make_reducer


class _Captured(Exception):
    """Raised by :meth:`ActivationCapture.stopping`'s hooks to end a forward pass once every layer is captured."""


def first_tensor(output: Any) -> Optional[Tensor]:
    """The tensor a layer returned, or the first tensor of a tuple/list/dict output (None if there is none)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    if isinstance(output, Mapping):
        return next((o for o in output.values() if isinstance(o, Tensor)), None)
    return None


class ActivationCapture:
    """Forward hooks that keep reduced, detached features of the chosen layers.

    Args:
        model: the module whose layers are hooked.
        layers: dotted names or glob patterns (``"features.*"``), resolved in model order.
        reduce: one reducer spec for every layer, or ``{layer: spec}`` (layers not named use ``"auto"``).
            See :func:`~lightning_xai.probes._reduce.make_reducer`.
        max_dim: widest feature the automatic reducer keeps without projecting.
        seed: seed of random projections.

    Raises:
        ValueError: if a layer name or pattern matches nothing; the message lists the valid names.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> with ActivationCapture(model, ["0", "1"]) as cap:
        ...     _ = model(torch.randn(5, 1, 8, 8))
        ...     feats = cap.pop()
        >>> feats["0"].shape, len(model[0]._forward_hooks)
        (torch.Size([5, 4]), 0)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str],
                 reduce: Union[ReduceSpec, Mapping[str, ReduceSpec]] = "auto",
                 max_dim: int = 1024, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(expected("model", "an nn.Module", type(model).__name__))
        if isinstance(layers, str):
            layers = [layers]
        self.model = model
        self.names: List[str] = resolve_layer_patterns(model, list(layers))
        modules = dict(model.named_modules())
        self.modules: Dict[str, nn.Module] = {n: modules[n] for n in self.names}
        if isinstance(reduce, Mapping):
            unknown = [k for k in reduce if k not in self.names]
            if unknown:
                raise ValueError(expected("reduce", "a mapping keyed by the chosen layers: " + ", ".join(self.names),
                                          unknown))
            self.reducers = {n: make_reducer(reduce.get(n, "auto"), seed=seed, max_dim=max_dim) for n in self.names}
        else:
            shared = make_reducer(reduce, seed=seed, max_dim=max_dim)
            self.reducers = {n: shared for n in self.names}
        self.hooks = HookSet()
        self.pending: Dict[str, List[Tensor]] = {n: [] for n in self.names}
        self.error: Optional[BaseException] = None
        self.raise_errors = False
        self.seconds = 0.0  # time spent in the hooks since the last take_seconds() (charged to the callback's cost)

    # ------------------------------------------------------------------ hooks
    def _hook(self, name: str):
        reducer = self.reducers[name]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            start = time.perf_counter()
            try:
                out = first_tensor(output)
                if out is None:
                    raise TypeError(expected(f"output of layer {name!r}", "a tensor (or a tuple/dict holding one)",
                                             type(output).__name__))
                with torch.no_grad():
                    self.pending[name].append(reducer(out.detach()).float())
            except Exception as err:  # noqa: BLE001 - a probe must not break the user's forward pass
                if self.raise_errors:
                    raise
                if self.error is None:
                    self.error = err
            finally:
                self.seconds += time.perf_counter() - start

        return hook

    def take_seconds(self) -> float:
        """Seconds spent in the hooks since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def attach(self) -> "ActivationCapture":
        """Register the hooks (idempotent)."""
        if not self.hooks._handles:
            for name in self.names:
                self.hooks.add(self.modules[name].register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        """Remove every hook and drop queued features."""
        self.hooks.remove()
        self.clear()

    @property
    def attached(self) -> bool:
        return bool(self.hooks._handles)

    def clear(self) -> None:
        for v in self.pending.values():
            v.clear()

    def pop(self, rows: Optional[int] = None) -> Dict[str, Tensor]:
        """Collect and clear the queued features ``{layer: (N, k)}``.

        When a layer ran more than once since the last pop (a ``validation_step`` calling the model
        twice), the calls are concatenated if together they have ``rows`` rows, else the first call
        with ``rows`` rows is used; layers that ran with no matching call are left out.
        """
        out: Dict[str, Tensor] = {}
        for name, chunks in self.pending.items():
            if not chunks:
                continue
            if rows is None or sum(c.shape[0] for c in chunks) == rows:
                out[name] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            else:
                match = next((c for c in chunks if c.shape[0] == rows), None)
                if match is not None:
                    out[name] = match
            chunks.clear()
        return out

    @contextmanager
    def stopping(self, rows: int) -> Iterator[None]:
        """End the enclosed forward pass as soon as every layer has queued ``rows`` rows: the layers after the
        deepest captured one do not run (nothing reads their output). Attach the capture first (its hooks must run
        before these). Only its own signal is caught; its hooks are removed on exit, also on error. For a model
        whose output is not needed, e.g. an untrained copy probed as a baseline."""
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if all(sum(c.shape[0] for c in self.pending[n]) >= rows for n in self.names):
                raise _Captured

        hooks = HookSet()
        try:
            for name in self.names:
                hooks.add(self.modules[name].register_forward_hook(hook))
            try:
                yield
            except _Captured:
                pass
        finally:
            hooks.remove()

    def __enter__(self) -> "ActivationCapture":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()
