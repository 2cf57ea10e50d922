"""The shape of one case's results: per-variant figures, comparisons and bars, all JSON-ready.

A case returns a dict with these keys, which `report` renders:

- ``title``, ``setup`` (one paragraph on what was measured) and ``notes``
  (a list of remarks);
- ``unit`` and ``scale`` of the per-variant figures (``scale`` converts
  seconds to the unit);
- ``variants``: ``{name: summary}`` with `timing.summarize` fields in the unit;
- ``comparisons``: ``{label: summary}`` of unitless per-round ratios or of
  differences in the unit, with ``kind`` set to ``"ratio"`` or ``"difference"``;
- ``bars``: see `bar`;
- ``raw``: the raw samples in seconds, ``{name: [...]}``;
- optional: ``tables`` (extra tables, each with ``title``, ``header`` and
  ``rows``), ``count_label`` (the heading of the sample count column,
  ``"rounds"`` by default), and ``skipped`` or ``failed`` for a case that
  did not measure, with the reason in ``notes``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from timing import Samples, ratio_summary, round_differences, summarize


def bar(label: str, value: float, limit: float, *, unit: str = "") -> dict[str, Any]:
    """Return a bar that ``value`` passes when it is at most ``limit``."""
    return {"bar": label, "value": value, "limit": limit, "unit": unit, "pass": bool(value <= limit)}


def scaled_summaries(samples: Samples, scale: float) -> dict[str, dict[str, float]]:
    """Summarize each variant's samples after multiplying them by ``scale``."""
    return {name: summarize([value * scale for value in values]) for name, values in samples.items()}


def ratio_comparisons(samples: Samples, pairs: Iterable[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Return ``{"a / b": per-round ratio summary}`` for each ``(a, b)`` pair."""
    comparisons = {}
    for numerator, denominator in pairs:
        summary = ratio_summary(samples, numerator, denominator)
        summary["kind"] = "ratio"
        comparisons[f"{numerator} / {denominator}"] = summary
    return comparisons


def difference_comparisons(samples: Samples, pairs: Iterable[tuple[str, str]], scale: float) -> dict[str, dict[str, float]]:
    """Return ``{"a - b": per-round difference summary}`` in the unit that ``scale`` converts to."""
    comparisons = {}
    for minuend, subtrahend in pairs:
        differences = [value * scale for value in round_differences(samples, minuend, subtrahend)]
        summary = summarize(differences)
        summary["kind"] = "difference"
        comparisons[f"{minuend} - {subtrahend}"] = summary
    return comparisons


def timing_case(
    title: str,
    setup: str,
    samples: Samples,
    *,
    unit: str,
    scale: float,
    ratios: Iterable[tuple[str, str]] = (),
    differences: Iterable[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Return a case result for timed variants, without bars; the caller adds them."""
    comparisons = ratio_comparisons(samples, ratios)
    comparisons.update(difference_comparisons(samples, differences, scale))
    return {
        "title": title,
        "setup": setup,
        "notes": [],
        "unit": unit,
        "scale": scale,
        "variants": scaled_summaries(samples, scale),
        "comparisons": comparisons,
        "bars": [],
        "raw": samples,
    }
