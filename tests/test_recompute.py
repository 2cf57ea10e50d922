"""Detaching while gradient checkpointing still has to recompute a forward."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import hookadapt
from hookadapt.errors import AttachError

CONFIG = {"a": {"target": "0", "network": {"kind": "lora", "rank": 2}, "insertion": "parallel"}}
REENTRANT = pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])


def block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))


@REENTRANT
def test_exit_before_backward_raises(reentrant: bool) -> None:
    model = block()
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(AttachError, match="wait for backward"):
        with hookadapt.adapters(model, CONFIG):
            output = checkpoint(model, x, use_reentrant=reentrant)
    assert hookadapt.attached(model)
    output.sum().backward()
    hookadapt.detach_all(model)


@REENTRANT
def test_detach_after_backward(reentrant: bool) -> None:
    model = block()
    x = torch.randn(3, 4, requires_grad=True)
    with hookadapt.adapters(model, CONFIG) as adapter_set:
        checkpoint(model, x, use_reentrant=reentrant).sum().backward()
    assert not adapter_set.is_attached


@REENTRANT
def test_detach_after_backward_graph_alive(reentrant: bool) -> None:
    # The L2 term keeps the checkpointed graph alive after backward, so only the
    # recomputation itself can clear the pending forward.
    model = block()
    x = torch.randn(3, 4, requires_grad=True)
    config = {"a": {**CONFIG["a"], "strategy": {"kind": "residual_add", "l2_lambda": 0.5}}}
    with hookadapt.adapters(model, config) as adapter_set:
        output = checkpoint(model, x, use_reentrant=reentrant)
        output.sum().backward()
        penalty = adapter_set.auxiliary_loss()
    assert not adapter_set.is_attached
    assert penalty.dim() == 0


@REENTRANT
def test_dropped_forward_allows_detach(reentrant: bool) -> None:
    model = block()
    x = torch.randn(3, 4, requires_grad=True)
    with hookadapt.adapters(model, CONFIG) as adapter_set:
        output = checkpoint(model, x, use_reentrant=reentrant)
        del output
        gc.collect()
    assert not adapter_set.is_attached


@REENTRANT
def test_checkpoint_gradients_match(reentrant: bool) -> None:
    model = block()
    x = torch.randn(3, 4, requires_grad=True)
    with hookadapt.adapters(model, CONFIG) as adapter_set:
        with torch.no_grad():
            for param in adapter_set.parameters():
                param.normal_()
        model(x).square().sum().backward()
        expected = [param.grad.clone() for param in adapter_set.parameters()]
        for param in adapter_set.parameters():
            param.grad = None
        checkpoint(model, x, use_reentrant=reentrant).square().sum().backward()
        for param, grad in zip(adapter_set.parameters(), expected, strict=True):
            torch.testing.assert_close(param.grad, grad)


def test_reentrant_without_input_grad_warns() -> None:
    model = block()
    x = torch.randn(3, 4)
    with hookadapt.adapters(model, CONFIG):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = checkpoint(model, x, use_reentrant=True)
        assert any("enable_input_require_grads" in str(item.message) for item in caught)
        del output


def test_eval_no_grad_tracks_nothing() -> None:
    model = block().eval()
    with hookadapt.adapters(model, CONFIG) as adapter_set:
        with torch.no_grad():
            model(torch.randn(3, 4))
        assert len(adapter_set.pending_recompute) == 0


def test_reentrant_l2_warns() -> None:
    model = block()
    config = {"a": {**CONFIG["a"], "strategy": {"kind": "residual_add", "l2_lambda": 0.5}}}
    x = torch.randn(3, 4, requires_grad=True)
    with hookadapt.adapters(model, config) as adapter_set:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = checkpoint(model, x, use_reentrant=True)
        assert any("penalty has no effect" in str(item.message) for item in caught)
        output.sum().backward()
        adapter_set.auxiliary_loss()


def test_pending_message_names_l2_release() -> None:
    model = block()
    config = {"a": {**CONFIG["a"], "strategy": {"kind": "residual_add", "l2_lambda": 0.5}}}
    x = torch.randn(3, 4, requires_grad=True)
    adapter_set = hookadapt.attach(model, config)
    output = checkpoint(model, x, use_reentrant=False)
    del output
    gc.collect()
    with pytest.raises(AttachError, match=r"auxiliary_loss\(\)"):
        adapter_set.detach()
    adapter_set.auxiliary_loss()
    gc.collect()
    adapter_set.detach()
    assert not adapter_set.is_attached
