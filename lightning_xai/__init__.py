"""lightning_xai: PyTorch Lightning callbacks that make a model explain itself while it trains.

Callbacks (``Trainer(callbacks=[...])``) are thin layers over pure-torch cores:
``lightning_xai.attribution``, ``probes``, ``featvis``, ``shortcuts``, ``samples``, ``projections``, ``text``.
"""
from lightning_xai.callbacks.attribution import AttributionMonitor
from lightning_xai.callbacks.featvis import FeatureVisMonitor
from lightning_xai.callbacks.probes import LinearProbeMonitor
from lightning_xai.callbacks.projections import ProjectionMonitor
from lightning_xai.callbacks.samples import SampleInfluenceMonitor
from lightning_xai.callbacks.tabular import TabularAttributionMonitor
from lightning_xai.callbacks.text import TokenAttributionMonitor

__version__ = "0.1.0"

__all__ = [
    "AttributionMonitor",
    "FeatureVisMonitor",
    "LinearProbeMonitor",
    "ProjectionMonitor",
    "SampleInfluenceMonitor",
    "TabularAttributionMonitor",
    "TokenAttributionMonitor",
    "__version__",
]
