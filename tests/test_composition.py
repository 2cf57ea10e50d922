"""Composing adapters: order at a site, enabling, strategies over several adapters, routing, merging and combining."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hookadapt
from conftest import HOOK_DICTS, assert_restored, hidden_states, randomize, snapshot

FEATURES = 6
BATCH = 5
ROUTE = ["a", "b", None, "c", "a"]
CUSTOM_KINDS = Path(__file__).resolve().parent.parent / "docs" / "custom_kinds.md"


class Toy(nn.Module):
    """Two hidden Linear layers, a Tanh and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(FEATURES, FEATURES)
        self.act = nn.Tanh()
        self.second = nn.Linear(FEATURES, FEATURES)
        self.head = nn.Linear(FEATURES, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.act(self.first(x))))


@pytest.fixture
def toy() -> Toy:
    """A seeded toy model in eval mode."""
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture
def x() -> torch.Tensor:
    """A seeded toy batch."""
    return torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(1))


def spec(target: Any, network: Any, strategy: Any = "residual_add", insertion: str = "output") -> dict[str, Any]:
    """Return one adapter spec as a dict."""
    return {"target": target, "insertion": insertion, "network": network, "strategy": strategy}


def scale_spec(strategy: Any, insertion: str = "output", target: str = "first") -> dict[str, Any]:
    """Return a `scale` adapter spec on ``target``."""
    return spec(target, "scale", strategy, insertion)


ADD = scale_spec({"kind": "scaled_add", "scale": 2.0})
ADD_VECTOR = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75, 1.5])
MUL_VECTOR = torch.tensor([2.0, 0.5, -1.0, 3.0, 1.25, -0.5])


def set_scales(adapter_set: hookadapt.AdapterSet, path: str = "first") -> None:
    """Give the ``add`` and ``mul`` scale vectors known values."""
    with torch.no_grad():
        adapter_set.adapters["add"][path].network.weight.copy_(ADD_VECTOR)
        adapter_set.adapters["mul"][path].network.weight.copy_(MUL_VECTOR)


def first_output(model: Toy, x: torch.Tensor) -> torch.Tensor:
    """Run ``model.first`` with its hooks and no gradient."""
    with torch.no_grad():
        return model.first(x)


def chained(base: torch.Tensor, order: list[str]) -> torch.Tensor:
    """Apply ``add`` (x + 2 a) and ``mul`` (x * m) to ``base`` in ``order``, by hand."""
    steps = {"add": lambda y: y + 2.0 * ADD_VECTOR, "mul": lambda y: y * MUL_VECTOR}
    for name in order:
        base = steps[name](base)
    return base


def order_config(order: list[str], mul_insertion: str) -> dict[str, Any]:
    """Return a config holding ``add`` and ``mul`` on ``first`` in ``order``."""
    specs = {"add": ADD, "mul": scale_spec("multiply", insertion=mul_insertion)}
    return {name: specs[name] for name in order}


ORDERS = [
    pytest.param(["add", "mul"], "output", id="add-mul-output"),
    pytest.param(["mul", "add"], "output", id="mul-add-output"),
    pytest.param(["add", "mul"], "parallel", id="add-mul-parallel"),
    pytest.param(["mul", "add"], "parallel", id="mul-add-parallel"),
]


class TestOrder:
    """Several adapters at one site run in the config's order."""

    @pytest.mark.parametrize(("order", "insertion"), ORDERS)
    def test_config_order_chains_results(self, toy: Toy, x: torch.Tensor, order: list[str], insertion: str) -> None:
        """Each strategy receives the previous adapter's result."""
        base = first_output(toy, x)
        with hookadapt.adapters(toy, order_config(order, insertion)) as adapter_set:
            set_scales(adapter_set)
            result = first_output(toy, x)
        torch.testing.assert_close(result, chained(base, order), rtol=0, atol=1e-6)

    @pytest.mark.parametrize(("order", "insertion"), ORDERS)
    def test_order_survives_reattach(self, toy: Toy, x: torch.Tensor, order: list[str], insertion: str) -> None:
        """Detaching and attaching the same config again keeps the order."""
        base = first_output(toy, x)
        hookadapt.attach(toy, order_config(order, insertion)).detach()
        with hookadapt.adapters(toy, order_config(order, insertion)) as adapter_set:
            set_scales(adapter_set)
            result = first_output(toy, x)
        torch.testing.assert_close(result, chained(base, order), rtol=0, atol=1e-6)

    @pytest.mark.parametrize(("order", "insertion"), ORDERS)
    def test_order_survives_save_load(
        self, toy: Toy, x: torch.Tensor, tmp_path: Path, order: list[str], insertion: str
    ) -> None:
        """A saved and loaded set keeps the config's order."""
        base = first_output(toy, x)
        path = tmp_path / "ordered.safetensors"
        with hookadapt.adapters(toy, order_config(order, insertion)) as adapter_set:
            set_scales(adapter_set)
            hookadapt.save_adapters(adapter_set, path)
        with hookadapt.load_adapters(toy, path) as loaded:
            names = loaded.names
            result = first_output(toy, x)
        assert names == order, f"the loaded set has order {names}"
        torch.testing.assert_close(result, chained(base, order), rtol=0, atol=1e-6)

    def test_nested_sets_stack(self, toy: Toy, x: torch.Tensor) -> None:
        """An inner set runs after the outer one, and its exit leaves the outer one working."""
        base = first_output(toy, x)
        with hookadapt.adapters(toy, {"add": ADD}) as outer:
            set_scale(outer, "add", ADD_VECTOR)
            with hookadapt.adapters(toy, {"mul": scale_spec("multiply")}) as inner:
                set_scale(inner, "mul", MUL_VECTOR)
                both = first_output(toy, x)
            outer_only = first_output(toy, x)
        torch.testing.assert_close(both, chained(base, ["add", "mul"]), rtol=0, atol=1e-6)
        torch.testing.assert_close(outer_only, chained(base, ["add"]), rtol=0, atol=1e-6)

    def test_out_of_order_exit_raises(self, toy: Toy) -> None:
        """Detaching the outer set while the inner one is attached raises AttachError."""
        outer = hookadapt.attach(toy, {"add": ADD})
        inner = hookadapt.attach(toy, {"mul": scale_spec("multiply")})
        try:
            with pytest.raises(hookadapt.AttachError, match="detach the later set first"):
                outer.__exit__(None, None, None)
            assert outer.is_attached, "the refused detach still detached the outer set"
        finally:
            inner.detach()
            outer.detach()


def set_scale(adapter_set: hookadapt.AdapterSet, name: str, vector: torch.Tensor, path: str = "first") -> None:
    """Give scale adapter ``name`` at ``path`` the values ``vector``."""
    with torch.no_grad():
        adapter_set.adapters[name][path].network.weight.copy_(vector)


# Enabling, disabling and trainable flags.

SWITCH_CONFIG = {
    "lora_a": spec("first", {"kind": "lora", "rank": 2}, insertion="parallel"),
    "lora_b": spec("second", {"kind": "lora", "rank": 2}, insertion="parallel"),
    "scale_c": scale_spec("multiply", target="second"),
}


def enabled_flags(adapter_set: hookadapt.AdapterSet) -> dict[str, bool]:
    """Return each adapter's enabled flag by name and site."""
    return {f"{adapter.name}@{adapter.path}": adapter.enabled for adapter in adapter_set.all_adapters()}


def by_name(adapter_set: hookadapt.AdapterSet) -> dict[str, bool]:
    """Return each adapter name's enabled flag (every site agrees)."""
    return {name: all(adapter.enabled for adapter in adapter_set.adapters[name].values()) for name in adapter_set.names}


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (("lora_a",), {"lora_a": False, "lora_b": True, "scale_c": True}),
        (("lora_*",), {"lora_a": False, "lora_b": False, "scale_c": True}),
        (("*_c", "lora_b"), {"lora_a": True, "lora_b": False, "scale_c": False}),
        ((), {"lora_a": False, "lora_b": False, "scale_c": False}),
    ],
    ids=["name", "glob", "glob-and-name", "all"],
)
class TestEnable:
    """enable and disable take names and globs."""

    def test_disable_selects_adapters(self, toy: Toy, patterns: tuple[str, ...], expected: dict[str, bool]) -> None:
        """disable turns off exactly the matched adapters."""
        with hookadapt.adapters(toy, SWITCH_CONFIG) as adapter_set:
            adapter_set.disable(*patterns)
            assert by_name(adapter_set) == expected, "disable chose the wrong adapters"

    def test_enable_selects_adapters(self, toy: Toy, patterns: tuple[str, ...], expected: dict[str, bool]) -> None:
        """enable turns on exactly the matched adapters."""
        with hookadapt.adapters(toy, SWITCH_CONFIG) as adapter_set:
            adapter_set.disable()
            adapter_set.enable(*patterns)
            flipped = {name: not flag for name, flag in expected.items()}
            assert by_name(adapter_set) == flipped, "enable chose the wrong adapters"


class TestSwitches:
    """Disabled adapters stop running, set_trainable changes adapters only, and disabled() restores flags."""

    def test_disabled_adapter_stops_running(self, toy: Toy, x: torch.Tensor) -> None:
        """With every adapter disabled the model returns its base output."""
        base = toy(x).detach()
        with hookadapt.adapters(toy, SWITCH_CONFIG) as adapter_set:
            randomize(adapter_set)
            adapter_set.disable("lora_*", "scale_c")
            assert torch.equal(toy(x).detach(), base), "a disabled adapter still changed the output"

    def test_unknown_pattern_raises(self, toy: Toy) -> None:
        """A pattern that matches no adapter raises ConfigError."""
        with hookadapt.adapters(toy, SWITCH_CONFIG) as adapter_set:
            with pytest.raises(hookadapt.ConfigError, match="no adapter in this set matches 'dora_\\*'"):
                adapter_set.disable("dora_*")

    def test_set_trainable_adapters_only(self, toy: Toy) -> None:
        """set_trainable changes adapters' requires_grad, not base parameters, train modules or enabled flags."""
        toy.first.bias.requires_grad_(False)
        with hookadapt.adapters(toy, SWITCH_CONFIG, train_modules=["head"]) as adapter_set:
            adapter_set.disable("lora_b")
            base_before = {name: param.requires_grad for name, param in toy.named_parameters() if "_hookadapt" not in name}
            flags_before = enabled_flags(adapter_set)
            adapter_set.set_trainable("lora_*")
            base_after = {name: param.requires_grad for name, param in toy.named_parameters() if "_hookadapt" not in name}
            trainable = {
                name: [param.requires_grad for adapter in adapter_set.adapters[name].values() for param in adapter.parameters()]
                for name in adapter_set.names
            }
            flags_after = enabled_flags(adapter_set)
        assert base_after == base_before, "set_trainable changed a base or train-module parameter"
        assert base_after["head.weight"], "the train module was frozen"
        assert all(trainable["lora_a"] + trainable["lora_b"]), "a chosen adapter is frozen"
        assert not any(trainable["scale_c"]), "an adapter that was not chosen is trainable"
        assert flags_after == flags_before, "set_trainable changed an enabled flag"

    def test_disabled_restores_state(self, toy: Toy) -> None:
        """disabled() puts each flag back, including one that was already off."""
        with hookadapt.adapters(toy, SWITCH_CONFIG) as adapter_set:
            adapter_set.disable("lora_b")
            before = enabled_flags(adapter_set)
            with adapter_set.disabled():
                inside = enabled_flags(adapter_set)
            after = enabled_flags(adapter_set)
        assert not any(inside.values()), "an adapter ran inside disabled()"
        assert after == before, "disabled() did not restore the flags"

    def test_disabled_restores_on_raise(self, toy: Toy) -> None:
        """disabled() restores the flags when its block raises."""
        with hookadapt.adapters(toy, SWITCH_CONFIG) as adapter_set:
            adapter_set.disable("scale_c")
            before = enabled_flags(adapter_set)
            with pytest.raises(RuntimeError, match="inside the block"):
                with adapter_set.disabled("lora_*"):
                    raise RuntimeError("raised inside the block")
            after = enabled_flags(adapter_set)
        assert after == before, "disabled() did not restore the flags after a raise"


# Strategies called directly, features last.

def seeded(*shape: int, seed: int = 2) -> torch.Tensor:
    """Return a seeded normal tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TestConcat:
    """Concatenation along the features with a projection, or along another dimension without."""

    def test_fresh_projection_is_identity(self) -> None:
        """A fresh projected concat returns x whatever the adapter's output."""
        inputs, out = seeded(2, 3, 4), seeded(2, 3, 4, seed=3)
        assert torch.equal(hookadapt.Concat(4)(inputs, out), inputs), "a fresh concat changed x"

    def test_set_projection_by_hand(self) -> None:
        """The result is the projection of [x, out]."""
        inputs, out, weight = seeded(2, 3, 4), seeded(2, 3, 4, seed=3), seeded(4, 8, seed=4)
        strategy = hookadapt.Concat(4)
        with torch.no_grad():
            strategy.projection.weight.copy_(weight)
        expected = torch.einsum("bsi,oi->bso", torch.cat([inputs, out], dim=-1), weight)
        torch.testing.assert_close(strategy(inputs, out), expected, rtol=0, atol=1e-6)

    @pytest.mark.parametrize(("dim", "shape"), [(0, (2, 4)), (1, (2, 3, 4))], ids=["batch", "sequence"])
    def test_other_dim_joins_unprojected(self, dim: int, shape: tuple[int, ...]) -> None:
        """Along another dimension the tensors are joined and nothing is projected."""
        inputs, out = seeded(*shape), seeded(*shape, seed=3)
        strategy = hookadapt.Concat(4, dim=dim, project=False)
        assert strategy.projection is None, "a concat along another dimension has a projection"
        assert torch.equal(strategy(inputs, out), torch.cat([inputs, out], dim=dim)), "the join is wrong"


class TestGated:
    """The gate starts closed and scales the adapter's output by tanh(gate)."""

    @pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per-channel"])
    def test_fresh_gate_is_closed(self, per_channel: bool) -> None:
        """A fresh gate returns x for any output."""
        inputs, out = seeded(3, 4), seeded(3, 4, seed=3) * 100
        assert torch.equal(hookadapt.Gated(4, per_channel=per_channel)(inputs, out), inputs), "a fresh gate is open"

    @pytest.mark.parametrize(
        ("per_channel", "gate"),
        [(False, torch.tensor(0.7)), (True, torch.tensor([0.5, -1.0, 2.0, 0.0]))],
        ids=["scalar", "per-channel"],
    )
    def test_set_gate_by_hand(self, per_channel: bool, gate: torch.Tensor) -> None:
        """With a hand-set gate the result is x + tanh(g) * out."""
        inputs, out = seeded(3, 4), seeded(3, 4, seed=3)
        strategy = hookadapt.Gated(4, per_channel=per_channel)
        with torch.no_grad():
            strategy.gate.copy_(gate)
        expected = inputs + torch.tanh(gate) * out
        torch.testing.assert_close(strategy(inputs, out), expected, rtol=0, atol=1e-6)


class TestAverage:
    """The weighted mean of the members' changes."""

    @pytest.mark.parametrize(
        ("weights", "share"),
        [(None, [1 / 3, 1 / 3, 1 / 3]), ([1.0, 2.0, 5.0], [1 / 8, 2 / 8, 5 / 8])],
        ids=["equal", "weighted"],
    )
    def test_weights_are_normalised(self, weights: list[float] | None, share: list[float]) -> None:
        """The result is x plus the normalised weighted sum of r_i - x."""
        inputs = seeded(3, 4)
        results = {name: seeded(3, 4, seed=seed) for name, seed in (("a", 3), ("b", 4), ("c", 5))}
        strategy = hookadapt.Average(4, adapters=["a", "b", "c"], weights=weights)
        expected = inputs + sum(w * (result - inputs) for w, result in zip(share, results.values()))
        torch.testing.assert_close(strategy(inputs, results), expected, rtol=0, atol=1e-6)


def average_config(weights: list[float] | None) -> dict[str, Any]:
    """Three scaled_add scale members on ``first`` and an average over them."""
    members = {name: scale_spec({"kind": "scaled_add", "scale": 1.0}) for name in ("a", "b", "c")}
    meta = spec("first", "identity", {"kind": "average", "adapters": ["a", "b", "c"], "weights": weights})
    return {**members, "avg": meta}


MEMBER_VECTORS = {
    "a": torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, 0.0]),
    "b": torch.tensor([0.0, 3.0, 1.0, -2.0, 0.0, 1.0]),
    "c": torch.tensor([-1.0, 1.0, 0.0, 0.0, 4.0, -3.0]),
}


@pytest.mark.parametrize(
    ("weights", "disabled", "share"),
    [
        (None, (), {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}),
        (None, ("b",), {"a": 1 / 2, "c": 1 / 2}),
        ([1.0, 2.0, 5.0], (), {"a": 1 / 8, "b": 2 / 8, "c": 5 / 8}),
        ([1.0, 2.0, 5.0], ("c",), {"a": 1 / 3, "b": 2 / 3}),
    ],
    ids=["equal", "equal-b-off", "weighted", "weighted-c-off"],
)
def test_average_through_attach(
    toy: Toy, x: torch.Tensor, weights: list[float] | None, disabled: tuple[str, ...], share: dict[str, float]
) -> None:
    """Attached, the average renormalises over the enabled members."""
    base = first_output(toy, x)
    with hookadapt.adapters(toy, average_config(weights)) as adapter_set:
        for name, vector in MEMBER_VECTORS.items():
            set_scale(adapter_set, name, vector)
        if disabled:
            adapter_set.disable(*disabled)
        result = first_output(toy, x)
    expected = base + sum(w * MEMBER_VECTORS[name] for name, w in share.items())
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


class TestFusion:
    """Attention over the members' changes."""

    @pytest.mark.parametrize("temperature", [1.0, 2.5])
    def test_hand_set_attention(self, temperature: float) -> None:
        """With hand-set projections the result equals a softmax attention computed by hand."""
        features, names = 4, ["a", "b", "c"]
        inputs = seeded(2, features)
        results = {name: seeded(2, features, seed=10 + i) for i, name in enumerate(names)}
        strategy = hookadapt.Fusion(features, adapters=names, temperature=temperature)
        wq, bq, wk, bk, wv = (seeded(*shape, seed=20 + i) for i, shape in enumerate([(4, 4), (4,), (4, 4), (4,), (4, 4)]))
        with torch.no_grad():
            strategy.query.weight.copy_(wq)
            strategy.query.bias.copy_(bq)
            strategy.key.weight.copy_(wk)
            strategy.key.bias.copy_(bk)
            strategy.value.weight.copy_(wv)
        expected = torch.empty_like(inputs)
        for row in range(inputs.shape[0]):
            q = wq @ inputs[row] + bq
            deltas = [results[name][row] - inputs[row] for name in names]
            scores = torch.stack([q @ (wk @ d + bk) for d in deltas]) / (math.sqrt(features) * temperature)
            attention = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            expected[row] = inputs[row] + sum(a * (wv @ d) for a, d in zip(attention, deltas))
        torch.testing.assert_close(strategy(inputs, results), expected, rtol=0, atol=1e-5)

    def test_fresh_equal_deltas(self) -> None:
        """A fresh fusion over equal changes returns x + delta."""
        inputs, delta = seeded(3, 4), seeded(3, 4, seed=3)
        results = {name: inputs + delta for name in ("a", "b", "c")}
        strategy = hookadapt.Fusion(4, adapters=["a", "b", "c"])
        torch.testing.assert_close(strategy(inputs, results), inputs + delta, rtol=0, atol=1e-6)

    def test_trains_fusion_alone(self, toy: Toy, x: torch.Tensor) -> None:
        """With the members frozen by set_trainable, only the fusion's parameters get gradients."""
        members = {name: spec("first", {"kind": "lora", "rank": 2}, insertion="parallel") for name in ("a", "b", "c")}
        config = {**members, "fuse": spec("first", "identity", {"kind": "fusion", "adapters": ["a", "b", "c"]}, "parallel")}
        with hookadapt.adapters(toy, config, freeze_base=True) as adapter_set:
            randomize(adapter_set)
            adapter_set.set_trainable("fuse")
            toy(x).pow(2).sum().backward()
            grads = {
                name: [param.grad for adapter in adapter_set.adapters[name].values() for param in adapter.parameters()]
                for name in adapter_set.names
            }
            base_grads = [param.grad for name, param in toy.named_parameters() if "_hookadapt" not in name]
        assert all(grad is None for name in "abc" for grad in grads[name]), "a frozen member got a gradient"
        assert all(grad is None for grad in base_grads), "a frozen base parameter got a gradient"
        assert all(grad is not None and grad.abs().sum() > 0 for grad in grads["fuse"]), "a fusion parameter got no gradient"


# Per-sample routing.

ROUTE_CONFIG = {
    "a": spec("first", {"kind": "linear", "dim": 4}),
    "b": spec(["first", "second"], {"kind": "lora", "rank": 2}, insertion="parallel"),
    "c": spec("second", {"kind": "linear", "dim": 3}, insertion="parallel"),
}


def routed_and_alone(
    model: nn.Module, adapter_set: hookadapt.AdapterSet, run: Any, route: list[Any], size: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run one routed batch and then each sample alone, and return both outputs and both sets of adapter gradients."""
    params = dict(adapter_set.named_parameters(include_train_modules=False))
    for param in params.values():
        param.grad = None
    with adapter_set.route(route):
        batched = run(slice(None))
    batched.sum().backward()
    batched_grads = {key: param.grad.clone() for key, param in params.items() if param.grad is not None}
    for param in params.values():
        param.grad = None
    alone = []
    for index in range(size):
        with adapter_set.route([route[index]]):
            output = run(slice(index, index + 1))
        # A sample routed to None through a frozen base has no autograd graph.
        if output.requires_grad:
            output.sum().backward()
        alone.append(output.detach())
    alone_grads = {key: param.grad.clone() for key, param in params.items() if param.grad is not None}
    return batched.detach(), torch.cat(alone), batched_grads, alone_grads


def max_grad_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Return the largest absolute difference between two gradient dicts over the same keys."""
    assert first.keys() == second.keys(), f"different parameters got gradients: {sorted(first.keys() ^ second.keys())}"
    return max((first[key] - second[key]).abs().max().item() for key in first)


class TestRoute:
    """A routed batch equals running each sample alone."""

    @pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
    def test_batch_matches_samples(self, toy: Toy, x: torch.Tensor, training: bool) -> None:
        """Outputs match within 1e-6 and gradients within 1e-5."""
        toy.train(training)
        with hookadapt.adapters(toy, ROUTE_CONFIG) as adapter_set:
            randomize(adapter_set)
            batched, alone, batched_grads, alone_grads = routed_and_alone(
                toy, adapter_set, lambda rows: toy(x[rows]), ROUTE, BATCH
            )
        difference = (batched - alone).abs().max().item()
        grad_difference = max_grad_difference(batched_grads, alone_grads)
        assert difference <= 1e-6, f"routed batch differs from samples run alone by {difference:.3g}"
        assert grad_difference <= 1e-5, f"routed gradients differ from summed per-sample ones by {grad_difference:.3g}"

    def test_route_selects_adapters(self, toy: Toy, x: torch.Tensor) -> None:
        """Samples routed to None get the base output and the others differ from it."""
        base = toy(x).detach()
        with hookadapt.adapters(toy, ROUTE_CONFIG) as adapter_set:
            randomize(adapter_set)
            with torch.no_grad(), adapter_set.route(ROUTE):
                routed = toy(x)
        assert torch.equal(routed[2], base[2]), "a sample routed to None was adapted"
        assert not torch.allclose(routed[[0, 1, 3, 4]], base[[0, 1, 3, 4]]), "routed samples kept the base output"

    def test_wrong_length_raises(self, toy: Toy, x: torch.Tensor) -> None:
        """A route with fewer entries than samples raises SelectionError."""
        with hookadapt.adapters(toy, ROUTE_CONFIG) as adapter_set:
            with adapter_set.route(["a", "b"]), pytest.raises(hookadapt.SelectionError, match="the route has 2 entries"):
                toy(x)

    def test_unknown_name_raises(self, toy: Toy) -> None:
        """A route that names an unknown adapter raises ConfigError."""
        with hookadapt.adapters(toy, ROUTE_CONFIG) as adapter_set:
            with pytest.raises(hookadapt.ConfigError, match="unknown adapter\\(s\\) 'd'"):
                with adapter_set.route(["a", "d"]):
                    pass

    def test_route_ends_with_block(self, toy: Toy, x: torch.Tensor) -> None:
        """After the block every adapter runs on every sample again."""
        with hookadapt.adapters(toy, ROUTE_CONFIG) as adapter_set:
            randomize(adapter_set)
            everything = toy(x).detach()
            with adapter_set.route(ROUTE):
                toy(x)
            after = toy(x).detach()
            route = adapter_set.current_route()
        assert route is None, "the route outlived its block"
        assert torch.equal(after, everything), "the output after the block is still routed"

    def test_route_ends_on_raise(self, toy: Toy) -> None:
        """A block that raises still ends the route."""
        with hookadapt.adapters(toy, ROUTE_CONFIG) as adapter_set:
            with pytest.raises(RuntimeError, match="inside the route"):
                with adapter_set.route(ROUTE):
                    raise RuntimeError("raised inside the route")
            route = adapter_set.current_route()
        assert route is None, "the route outlived a block that raised"


MINILM_LORA = {
    name: spec([r"re:encoder\.layer\.\d+\.attention\.self\.(query|value)"], {"kind": "lora", "rank": 4, "alpha": 8}, insertion="parallel")
    for name in ("q1", "q2", "q3")
}
MINILM_ROUTE = ["q1", "q2", None, "q3", "q1", ["q2", "q3"], None, "q3"]


def test_minilm_route_matches_samples(minilm: nn.Module, review_batch: dict[str, torch.Tensor]) -> None:
    """On MiniLM, a routed batch over three LoRA adapters equals each review run alone."""
    size = review_batch["input_ids"].shape[0]
    route = MINILM_ROUTE[:size]

    def run(rows: slice) -> torch.Tensor:
        return minilm(**{key: value[rows] for key, value in review_batch.items()}).last_hidden_state

    base = hidden_states(minilm, review_batch)
    with hookadapt.adapters(minilm, MINILM_LORA, freeze_base=True) as adapter_set:
        randomize(adapter_set)
        batched, alone, batched_grads, alone_grads = routed_and_alone(minilm, adapter_set, run, route, size)
    adapted = [index for index, entry in enumerate(route) if entry is not None]
    assert not torch.allclose(batched[adapted], base[adapted]), "the routed reviews kept the base output"
    difference = (batched - alone).abs().max().item()
    grad_difference = max_grad_difference(batched_grads, alone_grads)
    assert difference <= 1e-5, f"routed MiniLM batch differs from reviews run alone by {difference:.3g}"
    assert grad_difference <= 1e-4 * max(1.0, max(g.abs().max().item() for g in alone_grads.values())), (
        f"routed MiniLM gradients differ from summed per-review ones by {grad_difference:.3g}"
    )


# Merging into weights.

MERGE_CONFIG = {
    "lora": spec("first", {"kind": "lora", "rank": 2, "alpha": 4}, insertion="parallel"),
    "scale_out": scale_spec("multiply", target="second"),
    "scale_in": scale_spec("multiply", insertion="input", target="head"),
}


def merge_set(toy: Toy) -> hookadapt.AdapterSet:
    """Attach the mergeable config with random values."""
    adapter_set = hookadapt.attach(toy, MERGE_CONFIG)
    randomize(adapter_set)
    with torch.no_grad():
        for adapter in adapter_set.all_adapters(["scale_out", "scale_in"]):
            adapter.network.weight.add_(1.0)
    return adapter_set


def base_weights(toy: Toy) -> dict[str, torch.Tensor]:
    """Clone the toy's own parameters."""
    return {key: value.detach().clone() for key, value in toy.state_dict().items() if "_hookadapt" not in key}


class TestMerge:
    """merge folds lora and scale into Linear hosts; unmerge and detach restore them bitwise."""

    def test_merged_output_matches(self, toy: Toy, x: torch.Tensor) -> None:
        """Merged outputs equal unmerged ones within float32 rounding."""
        with merge_set(toy) as adapter_set:
            adapted = toy(x).detach()
            adapter_set.merge()
            merged = toy(x).detach()
        torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)

    def test_merged_output_changes_weights(self, toy: Toy) -> None:
        """Merging changes each host's weight."""
        before = base_weights(toy)
        with merge_set(toy) as adapter_set:
            adapter_set.merge()
            changed = [key for key, value in base_weights(toy).items() if not torch.equal(value, before[key])]
        assert {"first.weight", "second.weight", "second.bias", "head.weight"} <= set(changed), f"only {changed} changed"

    def test_merged_hooks_skip_adapter(self, toy: Toy, x: torch.Tensor) -> None:
        """After merge, changing the networks leaves the output alone: the hooks no longer run them."""
        with merge_set(toy) as adapter_set:
            adapter_set.merge()
            merged = toy(x).detach()
            randomize(adapter_set, seed=5)
            after = toy(x).detach()
        assert torch.equal(after, merged), "a merged adapter still ran in the hooks"

    @pytest.mark.parametrize("names", [(), ("lora",), ("scale_*",)], ids=["all", "lora", "scales"])
    def test_disable_merged_raises(self, toy: Toy, names: tuple[str, ...]) -> None:
        """Disabling a merged adapter raises AttachError."""
        with merge_set(toy) as adapter_set:
            adapter_set.merge(*names)
            with pytest.raises(hookadapt.AttachError, match="merged into their hosts' weights; unmerge them first"):
                adapter_set.disable(*names)

    def test_unmerge_restores_bitwise(self, toy: Toy, x: torch.Tensor) -> None:
        """unmerge restores the base weights bitwise and the adapters run again."""
        before = base_weights(toy)
        with merge_set(toy) as adapter_set:
            adapted = toy(x).detach()
            adapter_set.merge()
            adapter_set.unmerge()
            restored = base_weights(toy)
            again = toy(x).detach()
        differ = [key for key, value in before.items() if not torch.equal(restored[key], value)]
        assert not differ, f"unmerge left changed weights: {differ}"
        assert torch.equal(again, adapted), "the adapters do not run again after unmerge"

    def test_detach_after_merge_restores(self, toy: Toy) -> None:
        """Detaching a merged set restores the base model bitwise, parameter objects included."""
        before = snapshot(toy)
        adapter_set = merge_set(toy)
        adapter_set.merge()
        adapter_set.detach()
        assert_restored(toy, before)

    def test_merge_and_detach_bakes(self, toy: Toy, x: torch.Tensor) -> None:
        """merge_and_detach returns a hook-free model whose output equals the adapted output."""
        adapter_set = merge_set(toy)
        adapted = toy(x).detach()
        model = adapter_set.merge_and_detach()
        hooks = {path: name for path, module in model.named_modules() for name in HOOK_DICTS if getattr(module, name)}
        reserved = [path for path, _ in model.named_modules() if "_hookadapt" in path]
        assert model is toy, "merge_and_detach returned another model"
        assert not hooks, f"hooks remain: {hooks}"
        assert not reserved, f"hookadapt modules remain: {reserved}"
        torch.testing.assert_close(model(x).detach(), adapted, rtol=0, atol=1e-5)


class Block(nn.Module):
    """A non-Linear host around a Linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class BlockToy(nn.Module):
    """A Block and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(FEATURES, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


UNMERGEABLE = [
    pytest.param(
        {"bottleneck": spec("first", {"kind": "linear", "dim": 4})}, "bottleneck", "'linear'", id="bottleneck"
    ),
    pytest.param(
        {"lora": spec("block", {"kind": "lora", "rank": 2}, insertion="parallel")}, "lora", "on Block", id="lora-on-block"
    ),
    pytest.param(
        {"bottleneck": spec("second", {"kind": "linear", "dim": 4}), "scale": scale_spec("multiply", target="second")},
        "scale",
        "'bottleneck' sits between it and the host",
        id="scale-after-bottleneck",
    ),
]


@pytest.mark.parametrize(("config", "name", "message"), UNMERGEABLE)
class TestUnmergeable:
    """An adapter that cannot merge raises AttachError and nothing changes."""

    @staticmethod
    def attach(config: dict[str, Any]) -> tuple[nn.Module, hookadapt.AdapterSet]:
        torch.manual_seed(0)
        model = BlockToy() if "block" in str(config) else Toy()
        adapter_set = hookadapt.attach(model.eval(), config)
        randomize(adapter_set)
        return model, adapter_set

    def test_merge_raises(self, config: dict[str, Any], name: str, message: str) -> None:
        """merge raises AttachError naming the reason."""
        model, adapter_set = self.attach(config)
        with adapter_set, pytest.raises(hookadapt.AttachError, match=re.escape(message)):
            adapter_set.merge(name)

    def test_merge_changes_nothing(self, config: dict[str, Any], name: str, message: str) -> None:
        """After the rejected merge the weights, flags and outputs are as before."""
        model, adapter_set = self.attach(config)
        inputs = seeded(BATCH, FEATURES)
        with adapter_set:
            before, output = copy.deepcopy(model.state_dict()), model(inputs).detach()
            with pytest.raises(hookadapt.AttachError):
                adapter_set.merge()
            after = model.state_dict()
            merged = [adapter.name for adapter in adapter_set.all_adapters() if adapter.merged]
            again = model(inputs).detach()
        assert not merged, f"adapters {merged} are marked merged"
        assert all(torch.equal(after[key], value) for key, value in before.items()), "a weight changed"
        assert torch.equal(again, output), "the output changed"


# Weighted combination.

def lora_spec(rank: int, alpha: float, target: str = "first") -> dict[str, Any]:
    """Return a parallel LoRA spec."""
    return spec(target, {"kind": "lora", "rank": rank, "alpha": alpha}, insertion="parallel")


class TestCombine:
    """combine adds an adapter whose update is the weighted sum of others'."""

    def test_linear_sums_tensors(self, toy: Toy) -> None:
        """combination='linear' sums the bottlenecks' tensors with the weights."""
        config = {name: spec("first", {"kind": "linear", "dim": 4}) for name in ("a", "b")}
        with hookadapt.adapters(toy, config) as adapter_set:
            randomize(adapter_set)
            adapter_set.combine({"a": 0.7, "b": 0.3}, into="ab")
            states = {name: adapter_set.adapters[name]["first"].state_dict() for name in ("a", "b", "ab")}
        expected = {key: 0.7 * states["a"][key] + 0.3 * states["b"][key] for key in states["a"]}
        assert states["ab"].keys() == expected.keys(), "the combined adapter has other tensors"
        for key, value in expected.items():
            torch.testing.assert_close(states["ab"][key], value, rtol=0, atol=1e-6, msg=f"tensor {key} differs")

    def test_cat_update_matches_hand(self, toy: Toy, x: torch.Tensor) -> None:
        """combination='cat' gives an update 0.7 s_a B_a A_a + 0.3 s_b B_b A_b."""
        with hookadapt.adapters(toy, {"a": lora_spec(2, 4.0), "b": lora_spec(3, 1.5)}) as adapter_set:
            randomize(adapter_set)
            adapter_set.combine({"a": 0.7, "b": 0.3}, into="ab", combination="cat")
            adapter_set.disable("a", "b")
            nets = {name: adapter_set.adapters[name]["first"].network for name in ("a", "b")}
            update = sum(
                weight * nets[name].scaling * nets[name].lora_B.weight @ nets[name].lora_A.weight
                for name, weight in (("a", 0.7), ("b", 0.3))
            )
            result = first_output(toy, x)
            rank = adapter_set.adapters["ab"]["first"].network.rank
        expected = F.linear(x, toy.first.weight + update.detach(), toy.first.bias).detach()
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)
        assert rank == 5, f"the combined rank is {rank}, not the sum of ranks"

    @pytest.mark.parametrize(
        ("config", "combination"),
        [
            ({"a": lora_spec(2, 2.0), "b": spec("first", {"kind": "linear", "dim": 4})}, "linear"),
            ({"a": lora_spec(2, 2.0), "b": lora_spec(2, 2.0, target="second")}, "linear"),
            ({"a": lora_spec(2, 2.0), "b": lora_spec(2, 2.0, target="second")}, "cat"),
        ],
        ids=["kinds", "sites-linear", "sites-cat"],
    )
    def test_mismatch_raises(self, toy: Toy, config: dict[str, Any], combination: str) -> None:
        """Combining different kinds or sites raises ConfigError."""
        with hookadapt.adapters(toy, config) as adapter_set:
            with pytest.raises(hookadapt.ConfigError, match="combine adapters of one kind at the same sites"):
                adapter_set.combine({"a": 0.5, "b": 0.5}, into="ab", combination=combination)

    @pytest.mark.parametrize("into", ["b", "other"])
    def test_taken_name_raises(self, toy: Toy, into: str) -> None:
        """Combining into a name already attached, in this set or another, raises AttachError."""
        with hookadapt.adapters(toy, {"a": lora_spec(2, 2.0), "b": lora_spec(2, 2.0)}) as adapter_set:
            with hookadapt.adapters(toy, {"other": scale_spec("multiply", target="second")}):
                with pytest.raises(hookadapt.AttachError, match=f"cannot combine into '{into}'"):
                    adapter_set.combine({"a": 0.5, "b": 0.5}, into=into)


# User-registered kinds, from the guide.

def test_custom_kinds_guide_runs() -> None:
    """The one Python block of the guide registers a network and a strategy and runs."""
    blocks = re.findall(r"```python\n(.*?)```", CUSTOM_KINDS.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 1, f"the guide has {len(blocks)} python blocks, not one"
    networks, strategies = set(hookadapt.NETWORKS.kinds()), set(hookadapt.STRATEGIES.kinds())
    try:
        exec(compile(blocks[0], str(CUSTOM_KINDS), "exec"), {"__name__": "custom_kinds_guide"})
        added_networks = set(hookadapt.NETWORKS.kinds()) - networks
        added_strategies = set(hookadapt.STRATEGIES.kinds()) - strategies
    finally:
        for kind in set(hookadapt.NETWORKS.kinds()) - networks:
            hookadapt.NETWORKS.unregister(kind)
        for kind in set(hookadapt.STRATEGIES.kinds()) - strategies:
            hookadapt.STRATEGIES.unregister(kind)
    assert len(added_networks) == 1, f"the guide registered networks {added_networks}"
    assert len(added_strategies) == 1, f"the guide registered strategies {added_strategies}"
