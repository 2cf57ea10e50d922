"""PEFT LoRA folders load into hookadapt and hookadapt writes folders that PEFT loads, with equal outputs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from torch import nn

import hookadapt
from conftest import assert_restored, hidden_states, randomize, snapshot

TOLERANCE = 1e-5
QUERY_VALUE = r"re:encoder\.layer\.\d+\.attention\.self\.(query|value)"
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


class Toy(nn.Module):
    """Two Linear layers with a nonlinearity between them, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def toy() -> Toy:
    """Build the toy model with fixed weights, in eval mode."""
    torch.manual_seed(0)
    return Toy().eval()


def toy_input() -> torch.Tensor:
    """Return a fixed random input for `Toy`."""
    return torch.randn((5, 8), generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a model without gradients."""
    with torch.no_grad():
        return model(x)


def max_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    """Return the max absolute difference between two tensors."""
    return (first - second).abs().max().item()


def peft_model(model: nn.Module, **options: Any) -> peft.PeftModel:
    """Wrap a copy of ``model`` with PEFT's LoRA and give every lora_B and modules_to_save copy random values."""
    torch.manual_seed(3)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**options)).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return wrapped


def peft_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a PEFT folder's weights file."""
    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


# PEFT to hookadapt.


@pytest.fixture(scope="module")
def minilm_peft(minilm_files: tuple, review_batch: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Save PEFT LoRA on MiniLM's query and value layers once, with PEFT's and the base model's hidden states."""
    reference = peft_model(minilm_files[1], r=4, lora_alpha=8, target_modules=["query", "value"])
    folder = tmp_path_factory.mktemp("minilm-peft")
    reference.save_pretrained(str(folder))
    return {
        "folder": folder,
        "expected": hidden_states(reference, review_batch),
        "base": hidden_states(minilm_files[1], review_batch),
    }


@pytest.mark.parametrize("name", ["", *PEFT_FILES], ids=["folder", "config-file", "weights-file"])
def test_peft_folder_loads_minilm(minilm: nn.Module, review_batch: dict, minilm_peft: dict, name: str) -> None:
    """A PEFT folder, or either of its files, loads into a fresh MiniLM with PEFT's hidden states."""
    before = snapshot(minilm)

    loaded = hookadapt.load_adapters(minilm, minilm_peft["folder"] / name if name else minilm_peft["folder"])
    output = hidden_states(minilm, review_batch)
    sites = sorted(loaded.adapters["default"])
    loaded.detach()
    difference = max_difference(output, minilm_peft["expected"])
    print(f"PEFT folder into hookadapt, MiniLM via {name or 'folder'}: max abs difference {difference:g}")

    assert len(sites) == 12, f"the adapters sit at {sites}, not at the 12 query and value layers"
    assert not torch.equal(output, minilm_peft["base"]), "the loaded adapters change nothing"
    assert difference <= TOLERANCE, f"hidden states differ from PEFT's by up to {difference:g}"
    assert_restored(minilm, before)


TOY_OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"use_rslora": True}, id="rslora"),
    pytest.param({"rank_pattern": {"body.2": 2}, "alpha_pattern": {"body.2": 6}}, id="patterns"),
    pytest.param({"lora_dropout": 0.1}, id="dropout"),
    pytest.param({"modules_to_save": ["head"]}, id="modules-to-save"),
    pytest.param(
        {
            "use_rslora": True,
            "rank_pattern": {"body.2": 2},
            "alpha_pattern": {"body.0": 3},
            "lora_dropout": 0.1,
            "modules_to_save": ["head"],
        },
        id="all",
    ),
]


@pytest.mark.parametrize("options", TOY_OPTIONS)
def test_peft_options_load_toy(tmp_path: Path, options: dict) -> None:
    """rsLoRA, rank and alpha patterns, dropout and modules_to_save load with PEFT's outputs."""
    model = toy()
    x = toy_input()
    reference = peft_model(model, r=4, lora_alpha=8, target_modules=["body.0", "body.2"], **options)
    reference.save_pretrained(str(tmp_path))
    expected = run(reference, x)
    before = snapshot(model)

    loaded = hookadapt.load_adapters(model, tmp_path)
    output = run(model, x)
    ranks = {path: adapter.network.rank for path, adapter in loaded.adapters["default"].items()}
    train_modules = list(loaded.train_modules)
    loaded.detach()
    difference = max_difference(output, expected)
    print(f"PEFT folder into hookadapt, toy {sorted(options)}: max abs difference {difference:g}")

    assert ranks == {"body.0": 4, "body.2": options.get("rank_pattern", {}).get("body.2", 4)}, "the ranks differ"
    assert train_modules == options.get("modules_to_save", []), "modules_to_save did not become train modules"
    assert difference <= TOLERANCE, f"outputs differ from PEFT's by up to {difference:g}"
    assert_restored(model, before)


def test_prefixless_keys_load(tmp_path: Path) -> None:
    """A weights file whose keys lack the base_model.model. prefix loads like PEFT's own."""
    model = toy()
    x = toy_input()
    reference = peft_model(model, r=4, lora_alpha=8, target_modules=["body.0", "body.2"], modules_to_save=["head"])
    reference.save_pretrained(str(tmp_path))
    expected = run(reference, x)
    tensors = {key.removeprefix("base_model.model."): value for key, value in peft_weights(tmp_path).items()}
    safetensors.torch.save_file(tensors, str(tmp_path / "adapter_model.safetensors"))

    loaded = hookadapt.load_adapters(model, tmp_path)
    output = run(model, x)
    loaded.detach()
    difference = max_difference(output, expected)

    assert not any(key.startswith("base_model.") for key in tensors), "the rewritten file still has the prefix"
    assert difference <= TOLERANCE, f"outputs differ from PEFT's by up to {difference:g}"


# hookadapt to PEFT.


def lora_config(target: str | list[str], **options: Any) -> dict[str, Any]:
    """Return a hookadapt config of one LoRA adapter that PEFT's format can hold."""
    return {
        "lora": {
            "target": target,
            "insertion": "parallel",
            "network": {"kind": "lora", "rank": 4, "alpha": 8, **options.pop("network", {})},
            "strategy": "residual_add",
            **options,
        }
    }


def test_peft_loads_minilm_save(minilm: nn.Module, minilm_files: tuple, review_batch: dict, tmp_path: Path) -> None:
    """save_adapters(format="peft") on MiniLM writes a folder that PeftModel loads with equal hidden states."""
    adapter_set = hookadapt.attach(minilm, lora_config(QUERY_VALUE))
    randomize(adapter_set)
    expected = hidden_states(minilm, review_batch)
    hookadapt.save_adapters(adapter_set, tmp_path, format="peft")
    adapter_set.detach()

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(minilm_files[1]), str(tmp_path)).eval()
    output = hidden_states(reference, review_batch)
    difference = max_difference(output, expected)
    print(f"hookadapt folder into PEFT, MiniLM: max abs difference {difference:g}")

    assert sorted(entry.name for entry in tmp_path.iterdir()) == PEFT_FILES, "the folder holds other files"
    assert difference <= TOLERANCE, f"hidden states differ from hookadapt's by up to {difference:g}"


HOOKADAPT_OPTIONS = [
    pytest.param({}, [], id="plain"),
    pytest.param({"network": {"use_rslora": True}}, [], id="rslora"),
    pytest.param({"overrides": {"body.2": {"rank": 2, "alpha": 6}}}, [], id="overrides"),
    pytest.param({"network": {"dropout": 0.1}}, [], id="dropout"),
    pytest.param({}, ["head"], id="train-module"),
    pytest.param(
        {"network": {"use_rslora": True, "dropout": 0.1}, "overrides": {"body.0": {"alpha": 3}, "body.2": {"rank": 2}}},
        ["head"],
        id="all",
    ),
]


@pytest.mark.parametrize(("options", "train_modules"), HOOKADAPT_OPTIONS)
def test_peft_loads_toy_save(tmp_path: Path, options: dict, train_modules: list) -> None:
    """PeftModel loads a toy folder written by hookadapt, with rsLoRA, per-site options and a head."""
    model = toy()
    x = toy_input()
    config = lora_config(["body.0", "body.2"], **copy.deepcopy(options))
    adapter_set = hookadapt.attach(model, config, train_modules=train_modules)
    randomize(adapter_set)
    with torch.no_grad():
        for module in adapter_set.train_modules.values():
            module.weight.mul_(-1.5)
    expected = run(model, x)
    hookadapt.save_adapters(adapter_set, tmp_path / "peft", format="peft")
    adapter_set.detach()

    reference = peft.PeftModel.from_pretrained(toy(), str(tmp_path / "peft")).eval()
    output = run(reference, x)
    difference = max_difference(output, expected)
    print(f"hookadapt folder into PEFT, toy {sorted(options)} {train_modules}: max abs difference {difference:g}")

    assert difference <= TOLERANCE, f"outputs differ from hookadapt's by up to {difference:g}"


def test_peft_save_round_trips(tmp_path: Path) -> None:
    """A folder written by hookadapt loads back into hookadapt bitwise."""
    model = toy()
    x = toy_input()
    config = lora_config(["body.0", "body.2"], overrides={"body.2": {"rank": 2, "alpha": 6}})
    adapter_set = hookadapt.attach(model, config, train_modules=["head"])
    randomize(adapter_set)
    expected = run(model, x)
    hookadapt.save_adapters(adapter_set, tmp_path, format="peft")
    adapter_set.detach()

    loaded = hookadapt.load_adapters(model, tmp_path)
    output = run(model, x)
    loaded.detach()

    assert torch.equal(output, expected), "the reloaded adapters give another output"


# Bad PEFT folders.


def pickle_only(folder: Path) -> None:
    """Save a PEFT LoRA folder with adapter_model.bin, PEFT's pickle format, and no safetensors file."""
    peft_model(toy(), r=4, target_modules=["body.0"]).save_pretrained(str(folder), safe_serialization=False)


def dora(folder: Path) -> None:
    """Save a PEFT DoRA folder."""
    peft_model(toy(), r=4, target_modules=["body.0"], use_dora=True).save_pretrained(str(folder))


def ia3(folder: Path) -> None:
    """Save a PEFT IA3 folder."""
    torch.manual_seed(3)
    config = peft.IA3Config(target_modules=["body.0"], feedforward_modules=[])
    peft.get_peft_model(toy(), config).save_pretrained(str(folder))


def conv(folder: Path) -> None:
    """Save a PEFT LoRA folder for a Conv2d layer, whose lora_A and lora_B weights are 4-D."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    peft_model(model, r=4, target_modules=["0"]).save_pretrained(str(folder))


def edited_config(**changes: Any) -> Callable[[Path], None]:
    """Return a maker of a PEFT LoRA folder whose adapter_config.json has ``changes``."""

    def make(folder: Path) -> None:
        peft_model(toy(), r=4, target_modules=["body.0"]).save_pretrained(str(folder))
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")

    return make


BAD_FOLDERS = [
    pytest.param(pickle_only, "adapter_model.bin is a pickle, which hookadapt never loads", id="bin-only"),
    pytest.param(dora, "use_dora=True is not supported", id="dora"),
    pytest.param(edited_config(use_dora=True), "use_dora=True is not supported", id="use-dora-edited"),
    pytest.param(ia3, "expected peft_type 'LORA' in adapter_config.json, found 'IA3'", id="ia3"),
    pytest.param(edited_config(peft_type="LOHA"), "found 'LOHA'", id="loha-edited"),
    pytest.param(edited_config(r=2), "has rank 4 in its weights but 2", id="rank-disagrees"),
    pytest.param(edited_config(bias="all"), "bias='all' is not supported", id="bias"),
    pytest.param(conv, "module '0' needs 2-D lora_A and lora_B weights", id="conv"),
]


@pytest.mark.parametrize(("make_folder", "phrase"), BAD_FOLDERS)
def test_bad_peft_folder_raises(tmp_path: Path, make_folder: Callable, phrase: str) -> None:
    """A PEFT folder that hookadapt cannot reproduce raises, naming the folder, and changes nothing."""
    folder = tmp_path / "peft"
    make_folder(folder)
    model = toy()
    before = snapshot(model)

    with pytest.raises(hookadapt.CheckpointError) as caught:
        hookadapt.load_adapters(model, folder)

    assert str(folder) in str(caught.value), "the message does not name the folder"
    assert phrase in str(caught.value), f"the message does not contain {phrase!r}"
    assert_restored(model, before)


# Import.


def test_import_skips_peft() -> None:
    """import hookadapt does not import peft."""
    result = subprocess.run(
        [sys.executable, "-c", "import hookadapt, sys; print('peft' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )

    assert result.stdout.strip() == "False", f"import hookadapt imported peft: {result.stdout!r} {result.stderr!r}"
