"""Placement of adapters in the model: wrappers, hosts, the reserved holder child and checkpoint keys."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from .config import AdapterSpec
from .errors import AttachError, TargetError
from .sites import Adapter
from .targets import RESERVED, compile_pattern

__all__ = [
    "AdapterHolder",
    "base_state",
    "callable_hosts",
    "device_of",
    "hold",
    "holder_key",
    "network_options_at",
    "parent_path",
    "state_key",
    "unwrap_model",
]


def state_key(kind: str, name: str, path: str, tensor: str) -> str:
    """Return the checkpoint key of one tensor: ``adapters/NAME/SITE/TENSOR`` or ``modules/PATH/TENSOR``."""
    if kind == "adapters":
        return f"adapters/{name}/{path}/{tensor}"
    return f"modules/{path}/{tensor}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside ``torch.compile``, ``DistributedDataParallel`` and ``DataParallel`` wrappers.

    Adapters attach to the wrapped module, so site paths and checkpoint keys
    are the same with and without a wrapper.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            # torch.compile's wrapper; matched by name to avoid importing torch._dynamo.
            model = model._orig_mod
        else:
            return model


def check_not_distributed(model: nn.Module) -> None:
    """Raise when ``model`` is already wrapped for distributed training, which would leave new adapters unsynchronised.

    `DistributedDataParallel` records its parameters when it is built and
    FSDP shards the parameters it finds then, so adapters attached later
    would train separately on every rank.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        wrapper = "DistributedDataParallel"
    else:
        wrapper = None
        fsdp = sys.modules.get("torch.distributed.fsdp")
        classes = tuple(
            cls for cls in (getattr(fsdp, "FSDPModule", None), getattr(fsdp, "FullyShardedDataParallel", None)) if cls
        )
        for path, module in model.named_modules():
            if classes and isinstance(module, classes):
                wrapper = f"FSDP (at {path or 'the root'!r})"
                break
    if wrapper is None:
        return
    msg = (
        f"cannot attach adapters to a model already wrapped in {wrapper}: the wrapper registered or "
        f"sharded the parameters it found when it was built, so it would not synchronise adapters "
        f"added now and each rank would train its own. Attach the adapters to the bare model first, "
        f"then wrap it"
    )
    raise AttachError(msg)


class AdapterHolder(nn.Module):
    """The reserved child that keeps a host's adapters in the module tree while attached.

    Unlike `torch.nn.ModuleDict`, it accepts any adapter name as a key, even
    one that is also a method name such as ``forward`` or ``keys``.
    """

    def __getitem__(self, key: str) -> nn.Module:
        return self._modules[key]

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def forward(self, *args: Any, **kwargs: Any) -> None:
        msg = "the hookadapt adapter holder is not callable; the host's hooks run its adapters"
        raise AttachError(msg)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        # torch.fx.symbolic_trace traces through the forward of the root and of every module
        # outside torch.nn without running their hooks, so the graph would silently lack
        # adapters at such hosts. The tracer walks every module's children before it starts,
        # which is the one place hookadapt can stop it.
        if _fx_symbolic_tracing():
            msg = (
                f"torch.fx.symbolic_trace cannot trace attached adapters ({', '.join(map(repr, self._modules))}): "
                f"fx does not run the hooks of the modules it traces through, so the graph would leave "
                f"adapters out. Merge LoRA and IA3 "
                f"adapters into the weights first (adapter_set.merge_and_detach()), or trace with "
                f"torch.compile or torch.jit.trace, which run the hooks"
            )
            raise AttachError(msg)
        return super().named_children()

    def __prepare_scriptable__(self) -> AdapterHolder:
        # torch.jit.script calls this on every submodule before compiling; the hooks that run the
        # adapters are Python methods that TorchScript cannot compile.
        msg = (
            f"torch.jit.script cannot compile attached adapters ({', '.join(map(repr, self._modules))}): "
            f"the hooks that run them are Python code. Use torch.jit.trace or torch.compile, which "
            f"run the hooks, or merge LoRA and IA3 adapters into the weights first "
            f"(adapter_set.merge_and_detach())"
        )
        raise AttachError(msg)


def _fx_symbolic_tracing() -> bool:
    # is_fx_symbolic_tracing (present in torch 2.13, absent from older releases) excludes
    # torch.export, which runs the hooks.
    check = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    if check is None:
        return torch.fx._symbolic_trace.is_fx_tracing()
    return check()


def holder_key(adapter: Adapter, relative: str) -> str:
    """Return the adapter's key in its owner's holder: its name, plus the host's path below the owner."""
    # Module names may not contain dots, so a path below the owner uses slashes.
    return adapter.name if not relative else f"{adapter.name}@{relative.replace('.', '/')}"


def network_options_at(name: str, spec: AdapterSpec, path: str) -> dict[str, Any]:
    """Return the network options of adapter ``name`` at site ``path``, with its first matching override."""
    options = {key: value for key, value in spec.network.options.items() if key not in ("in_features", "out_features")}
    for pattern, extra in spec.overrides.items():
        if compile_pattern(pattern, adapter=name, field="overrides").fullmatch(path):
            options.update(extra)
            break
    return options


# Containers whose forward is never called, so hooks on them would never run.
_NOT_CALLED = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def callable_hosts(name: str, spec: AdapterSpec, paths: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """Drop never-called containers that a pattern matched; raise for one named exactly or for TorchScript."""
    kept = []
    for path in paths:
        host = modules[path]
        shown = path or "<root>"
        if isinstance(host, torch.jit.ScriptModule):
            msg = (
                f"adapter {name!r}: target {shown!r} is a TorchScript module, which does not run Python hooks; "
                f"attach the adapters to the eager module before scripting it"
            )
            raise TargetError(msg)
        if not isinstance(host, _NOT_CALLED):
            kept.append(path)
        elif path in spec.target:
            msg = (
                f"adapter {name!r}: target {shown!r} is a {type(host).__name__}, which is never called, so its "
                f"hooks would never run; target its elements instead, for example {shown + '.*'!r}"
            )
            raise TargetError(msg)
    if not kept:
        msg = (
            f"adapter {name!r}: target {list(spec.target)!r} matches only containers that are never called "
            f"({', '.join(repr(path) for path in paths)}); target their elements instead"
        )
        raise TargetError(msg)
    return kept


def hold(adapter: Adapter, owner: tuple[nn.Module, str] | None) -> None:
    """Register ``adapter`` under the reserved child of its owner, or mark it outside the tree."""
    if owner is None:
        adapter.outside_tree = True
        return
    module, relative = owner
    if RESERVED not in module._modules:
        module.add_module(RESERVED, AdapterHolder())
    holder = module._modules[RESERVED]
    key = holder_key(adapter, relative)
    if key in holder._modules:
        msg = (
            f"adapter {adapter.name!r} at {adapter.path!r}: another adapter set already keeps an adapter "
            f"named {adapter.name!r} in {type(module).__name__}; adapter names must be unique across every "
            f"set attached to one model and its submodules, so choose another name"
        )
        raise AttachError(msg)
    holder._modules[key] = adapter


def base_state(module: nn.Module, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """Return ``module.state_dict()`` without the tensors of attached adapters."""
    return {key: value for key, value in module.state_dict(keep_vars=keep_vars).items() if RESERVED not in key.split(".")}


def parent_path(path: str) -> str | None:
    """Return the path of the module that contains ``path``, or None for the root."""
    if not path:
        return None
    return path.rpartition(".")[0]


def device_of(host: nn.Module, model: nn.Module) -> torch.device:
    """Return the device of the host's first tensor, else the model's, else the CPU."""
    for module in (host, model):
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            return tensor.device
    return torch.device("cpu")
