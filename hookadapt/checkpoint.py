"""Saving adapter weights as one self-describing safetensors file, and loading them.

A file holds the tensors of the adapters and train modules only, keyed as
``adapters/NAME/SITE/TENSOR`` and ``modules/PATH/TENSOR``. Its safetensors
metadata contains the config, the network sizes per site, the train module
paths, a format version and the hookadapt version, so `load_adapters` needs
nothing but the model and the file. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from .adapter_set import AdapterSet, attached, state_key
from .config import config_to_dict, parse_config
from .errors import CheckpointError, ConfigError

__all__ = ["FORMAT", "FORMAT_VERSION", "save_adapters", "load_adapters", "read_checkpoint"]

FORMAT = "hookadapt"
FORMAT_VERSION = 1


def save_adapters(adapter_set: AdapterSet, path: str | os.PathLike, names: Iterable[str] | None = None) -> Path:
    """Write the weights of ``names`` (all adapters by default) and the train modules to ``path``.

    The file is written under a temporary name in the same folder and then
    renamed, so an interrupted save leaves the previous file, if any, intact.

    Returns:
        The path written.
    """
    from . import __version__

    path = Path(path)
    if path.is_dir():
        msg = f"cannot save adapters to {str(path)!r}: it is a directory; give a file path such as {str(path / 'adapters.safetensors')!r}"
        raise CheckpointError(msg)
    if not path.parent.is_dir():
        msg = f"cannot save adapters to {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first"
        raise CheckpointError(msg)

    chosen = adapter_set._select(names) if names is not None else adapter_set.names
    # Clone so no two entries share storage, which safetensors rejects.
    tensors = {key: value.detach().to("cpu").clone().contiguous() for key, value in adapter_set.state_dict(chosen).items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "hookadapt_version": __version__,
        "config": json.dumps(config_to_dict({name: adapter_set.specs[name] for name in chosen})),
        "sizes": json.dumps(adapter_set.sizes(chosen)),
        "train_modules": json.dumps(list(adapter_set.train_modules)),
    }

    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        safetensors.torch.save_file(tensors, temporary, metadata=metadata)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(err, (safetensors.SafetensorError, KeyError, TypeError, ValueError)):
            msg = f"cannot save adapters to {str(path)!r}: safetensors rejected the tensors ({type(err).__name__}: {err})"
            raise CheckpointError(msg) from err
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str], dict[str, torch.Tensor]]:
    """Read and check a hookadapt file; return its parsed metadata, raw metadata and tensors."""
    path = Path(path)
    if not path.exists():
        msg = f"adapter checkpoint {str(path)!r} not found; check the path"
        raise CheckpointError(msg)
    if not path.is_file():
        msg = f"adapter checkpoint {str(path)!r} is not a file; give the .safetensors file itself"
        raise CheckpointError(msg)
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            raw = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        msg = f"adapter checkpoint {str(path)!r} is not a readable safetensors file: {err}"
        raise CheckpointError(msg) from err

    if raw.get("format") != FORMAT:
        msg = (
            f"adapter checkpoint {str(path)!r} has no hookadapt metadata (format={raw.get('format')!r}); "
            f"it was not written by hookadapt.save_adapters"
        )
        raise CheckpointError(msg)
    if raw.get("format_version") != str(FORMAT_VERSION):
        msg = (
            f"adapter checkpoint {str(path)!r} has format version {raw.get('format_version')!r}, but this "
            f"hookadapt reads version {FORMAT_VERSION}; load it with the hookadapt version that wrote it "
            f"({raw.get('hookadapt_version', 'unknown')})"
        )
        raise CheckpointError(msg)

    parsed = {}
    for field in ("config", "sizes", "train_modules"):
        try:
            parsed[field] = json.loads(raw[field])
        except KeyError:
            msg = f"adapter checkpoint {str(path)!r}: metadata field {field!r} is missing; the file is incomplete"
            raise CheckpointError(msg) from None
        except json.JSONDecodeError as err:
            msg = f"adapter checkpoint {str(path)!r}: metadata field {field!r} is not valid JSON: {err}"
            raise CheckpointError(msg) from err
    _check_layout(path, parsed)
    try:
        parsed["specs"] = parse_config(parsed["config"])
    except ConfigError as err:
        msg = f"adapter checkpoint {str(path)!r}: the stored config is invalid: {err}"
        raise CheckpointError(msg) from err
    return parsed, raw, tensors


def _check_layout(path: Path, parsed: dict[str, Any]) -> None:
    sizes = parsed["sizes"]
    valid = isinstance(sizes, dict) and all(
        isinstance(sites, dict)
        and all(
            isinstance(pair, list) and len(pair) == 2 and all(type(size) is int and size > 0 for size in pair)
            for pair in sites.values()
        )
        for sites in sizes.values()
    )
    if not valid:
        msg = (
            f"adapter checkpoint {str(path)!r}: metadata field 'sizes' must map adapter names to "
            f"{{site: [in_features, out_features]}} with positive ints, got {json.dumps(sizes)[:200]}"
        )
        raise CheckpointError(msg)
    train_modules = parsed["train_modules"]
    if not isinstance(train_modules, list) or not all(isinstance(item, str) for item in train_modules):
        msg = (
            f"adapter checkpoint {str(path)!r}: metadata field 'train_modules' must be a list of "
            f"module paths, got {json.dumps(train_modules)[:200]}"
        )
        raise CheckpointError(msg)


def _compare(
    path: Path,
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
) -> tuple[list[str], list[str], list[str]]:
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [
        f"{key}: file {tuple(found[key].shape)} {found[key].dtype}, model "
        f"{tuple(expected[key].shape)} {expected[key].dtype}"
        for key in expected
        if key in found and (found[key].shape != expected[key].shape or found[key].dtype != expected[key].dtype)
    ]
    return missing, unexpected, mismatched


def _mismatch_error(path: Path, missing: list[str], unexpected: list[str], mismatched: list[str]) -> CheckpointError:
    lines = [f"adapter checkpoint {str(path)!r} does not fit the model:"]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched", mismatched)):
        if keys:
            lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
    lines.append("Nothing was loaded. Load with strict=False to load the keys that match.")
    return CheckpointError("\n".join(lines))


def load_adapters(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    freeze_base: bool = False,
) -> AdapterSet:
    """Rebuild the adapters stored in ``path``, load their weights and attach them to ``model``.

    If ``model`` already has the file's adapters attached, the weights are
    loaded into that adapter set instead, after checking that names, sites
    and shapes agree. Every key, shape and dtype is checked before any value
    is copied, and nothing is copied when a check fails.

    Args:
        strict: Raise when the file and the model differ in keys, shapes or
            dtypes. With False, the keys that match are loaded and the rest
            are skipped.
        freeze_base: As in `hookadapt.attach`; ignored when loading into an
            adapter set that is already attached.

    Returns:
        The attached `AdapterSet`; ``adapter_set.load_result`` lists the
        missing, unexpected and mismatched keys.
    """
    path = Path(path)
    parsed, _, tensors = read_checkpoint(path)
    specs = parsed["specs"]

    live = {name: other for other in attached(model) for name in other.specs}
    if any(name in live for name in specs):
        adapter_set = _existing_set(path, specs, live)
        fresh = False
    else:
        try:
            adapter_set = AdapterSet(
                model, specs, freeze_base=freeze_base, train_modules=parsed["train_modules"], sizes=parsed["sizes"]
            )
        except (ConfigError, ValueError) as err:
            msg = f"adapter checkpoint {str(path)!r} does not fit the model: {err}"
            raise CheckpointError(msg) from err
        fresh = True

    live_tensors = _live_tensors(adapter_set, specs)
    missing, unexpected, mismatched = _compare(path, live_tensors, tensors)
    if strict and (missing or unexpected or mismatched):
        raise _mismatch_error(path, missing, unexpected, mismatched)
    loadable = {
        key: value
        for key, value in tensors.items()
        if key in live_tensors and value.shape == live_tensors[key].shape and value.dtype == live_tensors[key].dtype
    }
    if not loadable and tensors:
        raise _mismatch_error(path, missing, unexpected, mismatched)

    train_values: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for key, value in loadable.items():
            if key.startswith("modules/") and fresh:
                module_path, _, tensor_name = key[len("modules/"):].rpartition("/")
                train_values.setdefault(module_path, {})[tensor_name] = value
            else:
                live_tensors[key].copy_(value)
    if fresh:
        adapter_set._attach(train_values=train_values)
    adapter_set.load_result = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    return adapter_set


def _existing_set(path: Path, specs: Mapping[str, Any], live: Mapping[str, AdapterSet]) -> AdapterSet:
    holders = {id(live[name]): live[name] for name in specs if name in live}
    absent = [name for name in specs if name not in live]
    if len(holders) > 1 or absent:
        msg = (
            f"adapter checkpoint {str(path)!r}: adapters {', '.join(map(repr, specs))} are only partly attached "
            f"to this model (not attached: {', '.join(map(repr, absent)) or 'none'}, attached in "
            f"{len(holders)} adapter set(s)); detach them first or load into a fresh model"
        )
        raise CheckpointError(msg)
    adapter_set = next(iter(holders.values()))
    return adapter_set


def _live_tensors(adapter_set: AdapterSet, specs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map checkpoint keys of ``specs``'s adapters and the train modules to the live tensors."""
    result = {}
    names = [name for name in adapter_set.names if name in specs]
    for adapter in adapter_set.all_adapters(names):
        for key, value in adapter.state_dict(keep_vars=True).items():
            result[state_key("adapters", adapter.name, adapter.path, key)] = value
    for path, module in adapter_set.train_modules.items():
        for key, value in module.state_dict(keep_vars=True).items():
            result[state_key("modules", "", path, key)] = value
    return result
