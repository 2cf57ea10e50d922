"""Interleaved timing and the statistics the benchmark reports.

Absolute times drift on shared machines, so every comparison times its
variants in one process, round-robin. Each round runs every variant once,
in an order that rotates from round to round. The figures compare
variants within a round (per-round ratios and differences) before taking
medians over rounds. The garbage collector is paused while a variant runs
and collects once before each round, outside the timed region.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

Samples = dict[str, list[float]]


def _run_timed(function: Callable[[], object], calls: int, prepare: Callable[[], object] | None = None) -> float:
    """Return the mean seconds per call of ``calls`` back-to-back calls, after an untimed ``prepare()``."""
    if prepare is not None:
        prepare()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            function()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / calls


def interleave(
    variants: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    calls: int | Mapping[str, int] = 1,
    warmup_rounds: int = 1,
    max_seconds: float | None = None,
    min_rounds: int = 3,
    prepare: Mapping[str, Callable[[], object]] | None = None,
) -> Samples:
    """Time each variant once per round, round-robin, after ``warmup_rounds`` untimed rounds.

    Args:
        variants: Names mapped to callables that run one call of the variant.
        rounds: Timed rounds; each yields one sample per variant.
        calls: Calls per sample, for all variants or per variant name.
            A sample is the mean time of one call.
        warmup_rounds: Untimed rounds first, for lazy initialisation,
            allocator warm-up and one-time work inside the variants.
        max_seconds: Stop after the round that passes this many seconds
            (warm-up included), once ``min_rounds`` rounds are done, so that
            a slow or busy machine still finishes. Every variant keeps the
            same number of samples.
        prepare: Per variant name, a callable run untimed before each of
            its samples, for example to build a fresh model for a load.

    Returns:
        Seconds per call, ``{name: [sample of round 0, round 1, ...]}``.
    """
    names = list(variants)
    start = time.perf_counter()
    per_variant = calls if isinstance(calls, Mapping) else {name: calls for name in names}
    preparations = prepare or {}
    for _ in range(warmup_rounds):
        gc.collect()
        for name in names:
            _run_timed(variants[name], per_variant[name], preparations.get(name))

    samples: Samples = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        gc.collect()
        for name in names[shift:] + names[:shift]:
            samples[name].append(_run_timed(variants[name], per_variant[name], preparations.get(name)))
        out_of_time = max_seconds is not None and time.perf_counter() - start > max_seconds
        if out_of_time and index + 1 >= min_rounds:
            break
    return samples


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Return the median, quartiles (inclusive method), min, max and count of ``values``."""
    values = list(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def round_ratios(samples: Samples, numerator: str, denominator: str) -> list[float]:
    """Return ``numerator / denominator`` for each round."""
    return [top / bottom for top, bottom in zip(samples[numerator], samples[denominator], strict=True)]


def round_differences(samples: Samples, minuend: str, subtrahend: str) -> list[float]:
    """Return ``minuend - subtrahend`` for each round, in seconds."""
    return [left - right for left, right in zip(samples[minuend], samples[subtrahend], strict=True)]


def ratio_summary(samples: Samples, numerator: str, denominator: str) -> dict[str, float]:
    """Summarize the per-round ratios and add the ratio of the two medians as ``ratio_of_medians``."""
    summary = summarize(round_ratios(samples, numerator, denominator))
    summary["ratio_of_medians"] = statistics.median(samples[numerator]) / statistics.median(samples[denominator])
    return summary
