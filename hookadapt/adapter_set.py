"""Attaching, enabling, freezing and detaching a set of adapters on a model."""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import AdapterSpec, parse_config
from .errors import AttachError, ConfigError, HookadaptError, ShapeError
from .composition import Route, check_members, combine_adapters, merge_adapters, restore_merged
from .sites import Adapter, Site
from .sizes import network_sizes, probe_sizes
from .targets import RESERVED, candidate_modules, resolve_targets
from .tree import (
    callable_hosts,
    check_not_distributed,
    device_of,
    hold,
    holder_key,
    parent_path,
    base_state,
    network_options_at,
    state_key,
    unwrap_model,
)

__all__ = ["AdapterSet", "attach", "adapters", "attached", "detach_all", "state_key", "unwrap_model"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_serial = itertools.count()
# Live adapter sets per model, in attach order, referred to weakly. The model's hooks keep
# each set alive through its sites, so a set whose variable was dropped is still listed,
# and a dropped model is collected with its sets as one garbage cycle.
_LIVE: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[AdapterSet]]] = weakref.WeakKeyDictionary()


def _adapter_names(adapter_sets: Iterable[AdapterSet]) -> str:
    """Return the adapter names of ``adapter_sets``, quoted and comma-separated, for messages."""
    return ", ".join(repr(name) for adapter_set in adapter_sets for name in adapter_set.specs)


def attached(model: nn.Module) -> list[AdapterSet]:
    """Return the adapter sets attached to ``model``, oldest first."""
    sets = [ref() for ref in _LIVE.get(unwrap_model(model), [])]
    return [adapter_set for adapter_set in sets if adapter_set is not None and adapter_set.is_attached]


class AdapterSet:
    """The live adapters of one `attach` call, their hooks and what detaching must restore.

    Use `attach` or `adapters` to create one. An adapter set is also a
    context manager that detaches on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Mapping[str, Any],
        *,
        freeze_base: bool = False,
        example_inputs: Any = None,
        train_modules: Sequence[str] = (),
        sizes: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
        replace: bool = False,
    ) -> None:
        # Everything here builds new objects only; the model changes in `_attach`.
        if not isinstance(model, nn.Module):
            msg = f"model must be a torch.nn.Module, got {type(model).__name__}"
            raise TypeError(msg)
        check_not_distributed(model)
        model = unwrap_model(model)
        self._model_ref = weakref.ref(model)
        self.specs: dict[str, AdapterSpec] = parse_config(config)
        self.freeze_base = bool(freeze_base)
        self.serial = next(_serial)
        self.is_attached = False

        live_names = {name: other for other in attached(model) for name in other.specs}
        clashes = [name for name in self.specs if name in live_names]
        if clashes and not replace:
            msg = (
                f"adapter(s) {', '.join(map(repr, clashes))} are already attached to this "
                f"{type(model).__name__}; pass replace=True to detach the adapter set that holds them "
                f"first, detach it yourself (hookadapt.attached(model) finds it), or choose other names"
            )
            raise AttachError(msg)
        # Sets to detach before this one attaches; nothing is detached until everything is built.
        self._replaces = list({id(live_names[name]): live_names[name] for name in clashes}.values())

        modules = candidate_modules(model)
        self.train_modules = self._resolve_train_modules(train_modules, modules)
        targets = {
            name: resolve_targets(model, name, spec.target, spec.exclude, modules)
            for name, spec in self.specs.items()
        }
        for name, paths in list(targets.items()):
            targets[name] = callable_hosts(name, self.specs[name], paths, modules)

        probed: dict[tuple[str, str], tuple[int | None, int | None]] = {}
        if example_inputs is not None:
            requests = [
                (name, path, modules[path], self.specs[name])
                for name, paths in targets.items()
                for path in paths
                if not (sizes and path in sizes.get(name, {}))
            ]
            try:
                probed = probe_sizes(model, example_inputs, requests)
            except HookadaptError:
                raise
            except Exception as err:
                msg = (
                    f"the probe forward on example_inputs failed with {type(err).__name__}: {err}; "
                    f"pass inputs that the model accepts as model(*args) for a tuple, model(**kwargs) "
                    f"for a dict, or model(x) otherwise"
                )
                raise AttachError(msg) from err

        # adapters[name][path] is the adapter called `name` at the host `path`.
        self.adapters: dict[str, dict[str, Adapter]] = {name: {} for name in self.specs}
        self.sites: list[Site] = []
        for path, host in modules.items():
            site_adapters = []
            for name, spec in self.specs.items():
                if path not in targets[name]:
                    continue
                if sizes and path in sizes.get(name, {}):
                    in_size, out_size = sizes[name][path]
                else:
                    in_size, out_size = network_sizes(name, path, host, spec, probed.get((name, path)))
                options = network_options_at(name, spec, path)
                adapter = Adapter(
                    name, path, spec, host, in_size, out_size, options=options, network=self._shared_network(name, path, in_size, out_size)
                )
                adapter.to(device=device_of(host, model))
                self.adapters[name][path] = adapter
                site_adapters.append(adapter)
            if site_adapters:
                self.sites.append(Site(path, host, site_adapters, owner=self))

        self._auxiliary_losses: list[torch.Tensor] = []
        for adapter in self.all_adapters():
            adapter.strategy._auxiliary_losses = self._auxiliary_losses
        check_members(self)
        self._owners = {adapter: self._owner_of(adapter.path, modules) for adapter in self.all_adapters()}

        # Sets detach newest first, so the sets to replace must be the newest ones on the model.
        if self._replaces:
            oldest = min(other.serial for other in self._replaces)
            blocking = [other for other in attached(model) if other.serial > oldest and other not in self._replaces]
            if blocking:
                names = _adapter_names(blocking)
                msg = (
                    f"cannot replace adapters {', '.join(map(repr, clashes))}: adapters {names}, attached later "
                    f"to the same model, would have to detach first, because adapter sets detach in reverse "
                    f"order of attaching; detach them first, or replace them too by naming them in the config"
                )
                raise AttachError(msg)

        # The original parameters of hosts that merged adapters changed, for a bitwise unmerge.
        self._merge_backups: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self._route_state = threading.local()
        # Number of `route` blocks open on any thread; the hooks skip route look-ups while it is 0.
        self.open_routes = 0
        self._route_lock = threading.Lock()
        # Set after the first training forward showed that no DistributedDataParallel runs the
        # model without these adapters' parameters.
        self.ddp_checked = False
        # Tokens of checkpointed forwards that backward has yet to recompute (hookadapt.recompute).
        self.pending_recompute: weakref.WeakSet[Any] = weakref.WeakSet()
        self.attached_shapes: dict[str, tuple[int, ...]] = {}
        self._flags: dict[nn.Parameter, bool] = {}
        # Set by load_adapters: the keys that a load skipped (hookadapt.checkpoint.LoadResult).
        self.load_result: Any = None
        self._snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy(model) and pickle reach the set through the hooks; the copy then
        # refers to the copied model and is listed as attached to it.
        state = dict(self.__dict__)
        del state["_route_state"], state["_route_lock"], state["pending_recompute"]
        state["open_routes"] = 0
        state["_model_ref"] = self.model
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        model = state.pop("_model_ref")
        self.__dict__.update(state)
        self._model_ref = weakref.ref(model)
        self._route_state = threading.local()
        self._route_lock = threading.Lock()
        self.pending_recompute = weakref.WeakSet()
        if self.is_attached:
            live = _LIVE.setdefault(model, [])
            live.append(weakref.ref(self))
            live.sort(key=lambda ref: ref().serial if ref() is not None else -1)

    @property
    def model(self) -> nn.Module:
        """The model the adapters attach to; the adapter set does not keep it alive."""
        model = self._model_ref()
        if model is None:
            msg = "the model of this adapter set no longer exists; its adapters went with it"
            raise AttachError(msg)
        return model

    # Building helpers.

    def _shared_network(self, name: str, path: str, in_size: int, out_size: int) -> nn.Module | None:
        """Return the network of the first site of a ``shared`` adapter, or None to build a new one."""
        if not self.specs[name].shared or not self.adapters[name]:
            return None
        first_path, first = next(iter(self.adapters[name].items()))
        if (first.in_features, first.out_features) != (in_size, out_size):
            msg = (
                f"adapter {name!r}: a shared network needs the same sizes at every site, but {first_path!r} "
                f"has (in_features, out_features) = ({first.in_features}, {first.out_features}) and {path!r} "
                f"has ({in_size}, {out_size}); narrow the target or set shared to False"
            )
            raise ShapeError(msg)
        return first.network

    def _resolve_train_modules(self, paths: Sequence[str], modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, (list, tuple)) or not all(isinstance(path, str) for path in paths):
            msg = f"train_modules must be a list of module paths (str), got {paths!r}"
            raise ConfigError(msg)
        found = {}
        for path in paths:
            if path not in modules:
                close = [candidate for candidate in modules if candidate and candidate.split(".")[-1] in path][:5]
                msg = (
                    f"train_modules entry {path!r} is not a module path of this {type(self.model).__name__}; "
                    f"give exact paths from model.named_modules(), for example {close or list(modules)[1:4]}"
                )
                raise ConfigError(msg)
            found[path] = modules[path]
        return found

    def _owner_of(self, path: str, modules: dict[str, nn.Module]) -> tuple[nn.Module, str] | None:
        # Containers change behaviour when they gain a child, so walk up to the first other module.
        current: str | None = path
        while current is not None:
            module = modules[current]
            if not isinstance(module, _CONTAINERS):
                relative = path[len(current):].lstrip(".")
                return module, relative
            current = parent_path(current)
        # Every ancestor is a container, so the first other module below the host keeps the
        # adapter. The key's "^" and host path mark a host above its owner.
        prefix = f"{path}." if path else ""
        for candidate, module in modules.items():
            if candidate.startswith(prefix) and candidate != path and not isinstance(module, _CONTAINERS):
                return module, f"^{path}"
        return None

    # Attaching and detaching.

    def _attach(self, *, train_values: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        """Register every hook and module, or undo what was done and re-raise."""
        for other in sorted(self._replaces, key=lambda adapter_set: -adapter_set.serial):
            other.detach()
        self._replaces = []
        try:
            for adapter, owner in self._owners.items():
                hold(adapter, owner)
            self._set_flags()
            self._snapshot_train_modules()
            if train_values:
                self._copy_train_values(train_values)
            for site in self.sites:
                site.register()
            _LIVE.setdefault(self.model, []).append(weakref.ref(self))
            self.is_attached = True
            # save_adapters compares against these to recognise sharded or flattened tensors.
            self.attached_shapes = {key: tuple(value.shape) for key, value in self.state_dict().items()}
        except BaseException:
            self._undo()
            raise

    def _set_flags(self) -> None:
        adapter_params = {id(param) for param in self.parameters(include_train_modules=False)}
        train_params = {
            id(param)
            for module in self.train_modules.values()
            for path, param in module.named_parameters()
            if RESERVED not in path.split(".")
        }
        for path, param in self.model.named_parameters():
            if RESERVED in path.split(".") or id(param) in adapter_params:
                continue
            if id(param) in train_params:
                self._flags.setdefault(param, param.requires_grad)
                param.requires_grad_(True)
            elif self.freeze_base:
                self._flags.setdefault(param, param.requires_grad)
                param.requires_grad_(False)

    def _snapshot_train_modules(self) -> None:
        for path, module in self.train_modules.items():
            self._snapshots[path] = {key: value.detach().clone() for key, value in base_state(module).items()}

    def _copy_train_values(self, values: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for path, tensors in values.items():
                state = base_state(self.train_modules[path], keep_vars=True)
                for key, value in tensors.items():
                    state[key].copy_(value)

    def _undo(self) -> None:
        restore_merged(self, [adapter for adapter in self.all_adapters() if adapter.merged])
        for site in self.sites:
            site.remove()
        for adapter, owner in self._owners.items():
            adapter.outside_tree = False
            if owner is None:
                continue
            module, relative = owner
            holder = module._modules.get(RESERVED)
            if holder is None:
                continue
            key = holder_key(adapter, relative)
            if key in holder._modules and holder._modules[key] is adapter:
                del holder._modules[key]
            if not holder._modules:
                del module._modules[RESERVED]
        with torch.no_grad():
            for path, snapshot in self._snapshots.items():
                state = base_state(self.train_modules[path], keep_vars=True)
                for key, value in snapshot.items():
                    state[key].copy_(value)
        self._snapshots.clear()
        for param, flag in self._flags.items():
            param.requires_grad_(flag)
        self._flags.clear()
        model = self._model_ref()
        live = _LIVE.get(model) if model is not None else None
        if live is not None:
            live[:] = [ref for ref in live if ref() is not None and ref() is not self]
            if not live:
                del _LIVE[model]

    def detach(self) -> None:
        """Remove the hooks and modules and restore the model exactly as it was.

        Raises:
            AttachError: when an adapter set attached later to the same model
                is still attached; detach that one first. Also when a forward
                under gradient checkpointing still waits for backward, which
                would recompute it without the adapters.
        """
        self._detach(check_recompute=True)

    def _detach(self, *, check_recompute: bool) -> None:
        if not self.is_attached:
            return
        if check_recompute and len(self.pending_recompute):
            msg = (
                f"cannot detach adapters {', '.join(map(repr, self.specs))}: {len(self.pending_recompute)} "
                f"forward(s) under torch.utils.checkpoint still wait for backward(), which would recompute "
                f"them without the adapters and give wrong gradients; call backward() before detaching "
                f"(inside the `with` block), or delete the outputs and the loss to drop those forwards "
                f"(recorded L2 terms keep them too: call adapter_set.auxiliary_loss() to release those)"
            )
            raise AttachError(msg)
        later = [other for other in attached(self.model) if other.serial > self.serial]
        if later:
            names = _adapter_names(later)
            msg = (
                f"cannot detach adapters {', '.join(map(repr, self.specs))} while adapters {names}, "
                f"attached later to the same model, are still attached; adapter sets detach in reverse "
                f"order of attaching, so detach the later set first"
            )
            raise AttachError(msg)
        self._undo()
        self.is_attached = False

    def __enter__(self) -> AdapterSet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # While an exception propagates, detach anyway rather than hide it behind another error.
        self._detach(check_recompute=exc_type is None)

    # Inspection and parameters.

    @property
    def names(self) -> list[str]:
        """The adapter names, in config order."""
        return list(self.specs)

    def all_adapters(self, names: Iterable[str] | None = None) -> Iterator[Adapter]:
        """Yield the adapters of ``names`` (every adapter by default), in config order."""
        for name in self.names if names is None else names:
            yield from self.adapters[name].values()

    def parameters(self, *, include_train_modules: bool = True) -> Iterator[nn.Parameter]:
        """Yield the adapters' parameters and, by default, those of the train modules, each once."""
        seen: set[int] = set()
        for _, param in self.named_parameters(include_train_modules=include_train_modules):
            if id(param) not in seen:
                seen.add(id(param))
                yield param

    def named_parameters(self, *, include_train_modules: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield ``(checkpoint key, parameter)`` pairs of the adapters and train modules."""
        for adapter in self.all_adapters():
            for key, param in adapter.named_parameters():
                yield state_key("adapters", adapter.name, adapter.path, key), param
        if include_train_modules:
            for path, module in self.train_modules.items():
                for key, param in module.named_parameters():
                    if RESERVED not in key.split("."):
                        yield state_key("modules", "", path, key), param

    def state_dict(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Return the tensors a checkpoint stores, by checkpoint key, detached from autograd."""
        result = {}
        for adapter in self.all_adapters(names):
            for key, value in adapter.state_dict().items():
                result[state_key("adapters", adapter.name, adapter.path, key)] = value.detach()
        for path, module in self.train_modules.items():
            for key, value in base_state(module).items():
                result[state_key("modules", "", path, key)] = value.detach()
        return result

    def sizes(self, names: Iterable[str] | None = None) -> dict[str, dict[str, list[int]]]:
        """Return the network sizes, ``{name: {site: [in_features, out_features]}}``."""
        return {
            name: {path: [adapter.in_features, adapter.out_features] for path, adapter in self.adapters[name].items()}
            for name in (self.names if names is None else names)
        }

    # Enabling and disabling.

    def _select(self, patterns: Iterable[str], *, empty_means_all: bool = True) -> list[str]:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        if not patterns:
            if not empty_means_all:
                msg = f"no adapter names given; name at least one of {', '.join(self.names)}, or pass None for all"
                raise ConfigError(msg)
            patterns = ["*"]
        selected: list[str] = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                msg = f"adapter names must be strings or globs, got {pattern!r}; pass names as separate arguments"
                raise ConfigError(msg)
            found = [name for name in self.names if fnmatch.fnmatchcase(name, pattern)]
            if not found:
                msg = f"no adapter in this set matches {pattern!r}; the adapters are {', '.join(self.names)}"
                raise ConfigError(msg)
            selected.extend(name for name in found if name not in selected)
        return selected

    def enable(self, *names: str) -> None:
        """Enable the named adapters (globs allowed); with no names, enable all."""
        for adapter in self.all_adapters(self._select(names)):
            adapter.enabled = True

    def disable(self, *names: str) -> None:
        """Disable the named adapters (globs allowed); with no names, disable all."""
        chosen = list(self.all_adapters(self._select(names)))
        self._check_not_merged(chosen, "disable")
        for adapter in chosen:
            adapter.enabled = False

    def _check_not_merged(self, adapters: Iterable[Adapter], action: str) -> None:
        merged = sorted({adapter.name for adapter in adapters if adapter.merged})
        if merged:
            msg = f"cannot {action} adapters {', '.join(map(repr, merged))}: they are merged into their hosts' weights; unmerge them first"
            raise AttachError(msg)

    def set_trainable(self, *names: str) -> None:
        """Make the named adapters' parameters trainable and every other adapter's frozen.

        Base parameters, train modules and enabled flags are left as they are,
        so ``set_trainable("fusion")`` trains a fusion over frozen members.
        """
        chosen = set(self._select(names))
        for adapter in self.all_adapters():
            for param in adapter.parameters():
                param.requires_grad_(adapter.name in chosen)

    def check_ddp(self) -> None:
        """Raise when a DistributedDataParallel forward runs adapters whose gradients it does not synchronise.

        That happens when the adapters were attached to ``ddp.module`` after
        wrapping; the check runs on the first training forward.
        """
        ddp = sys.modules.get("torch.nn.parallel.distributed")
        active = ddp.DistributedDataParallel._get_active_ddp_module() if ddp is not None else None
        synced = getattr(active, "_module_parameters", None)
        if synced is not None:
            known = {id(param) for param in synced}
            missing = [name for name, param in self.named_parameters() if param.requires_grad and id(param) not in known]
            if missing:
                msg = (
                    f"adapters {', '.join(map(repr, self.specs))} run inside a DistributedDataParallel that "
                    f"was built before they were attached, so it would not synchronise their gradients "
                    f"({len(missing)} parameters, first {missing[0]!r}) and each rank would train its own; "
                    f"attach the adapters to the bare model first, then wrap it"
                )
                raise AttachError(msg)
        self.ddp_checked = True

    def current_route(self) -> Route | None:
        """Return the per-sample route of the calling thread's active `route` block, or None."""
        if not self.open_routes:
            return None
        return getattr(self._route_state, "route", None)

    @contextlib.contextmanager
    def route(self, assignments: Sequence[Any]) -> Iterator[AdapterSet]:
        """Run each sample of the next forwards through its own adapters, in one batch.

        ``assignments[i]`` names the adapter for sample ``i`` (dimension 0 of
        every adapted tensor): a name, a list of names, or None for the base
        model. Adapters named by no entry skip the batch. The route applies to
        the calling thread until the block ends.
        """
        previous = self.current_route()
        self._route_state.route = Route(list(assignments), self.names)
        with self._route_lock:
            self.open_routes += 1
        try:
            yield self
        finally:
            with self._route_lock:
                self.open_routes -= 1
            self._route_state.route = previous

    def merge(self, *names: str) -> None:
        """Fold the named adapters (all by default) into their hosts' weights and skip their hooks.

        ``lora`` with ``parallel`` insertion and ``scale`` with ``multiply``
        fold into an `torch.nn.Linear` host. The original weights are kept,
        so `unmerge` and `detach` restore them bitwise.
        """
        merge_adapters(self, list(self.all_adapters(self._select(names))))

    def unmerge(self, *names: str) -> None:
        """Restore the hosts of the named merged adapters (all by default) and run their hooks again."""
        restore_merged(self, [adapter for adapter in self.all_adapters(self._select(names)) if adapter.merged])

    def merge_and_detach(self) -> nn.Module:
        """Merge every adapter, then detach, keeping the merged weights; return the plain model.

        Raises:
            AttachError: when an adapter cannot be merged; nothing changes then.
        """
        self.merge()
        later = [other for other in attached(self.model) if other.serial > self.serial]
        if later:
            self.unmerge()
            msg = "cannot merge and detach while an adapter set attached later is still attached; detach that one first"
            raise AttachError(msg)
        # Dropping the backups keeps the merged weights through detach.
        self._merge_backups.clear()
        for adapter in self.all_adapters():
            adapter.merged = False
        self.detach()
        return self.model

    def combine(self, weights: Mapping[str, float], into: str, *, combination: str = "linear") -> None:
        """Add adapter ``into`` that combines adapters of one kind at the same sites.

        ``combination="linear"`` sums the adapters' tensors with the given
        weights; ``"cat"`` (``lora`` only) concatenates the ranks so that the
        new update is exactly ``sum(w_i * scaling_i * B_i A_i)``.
        """
        from .config import parse_spec

        unknown = [name for name in weights if name not in self.specs]
        if unknown:
            msg = f"cannot combine unknown adapter(s) {', '.join(map(repr, unknown))}; the adapters are {', '.join(self.names)}"
            raise ConfigError(msg)
        taken = {name for other in attached(self.model) for name in other.specs} | set(self.specs)
        if into in taken:
            msg = f"cannot combine into {into!r}: an adapter of that name is already attached to this model; choose another name"
            raise AttachError(msg)
        combined = combine_adapters(self, weights, into, combination)
        spec = parse_spec(into, combined["spec"])
        self._add_adapter(into, spec, combined["states"])

    def _add_adapter(self, name: str, spec: AdapterSpec, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        modules = candidate_modules(self.model)
        added = {}
        for path, state in states.items():
            source = next(adapter for adapters in self.adapters.values() for adapter in adapters.values() if adapter.path == path)
            adapter = Adapter(name, path, spec, modules[path], source.in_features, source.out_features, options=network_options_at(name, spec, path))
            adapter.load_state_dict(dict(state), strict=False)
            adapter.to(device=next(itertools.chain(source.parameters(), source.buffers())).device)
            adapter.strategy._auxiliary_losses = self._auxiliary_losses
            added[path] = adapter
        self.specs[name] = spec
        self.adapters[name] = added
        for adapter in added.values():
            self._owners[adapter] = self._owner_of(adapter.path, modules)
            if self.is_attached:
                hold(adapter, self._owners[adapter])
        for index, site in enumerate(self.sites):
            if site.path in added:
                site.remove()
                self.sites[index] = Site(site.path, site.host, [*site.adapters, added[site.path]], owner=self)
                if self.is_attached:
                    self.sites[index].register()

    @contextlib.contextmanager
    def disabled(self, *names: str) -> Iterator[AdapterSet]:
        """Disable the named adapters (all by default) inside the block, then restore each flag."""
        chosen = list(self.all_adapters(self._select(names)))
        self._check_not_merged(chosen, "disable")
        before = [adapter.enabled for adapter in chosen]
        try:
            for adapter in chosen:
                adapter.enabled = False
            yield self
        finally:
            for adapter, flag in zip(chosen, before):
                adapter.enabled = flag

    def auxiliary_loss(self) -> torch.Tensor:
        """Return the sum of the auxiliary loss terms recorded since the last call, and clear them."""
        terms = list(self._auxiliary_losses)
        self._auxiliary_losses.clear()
        if terms:
            return torch.stack([term.float() for term in terms]).sum()
        device = next((param.device for param in self.parameters(include_train_modules=False)), None)
        return torch.zeros((), device=device)

    def __repr__(self) -> str:
        from .display import adapter_set_repr

        return adapter_set_repr(self)

    def _repr_html_(self) -> str:
        from .display import adapter_set_html

        return adapter_set_html(self)

    def summary(self) -> dict[str, Any]:
        """Return parameter totals: adapters, trainable, train modules, the base model and the adapters' share of it."""
        from .display import adapter_summary

        return adapter_summary(self)


def attach(
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    freeze_base: bool = False,
    example_inputs: Any = None,
    train_modules: Sequence[str] = (),
    replace: bool = False,
) -> AdapterSet:
    """Attach the adapters of ``config`` to ``model`` through forward hooks.

    Args:
        model: Any `torch.nn.Module`; its classes are not changed.
        config: Adapter names mapped to `AdapterSpec` objects or dicts.
        freeze_base: Turn off ``requires_grad`` on every base parameter
            until detach, which restores each flag.
        example_inputs: Inputs for one probe forward that measures feature
            sizes: a tuple of positional arguments, a dict of keyword
            arguments, or a single argument.
        train_modules: Paths of base modules, such as a classifier head, to
            train and save with the adapters; detach restores their values.
        replace: Detach the adapter sets that already hold any of these
            adapter names first, as re-running a notebook cell needs. They
            are detached only after the new set is built and checked.

    Returns:
        The attached `AdapterSet`.

    Raises:
        HookadaptError: before the model is changed, for an invalid config,
            a target that matches nothing or an unknown feature size.
    """
    adapter_set = AdapterSet(
        model,
        config,
        freeze_base=freeze_base,
        example_inputs=example_inputs,
        train_modules=train_modules,
        replace=replace,
    )
    adapter_set._attach()
    return adapter_set


def adapters(
    model: nn.Module,
    config: Mapping[str, Any],
    *,
    freeze_base: bool = False,
    example_inputs: Any = None,
    train_modules: Sequence[str] = (),
    replace: bool = False,
) -> AdapterSet:
    """Attach like `attach`; use the result in a ``with`` block that detaches on exit."""
    return attach(
        model,
        config,
        freeze_base=freeze_base,
        example_inputs=example_inputs,
        train_modules=train_modules,
        replace=replace,
    )


def detach_all(model: nn.Module) -> int:
    """Detach every adapter set from ``model``, newest first, and remove any hookadapt hook or module left.

    Returns:
        The number of adapter sets detached.
    """
    model = unwrap_model(model)
    sets = attached(model)
    for adapter_set in reversed(sets):
        adapter_set.detach()
    # Hooks and holders whose set is no longer listed, for example after an interrupted attach.
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [key for key, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), Site)]:
                del hooks[key]
                for extra in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
                    extra.pop(key, None)
        module._modules.pop(RESERVED, None)
    return len(sets)
