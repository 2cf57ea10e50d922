"""Adapter networks: the trainable functional forms.

Every network maps a tensor whose last dimension has ``in_features`` to one
whose last dimension has ``out_features``, and starts so that its adapter
changes nothing: with ``residual_add`` the first output is zero, with
``multiply`` it is one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_network

__all__ = ["ACTIVATIONS", "Identity", "LinearAdapter", "LoRA", "Scale"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "hardtanh": nn.Hardtanh,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
}


def _check_dropout(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        msg = f"dropout must be a number in [0, 1), got {value!r}"
        raise ValueError(msg)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        msg = f"{name} must be a positive int, got {value!r}"
        raise ValueError(msg)


@register_network("linear")
class LinearAdapter(nn.Module):
    """Houlsby bottleneck adapter, as NeMo's ``LinearAdapter`` defines it.

    With ``norm_position="pre"`` it computes ``up(act(down(norm(x))))`` and
    with ``"post"`` it computes ``norm(up(act(down(x))))``; ``down`` and
    ``up`` have no bias. The last layer starts at zero (for ``"post"``, the
    LayerNorm's weight and bias), so a fresh adapter outputs zeros. Dropout
    applies to the adapter's output.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dim: int = 64,
        activation: str = "swish",
        norm_position: str = "pre",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm_position = norm_position
        self.norm = nn.LayerNorm(in_features if norm_position == "pre" else out_features)
        self.down = nn.Linear(in_features, dim, bias=False)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(dim, out_features, bias=False)
        self.dropout = nn.Dropout(dropout)

        if norm_position == "pre":
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        _check_positive_int("dim", options["dim"])
        if options["activation"] not in ACTIVATIONS:
            msg = f"activation must be one of {', '.join(ACTIVATIONS)}, got {options['activation']!r}"
            raise ValueError(msg)
        if options["norm_position"] not in ("pre", "post"):
            msg = f"norm_position must be 'pre' or 'post', got {options['norm_position']!r}"
            raise ValueError(msg)
        _check_dropout(options["dropout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_position == "pre":
            x = self.norm(x)
        x = self.up(self.activation(self.down(x)))
        if self.norm_position == "post":
            x = self.norm(x)
        if self.dropout.p > 0:
            x = self.dropout(x)
        return x


@register_network("lora")
class LoRA(nn.Module):
    """Low-rank update ``B(A(dropout(x))) * alpha / rank`` (Hu et al., 2021).

    ``A`` starts Kaiming-uniform, as `torch.nn.Linear` initialises its weight,
    and ``B`` starts at zero. ``use_rslora`` scales by ``alpha / sqrt(rank)``
    (Kalajdzievski, 2023). With ``parallel`` insertion and ``residual_add``
    on an `torch.nn.Linear` host this is the usual LoRA layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.dropout = nn.Dropout(dropout)
        # Read on every call; cheaper than self.dropout.p through nn.Module.__getattr__.
        self.uses_dropout = dropout > 0
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)

        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        _check_positive_int("rank", options["rank"])
        if isinstance(options["alpha"], bool) or not isinstance(options["alpha"], (int, float)):
            msg = f"alpha must be a number, got {options['alpha']!r}"
            raise ValueError(msg)
        _check_dropout(options["dropout"])
        if not isinstance(options["use_rslora"], bool):
            msg = f"use_rslora must be True or False, got {options['use_rslora']!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weights are used directly: three submodule calls would cost more than the
        # two small matrix products on short inputs.
        if self.uses_dropout:
            x = self.dropout(x)
        return F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight) * self.scaling

    def forward_add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return ``y + self(x)``, with the scaling and the sum folded into one matrix product.

        ``x`` and ``y`` must have the same shape up to the last dimension.
        """
        if self.uses_dropout:
            x = self.dropout(x)
        # The parameter dicts give the same tensors as attribute access (FSDP swaps entries
        # there too), without nn.Module.__getattr__, which costs microseconds per call.
        modules = self._modules
        down = F.linear(x, modules["lora_A"]._parameters["weight"])
        up = modules["lora_B"]._parameters["weight"].t()
        if y.dim() == 2:
            return torch.addmm(y, down, up, alpha=self.scaling)
        summed = torch.addmm(y.reshape(-1, y.shape[-1]), down.reshape(-1, self.rank), up, alpha=self.scaling)
        return summed.view(y.shape)


@register_network("scale")
class Scale(nn.Module):
    """IA3 (Liu et al., 2022): a learned per-feature vector, used with ``multiply``.

    The vector has ``out_features`` entries and starts at ``init``, which is
    one by default. The network returns the vector whatever its input, so
    ``multiply`` broadcasts it over the host tensor's features.
    """

    def __init__(self, in_features: int, out_features: int, *, init: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((out_features,), float(init)))

    @staticmethod
    def check_options(options: dict[str, Any]) -> None:
        if isinstance(options["init"], bool) or not isinstance(options["init"], (int, float)):
            msg = f"init must be a number, got {options['init']!r}"
            raise ValueError(msg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight


@register_network("identity")
class Identity(nn.Module):
    """Return the input unchanged; the network of a meta adapter, whose strategy does the work."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
