"""Benchmark hookadapt against PEFT, AdapterHub's ``adapters`` and hand-written adapters.

Run ``make bench`` for a full run or ``make bench-quick`` (``--quick``) for
a short one that checks that every case runs. bench/settings.py gives their
repetition counts, time caps and estimated durations. The run writes
docs/benchmarks.md and bench/results.json.
Cases:

- ``lora``: 1. LoRA training step on MiniLM, against PEFT and inline LoRA.
- ``bottleneck``: 2. Houlsby bottleneck training step, against an inline wrapper.
- ``adapterhub``: 2b. the same against ``adapters``, in ``.venv-adapterhub``
  (built when missing, except with ``--quick``).
- ``overhead``: 3. per-call overhead on a small Linear.
- ``inference``: 4 and 5. inference with adapters disabled, detached or merged.
- ``growth``: 6. overhead per site for 6, 24 and 96 sites.
- ``memory``: 7a. peak memory of a LoRA training step.
- ``checkpoints``: 7b. checkpoint sizes, save and load times.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before transformers is imported anywhere: the model is read from site-packages only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from environment import describe  # noqa: E402
from report import render  # noqa: E402
from settings import FULL, QUICK, Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = ("lora", "bottleneck", "adapterhub", "overhead", "inference", "growth", "memory", "checkpoints")
# Cases that train or run the real MiniLM in this process.
MINILM_CASES = {"lora", "bottleneck", "inference", "memory", "checkpoints"}
DEFAULT_THREADS = 2


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds per case; skip AdapterHub unless its environment exists")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help=f"torch intra-op threads for every case and subprocess (default {DEFAULT_THREADS})",
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated cases to run, from: {', '.join(CASES)}")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md", help="the Markdown page to write")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json", help="the JSON file of raw figures to write")
    args = parser.parse_args(argv)
    args.cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def case_runners(settings: Settings, threads: int, base: Any) -> dict[str, Callable[[], list[dict[str, Any]]]]:
    """Return, for each case name, a function that runs it and returns its result sections."""
    from case_adapterhub import run_adapterhub
    from case_inference import run_inference
    from case_memory import run_checkpoints, run_memory
    from case_overhead import run_per_call_overhead, run_site_growth
    from case_training import run_bottleneck_training, run_lora_training

    return {
        "lora": lambda: [run_lora_training(base, settings)],
        "bottleneck": lambda: [run_bottleneck_training(base, settings)],
        "adapterhub": lambda: [run_adapterhub(settings, threads, build=not settings.quick)],
        "overhead": lambda: [run_per_call_overhead(settings)],
        "inference": lambda: run_inference(base, settings),
        "growth": lambda: [run_site_growth(settings)],
        "memory": lambda: [run_memory(base, settings, threads)],
        "checkpoints": lambda: [run_checkpoints(base, settings)],
    }


def failed_case(name: str, error: BaseException) -> dict[str, Any]:
    """Return a result section that records a case that raised, with the end of its traceback."""
    trace = "".join(traceback.format_exception(error)).strip().splitlines()
    return {
        "title": f"{name}: failed",
        "setup": "",
        "notes": [f"the case raised {type(error).__name__}: {error}", "traceback tail: " + " / ".join(trace[-6:])],
        "failed": True,
        "variants": {},
        "comparisons": {},
        "bars": [],
        "raw": {},
    }


def run_cases(names: list[str], settings: Settings, threads: int) -> tuple[list[dict[str, Any]], bool]:
    """Run the named cases in order; return their sections and whether every case ran without raising."""
    base = None
    if MINILM_CASES.intersection(names):
        from minilm import load_minilm

        base = load_minilm()
    runners = case_runners(settings, threads, base)
    sections: list[dict[str, Any]] = []
    all_ran = True
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            sections += runners[name]()
        except Exception as error:  # noqa: BLE001 - one failed case must not hide the others' figures
            all_ran = False
            traceback.print_exc()
            sections.append(failed_case(name, error))
        print(f"[bench] {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return sections, all_ran


def command_line(argv: list[str]) -> str:
    """Return the command that started this run, with paths relative to the repository."""
    python = Path(sys.executable)
    python_path = os.path.relpath(python, ROOT) if ROOT in python.absolute().parents else str(python)
    return shlex.join([python_path, "bench/run.py", *argv])


def write_outputs(run: dict[str, Any], markdown: Path, json_path: Path) -> None:
    """Write the raw figures as JSON and the Markdown page."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render(run), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its outputs; exit with 1 when a case failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_arguments(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    sections, all_ran = run_cases(args.cases, settings, args.threads)
    run = {
        "command": command_line(argv),
        "mode": "quick" if args.quick else "full",
        "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_seconds": time.perf_counter() - start,
        "environment": describe(args.threads),
        "settings": dataclasses.asdict(settings),
        "cases": sections,
    }
    write_outputs(run, args.markdown, args.json)
    print(f"[bench] wrote {args.markdown} and {args.json} in {run['duration_seconds']:.0f} s", flush=True)
    return 0 if all_ran else 1


if __name__ == "__main__":
    sys.exit(main())
