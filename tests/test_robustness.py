"""Robustness: activation checkpointing, compilers and tracers, shared and re-entrant hosts, threads and copies.

Every test runs real torch modules or the real MiniLM encoder. Hosts of two
kinds appear on purpose. hookadapt cannot know that a custom forward such as
`Mixer`'s leaves its input alone, so parallel adapters there run in the
pre-hook and keep per-call state. On built-in layers such as `torch.nn.Linear`
they run in the forward hook alone.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import hookadapt
from conftest import assert_restored, hidden_states, randomize, snapshot

FEATURES = 6
CHECKPOINT_MODES = ["reentrant", "non_reentrant"]


class Mixer(nn.Module):
    """A custom layer, ``tanh(x @ weight)``, that declares its sizes as `torch.nn.Linear` does."""

    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        self.in_features = features
        self.out_features = features
        self.weight = nn.Parameter(torch.randn(features, features) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight)


class Block(nn.Module):
    """A residual block: LayerNorm, a Linear, ReLU, then a Mixer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(FEATURES)
        self.fc = nn.Linear(FEATURES, FEATURES)
        self.mix = Mixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(torch.relu(self.fc(self.norm(x))))


class Stack(nn.Module):
    """An input layer, two blocks that `torch.utils.checkpoint` can wrap, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, FEATURES)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(FEATURES, 3)
        # "off", "reentrant" or "non_reentrant".
        self.checkpoint_mode = "off"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        for block in self.blocks:
            if self.checkpoint_mode == "off":
                hidden = block(hidden)
            else:
                use_reentrant = self.checkpoint_mode == "reentrant"
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=use_reentrant)
        return self.head(hidden)


class Pipeline(nn.Module):
    """A Block followed by a Linear head, for tracing tests."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def make_stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().train()


def lora(rank: int = 2, **options: Any) -> dict[str, Any]:
    return {"kind": "lora", "rank": rank, **options}


def bottleneck(dim: int = 3, **options: Any) -> dict[str, Any]:
    return {"kind": "linear", "dim": dim, **options}


NETWORKS = {"linear": bottleneck(), "lora": lora()}


def gradients(model: nn.Module, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run forward and backward from a fixed seed and return every parameter's gradient by name."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(x).pow(2).sum().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def assert_same_gradients(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected), "different parameters received gradients"
    for name, grad in expected.items():
        assert torch.allclose(found[name], grad, rtol=1e-5, atol=1e-6), f"the gradient of {name} differs"


def adapter_gradients(adapter_set: hookadapt.AdapterSet) -> dict[str, torch.Tensor | None]:
    return {
        key: None if param.grad is None else param.grad.clone()
        for key, param in adapter_set.named_parameters(include_train_modules=False)
    }


# Activation checkpointing.


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("network", ["linear", "lora"])
@pytest.mark.parametrize("insertion", ["output", "input", "parallel"])
@pytest.mark.parametrize("host", ["fc", "mix"])
def test_checkpoint_gradients_match(host: str, insertion: str, network: str, mode: str) -> None:
    """Adapter and base gradients under torch.utils.checkpoint equal those without it."""
    model = make_stack()
    config = {"a": {"target": f"blocks.*.{host}", "insertion": insertion, "network": NETWORKS[network]}}
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    x = torch.randn(4, 5, requires_grad=True)

    expected = gradients(model, x)
    model.checkpoint_mode = mode
    found = gradients(model, x)

    assert_same_gradients(found, expected)
    for key, grad in adapter_gradients(adapter_set).items():
        assert grad is not None, f"{key} received no gradient"


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("depth_mode", ["batch", "sample"])
@pytest.mark.parametrize("insertion", ["output", "parallel"])
def test_checkpoint_same_random_draws(insertion: str, depth_mode: str, mode: str) -> None:
    """Stochastic depth and network dropout draw the same values when a checkpoint recomputes."""
    model = make_stack()
    strategy = {"kind": "residual_add", "stochastic_depth": 0.5, "stochastic_depth_mode": depth_mode}
    config = {
        "a": {"target": "blocks.*.mix", "insertion": insertion, "network": bottleneck(dropout=0.3), "strategy": strategy},
        "b": {"target": "blocks.*.fc", "insertion": "parallel", "network": lora(dropout=0.3), "strategy": strategy},
    }
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    x = torch.randn(8, 5, requires_grad=True)

    expected = gradients(model, x, seed=3)
    other_seed = gradients(model, x, seed=4)
    model.checkpoint_mode = mode
    found = gradients(model, x, seed=3)

    assert any(not torch.equal(other_seed[name], grad) for name, grad in expected.items()), "the draws had no effect"
    assert_same_gradients(found, expected)


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("insertion", ["output", "input", "parallel"])
def test_checkpoint_l2_counted_once(insertion: str, mode: str) -> None:
    """The l2_lambda term of a checkpointed block is recorded in the forward only, not again in the recomputation."""
    model = make_stack()
    strategy = {"kind": "residual_add", "l2_lambda": 0.5}
    config = {"a": {"target": "blocks.*.mix", "insertion": insertion, "network": lora(), "strategy": strategy}}
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    x = torch.randn(4, 5, requires_grad=True)

    gradients(model, x)
    expected = adapter_set.auxiliary_loss()
    model.checkpoint_mode = mode
    gradients(model, x)
    found = adapter_set.auxiliary_loss()

    assert expected.item() > 0
    assert torch.allclose(found, expected, rtol=1e-6)


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_checkpoint_leaves_no_call_state(mode: str) -> None:
    """After a checkpointed forward and backward no parallel per-call entry is left, and the next call is unchanged."""
    model = make_stack()
    config = {"a": {"target": "blocks.*.mix", "insertion": "parallel", "network": lora()}}
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    x = torch.randn(4, 5, requires_grad=True)
    expected = model(x).detach()

    model.checkpoint_mode = mode
    for _ in range(2):
        gradients(model, x)
    model.checkpoint_mode = "off"
    after = model(x).detach()

    for site in adapter_set.sites:
        assert site._stack() == [], f"per-call entries left at {site.path!r}"
    assert torch.allclose(after, expected, atol=1e-6)


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
def test_checkpoint_frozen_input_grads(mode: str) -> None:
    """Adapters in a checkpointed block whose input needs no grad get gradients, or a warning names the fix."""
    model = make_stack()
    model.checkpoint_mode = mode
    config = {"a": {"target": "blocks.*.fc", "insertion": "parallel", "network": lora()}}
    # The base is frozen, so the embedding output that enters the checkpoint does not require grad.
    adapter_set = hookadapt.attach(model, config, freeze_base=True, train_modules=["head"])
    randomize(adapter_set)
    x = torch.randn(4, 5)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).pow(2).sum().backward()

    grads = adapter_gradients(adapter_set)
    trained = all(grad is not None and grad.abs().sum() > 0 for grad in grads.values())
    messages = [str(warning.message) for warning in caught]
    advised = any("use_reentrant" in message for message in messages)
    assert trained or advised, f"adapters got no gradients and no warning names use_reentrant; warnings: {messages}"


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("insertion", ["output", "parallel"])
def test_checkpoint_backward_after_detach(insertion: str, mode: str) -> None:
    """Leaving the with block before backward through a checkpoint raises a hookadapt error, at the exit or in backward."""
    model = make_stack()
    model.checkpoint_mode = mode
    config = {"a": {"target": "blocks.*.mix", "insertion": insertion, "network": lora()}}
    x = torch.randn(4, 5, requires_grad=True)

    with pytest.raises(hookadapt.HookadaptError):
        with hookadapt.adapters(model, config) as adapter_set:
            randomize(adapter_set)
            loss = model(x).pow(2).sum()
        loss.backward()


DETACH_CASES = {
    "output-last": {"a": {"target": "blocks.*.mix", "network": bottleneck()}},
    "parallel-builtin": {"a": {"target": "blocks.*.fc", "insertion": "parallel", "network": lora()}},
    "parallel-custom": {"a": {"target": "blocks.*.mix", "insertion": "parallel", "network": lora()}},
    "input-first": {"a": {"target": "blocks.*.norm", "insertion": "input", "network": lora()}},
    "scale-multiply": {"a": {"target": "blocks.*.mix", "network": "scale", "strategy": "multiply"}},
}


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("case", list(DETACH_CASES))
def test_checkpoint_detach_after_backward(case: str, mode: str) -> None:
    """After backward has recomputed every checkpointed block, the with block detaches and restores the model."""
    model = make_stack()
    model.checkpoint_mode = mode
    before = snapshot(model)
    x = torch.randn(4, 5, requires_grad=True)

    with hookadapt.adapters(model, DETACH_CASES[case]) as adapter_set:
        randomize(adapter_set)
        for _ in range(2):
            model(x).pow(2).sum().backward()

    assert_restored(model, before)


def enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    """Turn on transformers' activation checkpointing with the given torch.utils.checkpoint mode."""
    options = {"use_reentrant": use_reentrant}
    # In transformers 5.25, gradient_checkpointing_enable is a deprecated alias of this method.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


MINILM_CONFIG = {
    "bottleneck": {"target": "encoder.layer.*.output", "network": bottleneck(dim=8)},
    "lora_qv": {
        "target": r"re:encoder\.layer\.\d+\.attention\.self\.(query|value)",
        "insertion": "parallel",
        "network": lora(rank=4, alpha=8),
    },
}


def short_batch(batch: dict[str, torch.Tensor], rows: int = 4, tokens: int = 32) -> dict[str, torch.Tensor]:
    """Return the first ``rows`` snippets cut to ``tokens`` tokens, to keep MiniLM runs short."""
    return {key: value[:rows, :tokens] for key, value in batch.items()}


def minilm_gradients(model: nn.Module, batch: dict[str, torch.Tensor], adapter_set: hookadapt.AdapterSet) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    # MiniLM's dropout is on in training mode, so a fixed seed gives both runs the same masks.
    torch.manual_seed(5)
    model(**batch).last_hidden_state.pow(2).mean().backward()
    return adapter_gradients(adapter_set)


@pytest.mark.slow
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_minilm_checkpointing_gradients(minilm: nn.Module, review_batch: dict[str, torch.Tensor], use_reentrant: bool) -> None:
    """transformers' activation checkpointing on MiniLM gives linear and lora adapters the gradients of a plain run."""
    minilm.train()
    adapter_set = hookadapt.attach(minilm, MINILM_CONFIG, freeze_base=True)
    randomize(adapter_set)
    batch = short_batch(review_batch)

    expected = minilm_gradients(minilm, batch, adapter_set)
    enable_checkpointing(minilm, use_reentrant)
    found = minilm_gradients(minilm, batch, adapter_set)

    for key, grad in expected.items():
        assert grad is not None, f"{key} has no gradient without checkpointing"
        assert grad.abs().sum() > 0, f"{key} has a zero gradient without checkpointing"
        assert found[key] is not None, f"{key} has no gradient with checkpointing"
        assert torch.allclose(found[key], grad, rtol=1e-4, atol=1e-7), f"the gradient of {key} differs"


# Compilers.


def compile_toy(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, FEATURES), Mixer(), nn.Linear(FEATURES, 4))


COMPILE_CASES = {
    "linear-residual_add": {"a": {"target": "0", "network": bottleneck()}},
    "lora-parallel-linear": {"a": {"target": "2", "insertion": "parallel", "network": lora()}},
    "lora-parallel-custom": {"a": {"target": "1", "insertion": "parallel", "network": lora()}},
    "scale-multiply": {"a": {"target": "2", "network": "scale", "strategy": "multiply"}},
    "lora-input-scaled_add": {
        "a": {"target": "2", "insertion": "input", "network": lora(), "strategy": {"kind": "scaled_add", "scale": 0.5}}
    },
    "linear-return_result": {"a": {"target": "0", "network": bottleneck(), "strategy": "return_result"}},
}


def forward_backward(call: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return ``call(x)`` and the gradients of ``model``'s parameters after backward from its squared sum."""
    model.zero_grad(set_to_none=True)
    output = call(x)
    output.pow(2).sum().backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return output.detach(), grads


def assert_compiled_matches(config: dict[str, Any], backend: str) -> None:
    torch._dynamo.reset()
    model = compile_toy()
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    x = torch.randn(3, 5)
    expected, expected_grads = forward_backward(model, model, x)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    output, grads = forward_backward(compiled, model, x)
    torch._dynamo.reset()

    assert torch.allclose(output, expected, rtol=1e-5, atol=1e-5)
    assert sorted(grads) == sorted(expected_grads), "different parameters received gradients"
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-5), f"the gradient of {name} differs"


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_eager_backend(case: str) -> None:
    """torch.compile(fullgraph=True) with the eager backend matches eager outputs and gradients."""
    assert_compiled_matches(COMPILE_CASES[case], "eager")


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler on CPU")
def test_compile_inductor_backend() -> None:
    """torch.compile(fullgraph=True) with inductor matches eager for output, parallel and multiply adapters at once."""
    config = {
        "bottleneck": {"target": "0", "network": bottleneck()},
        "lora": {"target": "2", "insertion": "parallel", "network": lora()},
        "ia3": {"target": "2", "network": "scale", "strategy": "multiply"},
    }
    assert_compiled_matches(config, "inductor")


STALE_CONFIG = {
    "bottleneck": {"target": "0", "network": bottleneck()},
    "lora": {"target": "2", "insertion": "parallel", "network": lora()},
}


def compiled_toy() -> tuple[nn.Sequential, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    torch._dynamo.reset()
    model = compile_toy().eval()
    return model, torch.compile(model, backend="eager", fullgraph=True), torch.randn(3, 5)


@torch.no_grad()
def test_compiled_sees_attach() -> None:
    """Adapters attached after a compiled model ran apply on its next call."""
    model, compiled, x = compiled_toy()
    base = compiled(x)
    adapter_set = hookadapt.attach(model, STALE_CONFIG)
    randomize(adapter_set)
    expected = model(x)

    assert not torch.allclose(expected, base, atol=1e-6), "the adapters do not change the output"
    assert torch.allclose(compiled(x), expected, atol=1e-6)


@torch.no_grad()
def test_compiled_sees_detach() -> None:
    """Detaching after a compiled model ran gives the base output on its next call."""
    model, compiled, x = compiled_toy()
    base = model(x)
    adapter_set = hookadapt.attach(model, STALE_CONFIG)
    randomize(adapter_set)
    adapted = compiled(x)
    adapter_set.detach()

    assert not torch.allclose(adapted, base, atol=1e-6), "the adapters do not change the output"
    assert torch.allclose(compiled(x), base, atol=1e-6)


@torch.no_grad()
def test_compiled_sees_disable() -> None:
    """Disabling an adapter after a compiled model ran takes effect on its next call."""
    model, compiled, x = compiled_toy()
    adapter_set = hookadapt.attach(model, STALE_CONFIG)
    randomize(adapter_set)
    adapted = compiled(x)
    adapter_set.disable("lora")
    expected = model(x)

    assert not torch.allclose(adapted, expected, atol=1e-6), "disabling does not change the output"
    assert torch.allclose(compiled(x), expected, atol=1e-6)


@torch.no_grad()
def test_compiled_sees_enable() -> None:
    """Enabling an adapter after a compiled model ran without it takes effect on its next call."""
    model, compiled, x = compiled_toy()
    adapter_set = hookadapt.attach(model, STALE_CONFIG)
    randomize(adapter_set)
    adapter_set.disable("bottleneck")
    before = compiled(x)
    adapter_set.enable("bottleneck")
    expected = model(x)

    assert not torch.allclose(before, expected, atol=1e-6), "enabling does not change the output"
    assert torch.allclose(compiled(x), expected, atol=1e-6)


MERGE_CONFIGS = {
    "alone": STALE_CONFIG,
    # The later adapter keeps the site's forward hook running after the merge.
    "before-other": {
        "lora": {"target": "2", "insertion": "parallel", "network": lora()},
        "bottleneck": {"target": "2", "network": bottleneck()},
    },
}


@torch.no_grad()
@pytest.mark.parametrize("case", list(MERGE_CONFIGS))
def test_compiled_sees_merge(case: str) -> None:
    """Merging LoRA into the host after a compiled model ran applies it once, not twice."""
    model, compiled, x = compiled_toy()
    adapter_set = hookadapt.attach(model, MERGE_CONFIGS[case])
    randomize(adapter_set)
    expected = model(x)
    with adapter_set.disabled("lora"):
        without_lora = model(x)
    compiled(x)
    adapter_set.merge("lora")

    assert not torch.allclose(without_lora, expected, atol=1e-5), "LoRA does not change the output"
    assert torch.allclose(compiled(x), expected, atol=1e-5)


def fx_trace(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.fx.symbolic_trace(model)


def jit_trace(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        # torch 2.13 marks torch.jit.trace and torch.jit.script as deprecated.
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, (x,))


def jit_script(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model)


def export(model: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.export.export(model, (x,)).module()


# Each tracer with the word that a hookadapt error about it must contain.
TRACERS = {
    "fx": (fx_trace, "fx"),
    "jit_trace": (jit_trace, "trace"),
    "jit_script": (jit_script, "script"),
    "export": (export, "export"),
}
def plain_sequential() -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.ReLU(), nn.Linear(FEATURES, FEATURES))


# Each case is a model factory and a config. A bare nn.Sequential root as host has no
# module that can hold the adapters, so they stay outside the module tree.
TRACED_SITES = {
    "leaf-parallel": (Pipeline, {"a": {"target": "head", "insertion": "parallel", "network": lora()}}),
    "leaf-input": (Pipeline, {"a": {"target": "head", "insertion": "input", "network": lora()}}),
    "composite-output": (Pipeline, {"a": {"target": "block", "network": bottleneck()}}),
    "root-output": (Pipeline, {"a": {"target": "", "network": bottleneck()}}),
    "container-root": (plain_sequential, {"a": {"target": "", "network": bottleneck()}}),
}


@pytest.mark.parametrize("site", list(TRACED_SITES))
@pytest.mark.parametrize("tracer", list(TRACERS))
def test_tracer_keeps_or_rejects(tracer: str, site: str) -> None:
    """A tracer either keeps the adapters (output equals the adapted eager output) or raises a hookadapt error naming it."""
    torch.manual_seed(0)
    make_model, config = TRACED_SITES[site]
    model = make_model().eval()
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    x = torch.randn(3, FEATURES)
    with torch.no_grad():
        expected = model(x)
    trace, word = TRACERS[tracer]

    try:
        traced = trace(model, x)
    except hookadapt.HookadaptError as err:
        assert re.search(word, str(err), re.IGNORECASE), f"the error does not name the tracer: {err}"
        return
    with torch.no_grad():
        output = traced(x)
    assert torch.allclose(output, expected, atol=1e-6), "the traced model dropped or changed the adapters"


# Shared and re-entrant hosts.


class Thrice(nn.Module):
    """Call one layer three times in a forward, on three different inputs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.layer(x)
        second = self.layer(first * 2)
        third = self.layer(x + 1)
        return first + second * third


@pytest.mark.parametrize("layer", ["linear", "mixer"])
def test_shared_host_each_call_input(layer: str) -> None:
    """A parallel adapter on a host called three times reads each call's own input, in outputs and gradients."""
    torch.manual_seed(0)
    host = nn.Linear(FEATURES, FEATURES) if layer == "linear" else Mixer()
    model = Thrice(host)
    adapter_set = hookadapt.attach(model, {"a": {"target": "layer", "insertion": "parallel", "network": lora()}})
    randomize(adapter_set)
    network = adapter_set.adapters["a"]["layer"].network
    x = torch.randn(4, FEATURES)

    def by_hand(value: torch.Tensor) -> torch.Tensor:
        return host.forward(value) + network(value)

    output = model(x)
    grads = torch.autograd.grad(output.sum(), list(network.parameters()))
    first = by_hand(x)
    expected = first + by_hand(first * 2) * by_hand(x + 1)
    expected_grads = torch.autograd.grad(expected.sum(), list(network.parameters()))

    assert torch.allclose(output, expected, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-5)


class Aliased(nn.Module):
    """One Linear reachable under two attribute names, called once under each."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(FEATURES, FEATURES)
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def aliased_by_hand(model: Aliased, adapter_set: hookadapt.AdapterSet, x: torch.Tensor) -> torch.Tensor:
    """Return the output with the adapter applied once per call of the shared Linear."""
    (adapter,) = adapter_set.all_adapters()
    return adapter(model.first.forward(torch.relu(adapter(model.first.forward(x)))))


@pytest.mark.parametrize("target", [["first", "second"], "*"], ids=["both-paths", "glob"])
def test_aliased_module_one_site(target: str | list[str]) -> None:
    """A module matched under two paths gets one site, so each call applies the adapter once."""
    torch.manual_seed(0)
    model = Aliased()
    adapter_set = hookadapt.attach(model, {"a": {"target": target, "network": bottleneck()}})
    randomize(adapter_set)
    x = torch.randn(4, FEATURES)
    with torch.no_grad():
        output = model(x)
        expected = aliased_by_hand(model, adapter_set, x)

    assert len(adapter_set.sites) == 1
    assert len(model.first._forward_hooks) == 1
    assert torch.allclose(output, expected, atol=1e-6)


def test_aliased_module_second_path() -> None:
    """Targeting a module by its second path attaches one site to it, as get_submodule finds it there."""
    torch.manual_seed(0)
    model = Aliased()
    adapter_set = hookadapt.attach(model, {"a": {"target": "second", "network": bottleneck()}})
    randomize(adapter_set)
    x = torch.randn(4, FEATURES)
    with torch.no_grad():
        output = model(x)
        expected = aliased_by_hand(model, adapter_set, x)

    assert len(adapter_set.sites) == 1
    assert torch.allclose(output, expected, atol=1e-6)


class Repeat(nn.Module):
    """Apply one child three times in a loop, each time with a residual connection."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = FEATURES
        self.out_features = FEATURES
        self.step = Mixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = x + self.step(x)
        return x


def test_repeated_child_nested_sites() -> None:
    """A host that calls its child in a loop, with adapters on both, matches a hand-computed reference."""
    torch.manual_seed(0)
    model = nn.Sequential(Repeat())
    config = {
        "outer": {"target": "0", "insertion": "parallel", "network": lora()},
        "inner": {"target": "0.step", "insertion": "parallel", "network": lora()},
        "after": {"target": "0.step", "network": bottleneck()},
    }
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    outer = adapter_set.adapters["outer"]["0"].network
    inner = adapter_set.adapters["inner"]["0.step"].network
    after = adapter_set.adapters["after"]["0.step"]
    x = torch.randn(4, FEATURES)

    def step(value: torch.Tensor) -> torch.Tensor:
        return after(model[0].step.forward(value) + inner(value))

    expected = x
    for _ in range(3):
        expected = expected + step(expected)
    expected = expected + outer(x)
    output = model(x)

    assert torch.allclose(output, expected, atol=1e-5)


class Recursive(nn.Module):
    """A module whose forward calls itself on a changed input until ``depth`` reaches zero."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = FEATURES
        self.out_features = FEATURES
        self.leaf = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor, depth: int = 2) -> torch.Tensor:
        if depth == 0:
            return self.leaf(x)
        return self(torch.tanh(x), depth=depth - 1) * 0.5 + self.leaf(x)


def test_recursive_host_gradients() -> None:
    """A recursive host with input, parallel and output adapters matches a hand-computed reference, gradients included."""
    torch.manual_seed(0)
    model = nn.Sequential(Recursive())
    config = {
        "before": {"target": "0", "insertion": "input", "network": bottleneck()},
        "side": {"target": "0", "insertion": "parallel", "network": lora()},
        "leaf": {"target": "0.leaf", "network": bottleneck()},
    }
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    before = adapter_set.adapters["before"]["0"]
    side = adapter_set.adapters["side"]["0"].network
    leaf = adapter_set.adapters["leaf"]["0.leaf"]
    host = model[0]
    parameters = list(adapter_set.parameters())
    x = torch.randn(4, FEATURES)

    def by_hand(value: torch.Tensor, depth: int = 2) -> torch.Tensor:
        # The pre-hook changes the input before the host and the parallel network read it.
        value = before(value)
        if depth == 0:
            result = leaf(host.leaf.forward(value))
        else:
            result = by_hand(torch.tanh(value), depth - 1) * 0.5 + leaf(host.leaf.forward(value))
        return result + side(value)

    output = model(x)
    grads = torch.autograd.grad(output.sum(), parameters)
    expected = by_hand(x)
    expected_grads = torch.autograd.grad(expected.sum(), parameters)

    assert torch.allclose(output, expected, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-5)


# Threads.

THREADS = 8


def thread_toy() -> tuple[nn.Sequential, hookadapt.AdapterSet]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, FEATURES), Mixer(), nn.Linear(FEATURES, 4))
    config = {
        "bottleneck": {"target": "0", "network": bottleneck()},
        "custom": {"target": "1", "insertion": "parallel", "network": lora()},
        "builtin": {"target": "2", "insertion": "parallel", "network": lora()},
        "before": {"target": "2", "insertion": "input", "network": lora()},
    }
    adapter_set = hookadapt.attach(model, config)
    randomize(adapter_set)
    return model.eval(), adapter_set


def test_threads_match_serial() -> None:
    """Eight threads running one attached model in eval mode give the serial outputs bit for bit."""
    model, adapter_set = thread_toy()
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1 + index % 4, 5, generator=generator) for index in range(64)]

    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x).detach()

    serial = [run(x) for x in inputs]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        rounds = [list(pool.map(run, inputs)) for _ in range(10)]

    for outputs in rounds:
        for index, (output, expected) in enumerate(zip(outputs, serial)):
            assert torch.equal(output, expected), f"input {index} gave a different output in a thread"
    for site in adapter_set.sites:
        assert site._stack() == [], f"per-call entries left at {site.path!r}"


class BrokenMixer(Mixer):
    """A Mixer whose forward has a torch.compile graph break between its two steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = x @ self.weight
        torch._dynamo.graph_break()
        return torch.tanh(product)


def test_compiled_threads_match_serial() -> None:
    """Eight threads running one compiled model, with a graph break inside a parallel adapter's host, match serial eager outputs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, FEATURES), BrokenMixer(), nn.Linear(FEATURES, 4)).eval()
    adapter_set = hookadapt.attach(model, {"a": {"target": "1", "insertion": "parallel", "network": lora()}})
    randomize(adapter_set)
    compiled = torch.compile(model, backend="eager")
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 5, generator=generator) for _ in range(32)]

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        # Grad mode is per thread, so each worker turns it off itself.
        return compiled(x)

    with torch.no_grad():
        serial = [model(x) for x in inputs]
    run(inputs[0])
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        rounds = [list(pool.map(run, inputs)) for _ in range(4)]
    torch._dynamo.reset()

    for outputs in rounds:
        for index, (output, expected) in enumerate(zip(outputs, serial)):
            assert torch.allclose(output, expected, atol=1e-6), f"input {index} gave a different output in a thread"


@pytest.mark.slow
def test_minilm_threads_match_serial(minilm: nn.Module, review_batch: dict[str, torch.Tensor]) -> None:
    """Eight threads running attached MiniLM on different snippets give the serial outputs bit for bit."""
    adapter_set = hookadapt.attach(minilm, MINILM_CONFIG)
    randomize(adapter_set)
    batch = short_batch(review_batch, rows=THREADS)
    snippets = [{key: value[index : index + 1] for key, value in batch.items()} for index in range(THREADS)]

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden_states(minilm, batch)

    serial = [run(batch) for batch in snippets]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        rounds = [list(pool.map(run, snippets)) for _ in range(2)]

    for outputs in rounds:
        for index, (output, expected) in enumerate(zip(outputs, serial)):
            assert torch.equal(output, expected), f"snippet {index} gave a different output in a thread"


# Copies.

COPY_CONFIG = {
    "bottleneck": {"target": "0", "network": bottleneck()},
    "custom": {"target": "1", "insertion": "parallel", "network": lora()},
    "builtin": {"target": "2", "insertion": "parallel", "network": lora()},
}


def copy_toy() -> tuple[nn.Sequential, hookadapt.AdapterSet, torch.Tensor, torch.Tensor]:
    """Return an attached toy model, its adapter set, an input and the model's output before attaching."""
    model = compile_toy().eval()
    x = torch.randn(3, 5)
    with torch.no_grad():
        base = model(x)
    adapter_set = hookadapt.attach(model, COPY_CONFIG)
    randomize(adapter_set)
    return model, adapter_set, x, base


def shift_adapters(adapter_set: hookadapt.AdapterSet) -> None:
    with torch.no_grad():
        for param in adapter_set.parameters():
            param.add_(0.5)


@torch.no_grad()
def test_deepcopy_adapters_own_weights() -> None:
    """Changing the copy's adapter weights leaves the original's output alone, and the other way round."""
    model, adapter_set, x, _ = copy_toy()
    expected = model(x)
    clone = copy.deepcopy(model)
    (clone_set,) = hookadapt.attached(clone)

    shift_adapters(clone_set)
    original_after_copy_change = model(x)
    clone_output = clone(x)
    shift_adapters(adapter_set)
    clone_after_original_change = clone(x)

    assert torch.equal(original_after_copy_change, expected)
    assert not torch.equal(clone_output, expected)
    assert torch.equal(clone_after_original_change, clone_output)


def test_deepcopy_parameters_disjoint() -> None:
    """The copy's adapter set lists the copy's own parameters, and they are in the copy's module tree."""
    model, adapter_set, _, _ = copy_toy()
    clone = copy.deepcopy(model)
    (clone_set,) = hookadapt.attached(clone)
    original_ids = {id(param) for param in adapter_set.parameters()}
    clone_ids = {id(param) for param in clone_set.parameters()}
    clone_tree_ids = {id(param) for param in clone.parameters()}

    assert clone_set is not adapter_set
    assert clone_set.model is clone
    assert not original_ids & clone_ids
    assert clone_ids <= clone_tree_ids


@torch.no_grad()
def test_deepcopy_survives_original_detach() -> None:
    """Detaching the original leaves the copy adapted, and the copy then detaches to the base output."""
    model, adapter_set, x, base = copy_toy()
    expected = model(x)
    clone = copy.deepcopy(model)

    adapter_set.detach()
    original = model(x)
    clone_output = clone(x)
    clone_sets = hookadapt.attached(clone)
    clone_sets[0].detach()
    clone_base = clone(x)

    assert torch.equal(original, base)
    assert torch.equal(clone_output, expected)
    assert len(clone_sets) == 1
    assert torch.equal(clone_base, base)
    assert hookadapt.attached(clone) == []


@torch.no_grad()
def test_deepcopy_detach_leaves_original() -> None:
    """Detaching the copy leaves the original adapted and attached."""
    model, adapter_set, x, _ = copy_toy()
    expected = model(x)
    clone = copy.deepcopy(model)
    hookadapt.detach_all(clone)

    assert torch.equal(model(x), expected)
    assert hookadapt.attached(model) == [adapter_set]


def torch_save_load(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def pickle_load(model: nn.Module) -> nn.Module:
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("round_trip", [torch_save_load, pickle_load], ids=["torch.save", "pickle"])
def test_serialized_model_works(round_trip: Callable[[nn.Module], nn.Module]) -> None:
    """A model saved whole while attached loads with working adapters that train and detach."""
    model, _, x, base = copy_toy()
    with torch.no_grad():
        expected = model(x)
    loaded = round_trip(model)
    loaded_sets = hookadapt.attached(loaded)

    with torch.no_grad():
        output = loaded(x)
    loaded(x).pow(2).sum().backward()
    grads = adapter_gradients(loaded_sets[0])
    loaded_sets[0].detach()
    with torch.no_grad():
        loaded_base = loaded(x)

    assert len(loaded_sets) == 1
    assert torch.equal(output, expected)
    assert all(grad is not None for grad in grads.values()), "a loaded adapter received no gradient"
    assert torch.equal(loaded_base, base)


@pytest.mark.slow
def test_minilm_deepcopy_own_adapters(minilm: nn.Module, review_batch: dict[str, torch.Tensor]) -> None:
    """A deep copy of attached MiniLM computes the same output and keeps its own adapters."""
    adapter_set = hookadapt.attach(minilm, MINILM_CONFIG)
    randomize(adapter_set)
    review_batch = short_batch(review_batch)
    expected = hidden_states(minilm, review_batch)
    clone = copy.deepcopy(minilm)
    clone_output = hidden_states(clone, review_batch)

    (clone_set,) = hookadapt.attached(clone)
    shift_adapters(clone_set)
    clone_shifted = hidden_states(clone, review_batch)
    original_after = hidden_states(minilm, review_batch)
    adapter_set.detach()
    clone_after_detach = hidden_states(clone, review_batch)

    assert torch.equal(clone_output, expected)
    assert not torch.equal(clone_shifted, expected)
    assert torch.equal(original_after, expected)
    assert torch.equal(clone_after_detach, clone_shifted)
