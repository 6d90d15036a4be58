"""lightning_xai: PyTorch Lightning callbacks that make a model explain itself while it trains."""
from lightning_xai.callbacks.attribution import AttributionMonitor

__version__ = "0.1.0"

__all__ = ["AttributionMonitor", "__version__"]
