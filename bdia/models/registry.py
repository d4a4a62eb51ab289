"""The network classes that files may name, and the constructor arguments of each network.

A class decorated with ``register_network`` can be rebuilt from a file: the loaders
(``bdia.models.checkpoints``) look the class name a file records up here and call the class
with the recorded keyword arguments. No other class can be built from a file, and nothing
is imported by name, so a file cannot make the loader import or run anything.

The decorator also makes the class record its own constructor arguments, as EDM's
``persistence.persistent_class`` does: every instance gets ``.config``, the dict
``{"class_name": ..., "init_kwargs": {...}}`` that ``save_network`` writes beside the
tensors. Positional arguments are recorded under their parameter names, in call order,
followed by the keyword arguments as given (defaults that were not passed are not
recorded).

The modules that define networks (``networks``, ``digits``) register their classes when
they are imported; this module imports none of them.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["register_network", "network_class", "registered_networks"]

_NETWORKS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_network(cls: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
    """Class decorator: the class may be rebuilt from files, and records its arguments.

    Usable bare (``@register_network``) or with a name (``@register_network(name="X")``;
    by default the class's ``__name__``). The class's ``__init__`` may not take ``*args``,
    since every recorded argument must have a name.

    Raises:
        ValueError: another class is already registered under the name.
        TypeError: the constructor takes ``*args``.
    """

    def decorate(klass: T) -> T:
        key = name or klass.__name__
        known = _NETWORKS.get(key)
        if known is not None and _qualified(known) != _qualified(klass):
            raise ValueError(f"network class name {key!r} is taken by {_qualified(known)}")
        _record_arguments(klass, key)
        _NETWORKS[key] = klass
        return klass

    return decorate if cls is None else decorate(cls)


def _qualified(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def _record_arguments(klass: type[Any], key: str) -> None:
    """Wrap ``klass.__init__`` so that an instance of exactly ``klass`` records its arguments."""
    init = klass.__init__
    params = list(inspect.signature(init).parameters.values())[1:]  # without self
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        raise TypeError(f"{key}.__init__ takes *args; recorded arguments need names")
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        # A subclass records its own arguments (when registered), not those it passes up.
        if type(self) is klass:
            recorded = dict(zip(positional, args))
            recorded.update(kwargs)
            self.config = {"class_name": key, "init_kwargs": copy.deepcopy(recorded)}

    klass.__init__ = __init__


def network_class(name: str) -> type:
    """The class registered under ``name``.

    Raises:
        ValueError: no class is registered under ``name`` (the message lists those that are).
    """
    try:
        return _NETWORKS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown network class {name!r}; supported: {', '.join(registered_networks())}"
        ) from None


def registered_networks() -> tuple[str, ...]:
    """The registered class names, sorted."""
    return tuple(sorted(_NETWORKS))
