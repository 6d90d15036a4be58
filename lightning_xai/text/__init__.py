"""Text models, pure torch: token attributions at the embedding layer and their markdown rendering.

These feed :class:`lightning_xai.callbacks.text.TokenAttributionMonitor`.
"""
from lightning_xai.text.attribution import (
    BASELINES,
    SIGNED_TOKEN_METHODS,
    TOKEN_METHODS,
    EmbeddingSwap,
    token_attributions,
    token_share,
)
from lightning_xai.text.render import attribution_markdown, decode_tokens, escape_markdown, tokens_markdown

__all__ = [
    "BASELINES",
    "EmbeddingSwap",
    "SIGNED_TOKEN_METHODS",
    "TOKEN_METHODS",
    "attribution_markdown",
    "decode_tokens",
    "escape_markdown",
    "token_attributions",
    "token_share",
    "tokens_markdown",
]
