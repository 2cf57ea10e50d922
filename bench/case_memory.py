"""Case 7: peak memory of a LoRA training step, checkpoint sizes, and save and load times.

Peak memory is measured two ways, both on CPU:

- Tensor memory, in this process: torch's profiler with ``profile_memory``
  records every allocation and free of torch's CPU allocator with a time
  stamp. The running sum over one training step, started after warm-up
  steps (so AdamW's state already exists), peaks at the extra tensor
  memory the step needs: activations saved for backward, gradients and
  temporaries. It counts tensor bytes exactly and ignores Python objects
  and allocator caching.
- Resident memory, in fresh processes (`rss_worker`): the rise of the
  kernel's peak RSS over the RSS before the measured steps, and the
  process's peak RSS. The workers run with ``MALLOC_MMAP_THRESHOLD_``
  set, so glibc serves every block over 64 KiB with mmap and returns it
  to the kernel when freed. Without it, freed tensors stay in glibc's
  heap, and the rise would depend on what earlier steps left there. It needs no
  profiler and counts everything the process holds.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import hookadapt
from minilm import BOTTLENECK_CONFIG, LORA_BUILDERS, LORA_CONFIG, hookadapt_variant, peft_lora_variant, random_batch, training_step
from results import bar, timing_case
from settings import Settings
from timing import interleave, summarize

MIB = 2**20
MILLISECONDS = 1e3
# A checkpoint may exceed its raw tensor bytes by this much: header, config and fingerprint.
CHECKPOINT_SLACK_BYTES = 8 * 1024
BENCH_DIR = Path(__file__).resolve().parent
# glibc serves allocations above this size with mmap, so that freed tensors leave the RSS at once.
MMAP_THRESHOLD_BYTES = 64 * 1024


def profiled_peak_bytes(step: Any) -> int:
    """Return the peak of live tensor bytes that ``step()`` adds, from the profiler's allocation records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    # NOTE: kineto_results is an attribute of torch.autograd.profiler.profile that torch does not document;
    # torch's own memory timeline (torch.profiler._memory_profiler) reads the same records.
    records = [
        event
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    records.sort(key=lambda event: event.start_ns())
    live = peak = 0
    for event in records:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _tensor_peaks(base: nn.Module, settings: Settings, batch: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Return each LoRA variant's profiled peak tensor bytes per repeat, the variants taking turns."""
    steps = {}
    for name, build in LORA_BUILDERS.items():
        steps[name] = training_step(build(copy.deepcopy(base)), batch)
        for _ in range(settings.warmup_rounds):
            steps[name]()
    peaks: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    start = time.perf_counter()
    for repeat in range(settings.memory_repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            peaks[name].append(float(profiled_peak_bytes(steps[name])))
        if time.perf_counter() - start > settings.other_seconds:
            break
    return peaks


def _rss_figures(settings: Settings, threads: int) -> tuple[dict[str, list[dict[str, int]]], list[str]]:
    """Run `rss_worker` in fresh processes, alternating hookadapt and PEFT; return figures and failures."""
    figures: dict[str, list[dict[str, int]]] = {"hookadapt": [], "peft": []}
    failures = []
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    for _ in range(settings.rss_processes):
        for name in figures:
            command = [sys.executable, str(BENCH_DIR / "rss_worker.py"), name, "--threads", str(threads)]
            completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
            if completed.returncode != 0:
                failures.append(f"rss_worker {name} exited with {completed.returncode}: {completed.stderr.strip()[-500:]}")
                continue
            figures[name].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return figures, failures


def _rss_table(figures: dict[str, list[dict[str, int]]]) -> dict[str, Any]:
    rows = []
    for name, runs in figures.items():
        if not runs:
            rows.append([name, "not measured", "", ""])
            continue
        rise = summarize([run["rss_rise_bytes"] / MIB for run in runs])
        process = summarize([run["process_peak_bytes"] / MIB for run in runs])
        rows.append([name, f"{rise['median']:.1f}", f"{rise['min']:.1f}–{rise['max']:.1f}", f"{process['median']:.1f}"])
    return {
        "title": "Resident memory in fresh processes (MiB): peak RSS rise over the measured steps, and the whole process's peak RSS",
        "header": ["variant", "RSS rise, median", "RSS rise, min–max", "process peak RSS, median"],
        "rows": rows,
    }


def _rss_setup(processes: int) -> str:
    if processes == 0:
        return "Resident memory: not measured in this run (a quick run skips it)."
    return (
        f"Resident memory: bench/rss_worker.py in {processes} fresh process(es) per variant, alternating, with "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD_BYTES} so that freed tensors leave the RSS; the kernel's peak-RSS "
        "counter is reset after a warm-up step and read after two more steps. Each worker imports only what its "
        "variant needs, so the process peak includes PEFT's import for PEFT only."
    )


def run_memory(base: nn.Module, settings: Settings, threads: int) -> dict[str, Any]:
    """Measure the peak memory of a LoRA training step with hookadapt, PEFT and inline LoRA."""
    batch = random_batch(base)
    peaks = _tensor_peaks(base, settings, batch)
    rss, failures = _rss_figures(settings, threads)
    repeats = len(peaks["hookadapt"])
    setup = (
        "LoRA r=8, alpha 16 on query and value of MiniLM-L6, one training step as in case 1 after "
        f"{settings.warmup_rounds} warm-up steps. Peak tensor memory: the running sum of torch's CPU allocations "
        "and frees during the step, recorded by torch.profiler with profile_memory, at its maximum (the step's "
        f"extra tensor bytes over what existed before it; {repeats} repeats per variant, taking turns). "
        + _rss_setup(settings.rss_processes)
    )
    ratios = [top / bottom for top, bottom in zip(peaks["hookadapt"], peaks["peft"], strict=True)]
    ratio = summarize(ratios)
    ratio["kind"] = "ratio"
    result = {
        "title": "7a. Peak memory of a LoRA training step",
        "setup": setup,
        "notes": failures,
        "unit": "MiB of tensors",
        "scale": 1 / MIB,
        "variants": {name: summarize([value / MIB for value in values]) for name, values in peaks.items()},
        "comparisons": {"hookadapt / peft": ratio},
        "tables": [_rss_table(rss)],
        "bars": [bar("Peak tensor memory of a LoRA step: hookadapt / PEFT", ratio["median"], 1.0)],
        "raw": {"tensor_peak_bytes": peaks, "rss": rss},
        "count_label": "repeats",
    }
    return result


def randomize_lora_b(model: nn.Module, seed: int = 0) -> None:
    """Set every LoRA B matrix to small random values, as after training, so checkpoints hold real data."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)


def _raw_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()}


def _size_rows(folder: Path, base: nn.Module) -> tuple[list[list[str]], list[dict[str, Any]], dict[str, Any]]:
    """Save one checkpoint of each kind into ``folder``; return the size table rows, bars and raw sizes."""
    rows, bars, sizes = [], [], {}
    for label, config in (("hookadapt LoRA", LORA_CONFIG), ("hookadapt bottleneck", BOTTLENECK_CONFIG)):
        variant = hookadapt_variant(copy.deepcopy(base), config)
        randomize_lora_b(variant.model)
        path = hookadapt.save_adapters(variant.adapter_set, folder / f"{label.replace(' ', '_')}.safetensors")
        file_bytes, raw = path.stat().st_size, _raw_bytes(variant.adapter_set.state_dict())
        sizes[label] = {"file_bytes": file_bytes, "raw_tensor_bytes": raw}
        rows.append([label, f"{file_bytes:,}", f"{raw:,}", f"{file_bytes - raw:,}"])
        bars.append(bar(f"Checkpoint bytes − raw tensor bytes, {label}", file_bytes - raw, CHECKPOINT_SLACK_BYTES, unit="bytes"))

    peft_variant = peft_lora_variant(copy.deepcopy(base))
    randomize_lora_b(peft_variant.model)
    peft_folder = folder / "peft_lora"
    peft_variant.model.save_pretrained(peft_folder)
    files = _folder_bytes(peft_folder)
    tensors = {name: value for name, value in peft_variant.model.named_parameters() if value.requires_grad}
    raw = _raw_bytes(tensors)
    weights = files.get("adapter_model.safetensors", 0)
    sizes["PEFT LoRA"] = {"files": files, "raw_tensor_bytes": raw}
    rows.append(["PEFT LoRA, adapter_model.safetensors", f"{weights:,}", f"{raw:,}", f"{weights - raw:,}"])
    rows.append(["PEFT LoRA, whole folder (" + ", ".join(files) + ")", f"{sum(files.values()):,}", f"{raw:,}", f"{sum(files.values()) - raw:,}"])
    return rows, bars, sizes


def _save_load_samples(folder: Path, base: nn.Module, settings: Settings) -> dict[str, list[float]]:
    """Time saving and loading the LoRA adapters with hookadapt and PEFT, interleaved.

    Every load goes into a fresh copy of the encoder, made untimed before it.
    """
    import peft

    hooked = hookadapt_variant(copy.deepcopy(base), LORA_CONFIG)
    wrapped = peft_lora_variant(copy.deepcopy(base))
    randomize_lora_b(hooked.model)
    randomize_lora_b(wrapped.model)
    hookadapt_path, peft_path = folder / "timed.safetensors", folder / "timed_peft"
    targets: dict[str, nn.Module] = {}

    def fresh_target(name: str) -> None:
        targets[name] = copy.deepcopy(base)

    operations = {
        "hookadapt save": lambda: hookadapt.save_adapters(hooked.adapter_set, hookadapt_path),
        "peft save": lambda: wrapped.model.save_pretrained(peft_path),
        "hookadapt load": lambda: hookadapt.load_adapters(targets["hookadapt"], hookadapt_path),
        "peft load": lambda: peft.PeftModel.from_pretrained(targets["peft"], peft_path),
    }
    prepare = {
        "hookadapt load": lambda: fresh_target("hookadapt"),
        "peft load": lambda: fresh_target("peft"),
    }
    # The warm-up round writes the files that the first timed loads read.
    return interleave(
        operations,
        rounds=settings.checkpoint_rounds,
        warmup_rounds=max(1, settings.warmup_rounds),
        max_seconds=settings.other_seconds,
        prepare=prepare,
    )


def run_checkpoints(base: nn.Module, settings: Settings) -> dict[str, Any]:
    """Measure checkpoint sizes and the time to save and load LoRA adapters with hookadapt and PEFT."""
    with tempfile.TemporaryDirectory(prefix="hookadapt-bench-") as name:
        folder = Path(name)
        rows, bars, sizes = _size_rows(folder, base)
        samples = _save_load_samples(folder, base, settings)

    setup = (
        "Checkpoints of LoRA r=8 on query and value (hookadapt `save_adapters`, one safetensors file; PEFT "
        "`save_pretrained`, a folder) and of the bottleneck adapters of case 2 (hookadapt only), LoRA B set to "
        "small random values. Raw tensor bytes = the sum of numel × element size of the saved tensors. Save and "
        "load times: `save_adapters` / `load_adapters` against `save_pretrained` / `PeftModel.from_pretrained`, "
        "each load into a fresh copy of MiniLM-L6 (the copy is made untimed), all four interleaved, "
        f"{len(samples['hookadapt save'])} rounds."
    )
    result = timing_case(
        "7b. Checkpoint size, save and load",
        setup,
        samples,
        unit="ms per operation",
        scale=MILLISECONDS,
        ratios=[("hookadapt save", "peft save"), ("hookadapt load", "peft load")],
    )
    result["tables"] = [
        {
            "title": "Checkpoint sizes (bytes)",
            "header": ["checkpoint", "file bytes", "raw tensor bytes", "file − raw"],
            "rows": rows,
        }
    ]
    result["bars"] = bars
    result["sizes"] = sizes
    return result
