"""How much each adapter changes its host's tensor, measured on a batch and drawn per site.

Only `plot_contributions` needs matplotlib, which is an optional
dependency: ``pip install hookadapt[plot]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .adapter_set import AdapterSet

__all__ = ["contributions", "plot_contributions"]


def _never_fused(x: torch.Tensor, y: torch.Tensor) -> None:
    return None


@torch.no_grad()
def contributions(adapter_set: AdapterSet, *args: Any, **kwargs: Any) -> dict[tuple[str, str], float]:
    """Run ``adapter_set.model(*args, **kwargs)`` and return each adapter's relative change per site.

    The value for ``(name, site)`` is ``||result - x|| / ||x||``, where ``x``
    is the host tensor the adapter received and ``result`` what it returned,
    so 0 means the adapter changed nothing there. The model runs in its
    current train or eval mode, without gradients.
    """
    measured: dict[tuple[str, str], float] = {}
    patched = []

    def measuring(adapter: Any) -> Any:
        compose = adapter.compose

        def compose_and_measure(x: torch.Tensor, out: Any) -> torch.Tensor:
            result = compose(x, out)
            size = x.float().norm().item()
            change = (result.float() - x.float()).norm().item() if result.shape == x.shape else float("nan")
            measured[(adapter.name, adapter.path)] = change / size if size else float("nan")
            return result

        return compose_and_measure

    try:
        for adapter in adapter_set.all_adapters():
            # Instance attributes shadow the methods for this call only. Turning off the
            # fused LoRA step sends every adapter through compose, where it is measured.
            adapter.compose = measuring(adapter)
            adapter.add_to = _never_fused
            patched.append(adapter)
        adapter_set.model(*args, **kwargs)
    finally:
        for adapter in patched:
            del adapter.compose, adapter.add_to
    return measured


def plot_contributions(adapter_set: AdapterSet, *args: Any, ax: Any = None, **kwargs: Any) -> Any:
    """Draw `contributions` as grouped horizontal bars, one group per site; return the figure.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        msg = "plot_contributions needs matplotlib; install it with 'pip install matplotlib' or 'pip install hookadapt[plot]'"
        raise ImportError(msg) from err

    values = contributions(adapter_set, *args, **kwargs)
    return _draw(values, adapter_set.names, ax, plt)


def _draw(values: Mapping[tuple[str, str], float], names: list[str], ax: Any, plt: Any) -> Any:
    sites = list(dict.fromkeys(site for _, site in values))
    if ax is None:
        figure, ax = plt.subplots(figsize=(7, 0.35 * len(sites) * max(1, len(names)) + 1.2))
    else:
        figure = ax.figure
    height = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        positions = [row + index * height for row in range(len(sites))]
        ax.barh(positions, [values.get((name, site), 0.0) for site in sites], height=height, label=name)
    ax.set_yticks([row + 0.4 - height / 2 for row in range(len(sites))])
    ax.set_yticklabels([site or "<root>" for site in sites])
    ax.invert_yaxis()
    ax.set_xlabel("||adapter result - host tensor|| / ||host tensor||")
    ax.legend(loc="lower right")
    figure.tight_layout()
    return figure
