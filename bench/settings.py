"""Repetition counts and time caps of a full run and of a quick run (``--quick``).

A full run must finish within 15 minutes on 2 CPU cores, and a quick run,
which checks that every case runs but leaves wide spreads, within 2. The
counts are sized for that by estimate. Each interleaved measurement also
has a time cap: once it is passed, the measurement stops after the current
round (with at least 3 rounds), so a busy machine still finishes in time,
with fewer rounds. Every table reports the number of rounds it used.

NOTE: neither run was timed on an idle machine. On one 2-core AMD EPYC VM
that other jobs kept busy (load average about 2), `make bench` took 10
minutes including its pip step, and `make bench-quick` took 3.7 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """How often each case repeats its measurement."""

    quick: bool
    # Untimed rounds before every interleaved measurement.
    warmup_rounds: int
    # Training steps per variant on MiniLM (cases 1 and 2).
    training_rounds: int
    # Rounds of inference forwards on MiniLM (cases 4 and 5), and forwards per sample.
    inference_rounds: int
    inference_calls: int
    # Rounds of the per-call overhead case (3), and calls per sample.
    overhead_rounds: int
    overhead_calls: int
    # Rounds of the growth case (6), and blocks run per sample: a model of n blocks runs this many // n forwards.
    growth_rounds: int
    growth_block_calls: int
    # Profiled training steps per variant (case 7), fresh processes per variant for peak RSS
    # (none skips that measurement), and save and load rounds.
    memory_repeats: int
    rss_processes: int
    checkpoint_rounds: int
    # Training steps per variant in the AdapterHub environment.
    adapterhub_rounds: int
    # Time caps in seconds: one per training-step measurement (cases 1, 2 and AdapterHub)
    # and one per other interleaved measurement.
    training_seconds: float
    other_seconds: float


FULL = Settings(
    quick=False,
    warmup_rounds=2,
    training_rounds=40,
    inference_rounds=60,
    inference_calls=2,
    overhead_rounds=40,
    overhead_calls=2000,
    growth_rounds=40,
    growth_block_calls=2400,
    memory_repeats=2,
    rss_processes=1,
    checkpoint_rounds=15,
    adapterhub_rounds=30,
    training_seconds=100.0,
    other_seconds=50.0,
)

QUICK = Settings(
    quick=True,
    warmup_rounds=1,
    training_rounds=4,
    inference_rounds=8,
    inference_calls=1,
    overhead_rounds=8,
    overhead_calls=500,
    growth_rounds=8,
    growth_block_calls=480,
    memory_repeats=1,
    rss_processes=0,
    checkpoint_rounds=3,
    adapterhub_rounds=4,
    training_seconds=12.0,
    other_seconds=6.0,
)
