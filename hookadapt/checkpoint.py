"""Saving adapter weights as one self-describing safetensors file, and loading them.

A file contains the tensors of the adapters and train modules only, keyed as
``adapters/NAME/SITE/TENSOR`` and ``modules/PATH/TENSOR``. Its safetensors
metadata describes the rest: the config, the network sizes per site, the
train module paths, a fingerprint of the base model, the aliases of tensors
that share storage, a format version and the hookadapt version. So
`load_adapters` needs nothing but the model and the file. Nothing is
pickled, and config kinds resolve through the registries only, so a file
cannot run code.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import safetensors
import safetensors.torch
import torch
from torch import nn

from .adapter_set import AdapterSet, attached, base_state, network_options_at, state_key, unwrap_model
from .config import DTYPES, AdapterSpec, config_to_dict, parse_config
from .errors import CheckpointError, ConfigError
from .files import check_safetensors_header, write_atomically
from .peft_format import peft_paths, read_peft, write_peft
from .registry import NETWORKS
from .targets import RESERVED, candidate_modules

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadResult",
    "StoredAdapters",
    "save_adapters",
    "load_adapters",
    "read_checkpoint",
    "model_fingerprint",
]

FORMAT = "hookadapt"
FORMAT_VERSION = 1
_METADATA_FIELDS = ("config", "sizes", "train_modules", "base_model", "aliases")


class LoadResult(NamedTuple):
    """Keys that a load skipped: in the model but not the file, the reverse, and shape or dtype clashes."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


@attrs.frozen
class StoredAdapters:
    """The contents of an adapter checkpoint, in hookadapt's layout, whichever format it was."""

    path: Path
    format: str
    specs: dict[str, AdapterSpec]
    sizes: dict[str, dict[str, list[int]]]
    train_modules: list[str]
    tensors: dict[str, torch.Tensor]
    fingerprint: dict[str, Any] | None
    metadata: dict[str, str]


# Saving.


def model_fingerprint(model: nn.Module, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Return ``{path: {"class": name, "tensors": {name: shape}}}`` of the base modules at ``paths``."""
    modules = candidate_modules(unwrap_model(model))
    return fingerprint_modules({path: modules[path] for path in paths})


def fingerprint_modules(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Return the fingerprint of base modules given by path, as `model_fingerprint` does."""
    result = {}
    for path, module in modules.items():
        tensors = {
            name: list(tensor.shape)
            for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())
            if RESERVED not in name.split(".")
        }
        result[path] = {"class": _class_name(module), "tensors": tensors}
    return result


def _class_name(module: nn.Module) -> str:
    # fully_shard swaps a module's class for a generated FSDPModule subclass, such as FSDPLinear.
    # The fingerprint names the model's own class, so sharded and plain runs agree.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    generated = getattr(fsdp, "FSDPModule", None)
    for cls in type(module).__mro__:
        if generated is None or not issubclass(cls, generated):
            return cls.__qualname__
    return type(module).__qualname__


def _check_unsharded(adapter_set: AdapterSet, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise when a tensor's shape differs from its shape at attach time, as FSDP's flat shards do."""
    for key, value in state.items():
        expected = adapter_set.attached_shapes.get(key)
        if expected is not None and tuple(value.shape) != expected:
            msg = (
                f"cannot save adapters to {str(path)!r}: tensor {key!r} has shape {tuple(value.shape)} but had "
                f"{expected} when attached, so the parameters look sharded or flattened (FullyShardedDataParallel "
                f"keeps flat shards outside forward); call save_adapters on every rank inside "
                f"`with FullyShardedDataParallel.summon_full_params(model):`"
            )
            raise CheckpointError(msg)


def _gather_sharded(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Return ``state`` with every DTensor gathered into a full tensor, and whether any was gathered.

    Gathering is a collective, so every rank of the DTensors' mesh must call it.
    """
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(dtensor_module, "DTensor", None)
    if dtensor is None or not any(isinstance(value, dtensor) for value in state.values()):
        return state, False
    gathered = {key: value.full_tensor() if isinstance(value, dtensor) else value for key, value in state.items()}
    return gathered, True


def _current_spec(adapter_set: AdapterSet, name: str) -> AdapterSpec:
    """Return the spec of ``name`` with the dtype its networks have now, which `model.to()` may have changed."""
    spec = adapter_set.specs[name]
    names_by_dtype = {dtype: key for key, dtype in DTYPES.items()}
    dtypes = {names_by_dtype.get(adapter.dtype) for adapter in adapter_set.adapters[name].values()}
    if len(dtypes) == 1 and None not in dtypes:
        return attrs.evolve(spec, dtype=dtypes.pop())
    return spec


def _deduplicate(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the tensors to write, each storage view once, and ``{alias: key}`` for the repeats.

    A network used at two sites or a tied weight appears under several keys
    with the same storage; safetensors stores each such tensor once.
    """
    saved: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in state.items():
        identity = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        # A copy breaks partial overlaps between views, which safetensors rejects.
        saved[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return saved, aliases


def save_adapters(
    adapter_set: AdapterSet,
    path: str | os.PathLike,
    names: Iterable[str] | None = None,
    *,
    format: str = FORMAT,
) -> Path:
    """Write the weights of ``names`` (all adapters by default) and the train modules to ``path``.

    Every file is written under a temporary name in the same folder and
    then renamed, so an interrupted save leaves the previous file intact.

    Args:
        names: Adapter names or globs to save.
        format: ``"hookadapt"`` writes one safetensors file. ``"peft"``
            writes a folder with ``adapter_config.json`` and
            ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
            loads; it takes one ``lora`` adapter with ``parallel`` insertion on
            Linear hosts.

    Returns:
        The path written.
    """
    from . import __version__

    path = Path(path)
    chosen = adapter_set._select(names, empty_means_all=False) if names is not None else adapter_set.names
    if format == "peft":
        if len(chosen) != 1:
            msg = f"PEFT's format holds one adapter, but {len(chosen)} were chosen ({', '.join(chosen)}); pass names=['NAME']"
            raise CheckpointError(msg)
        if path.exists() and not path.is_dir():
            msg = f"cannot save PEFT adapters to {str(path)!r}: it is a file, and PEFT's format is a folder"
            raise CheckpointError(msg)
        return write_peft(adapter_set, path, chosen[0])
    if format != FORMAT:
        msg = f"unknown checkpoint format {format!r}; use {FORMAT!r} or 'peft'"
        raise CheckpointError(msg)

    if path.is_dir():
        msg = f"cannot save adapters to {str(path)!r}: it is a directory; give a file path such as {str(path / 'adapters.safetensors')!r}"
        raise CheckpointError(msg)
    if not path.parent.is_dir():
        msg = f"cannot save adapters to {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first"
        raise CheckpointError(msg)

    state = adapter_set.state_dict(chosen)
    _check_unsharded(adapter_set, state, path)
    state, collective = _gather_sharded(state)
    if collective and torch.distributed.get_rank() != 0:
        # Every rank took part in the gather; rank 0 alone writes the file.
        return path
    tensors, aliases = _deduplicate(state)
    hosts = {site.path: site.host for site in adapter_set.sites}
    sites = [site for name in chosen for site in adapter_set.adapters[name]]
    # The modules the set holds, not a fresh path look-up: wrappers such as FSDP's may
    # have inserted modules into the paths since the adapters attached.
    base_modules = {path: hosts[path] for path in sites} | dict(adapter_set.train_modules)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "hookadapt_version": __version__,
        "config": json.dumps(config_to_dict({name: _current_spec(adapter_set, name) for name in chosen})),
        "sizes": json.dumps(adapter_set.sizes(chosen)),
        "train_modules": json.dumps(list(adapter_set.train_modules)),
        "base_model": json.dumps(fingerprint_modules(base_modules)),
        "aliases": json.dumps(aliases),
    }

    def write(temporary: str) -> None:
        try:
            safetensors.torch.save_file(tensors, temporary, metadata=metadata)
        except (safetensors.SafetensorError, KeyError, TypeError, ValueError) as err:
            msg = f"cannot save adapters to {str(path)!r}: safetensors rejected the tensors ({type(err).__name__}: {err})"
            raise CheckpointError(msg) from err

    write_atomically(path, write)
    return path


# Reading.


def read_checkpoint(path: str | os.PathLike) -> StoredAdapters:
    """Read and check a hookadapt file or a PEFT LoRA folder, without touching any model.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        msg = f"adapter checkpoint {str(path)!r} not found; check the path"
        raise CheckpointError(msg)
    peft = peft_paths(path)
    if peft is not None and path.is_file() and path.suffix == ".safetensors" and _metadata(path).get("format") == FORMAT:
        # A hookadapt file that happens to sit in a PEFT folder.
        peft = None
    if peft is not None:
        contents = read_peft(*peft)
        specs = _parse_specs(path, contents["config"])
        return StoredAdapters(path, "peft", specs, contents["sizes"], contents["train_modules"], contents["tensors"], None, {})
    if not path.is_file():
        msg = (
            f"adapter checkpoint {str(path)!r} is a directory without {'adapter_config.json'}; give a "
            f"hookadapt .safetensors file or a PEFT LoRA folder"
        )
        raise CheckpointError(msg)

    check_safetensors_header(path)
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
            f"it was not written by hookadapt.save_adapters. For a PEFT adapter, put adapter_config.json beside it"
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
    for field in _METADATA_FIELDS:
        try:
            parsed[field] = json.loads(raw[field])
        except KeyError:
            msg = f"adapter checkpoint {str(path)!r}: metadata field {field!r} is missing; the file is incomplete"
            raise CheckpointError(msg) from None
        except (json.JSONDecodeError, RecursionError) as err:
            msg = f"adapter checkpoint {str(path)!r}: metadata field {field!r} is not valid JSON: {err}"
            raise CheckpointError(msg) from err
    _check_layout(path, parsed, tensors)
    for alias, key in parsed["aliases"].items():
        tensors[alias] = tensors[key]
    specs = _parse_specs(path, parsed["config"])
    return StoredAdapters(
        path, FORMAT, specs, parsed["sizes"], parsed["train_modules"], tensors, parsed["base_model"], raw
    )


def _metadata(path: Path) -> dict[str, str]:
    check_safetensors_header(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            return file.metadata() or {}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        msg = f"adapter checkpoint {str(path)!r} is not a readable safetensors file: {err}"
        raise CheckpointError(msg) from err


def _parse_specs(path: Path, config: Any) -> dict[str, AdapterSpec]:
    try:
        return parse_config(config)
    except ConfigError as err:
        msg = f"adapter checkpoint {str(path)!r}: the stored config is invalid: {err}"
        raise CheckpointError(msg) from err


def _invalid_field(path: Path, field: str, expected: str, value: Any) -> CheckpointError:
    msg = f"adapter checkpoint {str(path)!r}: metadata field {field!r} must be {expected}, got {json.dumps(value)[:200]}"
    return CheckpointError(msg)


def _check_layout(path: Path, parsed: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
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
        raise _invalid_field(path, "sizes", "{name: {site: [in_features, out_features]}} with positive ints", sizes)
    train_modules = parsed["train_modules"]
    if not isinstance(train_modules, list) or not all(isinstance(item, str) for item in train_modules):
        raise _invalid_field(path, "train_modules", "a list of module paths", train_modules)
    fingerprint = parsed["base_model"]
    valid = isinstance(fingerprint, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("class"), str) and isinstance(entry.get("tensors"), dict)
        for entry in fingerprint.values()
    )
    if not valid:
        raise _invalid_field(path, "base_model", '{path: {"class": name, "tensors": {name: shape}}}', fingerprint)
    aliases = parsed["aliases"]
    valid = isinstance(aliases, dict) and all(
        isinstance(alias, str) and isinstance(key, str) and alias not in tensors and key in tensors
        for alias, key in aliases.items()
    )
    if not valid:
        raise _invalid_field(path, "aliases", "{alias: key} with each key stored in the file and no alias stored", aliases)


# Loading.


def _fingerprint_difference(model: nn.Module, fingerprint: Mapping[str, Any]) -> str | None:
    """Describe the first site where ``model`` differs from the saved fingerprint, or return None."""
    modules = candidate_modules(model)
    for path, saved in fingerprint.items():
        shown = path or "<root>"
        if path not in modules:
            return f"site {shown!r} ({saved['class']}) does not exist in the model"
        current = model_fingerprint(model, [path])[path]
        if current["class"] != saved["class"]:
            return f"site {shown!r} is a {current['class']} in the model but was a {saved['class']}"
        for name in dict.fromkeys([*saved["tensors"], *current["tensors"]]):
            before = saved["tensors"].get(name)
            now = current["tensors"].get(name)
            if before != now:
                return f"site {shown!r} ({saved['class']}) tensor {name!r} has shape {now} in the model but had {before}"
    return None


def _compare(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
) -> LoadResult:
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = [
        f"{key}: file {tuple(found[key].shape)} {found[key].dtype}, model "
        f"{tuple(expected[key].shape)} {expected[key].dtype}"
        for key in expected
        if key in found and (found[key].shape != expected[key].shape or found[key].dtype != expected[key].dtype)
    ]
    return LoadResult(missing, unexpected, mismatched)


def _mismatch_error(path: Path, result: LoadResult, *, strict: bool) -> CheckpointError:
    lines = [f"adapter checkpoint {str(path)!r} does not fit the model:"]
    for label, keys in (("missing keys", result.missing), ("unexpected keys", result.unexpected), ("mismatched", result.mismatched)):
        if keys:
            lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
    if strict:
        lines.append("Nothing was loaded. Load with strict=False to load the keys that match.")
    else:
        lines.append("No key matches, so nothing was loaded; check that the file belongs to this model.")
    return CheckpointError("\n".join(lines))


def _dtype_name(path: Path, dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    msg = f"cannot load {str(path)!r} with dtype={dtype!r}; use one of {', '.join(DTYPES)}"
    raise CheckpointError(msg)


def load_adapters(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    freeze_base: bool = False,
    names: Iterable[str] | None = None,
    dtype: torch.dtype | str | None = None,
) -> AdapterSet:
    """Rebuild the adapters stored in ``path``, load their weights and attach them to ``model``.

    ``path`` is a file written by `save_adapters` or a PEFT LoRA folder
    (``adapter_config.json`` with ``adapter_model.safetensors``), or either
    file of that pair. If ``model`` already has the file's adapters attached,
    the weights go into that adapter set instead, after checking that names,
    sites and shapes agree. Every key, shape and dtype is checked before any
    value is copied, and nothing is copied when a check fails.

    Args:
        strict: Raise when the file and the model differ in keys, shapes,
            dtypes or base model. With False, the keys that match are loaded,
            the rest are listed in ``adapter_set.load_result``, and a base
            model difference is a warning. A load that matches no key raises.
        freeze_base: As in `hookadapt.attach`; ignored when loading into an
            adapter set that is already attached.
        names: Adapter names or globs to load; by default all in the file.
        dtype: Convert the adapters to this dtype; by default the saved
            dtype is kept.

    Returns:
        The attached `AdapterSet`, which is also a context manager.
    """
    stored = read_checkpoint(path)
    path = stored.path
    wrapped = model
    model = unwrap_model(model)
    if stored.format == "peft":
        modules = candidate_modules(model)
        for site in stored.sizes.get(next(iter(stored.specs)), {}):
            host = modules.get(site)
            if host is not None and not isinstance(host, nn.Linear):
                msg = (
                    f"PEFT checkpoint {str(path)!r}: module {site!r} is a {type(host).__name__}, but hookadapt "
                    f"applies PEFT's LoRA weights to nn.Linear modules only"
                )
                raise CheckpointError(msg)
    specs = _choose(stored, names)
    tensors = {key: value for key, value in stored.tensors.items() if _tensor_owner(key) in (*specs, None)}
    dtype_name = _dtype_name(path, dtype)
    if dtype_name is not None:
        specs = {name: attrs.evolve(spec, dtype=dtype_name) for name, spec in specs.items()}
        tensors = {
            key: value.to(DTYPES[dtype_name]) if key.startswith("adapters/") and value.is_floating_point() else value
            for key, value in tensors.items()
        }

    difference = _fingerprint_difference(model, stored.fingerprint) if stored.fingerprint else None
    if difference is not None:
        message = f"adapter checkpoint {str(path)!r} was saved from a different model: {difference}"
        if strict:
            raise CheckpointError(f"{message}. Load it into the model it was trained on, or pass strict=False.")
        warnings.warn(message, stacklevel=2)

    _check_stored_shapes(stored, specs, tensors)
    live = {name: other for other in attached(model) for name in other.specs}
    fresh = not any(name in live for name in specs)
    if fresh:
        try:
            adapter_set = AdapterSet(
                wrapped,
                specs,
                freeze_base=freeze_base,
                train_modules=stored.train_modules,
                sizes={name: stored.sizes.get(name, {}) for name in specs},
            )
        except (ConfigError, ValueError) as err:
            msg = f"adapter checkpoint {str(path)!r} does not fit the model: {err}"
            raise CheckpointError(msg) from err
    else:
        adapter_set = _existing_set(path, specs, stored.sizes, live)

    live_tensors = _live_tensors(adapter_set, specs)
    on_meta = [key for key, value in live_tensors.items() if value.is_meta]
    if on_meta:
        msg = (
            f"cannot load adapter checkpoint {str(path)!r}: the model is on the meta device, which holds no "
            f"values, so tensor {on_meta[0]!r} could not take the saved ones; materialize the model first, "
            f"for example with model.to_empty(device='cpu') and its base weights, then load"
        )
        raise CheckpointError(msg)
    result = _compare(live_tensors, tensors)
    if strict and (result.missing or result.unexpected or result.mismatched):
        raise _mismatch_error(path, result, strict=True)
    loadable = {
        key: value
        for key, value in tensors.items()
        if key in live_tensors and value.shape == live_tensors[key].shape and value.dtype == live_tensors[key].dtype
    }
    if not loadable and tensors:
        raise _mismatch_error(path, result, strict=False)

    train_values: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for key, value in loadable.items():
            if key.startswith("modules/") and fresh:
                # Train modules take their saved values after attach snapshots the originals.
                module_path, _, tensor_name = key[len("modules/"):].partition("/")
                train_values.setdefault(module_path, {})[tensor_name] = value
            else:
                live_tensors[key].copy_(value)
    if fresh:
        adapter_set._attach(train_values=train_values)
    adapter_set.load_result = result
    return adapter_set


def _check_stored_shapes(
    stored: StoredAdapters,
    specs: Mapping[str, AdapterSpec],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Reject a file whose metadata describes networks far larger than the tensors it stores.

    The networks are built on the meta device, which allocates no memory, so
    a file whose metadata requests huge networks fails here instead of
    exhausting memory.
    """
    needed = 0
    for name, spec in specs.items():
        for site, (in_size, out_size) in stored.sizes.get(name, {}).items():
            options = network_options_at(name, spec, site)
            try:
                with torch.device("meta"):
                    network = NETWORKS.get(spec.network.kind)(in_size, out_size, **options)
            except (RuntimeError, ValueError, OverflowError, TypeError) as err:
                msg = (
                    f"adapter checkpoint {str(stored.path)!r}: adapter {name!r} at {site or '<root>'!r} cannot be "
                    f"built with sizes ({in_size}, {out_size}) and options {options}: {err}"
                )
                raise CheckpointError(msg) from err
            needed += sum(value.numel() for value in network.state_dict().values())
    # A small difference is listed by the full comparison after the build; this guard only
    # stops networks far larger than the tensors the file stores.
    stored_networks = [value for key, value in tensors.items() if key.startswith("adapters/") and "/network." in key]
    stored_values = sum(value.numel() for value in stored_networks)
    if needed > 16 * stored_values + 2**24:
        msg = (
            f"adapter checkpoint {str(stored.path)!r} describes networks of {needed:,} values but stores "
            f"{stored_values:,}; its sizes or options are inconsistent with its tensors, so nothing was built"
        )
        raise CheckpointError(msg)


def _tensor_owner(key: str) -> str | None:
    """Return the adapter name in an ``adapters/`` key, or None for a train module key."""
    if key.startswith("adapters/"):
        return key.split("/", 2)[1]
    return None


def _choose(stored: StoredAdapters, names: Iterable[str] | None) -> dict[str, AdapterSpec]:
    if names is None:
        return dict(stored.specs)
    if isinstance(names, str):
        names = [names]
    chosen: dict[str, AdapterSpec] = {}
    for pattern in names:
        found = [name for name in stored.specs if fnmatch.fnmatchcase(name, pattern)]
        if not found:
            msg = (
                f"adapter checkpoint {str(stored.path)!r} has no adapter matching {pattern!r}; "
                f"it contains {', '.join(stored.specs)}"
            )
            raise CheckpointError(msg)
        chosen.update((name, stored.specs[name]) for name in found)
    return {name: spec for name, spec in stored.specs.items() if name in chosen}


def _existing_set(
    path: Path,
    specs: Mapping[str, AdapterSpec],
    sizes: Mapping[str, Mapping[str, list[int]]],
    live: Mapping[str, AdapterSet],
) -> AdapterSet:
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
    differences = []
    for name in specs:
        saved = {site: list(pair) for site, pair in sizes.get(name, {}).items()}
        current = adapter_set.sizes([name])[name]
        for site in dict.fromkeys([*saved, *current]):
            if saved.get(site) != current.get(site):
                differences.append(
                    f"adapter {name!r} at {site or '<root>'!r}: file (in, out) = {saved.get(site, 'absent')}, "
                    f"attached = {current.get(site, 'absent')}"
                )
    if differences:
        msg = (
            f"adapter checkpoint {str(path)!r} does not match the adapters already attached: "
            f"{'; '.join(differences[:10])}. Detach them first to attach the file's adapters instead"
        )
        raise CheckpointError(msg)
    return adapter_set


def _live_tensors(adapter_set: AdapterSet, specs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map checkpoint keys of ``specs``'s adapters and the train modules to the live tensors."""
    result = {}
    names = [name for name in adapter_set.names if name in specs]
    for adapter in adapter_set.all_adapters(names):
        for key, value in adapter.state_dict(keep_vars=True).items():
            result[state_key("adapters", adapter.name, adapter.path, key)] = value
    for path, module in adapter_set.train_modules.items():
        for key, value in base_state(module, keep_vars=True).items():
            result[state_key("modules", "", path, key)] = value
    return result
