"""Tests of the network and strategy registries and of user-registered kinds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import hookadapt
from hookadapt import NETWORKS, STRATEGIES, ConfigError, Strategy, register_network, register_strategy


class Host(nn.Module):
    """One linear layer followed by a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


@pytest.fixture
def network_kind() -> Iterator[str]:
    """Yield a network kind name and unregister it afterwards, if a test registered it."""
    kind = "registry_test_network"
    yield kind
    if kind in NETWORKS.kinds():
        NETWORKS.unregister(kind)


@pytest.fixture
def strategy_kind() -> Iterator[str]:
    """Yield a strategy kind name and unregister it afterwards, if a test registered it."""
    kind = "registry_test_strategy"
    yield kind
    if kind in STRATEGIES.kinds():
        STRATEGIES.unregister(kind)


class TestRegister:
    def test_builtin_network_kinds(self) -> None:
        assert {"linear", "lora", "scale"} <= set(NETWORKS.kinds())

    def test_builtin_strategy_kinds(self) -> None:
        assert {"residual_add", "return_result", "scaled_add", "multiply"} <= set(STRATEGIES.kinds())

    def test_decorator_returns_class(self, network_kind: str) -> None:
        class Net(nn.Module):
            def __init__(self, in_features: int, out_features: int) -> None:
                super().__init__()

        assert register_network(network_kind)(Net) is Net

    def test_registered_class_found(self, network_kind: str) -> None:
        @register_network(network_kind)
        class Net(nn.Module):
            def __init__(self, in_features: int, out_features: int) -> None:
                super().__init__()

        assert NETWORKS.get(network_kind) is Net

    def test_kind_set_on_class(self, strategy_kind: str) -> None:
        @register_strategy(strategy_kind)
        class Keep(Strategy):
            def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                return x

        assert Keep.kind == strategy_kind

    def test_unregister_removes_kind(self, network_kind: str) -> None:
        @register_network(network_kind)
        class Net(nn.Module):
            def __init__(self, in_features: int, out_features: int) -> None:
                super().__init__()

        NETWORKS.unregister(network_kind)
        assert network_kind not in NETWORKS.kinds()

    def test_defaults_fill_options(self, network_kind: str) -> None:
        @register_network(network_kind)
        class Net(nn.Module):
            def __init__(self, in_features: int, out_features: int, *, width: int = 3, name: str = "a") -> None:
                super().__init__()

        options = NETWORKS.normalize(network_kind, {"width": 5}, adapter="ad")
        assert options == {"width": 5, "name": "a"}


class TestRegisterErrors:
    @pytest.mark.parametrize(
        ("registry", "kind"),
        [(NETWORKS, "linear"), (NETWORKS, "lora"), (STRATEGIES, "residual_add"), (STRATEGIES, "multiply")],
    )
    def test_duplicate_kind_raises(self, registry, kind: str) -> None:
        class Other(Strategy):
            pass

        with pytest.raises(ConfigError, match=f"kind '{kind}' is already registered"):
            registry.register(kind)(Other)

    def test_duplicate_keeps_first(self) -> None:
        """A rejected duplicate leaves the original class registered."""
        original = NETWORKS.get("lora")

        class Other(nn.Module):
            def __init__(self, in_features: int, out_features: int) -> None:
                super().__init__()

        with pytest.raises(ConfigError):
            register_network("lora")(Other)
        assert NETWORKS.get("lora") is original

    def test_user_duplicate_raises(self, strategy_kind: str) -> None:
        @register_strategy(strategy_kind)
        class First(Strategy):
            pass

        with pytest.raises(ConfigError, match="First"):

            @register_strategy(strategy_kind)
            class Second(Strategy):
                pass

    @pytest.mark.parametrize("kind", ["", None, 3])
    def test_kind_must_be_string(self, kind: object) -> None:
        with pytest.raises(ConfigError, match="kind must be a non-empty string"):
            register_network(kind)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("registry", "known"),
        [
            (NETWORKS, ["linear", "lora", "scale"]),
            (STRATEGIES, ["multiply", "residual_add", "return_result", "scaled_add"]),
        ],
        ids=["network", "strategy"],
    )
    def test_unknown_kind_lists_known(self, registry, known: list[str]) -> None:
        with pytest.raises(ConfigError) as info:
            registry.get("bogus", adapter="ad")
        for kind in known:
            assert kind in str(info.value)

    def test_unknown_kind_names_decorator(self) -> None:
        with pytest.raises(ConfigError, match=r"hookadapt\.register_strategy\('bogus'\)"):
            STRATEGIES.get("bogus")

    def test_unregister_unknown_raises(self) -> None:
        """An unknown kind raises ConfigError and never leaks a bare KeyError."""
        with pytest.raises(ConfigError):
            NETWORKS.unregister("bogus")


# Classes whose constructors the registry must reject.
class NoDefault(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, dim: int) -> None:
        super().__init__()


class PositionalOption(nn.Module):
    def __init__(self, in_features: int, out_features: int, dim: int = 4) -> None:
        super().__init__()


class PositionalNoDefault(nn.Module):
    def __init__(self, in_features: int, out_features: int, dim: int) -> None:
        super().__init__()


class RenamedSizes(nn.Module):
    def __init__(self, n_in: int, n_out: int, *, dim: int = 4) -> None:
        super().__init__()


class PositionalStrategy(Strategy):
    def __init__(self, features: int, scale: float = 1.0) -> None:
        super().__init__(features)


class NoDefaultStrategy(Strategy):
    def __init__(self, features: int, *, scale: float) -> None:
        super().__init__(features)


class TestRejectedClasses:
    @pytest.mark.parametrize(
        ("cls", "message"),
        [
            (NoDefault, "option 'dim' must be a keyword-only argument with a default"),
            (PositionalOption, "option 'dim' must be a keyword-only argument with a default"),
            (PositionalNoDefault, "option 'dim' must be a keyword-only argument with a default"),
            (RenamedSizes, r"__init__ must take \(self, in_features, out_features, \*"),
        ],
        ids=["no-default", "positional", "positional-no-default", "renamed-sizes"],
    )
    def test_network_class_rejected(self, network_kind: str, cls: type, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            register_network(network_kind)(cls)

    @pytest.mark.parametrize(
        "cls", [PositionalStrategy, NoDefaultStrategy], ids=["positional", "no-default"]
    )
    def test_strategy_class_rejected(self, strategy_kind: str, cls: type) -> None:
        with pytest.raises(ConfigError, match="option 'scale' must be a keyword-only argument"):
            register_strategy(strategy_kind)(cls)

    def test_rejected_not_registered(self, network_kind: str) -> None:
        with pytest.raises(ConfigError):
            register_network(network_kind)(NoDefault)
        assert network_kind not in NETWORKS.kinds()

    def test_network_without_sizes_rejected(self, network_kind: str) -> None:
        """A network class must take in_features and out_features, which attach passes by position."""

        class NoSizes(nn.Module):
            def __init__(self, *, dim: int = 4) -> None:
                super().__init__()

        with pytest.raises(ConfigError, match="NoSizes"):
            register_network(network_kind)(NoSizes)


class PlainNetwork:
    """Has the right constructor but is not an nn.Module."""

    def __init__(self, in_features: int, out_features: int, *, dim: int = 4) -> None:
        self.dim = dim


class PlainStrategy:
    """Has a forward(x, out) but is not an nn.Module."""

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + out


class TestNotModules:
    @pytest.mark.parametrize(
        ("register", "cls"),
        [(register_network, PlainNetwork), (register_strategy, PlainStrategy)],
        ids=["network", "strategy"],
    )
    def test_non_module_rejected(self, network_kind: str, strategy_kind: str, register, cls: type) -> None:
        """Attach builds registered classes as modules, so registering a plain class raises."""
        kind = network_kind if register is register_network else strategy_kind
        with pytest.raises(ConfigError, match=cls.__qualname__):
            register(kind)(cls)


class TestUserKindsEndToEnd:
    @pytest.fixture
    def kinds(self, network_kind: str, strategy_kind: str) -> tuple[str, str]:
        """Register a constant-offset network and a subtracting strategy."""

        @register_network(network_kind)
        class Offset(nn.Module):
            def __init__(self, in_features: int, out_features: int, *, offset: float = 1.0) -> None:
                super().__init__()
                self.offset = nn.Parameter(torch.full((out_features,), float(offset)))
                self.proj = nn.Linear(in_features, out_features, bias=False)
                nn.init.zeros_(self.proj.weight)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.proj(x) + self.offset

        @register_strategy(strategy_kind)
        class Subtract(Strategy):
            def __init__(self, features: int, *, weight: float = 1.0) -> None:
                super().__init__(features)
                self.weight = weight

            def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                return x - self.weight * out

        return network_kind, strategy_kind

    def config(self, kinds: tuple[str, str]) -> dict:
        network, strategy = kinds
        return {
            "custom": {
                "target": "fc",
                "network": {"kind": network, "offset": 0.5},
                "strategy": {"kind": strategy, "weight": 2.0},
            }
        }

    def test_output_matches_hand_value(self, kinds: tuple[str, str]) -> None:
        model = Host()
        x = torch.randn(2, 3)
        with torch.no_grad():
            expected = torch.relu(model.fc(x) - 2.0 * 0.5)
        with hookadapt.adapters(model, self.config(kinds)):
            result = model(x)
        assert torch.allclose(result, expected)

    def test_options_reach_classes(self, kinds: tuple[str, str]) -> None:
        model = Host()
        with hookadapt.adapters(model, self.config(kinds)) as adapter_set:
            adapter = adapter_set.adapters["custom"]["fc"]
            assert torch.equal(adapter.network.offset.detach(), torch.full((3,), 0.5))
            assert adapter.strategy.weight == 2.0

    def test_parameters_trainable(self, kinds: tuple[str, str]) -> None:
        model = Host()
        with hookadapt.adapters(model, self.config(kinds), freeze_base=True) as adapter_set:
            model(torch.randn(2, 3)).sum().backward()
            grads = [param.grad for param in adapter_set.parameters()]
        assert all(grad is not None for grad in grads)

    def test_detach_restores_output(self, kinds: tuple[str, str]) -> None:
        model = Host()
        x = torch.randn(2, 3)
        before = model(x)
        hookadapt.attach(model, self.config(kinds)).detach()
        assert torch.equal(model(x), before)

    def test_unknown_option_rejected(self, kinds: tuple[str, str]) -> None:
        network, _ = kinds
        config = {"custom": {"target": "fc", "network": {"kind": network, "offsets": 1.0}}}
        with pytest.raises(ConfigError, match="valid options are in_features, offset, out_features"):
            hookadapt.attach(Host(), config)

    def test_unregistered_kind_rejected(self, kinds: tuple[str, str]) -> None:
        """After unregistering, a config naming the kind fails at parse time."""
        network, _ = kinds
        NETWORKS.unregister(network)
        with pytest.raises(ConfigError, match=f"unknown network kind '{network}'"):
            hookadapt.attach(Host(), {"custom": {"target": "fc", "network": network}})
