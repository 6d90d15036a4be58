"""Token attributions as markdown for TensorBoard's text plugin.

TensorBoard renders text summaries as markdown through a sanitiser (``tensorboard/plugin_util.py``)
that keeps only ``p, pre, code, blockquote, h1-h6, hr, br, strong, em, a, img, ul, ol, li`` and table
tags, with no ``style`` attribute, so ``<span style="background: ...">`` shows up as escaped text.
Tokens are therefore written as ``token(+0.42)`` with the share of the sample's total
``|attribution|`` (signed), and the strongest tokens in bold. Pure torch (no markdown library).
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence, Union

from torch import Tensor

from lightning_xai._utils import expected

Vocab = Union[Sequence[str], Callable[[int], str]]
_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def escape_markdown(text: str) -> str:
    """Backslash-escape markdown's special characters (and ``|`` for tables); newlines become spaces."""
    return _SPECIAL.sub(r"\\\1", text.replace("\n", " ").replace("\r", " "))


def decode_tokens(ids: Sequence[int], vocab: Vocab) -> List[str]:
    """Token strings for ``ids`` from a list vocabulary or a callable ``id -> str`` (unknown ids: ``[id]``)."""
    out = []
    for i in ids:
        i = int(i)
        if callable(vocab):
            out.append(str(vocab(i)))
        else:
            out.append(str(vocab[i]) if 0 <= i < len(vocab) else f"[{i}]")
    return out


def tokens_markdown(tokens: Sequence[str], scores: Tensor, top_k: int = 3, decimals: int = 2) -> str:
    """One line of markdown: each token followed by its signed share of the total ``|score|``.

    The ``top_k`` tokens with the largest ``|score|`` are bold.

    Example:
        >>> import torch
        >>> tokens_markdown(["good", "zz", "film"], torch.tensor([0.1, 0.8, -0.1]), top_k=1)
        'good(+0.10) **zz**(+0.80) film(-0.10)'
    """
    scores = scores.detach().float().cpu().view(-1)
    if scores.numel() != len(tokens):
        raise ValueError(expected("scores", f"{len(tokens)} values, one per token", scores))
    if not tokens:
        return ""
    share = scores / scores.abs().sum().clamp_min(1e-30)
    strongest = set(share.abs().topk(min(top_k, len(tokens))).indices.tolist()) if top_k > 0 else set()
    parts = []
    for t, (tok, value) in enumerate(zip(tokens, share.tolist())):
        shown = escape_markdown(tok) or "␣"
        parts.append(f"{'**' + shown + '**' if t in strongest else shown}({value:+.{decimals}f})")
    return " ".join(parts)


def attribution_markdown(
    input_ids: Tensor,
    attributions: Tensor,
    vocab: Vocab,
    labels: Optional[Tensor] = None,
    preds: Optional[Tensor] = None,
    skip_ids: Sequence[int] = (),
    top_k: int = 3,
    header: str = "",
) -> str:
    """A markdown table with a row per sample: label, prediction, and the attributed tokens.

    Positions whose id is in ``skip_ids`` (e.g. padding) are left out of the row.
    """
    if input_ids.shape != attributions.shape:
        raise ValueError(expected("attributions", f"the shape of input_ids {tuple(input_ids.shape)}", attributions))
    skip = set(int(s) for s in skip_ids)
    lines = ([header, ""] if header else []) + ["| # | label | prediction | tokens (share of \\|attribution\\|) |",
                                                "|---|---|---|---|"]
    for i in range(input_ids.shape[0]):
        ids = input_ids[i].tolist()
        keep = [t for t, tok in enumerate(ids) if int(tok) not in skip]
        tokens = decode_tokens([ids[t] for t in keep], vocab)
        line = tokens_markdown(tokens, attributions[i, keep] if keep else attributions.new_zeros(0), top_k=top_k)
        label = "-" if labels is None else str(int(labels[i]))
        pred = "-" if preds is None else str(int(preds[i]))
        lines.append(f"| {i} | {label} | {pred} | {line} |")
    return "\n".join(lines)
