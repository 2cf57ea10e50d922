"""Checkpoint layout, wrappers, shared storage, subsets, dtypes, fingerprints, bad files and crash safety."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

import hookadapt
from conftest import assert_restored, randomize, snapshot
from hookadapt.checkpoint import LoadResult, read_checkpoint
from hookadapt.files import MAX_HEADER_BYTES

GOLDEN = Path(__file__).parent / "golden" / "checkpoint_layout.json"
UPDATE_GOLDEN = "HOOKADAPT_UPDATE_GOLDEN"
CONFIG = {
    "bottleneck": {"target": "body.0", "network": {"kind": "linear", "dim": 4}},
    "lora": {"target": "body.2", "insertion": "parallel", "network": {"kind": "lora", "rank": 2, "alpha": 4}},
    "ia3": {"target": ["body.0", "body.2"], "network": "scale", "strategy": "multiply", "shared": True},
}
SHARED_CONFIG = {
    "shared": {"target": ["body.0", "body.2"], "network": {"kind": "linear", "dim": 4}, "shared": True},
}
LORA_ONLY = {"lora": CONFIG["lora"]}
LORA_A = "adapters/lora/body.2/network.lora_A.weight"
LORA_B = "adapters/lora/body.2/network.lora_B.weight"
SCALE_0 = "adapters/ia3/body.0/network.weight"
SCALE_2 = "adapters/ia3/body.2/network.weight"
DOWN = "adapters/bottleneck/body.0/network.down.weight"


class Toy(nn.Module):
    """An input projection, a Sequential body of two square Linear layers and a head."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(6, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class OtherLinear(nn.Linear):
    """A Linear subclass, so a site has another class with the same tensor shapes."""


class Tied(nn.Module):
    """An embedding and an output layer that share one weight Parameter, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class TiedToy(nn.Module):
    """The tied pair as a child, and an adapted Linear between its two halves."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = Tied()
        self.mix = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.head(self.mix(self.lm.embed(ids)))


class Views(nn.Module):
    """Parameters that are non-contiguous or overlapping views of one storage."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        base = torch.randn(8, 12)
        if layout == "transposed":
            self.weight = nn.Parameter(base[:, :6].t())
        elif layout == "strided":
            self.weight = nn.Parameter(base[:, ::2].t())
        else:
            self.weight = nn.Parameter(base[:6, :8])
            self.other = nn.Parameter(base[2:, :8])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class ViewsToy(nn.Module):
    """A Linear body with an adapter, followed by a head whose parameters are views."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = Views(layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def toy(hidden: int = 16) -> Toy:
    """Build the toy model with fixed weights, in eval mode."""
    torch.manual_seed(0)
    return Toy(hidden).eval()


def toy_input() -> torch.Tensor:
    """Return a fixed random input for `Toy`."""
    return torch.randn((4, 6), generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a model without gradients."""
    with torch.no_grad():
        return model(x)


def attach_random(model: nn.Module, config: dict = CONFIG, seed: int = 0, **kwargs: Any) -> hookadapt.AdapterSet:
    """Attach ``config`` with the head as a train module and give every adapter parameter random values."""
    torch.manual_seed(seed)
    adapter_set = hookadapt.attach(model, config, train_modules=kwargs.pop("train_modules", ["head"]), **kwargs)
    randomize(adapter_set, seed)
    return adapter_set


def save_toy(path: Path, config: dict = CONFIG, **kwargs: Any) -> dict[str, Any]:
    """Save random adapters of ``config`` from a fresh toy, and return the file, its state and the adapted output."""
    model = toy()
    adapter_set = attach_random(model, config, **kwargs)
    hookadapt.save_adapters(adapter_set, path)
    saved = {"path": path, "state": clone_state(adapter_set), "output": run(model, toy_input())}
    adapter_set.detach()
    return saved


def clone_state(adapter_set: hookadapt.AdapterSet) -> dict[str, torch.Tensor]:
    """Return clones of the tensors an adapter set would save."""
    return {key: value.clone() for key, value in adapter_set.state_dict().items()}


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the raw tensors and metadata of a safetensors file."""
    with safetensors.safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def rewrite(source: Path, target: Path, *, tensors: dict | None = None, drop: tuple = (), **fields: str) -> Path:
    """Copy a hookadapt file to ``target`` with tensors replaced, metadata fields dropped or set."""
    stored, metadata = read_file(source)
    metadata = {key: value for key, value in metadata.items() if key not in drop}
    metadata.update(fields)
    safetensors.torch.save_file(stored if tensors is None else tensors, str(target), metadata=metadata)
    return target


def stored_config(path: Path) -> dict[str, Any]:
    """Return the parsed config stored in a hookadapt file."""
    return json.loads(read_file(path)[1]["config"])


def header_layout(path: Path) -> dict[str, Any]:
    """Return the safetensors header of a file: dtype and shape per key, and the metadata."""
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    metadata = header.pop("__metadata__")
    tensors = {key: {"dtype": entry["dtype"], "shape": entry["shape"]} for key, entry in header.items()}
    return {"tensors": tensors, "metadata": metadata}


# Golden layout.


def layout_record(path: Path) -> dict[str, Any]:
    """Return what the golden file pins: keys, shapes, dtypes, metadata names and parsed metadata values."""
    layout = header_layout(path)
    metadata = layout["metadata"]
    record = {
        "tensors": layout["tensors"],
        "metadata_fields": sorted(metadata),
        "format": metadata["format"],
        "format_version": metadata["format_version"],
    }
    for field in ("config", "sizes", "train_modules", "base_model", "aliases"):
        record[field] = json.loads(metadata[field])
    return record


def test_layout_matches_golden(tmp_path: Path) -> None:
    """The file layout of a fixed toy checkpoint equals tests/golden/checkpoint_layout.json.

    The golden file pins every key with its shape and dtype, the metadata field
    names, and the parsed config, sizes, train_modules, base_model and aliases.
    It leaves out the hookadapt_version value. After an intended layout change,
    regenerate it with ``HOOKADAPT_UPDATE_GOLDEN=1 python -m pytest
    tests/test_checkpoint_hardening.py -k golden`` and review the diff.
    """
    model = toy()
    adapter_set = hookadapt.attach(model, CONFIG, train_modules=["head"])
    path = hookadapt.save_adapters(adapter_set, tmp_path / "golden.safetensors")
    adapter_set.detach()
    record = layout_record(path)

    if os.environ.get(UPDATE_GOLDEN) == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; create it with {UPDATE_GOLDEN}=1"
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))

    assert sorted(record["tensors"]) == sorted(golden["tensors"]), "the checkpoint keys changed"
    for key, entry in golden["tensors"].items():
        assert record["tensors"].get(key) == entry, f"dtype or shape of {key} changed"
    for field in ("metadata_fields", "format", "format_version", "train_modules", "sizes", "aliases"):
        assert record[field] == golden[field], f"metadata {field} changed"
    assert record["config"] == golden["config"], "the stored config changed"
    assert record["base_model"] == golden["base_model"], "the base model fingerprint changed"


def test_golden_pins_each_feature() -> None:
    """The golden file covers all three network kinds, a train module and an alias."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    kinds = {spec["network"]["kind"] for spec in golden["config"].values()}

    assert kinds == {"linear", "lora", "scale"}, "the golden config lacks a network kind"
    assert golden["train_modules"] == ["head"], "the golden file has no train module"
    assert golden["aliases"] == {SCALE_2: SCALE_0}, "the golden file has no shared network alias"
    assert "hookadapt_version" in golden["metadata_fields"], "the version field name is not pinned"


# Wrappers.


@contextlib.contextmanager
def compiled(model: nn.Module) -> Iterator[nn.Module]:
    """Wrap with torch.compile and the eager backend, which compiles fast."""
    yield torch.compile(model, backend="eager")


@contextlib.contextmanager
def data_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """Wrap with DataParallel, which runs the module directly on CPU."""
    yield nn.DataParallel(model)


@contextlib.contextmanager
def compiled_data_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """Wrap DataParallel in torch.compile, two wrappers deep."""
    yield torch.compile(nn.DataParallel(model), backend="eager")


@contextlib.contextmanager
def distributed(model: nn.Module) -> Iterator[nn.Module]:
    """Wrap with DistributedDataParallel in a one-process gloo group that listens on 127.0.0.1 only.

    A ``tcp://`` init method would start a TCPStore, which listens on every
    interface (seen with ``ss -ltn`` on torch 2.13), so the group uses an
    in-memory store, and gloo takes a free port on the loopback device.
    """
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            yield nn.parallel.DistributedDataParallel(model)
        finally:
            dist.destroy_process_group()
    finally:
        if previous is None:
            del os.environ["GLOO_SOCKET_IFNAME"]
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = previous


# Wrappers that adapters may attach through; DistributedDataParallel needs them attached before wrapping.
WRAPPERS = [
    pytest.param(compiled, id="compile"),
    pytest.param(data_parallel, id="data-parallel"),
    pytest.param(compiled_data_parallel, id="compile-of-data-parallel"),
]


class TestWrappers:
    """torch.compile, DataParallel and DDP wrappers do not change keys, and files move between them."""

    @pytest.mark.parametrize("wrap", WRAPPERS)
    def test_wrapped_keys_match_bare(self, tmp_path: Path, wrap: Callable) -> None:
        """A wrapped model writes the same keys, tensors and metadata as the bare one."""
        bare = save_toy(tmp_path / "bare.safetensors")
        with wrap(toy()) as wrapped:
            adapter_set = attach_random(wrapped)
            hookadapt.save_adapters(adapter_set, tmp_path / "wrapped.safetensors")
            adapter_set.detach()
        bare_tensors, bare_metadata = read_file(bare["path"])
        tensors, metadata = read_file(tmp_path / "wrapped.safetensors")

        assert list(tensors) == list(bare_tensors), "the wrapped model saved other keys"
        for key, value in bare_tensors.items():
            assert torch.equal(tensors[key], value), f"tensor {key} differs"
        for field in ("config", "sizes", "train_modules", "base_model", "aliases"):
            assert metadata[field] == bare_metadata[field], f"metadata {field} differs"

    @pytest.mark.parametrize("wrap", WRAPPERS)
    def test_wrapped_file_loads_bare(self, tmp_path: Path, wrap: Callable) -> None:
        """A file saved through a wrapper loads into the bare model with the same output."""
        x = toy_input()
        with wrap(toy()) as wrapped:
            adapter_set = attach_random(wrapped)
            expected = run(wrapped, x)
            path = hookadapt.save_adapters(adapter_set, tmp_path / "wrapped.safetensors")
            adapter_set.detach()
        model = toy()
        before = snapshot(model)

        loaded = hookadapt.load_adapters(model, path)
        output = run(model, x)
        loaded.detach()

        assert torch.equal(output, expected), "the bare model gives another output"
        assert_restored(model, before)

    @pytest.mark.parametrize("wrap", WRAPPERS)
    def test_bare_file_loads_wrapped(self, tmp_path: Path, wrap: Callable) -> None:
        """A file saved from the bare model loads into a wrapper, and the wrapper gives the same output."""
        saved = save_toy(tmp_path / "bare.safetensors")
        model = toy()
        with wrap(model) as wrapped:
            loaded = hookadapt.load_adapters(wrapped, saved["path"])
            output = run(wrapped, toy_input())
            state = clone_state(loaded)
            sets = hookadapt.attached(model)
            loaded.detach()

        assert sets == [loaded], "the adapters are not attached to the wrapped module"
        assert list(state) == list(saved["state"]), "the wrapper loaded other keys"
        assert torch.equal(output, saved["output"]), "the wrapper gives another output"


class TestDistributedWrapper:
    """Adapters attach before DistributedDataParallel wraps the model, and save the same keys."""

    def test_attach_to_ddp_raises(self) -> None:
        model = toy()
        before = snapshot(model)
        with distributed(model) as wrapped:
            with pytest.raises(hookadapt.AttachError, match="adapters to the bare model first"):
                attach_random(wrapped)
        assert_restored(model, before)

    def test_load_into_ddp_raises(self, tmp_path: Path) -> None:
        saved = save_toy(tmp_path / "bare.safetensors")
        model = toy()
        before = snapshot(model)
        with distributed(model) as wrapped:
            with pytest.raises(hookadapt.AttachError, match="already wrapped in DistributedDataParallel"):
                hookadapt.load_adapters(wrapped, saved["path"])
        assert_restored(model, before)

    def test_attached_before_wrap_keys_match_bare(self, tmp_path: Path) -> None:
        bare = save_toy(tmp_path / "bare.safetensors")
        model = toy()
        adapter_set = attach_random(model)
        with distributed(model) as wrapped:
            run(wrapped, toy_input())
            hookadapt.save_adapters(adapter_set, tmp_path / "wrapped.safetensors")
        adapter_set.detach()
        bare_tensors, bare_metadata = read_file(bare["path"])
        tensors, metadata = read_file(tmp_path / "wrapped.safetensors")

        assert list(tensors) == list(bare_tensors), "the wrapped model saved other keys"
        for key, value in bare_tensors.items():
            assert torch.equal(tensors[key], value), f"tensor {key} differs"
        for field in ("config", "sizes", "train_modules", "base_model", "aliases"):
            assert metadata[field] == bare_metadata[field], f"metadata {field} differs"


# Shared storage.


class TestSharedStorage:
    """Tensors that share storage are stored once and come back shared, and views round-trip bitwise."""

    def test_shared_network_stored_once(self, tmp_path: Path) -> None:
        """A network reused at two sites is stored under the first site, and the second is an alias."""
        saved = save_toy(tmp_path / "shared.safetensors", SHARED_CONFIG)
        tensors, metadata = read_file(saved["path"])
        aliases = json.loads(metadata["aliases"])
        tensor_names = ["network.norm.weight", "network.norm.bias", "network.down.weight", "network.up.weight"]

        for name in tensor_names:
            assert f"adapters/shared/body.0/{name}" in tensors, f"{name} of the first site is not stored"
            assert f"adapters/shared/body.2/{name}" not in tensors, f"{name} of the second site is stored twice"
            alias = aliases.get(f"adapters/shared/body.2/{name}")
            assert alias == f"adapters/shared/body.0/{name}", f"{name} of the second site is not an alias of the first"

    def test_shared_network_loads_shared(self, tmp_path: Path) -> None:
        """After loading, both sites use one network object whose tensors equal the saved ones."""
        saved = save_toy(tmp_path / "shared.safetensors", SHARED_CONFIG)
        model = toy()
        before = snapshot(model)

        loaded = hookadapt.load_adapters(model, saved["path"])
        first = loaded.adapters["shared"]["body.0"].network
        second = loaded.adapters["shared"]["body.2"].network
        state = clone_state(loaded)
        output = run(model, toy_input())
        loaded.detach()

        assert first is second, "the shared network became two networks"
        assert list(state) == list(saved["state"]), "the loaded set has other keys"
        for key, value in saved["state"].items():
            assert torch.equal(state[key], value), f"tensor {key} differs after loading"
        assert torch.equal(output, saved["output"]), "the loaded adapters give another output"
        assert_restored(model, before)

    @pytest.mark.parametrize(
        ("train_modules", "stored", "alias"),
        [
            pytest.param(
                ["lm.embed", "lm.head"], "modules/lm.embed/weight", "modules/lm.head/weight", id="two-modules"
            ),
            pytest.param(["lm"], "modules/lm/embed.weight", "modules/lm/head.weight", id="one-module"),
        ],
    )
    def test_tied_weights_round_trip(self, tmp_path: Path, train_modules: list, stored: str, alias: str) -> None:
        """A weight tied between two train tensors is stored once and loads with the tie intact."""
        config = {"mix": {"target": "mix", "network": {"kind": "linear", "dim": 4}}}
        torch.manual_seed(0)
        model = TiedToy().eval()
        adapter_set = attach_random(model, config, train_modules=train_modules)
        with torch.no_grad():
            model.lm.embed.weight.mul_(-2.0)
        weight = model.lm.embed.weight.detach().clone()
        path = hookadapt.save_adapters(adapter_set, tmp_path / "tied.safetensors")
        adapter_set.detach()
        tensors, metadata = read_file(path)

        torch.manual_seed(1)
        fresh = TiedToy().eval()
        before = snapshot(fresh)
        loaded = hookadapt.load_adapters(fresh, path)
        tied = fresh.lm.head.weight is fresh.lm.embed.weight
        loaded_weight = fresh.lm.embed.weight.detach().clone()
        loaded.detach()

        assert stored in tensors, "the tied weight is not stored"
        assert alias not in tensors, "the tied weight is stored twice"
        assert json.loads(metadata["aliases"]) == {alias: stored}, "the alias of the tied weight is wrong"
        assert tied, "loading untied the weights"
        assert torch.equal(loaded_weight, weight), "the tied weight did not load"
        assert_restored(fresh, before)

    @pytest.mark.parametrize("layout", ["transposed", "strided", "overlapping"])
    def test_view_parameters_round_trip(self, tmp_path: Path, layout: str) -> None:
        """Train module parameters that are non-contiguous or overlapping views save and load bitwise."""
        config = {"body": {"target": "body", "network": {"kind": "linear", "dim": 4}}}
        torch.manual_seed(0)
        model = ViewsToy(layout).eval()
        adapter_set = attach_random(model, config)
        state = clone_state(adapter_set)
        path = hookadapt.save_adapters(adapter_set, tmp_path / "views.safetensors")
        adapter_set.detach()

        torch.manual_seed(1)
        fresh = ViewsToy(layout).eval()
        loaded = hookadapt.load_adapters(fresh, path)
        loaded_state = clone_state(loaded)
        contiguous = fresh.head.weight.is_contiguous()
        loaded.detach()

        assert not contiguous, "the fresh head weight is contiguous, so the case shows nothing"
        assert list(loaded_state) == list(state), "the loaded set has other keys"
        for key, value in state.items():
            assert loaded_state[key].dtype == value.dtype, f"tensor {key} changed dtype"
            bits = loaded_state[key].view(torch.int32)
            assert torch.equal(bits, value.view(torch.int32)), f"tensor {key} is not bitwise equal"


# Subsets of names.


class TestNames:
    """names= chooses adapters when saving and when loading."""

    @pytest.mark.parametrize(
        ("names", "expected"),
        [
            pytest.param(["b*", "ia?"], {"bottleneck", "ia3"}, id="globs"),
            pytest.param(["lora"], {"lora"}, id="one"),
            pytest.param("lora", {"lora"}, id="string"),
        ],
    )
    def test_save_names_subset(self, tmp_path: Path, names: Any, expected: set) -> None:
        """names= saves the adapters it names or matches, and the train modules."""
        model = toy()
        adapter_set = attach_random(model)
        path = hookadapt.save_adapters(adapter_set, tmp_path / "subset.safetensors", names=names)
        adapter_set.detach()
        tensors, metadata = read_file(path)
        owners = {key.split("/")[1] for key in tensors if key.startswith("adapters/")}

        assert set(json.loads(metadata["config"])) == expected, "the stored config has other adapters"
        assert owners == expected, "the file has tensors of other adapters"
        assert "modules/head/weight" in tensors, "the train module was not saved"
        assert set(json.loads(metadata["sizes"])) == expected, "the stored sizes have other adapters"

    @pytest.mark.parametrize(
        ("names", "expected"),
        [
            pytest.param(["lora"], ["lora"], id="one"),
            pytest.param("ia3", ["ia3"], id="string"),
            pytest.param(["ia3", "bottleneck"], ["bottleneck", "ia3"], id="two-in-file-order"),
            pytest.param(["b*"], ["bottleneck"], id="glob"),
        ],
    )
    def test_load_subset_of_names(self, tmp_path: Path, names: Any, expected: list) -> None:
        """names= attaches only the chosen adapters from a file with several, with their saved tensors."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = toy()
        before = snapshot(model)

        loaded = hookadapt.load_adapters(model, saved["path"], names=names)
        state = clone_state(loaded)
        loaded.detach()
        owners = {key.split("/")[1] for key in state if key.startswith("adapters/")}

        assert loaded.names == expected, "other adapters were attached"
        assert owners == set(expected), "the set holds tensors of other adapters"
        for key, value in state.items():
            assert torch.equal(value, saved["state"][key]), f"tensor {key} differs from the file"
        assert_restored(model, before)

    def test_unknown_name_lists_adapters(self, tmp_path: Path) -> None:
        """An unknown name raises and lists the file's adapters, leaving the model untouched."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = toy()
        before = snapshot(model)

        with pytest.raises(hookadapt.CheckpointError, match="no adapter matching 'nope'") as caught:
            hookadapt.load_adapters(model, saved["path"], names=["lora", "nope"])

        assert str(saved["path"]) in str(caught.value), "the message does not name the file"
        assert "bottleneck, lora, ia3" in str(caught.value), "the message does not list the file's adapters"
        assert_restored(model, before)

    def test_subset_into_attached_set(self, tmp_path: Path) -> None:
        """Loading one adapter into a set that has all three fills that adapter and leaves the others."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = toy()
        adapter_set = attach_random(model, seed=7)
        state = clone_state(adapter_set)

        loaded = hookadapt.load_adapters(model, saved["path"], names=["lora"])
        after = clone_state(adapter_set)
        sets = hookadapt.attached(model)
        adapter_set.detach()

        assert loaded is adapter_set, "the load did not return the attached set"
        assert sets == [adapter_set], "the load attached another set"
        for key in (LORA_A, LORA_B):
            assert torch.equal(after[key], saved["state"][key]), f"tensor {key} was not loaded"
        for key in (DOWN, SCALE_0):
            assert torch.equal(after[key], state[key]), f"tensor {key} of an adapter not chosen changed"

    @pytest.mark.parametrize(
        ("config", "phrases"),
        [
            pytest.param(
                {"lora": {**CONFIG["lora"], "target": "body.0"}},
                [
                    "adapter 'lora' at 'body.2'",
                    "attached = absent",
                    "adapter 'lora' at 'body.0'",
                    "file (in, out) = absent",
                ],
                id="other-site",
            ),
            pytest.param(
                {"lora": {**CONFIG["lora"], "network": {"kind": "lora", "rank": 2, "alpha": 4, "in_features": 8}}},
                ["adapter 'lora' at 'body.2'", "file (in, out) = [16, 16]", "attached = [8, 16]"],
                id="other-size",
            ),
        ],
    )
    def test_attached_differences_named(self, tmp_path: Path, config: dict, phrases: list) -> None:
        """Attached adapters at other sites or of other sizes raise, naming the adapter and site."""
        saved = save_toy(tmp_path / "lora.safetensors", LORA_ONLY)
        model = toy()
        adapter_set = attach_random(model, config, seed=7)
        state = clone_state(adapter_set)

        with pytest.raises(hookadapt.CheckpointError, match="does not match the adapters already attached") as caught:
            hookadapt.load_adapters(model, saved["path"])
        after = clone_state(adapter_set)
        adapter_set.detach()

        for phrase in phrases:
            assert phrase in str(caught.value), f"the message does not contain {phrase!r}"
        for key, value in state.items():
            assert torch.equal(after[key], value), f"tensor {key} changed although the load failed"


# Non-strict loads.


class TestNonStrict:
    """strict=False reports what it skipped in a LoadResult, and still raises when nothing fits."""

    def test_load_result_named_tuple(self, tmp_path: Path) -> None:
        """load_result is a LoadResult with the missing, unexpected and mismatched keys."""
        saved = save_toy(tmp_path / "all.safetensors")
        tensors, _ = read_file(saved["path"])
        del tensors[LORA_B]
        tensors["adapters/lora/body.9/network.lora_A.weight"] = torch.zeros(2, 16)
        # SCALE_2 is stored as an alias of SCALE_0, so it takes the wrong shape too.
        tensors[SCALE_0] = torch.ones(5)
        path = rewrite(saved["path"], tmp_path / "partial.safetensors", tensors=tensors)

        model = toy()
        loaded = hookadapt.load_adapters(model, path, strict=False)
        result = loaded.load_result
        state = clone_state(loaded)
        loaded.detach()

        assert isinstance(result, LoadResult), "load_result is not a LoadResult"
        assert result._fields == ("missing", "unexpected", "mismatched"), "LoadResult has other fields"
        assert result.missing == [LORA_B], "the missing key is not listed"
        assert result.unexpected == ["adapters/lora/body.9/network.lora_A.weight"], "the unexpected key is not listed"
        mismatched = [entry.split(":")[0] for entry in result.mismatched]
        assert mismatched == [SCALE_0, SCALE_2], "the mismatched keys are not listed"
        assert torch.equal(state[LORA_A], saved["state"][LORA_A]), "a matching key was not loaded"

    def test_non_strict_into_attached(self, tmp_path: Path) -> None:
        """strict=False into an attached set loads what fits and keeps the mismatched adapter's tensors."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = toy()
        config = {**CONFIG, "lora": {**CONFIG["lora"], "network": {"kind": "lora", "rank": 3, "alpha": 4}}}
        adapter_set = attach_random(model, config, seed=7)
        state = clone_state(adapter_set)

        loaded = hookadapt.load_adapters(model, saved["path"], strict=False)
        after = clone_state(adapter_set)
        adapter_set.detach()
        mismatched = [entry.split(":")[0] for entry in loaded.load_result.mismatched]

        assert loaded is adapter_set, "the load did not return the attached set"
        assert mismatched == [LORA_A, LORA_B], "the rank mismatch is not listed"
        assert torch.equal(after[LORA_A], state[LORA_A]), "a mismatched tensor changed"
        assert torch.equal(after[DOWN], saved["state"][DOWN]), "a matching tensor was not loaded"

    def test_no_match_raises_fresh(self, tmp_path: Path) -> None:
        """A file none of whose tensors fits raises with strict=False and leaves the model untouched."""
        saved = save_toy(tmp_path / "lora.safetensors", LORA_ONLY, train_modules=[])
        tensors = {key: torch.zeros(3, 5) for key in read_file(saved["path"])[0]}
        path = rewrite(saved["path"], tmp_path / "nothing.safetensors", tensors=tensors)
        model = toy()
        before = snapshot(model)

        with pytest.raises(hookadapt.CheckpointError, match="No key matches") as caught:
            hookadapt.load_adapters(model, path, strict=False)

        assert str(path) in str(caught.value), "the message does not name the file"
        assert_restored(model, before)

    def test_no_match_raises_attached(self, tmp_path: Path) -> None:
        """An attached set whose every tensor differs in shape from the file raises and keeps its tensors."""
        saved = save_toy(tmp_path / "lora.safetensors", LORA_ONLY, train_modules=[])
        model = toy()
        config = {"lora": {**CONFIG["lora"], "network": {"kind": "lora", "rank": 3, "alpha": 4}}}
        adapter_set = attach_random(model, config, seed=7, train_modules=[])
        state = clone_state(adapter_set)

        with pytest.raises(hookadapt.CheckpointError, match="No key matches"):
            hookadapt.load_adapters(model, saved["path"], strict=False)
        after = clone_state(adapter_set)
        adapter_set.detach()

        for key, value in state.items():
            assert torch.equal(after[key], value), f"tensor {key} changed although nothing matched"


# Dtypes.


class TestDtype:
    """dtype= converts adapters on load, and without it the saved dtype stays."""

    @pytest.mark.parametrize(
        ("dtype", "expected"),
        [
            pytest.param(torch.bfloat16, torch.bfloat16, id="bfloat16"),
            pytest.param("bfloat16", torch.bfloat16, id="bfloat16-name"),
            pytest.param("float16", torch.float16, id="float16-name"),
            pytest.param(torch.float64, torch.float64, id="float64"),
        ],
    )
    def test_dtype_converts_adapters(self, tmp_path: Path, dtype: Any, expected: torch.dtype) -> None:
        """Every adapter tensor gets the dtype and the saved values, and the train module keeps float32."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = toy()

        loaded = hookadapt.load_adapters(model, saved["path"], dtype=dtype)
        state = clone_state(loaded)
        spec_dtypes = {spec.dtype for spec in loaded.specs.values()}
        output = run(model, toy_input())
        loaded.detach()

        assert spec_dtypes == {str(expected).removeprefix("torch.")}, "the specs name another dtype"
        for key, value in saved["state"].items():
            if key.startswith("adapters/"):
                assert state[key].dtype == expected, f"tensor {key} has dtype {state[key].dtype}"
                assert torch.equal(state[key], value.to(expected)), f"tensor {key} has other values"
        assert state["modules/head/weight"].dtype == torch.float32, "the train module changed dtype"
        assert output.dtype == torch.float32, "the model output changed dtype"

    def test_saved_dtype_kept(self, tmp_path: Path) -> None:
        """A float64 adapter loads as float64 and bitwise equal when no dtype is given."""
        config = {name: {**spec, "dtype": "float64"} for name, spec in CONFIG.items()}
        saved = save_toy(tmp_path / "float64.safetensors", config)
        model = toy()

        loaded = hookadapt.load_adapters(model, saved["path"])
        state = clone_state(loaded)
        output = run(model, toy_input())
        loaded.detach()

        for key, value in saved["state"].items():
            if key.startswith("adapters/"):
                assert state[key].dtype == torch.float64, f"tensor {key} has dtype {state[key].dtype}"
            assert torch.equal(state[key], value), f"tensor {key} differs"
        assert torch.equal(output, saved["output"]), "the float64 adapters give another output"

    def test_unknown_dtype_lists_names(self, tmp_path: Path) -> None:
        """An integer dtype raises, lists the dtypes that work and leaves the model untouched."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = toy()
        before = snapshot(model)

        with pytest.raises(hookadapt.CheckpointError, match="float32, float64, float16, bfloat16") as caught:
            hookadapt.load_adapters(model, saved["path"], dtype=torch.int8)

        assert str(saved["path"]) in str(caught.value), "the message does not name the file"
        assert_restored(model, before)


# Base model fingerprint.


def wider() -> nn.Module:
    """Return the toy with hidden size 24."""
    return toy(hidden=24)


def other_class() -> nn.Module:
    """Return the toy with body.2 replaced by a Linear subclass of the same shape."""
    model = toy()
    model.body[2] = OtherLinear(16, 16)
    return model


def extra_buffer() -> nn.Module:
    """Return the toy whose head has an extra buffer."""
    model = toy()
    model.head.register_buffer("mask", torch.ones(3))
    return model


def missing_site() -> nn.Module:
    """Return the toy whose body ends after its first layer."""
    model = toy()
    model.body = nn.Sequential(model.body[0], model.body[1])
    return model


FINGERPRINT_CASES = [
    pytest.param(
        wider, "site 'body.0' (Linear) tensor 'weight' has shape [24, 24] in the model but had [16, 16]", id="wider"
    ),
    pytest.param(other_class, "site 'body.2' is a OtherLinear in the model but was a Linear", id="other-class"),
    pytest.param(
        extra_buffer, "site 'head' (Linear) tensor 'mask' has shape [3] in the model but had None", id="extra-buffer"
    ),
    pytest.param(missing_site, "site 'body.2' (Linear) does not exist in the model", id="missing-site"),
]


class TestFingerprint:
    """The file records the base model, and a load into another architecture raises or warns."""

    def test_fingerprint_records_sites(self, tmp_path: Path) -> None:
        """base_model lists every site and train module with its class and tensor shapes, in order."""
        saved = save_toy(tmp_path / "all.safetensors")
        fingerprint = json.loads(read_file(saved["path"])[1]["base_model"])

        assert list(fingerprint) == ["body.0", "body.2", "head"], "the fingerprint lists other paths"
        body = {"class": "Linear", "tensors": {"weight": [16, 16], "bias": [16]}}
        head = {"class": "Linear", "tensors": {"weight": [3, 16], "bias": [3]}}
        assert fingerprint["body.0"] == body, "the entry of body.0 differs"
        assert fingerprint["head"] == head, "the entry of head differs"

    @pytest.mark.parametrize(("make_model", "difference"), FINGERPRINT_CASES)
    def test_other_model_raises(self, tmp_path: Path, make_model: Callable, difference: str) -> None:
        """A strict load into another architecture raises naming the first differing site, changing nothing."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = make_model()
        before = snapshot(model)

        with pytest.raises(hookadapt.CheckpointError, match="saved from a different model") as caught:
            hookadapt.load_adapters(model, saved["path"])

        assert difference in str(caught.value), f"the message does not say {difference!r}"
        assert str(saved["path"]) in str(caught.value), "the message does not name the file"
        assert_restored(model, before)

    @pytest.mark.parametrize(("make_model", "difference"), FINGERPRINT_CASES[:3])
    def test_other_model_warns(self, tmp_path: Path, make_model: Callable, difference: str) -> None:
        """strict=False turns the difference into a warning and loads."""
        saved = save_toy(tmp_path / "all.safetensors")
        model = make_model()

        with pytest.warns(UserWarning, match=re.escape(difference)):
            loaded = hookadapt.load_adapters(model, saved["path"], strict=False)
        attached = hookadapt.attached(model)
        loaded.detach()

        assert attached == [loaded], "the adapters were not attached after the warning"


# Bad files.


def oversized_header(saved: Path, target: Path, size: int) -> Path:
    """Write a file whose first 8 bytes declare a header of ``size`` bytes."""
    target.write_bytes(size.to_bytes(8, "little") + saved.read_bytes()[8:])
    return target


def without_field(field: str) -> Callable[[Path, Path], Path]:
    """Return a maker of a file without metadata ``field``."""
    return lambda saved, target: rewrite(saved, target, drop=(field,))


def with_field(field: str, value: str) -> Callable[[Path, Path], Path]:
    """Return a maker of a file with metadata ``field`` set to ``value``."""
    return lambda saved, target: rewrite(saved, target, **{field: value})


def with_config(change: Callable[[dict], None]) -> Callable[[Path, Path], Path]:
    """Return a maker of a file whose stored config is changed in place by ``change``."""

    def make(saved: Path, target: Path) -> Path:
        config = stored_config(saved)
        change(config)
        return rewrite(saved, target, config=json.dumps(config))

    return make


def with_tensor(key: str, value: torch.Tensor) -> Callable[[Path, Path], Path]:
    """Return a maker of a file with tensor ``key`` replaced by ``value``."""

    def make(saved: Path, target: Path) -> Path:
        tensors, _ = read_file(saved)
        tensors[key] = value
        return rewrite(saved, target, tensors=tensors)

    return make


def set_kind(part: str, kind: str) -> Callable[[dict], None]:
    """Return a config change that sets the kind of the lora adapter's network or strategy."""

    def change(config: dict) -> None:
        config["lora"][part]["kind"] = kind

    return change


INVALID_FIELDS = {
    "aliases": {
        "aliases-list": ["a", "b"],
        "alias-of-absent-key": {SCALE_2: "adapters/ia3/body.5/network.weight"},
        "alias-overwrites-stored": {SCALE_2: SCALE_0, LORA_A: DOWN},
        "alias-to-list": {SCALE_2: [SCALE_0]},
        "alias-to-null": {SCALE_2: None},
    },
    "base_model": {
        "base-model-list": ["body.0"],
        "base-model-entry-string": {"body.0": "Linear"},
        "base-model-no-class": {"body.0": {"tensors": {}}},
        "base-model-tensors-list": {"body.0": {"class": "Linear", "tensors": [16]}},
    },
}
BAD_FILES = [
    *(
        pytest.param(lambda saved, target, size=size: oversized_header(saved, target, size), "byte limit", id=case)
        for case, size in {"header-2-pow-62": 2**62, "header-over-limit": MAX_HEADER_BYTES + 1}.items()
    ),
    *(
        pytest.param(without_field(field), f"metadata field {field!r} is missing", id=f"no-{field}")
        for field in ("config", "sizes", "train_modules", "base_model", "aliases")
    ),
    *(
        pytest.param(with_field(field, "{not json"), f"metadata field {field!r} is not valid JSON", id=f"{field}-not-json")
        for field in ("sizes", "train_modules", "base_model", "aliases")
    ),
    pytest.param(
        with_config(set_kind("strategy", "no_such_strategy")),
        f"unknown strategy kind 'no_such_strategy'; known kinds are {', '.join(sorted(hookadapt.STRATEGIES.kinds()))}",
        id="unknown-strategy",
    ),
    pytest.param(
        with_field("sizes", json.dumps({"bottleneck": {"body.0": [10**8, 10**8]}, "lora": {"body.2": [16, 16]}})),
        "its sizes or options are inconsistent with its tensors",
        id="huge-sizes",
    ),
    pytest.param(
        with_config(lambda config: config["bottleneck"]["network"].update(dim=10**8)),
        "its sizes or options are inconsistent with its tensors",
        id="huge-options",
    ),
    pytest.param(with_tensor(LORA_A, torch.zeros(2, 16, dtype=torch.int64)), "mismatched", id="integer-dtype"),
    pytest.param(with_tensor(SCALE_0, torch.ones(16, dtype=torch.bool)), "mismatched", id="bool-dtype"),
    pytest.param(with_tensor(LORA_A, torch.zeros(32)), "mismatched", id="flat-shape"),
    pytest.param(with_tensor(LORA_B, torch.zeros(16, 2, 1)), "mismatched", id="extra-dimension"),
    *(
        pytest.param(with_field(field, json.dumps(value)), f"metadata field {field!r} must be", id=case)
        for field, cases in INVALID_FIELDS.items()
        for case, value in cases.items()
    ),
]


class TestBadFiles:
    """Each bad file raises a CheckpointError that names it, and the model stays untouched."""

    @pytest.mark.parametrize(("make_file", "phrase"), BAD_FILES)
    def test_bad_file_raises(self, tmp_path: Path, make_file: Callable, phrase: str) -> None:
        """The error names the file and the defect."""
        saved = save_toy(tmp_path / "good.safetensors")
        path = make_file(saved["path"], tmp_path / "bad.safetensors")
        model = toy()
        before = snapshot(model)

        with pytest.raises(hookadapt.CheckpointError) as caught:
            hookadapt.load_adapters(model, path)

        assert str(path) in str(caught.value), "the message does not name the file"
        assert phrase in str(caught.value), f"the message does not contain {phrase!r}"
        assert_restored(model, before)

    @pytest.mark.parametrize("part", ["network", "strategy"])
    @pytest.mark.parametrize("kind", ["os.system", "hookadapt_probe.Network", "builtins.exec"])
    def test_dotted_kind_runs_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str, kind: str
    ) -> None:
        """A kind that names a Python path is only an unknown kind: nothing is imported or run."""
        marker = tmp_path / "ran"
        (tmp_path / "hookadapt_probe.py").write_text(
            f"open({str(marker)!r}, 'w').close()\nNetwork = print\n", encoding="utf-8"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        saved = save_toy(tmp_path / "good.safetensors")
        config = stored_config(saved["path"])
        config["lora"][part] = {"kind": kind, "command": f"touch {marker}"}
        path = rewrite(saved["path"], tmp_path / "dotted.safetensors", config=json.dumps(config))
        model = toy()
        before = snapshot(model)

        with pytest.raises(hookadapt.CheckpointError, match=f"unknown {part} kind {re.escape(repr(kind))}") as caught:
            hookadapt.load_adapters(model, path)

        assert str(path) in str(caught.value), "the message does not name the file"
        assert not marker.exists(), "loading the file ran code"
        assert "hookadapt_probe" not in sys.modules, "loading the file imported a module"
        assert_restored(model, before)


# Crash safety.

WRITER_WIDTH = 1024
KILLS = 8
WRITER_SHAPES = {
    "adapters/big/0/network.norm.weight": [WRITER_WIDTH],
    "adapters/big/0/network.norm.bias": [WRITER_WIDTH],
    "adapters/big/0/network.down.weight": [WRITER_WIDTH, WRITER_WIDTH],
    "adapters/big/0/network.up.weight": [WRITER_WIDTH, WRITER_WIDTH],
}
# The child imports torch once and forks one writer per round, so eight kills cost one interpreter start.
# Each writer fills every adapter tensor with 1.0 or 2.0, alternating, and saves to the same path.
WRITER = r"""
import os, sys
import torch
torch.set_num_threads(1)
from torch import nn
import hookadapt

path, width = sys.argv[1], int(sys.argv[2])
while sys.stdin.readline():
    pid = os.fork()
    if pid == 0:
        model = nn.Sequential(nn.Linear(width, width))
        config = {"big": {"target": "0", "network": {"kind": "linear", "dim": width}}}
        adapter_set = hookadapt.attach(model, config)
        count = 0
        while True:
            with torch.no_grad():
                for param in adapter_set.parameters():
                    param.fill_(float(count % 2 + 1))
            hookadapt.save_adapters(adapter_set, path)
            if count == 0:
                print("saved", flush=True)
            count += 1
    print(f"writer {pid}", flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def next_line(lines: queue.Queue, process: subprocess.Popen) -> str:
    """Return the child's next output line, failing after 30 s or when the child exits."""
    try:
        line = lines.get(timeout=30)
    except queue.Empty:
        pytest.fail("the writer process printed nothing for 30 s")
    if line is None:
        pytest.fail(f"the writer process exited with code {process.wait()}: {process.stderr.read()}")
    return line


def pump(stream: Any, lines: queue.Queue) -> None:
    """Put each line of ``stream`` into ``lines``, then None at its end."""
    for line in stream:
        lines.put(line.strip())
    lines.put(None)


def stored_contents(path: Path) -> tuple[dict[str, list[int]], set[float]]:
    """Read a checkpoint with hookadapt and return its shapes by key and the set of values in its tensors."""
    stored = read_checkpoint(path)
    shapes = {key: list(tensor.shape) for key, tensor in stored.tensors.items()}
    values = {value for tensor in stored.tensors.values() for value in tensor.unique().tolist()}
    return shapes, values


def test_killed_save_leaves_whole_file(tmp_path: Path) -> None:
    """SIGKILL at random moments of repeated saves always leaves a readable old or new file."""
    path = tmp_path / "adapters.safetensors"
    # hookadapt's temporary files are .NAME.RANDOM.tmp. safetensors 0.8 itself writes through a
    # hidden .tmpRANDOM file in the same folder, which a kill inside its write also leaves behind.
    temporary = re.compile(rf"\.({re.escape(path.name)}\..+\.tmp|tmp\w+)")
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(WRITER_WIDTH)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=pump, args=(process.stdout, lines), daemon=True).start()
    delays = random.Random(0)
    contents = []
    writer = None
    started = time.monotonic()
    try:
        for _ in range(KILLS):
            process.stdin.write("go\n")
            process.stdin.flush()
            seen: set[str] = set()
            while not {"writer", "saved"} <= seen:
                line = next_line(lines, process)
                if line.startswith("writer "):
                    writer = int(line.split()[1])
                seen.add(line.split()[0])
            time.sleep(delays.uniform(0.0, 0.2))
            os.kill(writer, signal.SIGKILL)
            assert next_line(lines, process) == "reaped", "the child did not reap the killed writer"
            writer = None
            contents.append(stored_contents(path))
            names = os.listdir(tmp_path)
            leftovers = [name for name in names if name != path.name]
            assert path.name in names, "the checkpoint disappeared"
            assert all(temporary.fullmatch(name) for name in leftovers), f"unexpected files after a kill: {leftovers}"
    finally:
        if writer is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer, signal.SIGKILL)
        process.kill()
        process.wait()
    elapsed = time.monotonic() - started

    for shapes, values in contents:
        assert shapes == WRITER_SHAPES, f"a checkpoint has other tensors: {shapes}"
        assert values in ({1.0}, {2.0}), f"a checkpoint mixes or lacks the two contents: {values}"
    assert elapsed < 20, f"the crash test took {elapsed:.1f} s"
