"""lightning_xai: PyTorch Lightning callbacks that make a model explain itself while it trains.

Callbacks (``Trainer(callbacks=[...])``) are thin layers over pure-torch cores:
``lightning_xai.attribution``, ``probes``, ``featvis``, ``shortcuts``, ``samples``, ``projections``, ``text``.
The callbacks are imported lazily (PEP 562), so importing a core never loads Lightning.
"""
from importlib import import_module as _import_module
from typing import Any as _Any

__version__ = "0.1.0"

_CALLBACKS = {
    "AttributionMonitor": "lightning_xai.callbacks._attribution",
    "FeatureVisMonitor": "lightning_xai.callbacks._featvis",
    "LinearProbeMonitor": "lightning_xai.callbacks._probes",
    "ProjectionMonitor": "lightning_xai.callbacks._projections",
    "SampleInfluenceMonitor": "lightning_xai.callbacks._samples",
    "ShortcutDiscovery": "lightning_xai.callbacks._shortcuts",
    "ShortcutMonitor": "lightning_xai.callbacks._shortcuts",
    "TabularAttributionMonitor": "lightning_xai.callbacks._tabular",
    "TokenAttributionMonitor": "lightning_xai.callbacks._text",
}

__all__ = sorted(_CALLBACKS) + ["__version__"]


def __getattr__(name: str) -> _Any:
    if name in _CALLBACKS:
        value = getattr(_import_module(_CALLBACKS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_xai' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_CALLBACKS))
