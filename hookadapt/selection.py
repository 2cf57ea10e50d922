"""Finding the tensor to adapt in a host's inputs and outputs, and putting it back.

Everything that is not selected passes through as the same object, and a
container keeps its type: a tuple stays a tuple, a named tuple keeps its
fields, and a dict or ``ModelOutput`` is shallow-copied before one key is set.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from .errors import SelectionError

__all__ = ["InputSelector", "OutputSelector"]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {', '.join(type(item).__name__ for item in value)}"
    return type(value).__name__


class InputSelector:
    """Locate the input tensor of a host call, by position, argument name or default rule."""

    def __init__(self, host: nn.Module, select: int | str | None, *, site: str, adapter: str) -> None:
        self.select = select
        self.site = site
        self.adapter = adapter
        # A name may be passed by keyword or by position, so find its position once.
        self.position: int | None = select if isinstance(select, int) else None
        if isinstance(select, str):
            try:
                parameters = list(inspect.signature(host.forward).parameters.values())
            except (TypeError, ValueError):
                parameters = []
            for index, parameter in enumerate(parameters):
                if parameter.name == select and parameter.kind in (
                    parameter.POSITIONAL_ONLY,
                    parameter.POSITIONAL_OR_KEYWORD,
                ):
                    self.position = index

    def _fail(self, args: tuple, kwargs: dict, expected: str) -> SelectionError:
        msg = (
            f"adapter {self.adapter!r} at {self.site!r}: expected {expected} in the host's inputs, "
            f"found positional ({', '.join(_describe(arg) for arg in args) or 'none'}) and keyword "
            f"({', '.join(f'{key}={_describe(value)}' for key, value in kwargs.items()) or 'none'}); "
            f"set input_select to the position or name of the tensor to adapt"
        )
        return SelectionError(msg)

    def locate(self, args: tuple, kwargs: dict) -> tuple[bool, int | str]:
        """Return ``(is_keyword, position_or_name)`` of the selected input tensor."""
        select = self.select
        if select is None:
            for index, arg in enumerate(args):
                if isinstance(arg, torch.Tensor):
                    return False, index
            for key, value in kwargs.items():
                if isinstance(value, torch.Tensor):
                    return True, key
            raise self._fail(args, kwargs, "a tensor argument")
        if isinstance(select, str) and select in kwargs:
            if isinstance(kwargs[select], torch.Tensor):
                return True, select
            raise self._fail(args, kwargs, f"a tensor for argument {select!r}")
        position = self.position
        if position is not None and -len(args) <= position < len(args) and isinstance(args[position], torch.Tensor):
            return False, position
        what = f"argument {select!r}" if isinstance(select, str) else f"positional argument {select}"
        raise self._fail(args, kwargs, f"a tensor as {what}")

    def get(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.select is None and args and type(args[0]) is torch.Tensor:
            return args[0]
        is_keyword, key = self.locate(args, kwargs)
        return kwargs[key] if is_keyword else args[key]

    def replace(self, args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
        is_keyword, key = self.locate(args, kwargs)
        if is_keyword:
            kwargs = dict(kwargs)
            kwargs[key] = value
            return args, kwargs
        items = list(args)
        items[key] = value
        return tuple(items), kwargs


class OutputSelector:
    """Locate the output tensor of a host call and build the output with it replaced."""

    def __init__(self, select: int | str | None, *, site: str, adapter: str) -> None:
        self.select = select
        self.site = site
        self.adapter = adapter

    def _fail(self, output: Any, expected: str) -> SelectionError:
        msg = (
            f"adapter {self.adapter!r} at {self.site!r}: expected {expected} in the host's output, "
            f"found {_describe(output)}; set output_select to the index or key of the tensor to adapt"
        )
        return SelectionError(msg)

    def _key(self, output: Any) -> int | str | None:
        select = self.select
        if isinstance(output, torch.Tensor):
            if select is None:
                return None
            raise self._fail(output, f"a tuple, list or dict to apply output_select={select!r} to")
        if isinstance(output, Mapping):
            if select is None:
                for key, value in output.items():
                    if isinstance(value, torch.Tensor):
                        return key
                raise self._fail(output, "a tensor value")
            if select not in output and isinstance(select, int) and -len(output) <= select < len(output):
                # An index counts the present keys, as ModelOutput.to_tuple() does.
                select = list(output.keys())[select]
            if select in output and isinstance(output[select], torch.Tensor):
                return select
            raise self._fail(output, f"a tensor under key {select!r}")
        if isinstance(output, (tuple, list)):
            if select is None:
                select = 0
            if isinstance(select, str) and hasattr(output, "_fields") and select in output._fields:
                select = output._fields.index(select)
            if isinstance(select, int) and -len(output) <= select < len(output):
                if isinstance(output[select], torch.Tensor):
                    return select
            raise self._fail(output, f"a tensor at index {select!r}")
        raise self._fail(output, "a tensor, tuple, list, dict or ModelOutput")

    def get(self, output: Any) -> torch.Tensor:
        if self.select is None and type(output) is torch.Tensor:
            return output
        key = self._key(output)
        return output if key is None else output[key]

    def replace(self, output: Any, value: torch.Tensor) -> Any:
        if self.select is None and type(output) is torch.Tensor:
            return value
        key = self._key(output)
        if key is None:
            return value
        if isinstance(output, Mapping):
            if not isinstance(output, MutableMapping):
                raise self._fail(output, "a mutable mapping")
            new = copy.copy(output)
            new[key] = value
            return new
        if isinstance(output, list):
            new = copy.copy(output)
            new[key] = value
            return new
        items = list(output)
        items[key] = value
        if type(output) is tuple:
            return tuple(items)
        if hasattr(output, "_make"):
            return output._make(items)
        # Other tuple subclasses, such as torch.return_types, take one iterable.
        return type(output)(items)
