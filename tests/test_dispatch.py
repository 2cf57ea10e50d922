"""The dispatch plan: parked hooks, the fused LoRA step and parallel networks in the forward hook."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import hookadapt
from hookadapt.sites import preserves_input


def lora(target: str, insertion: str = "parallel", **strategy: Any) -> dict[str, Any]:
    return {
        "target": target,
        "network": {"kind": "lora", "rank": 2, "alpha": 4},
        "strategy": {"kind": "residual_add", **strategy},
        "insertion": insertion,
    }


def bottleneck(target: str) -> dict[str, Any]:
    return {"target": target, "network": {"kind": "linear", "dim": 3}, "insertion": "output"}


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))


def randomize(adapter_set: hookadapt.AdapterSet, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_set.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))


def hook_count(module: nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


class TestParking:
    def test_disabled_site_has_no_hooks(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": bottleneck("2")})
        adapter_set.disable()
        assert hook_count(model[0]) == 0
        assert hook_count(model[2]) == 0
        assert len(model[2]._forward_hooks_with_kwargs) == 0

    def test_disabled_equals_plain(self) -> None:
        model = toy()
        x = torch.randn(3, 6)
        expected = model(x)
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": bottleneck("2")})
        randomize(adapter_set)
        adapter_set.disable()
        assert torch.equal(model(x), expected)

    def test_enable_restores_hooks(self) -> None:
        model = toy()
        x = torch.randn(3, 6)
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": bottleneck("2")})
        randomize(adapter_set)
        expected = model(x)
        adapter_set.disable()
        adapter_set.enable()
        assert hook_count(model[2]) == 1
        assert torch.equal(model(x), expected)

    def test_one_of_two_disabled_keeps_hook(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("2"), "b": bottleneck("2")})
        adapter_set.disable("a")
        assert hook_count(model[2]) == 1

    def test_merged_site_has_no_hooks(self) -> None:
        model = toy()
        x = torch.randn(3, 6)
        adapter_set = hookadapt.attach(model, {"a": lora("0")})
        randomize(adapter_set)
        expected = model(x)
        adapter_set.merge()
        assert hook_count(model[0]) == 0
        torch.testing.assert_close(model(x), expected)
        adapter_set.unmerge()
        assert hook_count(model[0]) == 1

    def test_unpark_keeps_set_order(self) -> None:
        # The inner set is attached first, so its hook runs first; that order must survive a toggle.
        model = toy()
        x = torch.randn(3, 6)
        inner = hookadapt.attach(model, {"inner": bottleneck("2")})
        outer = hookadapt.attach(model, {"outer": bottleneck("2")})
        randomize(inner, seed=4)
        randomize(outer, seed=5)
        expected = model(x)
        first = list(model[2]._forward_hooks)
        inner.disable()
        assert len(model[2]._forward_hooks) == 1
        inner.enable()
        assert list(model[2]._forward_hooks) == first
        assert torch.equal(model(x), expected)

    def test_unpark_behind_prepended_hook(self) -> None:
        # A hook prepended while the adapter was disabled runs first, as it would have if the
        # adapter had stayed enabled.
        model = nn.Sequential(nn.Linear(3, 3))
        x = torch.ones(1, 3)
        config = {"a": {"target": "0", "network": {"kind": "scale", "init": 2.0}, "strategy": "multiply", "insertion": "input"}}
        adapter_set = hookadapt.attach(model, config)
        adapter_set.disable()
        model[0].register_forward_pre_hook(lambda module, args: (args[0] + 1,), prepend=True)
        adapter_set.enable()
        torch.testing.assert_close(model(x), model[0].forward((x + 1) * 2))

    def test_unpark_keeps_kwargs_flag(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"b": bottleneck("2")})
        (key,) = model[2]._forward_hooks
        adapter_set.disable()
        adapter_set.enable()
        assert key in model[2]._forward_hooks_with_kwargs

    def test_detach_while_disabled_clean(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": bottleneck("2")})
        adapter_set.disable()
        adapter_set.detach()
        adapter_set.enable()
        assert hook_count(model[0]) == 0
        assert hook_count(model[2]) == 0

    def test_disabled_block_restores_hooks(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0")})
        with adapter_set.disabled():
            assert hook_count(model[0]) == 0
        assert hook_count(model[0]) == 1


class TestParallelInForwardHook:
    def test_linear_preserves_input(self) -> None:
        assert preserves_input(nn.Linear(2, 2))

    def test_relu_not_known(self) -> None:
        assert not preserves_input(nn.ReLU())

    def test_instance_forward_not_known(self) -> None:
        layer = nn.Linear(2, 2)
        layer.forward = lambda x: x
        assert not preserves_input(layer)

    def test_linear_lora_has_no_pre_hook(self) -> None:
        model = toy()
        hookadapt.attach(model, {"a": lora("0")})
        assert len(model[0]._forward_pre_hooks) == 0
        assert len(model[0]._forward_hooks_always_called) == 0

    def test_unknown_host_keeps_pre_hook(self) -> None:
        model = toy()
        hookadapt.attach(model, {"a": {**lora("1"), "network": {"kind": "lora", "rank": 2, "in_features": 6, "out_features": 6}}})
        assert len(model[1]._forward_pre_hooks) == 1


def unfused_reference(adapter_set: hookadapt.AdapterSet, x: torch.Tensor) -> torch.Tensor:
    """Run the model with every adapter's fused step turned off."""
    adapters = list(adapter_set.all_adapters())
    for adapter in adapters:
        adapter.fusable = False
        adapter._site.refresh()
    try:
        return adapter_set.model(x)
    finally:
        for adapter in adapters:
            adapter.fusable = True
            adapter._site.refresh()


class TestFusedLoRA:
    @pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6), (6,)], ids=["2d", "3d", "1d"])
    def test_fused_matches_general_path(self, shape: tuple[int, ...]) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": lora("2")})
        randomize(adapter_set)
        x = torch.randn(shape)
        torch.testing.assert_close(model(x), unfused_reference(adapter_set, x), rtol=1e-6, atol=1e-6)

    def test_fused_gradients_match(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0")})
        randomize(adapter_set)
        x = torch.randn(4, 6)
        model(x).square().sum().backward()
        fused = [param.grad.clone() for param in adapter_set.parameters()]
        adapter_set.model.zero_grad()
        for param in adapter_set.parameters():
            param.grad = None
        unfused_reference(adapter_set, x).square().sum().backward()
        for got, expected in zip(fused, (param.grad for param in adapter_set.parameters()), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    def test_stochastic_depth_takes_general_path(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0", stochastic_depth=1.0)})
        randomize(adapter_set)
        model.train()
        x = torch.randn(4, 6)
        # With every draw dropping the adapter, training output equals the base model's.
        with adapter_set.disabled():
            expected = model(x)
        assert torch.equal(model(x), expected)

    def test_l2_loss_still_counted(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0", l2_lambda=0.5)})
        randomize(adapter_set)
        model.train()
        model(torch.randn(4, 6))
        assert adapter_set.auxiliary_loss().item() > 0

    def test_float64_host_takes_general_path(self) -> None:
        model = toy().double()
        adapter_set = hookadapt.attach(model, {"a": lora("0")})
        randomize(adapter_set)
        x = torch.randn(4, 6, dtype=torch.float64)
        assert model(x).dtype == torch.float64

    def test_route_with_fused_adapters(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": lora("0")})
        randomize(adapter_set)
        x = torch.randn(2, 6)
        with adapter_set.route(["a", None]):
            routed = model(x)
        with adapter_set.disabled("b"):
            only_a = model(x[:1])
        with adapter_set.disabled():
            plain = model(x[1:])
        torch.testing.assert_close(routed[:1], only_a)
        torch.testing.assert_close(routed[1:], plain)

    def test_dropout_trains_fused(self) -> None:
        model = toy()
        config = {"a": {**lora("0"), "network": {"kind": "lora", "rank": 2, "dropout": 0.5}}}
        adapter_set = hookadapt.attach(model, config)
        randomize(adapter_set)
        model.train()
        x = torch.randn(4, 6)
        torch.manual_seed(7)
        fused = model(x)
        torch.manual_seed(7)
        torch.testing.assert_close(fused, unfused_reference(adapter_set, x))


class TestTracers:
    def test_fx_trace_raises(self) -> None:
        model = toy()
        hookadapt.attach(model, {"a": lora("0")})
        with pytest.raises(hookadapt.AttachError, match="symbolic_trace cannot trace"):
            torch.fx.symbolic_trace(model)

    def test_fx_after_detach_traces(self) -> None:
        model = toy()
        hookadapt.attach(model, {"a": lora("0")}).detach()
        x = torch.randn(2, 6)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))

    def test_jit_script_raises(self) -> None:
        model = toy()
        hookadapt.attach(model, {"a": lora("0")})
        with pytest.raises(hookadapt.AttachError, match="jit.script cannot compile"):
            torch.jit.script(model)

    def test_jit_trace_includes_adapters(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": bottleneck("2")})
        randomize(adapter_set)
        x = torch.randn(2, 6)
        with warnings.catch_warnings():
            # The shape checks become constants in the trace, which torch reports.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, x)
        assert torch.equal(traced(x), model(x))

    def test_export_includes_adapters(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": bottleneck("2")})
        randomize(adapter_set)
        x = torch.randn(2, 6)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x))


class Block(nn.Module):
    """A host whose forward is not a built-in one, so parallel networks run in the pre-hook."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inner(x))


class TestCompiled:
    def test_attach_after_compile_seen(self) -> None:
        model = toy()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        x = torch.randn(2, 6)
        compiled(x)
        adapter_set = hookadapt.attach(model, {"a": lora("0"), "b": bottleneck("2")})
        randomize(adapter_set)
        torch.testing.assert_close(compiled(x), model(x))
        adapter_set.disable("a")
        torch.testing.assert_close(compiled(x), model(x))
        adapter_set.detach()
        torch.testing.assert_close(compiled(x), model(x))

    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_pre_hook_path_fullgraph(self, mode: str) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(Block(), Block())
        size = {"in_features": 6, "out_features": 6}
        config = {
            "a": {**lora("0"), "network": {"kind": "lora", "rank": 2, **size}},
            "b": {"target": "1", "network": {"kind": "linear", "dim": 2, **size}, "insertion": "input"},
        }
        adapter_set = hookadapt.attach(model, config)
        randomize(adapter_set)
        getattr(model, mode)()
        x = torch.randn(2, 6)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))
        assert adapter_set.sites[0]._stack() == []
