"""Linear probes on hooked activations: capture, feature reduction and probe solvers (pure torch)."""
from lightning_xai.probes.capture import ActivationCapture, first_tensor
from lightning_xai.probes.logistic import LogisticSolution, fit_logistic
from lightning_xai.probes.reduce import Reducer, input_reducer, make_reducer
from lightning_xai.probes.ridge import RidgeSolution, StreamingRidge, one_hot

__all__ = [
    "ActivationCapture",
    "LogisticSolution",
    "Reducer",
    "RidgeSolution",
    "StreamingRidge",
    "first_tensor",
    "fit_logistic",
    "input_reducer",
    "make_reducer",
    "one_hot",
]
