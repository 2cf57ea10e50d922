"""Text and HTML tables that show what an adapter set contains, and its parameter totals."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter_set import AdapterSet

import html

__all__ = ["adapter_rows", "adapter_set_repr", "adapter_set_html", "adapter_summary"]

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
    if adapter_set._model_ref() is None:
        state = "the model no longer exists"
    header = (
        f"AdapterSet({state}, {len(adapter_set.names)} adapter(s) at {len(adapter_set.sites)} site(s), "
        f"{total:,} parameters including train modules {list(adapter_set.train_modules) or '[]'})"
    )
    widths = {column: max([len(column)] + [len(row[column]) for row in rows]) for column in _COLUMNS}
    lines = [header, "  " + "  ".join(column.ljust(widths[column]) for column in _COLUMNS)]
    for row in rows:
        lines.append("  " + "  ".join(row[column].ljust(widths[column]) for column in _COLUMNS))
    return "\n".join(line.rstrip() for line in lines)


def adapter_summary(adapter_set: AdapterSet) -> dict[str, Any]:
    """Return the parameter totals of an adapter set and the adapters' share of the base model."""
    from .targets import RESERVED

    per_adapter = {
        name: sum(param.numel() for adapter in adapter_set.adapters[name].values() for param in _unique(adapter.parameters()))
        for name in adapter_set.names
    }
    adapter_params = list(adapter_set.parameters(include_train_modules=False))
    adapter_total = sum(param.numel() for param in adapter_params)
    base_total = sum(
        param.numel() for path, param in adapter_set.model.named_parameters() if RESERVED not in path.split(".")
    )
    train_total = sum(param.numel() for param in adapter_set.parameters()) - adapter_total
    return {
        "adapter_parameters": adapter_total,
        "trainable_adapter_parameters": sum(param.numel() for param in adapter_params if param.requires_grad),
        "train_module_parameters": train_total,
        "base_parameters": base_total,
        "adapter_share": adapter_total / base_total if base_total else float("nan"),
        "per_adapter": per_adapter,
    }


def _unique(params: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for param in params:
        seen.setdefault(id(param), param)
    return list(seen.values())


def adapter_set_html(adapter_set: AdapterSet) -> str:
    """Return an HTML table with the same facts as the text `repr`, for notebooks."""
    rows = adapter_rows(adapter_set)
    totals = adapter_summary(adapter_set)
    state = "attached" if adapter_set.is_attached else "detached"
    caption = (
        f"AdapterSet ({state}): {len(adapter_set.names)} adapter(s) at {len(adapter_set.sites)} site(s), "
        f"{totals['adapter_parameters']:,} adapter parameters ({totals['adapter_share']:.2%} of the base model)"
    )
    head = "".join(f"<th>{html.escape(column)}</th>" for column in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(row[column])}</td>" for column in _COLUMNS) + "</tr>" for row in rows
    )
    return f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
