"""Tests of the composition strategies, stochastic depth and the L2 auxiliary loss."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import hookadapt
from hookadapt import Multiply, ResidualAdd, ReturnResult, ScaledAdd

X = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.5]])
OUT = torch.tensor([[0.25, 1.0, -1.0], [2.0, -0.5, 4.0]])


class Block(nn.Module):
    """A linear layer inside a module, so adapters on it follow the block's mode."""

    def __init__(self, features: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class TestHandValues:
    @pytest.mark.parametrize(
        ("strategy", "expected"),
        [
            (ResidualAdd(3), [[1.25, -1.0, 2.0], [2.5, -0.5, 2.5]]),
            (ReturnResult(3), [[0.25, 1.0, -1.0], [2.0, -0.5, 4.0]]),
            (ScaledAdd(3, scale=0.5), [[1.125, -1.5, 2.5], [1.5, -0.25, 0.5]]),
            (ScaledAdd(3), [[1.25, -1.0, 2.0], [2.5, -0.5, 2.5]]),
            (ScaledAdd(3, scale=-2), [[0.5, -4.0, 5.0], [-3.5, 1.0, -9.5]]),
            (Multiply(3), [[0.25, -2.0, -3.0], [1.0, 0.0, -6.0]]),
        ],
        ids=["residual_add", "return_result", "scaled_add-half", "scaled_add-default", "scaled_add-negative", "multiply"],
    )
    def test_strategy_value(self, strategy: nn.Module, expected: list) -> None:
        assert torch.equal(strategy(X, OUT), torch.tensor(expected))

    def test_multiply_broadcasts_vector(self) -> None:
        assert torch.equal(Multiply(3)(X, torch.tensor([2.0, 0.0, -1.0])), torch.tensor([[2.0, 0.0, -3.0], [1.0, 0.0, 1.5]]))

    @pytest.mark.parametrize(
        "strategy",
        [ResidualAdd(3, stochastic_depth=0.5, l2_lambda=0.1).eval(), ResidualAdd(3, stochastic_depth=0.0, l2_lambda=0.1)],
        ids=["eval-with-depth", "train-without-depth"],
    )
    def test_residual_add_plain(self, strategy: ResidualAdd) -> None:
        """Without stochastic depth in effect, residual_add is exactly x + out."""
        assert torch.equal(strategy(X, OUT), X + OUT)

    def test_return_result_is_out(self) -> None:
        assert ReturnResult(3)(X, OUT) is OUT


class TestStochasticDepth:
    @pytest.mark.parametrize("mode", ["batch", "sample"])
    def test_p_one_returns_x(self, mode: str) -> None:
        strategy = ResidualAdd(3, stochastic_depth=1.0, stochastic_depth_mode=mode).train()
        assert torch.equal(strategy(X, OUT), X)

    @pytest.mark.parametrize("mode", ["batch", "sample"])
    def test_p_one_keeps_graph(self, mode: str) -> None:
        """A dropped adapter still gets a gradient: a zero tensor, not None."""
        strategy = ResidualAdd(3, stochastic_depth=1.0, stochastic_depth_mode=mode).train()
        out = OUT.clone().requires_grad_(True)
        strategy(X, out).sum().backward()
        assert out.grad is not None
        assert torch.equal(out.grad, torch.zeros_like(out))

    def test_p_one_network_grad_zero(self) -> None:
        """Through attach, every network parameter of a dropped adapter has a zero gradient."""
        model = Block()
        config = {
            "ad": {
                "target": "fc",
                "network": {"kind": "linear", "dim": 2},
                "strategy": {"kind": "residual_add", "stochastic_depth": 1.0},
            }
        }
        x = torch.randn(4, 3)
        expected = model(x).detach()
        with hookadapt.adapters(model, config, freeze_base=True) as adapter_set:
            with torch.no_grad():
                adapter_set.adapters["ad"]["fc"].network.up.weight.normal_()
            result = model(x)
            result.sum().backward()
            grads = {name: param.grad for name, param in adapter_set.named_parameters()}
        assert torch.equal(result, expected)
        for name, grad in grads.items():
            assert grad is not None, name
            assert torch.count_nonzero(grad) == 0, name

    def test_batch_draw_all_or_nothing(self) -> None:
        """Per batch, p = 0.5 gives x or x + 2 * out for the whole batch, and both occur."""
        torch.manual_seed(0)
        strategy = ResidualAdd(3, stochastic_depth=0.5).train()
        x = torch.randn(8, 5)
        out = torch.randn(8, 5)
        kept_result = x + out / 0.5
        outcomes = set()
        for _ in range(40):
            result = strategy(x, out)
            if torch.equal(result, x):
                outcomes.add("dropped")
            elif torch.equal(result, kept_result):
                outcomes.add("kept")
            else:
                outcomes.add("mixed")
        assert outcomes == {"dropped", "kept"}

    def test_sample_draw_per_row(self) -> None:
        """Per sample, every row is x or x + 2 * out on its own, and rows differ within a batch."""
        torch.manual_seed(1)
        strategy = ResidualAdd(3, stochastic_depth=0.5, stochastic_depth_mode="sample").train()
        x = torch.randn(16, 3, 5)
        out = torch.randn(16, 3, 5)
        kept_result = x + out / 0.5
        mixed_batches = 0
        for _ in range(10):
            result = strategy(x, out)
            rows_dropped = [torch.equal(result[i], x[i]) for i in range(16)]
            rows_kept = [torch.equal(result[i], kept_result[i]) for i in range(16)]
            assert all(dropped or keep for dropped, keep in zip(rows_dropped, rows_kept))
            if any(rows_dropped) and any(rows_kept):
                mixed_batches += 1
        assert mixed_batches == 10

    def test_draw_rate_near_half(self) -> None:
        torch.manual_seed(2)
        strategy = ResidualAdd(3, stochastic_depth=0.5, stochastic_depth_mode="sample").train()
        result = strategy(torch.zeros(4000, 1), torch.ones(4000, 1))
        assert 0.45 < float((result == 0).float().mean()) < 0.55

    @pytest.mark.parametrize("mode", ["batch", "sample"])
    def test_p_zero_unchanged(self, mode: str) -> None:
        strategy = ResidualAdd(3, stochastic_depth=0.0, stochastic_depth_mode=mode).train()
        assert torch.equal(strategy(X, OUT), X + OUT)

    @pytest.mark.parametrize("mode", ["batch", "sample"])
    def test_eval_ignores_depth(self, mode: str) -> None:
        strategy = ResidualAdd(3, stochastic_depth=1.0, stochastic_depth_mode=mode).eval()
        assert torch.equal(strategy(X, OUT), X + OUT)


class TestEvalDeterminism:
    def config(self) -> dict:
        return {
            "ad": {
                "target": "fc",
                "network": {"kind": "linear", "dim": 4, "dropout": 0.5},
                "strategy": {"kind": "residual_add", "stochastic_depth": 0.5, "stochastic_depth_mode": "sample"},
            }
        }

    def test_eval_runs_equal(self) -> None:
        torch.manual_seed(3)
        model = Block(6)
        x = torch.randn(32, 6)
        with hookadapt.adapters(model, self.config()) as adapter_set:
            with torch.no_grad():
                adapter_set.adapters["ad"]["fc"].network.up.weight.normal_()
            model.eval()
            first = model(x)
            second = model(x)
        assert torch.equal(first, second)

    def test_eval_matches_plain_sum(self) -> None:
        """In eval mode the result is fc(x) + network(x), with no dropout and no depth draw."""
        torch.manual_seed(4)
        model = Block(6)
        x = torch.randn(32, 6)
        with hookadapt.adapters(model, self.config()) as adapter_set:
            network = adapter_set.adapters["ad"]["fc"].network
            with torch.no_grad():
                network.up.weight.normal_()
            model.eval()
            result = model(x)
            with torch.no_grad():
                expected = model.fc.forward(x)
        network.eval()
        assert torch.allclose(result, expected + network(expected), atol=1e-6)

    def test_training_runs_differ(self) -> None:
        """In training mode, dropout and stochastic depth make two runs differ."""
        torch.manual_seed(5)
        model = Block(6)
        x = torch.randn(32, 6)
        with hookadapt.adapters(model, self.config()) as adapter_set:
            with torch.no_grad():
                adapter_set.adapters["ad"]["fc"].network.up.weight.normal_()
            model.train()
            first = model(x)
            second = model(x)
        assert not torch.equal(first, second)

    def test_eval_after_train_creation(self) -> None:
        """Adapters created while the model trains follow a later eval() of the host alone."""
        model = Block(6).train()
        with hookadapt.adapters(model, self.config()) as adapter_set:
            model.fc.eval()
            model(torch.randn(2, 6))
            adapter = adapter_set.adapters["ad"]["fc"]
            assert adapter.network.training is False
            assert adapter.strategy.training is False


def l2_config(l2_lambda: float) -> dict:
    return {
        "ad": {
            "target": "fc",
            "network": {"kind": "linear", "dim": 2},
            "strategy": {"kind": "residual_add", "l2_lambda": l2_lambda},
        }
    }


def attach_l2(model: nn.Module, l2_lambda: float) -> tuple[hookadapt.AdapterSet, nn.Module]:
    """Attach an L2-penalised adapter with a non-zero up projection; return the set and its network."""
    adapter_set = hookadapt.attach(model, l2_config(l2_lambda))
    network = adapter_set.adapters["ad"]["fc"].network
    with torch.no_grad():
        network.up.weight.normal_()
    return adapter_set, network


def hand_l2(l2_lambda: float, out: torch.Tensor) -> torch.Tensor:
    """Return l2_lambda times the batch mean of each sample's squared L2 norm."""
    per_sample = [float((row**2).sum()) for row in out]
    return torch.tensor(l2_lambda * sum(per_sample) / len(per_sample))


class TestL2Loss:
    @pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3)], ids=["2d", "3d"])
    def test_loss_by_hand(self, shape: tuple[int, ...]) -> None:
        torch.manual_seed(6)
        model = Block().train()
        x = torch.randn(*shape)
        adapter_set, network = attach_l2(model, 0.3)
        try:
            model(x)
            loss = adapter_set.auxiliary_loss()
            with torch.no_grad():
                out = network(model.fc.forward(x))
        finally:
            adapter_set.detach()
        assert torch.allclose(loss, hand_l2(0.3, out), rtol=1e-5)

    def test_loss_has_gradient(self) -> None:
        torch.manual_seed(7)
        model = Block().train()
        adapter_set, network = attach_l2(model, 0.1)
        try:
            model(torch.randn(4, 3))
            adapter_set.auxiliary_loss().backward()
        finally:
            adapter_set.detach()
        assert network.up.weight.grad is not None

    def test_sum_over_forwards(self) -> None:
        torch.manual_seed(8)
        model = Block().train()
        first_x, second_x = torch.randn(4, 3), torch.randn(2, 3)
        adapter_set, network = attach_l2(model, 0.5)
        try:
            model(first_x)
            model(second_x)
            loss = adapter_set.auxiliary_loss()
            with torch.no_grad():
                first = hand_l2(0.5, network(model.fc.forward(first_x)))
                second = hand_l2(0.5, network(model.fc.forward(second_x)))
        finally:
            adapter_set.detach()
        assert torch.allclose(loss, first + second, rtol=1e-5)

    def test_call_clears_terms(self) -> None:
        torch.manual_seed(9)
        model = Block().train()
        adapter_set, _ = attach_l2(model, 0.5)
        try:
            model(torch.randn(4, 3))
            adapter_set.auxiliary_loss()
            loss = adapter_set.auxiliary_loss()
        finally:
            adapter_set.detach()
        assert torch.equal(loss, torch.tensor(0.0))

    def test_not_recorded_in_eval(self) -> None:
        torch.manual_seed(10)
        model = Block().eval()
        adapter_set, _ = attach_l2(model, 0.5)
        try:
            model(torch.randn(4, 3))
            loss = adapter_set.auxiliary_loss()
        finally:
            adapter_set.detach()
        assert torch.equal(loss, torch.tensor(0.0))

    def test_not_recorded_without_lambda(self) -> None:
        torch.manual_seed(11)
        model = Block().train()
        adapter_set, _ = attach_l2(model, 0.0)
        try:
            model(torch.randn(4, 3))
            loss = adapter_set.auxiliary_loss()
        finally:
            adapter_set.detach()
        assert torch.equal(loss, torch.tensor(0.0))

    def test_loss_before_depth_drop(self) -> None:
        """The penalty uses the network output even when stochastic depth drops it."""
        torch.manual_seed(12)
        model = Block().train()
        config = l2_config(0.2)
        config["ad"]["strategy"]["stochastic_depth"] = 1.0
        x = torch.randn(4, 3)
        with hookadapt.adapters(model, config) as adapter_set:
            network = adapter_set.adapters["ad"]["fc"].network
            with torch.no_grad():
                network.up.weight.normal_()
            model(x)
            loss = adapter_set.auxiliary_loss()
            with torch.no_grad():
                out = network(model.fc.forward(x))
        assert torch.allclose(loss, hand_l2(0.2, out), rtol=1e-5)

    @pytest.mark.parametrize("use_reentrant", [False, True])
    def test_checkpoint_counts_once(self, use_reentrant: bool) -> None:
        """Recomputing a checkpointed host during backward records no second term."""
        torch.manual_seed(13)
        model = Block().train()
        x = torch.randn(4, 3, requires_grad=True)
        adapter_set, network = attach_l2(model, 0.5)
        try:
            result = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=use_reentrant)
            result.sum().backward()
            loss = adapter_set.auxiliary_loss()
            with torch.no_grad():
                out = network(model.fc.forward(x))
        finally:
            adapter_set.detach()
        assert torch.allclose(loss, hand_l2(0.5, out), rtol=1e-5)

    def test_standalone_strategy_records_nothing(self) -> None:
        """A strategy outside an adapter set has nowhere to record and still composes."""
        strategy = ResidualAdd(3, l2_lambda=1.0).train()
        assert torch.equal(strategy(X, OUT), X + OUT)
