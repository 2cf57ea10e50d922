"""Edge cases of the public API: unusual hosts, configs, files and command-line options."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import hookadapt
from hookadapt import demo

LORA = {"kind": "lora", "rank": 2, "in_features": 4, "out_features": 4}


class Wrap(nn.Module):
    """A root that calls one child, so the child can be a target by path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class TwoStage(nn.Module):
    """A model of a Linear body followed by a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DoubleInPlace(nn.Module):
    """A module that doubles its input in place, then applies a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mul_(2))


class Total(nn.Module):
    """A module that returns a 0-d tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class Tokens(nn.Module):
    """An embedding of token ids followed by a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lin = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


class ThreeOut(nn.Module):
    """A network that ignores out_features and always returns 3 features."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def randomize(adapter_set: hookadapt.AdapterSet) -> None:
    """Give the adapters non-zero weights, so they change the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter_set.parameters(include_train_modules=False):
            param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))


def hookadapt_file(path: Path, **metadata: str) -> Path:
    """Write a safetensors file with valid hookadapt metadata, overridden by ``metadata``."""
    fields = {
        "format": "hookadapt",
        "format_version": "1",
        "hookadapt_version": hookadapt.__version__,
        "config": "{}",
        "sizes": "{}",
        "train_modules": "[]",
        "base_model": "{}",
        "aliases": "{}",
    }
    fields.update(metadata)
    safetensors.torch.save_file({"adapters/a/inner/network.lora_A.weight": torch.zeros(2, 4)}, str(path), metadata=fields)
    return path


def peft_folder(folder: Path, config: dict | str, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a PEFT LoRA folder with rank-2 weights on ``inner`` or the given ``tensors``."""
    folder.mkdir()
    if isinstance(config, dict):
        config = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config})
    (folder / "adapter_config.json").write_text(config, encoding="utf-8")
    if tensors is None:
        tensors = {
            "base_model.model.inner.lora_A.weight": torch.zeros(2, 4),
            "base_model.model.inner.lora_B.weight": torch.zeros(4, 2),
        }
    safetensors.torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


# Results and restoring.


def test_float64_fresh_adapter() -> None:
    """A fresh adapter on a float64 host leaves the output bitwise unchanged."""
    model = Wrap(nn.Linear(4, 4)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    base = model(x)
    with hookadapt.adapters(model, {"a": {"target": "inner", "network": "linear"}}):
        adapted = model(x)
    assert torch.equal(adapted, base)


def test_modulelist_target_raises(minilm: nn.Module) -> None:
    """A ModuleList is never called, so targeting it must raise instead of doing nothing."""
    config = {"a": {"target": "encoder.layer", "network": {"kind": "linear", "dim": 8}}}
    with pytest.raises(hookadapt.HookadaptError):
        hookadapt.attach(minilm, config)


def test_deepcopy_while_attached() -> None:
    """A model with adapters attached can be deep-copied, and the copy computes the same output."""
    model = Wrap(nn.Linear(4, 4))
    adapter_set = hookadapt.attach(model, {"a": {"target": "inner", "network": "linear"}})
    randomize(adapter_set)
    x = torch.randn(3, 4)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))


def test_train_module_site_detach() -> None:
    """Detach works when a train module is also an adapter site."""
    model = TwoStage()
    config = {"a": {"target": "head", "insertion": "parallel", "network": {"kind": "lora", "rank": 2}}}
    adapter_set = hookadapt.attach(model, config, freeze_base=True, train_modules=["head"])
    adapter_set.detach()
    assert hookadapt.attached(model) == []


def test_train_module_site_roundtrip(tmp_path: Path) -> None:
    """A file saved with a train module that is also a site loads back strictly."""
    model = TwoStage()
    config = {"a": {"target": "head", "insertion": "parallel", "network": {"kind": "lora", "rank": 2}}}
    adapter_set = hookadapt.attach(model, config, train_modules=["head"])
    path = hookadapt.save_adapters(adapter_set, tmp_path / "a.safetensors")
    loaded = hookadapt.load_adapters(TwoStage(), path)
    assert loaded.names == ["a"]


def test_parallel_inplace_backward() -> None:
    """A parallel adapter on a host that changes its input in place can be trained."""
    model = Wrap(DoubleInPlace())
    adapter_set = hookadapt.attach(model, {"a": {"target": "inner", "insertion": "parallel", "network": LORA}})
    model(torch.randn(3, 4)).sum().backward()
    assert all(param.grad is not None for param in adapter_set.parameters())


def test_same_name_two_roots() -> None:
    """A set attached to a submodule keeps its network in the model when a second set reuses its name."""
    model = Wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    inner_set = hookadapt.attach(model.inner, {"a": {"target": "0", "network": "linear"}})
    network = inner_set.adapters["a"]["0"].network
    with contextlib.suppress(hookadapt.AttachError):
        hookadapt.attach(model, {"a": {"target": "inner.0", "network": "linear"}})
    assert any(module is network for module in model.modules())


def test_save_after_to_bf16(tmp_path: Path) -> None:
    """Adapters saved after model.to(bfloat16) load into a bfloat16 copy of the model."""
    model = Wrap(nn.Linear(4, 4))
    adapter_set = hookadapt.attach(model, {"a": {"target": "inner", "network": "linear"}})
    model.to(torch.bfloat16)
    path = hookadapt.save_adapters(adapter_set, tmp_path / "a.safetensors")
    other = Wrap(nn.Linear(4, 4)).to(torch.bfloat16)
    loaded = hookadapt.load_adapters(other, path)
    assert loaded.names == ["a"]


def test_embedding_ids_input() -> None:
    """An input adapter on integer token ids raises instead of rounding its result back to ids."""
    model = Tokens()
    ids = torch.arange(10).reshape(2, 5)
    config = {"a": {"target": "emb", "insertion": "input", "network": {"kind": "linear", "dim": 2}}}
    with pytest.raises(hookadapt.HookadaptError):
        adapter_set = hookadapt.attach(model, config, example_inputs=(ids,))
        randomize(adapter_set)
        model(ids)


# hookadapt errors instead of raw Python errors.


def test_scalar_output_shape_error() -> None:
    """A host that returns a 0-d tensor gives a ShapeError."""
    model = Wrap(Total())
    network = {"kind": "scale", "in_features": 1, "out_features": 1}
    hookadapt.attach(model, {"a": {"target": "inner", "network": network, "strategy": "multiply"}})
    with pytest.raises(hookadapt.ShapeError):
        model(torch.randn(3))


def test_network_wrong_size() -> None:
    """A registered network that returns the wrong feature size gives a ShapeError."""
    hookadapt.register_network("three_out")(ThreeOut)
    try:
        model = Wrap(nn.Linear(4, 4))
        hookadapt.attach(model, {"a": {"target": "inner", "network": "three_out"}})
        with pytest.raises(hookadapt.ShapeError):
            model(torch.randn(2, 4))
    finally:
        hookadapt.NETWORKS.unregister("three_out")


def test_parallel_conv_stride() -> None:
    """A parallel adapter whose result cannot meet a strided convolution's output gives a ShapeError."""
    model = Wrap(nn.Conv2d(3, 8, 3, stride=2))
    config = {"a": {"target": "inner", "insertion": "parallel", "feature_dim": 1, "network": {"kind": "lora", "rank": 2}}}
    hookadapt.attach(model, config)
    with pytest.raises(hookadapt.ShapeError):
        model(torch.randn(1, 3, 9, 9))


def test_script_host_raises() -> None:
    """A TorchScript host is rejected with a hookadapt error."""
    model = Wrap(torch.jit.script(nn.Linear(4, 4)))
    with pytest.raises(hookadapt.HookadaptError):
        hookadapt.attach(model, {"a": {"target": "inner", "network": "linear"}})


def test_alpha_huge_int() -> None:
    """An integer alpha too large for a float is a ConfigError."""
    config = {"a": {"target": "inner", "insertion": "parallel", "network": {"kind": "lora", "alpha": 10**400}}}
    with pytest.raises(hookadapt.ConfigError):
        hookadapt.attach(Wrap(nn.Linear(4, 4)), config)


def test_train_modules_int() -> None:
    """A train_modules entry that is not a string is a ConfigError."""
    with pytest.raises(hookadapt.ConfigError):
        hookadapt.attach(Wrap(nn.Linear(4, 4)), {"a": {"target": "inner", "network": "linear"}}, train_modules=[1])


# Reading files.


def test_deep_json_metadata(tmp_path: Path) -> None:
    """A file whose config is nested too deeply for the JSON parser is a CheckpointError."""
    path = hookadapt_file(tmp_path / "a.safetensors", config="[" * 100_000 + "]" * 100_000)
    with pytest.raises(hookadapt.CheckpointError):
        hookadapt.load_adapters(Wrap(nn.Linear(4, 4)), path)


def test_load_rank_overflow(tmp_path: Path) -> None:
    """A file whose rank overflows tensor sizes is a CheckpointError."""
    config = {"a": {"target": "inner", "insertion": "parallel", "network": {"kind": "lora", "rank": 2**62}}}
    sizes = {"a": {"inner": [4, 4]}}
    path = hookadapt_file(tmp_path / "a.safetensors", config=json.dumps(config), sizes=json.dumps(sizes))
    with pytest.raises(hookadapt.CheckpointError):
        hookadapt.load_adapters(Wrap(nn.Linear(4, 4)), path)


def test_file_in_peft_folder(tmp_path: Path) -> None:
    """A hookadapt file loads as such even when its folder also contains a PEFT config."""
    model = Wrap(nn.Linear(4, 4))
    adapter_set = hookadapt.attach(model, {"mine": {"target": "inner", "insertion": "parallel", "network": LORA}})
    folder = hookadapt.save_adapters(adapter_set, tmp_path / "out", format="peft")
    path = hookadapt.save_adapters(adapter_set, folder / "mine.safetensors")
    loaded = hookadapt.load_adapters(Wrap(nn.Linear(4, 4)), path)
    assert loaded.names == ["mine"]


def test_peft_deep_json(tmp_path: Path) -> None:
    """A PEFT config nested too deeply for the JSON parser is a CheckpointError."""
    folder = peft_folder(tmp_path / "peft", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(hookadapt.CheckpointError):
        hookadapt.load_adapters(Wrap(nn.Linear(4, 4)), folder)


def test_peft_rank_pattern_list(tmp_path: Path) -> None:
    """A rank_pattern that is a list instead of a dict is a CheckpointError."""
    folder = peft_folder(tmp_path / "peft", {"rank_pattern": ["inner"]})
    with pytest.raises(hookadapt.CheckpointError):
        hookadapt.load_adapters(Wrap(nn.Linear(4, 4)), folder)


def test_peft_rank_pattern_regex(tmp_path: Path) -> None:
    """A rank_pattern key that is not a valid regex is a CheckpointError."""
    folder = peft_folder(tmp_path / "peft", {"rank_pattern": {"(": 4}})
    with pytest.raises(hookadapt.CheckpointError):
        hookadapt.load_adapters(Wrap(nn.Linear(4, 4)), folder)


def test_peft_non_linear(tmp_path: Path) -> None:
    """A PEFT folder with LoRA weights for a LayerNorm host is rejected, as docs/design.md states."""
    folder = peft_folder(tmp_path / "peft", {})
    with pytest.raises(hookadapt.CheckpointError):
        hookadapt.load_adapters(Wrap(nn.LayerNorm(4)), folder)


def test_peft_bf16_weights(tmp_path: Path) -> None:
    """A PEFT folder with bfloat16 weights loads by default, as PeftModel.from_pretrained loads it."""
    weight = torch.randn(2, 4).to(torch.bfloat16)
    tensors = {
        "base_model.model.inner.lora_A.weight": weight,
        "base_model.model.inner.lora_B.weight": torch.zeros(4, 2, dtype=torch.bfloat16),
    }
    folder = peft_folder(tmp_path / "peft", {}, tensors)
    loaded = hookadapt.load_adapters(Wrap(nn.Linear(4, 4)), folder)
    assert torch.equal(loaded.adapters["default"]["inner"].network.lora_A.weight.float(), weight.float())


# The command line.


def test_demo_batch_size_zero(tmp_path: Path) -> None:
    """The demo rejects --batch-size 0 with a message and a non-zero status, not a traceback."""
    arguments = ["--limit", "1", "--batch-size", "0", "--output", str(tmp_path / "a.safetensors")]
    try:
        status = demo.main(arguments)
    except SystemExit as exit:
        status = exit.code
    assert status not in (0, None)


def test_enable_list_argument_raises() -> None:
    """A list passed in place of names raises a ConfigError that explains how to pass them."""
    model = Wrap(nn.Linear(4, 4))
    adapter_set = hookadapt.attach(model, {"a": {"target": "inner", "network": "linear"}})
    with pytest.raises(hookadapt.ConfigError, match="separate arguments"):
        adapter_set.enable(["a"])  # type: ignore[arg-type]


def test_save_empty_names_raises(tmp_path: Path) -> None:
    """Saving with names=[] raises instead of saving every adapter."""
    model = Wrap(nn.Linear(4, 4))
    adapter_set = hookadapt.attach(model, {"a": {"target": "inner", "network": "linear"}})
    with pytest.raises(hookadapt.ConfigError, match="no adapter names given"):
        hookadapt.save_adapters(adapter_set, tmp_path / "a.safetensors", names=[])
