"""hookadapt's LoRA with parallel insertion computes what PEFT's LoRA computes, given the same A and B."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import hookadapt
from conftest import hidden_states

RANK = 4
ALPHA = 8
TOY_TOLERANCE = 1e-6
MINILM_TOLERANCE = 1e-5


class Projection(nn.Module):
    """One linear layer between two element-wise steps, so the LoRA host sits inside a model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x * 2.0))


def peft_copy(model: nn.Module, targets: list[str], use_rslora: bool) -> nn.Module:
    """Wrap a copy of ``model`` with PEFT's LoRA, with random A and B, and return the wrapped module."""
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=targets,
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    return peft.get_peft_model(copy.deepcopy(model), config).base_model.model.eval()


def attach_like_peft(
    model: nn.Module,
    target: str | list[str],
    peft_model: nn.Module,
    use_rslora: bool,
) -> hookadapt.AdapterSet:
    """Attach hookadapt's LoRA to ``model`` and copy A and B from the PEFT model, site by site."""
    config = {
        "lora": {
            "target": target,
            "insertion": "parallel",
            "network": {"kind": "lora", "rank": RANK, "alpha": ALPHA, "use_rslora": use_rslora},
            "strategy": "residual_add",
        }
    }
    adapter_set = hookadapt.attach(model, config)
    with torch.no_grad():
        for path, adapter in adapter_set.adapters["lora"].items():
            peft_layer = peft_model.get_submodule(path)
            adapter.network.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
            adapter.network.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    return adapter_set


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha-over-rank", "rslora"])
def test_lora_matches_peft_toy(use_rslora: bool) -> None:
    """On a toy Linear, outputs and A/B gradients agree with PEFT's."""
    torch.manual_seed(0)
    model = Projection().eval()
    x = torch.randn((2, 5, 16), generator=torch.Generator().manual_seed(1))
    reference = peft_copy(model, ["lin"], use_rslora)
    adapter_set = attach_like_peft(model, "lin", reference, use_rslora)
    network = adapter_set.adapters["lora"]["lin"].network
    peft_layer = reference.lin

    ours = model(x)
    theirs = reference(x)
    ours.pow(2).sum().backward()
    theirs.pow(2).sum().backward()
    output_diff = (ours - theirs).abs().max().item()
    grad_a_diff = (network.lora_A.weight.grad - peft_layer.lora_A["default"].weight.grad).abs().max().item()
    grad_b_diff = (network.lora_B.weight.grad - peft_layer.lora_B["default"].weight.grad).abs().max().item()
    adapter_set.detach()
    print(
        f"toy, use_rslora={use_rslora}: max abs difference of outputs {output_diff:g}, "
        f"A gradients {grad_a_diff:g}, B gradients {grad_b_diff:g}"
    )

    assert torch.any(peft_layer.lora_B["default"].weight != 0), "PEFT's B is zero, so the test shows nothing"
    assert output_diff <= TOY_TOLERANCE, f"outputs differ from PEFT by up to {output_diff:g}"
    assert grad_a_diff <= TOY_TOLERANCE, f"A gradients differ from PEFT by up to {grad_a_diff:g}"
    assert grad_b_diff <= TOY_TOLERANCE, f"B gradients differ from PEFT by up to {grad_b_diff:g}"


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha-over-rank", "rslora"])
def test_lora_matches_peft_minilm(minilm: nn.Module, review_batch: dict, use_rslora: bool) -> None:
    """On MiniLM's query and value layers, hidden states agree with PEFT's."""
    reference = peft_copy(minilm, ["query", "value"], use_rslora)
    target = r"re:encoder\.layer\.\d+\.attention\.self\.(query|value)"
    base = hidden_states(minilm, review_batch)
    adapter_set = attach_like_peft(minilm, target, reference, use_rslora)

    ours = hidden_states(minilm, review_batch)
    theirs = hidden_states(reference, review_batch)
    sites = len(adapter_set.sites)
    adapter_set.detach()
    difference = (ours - theirs).abs().max().item()
    print(f"MiniLM, use_rslora={use_rslora}: max abs difference of hidden states {difference:g}")

    assert sites == 12, "the target did not match every query and value layer"
    assert not torch.equal(ours, base), "the adapters did not change the hidden states"
    assert difference <= MINILM_TOLERANCE, f"hidden states differ from PEFT by up to {difference:g}"
