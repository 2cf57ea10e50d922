"""Invalid calls of the public API: each raises the documented error and changes nothing.

Every row names the error class and message fragments that a good message
contains: the adapter, the module path where one applies, what was expected
and what to do. After the call the model must be exactly as it was just
before (tensors bitwise, hooks, children, attached sets), and every file in
the test's folder must have the same bytes, with no file added.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import hookadapt
from conftest import snapshot


class Toy(nn.Module):
    """A Sequential body, one ModuleList block, a LayerNorm and a Linear head."""

    def __init__(self, head_features: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, head_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


LORA_HEAD = {"target": "head", "insertion": "parallel", "network": {"kind": "lora", "rank": 2}}
LINEAR_BODY = {"target": "body.2", "network": {"kind": "linear", "dim": 2}}
SAVED_CONFIG = {"lora": LORA_HEAD, "bottleneck": LINEAR_BODY}
LORA_KEY = "adapters/lora/head/network.lora_A.weight"


@dataclass
class Env:
    """The model under test, its folder and a valid checkpoint saved from an identical model."""

    folder: Path
    model: Toy = field(default_factory=Toy)
    saved: Path = field(init=False)
    sets: list[hookadapt.AdapterSet] = field(default_factory=list)
    # The file or folder that a load row reads, written by the row's setup.
    target: Path | None = None

    def __post_init__(self) -> None:
        source = Toy()
        source.load_state_dict(self.model.state_dict())
        adapter_set = hookadapt.attach(source, SAVED_CONFIG)
        with torch.no_grad():
            for param in adapter_set.parameters():
                param.add_(0.5)
        self.saved = hookadapt.save_adapters(adapter_set, self.folder / "saved.safetensors")
        adapter_set.detach()

    def attach(self, config: dict[str, Any], **kwargs: Any) -> hookadapt.AdapterSet:
        adapter_set = hookadapt.attach(self.model, config, **kwargs)
        self.sets.append(adapter_set)
        return adapter_set


def one(**spec: Any) -> dict[str, Any]:
    """Return a config of one adapter called ``a`` on the head, with ``spec`` added to or replacing its fields."""
    return {"a": {"target": "head", "network": {"kind": "linear", "dim": 2}, **spec}}


def attach_one(**spec: Any) -> Callable[[Env], Any]:
    """Return a call that attaches ``one(**spec)`` to the model."""
    return lambda env: hookadapt.attach(env.model, one(**spec))


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, file.metadata()


def rewritten(env: Env, *, tensors: Callable[[dict], dict] | None = None, drop: tuple[str, ...] = (), **fields: str) -> Path:
    """Write a copy of the saved file with its tensors changed, metadata fields dropped or set."""
    stored, metadata = read_file(env.saved)
    metadata = {key: value for key, value in metadata.items() if key not in drop}
    metadata.update(fields)
    path = env.folder / "changed.safetensors"
    safetensors.torch.save_file(stored if tensors is None else tensors(stored), str(path), metadata=metadata)
    return path


def raw_file(env: Env, content: bytes) -> Path:
    path = env.folder / "raw.safetensors"
    path.write_bytes(content)
    return path


def header_bytes(header: dict[str, Any], body: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


def renamed_key(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stored = dict(stored)
    stored["adapters/lora/head/network.lora_C.weight"] = stored.pop(LORA_KEY)
    return stored


def reshaped_key(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**stored, LORA_KEY: torch.zeros(3, 4)}


def int_key(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**stored, LORA_KEY: stored[LORA_KEY].to(torch.int32)}


@dataclass
class Case:
    """One invalid call: what it raises, the fragments its message must contain, and an optional setup."""

    id: str
    call: Callable[[Env], Any]
    error: type[BaseException]
    fragments: tuple[str, ...]
    setup: Callable[[Env], Any] | None = None


def attach_then(config: dict[str, Any], **kwargs: Any) -> Callable[[Env], Any]:
    return lambda env: env.attach(config, **kwargs)


def load_case(
    case_id: str,
    make_path: Callable[[Env], Path],
    error: type[BaseException],
    fragments: tuple[str, ...],
    *,
    setup: Callable[[Env], Any] | None = None,
    **load_kwargs: Any,
) -> Case:
    """Return a row whose setup writes the file to load (after ``setup``) and whose call loads it."""

    def prepare(env: Env) -> None:
        if setup is not None:
            setup(env)
        env.target = make_path(env)

    return Case(case_id, lambda env: hookadapt.load_adapters(env.model, env.target, **load_kwargs), error, fragments, setup=prepare)


def forward_case(case_id: str, x: torch.Tensor, spec: dict[str, Any], error: type[BaseException], fragments: tuple[str, ...]) -> Case:
    """Return a row that attaches adapter ``a`` with ``spec``, then runs the model on ``x``."""
    return Case(case_id, lambda env: env.model(x), error, fragments, setup=attach_then(one(**spec)))


def on_last_set(method: str, *args: Any, **kwargs: Any) -> Callable[[Env], Any]:
    return lambda env: getattr(env.sets[-1], method)(*args, **kwargs)


def run_routed(assignments: list[Any], x: torch.Tensor) -> Callable[[Env], Any]:
    """Return a call that runs the model on ``x`` inside ``route(assignments)`` of the last attached set."""

    def call(env: Env) -> None:
        with env.sets[-1].route(assignments):
            env.model(x)

    return call


def save_last_set(name: str, **kwargs: Any) -> Callable[[Env], Any]:
    return lambda env: hookadapt.save_adapters(env.sets[-1], env.folder / name, **kwargs)


CONFIG_CASES = [
    Case(
        "config-not-mapping",
        lambda env: hookadapt.attach(env.model, [LORA_HEAD]),
        hookadapt.ConfigError,
        ("config must be a mapping", "got list"),
    ),
    Case(
        "config-empty",
        lambda env: hookadapt.attach(env.model, {}),
        hookadapt.ConfigError,
        ("config is empty", "give at least one adapter"),
    ),
    Case(
        "name-leading-digit",
        lambda env: hookadapt.attach(env.model, {"1a": LORA_HEAD}),
        hookadapt.ConfigError,
        ("'1a'", "is invalid", "starting with a letter"),
    ),
    Case(
        "name-with-dot",
        lambda env: hookadapt.attach(env.model, {"a.b": LORA_HEAD}),
        hookadapt.ConfigError,
        ("'a.b'", "is invalid", "letters, digits"),
    ),
    Case(
        "field-unknown",
        attach_one(targets="head"),
        hookadapt.ConfigError,
        ("adapter 'a'", "unknown field(s) 'targets'", "valid fields are"),
    ),
    Case(
        "field-network-missing",
        lambda env: hookadapt.attach(env.model, {"a": {"target": "head"}}),
        hookadapt.ConfigError,
        ("adapter 'a'", "missing required field 'network'"),
    ),
    Case(
        "field-target-missing",
        lambda env: hookadapt.attach(env.model, {"a": {"network": "linear"}}),
        hookadapt.ConfigError,
        ("adapter 'a'", "missing required field 'target'"),
    ),
    Case(
        "insertion-unknown",
        attach_one(insertion="before"),
        hookadapt.ConfigError,
        ("adapter 'a'", "insertion must be one of", "'before'"),
    ),
    Case(
        "network-kind-unknown",
        attach_one(network="bottleneck"),
        hookadapt.ConfigError,
        ("adapter 'a'", "unknown network kind 'bottleneck'", "known kinds are", "register_network"),
    ),
    Case(
        "strategy-kind-unknown",
        attach_one(strategy="sum"),
        hookadapt.ConfigError,
        ("adapter 'a'", "unknown strategy kind 'sum'", "register_strategy"),
    ),
    Case(
        "network-option-unknown",
        attach_one(network={"kind": "linear", "size": 4}),
        hookadapt.ConfigError,
        ("adapter 'a'", "'size'", "valid options are"),
    ),
    Case(
        "dim-zero",
        attach_one(network={"kind": "linear", "dim": 0}),
        hookadapt.ConfigError,
        ("adapter 'a'", "dim must be a positive int", "got 0"),
    ),
    Case(
        "rank-negative",
        attach_one(network={"kind": "lora", "rank": -1}),
        hookadapt.ConfigError,
        ("adapter 'a'", "rank must be a positive int", "got -1"),
    ),
    Case(
        "dropout-one",
        attach_one(network={"kind": "lora", "dropout": 1.0}),
        hookadapt.ConfigError,
        ("adapter 'a'", "dropout must be a number in [0, 1)"),
    ),
    Case(
        "activation-unknown",
        attach_one(network={"kind": "linear", "activation": "softmax"}),
        hookadapt.ConfigError,
        ("adapter 'a'", "activation must be one of", "'softmax'"),
    ),
    Case(
        "alpha-nan",
        attach_one(network={"kind": "lora", "alpha": float("nan")}),
        hookadapt.ConfigError,
        ("adapter 'a'", "network.alpha", "finite number"),
    ),
    Case(
        "option-dict-value",
        attach_one(network={"kind": "linear", "dim": {"size": 2}}),
        hookadapt.ConfigError,
        ("adapter 'a'", "network.dim", "JSON value"),
    ),
    Case(
        "stochastic-depth-above-one",
        attach_one(strategy={"kind": "residual_add", "stochastic_depth": 1.5}),
        hookadapt.ConfigError,
        ("adapter 'a'", "stochastic_depth must be a number in [0, 1]"),
    ),
    Case(
        "dtype-int8",
        attach_one(dtype="int8"),
        hookadapt.ConfigError,
        ("adapter 'a'", "dtype must be one of", "'int8'"),
    ),
    Case(
        "dtype-torch-object",
        attach_one(dtype=torch.float16),
        hookadapt.ConfigError,
        ("adapter 'a'", "dtype must be one of", "float16"),
    ),
    Case(
        "feature-dim-string",
        attach_one(feature_dim="last"),
        hookadapt.ConfigError,
        ("adapter 'a'", "feature_dim must be an int", "'last'"),
    ),
    Case(
        "shared-string",
        attach_one(shared="yes"),
        hookadapt.ConfigError,
        ("adapter 'a'", "shared must be True or False", "'yes'"),
    ),
    Case(
        "input-select-float",
        attach_one(input_select=1.5),
        hookadapt.ConfigError,
        ("adapter 'a'", "input_select must be None, an int index or a str key", "1.5"),
    ),
    Case(
        "in-features-zero",
        attach_one(network={"kind": "linear", "in_features": 0}),
        hookadapt.ConfigError,
        ("adapter 'a'", "network.in_features must be a positive int or None", "got 0"),
    ),
    Case(
        "overrides-with-shared",
        attach_one(target=["head", "body.0"], shared=True, overrides={"head": {"dim": 3}}),
        hookadapt.ConfigError,
        ("adapter 'a'", "overrides cannot apply to a shared network"),
    ),
    Case(
        "target-empty-list",
        attach_one(target=[]),
        hookadapt.ConfigError,
        ("adapter 'a'", "target is empty", "give at least one module path pattern"),
    ),
    Case(
        "target-int",
        attach_one(target=5),
        hookadapt.ConfigError,
        ("adapter 'a'", "target must be a module path pattern", "got 5"),
    ),
    Case(
        "target-regex-invalid",
        attach_one(target="re:(head"),
        hookadapt.ConfigError,
        ("adapter 'a'", "target regex 're:(head' is invalid"),
    ),
    Case(
        "target-colon-other-name",
        attach_one(target="head:other"),
        hookadapt.ConfigError,
        ("adapter 'a'", "'head:other'", "names adapter 'other'", "must be 'a' or left out"),
    ),
    Case(
        "train-module-unknown",
        lambda env: hookadapt.attach(env.model, one(), train_modules=["classifier"]),
        hookadapt.ConfigError,
        ("train_modules entry 'classifier'", "give exact paths"),
    ),
]

TARGET_CASES = [
    Case(
        "target-no-match",
        attach_one(target="encoder.layer"),
        hookadapt.TargetError,
        ("adapter 'a'", "'encoder.layer' matches no module", "closest module paths"),
    ),
    Case(
        "glob-no-match",
        attach_one(target="body.*.output"),
        hookadapt.TargetError,
        ("adapter 'a'", "'body.*.output' matches no module", "Globs use '*'"),
    ),
    Case(
        "exclude-removes-all",
        attach_one(target="body.*", exclude="re:body\\.\\d"),
        hookadapt.TargetError,
        ("adapter 'a'", "removes every module", "narrow exclude or widen target"),
    ),
    Case(
        "exclude-no-match",
        attach_one(exclude="tail"),
        hookadapt.TargetError,
        ("adapter 'a'", "exclude pattern 'tail' matches no module"),
    ),
    Case(
        "target-module-list",
        attach_one(target="blocks"),
        hookadapt.TargetError,
        ("adapter 'a'", "'blocks' is a ModuleList", "never called", "'blocks.*'"),
    ),
    Case(
        "target-reserved-holder",
        lambda env: hookadapt.attach(env.model, {"b": {"target": "head._hookadapt", "network": "linear"}}),
        hookadapt.TargetError,
        ("adapter 'b'", "'head._hookadapt' matches no module"),
        setup=attach_then(one()),
    ),
]

SHAPE_CASES = [
    Case(
        "sizes-unknown",
        attach_one(target="body.1"),
        hookadapt.ShapeError,
        ("adapter 'a' at 'body.1'", "ReLU", "set network.in_features", "example_inputs"),
    ),
    Case(
        "shared-sizes-differ",
        attach_one(target=["body.0", "head"], shared=True),
        hookadapt.ShapeError,
        ("adapter 'a'", "'body.0'", "'head'", "set shared to False"),
    ),
    Case(
        "probe-input-wrong-width",
        lambda env: hookadapt.attach(env.model, one(target="body.1"), example_inputs=(torch.randn(2, 5),)),
        hookadapt.AttachError,
        ("probe forward on example_inputs failed", "pass inputs that the model accepts"),
    ),
    Case(
        "probe-input-meta",
        lambda env: hookadapt.attach(env.model, one(target="body.1"), example_inputs=(torch.empty(2, 4, device="meta"),)),
        hookadapt.AttachError,
        ("probe forward on example_inputs failed", "meta"),
    ),
    forward_case(
        "in-features-wrong",
        torch.randn(2, 4),
        {"network": {"kind": "linear", "dim": 2, "in_features": 5}},
        hookadapt.ShapeError,
        ("adapter 'a' at 'head'", "input size is 5", "2 features", "network.in_features"),
    ),
    forward_case(
        "input-wrong-width",
        torch.randn(2, 5),
        {"target": "body.0", "insertion": "input"},
        hookadapt.ShapeError,
        ("adapter 'a' at 'body.0'", "input size is 4", "5 features", "feature_dim"),
    ),
    forward_case(
        "feature-dim-out-of-range",
        torch.randn(2, 4),
        {"feature_dim": 3},
        hookadapt.ShapeError,
        ("adapter 'a' at 'head'", "feature_dim=3 is out of range", "(2, 2)", "set feature_dim"),
    ),
]

DTYPE_AND_DEVICE_CASES = [
    forward_case(
        "input-integer-tensor",
        torch.ones(2, 4, dtype=torch.int64),
        {"target": "body.0", "insertion": "input"},
        hookadapt.SelectionError,
        ("adapter 'a' at 'body.0'", "expected a floating-point tensor", "torch.int64", "input_select"),
    ),
    forward_case(
        "input-meta-tensor",
        torch.empty(2, 4, device="meta"),
        {"target": "body.0", "insertion": "input"},
        RuntimeError,
        ("meta",),
    ),
    load_case(
        "load-dtype-int32",
        lambda env: env.saved,
        hookadapt.CheckpointError,
        ("saved.safetensors", "dtype=torch.int32", "use one of"),
        dtype=torch.int32,
    ),
    load_case(
        "load-dtype-name-unknown",
        lambda env: env.saved,
        hookadapt.CheckpointError,
        ("dtype='half'", "use one of", "float16"),
        dtype="half",
    ),
    Case(
        "load-into-meta-model",
        lambda env: hookadapt.load_adapters(env.model, env.saved),
        hookadapt.CheckpointError,
        ("saved.safetensors", "meta"),
        setup=lambda env: env.model.to("meta"),
    ),
]

SELECTION_CASES = [
    forward_case(
        "input-select-position-missing",
        torch.randn(2, 4),
        {"target": "body.0", "insertion": "input", "input_select": 3},
        hookadapt.SelectionError,
        ("adapter 'a' at 'body.0'", "positional argument 3", "set input_select"),
    ),
    forward_case(
        "input-select-name-missing",
        torch.randn(2, 4),
        {"target": "body.0", "insertion": "input", "input_select": "hidden"},
        hookadapt.SelectionError,
        ("adapter 'a' at 'body.0'", "argument 'hidden'", "set input_select"),
    ),
    forward_case(
        "output-select-on-tensor",
        torch.randn(2, 4),
        {"output_select": "logits"},
        hookadapt.SelectionError,
        ("adapter 'a' at 'head'", "output_select='logits'", "found Tensor(2, 2)"),
    ),
]

SET_CASES = [
    Case(
        "enable-unknown-name",
        on_last_set("enable", "b"),
        hookadapt.ConfigError,
        ("no adapter in this set matches 'b'", "the adapters are a"),
        setup=attach_then(one()),
    ),
    Case(
        "disable-non-string",
        on_last_set("disable", 5),
        hookadapt.ConfigError,
        ("must be strings or globs", "got 5"),
        setup=attach_then(one()),
    ),
    Case(
        "set-trainable-unknown",
        on_last_set("set_trainable", "z*"),
        hookadapt.ConfigError,
        ("matches 'z*'", "the adapters are a"),
        setup=attach_then(one()),
    ),
    Case(
        "attach-same-name",
        attach_one(target="body.0"),
        hookadapt.AttachError,
        ("'a'", "already attached", "replace=True"),
        setup=attach_then(one()),
    ),
    Case(
        "detach-out-of-order",
        lambda env: env.sets[0].detach(),
        hookadapt.AttachError,
        ("cannot detach adapters 'a'", "'b'", "detach the later set first"),
        setup=lambda env: (env.attach(one()), env.attach({"b": LINEAR_BODY})),
    ),
    Case(
        "replace-set-below-another",
        lambda env: hookadapt.attach(env.model, {"a": LORA_HEAD, "c": LINEAR_BODY}, replace=True),
        hookadapt.AttachError,
        ("'a'", "'b'"),
        setup=lambda env: (env.attach(one()), env.attach({"b": LINEAR_BODY}), env.attach({"c": one()["a"]})),
    ),
    Case(
        "combine-into-taken-name",
        on_last_set("combine", {"a": 1.0}, into="a"),
        hookadapt.AttachError,
        ("into 'a'", "already attached", "choose another name"),
        setup=attach_then(one()),
    ),
    Case(
        "combine-unknown-adapter",
        on_last_set("combine", {"q": 1.0}, into="c"),
        hookadapt.ConfigError,
        ("unknown adapter(s) 'q'", "the adapters are a"),
        setup=attach_then(one()),
    ),
    Case(
        "route-unknown-name",
        run_routed(["zzz", None], torch.randn(2, 4)),
        hookadapt.ConfigError,
        ("route entry 0", "'zzz'", "the adapters are a", "None selects the base model"),
        setup=attach_then(one()),
    ),
    Case(
        "route-wrong-length",
        run_routed(["a", "a", None], torch.randn(2, 4)),
        hookadapt.SelectionError,
        ("'head'", "route has 3 entries", "2 samples", "one route entry per sample"),
        setup=attach_then(one()),
    ),
    Case(
        "fusion-member-unknown",
        lambda env: hookadapt.attach(env.model, {"f": {"target": "head", "network": "identity", "strategy": {"kind": "fusion", "adapters": ["zz"]}}}),
        hookadapt.ConfigError,
        ("adapter 'f'", "member 'zz' is not another adapter"),
    ),
    Case(
        "merge-linear-network",
        on_last_set("merge", "a"),
        hookadapt.AttachError,
        ("adapter 'a' at 'head'", "cannot be merged", "found 'linear'"),
        setup=attach_then(one()),
    ),
]

SAVE_CASES = [
    Case(
        "save-unknown-name",
        save_last_set("new.safetensors", names=["zzz"]),
        hookadapt.ConfigError,
        ("matches 'zzz'", "the adapters are a"),
        setup=attach_then(one()),
    ),
    Case(
        "save-format-unknown",
        save_last_set("new.onnx", format="onnx"),
        hookadapt.CheckpointError,
        ("unknown checkpoint format 'onnx'", "'peft'"),
        setup=attach_then(one()),
    ),
    Case(
        "save-to-directory",
        lambda env: hookadapt.save_adapters(env.sets[-1], env.folder),
        hookadapt.CheckpointError,
        ("it is a directory", "adapters.safetensors"),
        setup=attach_then(one()),
    ),
    Case(
        "save-folder-missing",
        save_last_set("missing/new.safetensors"),
        hookadapt.CheckpointError,
        ("folder", "does not exist", "create it first"),
        setup=attach_then(one()),
    ),
    Case(
        "save-peft-two-adapters",
        save_last_set("peft", format="peft"),
        hookadapt.CheckpointError,
        ("PEFT's format holds one adapter", "pass names=['NAME']"),
        setup=attach_then(SAVED_CONFIG),
    ),
    Case(
        "save-peft-linear-network",
        save_last_set("peft", format="peft", names=["bottleneck"]),
        hookadapt.CheckpointError,
        ("'bottleneck'", "lora"),
        setup=attach_then(SAVED_CONFIG),
    ),
    Case(
        "save-peft-over-file",
        lambda env: hookadapt.save_adapters(env.sets[-1], env.saved, format="peft", names=["lora"]),
        hookadapt.CheckpointError,
        ("saved.safetensors", "it is a file", "folder"),
        setup=attach_then(SAVED_CONFIG),
    ),
]


def truncated(env: Env) -> Path:
    return raw_file(env, env.saved.read_bytes()[:5])


def header_past_end(env: Env) -> Path:
    return raw_file(env, (10_000).to_bytes(8, "little") + b"{}")


def header_too_large(env: Env) -> Path:
    return raw_file(env, (2**40).to_bytes(8, "little") + b"{}")


def header_garbage(env: Env) -> Path:
    return raw_file(env, (4).to_bytes(8, "little") + b"\xff\xfe{[")


def tensor_past_end(env: Env) -> Path:
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": {"format": "hookadapt"}}
    return raw_file(env, header_bytes(header, b"\0" * 8))


def peft_folder_without_weights(env: Env) -> Path:
    folder = env.folder / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}), encoding="utf-8")
    return folder


def plain_folder(env: Env) -> Path:
    folder = env.folder / "plain"
    folder.mkdir()
    return folder


FILE_CASES = [
    load_case(
        "file-missing",
        lambda env: env.folder / "absent.safetensors",
        hookadapt.CheckpointError,
        ("absent.safetensors", "not found", "check the path"),
    ),
    load_case(
        "file-is-plain-folder",
        plain_folder,
        hookadapt.CheckpointError,
        ("plain", "is a directory without", "PEFT LoRA folder"),
    ),
    load_case(
        "file-empty",
        lambda env: raw_file(env, b""),
        hookadapt.CheckpointError,
        ("raw.safetensors", "is truncated", "0 bytes"),
    ),
    load_case("file-truncated", truncated, hookadapt.CheckpointError, ("raw.safetensors", "is truncated", "5 bytes")),
    load_case(
        "header-past-end",
        header_past_end,
        hookadapt.CheckpointError,
        ("raw.safetensors", "truncated", "10,008 bytes"),
    ),
    load_case(
        "header-too-large",
        header_too_large,
        hookadapt.CheckpointError,
        ("raw.safetensors", "-byte limit", "corrupt"),
    ),
    load_case(
        "header-garbage",
        header_garbage,
        hookadapt.CheckpointError,
        ("raw.safetensors", "not a readable safetensors file"),
    ),
    load_case(
        "tensor-past-end",
        tensor_past_end,
        hookadapt.CheckpointError,
        ("raw.safetensors", "not a readable safetensors file"),
    ),
    load_case(
        "metadata-absent",
        lambda env: rewritten(env, drop=("format",)),
        hookadapt.CheckpointError,
        ("changed.safetensors", "has no hookadapt metadata", "save_adapters"),
    ),
    load_case(
        "format-version-future",
        lambda env: rewritten(env, format_version="2"),
        hookadapt.CheckpointError,
        ("format version '2'", "reads version 1", "hookadapt version that wrote it"),
    ),
    load_case(
        "metadata-sizes-missing",
        lambda env: rewritten(env, drop=("sizes",)),
        hookadapt.CheckpointError,
        ("changed.safetensors", "metadata field 'sizes' is missing"),
    ),
    load_case(
        "metadata-config-not-json",
        lambda env: rewritten(env, config="{lora:"),
        hookadapt.CheckpointError,
        ("changed.safetensors", "metadata field 'config' is not valid JSON"),
    ),
    load_case(
        "metadata-sizes-negative",
        lambda env: rewritten(env, sizes=json.dumps({"lora": {"head": [4, -2]}})),
        hookadapt.CheckpointError,
        ("metadata field 'sizes' must be", "positive ints"),
    ),
    load_case(
        "metadata-alias-dangling",
        lambda env: rewritten(env, aliases=json.dumps({"x": "adapters/gone"})),
        hookadapt.CheckpointError,
        ("metadata field 'aliases'", "each key stored in the file"),
    ),
    load_case(
        "stored-kind-unknown",
        lambda env: rewritten(env, config=json.dumps({"lora": {**LORA_HEAD, "network": {"kind": "dora"}}})),
        hookadapt.CheckpointError,
        ("the stored config is invalid", "adapter 'lora'", "unknown network kind 'dora'", "known kinds are"),
    ),
    load_case(
        "key-renamed",
        lambda env: rewritten(env, tensors=renamed_key),
        hookadapt.CheckpointError,
        ("does not fit the model", "missing keys (1)", "unexpected keys (1)", "lora_C", "strict=False"),
    ),
    load_case(
        "key-shape-wrong",
        lambda env: rewritten(env, tensors=reshaped_key),
        hookadapt.CheckpointError,
        ("mismatched", LORA_KEY, "file (3, 4)", "model (2, 4)"),
    ),
    load_case(
        "key-dtype-int",
        lambda env: rewritten(env, tensors=int_key),
        hookadapt.CheckpointError,
        ("mismatched", LORA_KEY, "torch.int32"),
    ),
    load_case(
        "names-not-in-file",
        lambda env: env.saved,
        hookadapt.CheckpointError,
        ("saved.safetensors", "no adapter matching 'zzz'", "it contains lora, bottleneck"),
        names=["zzz"],
    ),
    Case(
        "model-different-head",
        lambda env: hookadapt.load_adapters(env.model, env.saved),
        hookadapt.CheckpointError,
        ("saved from a different model", "site 'head'", "[3, 4]", "strict=False"),
        setup=lambda env: setattr(env, "model", Toy(head_features=3)),
    ),
    load_case(
        "attached-sizes-differ",
        lambda env: env.saved,
        hookadapt.CheckpointError,
        ("does not match the adapters already attached", "adapter 'lora' at 'head'", "Detach them first"),
        setup=attach_then({"lora": {**LORA_HEAD, "insertion": "output"}, "bottleneck": LINEAR_BODY}),
    ),
    load_case(
        "attached-partly",
        lambda env: env.saved,
        hookadapt.CheckpointError,
        ("only partly attached", "not attached: 'bottleneck'", "detach them first"),
        setup=attach_then({"lora": LORA_HEAD}),
    ),
    load_case(
        "peft-folder-without-weights",
        peft_folder_without_weights,
        hookadapt.CheckpointError,
        ("adapter_model.safetensors", "not found", "safe_serialization=True"),
    ),
]

CASES = CONFIG_CASES + TARGET_CASES + SHAPE_CASES + DTYPE_AND_DEVICE_CASES + SELECTION_CASES + SET_CASES + SAVE_CASES + FILE_CASES


def folder_contents(folder: Path) -> dict[str, bytes | None]:
    """Map every path under ``folder`` to its bytes, or None for a directory."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in sorted(folder.rglob("*"))}


def assert_unchanged(model: nn.Module, before: Any, sets_before: list[hookadapt.AdapterSet]) -> None:
    """Assert that ``model`` matches the snapshot ``before`` and has the same attached sets."""
    after = snapshot(model)
    assert after.module_paths == before.module_paths, "the module paths changed"
    assert after.module_ids == before.module_ids, "a module object was replaced"
    assert after.children == before.children, "a module's children changed"
    assert after.attributes == before.attributes, "a module's attribute names changed"
    assert after.training == before.training, "a module's train/eval flag changed"
    assert list(after.state) == list(before.state), "the state_dict keys changed"
    for key, value in before.state.items():
        assert after.state[key].dtype == value.dtype, f"dtype of {key} changed"
        if value.device.type != "meta":
            assert torch.equal(after.state[key], value), f"values of {key} changed"
    assert after.parameter_ids == before.parameter_ids, "a parameter object was replaced"
    assert after.requires_grad == before.requires_grad, "a requires_grad flag changed"
    for path, hooks in before.hooks.items():
        assert after.hooks[path] == hooks, f"hook dicts of module {path!r} changed"
    assert [id(item) for item in hookadapt.attached(model)] == [id(item) for item in sets_before], "the attached sets changed"


def test_case_count() -> None:
    """The table covers at least 40 invalid calls, each with a unique id."""
    ids = [case.id for case in CASES]
    assert len(ids) >= 40
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_invalid_call(case: Case, tmp_path: Path) -> None:
    """The call raises the row's error with its fragments and leaves model and files unchanged."""
    env = Env(tmp_path)
    if case.setup is not None:
        case.setup(env)
    before = snapshot(env.model)
    sets_before = hookadapt.attached(env.model)
    files_before = folder_contents(tmp_path)

    with pytest.raises(case.error) as caught:
        case.call(env)

    message = str(caught.value)
    for fragment in case.fragments:
        assert fragment in message, f"message lacks {fragment!r}: {message}"
    assert_unchanged(env.model, before, sets_before)
    assert folder_contents(tmp_path) == files_before, "the folder's files changed"
    hookadapt.detach_all(env.model)
