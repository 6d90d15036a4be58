"""Lightning callbacks: thin layers over the pure cores."""
from lightning_xai.callbacks.base import ProbeSetCallback, XAICallback, extract_xy

__all__ = ["ProbeSetCallback", "XAICallback", "extract_xy"]
