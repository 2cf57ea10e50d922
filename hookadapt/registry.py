"""Name-to-class registries for adapter networks and composition strategies.

A registered class declares its options as keyword-only arguments of
``__init__`` with defaults, so the registry can validate a config and fill in
the defaults before any module is built. A class may add a static
``check_options(options)`` that raises `ValueError` for invalid values.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from .errors import ConfigError

__all__ = ["Registry", "NETWORKS", "STRATEGIES", "register_network", "register_strategy"]

T = TypeVar("T", bound=type)

# Option values must survive a JSON round trip, because saved checkpoints carry the config.
_JSON_SCALARS = (bool, int, float, str, type(None))


class Registry:
    """A mapping from kind names to classes, with option validation."""

    def __init__(self, what: str, positional: tuple[str, ...], base: type, *, settable: tuple[str, ...] = ()) -> None:
        self.what = what
        # Constructor arguments that a config may also set, such as a network's in_features.
        self.settable = settable
        # Every registered class must derive from this one.
        self.base = base
        # Constructor arguments that hookadapt passes itself, before the options.
        self.positional = positional
        self._classes: dict[str, type] = {}

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, kinds={self.kinds()!r})"

    def register(self, kind: str) -> Callable[[T], T]:
        """Register the decorated class under ``kind``; a duplicate kind raises `ConfigError`."""
        if not isinstance(kind, str) or not kind:
            msg = f"{self.what} kind must be a non-empty string, got {kind!r}"
            raise ConfigError(msg)

        def decorator(cls: T) -> T:
            if not isinstance(cls, type) or not issubclass(cls, self.base):
                msg = (
                    f"cannot register {cls!r} as {self.what} kind {kind!r}: it must be a subclass "
                    f"of {self.base.__module__}.{self.base.__qualname__}"
                )
                raise ConfigError(msg)
            if kind in self._classes:
                msg = (
                    f"{self.what} kind {kind!r} is already registered to "
                    f"{self._classes[kind].__qualname__}; choose another name for {cls.__qualname__}"
                )
                raise ConfigError(msg)
            self._option_defaults(cls)  # Reject a class whose options cannot be validated.
            self._classes[kind] = cls
            cls.kind = kind
            return cls

        return decorator

    def unregister(self, kind: str) -> None:
        """Remove a registered kind, mainly for tests and notebooks that redefine a class."""
        self.get(kind)
        del self._classes[kind]

    def kinds(self) -> list[str]:
        """Return the registered kind names in registration order."""
        return list(self._classes)

    def get(self, kind: str, *, adapter: str | None = None) -> type:
        """Return the class registered as ``kind`` or raise `ConfigError` listing the known kinds."""
        try:
            return self._classes[kind]
        except (KeyError, TypeError):
            where = f"adapter {adapter!r}: " if adapter else ""
            msg = (
                f"{where}unknown {self.what} kind {kind!r}; known kinds are "
                f"{', '.join(sorted(self._classes))}. Register a new kind with "
                f"hookadapt.register_{self.what}({kind!r})."
            )
            raise ConfigError(msg) from None

    def normalize(self, kind: str, options: Mapping[str, Any], *, adapter: str) -> dict[str, Any]:
        """Validate ``options`` for ``kind`` and return them with every default filled in."""
        cls = self.get(kind, adapter=adapter)
        defaults = self._option_defaults(cls)
        unknown = sorted(set(options) - set(defaults) - set(self.settable), key=repr)
        if unknown:
            msg = (
                f"adapter {adapter!r}: unknown {self.what} option(s) {', '.join(map(repr, unknown))} "
                f"for kind {kind!r}; valid options are {', '.join(sorted([*defaults, *self.settable]))}"
            )
            raise ConfigError(msg)

        for name in self.settable:
            value = options.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                msg = f"adapter {adapter!r}: {self.what}.{name} must be a positive int or None, got {value!r}"
                raise ConfigError(msg)
        merged = {**defaults, **options}
        for name, value in merged.items():
            _check_json_value(value, adapter=adapter, field=f"{self.what}.{name}")
        check = getattr(cls, "check_options", None)
        if check is not None:
            try:
                check(merged)
            except (ValueError, TypeError) as err:
                msg = f"adapter {adapter!r}: invalid {self.what} option for kind {kind!r}: {err}"
                raise ConfigError(msg) from err
        return merged

    def _option_defaults(self, cls: type) -> dict[str, Any]:
        try:
            signature = inspect.signature(cls.__init__)
        except (TypeError, ValueError) as err:
            msg = f"cannot read the options of {self.what} class {cls.__qualname__}: {err}"
            raise ConfigError(msg) from err

        parameters = list(signature.parameters.items())[1:]
        leading = [name for name, parameter in parameters[: len(self.positional)]
                   if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)]
        if tuple(leading) != self.positional:
            msg = (
                f"{self.what} class {cls.__qualname__}: __init__ must take "
                f"({', '.join(['self', *self.positional, '*', 'option=default', '...'])}), "
                f"got ({', '.join(['self', *(name for name, _ in parameters)])})"
            )
            raise ConfigError(msg)

        defaults: dict[str, Any] = {}
        for name, parameter in parameters:
            if name in self.positional or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if parameter.kind is not parameter.KEYWORD_ONLY or parameter.default is parameter.empty:
                msg = (
                    f"{self.what} class {cls.__qualname__}: option {name!r} must be a keyword-only "
                    f"argument with a default, so configs can leave it out; "
                    f"the arguments before '*' may only be {', '.join(self.positional) or 'none'}"
                )
                raise ConfigError(msg)
            defaults[name] = parameter.default
        return defaults


def _check_json_value(value: Any, *, adapter: str, field: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        msg = f"adapter {adapter!r}: {field} must be a finite number, got {value!r}"
        raise ConfigError(msg)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        msg = f"adapter {adapter!r}: {field} must be an int within +-2**53, got {value}"
        raise ConfigError(msg)
    if isinstance(value, _JSON_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json_value(item, adapter=adapter, field=field)
        return
    msg = (
        f"adapter {adapter!r}: {field} must be a JSON value (number, string, bool, None or a list "
        f"of these), got {type(value).__name__}; configs are saved as JSON in checkpoints"
    )
    raise ConfigError(msg)


NETWORKS = Registry(
    "network", positional=("in_features", "out_features"), base=nn.Module, settable=("in_features", "out_features")
)
# strategies.py narrows the base to its Strategy class, which cannot be imported here.
STRATEGIES = Registry("strategy", positional=("features",), base=nn.Module)


def register_network(kind: str) -> Callable[[T], T]:
    """Register an adapter network class under ``kind``.

    The class is an `torch.nn.Module` whose ``__init__(self, in_features,
    out_features, *, option=default, ...)`` builds the network and whose
    ``forward(x)`` maps a tensor with ``in_features`` in its last dimension
    to one with ``out_features``.
    """
    return NETWORKS.register(kind)


def register_strategy(kind: str) -> Callable[[T], T]:
    """Register a composition strategy class under ``kind``.

    The class derives from `hookadapt.Strategy`; its ``__init__(self,
    features, *, option=default, ...)`` receives the size of the host
    tensor's feature dimension and the options.
    """
    return STRATEGIES.register(kind)
