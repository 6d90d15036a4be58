"""Text models, pure torch: token attributions at the embedding layer and their markdown rendering.

These feed :class:`lightning_xai.TokenAttributionMonitor`.
"""

from lightning_xai.text._attribution import BASELINES, TOKEN_METHODS, token_attributions, token_share
from lightning_xai.text._render import attribution_markdown, decode_tokens, tokens_markdown

__all__ = [
    "BASELINES",
    "TOKEN_METHODS",
    "attribution_markdown",
    "decode_tokens",
    "token_attributions",
    "token_share",
    "tokens_markdown",
]
