"""Tests of tensor selection in host inputs and outputs, through attach on real modules."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

import hookadapt
from hookadapt import SelectionError

Pair = namedtuple("Pair", ["hidden", "extra"])
ReversedPair = namedtuple("ReversedPair", ["extra", "hidden"])

# Doubles the selected tensor, so the adapted part is easy to tell from the rest.
DOUBLE = {"network": {"kind": "scale", "init": 2.0}, "strategy": "multiply"}


class Block(nn.Module):
    """Projects its input and returns it in the structure that ``wrap`` builds.

    The raw output of the last call stays in ``last``, so tests can check
    that unselected parts pass through as the same objects.
    """

    def __init__(self, wrap: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.wrap = wrap
        self.extra = torch.arange(3.0)
        self.last: Any = None

    def forward(self, x: torch.Tensor) -> Any:
        self.last = self.wrap(self.proj(x), self.extra)
        return self.last


class Pairwise(nn.Module):
    """Adds a projection of ``x`` and the optional tensor ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x) if y is None else self.proj(x) + y


class Holder(nn.Module):
    """Calls its child ``block`` with whatever it is given, so ``block`` is a named site."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.block(*args, **kwargs)


def attach_double(model: nn.Module, **fields: Any) -> hookadapt.AdapterSet:
    """Attach one doubling adapter named 'ad' at 'block', with extra spec fields."""
    return hookadapt.attach(model, {"ad": {"target": "block", **DOUBLE, **fields}})


def outline(output: Any) -> Any:
    """Return the keys of a mapping or the length of a sequence, and None for anything else."""
    if isinstance(output, dict):
        return list(output)
    if isinstance(output, (tuple, list)):
        return len(output)
    return None


def projected(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the block's projection of x, computed without any hooks."""
    with torch.no_grad():
        return block.proj.forward(x)


# Each case: how the block wraps (hidden, extra), output_select, the key of the
# adapted tensor in the result and the keys of the parts that pass through.
OUTPUT_CASES = [
    pytest.param(lambda h, e: h, None, None, [], id="tensor"),
    pytest.param(lambda h, e: (h, e), None, 0, [1], id="tuple-default"),
    pytest.param(lambda h, e: (e, h, e), 1, 1, [0, 2], id="tuple-index"),
    pytest.param(lambda h, e: (e, h), -1, 1, [0], id="tuple-negative-index"),
    pytest.param(lambda h, e: [h, e], None, 0, [1], id="list-default"),
    pytest.param(lambda h, e: [e, h], 1, 1, [0], id="list-index"),
    pytest.param(lambda h, e: Pair(h, e), None, 0, [1], id="namedtuple-default"),
    pytest.param(lambda h, e: ReversedPair(e, h), "hidden", 1, [0], id="namedtuple-field"),
    pytest.param(lambda h, e: ReversedPair(e, h), 1, 1, [0], id="namedtuple-index"),
    pytest.param(lambda h, e: torch.return_types.max((h, e)), None, 0, [1], id="torch-return-type"),
    pytest.param(lambda h, e: {"hidden": h, "extra": e}, None, "hidden", ["extra"], id="dict-default"),
    pytest.param(lambda h, e: {"mask": None, "hidden": h, "extra": e}, None, "hidden", ["mask", "extra"], id="dict-first-tensor"),
    pytest.param(lambda h, e: {"extra": e, "hidden": h}, "hidden", "hidden", ["extra"], id="dict-key"),
    pytest.param(
        lambda h, e: BaseModelOutput(last_hidden_state=h, hidden_states=(e, e)),
        None,
        "last_hidden_state",
        ["hidden_states"],
        id="model-output-default",
    ),
    pytest.param(
        lambda h, e: BaseModelOutputWithPooling(last_hidden_state=e, pooler_output=h),
        "pooler_output",
        "pooler_output",
        ["last_hidden_state"],
        id="model-output-key",
    ),
]


class TestOutputSelection:
    @pytest.mark.parametrize(("wrap", "select", "key", "others"), OUTPUT_CASES)
    def test_selected_part_adapted(self, wrap, select, key, others) -> None:
        model = Holder(Block(wrap))
        x = torch.randn(2, 4)
        with attach_double(model, output_select=select):
            result = model(x)
        adapted = result if key is None else result[key]
        assert torch.equal(adapted, 2 * projected(model.block, x))

    @pytest.mark.parametrize(("wrap", "select", "key", "others"), OUTPUT_CASES)
    def test_container_keeps_type(self, wrap, select, key, others) -> None:
        model = Holder(Block(wrap))
        with attach_double(model, output_select=select):
            result = model(torch.randn(2, 4))
        assert type(result) is type(model.block.last)

    @pytest.mark.parametrize(("wrap", "select", "key", "others"), OUTPUT_CASES)
    def test_other_parts_same_objects(self, wrap, select, key, others) -> None:
        model = Holder(Block(wrap))
        with attach_double(model, output_select=select):
            result = model(torch.randn(2, 4))
        for other in others:
            assert result[other] is model.block.last[other], other

    @pytest.mark.parametrize(("wrap", "select", "key", "others"), OUTPUT_CASES)
    def test_host_output_not_mutated(self, wrap, select, key, others) -> None:
        """The host's own container still contains the unadapted tensor after the hook."""
        model = Holder(Block(wrap))
        x = torch.randn(2, 4)
        with attach_double(model, output_select=select):
            model(x)
        raw = model.block.last if key is None else model.block.last[key]
        assert torch.equal(raw, projected(model.block, x))

    @pytest.mark.parametrize(("wrap", "select", "key", "others"), OUTPUT_CASES)
    def test_keys_unchanged(self, wrap, select, key, others) -> None:
        """A mapping output keeps its keys in order and a sequence keeps its length."""
        model = Holder(Block(wrap))
        with attach_double(model, output_select=select):
            result = model(torch.randn(2, 4))
        assert outline(result) == outline(model.block.last)

    def test_model_output_attribute_set(self) -> None:
        """A ModelOutput's attribute and item agree after the hook replaces a field."""
        model = Holder(Block(lambda h, e: BaseModelOutput(last_hidden_state=h)))
        with attach_double(model):
            result = model(torch.randn(2, 4))
        assert result.last_hidden_state is result["last_hidden_state"]

    def test_namedtuple_field_access(self) -> None:
        model = Holder(Block(lambda h, e: Pair(h, e)))
        x = torch.randn(2, 4)
        with attach_double(model):
            result = model(x)
        assert torch.equal(result.hidden, 2 * projected(model.block, x))


# Each case: how the host is called, input_select, and the expected output
# from the projection p and the inputs x and y. The selected input is the doubled one.
INPUT_CASES = [
    pytest.param(lambda m, x, y: m(x, y), None, lambda p, x, y: p(2 * x) + y, id="positional-default"),
    pytest.param(lambda m, x, y: m(x=x, y=y), None, lambda p, x, y: p(2 * x) + y, id="keyword-default"),
    pytest.param(lambda m, x, y: m(y=y, x=x), None, lambda p, x, y: p(x) + 2 * y, id="keyword-default-order"),
    pytest.param(lambda m, x, y: m(x), None, lambda p, x, y: p(2 * x), id="single-positional"),
    pytest.param(lambda m, x, y: m(x=x), None, lambda p, x, y: p(2 * x), id="single-keyword"),
    pytest.param(lambda m, x, y: m(x, y=y), "y", lambda p, x, y: p(x) + 2 * y, id="name-by-keyword"),
    pytest.param(lambda m, x, y: m(x=x, y=y), "y", lambda p, x, y: p(x) + 2 * y, id="name-keyword-only"),
    pytest.param(lambda m, x, y: m(x, y), "y", lambda p, x, y: p(x) + 2 * y, id="name-by-position"),
    pytest.param(lambda m, x, y: m(x, y), "x", lambda p, x, y: p(2 * x) + y, id="first-name-by-position"),
    pytest.param(lambda m, x, y: m(x, y), 1, lambda p, x, y: p(x) + 2 * y, id="index"),
    pytest.param(lambda m, x, y: m(x, y), -1, lambda p, x, y: p(x) + 2 * y, id="negative-index"),
]


class TestInputSelection:
    @pytest.mark.parametrize(("call", "select", "expected"), INPUT_CASES)
    def test_selected_input_adapted(self, call, select, expected) -> None:
        model = Holder(Pairwise())
        x, y = torch.randn(2, 4), torch.randn(2, 4)
        with attach_double(model, insertion="input", input_select=select):
            result = call(model, x, y)
        assert torch.allclose(result, expected(model.block.proj, x, y).detach())

    def test_parallel_keyword_only(self) -> None:
        """A parallel LoRA reads the keyword input and adds to the host output."""
        torch.manual_seed(0)
        model = Holder(Pairwise())
        config = {"ad": {"target": "block", "insertion": "parallel", "network": {"kind": "lora", "rank": 2, "alpha": 2}}}
        x, y = torch.randn(2, 4), torch.randn(2, 4)
        with hookadapt.adapters(model, config) as adapter_set:
            network = adapter_set.adapters["ad"]["block"].network
            with torch.no_grad():
                network.lora_B.weight.normal_()
            result = model(x=x, y=y)
            with torch.no_grad():
                expected = model.block.proj(x) + y + network(x)
        assert torch.allclose(result, expected, atol=1e-6)

    def test_other_inputs_same_objects(self) -> None:
        """Arguments that are not selected reach the host as the same objects."""
        seen: dict[str, torch.Tensor] = {}

        class Recorder(Pairwise):
            def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
                seen["x"], seen["y"] = x, y
                return super().forward(x, y)

        model = Holder(Recorder())
        x, y = torch.randn(2, 4), torch.randn(2, 4)
        with attach_double(model, insertion="input", input_select="y"):
            model(x, y=y)
        assert seen["x"] is x

    def test_caller_kwargs_not_mutated(self) -> None:
        model = Holder(Pairwise())
        x, y = torch.randn(2, 4), torch.randn(2, 4)
        kwargs = {"x": x, "y": y}
        with attach_double(model, insertion="input"):
            model.block(**kwargs)
        assert kwargs["x"] is x


def site_error(adapter: str = "ad", site: str = "block") -> str:
    """Return the message prefix that names the adapter and its site."""
    return f"adapter '{adapter}' at '{site}'"


class TestSelectionErrors:
    @pytest.mark.parametrize(
        ("wrap", "select"),
        [
            pytest.param(lambda h, e: "text", None, id="string"),
            pytest.param(lambda h, e: None, None, id="none"),
            pytest.param(lambda h, e: 3.5, None, id="float"),
            pytest.param(lambda h, e: {h.sum().item()}, None, id="set"),
            pytest.param(lambda h, e: (1, "a"), None, id="tuple-without-tensor"),
            pytest.param(lambda h, e: ("a", h), None, id="tuple-first-not-tensor"),
            pytest.param(lambda h, e: [], None, id="empty-list"),
            pytest.param(lambda h, e: {"a": 1}, None, id="dict-without-tensor"),
            pytest.param(lambda h, e: (h, e), 5, id="index-out-of-range"),
            pytest.param(lambda h, e: (h, e), "hidden", id="name-on-plain-tuple"),
            pytest.param(lambda h, e: Pair(h, e), "missing", id="namedtuple-unknown-field"),
            pytest.param(lambda h, e: {"hidden": h}, "missing", id="dict-missing-key"),
            pytest.param(lambda h, e: {"hidden": h, "n": 3}, "n", id="dict-key-not-tensor"),
            pytest.param(lambda h, e: h, 0, id="index-on-tensor"),
            pytest.param(lambda h, e: MappingProxyType({"hidden": h}), None, id="read-only-mapping"),
        ],
    )
    def test_bad_output_raises(self, wrap, select) -> None:
        model = Holder(Block(wrap))
        with attach_double(model, output_select=select), pytest.raises(SelectionError, match=site_error()):
            model(torch.randn(2, 4))

    @pytest.mark.parametrize(
        ("call", "select"),
        [
            pytest.param(lambda m, x, y: m([x]), None, id="list-argument"),
            pytest.param(lambda m, x, y: m(x=None, y=None), None, id="keywords-without-tensor"),
            pytest.param(lambda m, x, y: m(x), "y", id="name-not-passed"),
            pytest.param(lambda m, x, y: m(x, y=None), "y", id="name-passed-none"),
            pytest.param(lambda m, x, y: m(x, y), 2, id="index-out-of-range"),
            pytest.param(lambda m, x, y: m(x, y), "z", id="unknown-name"),
        ],
    )
    def test_bad_input_raises(self, call, select) -> None:
        model = Holder(Pairwise())
        x, y = torch.randn(2, 4), torch.randn(2, 4)
        with attach_double(model, insertion="input", input_select=select), pytest.raises(
            SelectionError, match=site_error()
        ):
            call(model, x, y)

    def test_parallel_bad_input_raises(self) -> None:
        model = Holder(Pairwise())
        with attach_double(model, insertion="parallel", input_select="y"), pytest.raises(
            SelectionError, match=site_error()
        ):
            model(torch.randn(2, 4))

    def test_error_describes_output(self) -> None:
        """The message shows what the host returned, so the user can pick output_select."""
        model = Holder(Block(lambda h, e: {"hidden": h}))
        with attach_double(model, output_select="missing"), pytest.raises(SelectionError, match=r"keys \['hidden'\]"):
            model(torch.randn(2, 4))

    def test_error_is_type_error(self) -> None:
        model = Holder(Block(lambda h, e: "text"))
        with attach_double(model), pytest.raises(TypeError):
            model(torch.randn(2, 4))

    def test_model_usable_after_error(self) -> None:
        """After a selection error, detaching restores the plain output."""
        model = Holder(Block(lambda h, e: (1, h)))
        x = torch.randn(2, 4)
        adapter_set = attach_double(model)
        with pytest.raises(SelectionError):
            model(x)
        adapter_set.detach()
        assert model(x)[1] is model.block.last[1]


class Net(nn.Module):
    """A linear layer with different input and output sizes, then tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


NETWORK_KINDS = {
    "linear-pre": ({"kind": "linear", "dim": 3}, "residual_add"),
    "linear-post": ({"kind": "linear", "dim": 3, "norm_position": "post", "activation": "relu"}, "residual_add"),
    "lora": ({"kind": "lora", "rank": 2, "alpha": 4}, "residual_add"),
    "lora-rslora": ({"kind": "lora", "rank": 4, "use_rslora": True}, "residual_add"),
    "scale": ({"kind": "scale"}, "multiply"),
}
ZERO_CASES = [
    pytest.param(kind, insertion, id=f"{kind}-{insertion}")
    for kind in NETWORK_KINDS
    for insertion in ("output", "parallel", "input")
]


class TestZeroInit:
    @pytest.mark.parametrize(("kind", "insertion"), ZERO_CASES)
    def test_output_bitwise_unchanged(self, kind: str, insertion: str) -> None:
        torch.manual_seed(0)
        model = Net()
        x = torch.randn(3, 5, 4)
        before = model(x)
        network, strategy = NETWORK_KINDS[kind]
        config = {"ad": {"target": "fc", "insertion": insertion, "network": network, "strategy": strategy}}
        with hookadapt.adapters(model, config):
            result = model(x)
        assert torch.equal(result, before)

    @pytest.mark.parametrize(("kind", "insertion"), ZERO_CASES)
    def test_tuple_output_unchanged(self, kind: str, insertion: str) -> None:
        """Fresh adapters also leave a tuple output's first element bitwise unchanged."""
        torch.manual_seed(1)
        model = Holder(Block(lambda h, e: (h, e)))
        x = torch.randn(2, 4)
        before = model(x)[0]
        network, strategy = NETWORK_KINDS[kind]
        config = {"ad": {"target": "block", "insertion": insertion, "network": network, "strategy": strategy}}
        with hookadapt.adapters(model, config):
            result = model(x)[0]
        assert torch.equal(result, before)

    def test_all_insertions_together(self) -> None:
        """One site with an adapter of every kind and insertion still gives the same output."""
        torch.manual_seed(2)
        model = Net()
        x = torch.randn(3, 4)
        before = model(x)
        config = {
            f"{kind.replace('-', '_')}_{insertion}": {
                "target": "fc",
                "insertion": insertion,
                "network": NETWORK_KINDS[kind][0],
                "strategy": NETWORK_KINDS[kind][1],
            }
            for kind in NETWORK_KINDS
            for insertion in ("output", "parallel", "input")
        }
        with hookadapt.adapters(model, config):
            result = model(x)
        assert torch.equal(result, before)
