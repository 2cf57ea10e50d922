"""Cases 3 and 6: the fixed cost of one adapted call, and how it grows with the number of sites.

Both cases use tiny inputs in eval mode without autograd, so the time is
Python dispatch rather than arithmetic: a 64-to-64 Linear on a batch of
one. Each variant has its own copy of the layers, with the same weights.
Both run with one torch thread, whatever ``--threads`` sets: a second
thread does not speed up such small operations, and waiting for it makes
every call depend on what else runs on the other core.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import hookadapt
from minilm import LORA_ALPHA, LORA_RANK
from results import bar, timing_case
from settings import Settings
from timing import interleave, summarize

FEATURES = 64
MICROSECONDS = 1e6
# hookadapt's overhead over the plain layer, as a share of PEFT's.
OVERHEAD_SHARE_BAR = 0.5
BLOCK_COUNTS = (6, 24, 96)
# The largest allowed relative difference between the per-site overheads of the largest and smallest stacks.
GROWTH_BAR = 0.10


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def lora_config(target: str) -> dict[str, Any]:
    """Return a hookadapt config for LoRA r=8, alpha 16, with parallel insertion at ``target``."""
    return {
        "lora": {
            "target": target,
            "insertion": "parallel",
            "network": {"kind": "lora", "rank": LORA_RANK, "alpha": LORA_ALPHA},
            "strategy": {"kind": "residual_add"},
        }
    }


class Holder(nn.Module):
    """One Linear layer at the path ``linear``, for tools that adapt a model's submodules."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _no_op_hook(*_: object) -> None:
    return None


def per_call_layers() -> tuple[dict[str, nn.Module], list[nn.Module]]:
    """Return the layer of each case 3 variant, in eval mode, and the models that hold them.

    The layers are called directly. The caller keeps the holding models
    alive while it uses the layers, because an adapter set refers to its
    model weakly.
    """
    torch.manual_seed(0)
    plain = nn.Linear(FEATURES, FEATURES).eval()

    forward_hook = copy.deepcopy(plain)
    forward_hook.register_forward_hook(_no_op_hook)

    hook_pair = copy.deepcopy(plain)
    hook_pair.register_forward_pre_hook(_no_op_hook, with_kwargs=True)
    hook_pair.register_forward_hook(_no_op_hook, with_kwargs=True, always_call=True)

    hooked = Holder(copy.deepcopy(plain)).eval()
    hookadapt.attach(hooked, lora_config("linear"))

    wrapped = _peft_model(plain)
    layers = {
        "plain": plain,
        "no-op forward hook": forward_hook,
        "no-op hook pair": hook_pair,
        "hookadapt": hooked.linear,
        "peft": wrapped.base_model.model.linear,
    }
    return layers, [hooked, wrapped]


def _peft_model(plain: nn.Linear) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["linear"])
    return peft.get_peft_model(Holder(copy.deepcopy(plain)), config).eval()


def run_per_call_overhead(settings: Settings) -> dict[str, Any]:
    """Time one call of a small Linear with hooks, hookadapt LoRA and PEFT LoRA against the plain layer."""
    layers, holders = per_call_layers()
    x = torch.randn(1, FEATURES)
    calls = {name: (lambda layer=layer: layer(x)) for name, layer in layers.items()}
    with torch.no_grad(), one_thread():
        samples = interleave(
            calls,
            rounds=settings.overhead_rounds,
            calls=settings.overhead_calls,
            warmup_rounds=settings.warmup_rounds,
            max_seconds=settings.other_seconds,
        )
    del holders

    setup = (
        f"One call of nn.Linear({FEATURES}, {FEATURES}) on a batch of 1, called directly, in eval mode under "
        f"torch.no_grad with one torch thread. The variants: the plain layer; a no-op forward hook; a no-op forward "
        f"pre-hook and forward hook registered as hookadapt registers them (with_kwargs, always_call); hookadapt "
        f"LoRA (r={LORA_RANK}, parallel insertion); PEFT LoRA (r={LORA_RANK}). Each sample is the mean of "
        f"{settings.overhead_calls} calls."
    )
    others = [name for name in layers if name != "plain"]
    result = timing_case(
        "3. Per-call overhead on a small Linear",
        setup,
        samples,
        unit="µs per call",
        scale=MICROSECONDS,
        differences=[(name, "plain") for name in others],
    )
    comparisons = result["comparisons"]
    hookadapt_overhead = comparisons["hookadapt - plain"]["median"]
    peft_overhead = comparisons["peft - plain"]["median"]
    result["overhead_share"] = hookadapt_overhead / peft_overhead
    result["bars"] = [
        bar("Per-call overhead: hookadapt / PEFT (over plain)", result["overhead_share"], OVERHEAD_SHARE_BAR),
    ]
    return result


class Block(nn.Module):
    """A 64-to-64 Linear layer and a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


class BlockStack(nn.Module):
    """``count`` blocks run one after another."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def growth_models() -> dict[str, nn.Module]:
    """Return a plain and a hookadapt-adapted stack for each block count, in eval mode."""
    models = {}
    for count in BLOCK_COUNTS:
        torch.manual_seed(count)
        plain = BlockStack(count).eval()
        adapted = copy.deepcopy(plain)
        hookadapt.attach(adapted, lora_config("blocks.*.linear"))
        models[f"plain {count}"] = plain
        models[f"hookadapt {count}"] = adapted
    return models


def _per_site_overheads(samples: dict[str, list[float]], count: int) -> list[float]:
    """Return the per-round overhead per site, in seconds, of the stack with ``count`` blocks."""
    adapted, plain = samples[f"hookadapt {count}"], samples[f"plain {count}"]
    return [(with_adapters - without) / count for with_adapters, without in zip(adapted, plain, strict=True)]


def run_site_growth(settings: Settings) -> dict[str, Any]:
    """Time eval forwards of stacks of 6, 24 and 96 blocks, plain and with LoRA on every block."""
    models = growth_models()
    x = torch.randn(1, FEATURES)
    calls = {name: max(1, settings.growth_block_calls // len(model.blocks)) for name, model in models.items()}
    forwards = {name: (lambda model=model: model(x)) for name, model in models.items()}
    with torch.no_grad(), one_thread():
        samples = interleave(
            forwards,
            rounds=settings.growth_rounds,
            calls=calls,
            warmup_rounds=settings.warmup_rounds,
            max_seconds=settings.other_seconds,
        )

    setup = (
        f"Stacks of {', '.join(map(str, BLOCK_COUNTS))} blocks (nn.Linear({FEATURES}, {FEATURES}) and GELU), "
        f"batch 1, eval mode, torch.no_grad, one torch thread; hookadapt LoRA (r={LORA_RANK}, parallel) on every Linear. Overhead "
        f"per site = (adapted − plain) / sites, per round. A sample averages {settings.growth_block_calls} "
        f"block calls (so {settings.growth_block_calls // BLOCK_COUNTS[0]} forwards of the smallest stack)."
    )
    result = timing_case("6. Overhead growth with the number of sites", setup, samples, unit="µs per forward", scale=MICROSECONDS)
    per_site = {count: summarize([value * MICROSECONDS for value in _per_site_overheads(samples, count)]) for count in BLOCK_COUNTS}
    for count, summary in per_site.items():
        summary["kind"] = "difference"
        result["comparisons"][f"per-site overhead, {count} sites"] = summary
    smallest, largest = BLOCK_COUNTS[0], BLOCK_COUNTS[-1]
    growth = per_site[largest]["median"] / per_site[smallest]["median"]
    result["per_site_growth"] = growth
    result["bars"] = [
        bar(f"Per-site overhead, {largest} sites against {smallest}: abs(ratio − 1)", abs(growth - 1.0), GROWTH_BAR),
    ]
    return result
