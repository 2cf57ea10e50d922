"""The demo pipeline and the command line, run against the real model and review data."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import hookadapt
from hookadapt import demo

REPOSITORY = Path(__file__).resolve().parent.parent
TOY_CONFIG = {"first": {"target": "0", "network": {"kind": "linear", "dim": 4}}}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m hookadapt ARGS`` with this interpreter and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "hookadapt", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPOSITORY)},
    )


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["linear", "lora"])
def test_demo_runs_small_budget(adapter: str, tmp_path: Path) -> None:
    """The demo trains two steps, saves, reloads and reports bitwise-equal logits."""
    output = tmp_path / "out" / "adapters.safetensors"
    args = argparse.Namespace(
        adapter=adapter,
        epochs=2,
        batch_size=32,
        lr=1e-3,
        output=output,
        max_steps=2,
        limit=64,
    )
    lines: list[str] = []

    figures = demo.run(args, log=lines.append)

    assert figures["logits_equal"] is True, "the reloaded logits differ"
    assert figures["steps"] == 2, "the demo did not stop after two steps"
    assert output.is_file(), "the checkpoint was not written"
    assert figures["checkpoint_bytes"] == output.stat().st_size, "the reported size is not the file's"
    assert any("bitwise equal" in line for line in lines), "the log does not report the comparison"
    assert 0 < figures["trainable_parameters"] < figures["total_parameters"], "trainable count is implausible"


def test_demo_help_exits_zero(tmp_path: Path) -> None:
    """``python -m hookadapt demo --help`` prints the demo's options."""
    result = run_cli("demo", "--help", cwd=tmp_path)

    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr}"
    for option in ("--adapter", "--max-steps", "--limit", "--output"):
        assert option in result.stdout, f"the help does not mention {option}"


def test_inspect_prints_checkpoint(tmp_path: Path) -> None:
    """``python -m hookadapt inspect FILE`` prints the version, config and tensors."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    path = tmp_path / "adapters.safetensors"
    with hookadapt.adapters(model, TOY_CONFIG) as adapter_set:
        hookadapt.save_adapters(adapter_set, path)
        keys = list(adapter_set.state_dict())

    result = run_cli("inspect", str(path), cwd=tmp_path)

    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr}"
    assert str(path) in result.stdout, "the output does not name the file"
    assert f"written by hookadapt {hookadapt.__version__}" in result.stdout, "the version is missing"
    assert '"first"' in result.stdout, "the config is missing"
    for key in keys:
        assert key in result.stdout, f"tensor {key} is not listed"


@pytest.mark.parametrize(
    "contents",
    [b"not a safetensors file at all", None],
    ids=["text", "missing"],
)
def test_inspect_bad_file_fails(tmp_path: Path, contents: bytes | None) -> None:
    """``inspect`` on a bad or missing file exits non-zero with a message naming the file."""
    path = tmp_path / "bad.safetensors"
    if contents is not None:
        path.write_bytes(contents)

    result = run_cli("inspect", str(path), cwd=tmp_path)

    assert result.returncode != 0, "inspect succeeded on a bad file"
    assert str(path) in result.stderr, "the message does not name the file"
    assert "Traceback" not in result.stderr, "inspect crashed instead of reporting the error"
