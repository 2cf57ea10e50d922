"""Interactive use: tables, summaries, re-running cells, detach_all and interrupted forwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hookadapt
from conftest import assert_restored, randomize, snapshot

LORA = {"kind": "lora", "rank": 2, "in_features": 4, "out_features": 4}


class Interruptible(nn.Module):
    """A Linear whose forward raises KeyboardInterrupt while ``interrupt`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.interrupt = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interrupt:
            raise KeyboardInterrupt
        return self.linear(x)


def toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


CONFIG = {
    "bottleneck": {"target": "0", "network": {"kind": "linear", "dim": 2}},
    "lora": {"target": "2", "insertion": "parallel", "network": {"kind": "lora", "rank": 2}},
}


class TestTables:
    def test_html_lists_every_site(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, CONFIG)
        table = adapter_set._repr_html_()
        adapter_set.detach()
        for text in ("<table>", "bottleneck", "lora", "parallel", "residual_add", "float32", "cpu"):
            assert text in table, f"the HTML table lacks {text!r}"

    def test_html_escapes_text(self) -> None:
        """Text goes through html.escape, so a site path cannot inject markup."""

        class Odd(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.add_module("x<b>", nn.Linear(4, 4))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return getattr(self, "x<b>")(x)

        model = Odd()
        adapter_set = hookadapt.attach(model, {"a": {"target": "x<b>", "network": "linear"}})
        table = adapter_set._repr_html_()
        adapter_set.detach()
        assert "x&lt;b&gt;" in table
        assert "x<b>" not in table

    def test_text_repr_same_columns(self) -> None:
        model = toy()
        adapter_set = hookadapt.attach(model, CONFIG)
        text = repr(adapter_set)
        adapter_set.detach()
        for column in ("adapter", "site", "insertion", "network", "strategy", "params", "trainable", "enabled", "dtype", "device"):
            assert column in text, f"the text table lacks column {column!r}"

    def test_summary_counts(self) -> None:
        model = toy()
        base = sum(param.numel() for param in model.parameters())
        adapter_set = hookadapt.attach(model, CONFIG)
        totals = adapter_set.summary()
        expected = {name: sum(p.numel() for a in adapter_set.adapters[name].values() for p in a.parameters()) for name in CONFIG}
        adapter_set.detach()
        assert totals["per_adapter"] == expected
        assert totals["adapter_parameters"] == sum(expected.values())
        assert totals["base_parameters"] == base
        assert totals["adapter_share"] == pytest.approx(sum(expected.values()) / base)


class TestRerunningCells:
    def test_reattach_same_name_raises(self) -> None:
        model = toy()
        first = hookadapt.attach(model, CONFIG)
        with pytest.raises(hookadapt.AttachError, match="replace=True"):
            hookadapt.attach(model, CONFIG)
        first.detach()

    def test_replace_detaches_old_set(self) -> None:
        model = toy()
        before = snapshot(model)
        first = hookadapt.attach(model, CONFIG)
        second = hookadapt.attach(model, CONFIG, replace=True)
        listed = hookadapt.attached(model)
        second.detach()
        assert not first.is_attached
        assert listed == [second]
        assert_restored(model, before)

    def test_failed_replace_keeps_old(self) -> None:
        """A replacing config that fails its checks leaves the old set attached."""
        model = toy()
        first = hookadapt.attach(model, CONFIG)
        with pytest.raises(hookadapt.TargetError):
            hookadapt.attach(model, {"bottleneck": {"target": "missing", "network": "linear"}}, replace=True)
        assert first.is_attached
        first.detach()

    def test_detach_all_restores_model(self) -> None:
        model = toy()
        before = snapshot(model)
        outer = hookadapt.attach(model, CONFIG, freeze_base=True)
        randomize(outer)
        hookadapt.attach(model, {"inner": {"target": "2", "network": "scale", "strategy": "multiply"}})
        count = hookadapt.detach_all(model)
        assert count == 2
        assert hookadapt.attached(model) == []
        assert_restored(model, before)

    def test_detach_all_lost_variable(self) -> None:
        """Sets whose variable was dropped are still found and detached."""
        model = toy()
        before = snapshot(model)
        hookadapt.attach(model, CONFIG)
        assert len(hookadapt.attached(model)) == 1
        hookadapt.detach_all(model)
        assert_restored(model, before)


class TestInterrupt:
    def test_interrupt_leaves_no_state(self) -> None:
        """After a KeyboardInterrupt in forward, the next forward is correct and no per-call state stays."""
        model = nn.Sequential(Interruptible())
        adapter_set = hookadapt.attach(model, {"a": {"target": "0", "insertion": "parallel", "network": LORA}})
        randomize(adapter_set)
        x = torch.randn(3, 4)
        expected = model(x)
        model[0].interrupt = True
        with pytest.raises(KeyboardInterrupt):
            model(x)
        model[0].interrupt = False
        output = model(x)
        site = adapter_set.sites[0]
        assert torch.equal(output, expected)
        assert site._stack() == []
        adapter_set.detach()

    def test_recursion_keeps_outer_state(self) -> None:
        """A host that calls itself keeps each call's parallel input apart."""

        class Recursive(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = nn.Linear(4, 4)

            def forward(self, x: torch.Tensor, depth: int = 2) -> torch.Tensor:
                return self.linear(x) if depth == 0 else self(x * 2, depth=depth - 1) + 1

        model = Recursive()
        adapter_set = hookadapt.attach(model, {"a": {"target": "", "insertion": "parallel", "network": LORA}})
        randomize(adapter_set)
        network = adapter_set.adapters["a"][""].network
        x = torch.randn(3, 4)

        def by_hand(value: torch.Tensor, depth: int = 2) -> torch.Tensor:
            result = model.linear(value) if depth == 0 else by_hand(value * 2, depth - 1) + 1
            return result + network(value)

        output = model(x)
        expected = by_hand(x)
        adapter_set.detach()
        assert torch.allclose(output, expected, atol=1e-6)


def test_repr_after_model_collected() -> None:
    """The text table still prints when the model was dropped and collected."""
    adapter_set = hookadapt.attach(toy(), CONFIG)
    assert "model no longer exists" in repr(adapter_set)
