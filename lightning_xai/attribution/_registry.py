"""The table of built-in attribution methods (:data:`METHODS`), method specs for callbacks, and the Captum adapter."""
from __future__ import annotations

import functools
import inspect
import re
import warnings
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import Passes, Target, expected
from lightning_xai.attribution._common import guarded, private_copy, resolve_target_chunked, DEFAULT_MAX_ROWS
from lightning_xai.attribution._grad_cam import _grad_cam_validate_args, grad_cam
from lightning_xai.attribution._gradient import (_gradient_validate_args, _saliency_validate_args,
                                                 _smoothgrad_validate_args, input_x_gradient, saliency, smoothgrad)
from lightning_xai.attribution._integrated_gradients import _integrated_gradients_validate_args, integrated_gradients
from lightning_xai.attribution._lime import _lime_validate_args, lime
from lightning_xai.attribution._occlusion import _occlusion_validate_args, _window_slices, occlusion, occlusion_windows

AttributionFn = Callable[..., Any]
Option = Callable[[str], Any]  # an option's value: the one given, else the method's default


class Method(NamedTuple):
    """What the package knows about one built-in method: a row of :data:`METHODS`.

    Attributes:
        fn: the method, called as ``fn(model, inputs, target, **options)``.
        validate: ``validate(model, inputs, target, **options)`` checks every option the method takes (named as in
            its signature) before its first forward pass; see :func:`validate_options`.
        signed: ``signed(option) -> bool``: whether its maps carry a sign with these options (see :func:`is_signed`).
        passes: ``passes(option, sample_shape) -> Passes or None``: model passes per input sample of one call
            (forwards alone and forward+backward passes); see :func:`method_pass_counts`.
    """

    fn: AttributionFn
    validate: Callable[..., Any]
    signed: Callable[[Option], bool]
    passes: Callable[[Option, Optional[Tuple[int, ...]]], Optional[Passes]]


def _occlusion_passes(option: Option, sample_shape: Optional[Tuple[int, ...]]) -> Optional[Passes]:
    """One forward per window position, and f(x); unknown without the sample's shape."""
    if sample_shape is None:
        return None
    shape = tuple(int(d) for d in sample_shape)
    return Passes(forward=len(_window_slices(shape, *occlusion_windows(shape, option("window"), option("stride"))))
                  + 1)


#: The built-in methods, by name: one row (:class:`Method`) each, the only place their facts live.
METHODS: Dict[str, Method] = {
    "saliency": Method(saliency, _saliency_validate_args, lambda o: not o("abs"), lambda o, s: Passes(gradient=1)),
    "input_x_gradient": Method(input_x_gradient, _gradient_validate_args, lambda o: True,
                               lambda o, s: Passes(gradient=1)),
    "smoothgrad": Method(smoothgrad, _smoothgrad_validate_args,
                         lambda o: o("kind") == "smoothgrad" and not o("abs"),
                         lambda o, s: Passes(gradient=o("samples"))),
    # the completeness gap (return_delta) needs f(x) and f(baseline): two forwards
    "integrated_gradients": Method(integrated_gradients, _integrated_gradients_validate_args, lambda o: True,
                                   lambda o, s: Passes(forward=2 if o("return_delta") else 0, gradient=o("steps"))),
    "occlusion": Method(occlusion, _occlusion_validate_args, lambda o: True, _occlusion_passes),
    "grad_cam": Method(grad_cam, _grad_cam_validate_args, lambda o: not o("relu"), lambda o, s: Passes(gradient=1)),
    "lime": Method(lime, _lime_validate_args, lambda o: True, lambda o, s: Passes(forward=o("samples"))),
}

#: Built-in methods that use the model as a function of its input alone (no hook on a layer): their passes may run on
#: a copy computing the same function (see lightning_xai._fold).
OUTPUT_ONLY = frozenset({"saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "occlusion", "lime"})


def output_only(name: str, fn: Any) -> bool:
    """Whether the method ``(name, fn)`` is a built-in one of :data:`OUTPUT_ONLY` (a user callable or a Captum
    adapter may look inside the model)."""
    return name in OUTPUT_ONLY and METHODS[name].fn is fn


def _builtin(method: Any) -> Optional[Tuple[str, Method]]:
    """The row of a built-in method given by name or by function; None for anything else."""
    if isinstance(method, str):
        return (method, METHODS[method]) if method in METHODS else None
    for name, row in METHODS.items():
        if row.fn is method:
            return name, row
    return None


def _option_getter(fn: AttributionFn, options: Optional[Mapping[str, Any]]) -> Option:
    given = dict(options or {})
    return lambda key: given[key] if key in given else _defaults(fn)[key]


def _option_names(fn: AttributionFn) -> Optional[Tuple[str, ...]]:
    """Keyword options ``fn`` accepts after ``(model, inputs, target)``; None if it takes ``**kwargs``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params[3:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _check_options(name: str, fn: AttributionFn, options: Any) -> Dict[str, Any]:
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise TypeError(expected(f"options of {name!r}", "a dict of keyword arguments", type(options).__name__))
    accepted = _option_names(fn)
    if accepted is not None:
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise ValueError(expected("options", f"keyword options of {name!r} ({', '.join(accepted)})",
                                      unknown[0] if len(unknown) == 1 else unknown))
    return dict(options)


def _is_captum_attribution(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("captum.") and callable(getattr(obj, "attribute", None))


def _is_captum_class(obj: Any) -> bool:
    return inspect.isclass(obj) and (obj.__module__ or "").startswith("captum.") and hasattr(obj, "attribute")


def _valid_specs() -> str:
    return ("a method name (" + ", ".join(repr(n) for n in METHODS) + "), a (name, options) pair, a Captum "
            "Attribution object, a from_captum(...) adapter or a callable (model, inputs, target, **options)")


def get_method(spec: Any) -> Tuple[str, AttributionFn, Dict[str, Any]]:
    """Resolve a method spec to ``(name, fn, options)``; call it as ``fn(model, inputs, target, **options)``.

    Accepted specs:

    * a name from :data:`METHODS`, e.g. ``"integrated_gradients"``;
    * a ``(name, options)`` pair, e.g. ``("smoothgrad", {"samples": 32})``; option names are checked
      against the function's signature;
    * a Captum ``Attribution`` object (or class), or a ``(captum_object, attribute_kwargs)`` pair, wrapped
      with :func:`from_captum` (named ``captum_<class_name>``);
    * a :func:`from_captum` adapter or any callable ``(model, inputs, target, **options) -> Tensor``,
      named after its ``name`` or ``__name__`` attribute.

    Raises:
        ValueError: for an unknown name (the message lists the valid names) or unknown options.
        TypeError: for a spec of another type.

    Example:
        >>> name, fn, options = get_method(("integrated_gradients", {"steps": 16}))
        >>> name, fn is integrated_gradients, options
        ('integrated_gradients', True, {'steps': 16})
    """
    if isinstance(spec, str):
        if spec not in METHODS:
            raise ValueError(expected("method", _valid_specs(), spec))
        return spec, METHODS[spec].fn, {}
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[1], Mapping):
        head, options = spec
        if isinstance(head, str):
            name, fn, _ = get_method(head)
            return name, fn, _check_options(name, fn, options)
        if _is_captum_attribution(head) or _is_captum_class(head):
            adapter = from_captum(head, **dict(options))
            return adapter.name, adapter, {}
        name, fn, _ = get_method(head)
        return name, fn, _check_options(name, fn, options)
    if _is_captum_attribution(spec) or _is_captum_class(spec):
        spec = from_captum(spec)
    if isinstance(spec, CaptumMethod):
        return spec.name, spec, {}
    if callable(spec) and not isinstance(spec, Tensor):
        found = _builtin(spec)
        if found is not None:
            return found[0], spec, {}
        name = getattr(spec, "name", None) or getattr(spec, "__name__", None) or type(spec).__name__
        if not isinstance(name, str):
            name = type(spec).__name__
        return name, spec, {}
    raise TypeError(expected("method", _valid_specs(), type(spec).__name__))


@functools.lru_cache(maxsize=64)
def _defaults(fn: AttributionFn) -> Dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def validate_options(name: str, fn: AttributionFn, options: Mapping[str, Any], model: Any, inputs: Tensor,
                     target: Target = None) -> None:
    """Check ``options`` of a resolved method spec as the method itself would before its first forward pass: option
    names against its signature, values by its validator (:attr:`Method.validate`), defaults for the options not given.
    Captum adapters and user callables are not checked. A Grad-CAM ``layer`` name is looked up in the model only when
    the method runs.

    Raises:
        TypeError, ValueError: the method's own message, naming the option.

    Example:
        >>> validate_options("integrated_gradients", integrated_gradients, {"steps": 0}, len, torch.zeros(1, 3))
        Traceback (most recent call last):
        ...
        ValueError: Expected `steps` to be a positive int, but got 0.
    """
    row = METHODS.get(name)
    if row is None or row.fn is not fn:
        return
    given = {**_defaults(fn), **_check_options(name, fn, options)}
    wanted = list(inspect.signature(row.validate).parameters)[3:]
    row.validate(model, inputs, target, **{key: given[key] for key in wanted})


def method_passes(name: str, fn: AttributionFn, options: Mapping[str, Any],
                  sample_shape: Optional[Tuple[int, ...]] = None) -> Optional[float]:
    """Model passes per input sample of one call, in forward+backward equivalents (a forward alone counts
    1/3): a run's floor in the benchmarks. ``None`` when it is not known
    (Captum objects, user callables; occlusion without ``sample_shape``).

    Example:
        >>> method_passes("smoothgrad", smoothgrad, {"samples": 8})
        8.0
        >>> round(method_passes("integrated_gradients", integrated_gradients, {"steps": 16, "return_delta": True}), 3)
        16.667
    """
    passes = method_pass_counts(name, fn, options, sample_shape)
    return None if passes is None else passes.equivalent


def method_pass_counts(name: str, fn: AttributionFn, options: Mapping[str, Any],
                       sample_shape: Optional[Tuple[int, ...]] = None) -> Optional[Passes]:
    """Model passes per input sample of one call: forwards alone and forward+backward passes, which the benchmarks
    price each at its measured cost. ``None`` when not known (as :func:`method_passes`).

    Example:
        >>> method_pass_counts("integrated_gradients", integrated_gradients, {"steps": 16, "return_delta": True})
        Passes(forward=2.0, gradient=16.0)
    """
    row = METHODS.get(name)
    if row is None or row.fn is not fn:
        return None
    return row.passes(_option_getter(fn, options), sample_shape)


def is_signed(method: Any, options: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether maps of this method (with these options) carry a sign, for choosing a colour map.

    ``method`` is a built-in method's name or function, or what :func:`get_method` resolved (a Captum adapter, a
    callable). Unsigned: ``saliency`` with ``abs=True`` (default), ``smoothgrad`` unless ``kind="smoothgrad"``
    and ``abs=False``, ``grad_cam`` with ``relu=True`` (default). Signed: ``input_x_gradient``,
    ``integrated_gradients``, ``occlusion``, ``lime``. Captum adapters and callables carry their own
    flag (a ``signed`` attribute); anything unknown counts as signed.

    Example:
        >>> is_signed("saliency"), is_signed("saliency", {"abs": False}), is_signed("integrated_gradients")
        (False, True, True)
    """
    found = _builtin(method)
    if found is not None:
        return bool(found[1].signed(_option_getter(found[1].fn, options)))
    signed = getattr(method, "signed", None)
    return signed if isinstance(signed, bool) else True


# --------------------------------------------------------------------------- Captum adapter
def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _captum_signed(obj: Any, kwargs: Mapping[str, Any]) -> bool:
    cls = obj.__name__ if inspect.isclass(obj) else type(obj).__name__
    if cls == "Saliency":
        return not kwargs.get("abs", True)
    if cls == "LayerGradCam":
        return not kwargs.get("relu_attributions", False)
    if cls == "NoiseTunnel":
        if kwargs.get("nt_type", "smoothgrad") != "smoothgrad":
            return False
        inner = getattr(obj, "attribution_method", None)
        return True if inner is None else _captum_signed(inner, kwargs)
    return True


class CaptumMethod:
    """A Captum attribution with this package's call signature ``(model, inputs, target, **options)``.

    Made by :func:`from_captum`. On each call the Captum object is re-bound to ``model`` (a shallow
    copy with ``forward_func`` replaced, also inside ``NoiseTunnel``); a class is instantiated with
    ``model`` (and ``layer=`` from the options for layer methods). ``target=None`` becomes the predicted
    class, a callable target is folded into the forward function. The call runs under the same guards
    as the built-in methods (gradients enabled even in ``inference_mode``, flags restored, inputs
    copied) and inside ``torch.random.fork_rng`` so Captum's use of the global RNG (``NoiseTunnel``)
    leaves it untouched; inside the fork the RNG is seeded with ``seed``, so every call draws the same
    noise whatever ran before (an uninterrupted and a resumed run give the same maps).
    """

    def __init__(self, attribution: Any, attribute_kwargs: Dict[str, Any], signed: Optional[bool] = None,
                 seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(expected("seed", "a non-negative int", seed))
        self.attribution = attribution
        self.attribute_kwargs = attribute_kwargs
        self.seed = seed
        cls = attribution.__name__ if inspect.isclass(attribution) else type(attribution).__name__
        inner = getattr(attribution, "attribution_method", None)
        suffix = "_" + _snake(type(inner).__name__) if cls == "NoiseTunnel" and inner is not None else ""
        self.name = "captum_" + _snake(cls) + suffix
        self.signed = _captum_signed(attribution, attribute_kwargs) if signed is None else signed

    def __repr__(self) -> str:
        return f"CaptumMethod({self.name}, {self.attribute_kwargs})"

    def _bind(self, forward: Callable, options: Dict[str, Any]) -> Any:
        import copy

        obj = self.attribution
        if inspect.isclass(obj):
            init = inspect.signature(obj.__init__).parameters
            ctor = {k: options.pop(k) for k in list(options) if k in init and k != "self"}
            return obj(forward, **ctor)
        obj = copy.copy(obj)
        inner = getattr(obj, "attribution_method", None)
        if inner is not None:  # NoiseTunnel
            inner = copy.copy(inner)
            inner.forward_func = forward
            obj.attribution_method = inner
        obj.forward_func = forward
        return obj

    def __call__(self, model: Callable[[Tensor], Any], inputs: Tensor, target: Target = None, **options: Any) -> Any:
        opts = {**self.attribute_kwargs, **options}
        cuda = inputs.device.type == "cuda"
        with torch.random.fork_rng(devices=[inputs.device] if cuda else []), guarded(model, self.name):
            torch.random.default_generator.manual_seed(self.seed)  # the forked state only
            if cuda:
                with torch.cuda.device(inputs.device):
                    torch.cuda.manual_seed(self.seed)
            x = private_copy(inputs)
            target = resolve_target_chunked(model, x, target, DEFAULT_MAX_ROWS)
            forward = model
            if callable(target) and not isinstance(target, Tensor):
                score = target
                forward, target = (lambda z: score(model(z))), None
            obj = self._bind(forward, opts)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")
                out = obj.attribute(x, target=target, **opts)
            if isinstance(out, tuple):
                return tuple(o.detach().clone() for o in out)
            return out.detach().clone()


def from_captum(attribution: Any, signed: Optional[bool] = None, seed: int = 0,
                **attribute_kwargs: Any) -> CaptumMethod:
    """Wrap a Captum attribution object (or class) as a method called ``(model, inputs, target, **options)``.

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        attribution: e.g. ``captum.attr.Saliency(model)``, ``NoiseTunnel(Saliency(model))`` or the class
            ``captum.attr.IntegratedGradients`` (instantiated with the model on each call; constructor
            arguments such as ``layer`` may be given in ``attribute_kwargs``).
        signed: whether its maps are signed (for rendering); None guesses from the class and kwargs.
        seed: seed of the (forked) global RNG on every call, for methods that draw from it
            (``NoiseTunnel``).
        **attribute_kwargs: passed to ``.attribute(...)`` on every call, e.g. ``n_steps=50``.

    Returns:
        A :class:`CaptumMethod`; ``get_method`` accepts it (and raw Captum objects) wherever a name is accepted.

    Raises:
        ImportError: if captum is not installed.
        TypeError: if ``attribution`` has no ``attribute`` method.

    Example:
        >>> from captum.attr import Saliency
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> method = from_captum(Saliency(model), abs=False)
        >>> method(model, torch.rand(2, 1, 4, 4), 0).shape
        torch.Size([2, 1, 4, 4])
    """
    try:
        import captum.attr  # noqa: F401
    except ImportError as err:  # pragma: no cover - captum is a test dependency
        raise ImportError("from_captum needs captum: `pip install captum` (or use the built-in methods: "
                          + ", ".join(METHODS) + ").") from err
    if not callable(getattr(attribution, "attribute", None)):
        raise TypeError(expected("attribution", "a Captum Attribution object or class (with an `attribute` method)",
                                 type(attribution).__name__))
    return CaptumMethod(attribution, dict(attribute_kwargs), signed, seed)


class PinnedOptions:
    """Method options whose ``torch.Generator`` values restart, on every call, from their state at construction.

    Calling the object returns a fresh copy of the options. A callback makes one per method and calls it once
    per run, so a method given ``generator=torch.Generator().manual_seed(s)`` draws the same noise every epoch,
    as with an int seed, instead of continuing a stream whose position depends on how many epochs ran before
    (which a run resumed from a checkpoint does not know). The caller's generator is never advanced, and the
    object pickles (generator states are kept as tensors), as ``ddp_spawn`` needs.

    Example:
        >>> fresh = PinnedOptions({"samples": 4, "generator": torch.Generator().manual_seed(1)})
        >>> a, b = fresh()["generator"], fresh()["generator"]
        >>> torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
        True
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = {k: v for k, v in options.items() if not isinstance(v, torch.Generator)}
        self.states = {k: (str(v.device), v.get_state()) for k, v in options.items() if isinstance(v, torch.Generator)}

    def __call__(self) -> Dict[str, Any]:
        out = dict(self.options)
        for key, (device, state) in self.states.items():
            gen = torch.Generator(device=device)
            gen.set_state(state)
            out[key] = gen
        return out
