"""Cases 4 and 5: MiniLM inference with adapters disabled, detached or merged, against the plain model.

All variants run in one interleaved measurement, each on its own copy of
the encoder. A second plain copy is timed as a control: its ratio to the
first shows how far two identical models differ on this machine, which is
the resolution of the other ratios.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

import hookadapt
from minilm import BATCH_SIZE, BOTTLENECK_CONFIG, LORA_CONFIG, SEQUENCE_LENGTH, inference_call, random_batch
from results import bar, timing_case
from settings import Settings
from timing import interleave

MILLISECONDS = 1e3
DISABLED_BAR = 1.02
DETACHED_BAR = 1.01
MERGED_BAR = 1.01
CONTROL = "plain (second copy)"


def _disabled(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    adapter_set = hookadapt.attach(model, {**BOTTLENECK_CONFIG, **LORA_CONFIG})
    adapter_set.disable()
    return model


def _detached(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    hookadapt.attach(model, {**BOTTLENECK_CONFIG, **LORA_CONFIG}).detach()
    return model


def _merged(base: nn.Module) -> nn.Module:
    """Attach LoRA with a nonzero B, as after training, and merge it into the Linear weights."""
    model = copy.deepcopy(base)
    adapter_set = hookadapt.attach(model, LORA_CONFIG)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in adapter_set.all_adapters():
            weight = adapter.network.lora_B.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)
    adapter_set.merge()
    return model


def inference_models(base: nn.Module) -> dict[str, nn.Module]:
    """Return the plain model, its control copy and the disabled, detached and merged variants."""
    return {
        "plain": copy.deepcopy(base),
        CONTROL: copy.deepcopy(base),
        "disabled": _disabled(base),
        "detached": _detached(base),
        "merged": _merged(base),
    }


def run_inference(base: nn.Module, settings: Settings) -> list[dict[str, Any]]:
    """Time eval forwards of every variant and return the results of case 4 and case 5."""
    batch = random_batch(base)
    forwards = {name: inference_call(model, batch) for name, model in inference_models(base).items()}
    samples = interleave(
        forwards,
        rounds=settings.inference_rounds,
        calls=settings.inference_calls,
        warmup_rounds=settings.warmup_rounds,
        max_seconds=settings.other_seconds * 2,
    )
    rounds = len(samples["plain"])
    common = (
        f"MiniLM-L6 forward in eval mode under torch.no_grad, random token ids, batch {BATCH_SIZE}, "
        f"sequence length {SEQUENCE_LENGTH}. `{CONTROL}` is an identical plain copy, timed as a control. "
        f"{rounds} interleaved rounds of {settings.inference_calls} forwards, one measurement for cases 4 and 5."
    )
    return [_disabled_detached_case(samples, common), _merged_case(samples, common)]


def _only(samples: dict[str, list[float]], names: list[str]) -> dict[str, list[float]]:
    return {name: samples[name] for name in names}


def _disabled_detached_case(samples: dict[str, list[float]], common: str) -> dict[str, Any]:
    setup = (
        "Adapters of the README example (bottleneck `linear` dim 64 on every layer output and LoRA r=8 on query "
        "and value) attached and all disabled with `adapter_set.disable()`; and a model after attach and detach. "
        + common
    )
    result = timing_case(
        "4. Inference with adapters disabled, and after detach",
        setup,
        _only(samples, ["plain", CONTROL, "disabled", "detached"]),
        unit="ms per forward",
        scale=MILLISECONDS,
        ratios=[("disabled", "plain"), ("detached", "plain"), (CONTROL, "plain")],
    )
    comparisons = result["comparisons"]
    result["bars"] = [
        bar("Inference, adapters disabled / plain", comparisons["disabled / plain"]["median"], DISABLED_BAR),
        bar("Inference, detached / plain", comparisons["detached / plain"]["median"], DETACHED_BAR),
    ]
    return result


def _merged_case(samples: dict[str, list[float]], common: str) -> dict[str, Any]:
    setup = (
        "LoRA r=8, alpha 16 on query and value, B set to small random values as after training, folded into the "
        "Linear weights with `adapter_set.merge()`, with the adapter set still attached. " + common
    )
    result = timing_case(
        "5. Inference with merged LoRA",
        setup,
        _only(samples, ["plain", CONTROL, "merged"]),
        unit="ms per forward",
        scale=MILLISECONDS,
        ratios=[("merged", "plain"), (CONTROL, "plain")],
    )
    result["bars"] = [bar("Inference, merged LoRA / plain", result["comparisons"]["merged / plain"]["median"], MERGED_BAR)]
    return result
