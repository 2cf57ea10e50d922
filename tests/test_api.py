"""The public API walk-through, run as written on the real MiniLM encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import hookadapt
from conftest import assert_restored, hidden_states, snapshot

CONFIG = {
    "bottleneck": {
        "target": "encoder.layer.*.output",
        "insertion": "output",
        "network": {"kind": "linear", "dim": 64, "activation": "swish", "norm_position": "pre"},
        "strategy": {"kind": "residual_add", "stochastic_depth": 0.1, "l2_lambda": 0.0},
    },
    "lora_qv": {
        "target": ["re:encoder\\.layer\\.\\d+\\.attention\\.self\\.(query|value)"],
        "insertion": "parallel",
        "network": {"kind": "lora", "rank": 8, "alpha": 16},
        "strategy": "residual_add",
    },
}


def task_loss(model: nn.Module, batch: dict, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a fixed two-way projection of the mean-pooled hidden states."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    projection = torch.randn((hidden.shape[-1], 2), generator=torch.Generator().manual_seed(0))
    return nn.functional.cross_entropy(pooled @ projection, labels)


def test_public_api_walkthrough(
    minilm: nn.Module,
    review_batch: dict,
    review_labels: torch.Tensor,
    tmp_path: Path,
) -> None:
    """Attach, train, save, restore, load, switch and detach, as the API documentation shows."""
    model = minilm
    path = tmp_path / "adapters.safetensors"
    base = hidden_states(model, review_batch)
    before = snapshot(model)

    model.train()
    with hookadapt.adapters(model, CONFIG, freeze_base=True) as adapter_set:
        optimizer = torch.optim.AdamW(adapter_set.parameters(), lr=1e-3)
        loss = task_loss(model, review_batch, review_labels) + adapter_set.auxiliary_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        frozen = [param.requires_grad for param in model.parameters() if param.grad is None]
        model.eval()
        trained = hidden_states(model, review_batch)
        hookadapt.save_adapters(adapter_set, path)
        sites = len(adapter_set.sites)

    assert sites == 18, "the config did not reach six bottleneck and twelve LoRA sites"
    assert not any(frozen), "a parameter without a gradient is still trainable"
    assert not torch.equal(trained, base), "one training step did not change the output"
    assert_restored(model, before)
    assert torch.equal(hidden_states(model, review_batch), base), "output differs after the with block"

    adapter_set = hookadapt.load_adapters(model, path)
    loaded = hidden_states(model, review_batch)
    adapter_set.disable("bottleneck")
    lora_only = hidden_states(model, review_batch)
    adapter_set.enable("bottleneck")
    enabled = hidden_states(model, review_batch)
    with adapter_set.disabled():
        base_output = hidden_states(model, review_batch)
    after_block = hidden_states(model, review_batch)
    adapter_set.detach()

    assert torch.equal(loaded, trained), "the loaded adapters give another output"
    assert not torch.equal(lora_only, trained), "disabling the bottleneck changed nothing"
    assert not torch.equal(lora_only, base), "disabling the bottleneck also disabled LoRA"
    assert torch.equal(enabled, trained), "enabling the bottleneck did not restore the output"
    assert torch.equal(base_output, base), "adapters ran inside disabled()"
    assert torch.equal(after_block, trained), "leaving disabled() did not re-enable the adapters"
    assert_restored(model, before)
    assert torch.equal(hidden_states(model, review_batch), base), "output differs after detach"


def test_loaded_set_as_context(minilm: nn.Module, review_batch: dict, tmp_path: Path) -> None:
    """The set that load_adapters returns detaches at the end of a with block."""
    path = tmp_path / "adapters.safetensors"
    with hookadapt.adapters(minilm, CONFIG) as adapter_set:
        hookadapt.save_adapters(adapter_set, path)
    base = hidden_states(minilm, review_batch)
    before = snapshot(minilm)

    with hookadapt.load_adapters(minilm, path) as loaded:
        sets = hookadapt.attached(minilm)

    assert sets == [loaded], "the loaded set is not attached inside the block"
    assert_restored(minilm, before)
    assert torch.equal(hidden_states(minilm, review_batch), base), "output differs after the block"
