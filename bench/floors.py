"""Hand-written adapters that replace modules in place: the speed floor for hooks.

These modules compute the same math as hookadapt's ``lora`` network with
``parallel`` insertion and its ``linear`` (Houlsby) network with ``output``
insertion, with no dispatch around them. A model that carries them runs
as fast as adapter code written into the model itself would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class InlineLoRALinear(nn.Module):
    """A Linear layer with a LoRA update: ``F.linear(x, W, b) + (dropout(x) @ A.T @ B.T) * scaling``.

    It shares ``weight`` and ``bias`` with the Linear it replaces. ``A``
    starts Kaiming-uniform and ``B`` at zero.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_A.T @ self.lora_B.T
        return F.linear(x, self.weight, self.bias) + update * self.scaling


class InlineBottleneck(nn.Module):
    """Run the wrapped module, then add ``up(silu(down(layer_norm(y))))`` to its output ``y``.

    This is hookadapt's ``linear`` network with ``norm_position="pre"``,
    the ``swish`` activation and ``residual_add``; ``up`` starts at zero.
    """

    def __init__(self, inner: nn.Module, features: int, dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.norm = nn.LayerNorm(features)
        self.down = nn.Linear(features, dim, bias=False)
        self.up = nn.Linear(dim, features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        y = self.inner(*args, **kwargs)
        return y + self.up(F.silu(self.down(self.norm(y))))


def _replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child_name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child_name, module)


def inject_lora(model: nn.Module, paths: list[str], rank: int, alpha: float) -> list[nn.Parameter]:
    """Replace the Linear layers at ``paths`` with `InlineLoRALinear`; return the new trainable parameters."""
    parameters = []
    for path in paths:
        layer = InlineLoRALinear(model.get_submodule(path), rank, alpha)
        _replace_module(model, path, layer)
        parameters += [layer.lora_A, layer.lora_B]
    return parameters


def inject_bottleneck(model: nn.Module, paths: list[str], features: int, dim: int) -> list[nn.Parameter]:
    """Wrap the modules at ``paths`` in `InlineBottleneck`; return the new trainable parameters."""
    parameters = []
    for path in paths:
        wrapper = InlineBottleneck(model.get_submodule(path), features, dim)
        _replace_module(model, path, wrapper)
        parameters += [*wrapper.norm.parameters(), wrapper.down.weight, wrapper.up.weight]
    return parameters
