"""Composition strategies: how an adapter's output meets the host's tensor.

A strategy is an `torch.nn.Module` whose ``forward(x, out)`` receives the
tensor being adapted, ``x``, and the network's output, ``out``, and returns
the merged result. Strategies run in the adapter set's config order, so each
one receives the result of the one before it at the same site.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import STRATEGIES, register_strategy

__all__ = ["Strategy", "ResidualAdd", "ReturnResult", "ScaledAdd", "Multiply"]


def _inside_backward() -> bool:
    # Autograd sets a graph task id while it runs backward, which is when
    # gradient checkpointing recomputes a forward.
    return torch._C._current_graph_task_id() != -1


class Strategy(nn.Module):
    """Base class of composition strategies.

    Subclasses implement ``forward(x, out)``. A strategy that adds a
    training loss term calls `add_auxiliary_loss`; the adapter set sums the
    terms in ``auxiliary_loss()``.
    """

    def __init__(self) -> None:
        super().__init__()
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
        *,
        stochastic_depth: float = 0.0,
        stochastic_depth_mode: str = "batch",
        l2_lambda: float = 0.0,
    ) -> None:
        super().__init__()
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

    def __init__(self, *, scale: float = 1.0) -> None:
        super().__init__()
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
