"""Exception types raised by hookadapt.

Every error derives from `HookadaptError`, and each subclass also derives
from the built-in exception that fits it best, so ``except ValueError``
keeps working in code that does not know hookadapt.
"""

from __future__ import annotations

__all__ = [
    "HookadaptError",
    "ConfigError",
    "TargetError",
    "ShapeError",
    "SelectionError",
    "AttachError",
    "CheckpointError",
]


class HookadaptError(Exception):
    """Base class of every error that hookadapt raises."""


class ConfigError(HookadaptError, ValueError):
    """An adapter config or one of its fields is invalid."""


class TargetError(HookadaptError, ValueError):
    """A target pattern matches no module, or matches a module it may not use."""


class ShapeError(HookadaptError, ValueError):
    """A feature size is unknown, or differs from the size seen at forward time."""


class SelectionError(HookadaptError, TypeError):
    """The tensor to adapt cannot be found in a host's inputs or outputs."""


class AttachError(HookadaptError, RuntimeError):
    """Attaching or detaching an adapter set would leave the model inconsistent."""


class CheckpointError(HookadaptError, ValueError):
    """An adapter checkpoint is missing, malformed or does not fit the model."""
