"""Tests of the adapter networks: start values, hand-computed outputs and structure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hookadapt import LinearAdapter, LoRA, Scale

# Activation name, its module type and the function the forward must apply.
ACTIVATIONS = [
    ("identity", nn.Identity, lambda x: x),
    ("relu", nn.ReLU, torch.relu),
    ("gelu", nn.GELU, F.gelu),
    ("swish", nn.SiLU, F.silu),
    ("silu", nn.SiLU, F.silu),
    ("hardtanh", nn.Hardtanh, F.hardtanh),
    ("selu", nn.SELU, F.selu),
]
ACTIVATION_NAMES = [name for name, _, _ in ACTIVATIONS]


def randomize(module: nn.Module) -> None:
    """Fill every parameter with normal noise, so no layer starts at zero."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_()


class TestLinearAdapter:
    @pytest.mark.parametrize("norm_position", ["pre", "post"])
    @pytest.mark.parametrize("activation", ACTIVATION_NAMES)
    def test_starts_at_zero(self, activation: str, norm_position: str) -> None:
        torch.manual_seed(0)
        network = LinearAdapter(5, 7, dim=3, activation=activation, norm_position=norm_position)
        result = network(torch.randn(4, 5) * 10)
        assert torch.equal(result, torch.zeros(4, 7))

    @pytest.mark.parametrize(("activation", "module_type", "function"), ACTIVATIONS, ids=ACTIVATION_NAMES)
    def test_activation_module(self, activation: str, module_type: type, function) -> None:
        network = LinearAdapter(4, 4, dim=2, activation=activation)
        assert type(network.activation) is module_type

    @pytest.mark.parametrize(("activation", "module_type", "function"), ACTIVATIONS, ids=ACTIVATION_NAMES)
    def test_pre_norm_by_hand(self, activation: str, module_type: type, function) -> None:
        """Pre-norm computes up(act(down(layer_norm(x))))."""
        torch.manual_seed(1)
        network = LinearAdapter(5, 6, dim=3, activation=activation, norm_position="pre")
        randomize(network)
        x = torch.randn(2, 4, 5)
        normed = F.layer_norm(x, (5,), network.norm.weight, network.norm.bias, network.norm.eps)
        expected = function(normed @ network.down.weight.T) @ network.up.weight.T
        assert torch.allclose(network(x), expected, atol=1e-5)

    @pytest.mark.parametrize(("activation", "module_type", "function"), ACTIVATIONS, ids=ACTIVATION_NAMES)
    def test_post_norm_by_hand(self, activation: str, module_type: type, function) -> None:
        """Post-norm computes layer_norm(up(act(down(x))))."""
        torch.manual_seed(2)
        network = LinearAdapter(5, 6, dim=3, activation=activation, norm_position="post")
        randomize(network)
        x = torch.randn(2, 4, 5)
        hidden = function(x @ network.down.weight.T) @ network.up.weight.T
        expected = F.layer_norm(hidden, (6,), network.norm.weight, network.norm.bias, network.norm.eps)
        assert torch.allclose(network(x), expected, atol=1e-5)

    @pytest.mark.parametrize(("norm_position", "size"), [("pre", 5), ("post", 7)])
    def test_norm_size(self, norm_position: str, size: int) -> None:
        """The LayerNorm normalizes the input for pre-norm and the output for post-norm."""
        network = LinearAdapter(5, 7, dim=3, norm_position=norm_position)
        assert network.norm.normalized_shape == (size,)

    @pytest.mark.parametrize("layer", ["down", "up"])
    def test_no_bias(self, layer: str) -> None:
        network = LinearAdapter(5, 7, dim=3)
        assert getattr(network, layer).bias is None

    @pytest.mark.parametrize(("layer", "shape"), [("down", (3, 5)), ("up", (7, 3))])
    def test_layer_shapes(self, layer: str, shape: tuple[int, int]) -> None:
        network = LinearAdapter(5, 7, dim=3)
        assert tuple(getattr(network, layer).weight.shape) == shape

    def test_pre_zeroes_up(self) -> None:
        network = LinearAdapter(5, 7, dim=3, norm_position="pre")
        assert torch.count_nonzero(network.up.weight) == 0

    def test_pre_keeps_norm_identity(self) -> None:
        """Pre-norm leaves the LayerNorm at its usual start: weight one, bias zero."""
        network = LinearAdapter(5, 7, dim=3, norm_position="pre")
        assert torch.equal(network.norm.weight.detach(), torch.ones(5))
        assert torch.equal(network.norm.bias.detach(), torch.zeros(5))

    @pytest.mark.parametrize("tensor", ["weight", "bias"])
    def test_post_zeroes_norm(self, tensor: str) -> None:
        network = LinearAdapter(5, 7, dim=3, norm_position="post")
        assert torch.count_nonzero(getattr(network.norm, tensor)) == 0

    def test_post_keeps_down_up(self) -> None:
        """Post-norm starts at zero through the norm, so down and up are not zero."""
        torch.manual_seed(3)
        network = LinearAdapter(5, 7, dim=3, norm_position="post")
        assert torch.count_nonzero(network.down.weight) > 0
        assert torch.count_nonzero(network.up.weight) > 0

    def test_dropout_module(self) -> None:
        network = LinearAdapter(5, 7, dim=3, dropout=0.25)
        assert network.dropout.p == 0.25

    def test_dropout_on_output(self) -> None:
        """In training, each output element is either dropped or the eval value scaled by 1/(1-p)."""
        torch.manual_seed(4)
        network = LinearAdapter(5, 7, dim=3, activation="identity", dropout=0.5)
        randomize(network)
        x = torch.randn(64, 5)
        network.eval()
        reference = network(x)
        network.train()
        result = network(x)
        kept_mask = result != 0
        assert torch.allclose(result[kept_mask], 2.0 * reference[kept_mask])
        assert 0 < int(kept_mask.sum()) < kept_mask.numel()

    def test_dropout_off_in_eval(self) -> None:
        torch.manual_seed(5)
        network = LinearAdapter(5, 7, dim=3, dropout=0.5)
        randomize(network)
        network.eval()
        x = torch.randn(8, 5)
        assert torch.equal(network(x), network(x))

    def test_default_options(self) -> None:
        network = LinearAdapter(5, 7)
        assert (network.down.out_features, type(network.activation), network.norm_position) == (64, nn.SiLU, "pre")


class TestLoRA:
    def test_starts_at_zero(self) -> None:
        torch.manual_seed(0)
        network = LoRA(6, 5, rank=2, alpha=4)
        assert torch.equal(network(torch.randn(3, 6) * 10), torch.zeros(3, 5))

    def test_b_starts_at_zero(self) -> None:
        network = LoRA(6, 5, rank=2)
        assert torch.count_nonzero(network.lora_B.weight) == 0

    def test_lora_a_kaiming_uniform(self) -> None:
        """A starts like nn.Linear's weight: uniform within 1/sqrt(in_features), not zero."""
        torch.manual_seed(1)
        network = LoRA(64, 5, rank=16)
        weight = network.lora_A.weight.detach()
        assert float(weight.abs().max()) <= 1 / math.sqrt(64)
        assert float(weight.abs().max()) > 0.5 / math.sqrt(64)

    @pytest.mark.parametrize("layer", ["lora_A", "lora_B"])
    def test_no_bias(self, layer: str) -> None:
        network = LoRA(6, 5, rank=2)
        assert getattr(network, layer).bias is None

    @pytest.mark.parametrize(("layer", "shape"), [("lora_A", (3, 6)), ("lora_B", (5, 3))])
    def test_layer_shapes(self, layer: str, shape: tuple[int, int]) -> None:
        network = LoRA(6, 5, rank=3)
        assert tuple(getattr(network, layer).weight.shape) == shape

    @pytest.mark.parametrize(
        ("rank", "alpha", "use_rslora", "scaling"),
        [
            (2, 4, False, 2.0),
            (8, 8, False, 1.0),
            (4, 1, False, 0.25),
            (4, 8, True, 4.0),
            (9, 6, True, 2.0),
            (2, 3, True, 3 / math.sqrt(2)),
        ],
    )
    def test_output_by_hand(self, rank: int, alpha: float, use_rslora: bool, scaling: float) -> None:
        """The output is B(A(x)) times alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        torch.manual_seed(2)
        network = LoRA(6, 5, rank=rank, alpha=alpha, use_rslora=use_rslora)
        randomize(network)
        x = torch.randn(2, 3, 6)
        expected = (x @ network.lora_A.weight.T @ network.lora_B.weight.T) * scaling
        assert torch.allclose(network(x), expected, atol=1e-5)

    def test_dropout_on_input(self) -> None:
        """Training output equals the eval output on the same dropout mask applied to x."""
        torch.manual_seed(3)
        network = LoRA(6, 5, rank=2, alpha=2, dropout=0.5)
        randomize(network)
        x = torch.randn(8, 6)
        network.train()
        torch.manual_seed(4)
        result = network(x)
        torch.manual_seed(4)
        mask = F.dropout(torch.ones_like(x), p=0.5, training=True)
        network.eval()
        assert torch.allclose(result, network(x * mask), atol=1e-5)

    def test_dropout_off_in_eval(self) -> None:
        network = LoRA(6, 5, rank=2, dropout=0.5)
        randomize(network)
        network.eval()
        x = torch.randn(4, 6)
        assert torch.equal(network(x), network(x))


class TestScale:
    def test_starts_at_one(self) -> None:
        network = Scale(4, 6)
        assert torch.equal(network.weight.detach(), torch.ones(6))

    def test_init_option(self) -> None:
        network = Scale(4, 6, init=0.5)
        assert torch.equal(network.weight.detach(), torch.full((6,), 0.5))

    def test_returns_its_vector(self) -> None:
        network = Scale(4, 6)
        assert network(torch.randn(3, 4)) is network.weight

    def test_vector_trainable(self) -> None:
        network = Scale(4, 6)
        assert network.weight.requires_grad

    def test_broadcasts_over_features(self) -> None:
        """The vector multiplies the last dimension of a host tensor."""
        network = Scale(3, 3)
        with torch.no_grad():
            network.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        x = torch.ones(2, 4, 3)
        assert torch.equal(x * network(x), torch.tensor([1.0, 2.0, 3.0]).expand(2, 4, 3))
