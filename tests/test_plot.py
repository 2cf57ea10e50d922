"""Adapter contributions per site, their bar chart, and the demo's training curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

import hookadapt
from conftest import randomize
from hookadapt.demo import save_curve
from hookadapt.plot import contributions, plot_contributions


def toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


CONFIG = {
    "bottleneck": {"target": "0", "network": {"kind": "linear", "dim": 2}},
    "lora": {"target": "2", "insertion": "parallel", "network": {"kind": "lora", "rank": 2}},
}


def test_fresh_adapters_contribute_zero() -> None:
    model = toy()
    adapter_set = hookadapt.attach(model, CONFIG)
    values = contributions(adapter_set, torch.randn(5, 4))
    adapter_set.detach()
    assert values == {("bottleneck", "0"): 0.0, ("lora", "2"): 0.0}


def test_contribution_matches_hand_value() -> None:
    """The value is ||result - x|| / ||x|| at the host tensor the adapter received."""
    model = toy()
    adapter_set = hookadapt.attach(model, {"lora": CONFIG["lora"]})
    randomize(adapter_set)
    x = torch.randn(5, 4)
    values = contributions(adapter_set, x)
    with torch.no_grad():
        hidden = torch.relu(model[0](x))
        base = nn.functional.linear(hidden, model[2].weight, model[2].bias)
        change = adapter_set.adapters["lora"]["2"].network(hidden)
    adapter_set.detach()
    assert values[("lora", "2")] == pytest.approx((change.norm() / base.norm()).item(), rel=1e-5)


def test_contributions_leave_adapters_unpatched() -> None:
    model = toy()
    adapter_set = hookadapt.attach(model, CONFIG)
    contributions(adapter_set, torch.randn(2, 4))
    patched = [adapter for adapter in adapter_set.all_adapters() if "compose" in adapter.__dict__]
    adapter_set.detach()
    assert patched == []


def test_plot_has_one_bar_each() -> None:
    model = toy()
    adapter_set = hookadapt.attach(model, CONFIG)
    randomize(adapter_set)
    figure = plot_contributions(adapter_set, torch.randn(3, 4))
    adapter_set.detach()
    bars = [patch for patch in figure.axes[0].patches]
    assert len(bars) == 4  # two adapters, each drawn at both sites


def test_demo_curve_png(tmp_path: Path) -> None:
    path = tmp_path / "curve.png"
    save_curve([1.0, 0.8, 0.7, 0.5], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
