"""Meta strategies: combining the results of several adapters at one site.

A meta adapter names its members in the strategy's ``adapters`` option. At
each site, the members then stop running one after another: the meta adapter
runs each enabled member on the same input, passes their results to its
strategy, and the strategy merges them into one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .registry import register_strategy
from .strategies import Strategy

__all__ = ["Average", "Fusion"]


def _check_members(options: dict[str, Any]) -> None:
    members = options["adapters"]
    if not isinstance(members, (list, tuple)) or not members or not all(isinstance(name, str) for name in members):
        msg = f"adapters must be a non-empty list of adapter names, got {members!r}"
        raise ValueError(msg)
    if len(set(members)) != len(members):
        msg = f"adapters lists a name twice: {list(members)!r}"
        raise ValueError(msg)


def _deltas(x: torch.Tensor, results: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack each member's change to ``x`` along a new second-to-last dimension."""
    return torch.stack([result - x for result in results], dim=-2)


@register_strategy("average")
class Average(Strategy):
    """Add the weighted mean of the members' changes: ``x + sum(w_i (r_i - x)) / sum(w_i)``.

    ``weights`` default to equal weights. A disabled member drops out and
    the remaining weights are normalised again.
    """

    def __init__(self, features: int, *, adapters: Sequence[str] = (), weights: Sequence[float] | None = None) -> None:
        super().__init__(features)
        self.members = tuple(adapters)
        self.weights = dict(zip(self.members, weights)) if weights is not None else dict.fromkeys(self.members, 1.0)

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        _check_members(options)
        weights = options["weights"]
        if weights is None:
            return
        valid = isinstance(weights, (list, tuple)) and len(weights) == len(options["adapters"])
        valid = valid and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
        if not valid or not sum(weights) > 0:
            msg = f"weights must be one number >= 0 per adapter with a positive sum, got {weights!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor, results: dict[str, torch.Tensor]) -> torch.Tensor:
        total = sum(self.weights[name] for name in results)
        if not results or total == 0:
            return x
        merged = sum(self.weights[name] / total * (result - x) for name, result in results.items())
        return x + merged


@register_strategy("fusion")
class Fusion(Strategy):
    """AdapterFusion (Pfeiffer et al., 2021): attention over the members' results.

    The query is a projection of ``x``; keys and values are projections of
    each member's change ``r_i - x``. The result is ``x`` plus the
    attention-weighted values, with one softmax over the members per
    position. The value projection starts as the identity and the query and
    key projections small, so a fresh fusion is close to the plain average.
    Freeze the members with ``adapter_set.set_trainable([...])`` to train the
    fusion alone.
    """

    def __init__(self, features: int, *, adapters: Sequence[str] = (), temperature: float = 1.0) -> None:
        super().__init__(features)
        self.members = tuple(adapters)
        self.temperature = float(temperature)
        self.query = nn.Linear(features, features)
        self.key = nn.Linear(features, features)
        self.value = nn.Linear(features, features, bias=False)
        for projection in (self.query, self.key):
            nn.init.normal_(projection.weight, std=0.02)
            nn.init.zeros_(projection.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(features))

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        _check_members(options)
        value = options["temperature"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            msg = f"temperature must be a number > 0, got {value!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor, results: dict[str, torch.Tensor]) -> torch.Tensor:
        if not results:
            return x
        deltas = _deltas(x, list(results.values()))
        query = self.query(x).unsqueeze(-2)
        scores = (query * self.key(deltas)).sum(dim=-1) / (math.sqrt(self.features) * self.temperature)
        attention = torch.softmax(scores, dim=-1).unsqueeze(-1)
        return x + (attention * self.value(deltas)).sum(dim=-2)
