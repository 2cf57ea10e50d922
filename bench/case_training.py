"""Cases 1 and 2: one training step on MiniLM with LoRA and with Houlsby bottleneck adapters.

Every variant trains its own copy of the encoder, with the base frozen, on
the same random batch. The steps run interleaved, and the ratios are
medians of per-round ratios.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from minilm import (
    BATCH_SIZE,
    BOTTLENECK_CONFIG,
    BOTTLENECK_DIM,
    LORA_ALPHA,
    LORA_BUILDERS,
    LORA_RANK,
    SEQUENCE_LENGTH,
    hookadapt_variant,
    inline_bottleneck_variant,
    random_batch,
    training_step,
)
from results import bar, timing_case
from settings import Settings
from timing import interleave

MILLISECONDS = 1e3
# hookadapt / PEFT and hookadapt / inline, for LoRA; hookadapt / inline for the bottleneck.
LORA_PEFT_BAR = 0.98
INLINE_BAR = 1.03


def run_lora_training(base: nn.Module, settings: Settings) -> dict[str, Any]:
    """Time a LoRA training step with hookadapt, PEFT and inline LoRA layers."""
    batch = random_batch(base)
    variants = {name: build(copy.deepcopy(base)) for name, build in LORA_BUILDERS.items()}
    steps = {name: training_step(variant, batch) for name, variant in variants.items()}
    samples = interleave(
        steps,
        rounds=settings.training_rounds,
        warmup_rounds=settings.warmup_rounds,
        max_seconds=settings.training_seconds,
    )

    setup = (
        f"LoRA r={LORA_RANK}, alpha={LORA_ALPHA}, dropout 0, on query and value of all 6 layers of MiniLM-L6; "
        f"one training step (train mode, forward, backward, AdamW step, zero_grad) on random token ids, "
        f"batch {BATCH_SIZE}, sequence length {SEQUENCE_LENGTH}, base frozen. `inline` replaces each Linear "
        f"with a hand-written LoRA Linear (bench/floors.py), the floor. {len(samples['hookadapt'])} interleaved rounds."
    )
    result = timing_case(
        "1. LoRA training step on MiniLM",
        setup,
        samples,
        unit="ms per step",
        scale=MILLISECONDS,
        ratios=[("hookadapt", "peft"), ("hookadapt", "inline"), ("peft", "inline")],
    )
    comparisons = result["comparisons"]
    result["bars"] = [
        bar("LoRA step: hookadapt / PEFT", comparisons["hookadapt / peft"]["median"], LORA_PEFT_BAR),
        bar("LoRA step: hookadapt / inline", comparisons["hookadapt / inline"]["median"], INLINE_BAR),
    ]
    return result


def run_bottleneck_training(base: nn.Module, settings: Settings) -> dict[str, Any]:
    """Time a Houlsby bottleneck training step with hookadapt and with inline wrappers."""
    batch = random_batch(base)
    variants = {
        "hookadapt": hookadapt_variant(copy.deepcopy(base), BOTTLENECK_CONFIG),
        "inline": inline_bottleneck_variant(copy.deepcopy(base)),
    }
    steps = {name: training_step(variant, batch) for name, variant in variants.items()}
    samples = interleave(
        steps,
        rounds=settings.training_rounds,
        warmup_rounds=settings.warmup_rounds,
        max_seconds=settings.training_seconds,
    )

    setup = (
        f"Houlsby bottleneck adapters (hookadapt network `linear`: LayerNorm, down to {BOTTLENECK_DIM}, SiLU, up; "
        f"`residual_add`, output insertion) on every `encoder.layer.*.output` of MiniLM-L6; one training step "
        f"as in case 1. `inline` wraps each output block in a module that applies the same math "
        f"(bench/floors.py). {len(samples['hookadapt'])} interleaved rounds."
    )
    result = timing_case(
        "2. Bottleneck adapter training step on MiniLM",
        setup,
        samples,
        unit="ms per step",
        scale=MILLISECONDS,
        ratios=[("hookadapt", "inline")],
    )
    result["bars"] = [
        bar("Bottleneck step: hookadapt / inline", result["comparisons"]["hookadapt / inline"]["median"], INLINE_BAR),
    ]
    return result
