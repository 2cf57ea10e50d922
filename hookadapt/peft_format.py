"""Reading and writing PEFT's LoRA checkpoints without importing peft.

PEFT stores a LoRA adapter as a folder with ``adapter_config.json`` and
``adapter_model.safetensors``. Tensor keys look like
``base_model.model.PATH.lora_A.weight``; ``modules_to_save`` are stored as
``base_model.model.PATH.TENSOR``. hookadapt maps such a folder to one ``lora``
adapter named ``default`` with ``parallel`` insertion and ``residual_add``,
which computes what PEFT's LoRA layer computes, and maps ``modules_to_save``
to train modules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .adapter_set import base_state
from .errors import CheckpointError
from .files import check_safetensors_header, write_files_atomically

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "PEFT_NAME", "peft_paths", "read_peft", "write_peft"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_NAME = "default"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<path>.*)\.lora_(?P<part>[AB])\.weight")
# PEFT features whose files hookadapt's lora network cannot reproduce, with the value that it can.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def peft_paths(path: Path) -> tuple[Path, Path] | None:
    """Return ``(config, weights)`` when ``path`` names a PEFT folder or one of its two files."""
    if path.is_dir():
        folder = path
    elif path.name in (PEFT_CONFIG, PEFT_WEIGHTS) or (path.suffix == ".safetensors" and (path.parent / PEFT_CONFIG).is_file()):
        folder = path.parent
    else:
        return None
    config = folder / PEFT_CONFIG
    if not config.is_file():
        return None
    weights = path if path.is_file() and path.suffix == ".safetensors" else folder / PEFT_WEIGHTS
    return config, weights


def _peft_pattern_value(patterns: Mapping[str, Any], site: str, default: Any) -> Any:
    # PEFT takes the first pattern key that matches the end of the module path, in dict order.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", site):
            return value
    return default


def read_peft(config_path: Path, weights_path: Path) -> dict[str, Any]:
    """Read a PEFT LoRA checkpoint and return it in hookadapt's terms.

    Returns:
        A dict with ``config`` (one ``lora`` spec as a dict), ``sizes``,
        ``train_modules`` and ``tensors`` keyed in hookadapt's layout.
    """
    where = f"PEFT checkpoint {str(config_path.parent)!r}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        msg = f"{where}: {PEFT_CONFIG} is not readable JSON: {err}"
        raise CheckpointError(msg) from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        msg = f"{where}: expected peft_type 'LORA' in {PEFT_CONFIG}, found {found!r}; hookadapt reads PEFT's LoRA adapters only"
        raise CheckpointError(msg)
    for field, supported in _UNSUPPORTED.items():
        if config.get(field, supported) not in (supported, None, [], {}):
            msg = (
                f"{where}: {field}={config[field]!r} is not supported; hookadapt reads plain LoRA and rsLoRA "
                f"on Linear layers ({field} must be {supported!r})"
            )
            raise CheckpointError(msg)
    if not weights_path.is_file():
        bin_path = weights_path.with_name("adapter_model.bin")
        hint = " (adapter_model.bin is a pickle, which hookadapt never loads)" if bin_path.exists() else ""
        msg = f"{where}: weights file {str(weights_path)!r} not found{hint}; save the adapter with safe_serialization=True"
        raise CheckpointError(msg)

    check_safetensors_header(weights_path)
    try:
        raw = safetensors.torch.load_file(str(weights_path))
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        msg = f"{where}: {str(weights_path)!r} is not a readable safetensors file: {err}"
        raise CheckpointError(msg) from err

    rank = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules_to_save = config.get("modules_to_save") or []
    _check_peft_fields(where, rank, alpha, rank_pattern, alpha_pattern, modules_to_save)

    lora: dict[str, dict[str, torch.Tensor]] = {}
    train: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        match = _LORA_KEY.fullmatch(name)
        if match:
            lora.setdefault(match["path"], {})[match["part"]] = tensor
            continue
        owner = _module_to_save(name, modules_to_save)
        if owner is None:
            msg = (
                f"{where}: tensor {key!r} is neither a LoRA weight nor part of modules_to_save "
                f"{modules_to_save!r}; hookadapt reads plain LoRA on Linear layers only"
            )
            raise CheckpointError(msg)
        train.setdefault(owner, {})[name[len(owner) + 1 :]] = tensor
    if not lora:
        msg = f"{where}: {str(weights_path)!r} contains no lora_A/lora_B weights"
        raise CheckpointError(msg)

    sizes: dict[str, list[int]] = {}
    overrides: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for site, parts in lora.items():
        if set(parts) != {"A", "B"} or parts["A"].dim() != 2 or parts["B"].dim() != 2:
            msg = f"{where}: module {site!r} needs 2-D lora_A and lora_B weights, found {sorted(parts)}"
            raise CheckpointError(msg)
        site_rank = _peft_pattern_value(rank_pattern, site, rank)
        site_alpha = _peft_pattern_value(alpha_pattern, site, alpha)
        if parts["A"].shape[0] != site_rank or parts["B"].shape[1] != site_rank:
            msg = (
                f"{where}: module {site!r} has rank {parts['A'].shape[0]} in its weights but {site_rank} "
                f"in {PEFT_CONFIG} (r and rank_pattern); the two files do not belong together"
            )
            raise CheckpointError(msg)
        sizes[site] = [int(parts["A"].shape[1]), int(parts["B"].shape[0])]
        if (site_rank, site_alpha) != (rank, alpha):
            overrides[re.escape(site)] = {"rank": site_rank, "alpha": site_alpha}
        # hookadapt's lora networks are float32 by default, as PEFT's LoRA layers are.
        tensors[f"adapters/{PEFT_NAME}/{site}/network.lora_A.weight"] = parts["A"].float()
        tensors[f"adapters/{PEFT_NAME}/{site}/network.lora_B.weight"] = parts["B"].float()
    for module_path, module_tensors in train.items():
        for tensor_name, tensor in module_tensors.items():
            tensors[f"modules/{module_path}/{tensor_name}"] = tensor

    spec = {
        "target": sorted(lora),
        "insertion": "parallel",
        "network": {
            "kind": "lora",
            "rank": rank,
            "alpha": alpha,
            "dropout": config.get("lora_dropout", 0.0),
            "use_rslora": bool(config.get("use_rslora", False)),
        },
        "strategy": "residual_add",
        # Overrides are exact paths, matched with the 're:' prefix.
        "overrides": {f"re:{pattern}": options for pattern, options in overrides.items()},
    }
    return {"config": {PEFT_NAME: spec}, "sizes": {PEFT_NAME: sizes}, "train_modules": sorted(train), "tensors": tensors}


def _check_peft_fields(where: str, rank: Any, alpha: Any, rank_pattern: Any, alpha_pattern: Any, modules_to_save: Any) -> None:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    problems = []
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        problems.append(f"r must be a positive int, found {rank!r}")
    if not number(alpha):
        problems.append(f"lora_alpha must be a number, found {alpha!r}")
    for field, patterns, check in (("rank_pattern", rank_pattern, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0), ("alpha_pattern", alpha_pattern, number)):
        if not isinstance(patterns, dict) or not all(isinstance(key, str) and check(value) for key, value in patterns.items()):
            problems.append(f"{field} must map module name patterns to numbers, found {patterns!r}")
            continue
        for key in patterns:
            try:
                re.compile(key)
            except re.error as err:
                problems.append(f"{field} key {key!r} is not a valid regex ({err})")
    if not isinstance(modules_to_save, list) or not all(isinstance(item, str) for item in modules_to_save):
        problems.append(f"modules_to_save must be a list of module names, found {modules_to_save!r}")
    if problems:
        msg = f"{where}: invalid {PEFT_CONFIG}: {'; '.join(problems)}"
        raise CheckpointError(msg)


def _module_to_save(name: str, modules_to_save: list[str]) -> str | None:
    # The longest dotted prefix of the tensor name that PEFT's rule matches to an entry.
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if any(prefix == entry or prefix.endswith(f".{entry}") for entry in modules_to_save):
            return prefix
    return None


def write_peft(adapter_set: Any, folder: Path, name: str) -> Path:
    """Write adapter ``name`` of ``adapter_set`` as a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads."""
    spec = adapter_set.specs[name]
    where = f"adapter {name!r}"
    if spec.network.kind != "lora" or spec.insertion != "parallel" or spec.strategy.kind != "residual_add":
        msg = (
            f"{where} is a {spec.network.kind!r} network with {spec.insertion!r} insertion and "
            f"{spec.strategy.kind!r}; PEFT's LoRA format needs 'lora', 'parallel' and 'residual_add'"
        )
        raise CheckpointError(msg)
    if spec.strategy.options.get("stochastic_depth") or spec.strategy.options.get("l2_lambda") or spec.feature_dim not in (-1,):
        msg = f"{where}: stochastic_depth, l2_lambda and feature_dim have no PEFT equivalent; set them to their defaults to save in PEFT format"
        raise CheckpointError(msg)

    adapters = adapter_set.adapters[name]
    for path, adapter in adapters.items():
        if not isinstance(adapter_set.model.get_submodule(path), nn.Linear):
            msg = f"{where} at {path!r}: PEFT's LoRA format covers Linear hosts, found {type(adapter_set.model.get_submodule(path)).__name__}"
            raise CheckpointError(msg)

    rank, alpha = spec.network.options["rank"], spec.network.options["alpha"]
    rank_pattern = {}
    alpha_pattern = {}
    tensors: dict[str, torch.Tensor] = {}
    for path, adapter in adapters.items():
        if adapter.options["rank"] != rank:
            rank_pattern[re.escape(path)] = adapter.options["rank"]
        if adapter.options["alpha"] != alpha:
            alpha_pattern[re.escape(path)] = adapter.options["alpha"]
        for part in ("A", "B"):
            weight = getattr(adapter.network, f"lora_{part}").weight
            tensors[f"{_PREFIX}{path}.lora_{part}.weight"] = weight.detach().to("cpu", copy=True).contiguous()
    for module_path, module in adapter_set.train_modules.items():
        for tensor_name, value in base_state(module).items():
            tensors[f"{_PREFIX}{module_path}.{tensor_name}"] = value.detach().to("cpu", copy=True).contiguous()

    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": spec.network.options["dropout"],
        "use_rslora": spec.network.options["use_rslora"],
        # Exact paths: PEFT matches a target_modules entry equal to the module's full name.
        "target_modules": list(adapters),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(adapter_set.train_modules) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2) + "\n"
    write_files_atomically(
        {
            folder / PEFT_WEIGHTS: lambda temporary: safetensors.torch.save_file(tensors, temporary, metadata={"format": "pt"}),
            folder / PEFT_CONFIG: lambda temporary: Path(temporary).write_text(text, encoding="utf-8"),
        }
    )
    return folder
