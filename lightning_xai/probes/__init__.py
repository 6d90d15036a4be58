"""Linear probes on hooked activations: capture, feature reduction and probe solvers (pure torch)."""

from lightning_xai.probes._capture import ActivationCapture
from lightning_xai.probes._logistic import LogisticSolution, fit_logistic
from lightning_xai.probes._reduce import Reducer, make_reducer
from lightning_xai.probes._ridge import RidgeSolution, StreamingRidge

__all__ = [
    "ActivationCapture",
    "LogisticSolution",
    "Reducer",
    "RidgeSolution",
    "StreamingRidge",
    "fit_logistic",
    "make_reducer",
]
