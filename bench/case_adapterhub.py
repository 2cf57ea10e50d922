"""Case 2, AdapterHub part: bottleneck adapter training steps with ``adapters`` against hookadapt.

``adapters`` 1.3.0 needs transformers 4.57, so this case runs
`adapterhub_worker` in ``.venv-adapterhub`` (built by `adapterhub_env`) in
a subprocess, where hookadapt, ``adapters`` and the inline floor take turns
in one process. Its ratios compare within that environment only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from adapterhub_env import ENV_DIR, ensure_environment, is_ready
from minilm import BATCH_SIZE, BOTTLENECK_DIM, SEQUENCE_LENGTH
from results import timing_case
from settings import Settings

MILLISECONDS = 1e3
TITLE = "2b. Bottleneck training step: hookadapt against AdapterHub `adapters` (separate environment)"
WORKER = Path(__file__).resolve().parent / "adapterhub_worker.py"
# Loading three copies of MiniLM and the imports, beyond the timed rounds.
STARTUP_ALLOWANCE_SECONDS = 300


def _not_measured(reason: str) -> dict[str, Any]:
    return {
        "title": TITLE,
        "setup": "",
        "notes": [reason],
        "skipped": True,
        "variants": {},
        "comparisons": {},
        "bars": [],
        "raw": {},
    }


def _run_worker(python: Path, settings: Settings, threads: int) -> dict[str, Any]:
    command = [
        str(python),
        str(WORKER),
        "--rounds",
        str(settings.adapterhub_rounds),
        "--warmup",
        str(settings.warmup_rounds),
        "--max-seconds",
        str(settings.training_seconds),
        "--threads",
        str(threads),
    ]
    timeout = settings.training_seconds * 2 + STARTUP_ALLOWANCE_SECONDS
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if completed.returncode != 0:
        msg = f"adapterhub_worker exited with {completed.returncode}: {completed.stderr.strip()[-800:]}"
        raise RuntimeError(msg)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_adapterhub(settings: Settings, threads: int, *, build: bool) -> dict[str, Any]:
    """Time the AdapterHub comparison, building the environment first when ``build`` is set.

    Returns a result marked ``skipped`` with the reason when the environment
    is missing and ``build`` is off, when it cannot be built, or when the
    worker fails.
    """
    if not is_ready() and not build:
        return _not_measured(f"Skipped: {ENV_DIR.name} does not exist, and --quick does not build it.")
    python, reason = ensure_environment()
    if python is None:
        return _not_measured(f"Not measured: the AdapterHub environment could not be built. {reason}")
    try:
        output = _run_worker(python, settings, threads)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as err:
        return _not_measured(f"Not measured: {err}")

    samples = output["samples"]
    found = output["versions"]
    setup = (
        f"As case 2 (MiniLM-L6, batch {BATCH_SIZE}, sequence length {SEQUENCE_LENGTH}, base frozen), but in "
        f"{ENV_DIR.name} with transformers {found['transformers']} and adapters {found['adapters']} (torch "
        f"{found['torch']}), because adapters 1.3.0 requires transformers ~=4.57.6. `adapters` is a `seq_bn` "
        f"adapter (SeqBnConfig: reduction_factor = 384 / {BOTTLENECK_DIM}, non_linearity swish, ln_before) "
        f"inside every layer's output block; unlike hookadapt's, its projections have biases and it sits before "
        f"the block's LayerNorm. hookadapt and `inline` are as in case 2. The three take turns in one process, "
        f"{len(samples['hookadapt'])} rounds. A full run builds {ENV_DIR.name} when it is missing "
        f"(bench/adapterhub_env.py, a few minutes, outside these timings)."
    )
    result = timing_case(
        TITLE,
        setup,
        samples,
        unit="ms per step",
        scale=MILLISECONDS,
        ratios=[("hookadapt", "adapters"), ("hookadapt", "inline"), ("adapters", "inline")],
    )
    trainable = output["trainable_parameters"]
    result["tables"] = [
        {
            "title": "Trainable parameters",
            "header": ["variant", "parameters"],
            "rows": [[name, f"{count:,}"] for name, count in trainable.items()],
        }
    ]
    result["versions"] = found
    return result
