"""Adapter specs as frozen attrs classes, their validation and their dict form.

A config maps adapter names to `AdapterSpec` objects or to plain dicts of the
same fields. `parse_config` turns either form into validated specs with every
default filled in, before anything touches a model, and `config_to_dict`
gives the JSON-ready form that checkpoints store.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch

from .errors import ConfigError
from .registry import NETWORKS, STRATEGIES

__all__ = [
    "INSERTIONS",
    "DTYPES",
    "NetworkSpec",
    "StrategySpec",
    "AdapterSpec",
    "parse_config",
    "config_to_dict",
]

INSERTIONS = ("output", "parallel", "input")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Adapter names become module names and checkpoint key segments.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class FrozenMapping(Mapping):
    """A read-only mapping of options that, unlike `types.MappingProxyType`, copies and pickles."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(self._items))

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple:
        return (FrozenMapping, (self._items,))


def _freeze(value: Any) -> Any:
    # Anything else passes unchanged, so validation can report it with the adapter's name.
    if isinstance(value, Mapping):
        return FrozenMapping({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


@attrs.frozen
class NetworkSpec:
    """The functional form of an adapter: a registered network kind and its options."""

    kind: str
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze, hash=False)


@attrs.frozen
class StrategySpec:
    """The composition function of an adapter: a registered strategy kind and its options."""

    kind: str = "residual_add"
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze, hash=False)


def _to_patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _to_kind_spec(cls: type) -> Any:
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return cls(kind=value)
        if isinstance(value, Mapping) and "kind" in value and isinstance(value["kind"], str):
            options = {key: item for key, item in value.items() if key != "kind"}
            return cls(kind=value["kind"], options=options)
        return value

    return convert


@attrs.frozen
class AdapterSpec:
    """The configuration of one named adapter.

    Attributes:
        target: Module paths, globs (``*`` within one dotted segment, ``**``
            across segments), ``re:`` regexes (full match) or NeMo's
            ``"module:adapter_name"`` shorthand, as one string or a list.
        network: The functional form, as `NetworkSpec`, a dict with a
            ``kind`` key, or a kind name.
        strategy: The composition function, in the same forms.
        insertion: ``"output"``, ``"parallel"`` or ``"input"``.
        exclude: Patterns of modules to leave out of ``target``'s matches.
        input_select: Position or argument name of the input tensor to adapt;
            None takes the first positional tensor, or the first tensor
            keyword argument when the host is called with keywords only.
        output_select: Index or key of the output tensor to adapt; None takes
            the output itself, element 0 of a tuple or list, or the first
            tensor value of a dict or ``ModelOutput``.
        feature_dim: The dimension of the features, -1 for the last;
            1 suits channels-first tensors such as a convolution's output.
        dtype: The networks' dtype; inputs and results are cast at the boundary.
        shared: Build one network and use it at every matched site, which
            then must all have the same feature sizes.
        overrides: Network options per site, as ``{pattern: {option: value}}``
            on top of ``network``'s options. The first pattern, in order,
            that matches a site's path applies; PEFT's ``rank_pattern`` and
            ``alpha_pattern`` load as overrides.
    """

    target: tuple[str, ...] = attrs.field(converter=_to_patterns)
    network: NetworkSpec = attrs.field(converter=_to_kind_spec(NetworkSpec))
    strategy: StrategySpec = attrs.field(factory=StrategySpec, converter=_to_kind_spec(StrategySpec))
    insertion: str = "output"
    exclude: tuple[str, ...] = attrs.field(default=(), converter=_to_patterns)
    input_select: int | str | None = None
    output_select: int | str | None = None
    feature_dim: int = -1
    dtype: str = "float32"
    shared: bool = False
    overrides: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, converter=_freeze, hash=False)


_SPEC_FIELDS = tuple(field.name for field in attrs.fields(AdapterSpec))


def parse_config(config: Mapping[str, Any]) -> dict[str, AdapterSpec]:
    """Validate a config and return its specs, in order, with every default filled in.

    Raises:
        ConfigError: naming the adapter and the field that is invalid.
    """
    if not isinstance(config, Mapping):
        msg = (
            f"config must be a mapping from adapter names to specs (dicts or AdapterSpec), "
            f"got {type(config).__name__}"
        )
        raise ConfigError(msg)
    if not config:
        msg = "config is empty; give at least one adapter, for example {'bottleneck': {'target': ..., 'network': 'linear'}}"
        raise ConfigError(msg)
    return {name: parse_spec(name, spec) for name, spec in config.items()}


def parse_spec(name: Any, spec: Any) -> AdapterSpec:
    """Validate one adapter's spec, given as `AdapterSpec` or dict."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        msg = (
            f"adapter name {name!r} is invalid; use letters, digits, '_' and '-', "
            f"starting with a letter or '_' (names become module names and checkpoint keys)"
        )
        raise ConfigError(msg)

    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(_SPEC_FIELDS), key=repr)
        if unknown:
            msg = (
                f"adapter {name!r}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"valid fields are {', '.join(_SPEC_FIELDS)}"
            )
            raise ConfigError(msg)
        for required in ("target", "network"):
            if required not in spec:
                msg = f"adapter {name!r}: missing required field {required!r}"
                raise ConfigError(msg)
        try:
            spec = AdapterSpec(**spec)
        except (TypeError, ValueError) as err:
            msg = f"adapter {name!r}: invalid spec: {err}"
            raise ConfigError(msg) from err
    elif not isinstance(spec, AdapterSpec):
        msg = f"adapter {name!r}: spec must be a dict or hookadapt.AdapterSpec, got {type(spec).__name__}"
        raise ConfigError(msg)

    _check_patterns(name, "target", spec.target, allow_empty=False)
    _check_patterns(name, "exclude", spec.exclude, allow_empty=True)
    if spec.insertion not in INSERTIONS:
        msg = f"adapter {name!r}: insertion must be one of {', '.join(INSERTIONS)}, got {spec.insertion!r}"
        raise ConfigError(msg)
    for field in ("input_select", "output_select"):
        value = getattr(spec, field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
            msg = f"adapter {name!r}: {field} must be None, an int index or a str key, got {value!r}"
            raise ConfigError(msg)
    if isinstance(spec.feature_dim, bool) or not isinstance(spec.feature_dim, int):
        msg = f"adapter {name!r}: feature_dim must be an int such as -1 or 1, got {spec.feature_dim!r}"
        raise ConfigError(msg)
    if not isinstance(spec.dtype, str) or spec.dtype not in DTYPES:
        msg = f"adapter {name!r}: dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}"
        raise ConfigError(msg)

    if not isinstance(spec.shared, bool):
        msg = f"adapter {name!r}: shared must be True or False, got {spec.shared!r}"
        raise ConfigError(msg)

    network = _normalize_kind(name, "network", spec.network, NetworkSpec, NETWORKS)
    strategy = _normalize_kind(name, "strategy", spec.strategy, StrategySpec, STRATEGIES)
    overrides = _normalize_overrides(name, spec, network)
    return attrs.evolve(spec, network=network, strategy=strategy, overrides=overrides)


def _normalize_overrides(name: str, spec: AdapterSpec, network: NetworkSpec) -> dict[str, dict[str, Any]]:
    overrides = spec.overrides
    if not isinstance(overrides, Mapping):
        msg = f"adapter {name!r}: overrides must map site patterns to network options, got {overrides!r}"
        raise ConfigError(msg)
    if overrides and spec.shared:
        msg = f"adapter {name!r}: overrides cannot apply to a shared network, which is one network for every site; drop one of the two"
        raise ConfigError(msg)
    _check_patterns(name, "overrides", tuple(overrides), allow_empty=True)

    result = {}
    for pattern, options in overrides.items():
        if not isinstance(options, Mapping):
            msg = f"adapter {name!r}: overrides[{pattern!r}] must be a mapping of network options, got {options!r}"
            raise ConfigError(msg)
        # Validate the options as they will be merged at a matching site.
        NETWORKS.normalize(network.kind, {**network.options, **options}, adapter=name)
        result[pattern] = dict(options)
    return result


def _check_patterns(name: str, field: str, patterns: Any, *, allow_empty: bool) -> None:
    if not isinstance(patterns, tuple) or not all(isinstance(item, str) for item in patterns):
        msg = f"adapter {name!r}: {field} must be a module path pattern or a list of them, got {patterns!r}"
        raise ConfigError(msg)
    if not patterns and not allow_empty:
        msg = f"adapter {name!r}: {field} is empty; give at least one module path pattern"
        raise ConfigError(msg)
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                msg = f"adapter {name!r}: {field} regex {pattern!r} is invalid: {err}"
                raise ConfigError(msg) from err


def _normalize_kind(name: str, field: str, value: Any, cls: type, registry: Any) -> Any:
    if not isinstance(value, cls):
        msg = (
            f"adapter {name!r}: {field} must be a kind name, a dict with a 'kind' key or "
            f"hookadapt.{cls.__name__}, got {value!r}"
        )
        raise ConfigError(msg)
    if not isinstance(value.options, Mapping):
        msg = f"adapter {name!r}: {field} options must be a mapping of option names to values, got {value.options!r}"
        raise ConfigError(msg)
    options = registry.normalize(value.kind, value.options, adapter=name)
    return cls(kind=value.kind, options=options)


def config_to_dict(specs: Mapping[str, AdapterSpec]) -> dict[str, dict[str, Any]]:
    """Return the plain-dict form of validated specs, ready for `json.dumps`."""
    result = {}
    for name, spec in specs.items():
        entry = attrs.asdict(spec, recurse=False)
        entry["target"] = list(spec.target)
        entry["exclude"] = list(spec.exclude)
        entry["network"] = {"kind": spec.network.kind, **_thaw(spec.network.options)}
        entry["strategy"] = {"kind": spec.strategy.kind, **_thaw(spec.strategy.options)}
        entry["overrides"] = _thaw(spec.overrides)
        result[name] = entry
    return result
