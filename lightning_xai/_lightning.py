"""Both Lightning packages: ``lightning.pytorch`` (``import lightning as L``) and ``pytorch_lightning``.

Users come with either package, or both. Every lightning_xai callback subclasses the ``Callback`` class of
each installed package, so either package's ``Trainer`` and ``LightningCLI`` accept it (the CLI checks
``issubclass`` against its own package's ``Callback``). Everything else the callbacks need from Lightning is
reached through public objects the two packages share (``trainer.state.fn`` is a ``str`` enum,
``lightning_utilities``' rank-zero helpers) or recognised by class name (strategies, loggers), so a
``lightning.pytorch`` strategy and a ``pytorch_lightning`` one are treated alike.

Only the callbacks and :mod:`lightning_xai._logging` import this module; the pure cores never do.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator, Tuple

_PACKAGE_NAMES = ("lightning.pytorch", "pytorch_lightning")


def _import_packages() -> Tuple[ModuleType, ...]:
    found = []
    for name in _PACKAGE_NAMES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError(
            "lightning_xai's callbacks need a Lightning package, but neither `lightning` nor `pytorch_lightning` is "
            "installed: `pip install lightning` (or `pip install pytorch-lightning`).")
    return tuple(found)


PACKAGES: Tuple[ModuleType, ...] = _import_packages()

#: The ``Callback`` class of every installed Lightning package (a lightning_xai callback subclasses all of them).
CALLBACK_BASES: Tuple[type, ...] = tuple(pkg.Callback for pkg in PACKAGES)

_MISCONFIGURATION: Tuple[type, ...] = tuple(
    dict.fromkeys(pkg.utilities.exceptions.MisconfigurationException for pkg in PACKAGES))


class MisconfigurationException(*_MISCONFIGURATION, ValueError):  # type: ignore[misc]
    """A bad option of a lightning_xai callback: an instance of every installed package's
    ``MisconfigurationException``, so ``except`` clauses written for either package catch it, and a
    ``ValueError`` (an option with a wrong value)."""


class MisconfigurationTypeError(MisconfigurationException, TypeError):
    """A bad option of the wrong type: a :class:`MisconfigurationException` that is also a ``TypeError``."""


@contextmanager
def refuse_bad_options() -> Iterator[None]:
    """Re-raise a ``TypeError``/``ValueError`` of the body (a core's validator refusing an option) as
    :class:`MisconfigurationTypeError`/:class:`MisconfigurationException` with the same message, so
    every bad option of a callback is refused with one exception type (an ``ImportError``, an option
    that needs a package that is not installed, becomes a :class:`MisconfigurationException` too).

    Example:
        >>> from lightning_xai._utils import check_positive_int
        >>> with refuse_bad_options():
        ...     check_positive_int("steps", 0)
        Traceback (most recent call last):
        ...
        lightning_xai._lightning.MisconfigurationException: Expected `steps` to be a positive int, but got 0.
    """
    try:
        yield
    except MisconfigurationException:
        raise
    except TypeError as err:
        raise MisconfigurationTypeError(*err.args) from err
    except (ValueError, ImportError) as err:
        raise MisconfigurationException(*err.args) from err


FITTING, VALIDATING, TESTING = "fit", "validate", "test"  # values of ``trainer.state.fn`` (a ``str`` enum)

_MODULES = tuple(name.split(".")[0] + "." for name in _PACKAGE_NAMES)


def is_a(obj: Any, *class_names: str) -> bool:
    """Whether ``obj`` is an instance of a Lightning class (of either package) named one of ``class_names``,
    subclasses included."""
    return any(cls.__name__ in class_names and cls.__module__.startswith(_MODULES) for cls in type(obj).__mro__)
