"""Composition strategies: how an adapter's output meets the host's tensor.

A strategy is an `torch.nn.Module` whose ``forward(x, out)`` receives the
tensor being adapted, ``x``, and the network's output, ``out``, and returns
the merged result. Both have their features in the last dimension, and
``features`` is the size of that dimension in ``x``. Strategies run in the
adapter set's config order, so each one receives the result of the one
before it at the same site.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import STRATEGIES, register_strategy

__all__ = ["Strategy", "ResidualAdd", "ReturnResult", "ScaledAdd", "Multiply", "Concat", "Gated"]


def _inside_backward() -> bool:
    # Autograd sets a graph task id while it runs backward, which is when
    # gradient checkpointing recomputes a forward.
    return torch._C._current_graph_task_id() != -1


class Strategy(nn.Module):
    """Base class of composition strategies.

    Subclasses implement ``forward(x, out)``. A strategy that adds a
    training loss term calls `add_auxiliary_loss`; the adapter set sums the
    terms in ``auxiliary_loss()``. A meta strategy sets ``members`` to the
    names of the adapters it combines and implements ``forward(x, results)``,
    where ``results`` are those adapters' results on the same ``x``.
    """

    # Names of the adapters whose results a meta strategy combines; empty for other strategies.
    members: tuple[str, ...] = ()

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self._auxiliary_losses: list[torch.Tensor] | None = None

    def add_auxiliary_loss(self, value: torch.Tensor) -> None:
        """Record a loss term, unless autograd is recomputing a checkpointed forward."""
        if self._auxiliary_losses is not None and not _inside_backward():
            self._auxiliary_losses.append(value)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__qualname__} must implement forward(x, out)")


STRATEGIES.base = Strategy


def _check_probability(name: str, value: Any, *, upper_inclusive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and 0.0 <= value and (value <= 1.0 if upper_inclusive else value < 1.0)
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        msg = f"{name} must be a number in {bound}, got {value!r}"
        raise ValueError(msg)


@register_strategy("residual_add")
class ResidualAdd(Strategy):
    """Residual connection ``x + out`` with NeMo's stochastic depth and L2 penalty.

    In training, ``stochastic_depth = p`` multiplies ``out`` by a
    Bernoulli(1 - p) draw divided by (1 - p), or by exactly zero when the
    draw is zero, so a dropped adapter stays in the autograd graph. The draw
    is one per batch (``stochastic_depth_mode="batch"``, as in NeMo) or one
    per sample along dimension 0 (``"sample"``). With ``l2_lambda > 0`` the
    strategy adds ``l2_lambda`` times the batch mean of the squared L2 norm
    of ``out`` (before stochastic depth) to the auxiliary loss. Neither
    applies in eval mode.
    """

    def __init__(
        self,
        features: int,
        *,
        stochastic_depth: float = 0.0,
        stochastic_depth_mode: str = "batch",
        l2_lambda: float = 0.0,
    ) -> None:
        super().__init__(features)
        self.stochastic_depth = float(stochastic_depth)
        self.stochastic_depth_mode = stochastic_depth_mode
        self.l2_lambda = float(l2_lambda)

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        _check_probability("stochastic_depth", options["stochastic_depth"], upper_inclusive=True)
        if options["stochastic_depth_mode"] not in ("batch", "sample"):
            msg = f"stochastic_depth_mode must be 'batch' or 'sample', got {options['stochastic_depth_mode']!r}"
            raise ValueError(msg)
        value = options["l2_lambda"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            msg = f"l2_lambda must be a number >= 0, got {value!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.l2_lambda > 0:
                squared_norm = out.pow(2).reshape(out.shape[0], -1).sum(dim=-1) if out.dim() else out.pow(2)
                self.add_auxiliary_loss(self.l2_lambda * squared_norm.mean())
            if self.stochastic_depth > 0:
                out = out * self._depth_mask(out)
        return x + out

    def _depth_mask(self, out: torch.Tensor) -> torch.Tensor:
        p = self.stochastic_depth
        if self.stochastic_depth_mode == "sample" and out.dim() > 0:
            shape = (out.shape[0],) + (1,) * (out.dim() - 1)
        else:
            shape = ()
        keep = torch.empty(shape, dtype=out.dtype, device=out.device).bernoulli_(1.0 - p)
        # At p == 1 every draw is zero, so there is nothing to rescale.
        return keep if p >= 1.0 else keep / (1.0 - p)


@register_strategy("return_result")
class ReturnResult(Strategy):
    """Replace the host's tensor with the adapter's output."""

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out


@register_strategy("scaled_add")
class ScaledAdd(Strategy):
    """Compute ``x + scale * out`` with a fixed ``scale``."""

    def __init__(self, features: int, *, scale: float = 1.0) -> None:
        super().__init__(features)
        self.scale = float(scale)

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        if isinstance(options["scale"], bool) or not isinstance(options["scale"], (int, float)):
            msg = f"scale must be a number, got {options['scale']!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + self.scale * out


@register_strategy("multiply")
class Multiply(Strategy):
    """Compute ``x * out``, as IA3 does with a ``scale`` network."""

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x * out


@register_strategy("concat")
class Concat(Strategy):
    """Concatenate ``x`` and ``out`` along ``dim``.

    Along the feature dimension (``dim=-1``) with ``project=True``, a linear
    projection maps the ``features + out_features`` channels back to
    ``features``, so the host's output keeps its size. The projection starts
    as the identity on ``x`` and zero on ``out``, so a fresh adapter changes
    nothing. Along another dimension, such as the sequence, nothing is
    projected and the host's tensor grows, so the modules after the host
    must accept the longer tensor.
    """

    def __init__(self, features: int, *, dim: int = -1, project: bool = True) -> None:
        super().__init__(features)
        self.dim = dim
        self.projection: nn.Linear | None = None
        if project and dim == -1:
            # The network's output has as many features as x, which the site checks.
            self.projection = nn.Linear(2 * features, features, bias=False)
            with torch.no_grad():
                self.projection.weight.zero_()
                self.projection.weight[:, :features].copy_(torch.eye(features))

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        if isinstance(options["dim"], bool) or not isinstance(options["dim"], int):
            msg = f"dim must be an int, got {options['dim']!r}"
            raise ValueError(msg)
        if not isinstance(options["project"], bool):
            msg = f"project must be True or False, got {options['project']!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([x, out.expand(*x.shape[:-1], out.shape[-1]) if self.dim == -1 else out], dim=self.dim)
        if self.projection is None:
            return joined
        return self.projection(joined)


@register_strategy("gated")
class Gated(Strategy):
    """Compute ``x + tanh(gate) * out`` with a learned gate that starts at zero, so closed.

    ``per_channel=True`` learns one gate per feature instead of one scalar.
    """

    def __init__(self, features: int, *, per_channel: bool = False) -> None:
        super().__init__(features)
        self.gate = nn.Parameter(torch.zeros(features if per_channel else ()))

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        if not isinstance(options["per_channel"], bool):
            msg = f"per_channel must be True or False, got {options['per_channel']!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.gate) * out
