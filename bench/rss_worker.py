"""Measure the resident memory of LoRA training steps on MiniLM in a fresh process (Linux only).

Usage: ``python bench/rss_worker.py VARIANT [--threads N] [--steps K]``,
where VARIANT is ``hookadapt``, ``peft`` or ``inline``. The process loads
the encoder, adapts it in place and runs one warm-up step. Then it resets
the kernel's peak-RSS counter (writing 5 to ``/proc/self/clear_refs``) and
runs K more steps. It prints one JSON object: the resident set before the
measured steps, its peak during them, and the peak of the whole process
(the larger of the peaks before and after the reset). ``ru_maxrss`` is not used,
because Linux carries the parent's peak into a child started by fork and
exec.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from pathlib import Path

import torch

from minilm import LORA_BUILDERS, load_minilm, random_batch, training_step

KIB = 1024


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text(encoding="ascii")
    match = re.search(rf"^{field}:\s+(\d+) kB$", text, flags=re.MULTILINE)
    if match is None:
        msg = f"/proc/self/status has no {field} line; this measurement needs Linux"
        raise RuntimeError(msg)
    return int(match.group(1)) * KIB


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def measure(variant_name: str, steps: int) -> dict[str, int]:
    """Return the resident memory figures, in bytes, of ``steps`` training steps of one variant."""
    model = load_minilm()
    batch = random_batch(model)
    variant = LORA_BUILDERS[variant_name](model)
    step = training_step(variant, batch)
    step()
    gc.collect()

    peak_before = _status_bytes("VmHWM")
    _reset_peak()
    before = _status_bytes("VmRSS")
    for _ in range(steps):
        step()
    peak = _status_bytes("VmHWM")
    return {
        "rss_before_bytes": before,
        "rss_peak_bytes": peak,
        "rss_rise_bytes": peak - before,
        "process_peak_bytes": max(peak_before, peak),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, measure, and print the figures as JSON on the last line of output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(LORA_BUILDERS))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=2, help="measured training steps after one warm-up step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.variant, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
