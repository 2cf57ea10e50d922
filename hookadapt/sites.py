"""The per-host dispatcher: adapters, their hooks, tensor selection and casts.

An `Adapter` is one network and one strategy at one host. A `Site` is the
adapters that one adapter set attaches to one host, with the forward
pre-hook and forward hook that run them.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import DTYPES, AdapterSpec
from .errors import AttachError, SelectionError, ShapeError
from .recompute import checkpoint_call
from .registry import NETWORKS, STRATEGIES
from .selection import InputSelector, OutputSelector
from .strategies import ResidualAdd

__all__ = ["Adapter", "Site"]


class Adapter(nn.Module):
    """One adapter at one host: a network, a strategy and how they meet the host's tensors."""

    def __init__(
        self,
        name: str,
        path: str,
        spec: AdapterSpec,
        host: nn.Module,
        in_features: int,
        out_features: int,
        *,
        options: Mapping[str, Any] | None = None,
        network: nn.Module | None = None,
    ) -> None:
        """Build the adapter; ``options`` are this site's network options, ``network`` a shared network."""
        super().__init__()
        self.name = name
        self.path = path
        self.spec = spec
        self.insertion = spec.insertion
        self.in_features = in_features
        self.out_features = out_features
        self.feature_dim = spec.feature_dim
        self.dtype = DTYPES[spec.dtype]
        # The site whose hooks run this adapter; it recomputes its plan when a flag changes.
        self._site: Site | None = None
        self._enabled = True
        self._merged = False
        # True when no module of the model can hold the adapter, so `model.to()` does not move it.
        self.outside_tree = False

        if options is None:
            options = {key: value for key, value in spec.network.options.items() if key not in ("in_features", "out_features")}
        self.options = dict(options)
        if network is None:
            network = NETWORKS.get(spec.network.kind)(in_features, out_features, **self.options)
        self.network = network
        self.network.to(dtype=self.dtype)
        # The strategy receives host tensors, whose features match the network's output.
        self.strategy = STRATEGIES.get(spec.strategy.kind)(out_features, **spec.strategy.options).to(dtype=self.dtype)
        # Residual LoRA-like pairs may add the network's output to the host's in one kernel.
        self.fusable = (
            callable(getattr(self.network, "forward_add", None))
            and type(self.strategy) is ResidualAdd
            and spec.feature_dim == -1
        )
        self._fused_parts = (self.network, self.strategy)
        self.input_selector = InputSelector(host, spec.input_select, site=path, adapter=name)
        self.output_selector = OutputSelector(spec.output_select, site=path, adapter=name)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, site={self.path!r}, insertion={self.insertion!r}"

    @property
    def enabled(self) -> bool:
        """Whether the adapter runs; its site's hooks skip it while False."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self._refresh_site()

    @property
    def merged(self) -> bool:
        """Whether AdapterSet.merge has folded the network into the host's weights, so the hooks skip it."""
        return self._merged

    @merged.setter
    def merged(self, value: bool) -> None:
        self._merged = bool(value)
        self._refresh_site()

    def _refresh_site(self) -> None:
        site = self.__dict__.get("_site")
        if site is not None:
            site.refresh()

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Return ``y + network(x)`` in one fused step, or None when this call must take the general path.

        The fused step applies only to a ``residual_add`` strategy that does
        nothing but add: in eval mode, or in training without stochastic
        depth or an L2 loss. Both tensors must already have the adapter's
        dtype and device, and the same shape up to the last dimension, as
        the input and output of `torch.nn.Linear` have.
        """
        # Plain references skip nn.Module.__getattr__, which costs more than the checks here.
        network, strategy = self._fused_parts
        if strategy.training and (strategy.stochastic_depth > 0 or strategy.l2_lambda > 0):
            return None
        dtype = self.dtype
        if x.dtype != dtype or y.dtype != dtype or self.outside_tree:
            return None
        if not x.dim() or x.shape[-1] != self.in_features or y.shape[-1] != self.out_features:
            return None
        return network.forward_add(x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the adapter to ``x`` as output or input insertion does."""
        return self.compose(x, self.run_network(x))

    def run_network(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network on a host tensor, in the adapter's dtype."""
        x = self._features_last(x)
        if x.shape[-1] != self.in_features:
            raise self._size_error("input", self.in_features, x)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.outside_tree:
            self._follow_device(x.device)
        return self.network(x)

    def compose(self, x: torch.Tensor, out: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        """Merge the network output ``out`` into the host tensor ``x`` with the strategy.

        For a meta strategy, ``out`` maps member names to their results, in
        the host's layout and dtype.
        """
        host_dtype = x.dtype
        x = self._features_last(x)
        if x.shape[-1] != self.out_features:
            raise self._size_error("output", self.out_features, x)
        # Merge in the wider dtype, so a float64 host loses no precision to a float32 adapter.
        merge_dtype = torch.promote_types(host_dtype, self.dtype)
        if x.dtype != merge_dtype:
            x = x.to(merge_dtype)
        if isinstance(out, dict):
            out = {name: self._features_last(result).to(merge_dtype) for name, result in out.items()}
        else:
            if out.dim() and out.shape[-1] != self.out_features:
                msg = (
                    f"adapter {self.name!r} at {self.path!r}: the {self.spec.network.kind!r} network returned "
                    f"{out.shape[-1]} features but the host tensor has {self.out_features} (network output shape "
                    f"{tuple(out.shape)}); the network must map in_features to out_features in the last dimension"
                )
                raise ShapeError(msg)
            if out.dtype != merge_dtype:
                out = out.to(merge_dtype)
        try:
            result = self.strategy(x, out)
        except RuntimeError as err:
            shapes = {name: tuple(value.shape) for name, value in out.items()} if isinstance(out, dict) else tuple(out.shape)
            msg = (
                f"adapter {self.name!r} at {self.path!r}: the {self.spec.strategy.kind!r} strategy failed on the "
                f"host tensor of shape {tuple(x.shape)} and the network output of shape {shapes} (features "
                f"last): {err}. Check that the network's output matches the host tensor, for example the "
                f"spatial size of a strided convolution with parallel insertion"
            )
            raise ShapeError(msg) from err
        if result.dtype != host_dtype:
            result = result.to(host_dtype)
        if self.feature_dim not in (-1, result.dim() - 1):
            result = result.movedim(-1, self.feature_dim)
        return result

    def _features_last(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            msg = (
                f"adapter {self.name!r} at {self.path!r}: expected a floating-point tensor, found {x.dtype} "
                f"of shape {tuple(x.shape)}; adapt a float activation instead, with input_select / "
                f"output_select, or another target"
            )
            raise SelectionError(msg)
        if x.dim() == 0:
            msg = (
                f"adapter {self.name!r} at {self.path!r}: expected a tensor with a feature dimension, found a "
                f"0-d tensor; adapt a module whose input or output has features"
            )
            raise ShapeError(msg)
        if self.feature_dim in (-1, x.dim() - 1):
            return x
        if not -x.dim() <= self.feature_dim < x.dim():
            msg = (
                f"adapter {self.name!r} at {self.path!r}: feature_dim={self.feature_dim} is out of range "
                f"for a tensor of shape {tuple(x.shape)}; set feature_dim to the dimension that holds the features"
            )
            raise ShapeError(msg)
        return x.movedim(self.feature_dim, -1)

    def _size_error(self, side: str, expected: int, x: torch.Tensor) -> ShapeError:
        msg = (
            f"adapter {self.name!r} at {self.path!r}: the network's {side} size is {expected}, "
            f"but the host's tensor has {x.shape[-1]} features (shape with features last: "
            f"{tuple(x.shape)}); set network.in_features / network.out_features in the spec, "
            f"pass example_inputs to attach, or set feature_dim if the features are not in the last dimension"
        )
        return ShapeError(msg)

    def _apply(self, fn: Any, recurse: bool = True) -> Adapter:
        # `model.to(dtype)` and `.half()` reach the adapters through the module tree;
        # cast inputs to whatever dtype the network has now.
        result = super()._apply(fn, recurse)
        for tensor in self.network.parameters():
            if tensor.is_floating_point():
                self.dtype = tensor.dtype
                break
        return result

    def _follow_device(self, device: torch.device) -> None:
        for tensor in self.parameters():
            if tensor.device != device:
                self.to(device)
            return


# Key of the per-call entry that records the Python frame that called the pre-hook.
_CALLER = "caller"

# Built-in layers whose forward reads its input and never changes it in place. At such
# a host a parallel network reads the same input tensor in the forward hook, after the
# host ran, so the site needs no pre-hook and no per-call state.
_INPUT_PRESERVING_FORWARDS = frozenset(
    cls.forward
    for cls in (
        nn.Linear,
        nn.Bilinear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.Embedding,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.RMSNorm,
    )
)


# Built-in layers whose output has the same shape as their input up to the last dimension,
# where a LoRA branch can be added row by row in one matrix product.
_ROW_WISE_FORWARDS = frozenset(cls.forward for cls in (nn.Linear, nn.LayerNorm, nn.RMSNorm))


def preserves_input(host: nn.Module) -> bool:
    """Return True when the host's forward is a built-in one known to leave its input unchanged."""
    return "forward" not in host.__dict__ and type(host).forward in _INPUT_PRESERVING_FORWARDS


def _forget_compiled_code() -> None:
    # torch.compile does not guard on module hooks by default
    # (torch._dynamo.config.skip_nnmodule_hook_guards), so a compiled model would keep
    # running a graph traced before hooks changed. Clearing the caches makes every
    # compiled model trace again on its next call.
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def _drop_interrupted(stack: list[dict[Any, Any]]) -> None:
    """Remove per-call entries whose calls are no longer running on this thread."""
    running = set()
    current = sys._getframe(2)
    while current is not None:
        running.add(id(current))
        current = current.f_back
    stack[:] = [frame for frame in stack if id(frame.get(_CALLER)) in running]


class _Hook:
    """One registered hook of a site, which the site takes out of its host while it has nothing to run.

    A parked hook leaves the host's hook dicts, so the host runs as if it had
    none. Unparking puts the same entry back at its old place among the
    host's other hooks, so the order in which nested adapter sets compose is
    kept.
    """

    def __init__(self, handle: RemovableHandle) -> None:
        self.handle = handle
        # (hook function, ids of the hooks before it, ids of those after it, extra dicts that listed
        # its id) while parked.
        self.parked: tuple[Any, set[int], set[int], list[dict[int, Any]]] | None = None

    def park(self) -> None:
        hooks = self.handle.hooks_dict_ref()
        key = self.handle.id
        if self.parked is not None or hooks is None or key not in hooks:
            return
        keys = list(hooks)
        position = keys.index(key)
        before, after = set(keys[:position]), set(keys[position + 1 :])
        # NOTE: RemovableHandle.extra_dict_ref is how torch links the with_kwargs and
        # always_call flags to a hook id; there is no public API to suspend a hook.
        extras = [extra for extra in (ref() for ref in self.handle.extra_dict_ref) if extra is not None and key in extra]
        self.parked = (hooks.pop(key), before, after, extras)
        for extra in extras:
            extra.pop(key)

    def unpark(self) -> None:
        hooks = self.handle.hooks_dict_ref()
        if self.parked is None or hooks is None:
            self.parked = None
            return
        function, before, after, extras = self.parked
        self.parked = None
        items = list(hooks.items())
        # Go back in front of the first hook that followed it, so hooks prepended meanwhile stay
        # in front. With none of those left, go after the last hook that preceded it.
        keys = [key for key, _ in items]
        position = next((index for index, key in enumerate(keys) if key in after), None)
        if position is None:
            position = max((index + 1 for index, key in enumerate(keys) if key in before), default=len(keys))
        items.insert(position, (self.handle.id, function))
        hooks.clear()
        hooks.update(items)
        for extra in extras:
            extra[self.handle.id] = True

    def remove(self) -> None:
        self.parked = None
        self.handle.remove()


class Site:
    """The adapters of one adapter set at one host, and the hooks that run them.

    `refresh` works out everything that does not change between calls:
    which adapters run before the host, which after it, and whether each
    hook is needed at all. It runs when the site is registered and whenever
    one of its adapters is enabled, disabled, merged or unmerged. A hook
    with nothing to run is taken out of the host.
    """

    def __init__(self, path: str, host: nn.Module, adapters: list[Adapter], owner: Any = None) -> None:
        self.path = path
        # The adapter set this site belongs to; the host's hooks keep it alive through this reference.
        self.owner = owner
        self.host = host
        self.adapters = adapters
        by_name = {adapter.name: adapter for adapter in adapters}
        # Members of a meta adapter run only through it, on the same input.
        self.members = {
            adapter: [by_name[name] for name in adapter.strategy.members if name in by_name]
            for adapter in adapters
            if adapter.strategy.members
        }
        # The meta adapter whose route entry a member follows.
        self.meta_of = {member: meta for meta, members in self.members.items() for member in members}
        owned = set(self.meta_of)
        steps = [adapter for adapter in adapters if adapter not in owned]
        self.input_steps = [adapter for adapter in steps if adapter.insertion == "input"]
        self.output_steps = [adapter for adapter in steps if adapter.insertion != "input"]
        self.parallel_adapters = [adapter for adapter in adapters if adapter.insertion == "parallel"]
        # At a host that never changes its input, parallel networks run in the forward hook.
        self.parallel_in_forward_hook = preserves_input(host)
        # Whether fusable adapters may take the fused step at this host.
        self.fuses = self.parallel_in_forward_hook and type(host).forward in _ROW_WISE_FORWARDS
        self.pre_hook: _Hook | None = None
        self.forward_hook: _Hook | None = None
        # The adapters that run now, in order; set by refresh.
        self.active_inputs: list[Adapter] = []
        self.active_parallel: list[Adapter] = []
        self.active_outputs: list[Adapter] = []
        # The adapter when the only one that runs is a fusable parallel one: the common LoRA case.
        self.single_fused: Adapter | None = None
        # Until a call shows that the host leaves its input alone, parallel networks read a copy
        # when autograd records, because a host that changes its input in place would corrupt
        # the tensors saved for backward.
        self.copy_parallel_input = not self.parallel_in_forward_hook
        # Parallel results wait here between the pre-hook and the forward hook of one call.
        # A stack per thread keeps re-entrant calls and concurrent threads apart.
        self._local = threading.local()
        for adapter in adapters:
            adapter._site = self

    def __getstate__(self) -> dict[str, Any]:
        # Per-call state belongs to running forwards, so copies and pickles start without it.
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def register(self) -> None:
        """Register this site's hooks on its host, then park those with nothing to run."""
        early_parallel = self.parallel_adapters and not self.parallel_in_forward_hook
        if self.input_steps or early_parallel:
            handle = self.host.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            self.pre_hook = _Hook(handle)
        if self.output_steps:
            # The forward hook must also run when the host raises, to pop the pre-hook's per-call entry.
            handle = self.host.register_forward_hook(self._forward_hook, with_kwargs=True, always_call=bool(early_parallel))
            self.forward_hook = _Hook(handle)
        self.refresh(forget_compiled=False)
        _forget_compiled_code()

    def remove(self) -> None:
        """Remove this site's hooks from its host."""
        for hook in (self.pre_hook, self.forward_hook):
            if hook is not None:
                hook.remove()
        self.pre_hook = self.forward_hook = None
        _forget_compiled_code()

    def refresh(self, *, forget_compiled: bool = True) -> None:
        """Recompute which adapters run and park the hooks that have none."""
        runs = {adapter for adapter in self.adapters if adapter.enabled and not adapter.merged}
        self.active_inputs = [adapter for adapter in self.input_steps if adapter in runs]
        self.active_outputs = [adapter for adapter in self.output_steps if adapter in runs]
        self.active_parallel = [
            adapter
            for adapter in self.parallel_adapters
            if adapter in runs and self.meta_of.get(adapter, adapter) in runs
        ]
        early_parallel = self.active_parallel and not self.parallel_in_forward_hook
        only = self.active_outputs[0] if len(self.active_outputs) == 1 and not self.active_inputs else None
        fast = only is not None and only.fusable and only.insertion == "parallel" and only not in self.members
        self.single_fused = only if fast and self.fuses else None
        self._set_parked(self.pre_hook, not (self.active_inputs or early_parallel))
        self._set_parked(self.forward_hook, not self.active_outputs)
        # Compiled graphs may have inlined the old plan, parked or not.
        if forget_compiled:
            _forget_compiled_code()

    @staticmethod
    def _set_parked(hook: _Hook | None, park: bool) -> None:
        if hook is None or (hook.parked is not None) == park:
            return
        if park:
            hook.park()
        else:
            hook.unpark()

    def _stack(self) -> list[dict[Adapter, torch.Tensor]]:
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = []
            return self._local.stack

    def _routing(self) -> bool:
        return self.owner is not None and self.owner.open_routes > 0

    def _samples(self, adapter: Adapter, tensor: torch.Tensor) -> torch.Tensor | None:
        """Return the batch indices routed to ``adapter``, or None when every sample is."""
        route = self.owner.current_route() if self._routing() else None
        if route is None:
            return None
        return route.indices(adapter.name, tensor, site=self.path)

    def _apply(self, adapter: Adapter, y: torch.Tensor, outs: dict[Adapter, torch.Tensor] | None) -> torch.Tensor:
        """Return ``y`` adapted by ``adapter`` (and its members), on the routed samples only."""
        samples = self._samples(adapter, y)
        if samples is not None:
            if samples.numel() == 0:
                return y
            part = self._apply_all(adapter, y.index_select(0, samples), outs)
            return y.index_copy(0, samples, part)
        return self._apply_all(adapter, y, outs)

    def _apply_all(self, adapter: Adapter, y: torch.Tensor, outs: dict[Adapter, torch.Tensor] | None) -> torch.Tensor:
        members = self.members.get(adapter)
        if members is None:
            out = outs.get(adapter) if outs is not None and adapter.insertion == "parallel" else adapter.run_network(y)
            return adapter.compose(y, out)
        results = {}
        for member in members:
            if member.enabled and not member.merged:
                out = outs.get(member) if outs is not None and member.insertion == "parallel" else member.run_network(y)
                results[member.name] = member.compose(y, out)
        return adapter.compose(y, results)

    def _run_parallel(self, adapters: list[Adapter], args: tuple, kwargs: dict, frame: dict[Any, Any]) -> None:
        """Run the parallel networks on the host's input and store their outputs in ``frame``."""
        for adapter in adapters:
            x = adapter.input_selector.get(args, kwargs)
            if self.copy_parallel_input and torch.is_grad_enabled():
                if not torch.compiler.is_compiling():
                    frame[None] = (x, x._version)
                network_input = x.clone()
            else:
                network_input = x
            samples = self._samples(self.meta_of.get(adapter, adapter), network_input)
            if samples is not None:
                network_input = network_input.index_select(0, samples)
            frame[adapter] = adapter.run_network(network_input)

    @staticmethod
    def _sync_mode(adapters: list[Adapter], training: bool) -> None:
        for adapter in adapters:
            if adapter.training != training:
                adapter.train(training)

    def _check_training_call(self) -> None:
        """Track gradient checkpointing, and on the first training call check DistributedDataParallel."""
        owner = self.owner
        if owner is None or torch.compiler.is_compiling():
            return
        if not owner.ddp_checked and torch.is_grad_enabled():
            owner.check_ddp()
        found = checkpoint_call(self.path)
        if found is None:
            return
        token, recomputing = found
        if not recomputing and not torch.is_grad_enabled():
            self._warn_l2_without_grad()
        if recomputing:
            owner.pending_recompute.discard(token)
        else:
            owner.pending_recompute.add(token)

    def _warn_l2_without_grad(self) -> None:
        names = [adapter.name for adapter in self.adapters if adapter.enabled and getattr(adapter.strategy, "l2_lambda", 0) > 0]
        if names:
            warnings.warn(
                f"adapters {', '.join(map(repr, names))} at {self.path!r} add an L2 term (l2_lambda) inside "
                f"torch.utils.checkpoint with use_reentrant=True, whose first forward runs without grad, so "
                f"the term gets no gradient and the penalty has no effect; use use_reentrant=False",
                stacklevel=4,
            )

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        training = module.training
        if training and not self.active_outputs:
            self._check_training_call()
        changed = False
        for adapter in self.active_inputs:
            if adapter.training != training:
                adapter.train(training)
            x = adapter.input_selector.get(args, kwargs)
            args, kwargs = adapter.input_selector.replace(args, kwargs, self._apply(adapter, x, None))
            changed = True

        if self.active_parallel and not self.parallel_in_forward_hook:
            # Push before computing, so the forward hook, which also runs when this raises, pops it.
            frame: dict[Any, Any] = {}
            stack = self._stack()
            if not torch.compiler.is_compiling():
                if stack:
                    _drop_interrupted(stack)
                # The calling Python frame identifies this call, so a later call can tell an entry left
                # by an interrupted forward (KeyboardInterrupt skips the forward hook) from a live one.
                # Holding the frame object keeps its id from being reused while the entry exists.
                frame[_CALLER] = sys._getframe(1)
            stack.append(frame)
            self._sync_mode(self.active_parallel, training)
            self._run_parallel(self.active_parallel, args, kwargs, frame)
        return (args, kwargs) if changed else None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if module.training:
            self._check_training_call()
        adapter = self.single_fused
        if adapter is not None and type(output) is torch.Tensor and not (self.owner is not None and self.owner.open_routes):
            # The LoRA-on-Linear case, kept to a few checks and two kernels per call.
            if adapter.training != module.training:
                adapter.train(module.training)
            x = args[0] if args and adapter.input_selector.select is None else adapter.input_selector.get(args, kwargs)
            if type(x) is torch.Tensor:
                fused = adapter.add_to(x, output)
                if fused is not None:
                    return fused
        if not self.parallel_in_forward_hook and self.parallel_adapters:
            return self._compose_stacked(module, args, kwargs, output)
        training = module.training
        for adapter in self.active_outputs:
            if adapter.training != training:
                adapter.train(training)
            y = adapter.output_selector.get(output)
            if adapter.insertion == "parallel":
                result = self._apply_parallel(adapter, y, args, kwargs, training)
            else:
                result = self._apply(adapter, y, None)
            output = adapter.output_selector.replace(output, result)
        return output

    def _apply_parallel(self, adapter: Adapter, y: torch.Tensor, args: tuple, kwargs: dict, training: bool) -> torch.Tensor:
        """Adapt ``y`` with a parallel adapter whose network reads the host input from ``args``."""
        members = self.members.get(adapter, ())
        if adapter.fusable and self.fuses and not members and not self._routing():
            fused = adapter.add_to(adapter.input_selector.get(args, kwargs), y)
            if fused is not None:
                return fused
        frame: dict[Any, Any] = {}
        parallel = [adapter, *(member for member in members if member in self.active_parallel)]
        self._sync_mode(parallel, training)
        self._run_parallel(parallel, args, kwargs, frame)
        return self._apply(adapter, y, frame)

    def _compose_stacked(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Finish a call whose parallel networks ran in the pre-hook."""
        stack = self._stack()
        frame = stack.pop() if stack else None
        if output is None and not torch.compiler.is_compiling() and sys.exc_info()[0] is not None:
            # The host or an earlier hook raised; this call only clears the per-call state.
            return None
        if frame is None and self.active_parallel:
            msg = (
                f"adapters at {self.path!r}: the forward hook ran without the pre-hook that computes "
                f"the parallel branch; attach adapters outside the host's forward call"
            )
            raise AttachError(msg)
        if frame is None:
            frame = {}
        frame.pop(_CALLER, None)
        watched = frame.pop(None, None)
        if watched is not None and watched[0]._version == watched[1]:
            self.copy_parallel_input = False

        training = module.training
        for adapter in self.active_outputs:
            if adapter.insertion == "parallel" and adapter not in frame:
                continue
            if adapter.training != training:
                adapter.train(training)
            y = adapter.output_selector.get(output)
            output = adapter.output_selector.replace(output, self._apply(adapter, y, frame))
        return output
