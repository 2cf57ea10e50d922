"""Property-based tests: random small models, random adapter configs and random sequences of operations.

Every adapted output is compared bitwise with a reference that runs the
plain modules' ``forward`` methods (bypassing hooks) and applies each
adapter's network and strategy by hand, from the network's parameters.
The reference uses none of hookadapt's sites or hooks. It walks the model
by the tests' own description of it and keeps its own record of which
adapters are attached and enabled.
"""

from __future__ import annotations

import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import hookadapt
from hookadapt.sites import preserves_input
from conftest import assert_restored, snapshot

EXAMPLES = 200
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BATCH = 2
# A batch of this many rows makes every `Raiser` host raise.
FAILING_BATCH = 3
HEAD_FEATURES = 3
RESERVED = "_hookadapt"
NAMES = ("a", "b", "c", "d")
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "swish": F.silu, "identity": lambda x: x}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Any:
    """Run torch on one thread, because tiny ops wait for the thread pool on a busy machine.

    On a loaded 2-core machine, a layer_norm of a 2x4 tensor took 12 ms with two threads and 0.2 ms with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Models.


class Residual(nn.Module):
    """``x + inner(x)`` with a Sequential inner branch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class Twice(nn.Module):
    """Call one Linear twice per forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


class Tied(nn.Module):
    """Call one Linear through two attribute names, so the module has two paths but one hook dict."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = self.first
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.act(self.first(x)))


class HostFailure(RuntimeError):
    """The error that `Raiser` raises."""


class Raiser(nn.Module):
    """Return the input unchanged, or raise `HostFailure` for a batch of `FAILING_BATCH` rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == FAILING_BATCH:
            raise HostFailure(f"Raiser got a batch of {FAILING_BATCH} rows")
        return x


class Net(nn.Module):
    """A Sequential body followed by a Linear head."""

    def __init__(self, body: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class ModelInfo:
    """A built model and what the tests know about it without asking hookadapt."""

    model: nn.Module
    in_width: int
    paths: list[str]
    modules: dict[str, nn.Module]
    path_of: dict[int, str]
    widths: dict[str, tuple[int, int]]
    declared: dict[str, bool]
    sequence: dict[int, list[nn.Module]]
    has_raiser: bool

    def owner_path(self, path: str) -> str | None:
        """Return the path of the module that keeps the adapters of host ``path``, as docs/design.md places them.

        That is the nearest module at or above the host that is not a Sequential, else the first
        such module below it, else None.
        """
        current: str | None = path
        while current is not None:
            if not isinstance(self.modules[current], nn.Sequential):
                return current
            current = None if current == "" else current.rpartition(".")[0]
        prefix = f"{path}." if path else ""
        below = [other for other in self.paths if other.startswith(prefix) and other != path]
        return next((other for other in below if not isinstance(self.modules[other], nn.Sequential)), None)


BLOCKS = st.one_of(
    st.tuples(st.just("linear"), st.integers(4, 8)),
    st.tuples(st.just("act"), st.sampled_from(["relu", "tanh", "gelu"])),
    st.just(("norm",)),
    st.just(("residual",)),
    st.just(("twice",)),
    st.just(("tied",)),
    st.just(("raiser",)),
)
MODEL_SPECS = st.fixed_dictionaries(
    {
        "width": st.integers(4, 8),
        "blocks": st.lists(BLOCKS, min_size=1, max_size=5),
        "bare": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _block(spec: tuple, width: int) -> tuple[nn.Module, int]:
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(width, spec[1]), spec[1]
    if kind == "act":
        return {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[spec[1]](), width
    if kind == "norm":
        return nn.LayerNorm(width), width
    if kind == "residual":
        return Residual(width), width
    if kind == "twice":
        return Twice(width), width
    if kind == "tied":
        return Tied(width), width
    return Raiser(), width


def build_model(spec: dict[str, Any]) -> ModelInfo:
    """Build the model that ``spec`` describes, with weights from its seed, and describe it."""
    width = spec["width"]
    widths: dict[int, tuple[int, int]] = {}
    blocks = []
    current = width
    for block_spec in spec["blocks"]:
        block, out_width = _block(block_spec, current)
        for module in block.modules():
            # Every module below a block keeps its block's width, except a Linear block itself.
            widths[id(module)] = (current, out_width) if module is block else (current, current)
        blocks.append(block)
        current = out_width
    head = nn.Linear(current, HEAD_FEATURES)
    widths[id(head)] = (current, HEAD_FEATURES)
    if spec["bare"]:
        model: nn.Module = nn.Sequential(*blocks, head)
    else:
        body = nn.Sequential(*blocks)
        widths[id(body)] = (width, current)
        model = Net(body, head)
    # A private generator, because torch.manual_seed also seeds every accelerator backend, which is slow.
    generator = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.6, 0.6, generator=generator)
    widths[id(model)] = (width, HEAD_FEATURES)

    modules = dict(model.named_modules())
    paths = list(modules)
    declaring = (nn.Linear, nn.LayerNorm)
    declared = {
        path: isinstance(module, declaring) or any(isinstance(inner, declaring) for inner in module.modules())
        for path, module in modules.items()
    }
    return ModelInfo(
        model=model,
        in_width=width,
        paths=paths,
        modules=modules,
        path_of={id(module): path for path, module in modules.items()},
        widths={path: widths[id(module)] for path, module in modules.items()},
        declared=declared,
        sequence={id(module): list(module._modules.values()) for module in modules.values() if isinstance(module, nn.Sequential)},
        has_raiser=any(isinstance(module, Raiser) for module in modules.values()),
    )


# Adapter configs and the reference.


@dataclass
class AdapterRecord:
    """One adapter as the tests configured it."""

    name: str
    kind: str
    options: dict[str, Any]
    strategy: str
    strategy_options: dict[str, Any]
    insertion: str
    dtype: str
    shared: bool
    paths: list[str]

    def sizes(self, info: ModelInfo, path: str) -> tuple[int, int]:
        """Return the network's (in_features, out_features) at ``path``."""
        host_in, host_out = info.widths[path]
        if self.insertion == "output":
            return host_out, host_out
        if self.insertion == "input":
            return host_in, host_in
        return host_in, host_out

    def tensor_shapes(self, info: ModelInfo, path: str) -> dict[str, tuple[int, ...]]:
        """Return the network's parameter shapes at ``path``, by parameter name."""
        in_size, out_size = self.sizes(info, path)
        if self.kind == "lora":
            rank = self.options["rank"]
            return {"lora_A.weight": (rank, in_size), "lora_B.weight": (out_size, rank)}
        if self.kind == "scale":
            return {"weight": (out_size,)}
        dim = self.options["dim"]
        norm = in_size if self.options["norm_position"] == "pre" else out_size
        return {"norm.weight": (norm,), "norm.bias": (norm,), "down.weight": (dim, in_size), "up.weight": (out_size, dim)}


@dataclass
class SetRecord:
    """A live adapter set with the tests' own record of its adapters and enabled flags."""

    adapter_set: hookadapt.AdapterSet = field(repr=False)
    adapters: dict[str, AdapterRecord] = field(repr=False)
    enabled: dict[str, bool] = field(default_factory=dict)

    def network(self, name: str, path: str) -> nn.Module:
        return self.adapter_set.adapters[name][path].network


def network_output(record: AdapterRecord, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Compute the adapter network's output from its parameters, with torch.nn.functional only."""
    options = record.options
    if record.kind == "scale":
        return network.weight
    if record.kind == "lora":
        rank = options["rank"]
        scaling = options["alpha"] / math.sqrt(rank) if options["use_rslora"] else options["alpha"] / rank
        return F.linear(F.linear(x, network.lora_A.weight), network.lora_B.weight) * scaling
    norm = network.norm
    if options["norm_position"] == "pre":
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    x = F.linear(ACTIVATIONS[options["activation"]](F.linear(x, network.down.weight)), network.up.weight)
    if options["norm_position"] == "post":
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return x


def compose(record: AdapterRecord, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge ``out`` into the host tensor ``x`` as the record's strategy does, in the wider dtype."""
    host_dtype = x.dtype
    merge_dtype = torch.promote_types(host_dtype, DTYPES[record.dtype])
    x = x.to(merge_dtype)
    out = out.to(merge_dtype)
    if record.strategy == "residual_add":
        result = x + out
    elif record.strategy == "scaled_add":
        result = x + record.strategy_options["scale"] * out
    elif record.strategy == "multiply":
        result = x * out
    else:
        result = out
    return result.to(host_dtype)


def run_adapter(set_record: SetRecord, record: AdapterRecord, path: str, x: torch.Tensor) -> torch.Tensor:
    return network_output(record, set_record.network(record.name, path), x.to(DTYPES[record.dtype]))


def reference_output(info: ModelInfo, live: list[SetRecord], x: torch.Tensor) -> torch.Tensor:
    """Run the model without its hooks, applying the live, enabled adapters by hand."""

    def call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        path = info.path_of[id(module)]
        active = [
            (set_record, [record for record in set_record.adapters.values() if path in record.paths and set_record.enabled[record.name]])
            for set_record in live
        ]
        # Pre-hooks run in attach order: input adapters first, then the parallel branches read the input.
        # At a built-in layer that never changes its input, the branches read the input the host
        # received, after every set's input adapters.
        parallel = []
        for set_record, records in active:
            for record in records:
                if record.insertion == "input":
                    x = compose(record, x, run_adapter(set_record, record, path, x))
            parallel.append({record.name: run_adapter(set_record, record, path, x) for record in records if record.insertion == "parallel"})
        if preserves_input(module):
            parallel = [
                {record.name: run_adapter(set_record, record, path, x) for record in records if record.insertion == "parallel"}
                for set_record, records in active
            ]
        y = body(module, x)
        for (set_record, records), branches in zip(active, parallel):
            for record in records:
                if record.insertion == "parallel":
                    y = compose(record, y, branches[record.name])
                elif record.insertion == "output":
                    y = compose(record, y, run_adapter(set_record, record, path, y))
        return y

    def body(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Sequential):
            for child in info.sequence[id(module)]:
                x = call(child, x)
            return x
        if isinstance(module, Net):
            return call(module.head, call(module.body, x))
        if isinstance(module, Residual):
            return x + call(module.inner, x)
        if isinstance(module, Twice):
            return call(module.lin, call(module.lin, x))
        if isinstance(module, Tied):
            return call(module.second, call(module.act, call(module.first, x)))
        # Leaves: forward() itself skips the module's hooks.
        return module.forward(x)

    with torch.no_grad():
        return call(info.model, x)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.detach(), expected, rtol=0, atol=0, equal_nan=True)


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Compare within float32 rounding: the fused LoRA step rounds its scaled product and sum once."""
    torch.testing.assert_close(actual.detach(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)


def draw_adapter(
    data: st.DataObject,
    info: ModelInfo,
    name: str,
    *,
    identity: bool = False,
    shared: bool = True,
    paths: list[str] | None = None,
) -> tuple[AdapterRecord, dict[str, Any]]:
    """Draw one adapter for ``info``'s model and return the test's record and the config dict.

    With ``identity``, the adapter leaves outputs unchanged while its weights are fresh.
    ``paths`` fixes the targets, which are drawn from the model's paths otherwise.
    """
    kind = data.draw(st.sampled_from(["linear", "lora", "scale"]), label=f"{name} kind")
    if kind == "scale":
        choices = ["multiply"] if identity else ["multiply", "residual_add", "scaled_add"]
    elif identity:
        choices = ["residual_add", "scaled_add"]
    else:
        choices = ["residual_add", "scaled_add", "multiply", "return_result"]
    strategy = data.draw(st.sampled_from(choices), label=f"{name} strategy")
    if kind == "linear":
        options = {
            "dim": data.draw(st.integers(1, 4), label=f"{name} dim"),
            "activation": data.draw(st.sampled_from(sorted(ACTIVATIONS)), label=f"{name} activation"),
            "norm_position": data.draw(st.sampled_from(["pre", "post"]), label=f"{name} norm_position"),
        }
        full_options = {**options, "dropout": 0.0}
    elif kind == "lora":
        options = {
            "rank": data.draw(st.integers(1, 3), label=f"{name} rank"),
            "alpha": data.draw(st.sampled_from([1, 2.0, 4]), label=f"{name} alpha"),
            "use_rslora": data.draw(st.booleans(), label=f"{name} use_rslora"),
        }
        full_options = {**options, "dropout": 0.0}
    else:
        options = {} if identity else {"init": data.draw(st.sampled_from([1.0, 0.5, -2.0]), label=f"{name} init")}
        full_options = options
    strategy_options = {"scale": data.draw(st.sampled_from([0.5, -1.0, 2.0]), label=f"{name} scale")} if strategy == "scaled_add" else {}
    insertion = data.draw(st.sampled_from(["output", "input", "parallel"]), label=f"{name} insertion")
    dtype = data.draw(st.sampled_from(["float32", "float32", "float64"]), label=f"{name} dtype")
    if paths is None:
        paths = data.draw(st.lists(st.sampled_from(info.paths), min_size=1, max_size=2, unique=True), label=f"{name} targets")
    target_form = data.draw(st.sampled_from(["list", "regex", "single"]), label=f"{name} target form")
    if target_form == "regex":
        target: Any = "re:" + "|".join(re.escape(path) for path in paths)
    elif target_form == "single" and len(paths) == 1:
        target = paths[0]
    else:
        target = list(paths)
    shared = shared and len(paths) > 1 and data.draw(st.booleans(), label=f"{name} shared")
    spec = {
        "target": target,
        "insertion": insertion,
        "network": {"kind": kind, **options},
        "strategy": {"kind": strategy, **strategy_options},
        "dtype": dtype,
        "shared": shared,
    }
    ordered = [path for path in info.paths if path in paths]
    record = AdapterRecord(name, kind, full_options, strategy, strategy_options, insertion, dtype, shared, ordered)
    return record, spec


def draw_config(
    data: st.DataObject, info: ModelInfo, *, identity: bool = False, shared: bool = True
) -> tuple[dict[str, AdapterRecord], dict[str, Any]]:
    """Draw a config of one to three adapters, with one network per site unless ``shared`` allows sharing."""
    names = data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True), label="names")
    records, config = {}, {}
    for name in names:
        records[name], config[name] = draw_adapter(data, info, name, identity=identity, shared=shared)
    return records, config


def predicted_attach_error(info: ModelInfo, records: dict[str, AdapterRecord], probe: bool) -> type[Exception] | None:
    """Return the error attaching ``records`` must raise for reasons inside the config, or None."""
    for record in records.values():
        if not probe and any(not info.declared[path] for path in record.paths):
            return hookadapt.ShapeError
    for record in records.values():
        if record.shared and len({record.sizes(info, path) for path in record.paths}) > 1:
            return hookadapt.ShapeError
    return None


def randomize_parameters(adapter_set: hookadapt.AdapterSet, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_set.parameters(include_train_modules=False):
            param.copy_((torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.5).to(param.dtype))


def batch(info: ModelInfo, seed: int, rows: int = BATCH, width: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, info.in_width if width is None else width, generator=generator)


def pending_calls(adapter_set: hookadapt.AdapterSet) -> int:
    """Count the per-call entries that the set's sites hold on this thread (private state, read only)."""
    return sum(len(getattr(site._local, "stack", [])) for site in adapter_set.sites)


# The state machine.


@dataclass
class SavedFile:
    """An adapter file the machine wrote, with what it must contain."""

    path: Path
    content: bytes
    adapters: dict[str, AdapterRecord]
    values: dict[tuple[str, str, str], torch.Tensor]


class AdapterMachine(RuleBasedStateMachine):
    """Random attach, enable, disable, forward, failing forward, save, load and detach sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.live: list[SetRecord] = []
        self.files: list[SavedFile] = []
        self.folder = tempfile.TemporaryDirectory()
        self.info: ModelInfo | None = None

    @initialize(spec=MODEL_SPECS, training=st.booleans())
    def build(self, spec: dict[str, Any], training: bool) -> None:
        self.info = build_model(spec)
        model = self.info.model
        model.eval()
        self.pristine = {False: snapshot(model)}
        model.train()
        self.pristine[True] = snapshot(model)
        model.train(training)

    # Helpers.

    @property
    def model(self) -> nn.Module:
        return self.info.model

    def live_values(self) -> list[torch.Tensor]:
        return [param.detach().clone() for record in self.live for param in record.adapter_set.parameters()]

    def assert_values_unchanged(self, before: list[torch.Tensor]) -> None:
        after = self.live_values()
        assert len(after) == len(before), "the number of adapter parameters changed"
        changed = [index for index, (old, new) in enumerate(zip(before, after)) if not torch.equal(old, new)]
        assert not changed, f"adapter parameters {changed} changed"

    def live_names(self) -> dict[str, SetRecord]:
        return {name: record for record in self.live for name in record.adapters}

    # Rules.

    @rule(data=st.data())
    def attach(self, data: st.DataObject) -> None:
        records, config = draw_config(data, self.info)
        probe = data.draw(st.booleans(), label="probe")
        replace = data.draw(st.booleans(), label="replace")
        randomize_seed = data.draw(st.one_of(st.none(), st.integers(0, 2**16)), label="randomize seed")

        live_names = self.live_names()
        replaced = [record for record in self.live if any(name in live_names and live_names[name] is record for name in records)]
        expected = predicted_attach_error(self.info, records, probe)
        if replaced and not replace:
            expected = hookadapt.AttachError
        elif expected is None and replaced and replaced != self.live[len(self.live) - len(replaced):]:
            # Sets detach newest first, so only the newest sets can be replaced.
            expected = hookadapt.AttachError

        example_inputs = (batch(self.info, 0),) if probe else None
        before = self.live_values()
        if expected is not None:
            with pytest.raises(expected):
                hookadapt.attach(self.model, config, example_inputs=example_inputs, replace=replace)
            self.assert_values_unchanged(before)
            for record in self.live:
                assert record.adapter_set.is_attached, "a failed attach detached an adapter set"
            return

        adapter_set = hookadapt.attach(self.model, config, example_inputs=example_inputs, replace=replace)
        for record in replaced:
            assert not record.adapter_set.is_attached, "replace=True left a replaced set attached"
            self.live.remove(record)
        if randomize_seed is not None:
            randomize_parameters(adapter_set, randomize_seed)
        self.live.append(SetRecord(adapter_set, records, dict.fromkeys(records, True)))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), enable=st.booleans())
    def toggle(self, data: st.DataObject, enable: bool) -> None:
        record = self.live[data.draw(st.integers(0, len(self.live) - 1), label="set index")]
        every = data.draw(st.booleans(), label="every adapter")
        names = list(record.adapters) if every else [data.draw(st.sampled_from(sorted(record.adapters)), label="name")]
        arguments = () if every else tuple(names)
        if enable:
            record.adapter_set.enable(*arguments)
        else:
            record.adapter_set.disable(*arguments)
        for name in names:
            record.enabled[name] = enable

    @rule(seed=st.integers(0, 2**16), grad=st.booleans())
    def forward(self, seed: int, grad: bool) -> None:
        x = batch(self.info, seed)
        expected = reference_output(self.info, self.live, x)
        with torch.set_grad_enabled(grad):
            actual = self.model(x)
        assert_rounding_close(actual, expected)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def forward_disabled(self, data: st.DataObject, seed: int) -> None:
        record = self.live[data.draw(st.integers(0, len(self.live) - 1), label="set index")]
        names = data.draw(st.lists(st.sampled_from(sorted(record.adapters)), min_size=1, unique=True), label="names")
        flags = dict(record.enabled)
        x = batch(self.info, seed)
        with record.adapter_set.disabled(*names):
            record.enabled.update(dict.fromkeys(names, False))
            expected = reference_output(self.info, self.live, x)
            actual = self.model(x)
        record.enabled = flags
        assert_rounding_close(actual, expected)

    @rule(kind=st.sampled_from(["raiser", "width"]), grad=st.booleans())
    def failing_forward(self, kind: str, grad: bool) -> None:
        if kind == "raiser" and self.info.has_raiser:
            x = batch(self.info, 1, rows=FAILING_BATCH)
            expected: tuple[type[Exception], ...] = (HostFailure,)
        else:
            x = batch(self.info, 1, width=self.info.in_width + 1)
            expected = (RuntimeError, hookadapt.ShapeError)
        before = self.live_values()
        with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(grad):
            warnings.simplefilter("always")
            with pytest.raises(expected):
                self.model(x)
        messages = [str(warning.message) for warning in caught]
        assert not messages, f"a failing forward emitted warnings: {messages}"
        for record in self.live:
            assert pending_calls(record.adapter_set) == 0, "a failing forward left a per-call entry"
        self.assert_values_unchanged(before)

    @rule(training=st.booleans())
    def set_mode(self, training: bool) -> None:
        self.model.train(training)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.live) - 1), label="set index")
        record = self.live[index]
        if index != len(self.live) - 1:
            before = self.live_values()
            with pytest.raises(hookadapt.AttachError, match="detach the later set first"):
                record.adapter_set.detach()
            assert record.adapter_set.is_attached, "a refused detach detached the set"
            self.assert_values_unchanged(before)
            return
        record.adapter_set.detach()
        self.live.pop()

    @precondition(lambda self: self.live)
    @rule()
    def detach_all(self) -> None:
        count = hookadapt.detach_all(self.model)
        assert count == len(self.live)
        self.live.clear()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def save(self, data: st.DataObject) -> None:
        record = self.live[data.draw(st.integers(0, len(self.live) - 1), label="set index")]
        every = data.draw(st.booleans(), label="every adapter")
        if every:
            names = sorted(record.adapters)
        else:
            names = data.draw(st.lists(st.sampled_from(sorted(record.adapters)), min_size=1, unique=True), label="names")
        path = Path(self.folder.name) / f"adapters{len(self.files)}.safetensors"
        written = hookadapt.save_adapters(record.adapter_set, path, names=None if every else names)
        assert written == path
        values = {
            (name, site, key): value.detach().clone()
            for name in names
            for site in record.adapters[name].paths
            for key, value in record.network(name, site).named_parameters()
        }
        adapters = {name: record.adapters[name] for name in record.adapters if name in names}
        self.files.append(SavedFile(path, path.read_bytes(), adapters, values))

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        saved = self.files[data.draw(st.integers(0, len(self.files) - 1), label="file index")]
        subset = data.draw(st.booleans(), label="subset")
        names = sorted(saved.adapters)
        if subset:
            names = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True), label="names")
        chosen = {name: saved.adapters[name] for name in saved.adapters if name in names}

        live_names = self.live_names()
        holders = {id(live_names[name]): live_names[name] for name in chosen if name in live_names}
        target: SetRecord | None = None
        if not holders:
            expected_error = None
        elif len(holders) > 1 or any(name not in live_names for name in chosen):
            expected_error = hookadapt.CheckpointError
        else:
            target = next(iter(holders.values()))
            expected_error = None if self._fits(target, chosen) else hookadapt.CheckpointError

        before = self.live_values()
        if expected_error is not None:
            with pytest.raises(expected_error):
                hookadapt.load_adapters(self.model, saved.path, names=names if subset else None)
            self.assert_values_unchanged(before)
        else:
            adapter_set = hookadapt.load_adapters(self.model, saved.path, names=names if subset else None)
            if target is None:
                self.live.append(SetRecord(adapter_set, dict(chosen), dict.fromkeys(chosen, True)))
                target = self.live[-1]
            assert adapter_set is target.adapter_set, "the load did not go into the set that holds the names"
            for (name, site, key), value in saved.values.items():
                if name in chosen:
                    loaded = dict(target.network(name, site).named_parameters())[key]
                    assert_bitwise(loaded, value)
        assert saved.path.read_bytes() == saved.content, "loading changed the file"

    def _fits(self, target: SetRecord, chosen: dict[str, AdapterRecord]) -> bool:
        """Return whether the file's adapters have the live adapters' sites, sizes, tensor shapes and dtypes."""
        for name, stored in chosen.items():
            live = target.adapters[name]
            if stored.paths != live.paths:
                return False
            for path in live.paths:
                if stored.sizes(self.info, path) != live.sizes(self.info, path):
                    return False
                if stored.tensor_shapes(self.info, path) != live.tensor_shapes(self.info, path):
                    return False
            if stored.dtype != live.dtype:
                return False
        return True

    # Invariants.

    @invariant()
    def attached_sets_match(self) -> None:
        if self.info is None:
            return
        found = hookadapt.attached(self.model)
        assert [id(item) for item in found] == [id(record.adapter_set) for record in self.live]

    @invariant()
    def hooks_within_sites(self) -> None:
        """Check that no module has more hooks than its live sites need, and no stale flag entries.

        A site may leave out a hook that has nothing to run, so the counts are upper bounds.
        The forward rules check that the hooks that matter do run.
        """
        if self.info is None:
            return
        for path in self.info.paths:
            module = self.info.modules[path]
            pre = forward = 0
            for record in self.live:
                insertions = {adapter.insertion for adapter in record.adapters.values() if path in adapter.paths}
                pre += bool(insertions & {"input", "parallel"})
                forward += bool(insertions & {"output", "parallel"})
            assert len(module._forward_pre_hooks) <= pre, f"pre-hooks of {path!r}"
            assert len(module._forward_hooks) <= forward, f"forward hooks of {path!r}"
            assert set(module._forward_pre_hooks_with_kwargs) <= set(module._forward_pre_hooks), f"stale pre-hook flags of {path!r}"
            assert set(module._forward_hooks_with_kwargs) <= set(module._forward_hooks), f"stale forward hook flags of {path!r}"
            assert set(module._forward_hooks_always_called) <= set(module._forward_hooks), f"stale always-call flags of {path!r}"
            for name in ("_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
                assert not getattr(module, name), f"{name} of {path!r}"

    @invariant()
    def holders_match_owners(self) -> None:
        if self.info is None:
            return
        owners: dict[str, int] = {}
        for record in self.live:
            for adapter in record.adapters.values():
                for path in adapter.paths:
                    owner = self.info.owner_path(path)
                    if owner is not None:
                        owners[owner] = owners.get(owner, 0) + 1
        for path in self.info.paths:
            holder = self.info.modules[path]._modules.get(RESERVED)
            count = 0 if holder is None else len(holder._modules)
            assert count == owners.get(path, 0), f"adapters held by {path!r}"

    @invariant()
    def restored_without_sets(self) -> None:
        if self.info is None or self.live:
            return
        assert_restored(self.model, self.pristine[self.model.training])

    def teardown(self) -> None:
        try:
            if self.info is not None:
                hookadapt.detach_all(self.model)
                assert_restored(self.model, self.pristine[self.model.training])
        finally:
            self.folder.cleanup()


TestAdapterMachine = AdapterMachine.TestCase
TestAdapterMachine.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # One shrunk failure is readable, and shrinking several long runs takes minutes.
    report_multiple_bugs=False,
)


# Single properties.


@PROPERTY_SETTINGS
@given(spec=MODEL_SPECS, data=st.data(), seed=st.integers(0, 2**16))
def test_fresh_adapters_identity(spec: dict[str, Any], data: st.DataObject, seed: int) -> None:
    """Fresh adapters that start at zero or one leave every output bitwise unchanged."""
    info = build_model(spec)
    model = info.model
    before = snapshot(model)
    x = batch(info, seed)
    with torch.no_grad():
        base = model(x)
    _, config = draw_config(data, info, identity=True, shared=False)
    with hookadapt.adapters(model, config, example_inputs=(x,)):
        with torch.no_grad():
            adapted = model(x)
    assert_bitwise(adapted, base)
    assert_restored(model, before)


@PROPERTY_SETTINGS
@given(spec=MODEL_SPECS, data=st.data(), seed=st.integers(0, 2**16))
def test_roundtrip_into_twin(spec: dict[str, Any], data: st.DataObject, seed: int) -> None:
    """Adapters saved from one model and loaded into an identical twin give the same output bitwise."""
    info = build_model(spec)
    twin = build_model(spec)
    before = snapshot(twin.model)
    records, config = draw_config(data, info, shared=False)
    x = batch(info, seed)
    adapter_set = hookadapt.attach(info.model, config, example_inputs=(x,))
    randomize_parameters(adapter_set, seed)
    expected = reference_output(info, [SetRecord(adapter_set, records, dict.fromkeys(records, True))], x)
    with tempfile.TemporaryDirectory() as folder:
        path = hookadapt.save_adapters(adapter_set, Path(folder) / "adapters.safetensors")
        content = path.read_bytes()
        with hookadapt.load_adapters(twin.model, path):
            with torch.no_grad():
                loaded = twin.model(x)
        assert path.read_bytes() == content, "loading changed the file"
    assert_bitwise(loaded, expected)
    assert_restored(twin.model, before)


@PROPERTY_SETTINGS
@given(block=BLOCKS, width=st.integers(4, 8), data=st.data(), seed=st.integers(0, 2**16))
def test_nested_sets_one_host(block: tuple, width: int, data: st.DataObject, seed: int) -> None:
    """Two or three adapter sets on one host compose in attach order, whatever the host's class."""
    info = build_model({"width": width, "blocks": [block], "bare": False, "seed": seed})
    before = snapshot(info.model)
    host_path = data.draw(st.sampled_from([path for path in info.paths if path.startswith("body.0")]), label="host")
    x = batch(info, seed)
    live = []
    for name in NAMES[: data.draw(st.integers(2, 3), label="set count")]:
        record, spec = draw_adapter(data, info, name, shared=False, paths=[host_path])
        adapter_set = hookadapt.attach(info.model, {name: spec}, example_inputs=(x,))
        randomize_parameters(adapter_set, seed + len(live))
        live.append(SetRecord(adapter_set, {name: record}, {name: True}))
    expected = reference_output(info, live, x)
    with torch.no_grad():
        actual = info.model(x)
    hookadapt.detach_all(info.model)
    assert_rounding_close(actual, expected)
    assert_restored(info.model, before)


class Wrapper(nn.Module):
    """A root that calls one child, so the child is a target by path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@PROPERTY_SETTINGS
@given(
    host_kind=st.sampled_from(["linear", "norm"]),
    in_features=st.integers(1, 32),
    out_features=st.integers(1, 32),
    rank=st.integers(1, 16),
    alpha=st.sampled_from([1, 3, 16.0]),
    leading=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    training=st.booleans(),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lora_parallel_formula(
    host_kind: str,
    in_features: int,
    out_features: int,
    rank: int,
    alpha: float,
    leading: list[int],
    training: bool,
    grad: bool,
    seed: int,
) -> None:
    """A lone parallel LoRA gives ``host(x) + B(A(x)) * alpha / rank`` up to float32 rounding."""
    host = nn.Linear(in_features, out_features) if host_kind == "linear" else nn.LayerNorm(in_features)
    model = Wrapper(host)
    model.train(training)
    generator = torch.Generator().manual_seed(seed)
    config = {"lora": {"target": "inner", "insertion": "parallel", "network": {"kind": "lora", "rank": rank, "alpha": alpha}}}
    x = torch.randn(*leading, in_features, generator=generator)
    with hookadapt.adapters(model, config) as adapter_set:
        randomize_parameters(adapter_set, seed)
        network = adapter_set.adapters["lora"]["inner"].network
        with torch.no_grad():
            expected = host.forward(x) + F.linear(F.linear(x, network.lora_A.weight), network.lora_B.weight) * (alpha / rank)
        with torch.set_grad_enabled(grad):
            actual = model(x)
    assert_rounding_close(actual, expected)
