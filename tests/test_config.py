"""Tests of adapter specs: parsing, defaults, the dict round trip and config errors."""

from __future__ import annotations

import contextlib
import json

import attrs
import pytest
import torch
from torch import nn

import hookadapt
from hookadapt import AdapterSpec, ConfigError, NetworkSpec, StrategySpec, config_to_dict, parse_config


class Toy(nn.Module):
    """Two linear layers with a norm between them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


LINEAR_DEFAULTS = {"dim": 64, "activation": "swish", "norm_position": "pre", "dropout": 0.0}
RESIDUAL_DEFAULTS = {"stochastic_depth": 0.0, "stochastic_depth_mode": "batch", "l2_lambda": 0.0}

# Each case: the dict form and the attrs form of the same adapter.
EQUIVALENT_FORMS = [
    pytest.param(
        {"target": "fc1", "network": "linear"},
        AdapterSpec(target="fc1", network="linear"),
        id="kind-names",
    ),
    pytest.param(
        {"target": ["fc1", "fc2"], "network": {"kind": "linear", "dim": 8}, "strategy": "residual_add"},
        AdapterSpec(
            target=("fc1", "fc2"),
            network=NetworkSpec("linear", {"dim": 8}),
            strategy=StrategySpec("residual_add"),
        ),
        id="network-options",
    ),
    pytest.param(
        {
            "target": "re:fc\\d",
            "exclude": "fc2",
            "insertion": "parallel",
            "network": {"kind": "lora", "rank": 2, "alpha": 4},
            "strategy": {"kind": "scaled_add", "scale": 0.5},
            "input_select": "x",
            "output_select": 0,
            "feature_dim": 1,
            "dtype": "float64",
        },
        AdapterSpec(
            target="re:fc\\d",
            exclude=["fc2"],
            insertion="parallel",
            network=NetworkSpec(kind="lora", options={"rank": 2, "alpha": 4}),
            strategy=StrategySpec(kind="scaled_add", options={"scale": 0.5}),
            input_select="x",
            output_select=0,
            feature_dim=1,
            dtype="float64",
        ),
        id="every-field",
    ),
    pytest.param(
        {"target": "norm", "network": {"kind": "scale", "init": 2.0}, "strategy": {"kind": "multiply"}},
        AdapterSpec(target="norm", network=NetworkSpec("scale", {"init": 2.0}), strategy="multiply"),
        id="scale-multiply",
    ),
]


class TestParseConfig:
    @pytest.mark.parametrize(("as_dict", "as_attrs"), EQUIVALENT_FORMS)
    def test_dict_and_attrs_agree(self, as_dict: dict, as_attrs: AdapterSpec) -> None:
        assert parse_config({"ad": as_dict}) == parse_config({"ad": as_attrs})

    def test_network_defaults_filled(self) -> None:
        spec = parse_config({"ad": {"target": "fc1", "network": "linear"}})["ad"]
        assert dict(spec.network.options) == LINEAR_DEFAULTS

    def test_strategy_defaults_filled(self) -> None:
        spec = parse_config({"ad": {"target": "fc1", "network": "linear"}})["ad"]
        assert spec.strategy == StrategySpec("residual_add", RESIDUAL_DEFAULTS)

    @pytest.mark.parametrize(
        ("field", "default"),
        [
            ("insertion", "output"),
            ("exclude", ()),
            ("input_select", None),
            ("output_select", None),
            ("feature_dim", -1),
            ("dtype", "float32"),
        ],
    )
    def test_spec_defaults_filled(self, field: str, default: object) -> None:
        spec = parse_config({"ad": {"target": "fc1", "network": "linear"}})["ad"]
        assert getattr(spec, field) == default

    def test_target_string_becomes_tuple(self) -> None:
        spec = parse_config({"ad": {"target": "fc1", "network": "linear"}})["ad"]
        assert spec.target == ("fc1",)

    def test_keeps_config_order(self) -> None:
        config = {name: {"target": "fc1", "network": "linear"} for name in ("zeta", "alpha", "mid")}
        assert list(parse_config(config)) == ["zeta", "alpha", "mid"]

    def test_spec_is_frozen(self) -> None:
        spec = parse_config({"ad": {"target": "fc1", "network": "linear"}})["ad"]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            spec.insertion = "input"  # type: ignore[misc]

    def test_options_are_read_only(self) -> None:
        spec = parse_config({"ad": {"target": "fc1", "network": "linear"}})["ad"]
        with pytest.raises(TypeError):
            spec.network.options["dim"] = 3  # type: ignore[index]

    def test_caller_dict_not_aliased(self) -> None:
        """Changing the caller's options dict afterwards does not change the parsed spec."""
        options = {"kind": "linear", "dim": 8}
        spec = parse_config({"ad": {"target": "fc1", "network": options}})["ad"]
        options["dim"] = 99
        assert spec.network.options["dim"] == 8


class TestConfigToDict:
    @pytest.mark.parametrize(("as_dict", "as_attrs"), EQUIVALENT_FORMS)
    def test_json_round_trip(self, as_dict: dict, as_attrs: AdapterSpec) -> None:
        specs = parse_config({"ad": as_dict, "other": as_attrs})
        text = json.dumps(config_to_dict(specs))
        assert parse_config(json.loads(text)) == specs

    def test_dict_form_is_plain(self) -> None:
        specs = parse_config({"ad": {"target": "fc1", "network": {"kind": "linear", "dim": 8}}})
        entry = config_to_dict(specs)["ad"]
        assert entry["network"] == {"kind": "linear", **LINEAR_DEFAULTS, "dim": 8}

    def test_targets_become_lists(self) -> None:
        specs = parse_config({"ad": {"target": "fc1", "exclude": "fc2", "network": "linear"}})
        entry = config_to_dict(specs)["ad"]
        assert (entry["target"], entry["exclude"]) == (["fc1"], ["fc2"])

    def test_list_option_round_trip(self) -> None:
        """A list option value survives freezing, thawing and JSON."""

        @hookadapt.register_network("config_test_listed")
        class Listed(nn.Module):
            def __init__(self, in_features: int, out_features: int, *, widths: list | None = None) -> None:
                super().__init__()

        try:
            specs = parse_config({"ad": {"target": "fc1", "network": {"kind": "config_test_listed", "widths": [2, 3]}}})
            entry = config_to_dict(specs)["ad"]
            assert entry["network"]["widths"] == [2, 3]
            assert parse_config(json.loads(json.dumps(config_to_dict(specs)))) == specs
        finally:
            hookadapt.NETWORKS.unregister("config_test_listed")


def spec_with(**changes: object) -> dict:
    """Return a valid dict spec with ``changes`` applied; a value of None removes the field."""
    spec = {"target": "fc1", "network": "linear"}
    spec.update(changes)
    return {key: value for key, value in spec.items() if value is not None}


# Each case: the bad spec and a text the error message must contain to name the field.
BAD_SPECS = [
    pytest.param(spec_with(targt="fc1"), "'targt'", id="unknown-field"),
    pytest.param({**spec_with(), 1: "x", "y": 2}, "'y'", id="unknown-fields-mixed-keys"),
    pytest.param(spec_with(target=None), "'target'", id="missing-target"),
    pytest.param(spec_with(network=None), "'network'", id="missing-network"),
    pytest.param(spec_with(target=5), "target", id="target-not-string"),
    pytest.param(spec_with(target=["fc1", 3]), "target", id="target-list-item"),
    pytest.param(spec_with(target=[]), "target", id="target-empty"),
    pytest.param(spec_with(exclude=7), "exclude", id="exclude-not-string"),
    pytest.param(spec_with(target="re:fc(1"), "target", id="bad-target-regex"),
    pytest.param(spec_with(exclude="re:[fc"), "exclude", id="bad-exclude-regex"),
    pytest.param(spec_with(insertion="sideways"), "insertion", id="bad-insertion"),
    pytest.param(spec_with(dtype="float8"), "dtype", id="bad-dtype"),
    pytest.param(spec_with(dtype=torch.float32), "dtype", id="dtype-object"),
    pytest.param(spec_with(dtype=["float32"]), "dtype", id="dtype-list"),
    pytest.param(spec_with(input_select=1.5), "input_select", id="input-select-float"),
    pytest.param(spec_with(input_select=True), "input_select", id="input-select-bool"),
    pytest.param(spec_with(output_select=[0]), "output_select", id="output-select-list"),
    pytest.param(spec_with(feature_dim="1"), "feature_dim", id="feature-dim-string"),
    pytest.param(spec_with(network=5), "network", id="network-not-kind"),
    pytest.param(spec_with(network={"dim": 8}), "network", id="network-without-kind"),
    pytest.param(spec_with(strategy=3.0), "strategy", id="strategy-not-kind"),
    pytest.param(spec_with(network={"kind": "linear", "width": 3}), "'width'", id="unknown-network-option"),
    pytest.param(spec_with(strategy={"kind": "residual_add", "p": 0.1}), "'p'", id="unknown-strategy-option"),
    pytest.param(spec_with(network={"kind": "linear", "dim": 0}), "dim", id="dim-zero"),
    pytest.param(spec_with(network={"kind": "linear", "dim": 2.5}), "dim", id="dim-float"),
    pytest.param(spec_with(network={"kind": "linear", "dropout": 1.5}), "dropout", id="dropout-above-one"),
    pytest.param(spec_with(network={"kind": "linear", "dropout": -0.1}), "dropout", id="dropout-negative"),
    pytest.param(spec_with(network={"kind": "linear", "activation": "nope"}), "activation", id="bad-activation"),
    pytest.param(
        spec_with(network={"kind": "linear", "norm_position": "middle"}), "norm_position", id="bad-norm-position"
    ),
    pytest.param(spec_with(network={"kind": "linear", "in_features": 0}), "in_features", id="in-features-zero"),
    pytest.param(spec_with(network={"kind": "lora", "out_features": 2.0}), "out_features", id="out-features-float"),
    pytest.param(spec_with(network={"kind": "lora", "rank": 0}), "rank", id="rank-zero"),
    pytest.param(spec_with(network={"kind": "lora", "alpha": "big"}), "alpha", id="alpha-string"),
    pytest.param(spec_with(network={"kind": "lora", "use_rslora": 1}), "use_rslora", id="rslora-int"),
    pytest.param(spec_with(network={"kind": "scale", "init": None}), "init", id="scale-init-none"),
    pytest.param(
        spec_with(strategy={"kind": "residual_add", "stochastic_depth": 1.5}),
        "stochastic_depth",
        id="stochastic-depth-above-one",
    ),
    pytest.param(
        spec_with(strategy={"kind": "residual_add", "stochastic_depth_mode": "token"}),
        "stochastic_depth_mode",
        id="bad-depth-mode",
    ),
    pytest.param(spec_with(strategy={"kind": "residual_add", "l2_lambda": -1}), "l2_lambda", id="l2-negative"),
    pytest.param(
        spec_with(strategy={"kind": "residual_add", "l2_lambda": float("nan")}), "l2_lambda", id="l2-not-finite"
    ),
    pytest.param(spec_with(strategy={"kind": "scaled_add", "scale": "half"}), "scale", id="scale-string"),
    pytest.param(spec_with(network={"kind": "linear", "dim": torch.tensor(4)}), "dim", id="tensor-option"),
    pytest.param(spec_with(network={"kind": "linear", "activation": nn.ReLU()}), "activation", id="module-option"),
    pytest.param(
        spec_with(strategy={"kind": "scaled_add", "scale": {1.0, 2.0}}), "scale", id="set-option"
    ),
]


class TestConfigErrors:
    @pytest.mark.parametrize(("spec", "field"), BAD_SPECS)
    def test_error_names_field(self, spec: dict, field: str) -> None:
        with pytest.raises(ConfigError) as info:
            parse_config({"ad": spec})
        assert field in str(info.value)

    @pytest.mark.parametrize(("spec", "field"), BAD_SPECS)
    def test_error_names_adapter(self, spec: dict, field: str) -> None:
        with pytest.raises(ConfigError, match="adapter 'ad'"):
            parse_config({"ad": spec})

    @pytest.mark.parametrize(
        ("build", "field"),
        [
            pytest.param(lambda: AdapterSpec(target="fc1", network="linear", insertion="side"), "insertion", id="insertion"),
            pytest.param(lambda: AdapterSpec(target="fc1", network="linear", dtype="int8"), "dtype", id="dtype"),
            pytest.param(lambda: AdapterSpec(target=3, network="linear"), "target", id="target"),
            pytest.param(
                lambda: AdapterSpec(target="fc1", network=NetworkSpec("linear", {"dim": 0})), "dim", id="dim-zero"
            ),
            pytest.param(
                lambda: AdapterSpec(target="fc1", network=NetworkSpec("linear", options=5)), "options", id="options-int"
            ),
            pytest.param(
                lambda: AdapterSpec(target="fc1", network=NetworkSpec("linear", options=None)),
                "options",
                id="options-none",
            ),
            pytest.param(
                lambda: AdapterSpec(target="fc1", network="linear", strategy=StrategySpec("residual_add", ["x"])),
                "options",
                id="strategy-options-list",
            ),
            pytest.param(lambda: AdapterSpec(target="fc1", network=NetworkSpec(["linear"])), "network", id="kind-list"),
        ],
    )
    def test_attrs_form_rejected(self, build, field: str) -> None:
        """Bad attrs-form specs raise ConfigError naming the adapter and the field."""
        with pytest.raises(ConfigError) as info:
            parse_config({"ad": build()})
        assert "adapter 'ad'" in str(info.value)
        assert field in str(info.value)

    @pytest.mark.parametrize(("field", "kind"), [("network", "bogus"), ("strategy", "bogus")])
    def test_unknown_kind_lists_known(self, field: str, kind: str) -> None:
        known = {"network": ["linear", "lora", "scale"], "strategy": ["multiply", "residual_add", "return_result", "scaled_add"]}
        with pytest.raises(ConfigError, match=f"unknown {field} kind 'bogus'") as info:
            parse_config({"ad": spec_with(**{field: kind})})
        for name in known[field]:
            assert name in str(info.value)

    def test_unknown_option_lists_valid(self) -> None:
        with pytest.raises(ConfigError) as info:
            parse_config({"ad": spec_with(network={"kind": "lora", "ranks": 4})})
        for option in ("rank", "alpha", "dropout", "use_rslora", "in_features", "out_features"):
            assert option in str(info.value)

    def test_unknown_field_lists_valid(self) -> None:
        with pytest.raises(ConfigError) as info:
            parse_config({"ad": spec_with(insert="output")})
        for field in ("target", "network", "strategy", "insertion", "exclude", "dtype"):
            assert field in str(info.value)

    @pytest.mark.parametrize("name", ["", "1st", "a.b", "has space", "a/b", 3, None])
    def test_invalid_name_rejected(self, name: object) -> None:
        with pytest.raises(ConfigError, match="adapter name .* is invalid"):
            parse_config({name: spec_with()})

    @pytest.mark.parametrize("spec", [5, "linear", ["fc1", "linear"], None])
    def test_spec_type_rejected(self, spec: object) -> None:
        with pytest.raises(ConfigError, match="adapter 'ad': spec must be"):
            parse_config({"ad": spec})

    @pytest.mark.parametrize("config", [[("ad", {})], "ad", None], ids=["list", "string", "none"])
    def test_config_not_mapping(self, config: object) -> None:
        with pytest.raises(ConfigError, match="config must be a mapping"):
            parse_config(config)  # type: ignore[arg-type]

    def test_config_empty(self) -> None:
        with pytest.raises(ConfigError, match="config is empty"):
            parse_config({})

    def test_config_error_is_value_error(self) -> None:
        with pytest.raises(ValueError):
            parse_config({"ad": spec_with(insertion="sideways")})


def hook_dicts(model: nn.Module) -> dict[str, dict]:
    """Return every hook dict of every module, by module path and attribute name."""
    return {
        f"{path}:{key}": dict(value)
        for path, module in model.named_modules()
        for key, value in vars(module).items()
        if "hook" in key and isinstance(value, dict)
    }


# Configs whose error is raised through `attach`; the first adapter of some is valid.
BAD_ATTACH_CONFIGS = [
    pytest.param({"ad": spec_with(insertion="sideways")}, id="bad-insertion"),
    pytest.param({"ad": spec_with(network={"kind": "linear", "dim": 0})}, id="dim-zero"),
    pytest.param({"good": spec_with(), "ad": spec_with(strategy="bogus")}, id="second-unknown-kind"),
    pytest.param(
        {"good": spec_with(target="fc2"), "ad": spec_with(target="fc1:someone_else")},
        id="second-wrong-shorthand",
    ),
    pytest.param({"good": spec_with(), "1bad": spec_with()}, id="second-bad-name"),
]


class TestAttachConfigErrors:
    @pytest.mark.parametrize("config", BAD_ATTACH_CONFIGS)
    def test_raises_config_error(self, config: dict) -> None:
        with pytest.raises(ConfigError):
            hookadapt.attach(Toy(), config, freeze_base=True)

    @pytest.mark.parametrize("config", BAD_ATTACH_CONFIGS)
    def test_state_dict_unchanged(self, config: dict) -> None:
        model = Toy()
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(ConfigError):
            hookadapt.attach(model, config, freeze_base=True)
        after = model.state_dict()
        assert list(after) == list(before)
        for key, value in before.items():
            assert torch.equal(after[key], value), key

    @pytest.mark.parametrize("config", BAD_ATTACH_CONFIGS)
    def test_hook_dicts_empty(self, config: dict) -> None:
        model = Toy()
        with pytest.raises(ConfigError):
            hookadapt.attach(model, config, freeze_base=True)
        assert {key: value for key, value in hook_dicts(model).items() if value} == {}

    @pytest.mark.parametrize("config", BAD_ATTACH_CONFIGS)
    def test_no_new_modules(self, config: dict) -> None:
        model = Toy()
        paths = [path for path, _ in model.named_modules()]
        with pytest.raises(ConfigError):
            hookadapt.attach(model, config, freeze_base=True)
        assert [path for path, _ in model.named_modules()] == paths

    @pytest.mark.parametrize("config", BAD_ATTACH_CONFIGS)
    def test_requires_grad_unchanged(self, config: dict) -> None:
        model = Toy()
        model.fc2.weight.requires_grad_(False)
        flags = {name: param.requires_grad for name, param in model.named_parameters()}
        with pytest.raises(ConfigError):
            hookadapt.attach(model, config, freeze_base=True)
        assert {name: param.requires_grad for name, param in model.named_parameters()} == flags

    @pytest.mark.parametrize("config", BAD_ATTACH_CONFIGS)
    def test_nothing_left_attached(self, config: dict) -> None:
        model = Toy()
        with pytest.raises(ConfigError):
            hookadapt.attach(model, config)
        assert hookadapt.attached(model) == []

    @pytest.mark.parametrize("name", ["keys", "forward", "train", "to"])
    def test_attribute_name_no_key_error(self, name: str) -> None:
        """A name that shadows a module attribute either attaches or raises ConfigError, never KeyError."""
        model = Toy()
        with contextlib.suppress(ConfigError):
            hookadapt.attach(model, {name: spec_with()}).detach()
        assert hookadapt.attached(model) == []

    def test_names_free_after_failure(self) -> None:
        """A failed attach leaves the valid adapter's name free for the next attach."""
        model = Toy()
        with pytest.raises(ConfigError):
            hookadapt.attach(model, {"good": spec_with(), "ad": spec_with(dtype="float8")})
        adapter_set = hookadapt.attach(model, {"good": spec_with()})
        adapter_set.detach()
        assert hookadapt.attached(model) == []
