"""Tests of target matching: paths, globs, regexes, exclude, shorthand and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hookadapt
from hookadapt import ConfigError, TargetError
from hookadapt.targets import RESERVED, candidate_modules, resolve_targets


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.value = nn.Linear(4, 4)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = SelfAttention()
        self.output = nn.Linear(4, 4)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.output = nn.Linear(4, 4)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(), Layer()])


class TinyBert(nn.Module):
    """A module tree with the paths of a BERT encoder, two layers deep."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Linear(4, 4)
        self.encoder = Encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(x)
        for layer in self.encoder.layer:
            attention = layer.attention
            x = attention.output(attention.self.query(x) + attention.self.value(x))
            x = layer.output(x)
        return x


def layer_paths(*suffixes: str) -> list[str]:
    """Return ``encoder.layer.I.SUFFIX`` for both layers, in model order."""
    return [f"encoder.layer.{index}.{suffix}" for index in (0, 1) for suffix in suffixes]


@pytest.fixture
def model() -> TinyBert:
    return TinyBert()


class TestMatch:
    @pytest.mark.parametrize(
        ("target", "expected"),
        [
            pytest.param(("encoder.layer.0.output",), ["encoder.layer.0.output"], id="exact"),
            pytest.param(("",), [""], id="root"),
            pytest.param(("encoder.layer",), ["encoder.layer"], id="exact-container"),
            pytest.param(("encoder.layer.*.output",), layer_paths("output"), id="glob-one-segment"),
            pytest.param(("encoder.layer.*.attention.output",), layer_paths("attention.output"), id="glob-attention"),
            pytest.param(("*",), ["embeddings", "encoder"], id="glob-top-level"),
            pytest.param(("**",), [path for path, _ in TinyBert().named_modules()], id="double-star-all"),
            pytest.param(("encoder.layer.0.attention.self.*",), ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"], id="glob-last-segment"),
            pytest.param(("encoder.layer.*.*.output",), layer_paths("attention.output"), id="glob-two-stars"),
            pytest.param(("**.output",), layer_paths("attention.output", "output"), id="double-star-prefix"),
            pytest.param(("encoder.**.query",), layer_paths("attention.self.query"), id="double-star-middle"),
            pytest.param(("encoder.layer.0.**",), ["encoder.layer.0." + path for path in ("attention", "attention.self", "attention.self.query", "attention.self.value", "attention.output", "output")], id="double-star-suffix"),
            pytest.param(("re:encoder\\.layer\\.\\d+\\.attention\\.self\\.(query|value)",), layer_paths("attention.self.query", "attention.self.value"), id="regex"),
            pytest.param(("re:encoder\\.layer\\.0",), ["encoder.layer.0"], id="regex-full-match"),
            pytest.param(("re:.*query",), layer_paths("attention.self.query"), id="regex-leading-wildcard"),
            pytest.param(("encoder.layer.1.output", "embeddings"), ["embeddings", "encoder.layer.1.output"], id="list-model-order"),
            pytest.param(("encoder.layer.*.output", "encoder.layer.0.output"), layer_paths("output"), id="list-overlap-once"),
            pytest.param(("encoder.layer.0.output:ad",), ["encoder.layer.0.output"], id="shorthand-own-name"),
            pytest.param(("encoder.layer.0.output:",), ["encoder.layer.0.output"], id="shorthand-empty-name"),
            pytest.param(("encoder.layer.*.output:ad",), layer_paths("output"), id="shorthand-glob"),
        ],
    )
    def test_target_matches(self, model: TinyBert, target: tuple[str, ...], expected: list[str]) -> None:
        assert resolve_targets(model, "ad", target) == expected

    def test_glob_stays_in_segment(self, model: TinyBert) -> None:
        """A single star never crosses a dot, so the attention output is not a layer output."""
        assert "encoder.layer.0.attention.output" not in resolve_targets(model, "ad", ("encoder.layer.*.output",))

    def test_star_skips_root(self, model: TinyBert) -> None:
        """The root path has no segment, so a single star does not match it."""
        assert "" not in resolve_targets(model, "ad", ("*",))

    def test_regex_not_searched(self, model: TinyBert) -> None:
        """A regex must match the whole path, so a bare segment name matches nothing."""
        with pytest.raises(TargetError):
            resolve_targets(model, "ad", ("re:query",))

    def test_glob_dot_is_literal(self, model: TinyBert) -> None:
        with pytest.raises(TargetError):
            resolve_targets(model, "ad", ("encoderXlayer.0.output",))

    @pytest.mark.parametrize(
        ("exclude", "expected"),
        [
            pytest.param(("encoder.layer.*.attention.output",), layer_paths("output"), id="glob"),
            pytest.param(("encoder.layer.1.**",), ["encoder.layer.0.attention.output", "encoder.layer.0.output"], id="subtree"),
            pytest.param(("re:.*\\.1\\..*", "encoder.layer.0.output"), ["encoder.layer.0.attention.output"], id="list"),
        ],
    )
    def test_exclude_removes(self, model: TinyBert, exclude: tuple[str, ...], expected: list[str]) -> None:
        assert resolve_targets(model, "ad", ("**.output",), exclude) == expected

    def test_shared_module_once(self) -> None:
        """A module reachable under two paths is a target once, under its first path."""
        shared = nn.Linear(4, 4)
        model = nn.ModuleDict({"a": shared, "b": shared})
        assert resolve_targets(model, "ad", ("re:a|b",)) == ["a"]


class TestMatchErrors:
    def test_no_match_raises(self, model: TinyBert) -> None:
        with pytest.raises(TargetError, match="'encoder.layer.0.outptu' matches no module"):
            resolve_targets(model, "ad", ("encoder.layer.0.outptu",))

    @pytest.mark.parametrize(
        ("pattern", "close"),
        [
            ("encoder.layer.0.outptu", "encoder.layer.0.output"),
            ("encoder.layers.1.attention.output", "encoder.layer.1.attention.output"),
            ("embedding", "embeddings"),
            ("encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.query"),
        ],
    )
    def test_no_match_lists_close(self, model: TinyBert, pattern: str, close: str) -> None:
        with pytest.raises(TargetError) as info:
            resolve_targets(model, "ad", (pattern,))
        assert repr(close) in str(info.value)

    def test_no_match_names_adapter(self, model: TinyBert) -> None:
        with pytest.raises(TargetError, match="adapter 'ad'"):
            resolve_targets(model, "ad", ("decoder.layer.0",))

    def test_one_bad_pattern_in_list(self, model: TinyBert) -> None:
        with pytest.raises(TargetError, match="'decoder'"):
            resolve_targets(model, "ad", ("embeddings", "decoder"))

    def test_glob_star_needs_segment(self, model: TinyBert) -> None:
        """Layer outputs sit one segment deeper than the glob allows, so nothing matches."""
        with pytest.raises(TargetError):
            resolve_targets(model, "ad", ("encoder.*.output",))

    def test_exclude_everything_raises(self, model: TinyBert) -> None:
        with pytest.raises(TargetError, match="removes every module"):
            resolve_targets(model, "ad", ("encoder.layer.*.output",), ("**.output",))

    def test_exclude_no_match_raises(self, model: TinyBert) -> None:
        with pytest.raises(TargetError, match="exclude pattern 'decoder'"):
            resolve_targets(model, "ad", ("embeddings",), ("decoder",))

    @pytest.mark.parametrize("target", ["encoder.layer.0.output:other", "encoder.layer.*.output:adx"])
    def test_shorthand_other_name(self, model: TinyBert, target: str) -> None:
        with pytest.raises(ConfigError, match="must be 'ad' or left out"):
            resolve_targets(model, "ad", (target,))

    def test_target_error_is_value_error(self, model: TinyBert) -> None:
        with pytest.raises(ValueError):
            resolve_targets(model, "ad", ("decoder",))

    def test_attach_no_match(self, model: TinyBert) -> None:
        config = {"ad": {"target": "encoder.layer.*.outputs", "network": "linear"}}
        with pytest.raises(TargetError, match="'encoder.layer.0.output'"):
            hookadapt.attach(model, config)


class TestAttachSites:
    def test_sites_follow_glob(self, model: TinyBert) -> None:
        config = {"ad": {"target": "encoder.layer.*.output", "network": {"kind": "lora", "rank": 2}}}
        with hookadapt.adapters(model, config) as adapter_set:
            assert list(adapter_set.adapters["ad"]) == layer_paths("output")

    def test_shorthand_attaches(self, model: TinyBert) -> None:
        config = {"bottleneck": {"target": "encoder.layer.1.output:bottleneck", "network": "linear"}}
        with hookadapt.adapters(model, config) as adapter_set:
            assert list(adapter_set.adapters["bottleneck"]) == ["encoder.layer.1.output"]


REACH_ALL = {
    "network": {"kind": "scale", "in_features": 4, "out_features": 4},
    "strategy": "multiply",
}


class TestReservedModules:
    def test_candidates_skip_reserved(self, model: TinyBert) -> None:
        with hookadapt.adapters(model, {"first": {"target": "encoder.layer.*.output", "network": "linear"}}):
            paths = list(candidate_modules(model))
        assert [path for path in paths if RESERVED in path] == []

    def test_reserved_child_exists(self, model: TinyBert) -> None:
        """Attaching the first set adds modules under the reserved child name."""
        with hookadapt.adapters(model, {"first": {"target": "encoder.layer.*.output", "network": "linear"}}):
            paths = [path for path, _ in model.named_modules()]
        assert [path for path in paths if RESERVED in path] != []

    def test_double_star_skips_reserved(self, model: TinyBert) -> None:
        with hookadapt.adapters(model, {"first": {"target": "encoder.layer.*.output", "network": "linear"}}):
            paths = resolve_targets(model, "second", ("**",))
        assert [path for path in paths if RESERVED in path] == []

    def test_second_set_skips_first(self, model: TinyBert) -> None:
        """A second set with '**' gets a site for every base module and none in the first set."""
        base_paths = [path for path, _ in model.named_modules()]
        first = hookadapt.attach(model, {"first": {"target": "encoder.layer.*.output", "network": "linear"}})
        try:
            second = hookadapt.attach(model, {"second": {"target": "**", **REACH_ALL}})
            sites = list(second.adapters["second"])
            second.detach()
        finally:
            first.detach()
        called = [path for path in base_paths if not isinstance(model.get_submodule(path), (nn.ModuleList, nn.ModuleDict))]
        assert sites == called

    def test_second_set_output_unchanged(self, model: TinyBert) -> None:
        """Fresh adapters of both sets leave the output as it was."""
        x = torch.randn(3, 4)
        before = model(x)
        with hookadapt.adapters(model, {"first": {"target": "encoder.layer.*.output", "network": "linear"}}):
            with hookadapt.adapters(model, {"second": {"target": "**", **REACH_ALL}}):
                result = model(x)
        assert torch.equal(result, before)

    def test_regex_cannot_reach_reserved(self, model: TinyBert) -> None:
        with hookadapt.adapters(model, {"first": {"target": "encoder.layer.*.output", "network": "linear"}}):
            with pytest.raises(TargetError):
                hookadapt.attach(model, {"second": {"target": f"re:.*{RESERVED}.*", **REACH_ALL}})

    def test_exact_path_cannot_reach_reserved(self, model: TinyBert) -> None:
        with hookadapt.adapters(model, {"first": {"target": "encoder.layer.0.output", "network": "linear"}}):
            reserved = [path for path, _ in model.named_modules() if RESERVED in path]
            with pytest.raises(TargetError):
                resolve_targets(model, "second", (reserved[0],))
