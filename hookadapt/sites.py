"""The per-host dispatcher: adapters, their hooks, tensor selection and casts.

An `Adapter` is one network and one strategy at one host. A `Site` is the
adapters that one adapter set attaches to one host, with the forward
pre-hook and forward hook that run them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import DTYPES, AdapterSpec
from .errors import AttachError, ShapeError
from .registry import NETWORKS, STRATEGIES
from .selection import InputSelector, OutputSelector

__all__ = ["Adapter", "Site"]


class Adapter(nn.Module):
    """One adapter at one host: a network, a strategy and how they meet the host's tensors."""

    def __init__(
        self,
        name: str,
        path: str,
        spec: AdapterSpec,
        host: nn.Module,
        in_features: int,
        out_features: int,
        *,
        options: Mapping[str, Any] | None = None,
        network: nn.Module | None = None,
    ) -> None:
        """Build the adapter; ``options`` are this site's network options, ``network`` a shared network."""
        super().__init__()
        self.name = name
        self.path = path
        self.spec = spec
        self.insertion = spec.insertion
        self.in_features = in_features
        self.out_features = out_features
        self.feature_dim = spec.feature_dim
        self.dtype = DTYPES[spec.dtype]
        self.enabled = True
        # True when no module of the model can hold the adapter, so `model.to()` does not move it.
        self.outside_tree = False

        if options is None:
            options = {key: value for key, value in spec.network.options.items() if key not in ("in_features", "out_features")}
        self.options = dict(options)
        if network is None:
            network = NETWORKS.get(spec.network.kind)(in_features, out_features, **self.options)
        self.network = network
        self.network.to(dtype=self.dtype)
        self.strategy = STRATEGIES.get(spec.strategy.kind)(**spec.strategy.options).to(dtype=self.dtype)
        self.input_selector = InputSelector(host, spec.input_select, site=path, adapter=name)
        self.output_selector = OutputSelector(spec.output_select, site=path, adapter=name)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, site={self.path!r}, insertion={self.insertion!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the adapter to ``x`` as output or input insertion does."""
        return self.compose(x, self.run_network(x))

    def run_network(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on a host tensor, in the adapter's dtype."""
        x = self._features_last(x)
        if x.shape[-1] != self.in_features:
            raise self._size_error("input", self.in_features, x)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.outside_tree:
            self._follow_device(x.device)
        return self.network(x)

    def compose(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Merge the network output ``out`` into the host tensor ``x`` with the strategy."""
        host_dtype = x.dtype
        x = self._features_last(x)
        if x.shape[-1] != self.out_features:
            raise self._size_error("output", self.out_features, x)
        if host_dtype != self.dtype:
            x = x.to(self.dtype)
        result = self.strategy(x, out)
        if result.dtype != host_dtype:
            result = result.to(host_dtype)
        if self.feature_dim not in (-1, result.dim() - 1):
            result = result.movedim(-1, self.feature_dim)
        return result

    def _features_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_dim in (-1, x.dim() - 1):
            return x
        if not -x.dim() <= self.feature_dim < x.dim():
            msg = (
                f"adapter {self.name!r} at {self.path!r}: feature_dim={self.feature_dim} is out of range "
                f"for a tensor of shape {tuple(x.shape)}; set feature_dim to the dimension that holds the features"
            )
            raise ShapeError(msg)
        return x.movedim(self.feature_dim, -1)

    def _size_error(self, side: str, expected: int, x: torch.Tensor) -> ShapeError:
        msg = (
            f"adapter {self.name!r} at {self.path!r}: the network's {side} size is {expected}, "
            f"but the host's tensor has {x.shape[-1]} features (shape with features last: "
            f"{tuple(x.shape)}); set network.in_features / network.out_features in the spec, "
            f"pass example_inputs to attach, or set feature_dim if the features are not in the last dimension"
        )
        return ShapeError(msg)

    def _apply(self, fn: Any, recurse: bool = True) -> Adapter:
        # `model.to(dtype)` and `.half()` reach the adapters through the module tree;
        # cast inputs to whatever dtype the network has now.
        result = super()._apply(fn, recurse)
        for tensor in self.network.parameters():
            if tensor.is_floating_point():
                self.dtype = tensor.dtype
                break
        return result

    def _follow_device(self, device: torch.device) -> None:
        for tensor in self.parameters():
            if tensor.device != device:
                self.to(device)
            return


class Site:
    """The adapters of one adapter set at one host, and the hooks that run them."""

    def __init__(self, path: str, host: nn.Module, adapters: list[Adapter], owner: object = None) -> None:
        self.path = path
        # The adapter set this site belongs to; the host's hooks keep it alive through this reference.
        self.owner = owner
        self.host = host
        self.adapters = adapters
        self.input_adapters = [adapter for adapter in adapters if adapter.insertion == "input"]
        self.parallel_adapters = [adapter for adapter in adapters if adapter.insertion == "parallel"]
        self.output_side_adapters = [adapter for adapter in adapters if adapter.insertion != "input"]
        self.handles: list[RemovableHandle] = []
        # Parallel results wait here between the pre-hook and the forward hook of one call.
        # A stack per thread keeps re-entrant calls and concurrent threads apart.
        self._local = threading.local()

    def register(self) -> None:
        """Register this site's hooks on its host."""
        if self.input_adapters or self.parallel_adapters:
            self.handles.append(self.host.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if self.output_side_adapters:
            self.handles.append(
                self.host.register_forward_hook(self._forward_hook, with_kwargs=True, always_call=True)
            )

    def remove(self) -> None:
        """Remove this site's hooks from its host."""
        while self.handles:
            self.handles.pop().remove()

    def _stack(self) -> list[dict[Adapter, torch.Tensor]]:
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = []
            return self._local.stack

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        training = module.training
        changed = False
        for adapter in self.input_adapters:
            if not adapter.enabled:
                continue
            if adapter.training != training:
                adapter.train(training)
            x = adapter.input_selector.get(args, kwargs)
            args, kwargs = adapter.input_selector.replace(args, kwargs, adapter(x))
            changed = True

        if self.parallel_adapters:
            # Push before computing, so the forward hook, which also runs when this raises, pops it.
            frame: dict[Adapter, torch.Tensor] = {}
            self._stack().append(frame)
            for adapter in self.parallel_adapters:
                if not adapter.enabled:
                    continue
                if adapter.training != training:
                    adapter.train(training)
                frame[adapter] = adapter.run_network(adapter.input_selector.get(args, kwargs))
        return (args, kwargs) if changed else None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        frame = None
        if self.parallel_adapters:
            stack = self._stack()
            frame = stack.pop() if stack else None
        if output is None and sys.exc_info()[0] is not None:
            # The host or an earlier hook raised; this call only clears the per-call state.
            return None

        training = module.training
        for adapter in self.output_side_adapters:
            if adapter.insertion == "parallel":
                if frame is None:
                    msg = (
                        f"adapter {adapter.name!r} at {self.path!r}: the forward hook ran without "
                        f"the pre-hook that computes the parallel branch; attach adapters outside "
                        f"the host's forward call"
                    )
                    raise AttachError(msg)
                out = frame.get(adapter)
                if out is None:
                    continue
                y = adapter.output_selector.get(output)
                output = adapter.output_selector.replace(output, adapter.compose(y, out))
            elif adapter.enabled:
                if adapter.training != training:
                    adapter.train(training)
                y = adapter.output_selector.get(output)
                output = adapter.output_selector.replace(output, adapter(y))
        return output
