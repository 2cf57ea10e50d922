"""Saving adapters to safetensors files and loading them back, on toy models and MiniLM."""

from __future__ import annotations

import copy
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import hookadapt
from conftest import assert_restored, randomize, snapshot
from hookadapt.demo import ReviewClassifier

TOY_CONFIG = {
    "first": {"target": "body.0", "network": {"kind": "linear", "dim": 4}},
    "second": {"target": "body.2", "insertion": "parallel", "network": {"kind": "lora", "rank": 4, "alpha": 8}},
}
MINILM_CONFIG = {
    "bottleneck": {
        "target": "bert.encoder.layer.*.output",
        "network": {"kind": "linear", "dim": 16},
        "strategy": {"kind": "residual_add", "stochastic_depth": 0.1},
    },
    "lora_qv": {
        "target": r"re:bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)",
        "insertion": "parallel",
        "network": {"kind": "lora", "rank": 4, "alpha": 8},
    },
}
LORA_B = "adapters/second/body.2/network.lora_B.weight"
DOWN = "adapters/first/body.0/network.down.weight"
EXTRA = "adapters/first/body.9/network.up.weight"


class Mlp(nn.Module):
    """A Sequential body and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CodedHead(nn.Linear):
    """A linear head with a buffer whose dtype safetensors cannot store."""

    def __init__(self) -> None:
        super().__init__(8, 2)
        self.register_buffer("codes", torch.zeros(4, dtype=torch.bits8))


def toy() -> Mlp:
    """Build the toy model with fixed weights, in eval mode."""
    torch.manual_seed(0)
    return Mlp().eval()


def toy_input() -> torch.Tensor:
    """Return a fixed random input."""
    return torch.randn((4, 8), generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a model without gradients."""
    with torch.no_grad():
        return model(x)


def attach_trained(model: nn.Module) -> hookadapt.AdapterSet:
    """Attach the toy config with the head as a train module, with random adapters and a changed head."""
    adapter_set = hookadapt.attach(model, TOY_CONFIG, train_modules=["head"])
    randomize(adapter_set)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    return adapter_set


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Any]:
    """Save a trained toy adapter set and return the file, its tensors and metadata, and the adapted output."""
    model = toy()
    adapter_set = attach_trained(model)
    path = hookadapt.save_adapters(adapter_set, tmp_path / "adapters.safetensors")
    output = run(model, toy_input())
    state = {key: value.clone() for key, value in adapter_set.state_dict().items()}
    adapter_set.detach()
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return {"path": path, "tensors": tensors, "metadata": metadata, "output": output, "state": state}


def rewrite(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    **changes: str,
) -> Path:
    """Write ``tensors`` to ``path`` with ``metadata`` updated by ``changes``, as a plain safetensors file."""
    if metadata is not None:
        metadata = {**metadata, **changes}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def live_state(adapter_set: hookadapt.AdapterSet) -> dict[str, torch.Tensor]:
    """Return clones of the tensors an adapter set would save."""
    return {key: value.clone() for key, value in adapter_set.state_dict().items()}


class TestRoundTrip:
    """A saved file loads back bitwise."""

    def test_round_trip_toy(self, saved: dict) -> None:
        """Loading into a fresh model gives bitwise the saved tensors and outputs, and detach restores it."""
        model = toy()
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)

        loaded = hookadapt.load_adapters(model, saved["path"])
        output = run(model, x)
        state = live_state(loaded)
        result = loaded.load_result
        loaded.detach()

        assert torch.equal(output, saved["output"]), "the loaded adapters give another output"
        assert list(state) == list(saved["state"]), "the loaded set has other tensor keys"
        for key, value in saved["state"].items():
            assert torch.equal(state[key], value), f"tensor {key} differs after loading"
        assert result == hookadapt.checkpoint.LoadResult([], [], []), "a strict load reported problems"
        assert_restored(model, before)
        assert torch.equal(run(model, x), base), "output differs after detach"

    def test_file_tensors_match_set(self, saved: dict) -> None:
        """The file contains exactly the set's tensors, adapters and train modules, bit for bit."""
        tensors = saved["tensors"]

        assert sorted(tensors) == sorted(saved["state"]), "the file has other keys than the set"
        assert "modules/head/weight" in tensors, "the train module is not in the file"
        for key, value in saved["state"].items():
            assert torch.equal(tensors[key], value), f"tensor {key} differs in the file"

    def test_round_trip_minilm(
        self,
        minilm: nn.Module,
        minilm_files: tuple,
        review_batch: dict,
        review_labels: torch.Tensor,
        tmp_path: Path,
    ) -> None:
        """Adapters and head trained on MiniLM reload into a fresh copy with bitwise-equal logits."""
        torch.manual_seed(0)
        model = ReviewClassifier(minilm).eval()
        adapter_set = hookadapt.attach(model, MINILM_CONFIG, freeze_base=True, train_modules=["head"])
        optimizer = torch.optim.AdamW(adapter_set.parameters(), lr=1e-2)
        model.train()
        loss = nn.functional.cross_entropy(model(**review_batch), review_labels)
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(**review_batch)
        path = hookadapt.save_adapters(adapter_set, tmp_path / "minilm.safetensors")
        state = live_state(adapter_set)
        adapter_set.detach()

        torch.manual_seed(1)
        fresh = ReviewClassifier(copy.deepcopy(minilm_files[1])).eval()
        with torch.no_grad():
            fresh_base = fresh(**review_batch)
        before = snapshot(fresh)
        loaded = hookadapt.load_adapters(fresh, path)
        with torch.no_grad():
            reloaded = fresh(**review_batch)
        loaded_state = live_state(loaded)
        loaded.detach()

        assert torch.equal(reloaded, logits), "the reloaded logits are not bitwise equal"
        assert list(loaded_state) == list(state), "the reloaded set has other tensor keys"
        for key, value in state.items():
            assert torch.equal(loaded_state[key], value), f"tensor {key} differs after reloading"
        assert_restored(fresh, before)
        with torch.no_grad():
            assert torch.equal(fresh(**review_batch), fresh_base), "the fresh model differs after detach"


class TestFileFormat:
    """The file is plain safetensors and describes itself."""

    def test_metadata_describes_file(self, saved: dict) -> None:
        """The metadata contains the format, versions, config, sizes and train modules."""
        metadata = saved["metadata"]
        expected_config = hookadapt.config_to_dict(hookadapt.parse_config(TOY_CONFIG))

        assert metadata["format"] == "hookadapt", "the format field is wrong"
        assert metadata["format_version"] == "1", "the format version is wrong"
        assert metadata["hookadapt_version"] == hookadapt.__version__, "the hookadapt version is wrong"
        assert json.loads(metadata["config"]) == expected_config, "the stored config differs"
        assert json.loads(metadata["sizes"]) == {
            "first": {"body.0": [16, 16]},
            "second": {"body.2": [16, 8]},
        }, "the stored sizes differ"
        assert json.loads(metadata["train_modules"]) == ["head"], "the stored train modules differ"

    def test_file_has_no_pickle(self, saved: dict) -> None:
        """The bytes are a safetensors JSON header followed by raw tensor data, with nothing else."""
        data = saved["path"].read_bytes()
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_size])
        entries = {key: value for key, value in header.items() if key != "__metadata__"}
        ends = [entry["data_offsets"][1] for entry in entries.values()]

        assert data[8:9] == b"{", "the header after the 8-byte length is not JSON"
        assert sorted(entries) == sorted(saved["tensors"]), "the header lists other tensors"
        assert 8 + header_size + max(ends) == len(data), "the file has bytes outside header and tensor data"

    def test_save_subset_of_names(self, saved: dict, tmp_path: Path) -> None:
        """names= saves only the chosen adapters, plus the train modules."""
        model = toy()
        adapter_set = attach_trained(model)
        path = hookadapt.save_adapters(adapter_set, tmp_path / "first.safetensors", names=["first"])
        adapter_set.detach()
        with safetensors.safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
            config = json.loads(file.metadata()["config"])

        assert list(config) == ["first"], "the stored config has other adapters"
        assert not any(key.startswith("adapters/second/") for key in keys), "the other adapter was saved"
        assert any(key.startswith("adapters/first/") for key in keys), "the chosen adapter is missing"


class TestSaveSafety:
    """Saving goes through a temporary file and a rename."""

    def test_save_replaces_by_rename(self, tmp_path: Path) -> None:
        """An existing file is replaced by a rename: a hard link keeps the old bytes, no temp file stays."""
        path = tmp_path / "adapters.safetensors"
        path.write_bytes(b"old contents")
        os.link(path, tmp_path / "old-link")
        model = toy()
        adapter_set = attach_trained(model)

        hookadapt.save_adapters(adapter_set, path)
        adapter_set.detach()

        assert (tmp_path / "old-link").read_bytes() == b"old contents", "the old file was written in place"
        assert sorted(os.listdir(tmp_path)) == ["adapters.safetensors", "old-link"], "a temporary file was left"
        assert path.read_bytes() != b"old contents", "the new file was not written"

    def test_save_into_directory_fails(self, tmp_path: Path) -> None:
        """Saving to a directory path raises CheckpointError and leaves the directory as it was."""
        folder = tmp_path / "folder.safetensors"
        folder.mkdir()
        (folder / "kept.safetensors").write_bytes(b"kept")
        model = toy()
        adapter_set = attach_trained(model)

        with pytest.raises(hookadapt.CheckpointError, match=re.escape(str(folder))):
            hookadapt.save_adapters(adapter_set, folder)
        adapter_set.detach()

        assert os.listdir(folder) == ["kept.safetensors"], "the directory's contents changed"
        assert (folder / "kept.safetensors").read_bytes() == b"kept", "a file in the directory changed"
        assert os.listdir(tmp_path) == ["folder.safetensors"], "a temporary file was left"

    def test_unsaveable_tensor_keeps_file(self, tmp_path: Path) -> None:
        """A tensor that safetensors rejects fails the save, and the existing file keeps its bytes."""
        path = tmp_path / "adapters.safetensors"
        path.write_bytes(b"previous checkpoint")
        model = toy()
        model.head = CodedHead()
        adapter_set = hookadapt.attach(model, TOY_CONFIG, train_modules=["head"])

        with pytest.raises(hookadapt.CheckpointError, match="safetensors rejected the tensors"):
            hookadapt.save_adapters(adapter_set, path)
        adapter_set.detach()

        assert path.read_bytes() == b"previous checkpoint", "the existing file changed"
        assert os.listdir(tmp_path) == ["adapters.safetensors"], "a temporary file was left"


def defects(saved: dict, *, drop: tuple[str, ...] = (), add: dict | None = None) -> dict[str, torch.Tensor]:
    """Return the saved tensors without ``drop`` and with ``add`` set."""
    tensors = {key: value for key, value in saved["tensors"].items() if key not in drop}
    tensors.update(add or {})
    return tensors


STRICT_CASES = [
    pytest.param({"drop": (LORA_B,)}, ["missing keys", LORA_B], id="missing"),
    pytest.param({"add": {EXTRA: torch.zeros(16, 4)}}, ["unexpected keys", EXTRA], id="unexpected"),
    pytest.param({"add": {DOWN: torch.zeros(3, 16)}}, ["mismatched", DOWN, "(3, 16)"], id="shape"),
    pytest.param({"add": {DOWN: torch.zeros(4, 16, dtype=torch.float64)}}, ["mismatched", DOWN, "float64"], id="dtype"),
    pytest.param(
        {"drop": (LORA_B,), "add": {EXTRA: torch.zeros(16, 4), DOWN: torch.zeros(3, 16)}},
        ["missing keys", LORA_B, "unexpected keys", EXTRA, "mismatched", DOWN],
        id="all-three",
    ),
]


class TestStrict:
    """Strict loads check every key before copying anything."""

    @pytest.mark.parametrize(("change", "phrases"), STRICT_CASES)
    def test_strict_load_lists_keys(self, saved: dict, tmp_path: Path, change: dict, phrases: list[str]) -> None:
        """A file that does not fit raises, lists the keys and leaves the model untouched."""
        path = rewrite(tmp_path / "defective.safetensors", defects(saved, **change), saved["metadata"])
        model = toy()
        before = snapshot(model)

        with pytest.raises(hookadapt.CheckpointError) as caught:
            hookadapt.load_adapters(model, path)

        text = str(caught.value)
        assert str(path) in text, "the message does not name the file"
        for phrase in phrases:
            assert phrase in text, f"the message does not contain {phrase!r}"
        assert_restored(model, before)

    def test_strict_attached_copies_nothing(self, saved: dict, tmp_path: Path) -> None:
        """A strict error while loading into attached adapters leaves their tensors unchanged."""
        change = {"drop": (LORA_B,), "add": {DOWN: torch.zeros(3, 16)}}
        path = rewrite(tmp_path / "defective.safetensors", defects(saved, **change), saved["metadata"])
        model = toy()
        adapter_set = hookadapt.attach(model, TOY_CONFIG, train_modules=["head"])
        state = live_state(adapter_set)

        with pytest.raises(hookadapt.CheckpointError, match="mismatched"):
            hookadapt.load_adapters(model, path)
        after = live_state(adapter_set)
        adapter_set.detach()

        for key, value in state.items():
            assert torch.equal(after[key], value), f"tensor {key} changed although the load failed"

    def test_attached_shape_mismatch_raises(self, saved: dict) -> None:
        """Attached adapters of another rank do not fit the file."""
        model = toy()
        config = copy.deepcopy(TOY_CONFIG)
        config["second"]["network"]["rank"] = 2
        adapter_set = hookadapt.attach(model, config, train_modules=["head"])
        state = live_state(adapter_set)

        with pytest.raises(hookadapt.CheckpointError, match=re.escape(LORA_B)):
            hookadapt.load_adapters(model, saved["path"])
        after = live_state(adapter_set)
        adapter_set.detach()

        for key, value in state.items():
            assert torch.equal(after[key], value), f"tensor {key} changed although the load failed"

    def test_non_strict_loads_matches(self, saved: dict, tmp_path: Path) -> None:
        """strict=False loads the keys that fit and reports the rest in load_result."""
        change = {"drop": (LORA_B,), "add": {EXTRA: torch.zeros(16, 4), DOWN: torch.zeros(3, 16)}}
        tensors = defects(saved, **change)
        path = rewrite(tmp_path / "defective.safetensors", tensors, saved["metadata"])
        model = toy()

        loaded = hookadapt.load_adapters(model, path, strict=False)
        state = live_state(loaded)
        result = loaded.load_result
        loaded.detach()

        assert result.missing == [LORA_B], "load_result lists other missing keys"
        assert result.unexpected == [EXTRA], "load_result lists other unexpected keys"
        assert len(result.mismatched) == 1, "load_result lists other mismatched keys"
        assert result.mismatched[0].startswith(DOWN), "load_result names another mismatched key"
        for key, value in tensors.items():
            if key in state and key != DOWN:
                assert torch.equal(state[key], value), f"matching tensor {key} was not loaded"
        assert not torch.any(state[LORA_B]), "the missing LoRA B did not keep its zero start"


class TestAttachedLoad:
    """Loading into a model that already has the adapters attached fills that set."""

    def test_load_into_attached_set(self, saved: dict) -> None:
        """The file's weights go into the attached set, which is returned, and detach restores the model."""
        model = toy()
        x = toy_input()
        base = run(model, x)
        before = snapshot(model)
        adapter_set = hookadapt.attach(model, TOY_CONFIG, train_modules=["head"])

        loaded = hookadapt.load_adapters(model, saved["path"])
        output = run(model, x)
        state = live_state(adapter_set)
        sets = hookadapt.attached(model)
        adapter_set.detach()

        assert loaded is adapter_set, "load_adapters did not return the attached set"
        assert sets == [adapter_set], "loading attached another set"
        for key, value in saved["state"].items():
            assert torch.equal(state[key], value), f"tensor {key} was not loaded"
        assert torch.equal(output, saved["output"]), "the loaded adapters give another output"
        assert_restored(model, before)
        assert torch.equal(run(model, x), base), "output differs after detach"


def missing_path(tmp_path: Path, saved: dict) -> Path:
    """Return a path where no file exists."""
    return tmp_path / "absent.safetensors"


def directory(tmp_path: Path, saved: dict) -> Path:
    """Return a directory with a checkpoint's name."""
    path = tmp_path / "folder.safetensors"
    path.mkdir()
    return path


def truncated(tmp_path: Path, saved: dict) -> Path:
    """Write the first half of a valid file."""
    data = saved["path"].read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def data_cut(tmp_path: Path, saved: dict) -> Path:
    """Write a valid file without its last 10 bytes, so the header is whole and the data is short."""
    data = saved["path"].read_bytes()
    path = tmp_path / "data-cut.safetensors"
    path.write_bytes(data[:-10])
    return path


def header_cut(tmp_path: Path, saved: dict) -> Path:
    """Write a valid file cut inside its JSON header."""
    path = tmp_path / "header-cut.safetensors"
    path.write_bytes(saved["path"].read_bytes()[:20])
    return path


def random_bytes(tmp_path: Path, saved: dict) -> Path:
    """Write random bytes."""
    path = tmp_path / "random.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def empty(tmp_path: Path, saved: dict) -> Path:
    """Write an empty file."""
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return path


def no_metadata(tmp_path: Path, saved: dict) -> Path:
    """Write the tensors as safetensors without metadata."""
    return rewrite(tmp_path / "plain.safetensors", saved["tensors"], None)


def foreign_metadata(tmp_path: Path, saved: dict) -> Path:
    """Write the tensors with metadata of another format."""
    return rewrite(tmp_path / "foreign.safetensors", saved["tensors"], {"format": "pt"})


def invalid_json(tmp_path: Path, saved: dict) -> Path:
    """Write hookadapt metadata whose config is not JSON."""
    return rewrite(tmp_path / "json.safetensors", saved["tensors"], saved["metadata"], config="{'first': ")


def unknown_kind(tmp_path: Path, saved: dict) -> Path:
    """Write a config that names an unregistered network kind."""
    config = json.loads(saved["metadata"]["config"])
    config["first"]["network"]["kind"] = "no_such_network"
    return rewrite(tmp_path / "kind.safetensors", saved["tensors"], saved["metadata"], config=json.dumps(config))


def future_version(tmp_path: Path, saved: dict) -> Path:
    """Write a file that claims a newer format version."""
    return rewrite(tmp_path / "future.safetensors", saved["tensors"], saved["metadata"], format_version="99")


def sizes_not_mapping(tmp_path: Path, saved: dict) -> Path:
    """Write valid JSON of the wrong shape as the sizes field."""
    return rewrite(tmp_path / "sizes.safetensors", saved["tensors"], saved["metadata"], sizes="[16, 16]")


BAD_FILES = [
    pytest.param(missing_path, "not found", id="missing-path"),
    pytest.param(directory, "is a directory without adapter_config.json", id="directory"),
    pytest.param(truncated, "is truncated", id="truncated"),
    pytest.param(header_cut, "is truncated", id="header-cut"),
    pytest.param(data_cut, "not a readable safetensors file", id="data-cut"),
    pytest.param(random_bytes, "byte limit", id="random-bytes"),
    pytest.param(empty, "shorter than a safetensors header", id="empty"),
    pytest.param(no_metadata, "no hookadapt metadata", id="no-metadata"),
    pytest.param(foreign_metadata, "no hookadapt metadata", id="foreign-metadata"),
    pytest.param(invalid_json, "not valid JSON", id="invalid-json"),
    pytest.param(unknown_kind, "no_such_network", id="unknown-network-kind"),
    pytest.param(future_version, "format version '99'", id="future-version"),
    pytest.param(sizes_not_mapping, "sizes", id="sizes-not-mapping"),
]


@pytest.mark.parametrize(("make_file", "phrase"), BAD_FILES)
def test_bad_file_raises(saved: dict, tmp_path: Path, make_file: Callable, phrase: str) -> None:
    """A bad file raises CheckpointError naming the file and leaves the model untouched."""
    path = make_file(tmp_path, saved)
    model = toy()
    before = snapshot(model)

    with pytest.raises(hookadapt.CheckpointError) as caught:
        hookadapt.load_adapters(model, path)

    text = str(caught.value)
    assert str(path) in text, "the message does not name the file"
    assert phrase in text, f"the message does not contain {phrase!r}"
    assert_restored(model, before)


def test_unknown_kind_lists_known(saved: dict, tmp_path: Path) -> None:
    """An unknown network kind in the stored config is reported with the known kinds."""
    path = unknown_kind(tmp_path, saved)

    with pytest.raises(hookadapt.CheckpointError) as caught:
        hookadapt.load_adapters(toy(), path)

    for kind in ("linear", "lora", "scale"):
        assert kind in str(caught.value), f"the message does not list kind {kind!r}"
