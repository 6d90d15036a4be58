"""One-shot activation capture: run a batch through the model and return each layer's features ``(N, D)``.

Pure torch. A thin layer over the probes core: hooks and reducers are
:class:`~lightning_xai.probes.ActivationCapture` and :func:`~lightning_xai.probes.make_reducer` (one
implementation of hooking and reducing in the package); this module adds the no-grad, eval-mode,
chunked forward pass. Hooks are removed even when the forward pass raises; every train/eval flag is
restored; parameters, ``param.grad`` and the global RNG are never touched.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import check_positive_int, chunks, eager_compiled, expected, preserve_modes
from lightning_xai.probes import ActivationCapture
from lightning_xai.probes._reduce import DEFAULT_MAX_DIM, ReduceSpec


def capture_activations(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[str],
    reduce: Union[ReduceSpec, Mapping[str, ReduceSpec]] = "auto",
    forward: Optional[Callable[[Tensor], Any]] = None,
    batch_size: Optional[int] = None,
    eval_mode: bool = True,
    max_dim: int = DEFAULT_MAX_DIM,
) -> Dict[str, Tensor]:
    """Run ``inputs`` through ``model`` without gradients and return each layer's reduced activations.

    Args:
        model: the module that owns ``layers``.
        inputs: a batch ``(N, ...)`` (float images, token ids, tabular rows).
        layers: dotted layer names or glob patterns (``"encoder.*"``), returned in model order.
        reduce: how activations become features, one spec or ``{layer: spec}``: ``"auto"`` (default:
            global average pooling of ``(N, C, H, W)`` maps, mean over the tokens of ``(N, T, E)``
            sequences, 2-D outputs as they are unless wider than ``max_dim``, then a seeded random
            projection), ``"flatten"``, ``"gap"``, ``"tokens_mean"``, ``"pool<s>"``, ``("rproj", k)`` or a
            :class:`~lightning_xai.probes.Reducer` (see :func:`~lightning_xai.probes.make_reducer`).
        forward: what to call on a batch (default ``model``), e.g. ``lambda x: model(x)["logits"]``.
        batch_size: rows per forward pass (default: all at once).
        eval_mode: run with every submodule in eval mode (BatchNorm statistics and dropout frozen);
            each module's flag is restored afterwards.
        max_dim: widest feature ``"auto"`` keeps without projecting.

    Returns:
        ``{layer name: (N, D)}`` float features; a layer that runs several times in one forward pass
        contributes its first call with ``N`` rows.

    Raises:
        ValueError: for an unknown layer (the message lists the valid names), a bad reducer spec, or a
            layer that did not run.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> {k: tuple(v.shape) for k, v in capture_activations(net, torch.randn(5, 4), ["1"]).items()}
        {'1': (5, 8)}
    """
    check_positive_int("batch_size", batch_size, allow_none=True)
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(expected("layers", "a non-empty list of layer names or glob patterns", layers))
    capture = ActivationCapture(model, list(layers), reduce=reduce, max_dim=max_dim)
    capture.raise_errors = True  # a failing reducer should fail this call, not pass silently
    run = model if forward is None else forward
    parts: Dict[str, List[Tensor]] = {name: [] for name in capture.names}
    with eager_compiled(), capture, torch.no_grad(), preserve_modes(model, eval_mode=eval_mode):
        for start, stop in chunks(inputs.shape[0], batch_size):
            run(inputs[start:stop])
            feats = capture.pop(rows=stop - start)
            for name in capture.names:
                if name not in feats:
                    raise ValueError(
                        f"Layer {name!r} did not run on the batch in the forward pass, so it has no activations.")
                parts[name].append(feats[name])
    return {name: torch.cat(parts[name]) for name in capture.names}
