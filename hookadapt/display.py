"""Text tables that show what an adapter set holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter_set import AdapterSet

__all__ = ["adapter_rows", "adapter_set_repr"]

_COLUMNS = ("adapter", "site", "insertion", "network", "strategy", "params", "trainable", "enabled", "dtype", "device")


def _kind_text(kind: str, options: Any, keys: tuple[str, ...]) -> str:
    shown = [f"{key}={options[key]}" for key in keys if key in options]
    return f"{kind}({', '.join(shown)})" if shown else kind


def adapter_rows(adapter_set: AdapterSet) -> list[dict[str, str]]:
    """Return one row per adapter and site, with the facts the tables show."""
    rows = []
    for adapter in adapter_set.all_adapters():
        params = list(adapter.parameters())
        count = sum(param.numel() for param in params)
        trainable = sum(param.numel() for param in params if param.requires_grad)
        first = params[0] if params else None
        rows.append(
            {
                "adapter": adapter.name,
                "site": adapter.path or "<root>",
                "insertion": adapter.insertion,
                "network": _kind_text(adapter.spec.network.kind, adapter.options, ("dim", "rank", "alpha")),
                "strategy": adapter.spec.strategy.kind,
                "params": f"{count:,}",
                "trainable": f"{trainable:,}",
                "enabled": "yes" if adapter.enabled else "no",
                "dtype": str(first.dtype).replace("torch.", "") if first is not None else "-",
                "device": str(first.device) if first is not None else "-",
            }
        )
    return rows


def adapter_set_repr(adapter_set: AdapterSet) -> str:
    """Return a header line and an aligned table of the adapter set's adapters."""
    rows = adapter_rows(adapter_set)
    total = sum(param.numel() for param in adapter_set.parameters())
    state = "attached" if adapter_set.is_attached else "detached"
    header = (
        f"AdapterSet({state}, {len(adapter_set.names)} adapter(s) at {len(adapter_set.sites)} site(s), "
        f"{total:,} parameters including train modules {list(adapter_set.train_modules) or '[]'})"
    )
    widths = {column: max([len(column)] + [len(row[column]) for row in rows]) for column in _COLUMNS}
    lines = [header, "  " + "  ".join(column.ljust(widths[column]) for column in _COLUMNS)]
    for row in rows:
        lines.append("  " + "  ".join(row[column].ljust(widths[column]) for column in _COLUMNS))
    return "\n".join(line.rstrip() for line in lines)
