"""Attaching, running and detaching adapter sets on MiniLM and on small toy models."""

from __future__ import annotations

import gc
import re
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import hookadapt
from conftest import assert_restored, hidden_states, randomize, snapshot

BOTTLENECK = {
    "target": "encoder.layer.*.output",
    "insertion": "output",
    "network": {"kind": "linear", "dim": 16},
}
LORA_QV = {
    "target": [r"re:encoder\.layer\.\d+\.attention\.self\.(query|value)"],
    "insertion": "parallel",
    "network": {"kind": "lora", "rank": 4, "alpha": 8},
}
MINILM_CONFIG = {"bottleneck": BOTTLENECK, "lora_qv": LORA_QV}
MINILM_LAYERS = 6


class Mlp(nn.Module):
    """A Sequential body and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Stacked(nn.Module):
    """Blocks that sit inside a ModuleList of Sequentials, so every container ancestor is skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Flaky(nn.Module):
    """A linear layer that raises instead of returning while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("flaky host failed on purpose")
        return self.lin(x)


class FlakyModel(nn.Module):
    """A model whose middle module can be made to raise."""

    def __init__(self) -> None:
        super().__init__()
        self.flaky = Flaky()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flaky(x))


class Gate(nn.Module):
    """A module that declares no feature sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class Gated(nn.Module):
    """Linear, batch norm, dropout and a size-less gate, so a probe forward could change state and RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.drop(self.norm(self.lin(x))))


class Twice(nn.Module):
    """Calls the same linear layer twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


class Holder(nn.Module):
    """A wrapper with one host module under the name ``host``."""

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        self.host = host

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)


def toy(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    """Build a toy model with fixed weights, in eval mode."""
    torch.manual_seed(seed)
    return cls().eval()


def toy_input(seed: int = 1, shape: tuple[int, ...] = (4, 8)) -> torch.Tensor:
    """Return a fixed random input."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a toy model without gradients."""
    with torch.no_grad():
        return model(x)


def lora(target: str, **network: Any) -> dict[str, Any]:
    """Return a parallel LoRA spec on ``target``."""
    return {
        "target": target,
        "insertion": "parallel",
        "network": {"kind": "lora", "rank": 4, "alpha": 8, **network},
    }


def bottleneck(target: str, insertion: str = "output", **network: Any) -> dict[str, Any]:
    """Return a linear bottleneck spec on ``target``."""
    return {"target": target, "insertion": insertion, "network": {"kind": "linear", "dim": 4, **network}}


class TestDetach:
    """Detaching restores the model exactly."""

    def test_detach_after_training_minilm(self, minilm: nn.Module, review_batch: dict) -> None:
        """Attach, train one step, detach: the model is bitwise what it was."""
        base = hidden_states(minilm, review_batch)
        before = snapshot(minilm)

        adapter_set = hookadapt.attach(minilm, MINILM_CONFIG, freeze_base=True)
        randomize(adapter_set)
        optimizer = torch.optim.AdamW(adapter_set.parameters(), lr=1e-2)
        minilm.train()
        loss = minilm(**review_batch).last_hidden_state.pow(2).mean()
        loss.backward()
        optimizer.step()
        minilm.eval()
        adapted = hidden_states(minilm, review_batch)
        adapter_set.detach()

        assert not torch.equal(adapted, base), "the adapters did not change the output"
        assert_restored(minilm, before)
        assert torch.equal(hidden_states(minilm, review_batch), base), "output differs after detach"

    def test_detach_after_error_in_body(self, minilm: nn.Module, review_batch: dict) -> None:
        """An exception in the with body still detaches everything."""
        base = hidden_states(minilm, review_batch)
        before = snapshot(minilm)

        with pytest.raises(KeyError, match="raised in the body"):
            with hookadapt.adapters(minilm, MINILM_CONFIG, freeze_base=True) as adapter_set:
                randomize(adapter_set)
                hidden_states(minilm, review_batch)
                raise KeyError("raised in the body")

        assert adapter_set.is_attached is False, "the set still says it is attached"
        assert_restored(minilm, before)
        assert torch.equal(hidden_states(minilm, review_batch), base), "output differs after detach"

    def test_detach_after_host_raises(self) -> None:
        """A host that raises inside forward leaves no per-call state, and the next call is correct."""
        model = toy(FlakyModel)
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)

        adapter_set = hookadapt.attach(model, {"lora": lora("flaky")})
        randomize(adapter_set)
        adapted = run(model, x)
        network = adapter_set.adapters["lora"]["flaky"].network
        with torch.no_grad():
            expected = model.head(model.flaky.lin(x) + network(x))

        model.flaky.fail = True
        with pytest.raises(RuntimeError, match="failed on purpose"):
            run(model, x)
        model.flaky.fail = False

        assert adapter_set.sites[0]._stack() == [], "the parallel branch of the failed call was kept"
        assert torch.equal(run(model, x), adapted), "the call after the failure gives another output"
        assert torch.allclose(adapted, expected, atol=1e-6), "the parallel LoRA output is wrong"

        adapter_set.detach()
        assert_restored(model, before)
        assert torch.equal(run(model, x), base), "output differs after detach"

    def test_detach_after_forward_in_context(self) -> None:
        """A host that raises inside a with block: the block detaches and the model works."""
        model = toy(FlakyModel)
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)

        with pytest.raises(RuntimeError, match="failed on purpose"):
            with hookadapt.adapters(model, {"lora": lora("flaky"), "out": bottleneck("head")}) as adapter_set:
                randomize(adapter_set)
                model.flaky.fail = True
                run(model, x)
        model.flaky.fail = False

        assert_restored(model, before)
        assert torch.equal(run(model, x), base), "output differs after detach"

    def test_shared_host_called_twice(self) -> None:
        """A parallel adapter on a module called twice per forward adapts each call with its own input."""
        model = toy(Twice)
        x = toy_input()

        adapter_set = hookadapt.attach(model, {"lora": lora("lin")})
        randomize(adapter_set)
        network = adapter_set.adapters["lora"]["lin"].network
        with torch.no_grad():
            first = nn.functional.linear(x, model.lin.weight, model.lin.bias) + network(x)
            expected = nn.functional.linear(first, model.lin.weight, model.lin.bias) + network(first)
        output = run(model, x)
        adapter_set.detach()

        assert torch.allclose(output, expected, atol=1e-6), "the two calls were not adapted separately"


@pytest.mark.parametrize("name", ["double", "train"])
def test_module_method_name_attaches(name: str) -> None:
    """An adapter named like an nn.Module method attaches and detaches like any other."""
    model = toy(Mlp)
    x = toy_input()
    base = run(model, x)
    before = snapshot(model)

    adapter_set = hookadapt.attach(model, {name: bottleneck("body.0")})
    randomize(adapter_set)
    output = run(model, x)
    adapter_set.detach()

    assert not torch.equal(output, base), "the adapter did not change the output"
    assert_restored(model, before)


@pytest.mark.parametrize("target", ["body.0", "body", ""], ids=["leaf-host", "sequential-host", "root-host"])
def test_dropped_model_is_collected(target: str) -> None:
    """A model dropped while adapters are still attached is freed, because adapter sets must not pin it."""
    model = toy(Mlp)
    adapter_set = hookadapt.attach(model, {"a": bottleneck(target)})
    run(model, toy_input())
    model_ref = weakref.ref(model)

    del model, adapter_set
    gc.collect()

    alive = model_ref() is not None
    assert not alive, f"an adapter set attached at {target or 'the root'!r} keeps the dropped model alive"


FAILED_ATTACHES = [
    pytest.param(
        {"a": bottleneck("body.0"), "b": bottleneck("body.9")},
        {},
        hookadapt.TargetError,
        "body.9",
        id="second-target-unmatched",
    ),
    pytest.param(
        {"a": bottleneck("body.0"), "b": bottleneck("body.1")},
        {},
        hookadapt.ShapeError,
        "body.1",
        id="size-unknown",
    ),
    pytest.param(
        {"a": bottleneck("body.0")},
        {"train_modules": ["neck"]},
        hookadapt.ConfigError,
        "neck",
        id="train-module-unknown",
    ),
    pytest.param(
        {"a": bottleneck("body.0"), "b": bottleneck("body.1")},
        {"example_inputs": torch.zeros(2, 5), "freeze_base": True},
        hookadapt.AttachError,
        "probe forward",
        id="probe-forward-fails",
    ),
]


@pytest.mark.parametrize(("config", "options", "error", "message"), FAILED_ATTACHES)
def test_failed_attach_untouched(config: dict, options: dict, error: type, message: str) -> None:
    """A failing attach raises and leaves the model exactly as it was."""
    model = toy(Mlp).train()
    model.head.weight.requires_grad_(False)
    x = toy_input()
    base = run(model, x)
    before = snapshot(model)

    with pytest.raises(error, match=re.escape(message)):
        hookadapt.attach(model, config, **options)

    assert_restored(model, before)
    assert torch.equal(run(model, x), base), "output differs after the failed attach"


def test_failed_attach_minilm(minilm: nn.Module, review_batch: dict) -> None:
    """A misspelt second target on MiniLM raises with the closest paths and changes nothing."""
    base = hidden_states(minilm, review_batch)
    before = snapshot(minilm)
    config = {"bottleneck": BOTTLENECK, "lora_qv": {**LORA_QV, "target": "encoder.layer.*.attention.self.qurey"}}

    with pytest.raises(hookadapt.TargetError) as caught:
        hookadapt.attach(minilm, config, freeze_base=True)

    assert "'lora_qv'" in str(caught.value), "the message does not name the adapter"
    assert "attention.self.query" in str(caught.value), "the message does not suggest the real path"
    assert_restored(minilm, before)
    assert torch.equal(hidden_states(minilm, review_batch), base), "output differs after the failed attach"


def test_attach_same_name_raises() -> None:
    """A name that is already attached to the model is rejected, and the first set keeps working."""
    model = toy(Mlp)
    x = toy_input()
    first = hookadapt.attach(model, {"a": bottleneck("body.0")})
    randomize(first)
    adapted = run(model, x)

    with pytest.raises(hookadapt.AttachError, match="'a'"):
        hookadapt.attach(model, {"a": bottleneck("head")})

    assert hookadapt.attached(model) == [first], "the failed attach changed the attached sets"
    assert torch.equal(run(model, x), adapted), "the failed attach changed the output"
    first.detach()


class TestFreeze:
    """freeze_base and train_modules set requires_grad and detach restores every flag."""

    def test_freeze_base_minilm(self, minilm: nn.Module) -> None:
        """freeze_base freezes all base parameters and detach restores each flag, also the False ones."""
        for param in minilm.embeddings.parameters():
            param.requires_grad_(False)
        before = snapshot(minilm)
        base_count = len(list(minilm.parameters()))

        adapter_set = hookadapt.attach(minilm, MINILM_CONFIG, freeze_base=True)
        adapter_ids = {id(param) for param in adapter_set.parameters()}
        base_flags = [param.requires_grad for param in minilm.parameters() if id(param) not in adapter_ids]
        adapter_flags = [param.requires_grad for param in adapter_set.parameters()]
        adapter_set.detach()

        assert len(base_flags) == base_count, "base parameters were missed or added"
        assert not any(base_flags), "a base parameter is still trainable"
        assert all(adapter_flags), "an adapter parameter is frozen"
        assert_restored(minilm, before)

    def test_train_modules_restore_head(self) -> None:
        """A train module becomes trainable, and detach restores its values and flags after a step."""
        model = toy(Mlp)
        model.head.weight.requires_grad_(False)
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)

        adapter_set = hookadapt.attach(model, {"a": bottleneck("body.0")}, freeze_base=True, train_modules=["head"])
        head_flags = [param.requires_grad for param in model.head.parameters()]
        body_flags = [
            param.requires_grad for path, param in model.body.named_parameters() if "_hookadapt" not in path
        ]
        optimizer = torch.optim.SGD(adapter_set.parameters(), lr=0.1)
        model(x).sum().backward()
        optimizer.step()
        trained = model.head.weight.detach().clone()
        adapter_set.detach()

        assert all(head_flags), "the head is not trainable"
        assert not any(body_flags), "a body parameter is trainable"
        assert not torch.equal(trained, before.state["head.weight"]), "the step did not change the head"
        assert_restored(model, before)
        assert torch.equal(run(model, x), base), "output differs after detach"


class TestNesting:
    """Adapter sets on the same model stack and detach in reverse order."""

    OUTER = {"doubler": {"target": "head", "network": {"kind": "scale", "init": 2.0}, "strategy": "multiply"}}
    INNER = {
        "shift": {
            "target": "head",
            "network": {"kind": "scale", "init": 1.0},
            "strategy": {"kind": "scaled_add", "scale": 1.0},
        }
    }

    def test_nested_sets_stack(self) -> None:
        """The outer set runs first, and leaving the inner block keeps the outer set working."""
        model = toy(Mlp)
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)

        with hookadapt.adapters(model, self.OUTER) as outer:
            with hookadapt.adapters(model, self.INNER) as inner:
                both = run(model, x)
                sets = hookadapt.attached(model)
            outer_only = run(model, x)

        assert sets == [outer, inner], "attached() does not list the sets oldest first"
        assert torch.equal(both, base * 2 + 1), "the outer set did not run before the inner one"
        assert torch.equal(outer_only, base * 2), "leaving the inner block broke the outer set"
        assert_restored(model, before)

    def test_detach_out_of_order_raises(self) -> None:
        """Detaching the outer set while the inner one is attached raises and changes nothing."""
        model = toy(Mlp)
        x = toy_input()
        before = snapshot(model)
        outer = hookadapt.attach(model, self.OUTER)
        inner = hookadapt.attach(model, self.INNER)
        both = run(model, x)

        with pytest.raises(hookadapt.AttachError, match="reverse order"):
            outer.detach()

        assert hookadapt.attached(model) == [outer, inner], "the failed detach changed the attached sets"
        assert torch.equal(run(model, x), both), "the failed detach changed the output"
        inner.detach()
        outer.detach()
        assert_restored(model, before)


class TestEnable:
    """enable, disable and disabled() switch adapters without detaching them."""

    CONFIG = {"first": bottleneck("body.0"), "second": lora("head")}

    def attach_toy(self) -> tuple[nn.Module, hookadapt.AdapterSet, torch.Tensor, torch.Tensor]:
        """Attach both adapters with random weights and return the model, set, input and base output."""
        model = toy(Mlp)
        x = toy_input()
        base = run(model, x)
        adapter_set = hookadapt.attach(model, self.CONFIG)
        randomize(adapter_set)
        return model, adapter_set, x, base

    def test_disable_all_gives_base(self) -> None:
        """With every adapter disabled the output is bitwise the base output."""
        model, adapter_set, x, base = self.attach_toy()
        full = run(model, x)

        adapter_set.disable()
        disabled = run(model, x)
        adapter_set.enable()
        enabled = run(model, x)
        adapter_set.detach()

        assert not torch.equal(full, base), "the adapters did not change the output"
        assert torch.equal(disabled, base), "disabled adapters changed the output"
        assert torch.equal(enabled, full), "enable() did not restore the adapted output"

    def test_disable_one_by_name(self) -> None:
        """Disabling one adapter by name or glob leaves the other one running."""
        model, adapter_set, x, base = self.attach_toy()
        full = run(model, x)

        adapter_set.disable("first")
        second_only = run(model, x)
        adapter_set.enable("first")
        adapter_set.disable("sec*")
        first_only = run(model, x)
        adapter_set.enable("second")
        adapter_set.detach()

        for output in (second_only, first_only):
            assert not torch.equal(output, base), "disabling one adapter disabled both"
            assert not torch.equal(output, full), "disabling one adapter changed nothing"

    def test_disable_unknown_name_raises(self) -> None:
        """A name that matches no adapter of the set is rejected."""
        model, adapter_set, _, _ = self.attach_toy()

        with pytest.raises(hookadapt.ConfigError, match="'third'"):
            adapter_set.disable("third")
        adapter_set.detach()
        assert hookadapt.attached(model) == [], "the set is still attached"

    @pytest.mark.parametrize("raises", [False, True], ids=["normal-exit", "error-exit"])
    def test_disabled_restores_flags(self, raises: bool) -> None:
        """disabled() restores each adapter's previous flag, also when the block raises."""
        model, adapter_set, x, base = self.attach_toy()
        adapter_set.disable("first")
        second_only = run(model, x)

        inside = None
        try:
            with adapter_set.disabled():
                inside = run(model, x)
                if raises:
                    raise ValueError("raised in the block")
        except ValueError:
            pass
        after = run(model, x)
        flags = {adapter.name: adapter.enabled for adapter in adapter_set.all_adapters()}
        adapter_set.detach()

        assert torch.equal(inside, base), "adapters ran inside disabled()"
        assert flags == {"first": False, "second": True}, "disabled() did not restore the flags"
        assert torch.equal(after, second_only), "the output after disabled() differs"


MODE_CONFIGS = [
    pytest.param(bottleneck("body", dropout=0.5), id="network-dropout"),
    pytest.param(
        {**bottleneck("body"), "strategy": {"kind": "residual_add", "stochastic_depth": 0.5}},
        id="stochastic-depth",
    ),
]


@pytest.mark.parametrize("spec", MODE_CONFIGS)
def test_adapters_follow_host_mode(spec: dict) -> None:
    """Adapters take the host's train/eval mode at call time, also when an ancestor owns them."""
    model = toy(Mlp)
    x = toy_input(shape=(64, 8))
    adapter_set = hookadapt.attach(model, {"a": spec})
    randomize(adapter_set)

    model.train()
    model.body.eval()
    torch.manual_seed(0)
    host_eval = [run(model, x) for _ in range(2)]
    model.eval()
    model.body.train()
    torch.manual_seed(0)
    host_train = [run(model, x) for _ in range(8)]
    adapter_set.detach()

    assert torch.equal(host_eval[0], host_eval[1]), "an adapter on an eval host is not deterministic"
    differs = [not torch.equal(host_train[0], output) for output in host_train[1:]]
    assert any(differs), "an adapter on a training host is deterministic"


def test_eval_after_train_attach_minilm(minilm: nn.Module, review_batch: dict) -> None:
    """Adapters created while MiniLM trains become deterministic once it is put in eval mode."""
    minilm.train()
    config = {
        "bottleneck": {**BOTTLENECK, "network": {"kind": "linear", "dim": 16, "dropout": 0.5}},
        "lora_qv": {**LORA_QV, "network": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.5}},
    }
    adapter_set = hookadapt.attach(minilm, config)
    randomize(adapter_set)

    minilm.eval()
    first = hidden_states(minilm, review_batch)
    second = hidden_states(minilm, review_batch)
    adapter_set.detach()

    assert torch.equal(first, second), "adapters are not deterministic in eval mode"


class TestSizes:
    """Feature sizes come from the spec, a probe forward, host attributes or composite hosts."""

    def test_sizes_from_spec(self) -> None:
        """Sizes given in the spec are used for a host that declares none."""
        model = toy(Gated)
        config = {"a": bottleneck("gate", in_features=8, out_features=8)}

        adapter_set = hookadapt.attach(model, config)
        output = run(model, toy_input())
        sizes = adapter_set.sizes()
        adapter_set.detach()

        assert sizes == {"a": {"gate": [8, 8]}}, "the spec's sizes were not used"
        assert output.shape == (4, 8), "the adapted output has the wrong shape"

    def test_sizes_from_example_inputs(self) -> None:
        """A probe forward measures sizes and leaves state, train flags and RNG as they were."""
        model = toy(Gated).train()
        x = toy_input()
        before = snapshot(model)

        torch.manual_seed(5)
        declared = hookadapt.attach(model, {"a": bottleneck("gate", in_features=8, out_features=8)})
        rng_declared = torch.get_rng_state()
        declared.detach()
        torch.manual_seed(5)
        probed = hookadapt.attach(model, {"a": bottleneck("gate")}, example_inputs=x)
        rng_probed = torch.get_rng_state()
        sizes = probed.sizes()
        state = {key: value.clone() for key, value in model.state_dict().items() if "_hookadapt" not in key}
        training = {path: module.training for path, module in model.named_modules() if "_hookadapt" not in path}
        probed.detach()

        assert sizes == {"a": {"gate": [8, 8]}}, "the probe did not measure the sizes"
        assert torch.equal(rng_probed, rng_declared), "the probe forward used the RNG"
        assert training == before.training, "the probe forward changed a train flag"
        assert list(state) == list(before.state), "the probe forward changed the state keys"
        for key, value in before.state.items():
            assert torch.equal(state[key], value), f"the probe forward changed {key}"
        assert_restored(model, before)

    def test_example_inputs_as_kwargs(self, minilm: nn.Module, review_batch: dict) -> None:
        """A dict of example inputs is passed as keyword arguments to MiniLM."""
        adapter_set = hookadapt.attach(minilm, {"lora_qv": LORA_QV}, example_inputs=review_batch)
        sizes = adapter_set.sizes()
        adapter_set.detach()

        assert len(sizes["lora_qv"]) == 2 * MINILM_LAYERS, "not every query and value layer was probed"
        assert set(map(tuple, sizes["lora_qv"].values())) == {(384, 384)}, "a probed size is wrong"

    HOSTS = [
        pytest.param(lambda: nn.Linear(8, 16), "parallel", -1, [8, 16], (3, 8), id="linear-parallel"),
        pytest.param(lambda: nn.Linear(8, 16), "output", -1, [16, 16], (3, 8), id="linear-output"),
        pytest.param(lambda: nn.Linear(8, 16), "input", -1, [8, 8], (3, 8), id="linear-input"),
        pytest.param(lambda: nn.LayerNorm(8), "output", -1, [8, 8], (3, 8), id="layer-norm"),
        pytest.param(lambda: nn.Embedding(10, 8), "output", -1, [8, 8], None, id="embedding"),
        pytest.param(lambda: nn.Conv1d(4, 6, 3), "output", 1, [6, 6], (2, 4, 5), id="conv-channels-first"),
    ]

    @pytest.mark.parametrize(("make_host", "insertion", "feature_dim", "expected", "shape"), HOSTS)
    def test_sizes_from_host_attributes(
        self,
        make_host: Callable[[], nn.Module],
        insertion: str,
        feature_dim: int,
        expected: list[int],
        shape: tuple[int, ...] | None,
    ) -> None:
        """A host's own attributes give the sizes, and the adapted model runs."""
        torch.manual_seed(0)
        model = Holder(make_host()).eval()
        x = torch.randint(0, 10, (3, 4)) if shape is None else toy_input(shape=shape)
        base = run(model, x)
        config = {"a": {**bottleneck("host", insertion), "feature_dim": feature_dim}}

        adapter_set = hookadapt.attach(model, config)
        randomize(adapter_set)
        output = run(model, x)
        sizes = adapter_set.sizes()
        adapter_set.detach()

        assert sizes == {"a": {"host": expected}}, "the host's declared sizes were not used"
        assert output.shape == base.shape, "the adapted output has another shape"
        assert not torch.equal(output, base), "the adapter did not change the output"

    def test_sizes_from_composite_host(self, minilm: nn.Module, review_batch: dict) -> None:
        """BertOutput declares no size itself, so the size 384 of its last descendant is used."""
        adapter_set = hookadapt.attach(minilm, {"bottleneck": BOTTLENECK})
        randomize(adapter_set)
        output = hidden_states(minilm, review_batch)
        sizes = adapter_set.sizes()
        adapter_set.detach()

        expected = {f"encoder.layer.{index}.output": [384, 384] for index in range(MINILM_LAYERS)}
        assert sizes == {"bottleneck": expected}, "the composite host's sizes are wrong"
        assert output.shape[-1] == 384, "the adapted output has another width"

    WRONG_SIZES = [
        pytest.param("output", {"in_features": 5, "out_features": 5}, "input size is 5", id="output"),
        pytest.param("parallel", {"in_features": 5}, "input size is 5", id="parallel-input"),
        pytest.param("parallel", {"out_features": 5}, "output size is 5", id="parallel-output"),
        pytest.param("input", {"in_features": 5, "out_features": 5}, "input size is 5", id="input"),
    ]

    @pytest.mark.parametrize(("insertion", "network", "message"), WRONG_SIZES)
    def test_wrong_size_raises(self, insertion: str, network: dict, message: str) -> None:
        """A size that does not fit raises ShapeError at the first forward, naming site, sizes and fix."""
        model = toy(Mlp)
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)
        adapter_set = hookadapt.attach(model, {"wrong": bottleneck("body.2", insertion, **network)})

        with pytest.raises(hookadapt.ShapeError) as caught:
            run(model, x)
        adapter_set.detach()

        text = str(caught.value)
        assert "'body.2'" in text, "the message does not name the site"
        assert "'wrong'" in text, "the message does not name the adapter"
        assert message in text, "the message does not give the network's size"
        assert re.search(r"has (8|16) features", text), "the message does not give the host's size"
        assert "network.in_features" in text, "the message does not give the fix"
        assert_restored(model, before)
        assert torch.equal(run(model, x), base), "output differs after detach"


class TestDtypeAndDevice:
    """Adapters keep their dtype on low-precision hosts and move with the model."""

    TOY_CONFIG = {"first": bottleneck("body.0"), "second": lora("head")}

    def test_bfloat16_toy_host(self) -> None:
        """A bfloat16 toy model keeps bfloat16 outputs while its adapters stay float32."""
        model = toy(Mlp).to(torch.bfloat16)
        x = toy_input().to(torch.bfloat16)
        base = run(model, x)

        adapter_set = hookadapt.attach(model, self.TOY_CONFIG)
        randomize(adapter_set)
        output = run(model, x)
        dtypes = {param.dtype for param in adapter_set.parameters()}
        adapter_set.detach()

        assert output.dtype == torch.bfloat16, "the output is no longer bfloat16"
        assert dtypes == {torch.float32}, "the adapters are not float32"
        assert not torch.equal(output, base), "the adapters did not change the output"

    def test_bfloat16_minilm(self, minilm: nn.Module, review_batch: dict) -> None:
        """MiniLM in bfloat16 keeps bfloat16 hidden states while its adapters stay float32."""
        minilm.to(torch.bfloat16)
        base = hidden_states(minilm, review_batch)

        adapter_set = hookadapt.attach(minilm, MINILM_CONFIG)
        randomize(adapter_set)
        output = hidden_states(minilm, review_batch)
        dtypes = {param.dtype for param in adapter_set.parameters()}
        adapter_set.detach()

        assert output.dtype == torch.bfloat16, "the hidden states are no longer bfloat16"
        assert dtypes == {torch.float32}, "the adapters are not float32"
        assert not torch.equal(output, base), "the adapters did not change the output"
        assert torch.equal(hidden_states(minilm, review_batch), base), "output differs after detach"

    def test_model_to_cpu_keeps_adapters(self, minilm: nn.Module, review_batch: dict) -> None:
        """While attached, adapters are in model.parameters() and state_dict() and follow model.to()."""
        adapter_set = hookadapt.attach(minilm, MINILM_CONFIG)
        randomize(adapter_set)
        adapted = hidden_states(minilm, review_batch)

        minilm.to("cpu")
        moved = hidden_states(minilm, review_batch)
        model_params = {id(param) for param in minilm.parameters()}
        adapter_params = [id(param) for param in adapter_set.parameters()]
        state_keys = [key for key in minilm.state_dict() if "_hookadapt" in key]
        adapter_tensors = len(adapter_set.state_dict())
        adapter_set.detach()

        assert torch.equal(moved, adapted), "the output changed after model.to('cpu')"
        assert all(param in model_params for param in adapter_params), "an adapter is not in model.parameters()"
        assert len(state_keys) == adapter_tensors, "the adapters are not all in model.state_dict()"

    def test_model_to_float64_moves_adapters(self) -> None:
        """model.to(float64) while attached converts the adapters too, and the model still runs."""
        model = toy(Mlp)
        x = toy_input()
        adapter_set = hookadapt.attach(model, self.TOY_CONFIG)
        randomize(adapter_set)
        adapted = run(model, x)

        model.to(torch.float64)
        dtypes = {param.dtype for param in adapter_set.parameters()}
        output = run(model, x.double())
        adapter_set.detach()

        assert dtypes == {torch.float64}, "model.to() did not convert the adapters"
        assert output.dtype == torch.float64, "the output is not float64"
        assert torch.allclose(output.float(), adapted, atol=1e-5), "the float64 output differs"


class TestContainers:
    """Container hosts hand their adapters to the nearest ancestor that is not a container."""

    OWNERS = [
        pytest.param(Mlp, "body.0", "body.0", "a", id="leaf-in-sequential"),
        pytest.param(Mlp, "body", "", "a@body", id="sequential-host"),
        pytest.param(Stacked, "blocks.1", "", "a@blocks/1", id="sequential-in-module-list"),
    ]

    @pytest.mark.parametrize(("cls", "target", "owner", "key"), OWNERS)
    def test_container_host_owner(self, cls: type[nn.Module], target: str, owner: str, key: str) -> None:
        """The adapter is registered on the nearest non-container module, and containers keep their length."""
        model = toy(cls)
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)
        lengths = {path: len(module) for path, module in model.named_modules() if hasattr(module, "__len__")}

        adapter_set = hookadapt.attach(model, {"a": bottleneck(target)})
        randomize(adapter_set)
        holder = model.get_submodule(owner)._modules.get("_hookadapt")
        registered = holder is not None and holder._modules.get(key) is adapter_set.adapters["a"][target]
        attached_lengths = {path: len(model.get_submodule(path)) for path in lengths}
        output = run(model, x)
        adapter_set.detach()

        assert registered, f"the adapter is not registered on {owner or 'the root'!r} under {key!r}"
        assert attached_lengths == lengths, "a container's length changed"
        assert not torch.equal(output, base), "the adapter did not change the output"
        assert_restored(model, before)

    ROOTS = [
        pytest.param(lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), "", "0", "a@^", id="root-host"),
        pytest.param(
            lambda: nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 8)),
            "0",
            "0.0",
            "a@^0",
            id="sequential-in-root",
        ),
    ]

    @pytest.mark.parametrize(("make_model", "target", "owner", "key"), ROOTS)
    def test_bare_sequential_descendant_owner(
        self, make_model: Callable[[], nn.Module], target: str, owner: str, key: str
    ) -> None:
        """With only containers above the host, the first module below it keeps the adapters."""
        torch.manual_seed(0)
        model = make_model().eval()
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)

        adapter_set = hookadapt.attach(model, {"a": bottleneck(target)})
        randomize(adapter_set)
        holder = model.get_submodule(owner)._modules.get("_hookadapt")
        registered = holder is not None and holder._modules.get(key) is adapter_set.adapters["a"][target]
        model_params = {id(param) for param in model.parameters()}
        length = len(model)
        output = run(model, x)
        adapter_set.detach()

        assert registered, f"the adapter is not registered on {owner!r} under {key!r}"
        assert all(id(param) in model_params for param in adapter_set.parameters()), "an adapter is outside the tree"
        assert length == len(before.children[""]), "the root Sequential changed length"
        assert not torch.equal(output, base), "the adapter did not change the output"
        assert_restored(model, before)
        assert torch.equal(run(model, x), base), "output differs after detach"

    def test_container_only_subtree_outside_tree(self) -> None:
        """A host whose subtree contains only containers keeps its adapters outside the tree, and they still run."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(), nn.Linear(8, 8)).eval()
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)

        adapter_set = hookadapt.attach(model, {"a": bottleneck("0", in_features=8, out_features=8)})
        randomize(adapter_set)
        state_keys = list(model.state_dict())
        output = run(model, x)
        adapter_set.detach()

        assert state_keys == list(before.state), "the adapters entered model.state_dict()"
        assert not torch.equal(output, base), "the adapter did not change the output"
        assert_restored(model, before)


def test_repr_lists_every_site(minilm: nn.Module) -> None:
    """The repr has one row per adapter and site."""
    adapter_set = hookadapt.attach(minilm, MINILM_CONFIG)
    text = repr(adapter_set)
    pairs = [(adapter.name, adapter.path) for adapter in adapter_set.all_adapters()]
    adapter_set.detach()

    rows = text.splitlines()[2:]
    assert len(pairs) == 3 * MINILM_LAYERS, "the config did not match every expected site"
    assert len(rows) == len(pairs), "the repr does not have one row per adapter and site"
    for name, path in pairs:
        assert any(row.split()[:2] == [name, path] for row in rows), f"no row for {name!r} at {path!r}"
