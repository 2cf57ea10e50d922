"""Matching adapter targets against a model's module paths.

A pattern is an exact path (``""`` is the root module) or a glob, where ``*``
matches within one dotted segment and ``**`` across segments. It can also be
a regex with the ``re:`` prefix, which must match the whole path, or NeMo's
``"module:adapter_name"`` shorthand, which names the module left of the colon.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .errors import ConfigError, TargetError

__all__ = ["RESERVED", "candidate_modules", "resolve_targets", "compile_pattern"]

# Child name under which hosts keep their adapters while attached.
RESERVED = "_hookadapt"


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Return the model's modules by path, each module once, without hookadapt's own."""
    return {
        path: module
        for path, module in model.named_modules()
        if RESERVED not in path.split(".")
    }


def module_aliases(model: nn.Module) -> dict[str, str]:
    """Return every path of the model's modules, each mapped to its module's first path.

    A module reachable under two names (``self.second = self.first``) is one
    host, so a target may name either path and the site takes the first.
    """
    first: dict[int, str] = {}
    aliases = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if RESERVED not in path.split("."):
            aliases[path] = first.setdefault(id(module), path)
    return aliases


def _glob_to_regex(pattern: str) -> str:
    parts = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            # A dotted segment is never empty, so '*' does not match the root path "".
            parts.append("[^.]+")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^.]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return "".join(parts)


def compile_pattern(pattern: str, *, adapter: str, field: str = "target") -> re.Pattern[str]:
    """Compile a target pattern to a regex that must match a whole path."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    if ":" in pattern:
        path, _, name = pattern.partition(":")
        if name and name != adapter:
            msg = (
                f"adapter {adapter!r}: {field} {pattern!r} names adapter {name!r} after the colon; "
                f"in the 'module:adapter_name' form the name must be {adapter!r} or left out"
            )
            raise ConfigError(msg)
        pattern = path
    if "*" in pattern or "?" in pattern:
        return re.compile(_glob_to_regex(pattern))
    return re.compile(re.escape(pattern))


def _closest(pattern: str, paths: Iterable[str]) -> list[str]:
    paths = [path for path in paths if path]
    if pattern.startswith("re:"):
        text = pattern[3:]
    else:
        text = pattern.partition(":")[0]
    close = difflib.get_close_matches(text, paths, n=5, cutoff=0.4)
    if close:
        return close
    # Fall back to the paths that share the longest dotted prefix with the pattern.
    head = text.split(".")[0]
    return [path for path in paths if path.split(".")[0] == head][:5] or paths[:5]


def _match(adapter: str, field: str, patterns: tuple[str, ...], modules: Mapping[str, Any]) -> list[str]:
    matched: dict[str, None] = {}
    for pattern in patterns:
        regex = compile_pattern(pattern, adapter=adapter, field=field)
        found = [path for path in modules if regex.fullmatch(path)]
        if not found:
            hint = ", ".join(repr(path) for path in _closest(pattern, modules))
            msg = (
                f"adapter {adapter!r}: {field} pattern {pattern!r} matches no module of the model; "
                f"closest module paths: {hint or 'none (the model has no submodules)'}. "
                f"Globs use '*' within one dotted segment and '**' across segments; "
                f"regexes need the 're:' prefix and must match the whole path."
            )
            raise TargetError(msg)
        matched.update(dict.fromkeys(found))
    return list(matched)


def resolve_targets(
    model: nn.Module,
    adapter: str,
    target: tuple[str, ...],
    exclude: tuple[str, ...] = (),
    modules: dict[str, nn.Module] | None = None,
) -> list[str]:
    """Return the paths of the modules that ``target`` selects, in model order.

    Raises:
        TargetError: when a pattern matches nothing or ``exclude`` removes every match.
    """
    if modules is None:
        modules = candidate_modules(model)
    aliases = module_aliases(model)
    selected = {aliases[path] for path in _match(adapter, "target", target, aliases)}
    if exclude:
        selected -= {aliases[path] for path in _match(adapter, "exclude", exclude, aliases)}
        if not selected:
            msg = (
                f"adapter {adapter!r}: exclude {list(exclude)!r} removes every module that "
                f"target {list(target)!r} matches; narrow exclude or widen target"
            )
            raise TargetError(msg)
    return [path for path in modules if path in selected]
