"""Lightning callbacks: thin layers over the pure cores.

Every callback subclasses :class:`XAICallback` through one of its two kinds: :class:`ProbeSetCallback` (choose a probe
set once, then compute on it and report) or :class:`StreamingCallback` (per validation batch, then finish at the
epoch's end).
"""
from lightning_xai.callbacks._base import XAICallback
from lightning_xai.callbacks._batches import extract_xy
from lightning_xai.callbacks._probe_set import ProbeSetCallback
from lightning_xai.callbacks._streaming import StreamingCallback

__all__ = ["ProbeSetCallback", "StreamingCallback", "XAICallback", "extract_xy"]
