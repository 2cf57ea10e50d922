"""Composing adapters after attach: per-sample routing, merging into weights, weighted combination."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
from torch import nn

from .errors import AttachError, ConfigError, SelectionError
from .sites import Adapter

if TYPE_CHECKING:
    from .adapter_set import AdapterSet

__all__ = ["Route", "check_members", "merge_adapters", "restore_merged", "combine_adapters"]


class Route:
    """Per-sample adapter choices for one batch: ``route[i]`` is a name, a list of names or None."""

    def __init__(self, assignments: Sequence[Any], names: Sequence[str]) -> None:
        entries = []
        for index, entry in enumerate(assignments):
            chosen = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            unknown = [name for name in chosen if name not in names]
            if unknown:
                msg = (
                    f"route entry {index} names unknown adapter(s) {', '.join(map(repr, unknown))}; "
                    f"the adapters are {', '.join(names)}, and None selects the base model"
                )
                raise ConfigError(msg)
            entries.append(chosen)
        self.size = len(entries)
        self._positions = {name: [i for i, chosen in enumerate(entries) if name in chosen] for name in names}
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def indices(self, name: str, tensor: torch.Tensor, *, site: str) -> torch.Tensor:
        """Return the batch positions routed to adapter ``name``, on ``tensor``'s device."""
        if tensor.dim() < 2:
            msg = (
                f"adapters at {site!r}: route() needs a batch dimension, but the tensor there has shape "
                f"{tuple(tensor.shape)}; call the model on a batch, with the samples in dimension 0"
            )
            raise SelectionError(msg)
        if tensor.shape[0] != self.size:
            found = tensor.shape[0] if tensor.dim() else "no batch dimension"
            msg = (
                f"adapters at {site!r}: the route has {self.size} entries but the tensor there has "
                f"{found} samples in dimension 0; give one route entry per sample"
            )
            raise SelectionError(msg)
        key = (name, tensor.device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self._positions.get(name, []), dtype=torch.long, device=tensor.device)
        return self._cache[key]


def check_members(adapter_set: AdapterSet) -> None:
    """Raise `ConfigError` unless each meta adapter's members are usable at each of its sites."""
    owners: dict[str, str] = {}
    for adapter in adapter_set.all_adapters():
        members = adapter.strategy.members
        if not members:
            continue
        side = adapter.insertion == "input"
        for name in members:
            where = f"adapter {adapter.name!r} ({adapter.spec.strategy.kind})"
            if name not in adapter_set.specs or name == adapter.name:
                msg = f"{where}: member {name!r} is not another adapter of this set; the set has {', '.join(adapter_set.names)}"
                raise ConfigError(msg)
            if owners.setdefault(name, adapter.name) != adapter.name:
                msg = f"{where}: member {name!r} already belongs to adapter {owners[name]!r}; an adapter can be a member of one meta adapter"
                raise ConfigError(msg)
            member = adapter_set.adapters[name].get(adapter.path)
            if member is None:
                msg = f"{where} at {adapter.path!r}: member {name!r} is not attached there; target the same modules with both"
                raise ConfigError(msg)
            if member.strategy.members or (member.insertion == "input") != side:
                msg = (
                    f"{where} at {adapter.path!r}: member {name!r} must be a plain adapter on the same side "
                    f"of the host (input versus output or parallel), found {member.insertion!r}"
                )
                raise ConfigError(msg)


# Merging.


def _merge_kind(adapter: Adapter, host: nn.Module) -> str | None:
    options = adapter.spec.strategy.options
    if not isinstance(host, nn.Linear) or adapter.feature_dim != -1:
        return None
    kind = (adapter.spec.network.kind, adapter.insertion, adapter.spec.strategy.kind)
    if kind == ("lora", "parallel", "residual_add") and not options.get("stochastic_depth") and not options.get("l2_lambda"):
        return "lora"
    if kind in (("scale", "output", "multiply"), ("scale", "input", "multiply")):
        return f"scale_{adapter.insertion}"
    return None


@torch.no_grad()
def _fold(adapter: Adapter, host: nn.Linear, kind: str) -> None:
    # Sum in float64 and round once to the host's dtype.
    weight = host.weight.double()
    bias = host.bias.double() if host.bias is not None else None
    if kind == "lora":
        network = adapter.network
        weight = weight + network.scaling * (network.lora_B.weight.double() @ network.lora_A.weight.double())
    elif kind == "scale_output":
        scale = adapter.network.weight.double()
        weight = weight * scale[:, None]
        bias = bias * scale if bias is not None else None
    else:
        weight = weight * adapter.network.weight.double()[None, :]
    host.weight.copy_(weight.to(host.weight.dtype))
    if bias is not None:
        host.bias.copy_(bias.to(host.bias.dtype))


def merge_adapters(adapter_set: AdapterSet, adapters: list[Adapter]) -> None:
    """Fold ``adapters`` into their Linear hosts' weights and stop running their hooks."""
    plans = []
    for adapter in adapters:
        if adapter.merged:
            continue
        host = adapter_set.model.get_submodule(adapter.path)
        kind = _merge_kind(adapter, host)
        if kind is None or not adapter.enabled or adapter.strategy.members:
            options = adapter.spec.strategy.options
            extras = ", ".join(
                f"{key}={options[key]}" for key in ("stochastic_depth", "l2_lambda") if options.get(key, 0)
            )
            state = [] if adapter.enabled else ["disabled"]
            if adapter.strategy.members:
                state.append("a meta adapter")
            found = (
                f"{adapter.spec.network.kind!r} with {adapter.insertion!r} insertion and "
                f"{adapter.spec.strategy.kind!r}{f' ({extras})' if extras else ''} on {type(host).__name__}"
                f"{''.join(f', {item}' for item in state)}"
            )
            msg = (
                f"adapter {adapter.name!r} at {adapter.path!r} cannot be merged: merging folds an enabled 'lora' "
                f"(parallel, residual_add, no stochastic depth or l2 term) or 'scale' (input or output, multiply) "
                f"adapter into an nn.Linear host, found {found}; change or remove what differs, or keep the "
                f"adapter unmerged"
            )
            raise AttachError(msg)
        plans.append((adapter, host, kind))

    _check_merge_order(adapter_set, [adapter for adapter, _, _ in plans])
    for adapter, host, kind in plans:
        if host not in adapter_set._merge_backups:
            adapter_set._merge_backups[host] = {key: value.detach().clone() for key, value in host.named_parameters(recurse=False)}
        _fold(adapter, host, kind)
        adapter.merged = True


def _check_merge_order(adapter_set: AdapterSet, merging: list[Adapter]) -> None:
    # Folding is exact only next to the host: merged output-side adapters must run before
    # every unmerged one, and merged input adapters after every unmerged one.
    chosen = set(merging)
    for site in adapter_set.sites:
        for steps, reverse in ((site.output_steps, False), (site.input_steps, True)):
            order = list(reversed(steps)) if reverse else list(steps)
            seen_unmerged = None
            for adapter in order:
                merged = adapter.merged or adapter in chosen
                if not merged and adapter.enabled:
                    seen_unmerged = adapter
                elif merged and seen_unmerged is not None:
                    msg = (
                        f"adapter {adapter.name!r} at {site.path!r} cannot be merged while adapter "
                        f"{seen_unmerged.name!r} sits between it and the host; merge or disable "
                        f"{seen_unmerged.name!r} too"
                    )
                    raise AttachError(msg)


@torch.no_grad()
def restore_merged(adapter_set: AdapterSet, adapters: list[Adapter]) -> None:
    """Unmerge ``adapters``: restore their hosts' saved weights bitwise, then fold what stays merged."""
    hosts = {adapter_set.model.get_submodule(adapter.path) for adapter in adapters if adapter.merged}
    for adapter in adapters:
        adapter.merged = False
    for host in hosts:
        for key, value in adapter_set._merge_backups.pop(host).items():
            getattr(host, key).copy_(value)
    remaining = [
        adapter
        for adapter in adapter_set.all_adapters()
        if adapter.merged and adapter_set.model.get_submodule(adapter.path) in hosts
    ]
    for adapter in remaining:
        adapter.merged = False
    merge_adapters(adapter_set, remaining)


# Weighted combination.


def combine_adapters(adapter_set: AdapterSet, weights: Mapping[str, float], into: str, combination: str) -> dict[str, Any]:
    """Return the spec and per-site state of a new adapter that combines ``weights``'s adapters."""
    names = list(weights)
    if not names:
        msg = "combine needs at least one adapter name with a weight"
        raise ConfigError(msg)
    first = adapter_set.specs[names[0]]
    sites = list(adapter_set.adapters[names[0]])
    for name in names:
        spec = adapter_set.specs[name]
        same = (spec.network.kind, spec.insertion, spec.strategy, spec.feature_dim, spec.dtype) == (
            first.network.kind, first.insertion, first.strategy, first.feature_dim, first.dtype
        )
        if not same or list(adapter_set.adapters[name]) != sites:
            msg = (
                f"cannot combine {', '.join(map(repr, names))}: adapter {name!r} differs from {names[0]!r} in "
                f"network kind, insertion, strategy, dtype or sites; combine adapters of one kind at the same sites"
            )
            raise ConfigError(msg)

    if combination == "cat":
        if first.network.kind != "lora":
            msg = f"combination='cat' concatenates LoRA ranks and needs 'lora' adapters, found {first.network.kind!r}"
            raise ConfigError(msg)
        return _concatenate_lora(adapter_set, weights, sites, first)
    if combination != "linear":
        msg = f"unknown combination {combination!r}; use 'linear' or 'cat'"
        raise ConfigError(msg)

    states = {}
    for path in sites:
        shapes = {name: {key: tuple(value.shape) for key, value in adapter_set.adapters[name][path].state_dict().items()} for name in names}
        if any(shape != shapes[names[0]] for shape in shapes.values()):
            msg = f"cannot combine {', '.join(map(repr, names))} at {path!r}: their tensors differ in shape; use adapters of the same sizes"
            raise ConfigError(msg)
        states[path] = {
            key: sum(weights[name] * adapter_set.adapters[name][path].state_dict()[key].detach() for name in names)
            for key in shapes[names[0]]
        }
    # Specs are frozen, so the new adapter can share the first one's.
    return {"spec": first, "states": states}


def _concatenate_lora(adapter_set: AdapterSet, weights: Mapping[str, float], sites: list[str], first: Any) -> dict[str, Any]:
    # The concatenation computes sum(w_i * scaling_i * B_i A_i) exactly, with scaling 1.
    states = {}
    ranks = {}
    for path in sites:
        networks = {name: adapter_set.adapters[name][path].network for name in weights}
        lora_a = torch.cat([weights[name] * net.scaling * net.lora_A.weight.detach() for name, net in networks.items()])
        lora_b = torch.cat([net.lora_B.weight.detach() for net in networks.values()], dim=1)
        ranks[path] = lora_a.shape[0]
        states[path] = {"network.lora_A.weight": lora_a, "network.lora_B.weight": lora_b}
    # alpha == rank gives scaling 1; sites whose summed rank differs get exact-path overrides.
    rank = ranks[sites[0]]
    overrides = {f"re:{re.escape(path)}": {"rank": size, "alpha": size} for path, size in ranks.items() if size != rank}
    options = {**first.network.options, "rank": rank, "alpha": rank, "use_rslora": False}
    spec = attrs.evolve(first, network=attrs.evolve(first.network, options=options), overrides=overrides)
    return {"spec": spec, "states": states}
