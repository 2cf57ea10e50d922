"""Working out the feature sizes a new network needs at a host.

Sizes come first from the spec's ``network.in_features`` and
``network.out_features``, then from a probe forward on ``example_inputs``,
then from the host's own attributes. A composite host falls back to the
input size of its first descendant that declares one and the output size of
its last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import ShapeError
from .targets import RESERVED
from .selection import InputSelector, OutputSelector
from .config import AdapterSpec

__all__ = ["declared_sizes", "host_sizes", "probe_sizes", "network_sizes"]

Sizes = tuple[int | None, int | None]


def declared_sizes(module: nn.Module) -> Sizes:
    """Return the input and output feature sizes that ``module`` itself declares."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        size = module.normalized_shape[-1] if module.normalized_shape else None
        return size, size
    if isinstance(module, nn.Embedding):
        return None, module.embedding_dim
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    in_size = getattr(module, "in_features", None)
    out_size = getattr(module, "out_features", None)
    if isinstance(in_size, int) or isinstance(out_size, int):
        return (in_size if isinstance(in_size, int) else None, out_size if isinstance(out_size, int) else None)
    return None, None


def host_sizes(host: nn.Module) -> Sizes:
    """Return the sizes ``host`` declares, falling back to its first and last declaring descendants."""
    in_size, out_size = declared_sizes(host)
    if in_size is not None and out_size is not None:
        return in_size, out_size
    first_in = last_out = None
    for path, module in host.named_modules():
        # Adapters that other sets attached to this host declare sizes too, but not the host's.
        if module is host or RESERVED in path.split("."):
            continue
        child_in, child_out = declared_sizes(module)
        if first_in is None and child_in is not None:
            first_in = child_in
        if child_out is not None:
            last_out = child_out
    return (in_size if in_size is not None else first_in, out_size if out_size is not None else last_out)


def _feature_size(tensor: torch.Tensor, feature_dim: int) -> int | None:
    if tensor.dim() == 0 or not -tensor.dim() <= feature_dim < tensor.dim():
        return None
    return int(tensor.shape[feature_dim])


def probe_sizes(
    model: nn.Module,
    example_inputs: Any,
    requests: Iterable[tuple[str, str, nn.Module, AdapterSpec]],
) -> dict[tuple[str, str], Sizes]:
    """Run one forward on ``example_inputs`` and record the feature sizes at each (adapter, host) pair.

    The forward runs in eval mode without gradients, and afterwards every
    module's train flag, the hooks and the CPU random state are as before.
    """
    seen: dict[tuple[str, str], Sizes] = {}
    handles = []
    modes = {module: module.training for module in model.modules()}

    def recorder(name: str, path: str, host: nn.Module, spec: AdapterSpec) -> None:
        inputs = InputSelector(host, spec.input_select, site=path, adapter=name)
        outputs = OutputSelector(spec.output_select, site=path, adapter=name)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            in_size = _feature_size(inputs.get(args, kwargs), spec.feature_dim)
            seen[(name, path)] = (in_size, seen.get((name, path), (None, None))[1])

        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out_size = _feature_size(outputs.get(output), spec.feature_dim)
            seen[(name, path)] = (seen.get((name, path), (None, None))[0], out_size)

        handles.append(host.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(host.register_forward_hook(forward_hook, with_kwargs=True))

    try:
        for request in requests:
            recorder(*request)
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return seen


def network_sizes(
    name: str,
    path: str,
    host: nn.Module,
    spec: AdapterSpec,
    probed: Sizes | None,
) -> tuple[int, int]:
    """Return ``(in_features, out_features)`` of the network for one adapter at one host."""
    declared_in, declared_out = host_sizes(host)
    probed_in, probed_out = probed or (None, None)
    host_in = probed_in if probed_in is not None else declared_in
    host_out = probed_out if probed_out is not None else declared_out
    if spec.insertion == "output":
        needed = (host_out, host_out)
    elif spec.insertion == "input":
        needed = (host_in, host_in)
    else:
        needed = (host_in, host_out)

    options = spec.network.options
    in_size = options.get("in_features") or needed[0]
    out_size = options.get("out_features") or needed[1]
    if in_size is None or out_size is None:
        missing = " and ".join(
            field for field, size in (("in_features", in_size), ("out_features", out_size)) if size is None
        )
        msg = (
            f"adapter {name!r} at {path!r}: cannot tell the {missing} of a {spec.insertion!r} network "
            f"on a {type(host).__name__}, which declares no feature sizes; set network.{missing.split()[0]} "
            f"in the spec or pass example_inputs to attach so one forward can measure them"
        )
        raise ShapeError(msg)
    return in_size, out_size
