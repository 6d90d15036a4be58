"""lightning_xai: PyTorch Lightning callbacks that make a model explain itself while it trains."""
__version__ = "0.1.0"

__all__ = ["__version__"]
