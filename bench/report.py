"""Render a benchmark run as the Markdown page docs/benchmarks.md.

The page lists every bar with PASS or MISS, then each case with its setup,
every variant's median, interquartile range and min–max, and every
comparison. Each missed bar gets a line with its known reason from
MISS_REASONS, or a request to rerun on an idle machine.
"""

from __future__ import annotations

from typing import Any

WHY_PLACEHOLDER = "Why: not analysed; rerun `make bench` on an idle machine before drawing a conclusion."

# The known reason for each bar that a run on the project's 2-core machines can miss.
_NO_HOOKS = (
    "Why: with every adapter {state}, the model runs with no hookadapt hook, so the two variants run "
    "the same code and the difference is run-to-run noise; the control row (a second plain copy) "
    "shows its size."
)
MISS_REASONS = {
    "LoRA step: hookadapt / PEFT": (
        "Why: the step is about 1.1 s of base-model compute, and the adapters are a small part of it. "
        "hookadapt saves PEFT's separate scale and add (one addmm per site in forward, one full-size "
        "multiply fewer in backward). By count of full-size operations on the 12 sites that is worth "
        "about 1 %, and repeated runs measure 0.99. The per-round spread (see the IQR in case 1) is "
        "several times the 2 % margin of the bar."
    ),
    "Inference, adapters disabled / plain": _NO_HOOKS.format(state="disabled"),
    "Inference, detached / plain": _NO_HOOKS.format(state="detached"),
    "Inference, merged LoRA / plain": _NO_HOOKS.format(state="merged into the weights"),
}


def format_number(value: float) -> str:
    """Format a figure with about four significant digits and no exponent."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(value: float) -> str:
    """Format a unitless ratio with three decimals."""
    return f"{value:.3f}"


def _cell(text: str) -> str:
    # A bare "|" would end the cell.
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return lines


def _format_bar_value(entry: dict[str, Any]) -> str:
    if entry["unit"] == "bytes":
        return f"{entry['value']:,} bytes"
    return format_ratio(entry["value"])


def _format_limit(entry: dict[str, Any]) -> str:
    if entry["unit"] == "bytes":
        return f"≤ {entry['limit']:,} bytes"
    return f"≤ {format_ratio(entry['limit'])}"


def bars_section(cases: list[dict[str, Any]]) -> list[str]:
    """Return the table of every bar and, for each miss, a line with its known reason."""
    entries = [entry for case in cases for entry in case["bars"]]
    rows = [
        [entry["bar"], _format_bar_value(entry), _format_limit(entry), "PASS" if entry["pass"] else "**MISS**"]
        for entry in entries
    ]
    lines = ["## Bars", ""]
    lines += _table(["bar", "figure (median)", "limit", "result"], rows)
    misses = [entry for entry in entries if not entry["pass"]]
    lines.append("")
    failed = [case["title"] for case in cases if case.get("failed")]
    if failed:
        lines += [f"**Failed cases**, whose bars are missing from this table: {', '.join(failed)}.", ""]
    if not misses:
        lines.append("Every figure meets its bar in this run.")
        return lines
    lines.append(f"{len(misses)} of {len(entries)} figures miss their bar in this run:")
    lines.append("")
    for entry in misses:
        why = MISS_REASONS.get(entry["bar"], WHY_PLACEHOLDER)
        lines.append(f"- {entry['bar']}: {_format_bar_value(entry)}, limit {_format_limit(entry)}. {why}")
    return lines


def _variant_rows(case: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, summary in case["variants"].items():
        rows.append(
            [
                name,
                format_number(summary["median"]),
                f"{format_number(summary['q1'])}–{format_number(summary['q3'])}",
                f"{format_number(summary['min'])}–{format_number(summary['max'])}",
                str(summary["n"]),
            ]
        )
    return rows


def _comparison_rows(case: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, summary in case["comparisons"].items():
        is_ratio = summary["kind"] == "ratio"
        show = format_ratio if is_ratio else format_number
        of_medians = format_ratio(summary["ratio_of_medians"]) if "ratio_of_medians" in summary else ""
        unit = "ratio" if is_ratio else case["unit"].split(" per ")[0]
        rows.append(
            [
                label,
                unit,
                show(summary["median"]),
                f"{show(summary['q1'])}–{show(summary['q3'])}",
                f"{show(summary['min'])}–{show(summary['max'])}",
                of_medians,
            ]
        )
    return rows


def case_section(case: dict[str, Any]) -> list[str]:
    """Return the Markdown of one case: setup, variants, comparisons, extra tables and notes."""
    lines = [f"## {case['title']}", ""]
    if case.get("setup"):
        lines += [case["setup"], ""]
    if case["variants"]:
        count_label = case.get("count_label", "rounds")
        lines += _table([f"variant ({case['unit']})", "median", "IQR", "min–max", count_label], _variant_rows(case))
        lines.append("")
    if case["comparisons"]:
        header = ["comparison (per round)", "unit", "median", "IQR", "min–max", "ratio of medians"]
        lines += _table(header, _comparison_rows(case))
        lines.append("")
    for table in case.get("tables", []):
        lines += [f"{table['title']}:", ""]
        lines += _table(table["header"], table["rows"])
        lines.append("")
    for note in case.get("notes", []):
        first, _, rest = note.partition("\n")
        lines += [f"Note: {first}", ""]
        if rest:
            lines += ["```", rest, "```", ""]
    return lines


def header_section(run: dict[str, Any]) -> list[str]:
    """Return the title, how the page was made, and the machine and versions table."""
    environment = run["environment"]
    versions = environment["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{run['command']}` on {run['finished']} ({run['mode']} run, {run['duration_seconds']:.0f} s). "
        "The raw figures are in [bench/results.json](../bench/results.json).",
        "",
        "Absolute times drift on shared machines, so every comparison is made in one process: the variants run "
        "round-robin, in an order that rotates each round, after untimed warm-up rounds, with the garbage "
        "collector paused while a variant runs. Ratios are medians of per-round ratios (the ratio of the medians "
        "is listed beside them), overheads are medians of per-round differences, and IQR is the interquartile "
        "range over rounds. A measurement stops early, after at least 3 rounds, when it passes its time cap "
        "(bench/settings.py), so the rounds column says how many were used.",
        "",
    ]
    if run["mode"] == "quick":
        lines += ["**Quick run**: few rounds, so the spreads are wide; use a full run (`make bench`) for conclusions.", ""]
    rows = [
        ["CPU", f"{environment['cpu_model']}, {environment['logical_cpus']} logical CPUs ({environment['usable_cpus']} usable)"],
        ["torch threads", str(environment["torch_threads"])],
        ["platform", environment["platform"]],
        ["python", environment["python"]],
    ]
    rows += [[package, version] for package, version in versions.items()]
    lines += _table(["", ""], rows)
    lines.append("")
    return lines


def render(run: dict[str, Any]) -> str:
    """Return the whole page for one run."""
    lines = header_section(run)
    lines += bars_section(run["cases"])
    lines.append("")
    for case in run["cases"]:
        lines += case_section(case)
    return "\n".join(lines).rstrip() + "\n"
