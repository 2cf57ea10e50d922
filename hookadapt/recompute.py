"""Recognising forwards that gradient checkpointing will run again during backward.

`torch.utils.checkpoint` frees a block's activations after the forward and
recomputes them in backward. If an adapter set detaches in between, the
recomputation runs without the adapters and the gradients are silently
wrong (``use_reentrant=True``) or torch raises an error that does not name
the cause (``use_reentrant=False``). Sites therefore record a token for each
checkpointed call and drop it when the recomputation runs, and the adapter
set refuses to detach while a token is alive.

torch offers no public API for "am I inside a checkpoint", so the tokens are
found in torch's own objects: the ``ctx`` of the reentrant
``CheckpointFunction`` on the Python stack, and the frame object that the
non-reentrant implementation captures in its saved-tensor hooks. When a
future torch changes those internals, `checkpoint_call` returns None and
the check is skipped.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from types import FrameType
from typing import Any

import torch

__all__ = ["checkpoint_call"]

_CHECKPOINT_FILE = "checkpoint.py"


def _inside_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _reentrant_locals(method: str) -> dict[str, Any] | None:
    """Return the locals of the nearest ``CheckpointFunction.<method>`` frame on the stack, or None."""
    frame: FrameType | None = sys._getframe(3)
    while frame is not None:
        code = frame.f_code
        if code.co_name == method and code.co_filename.endswith(_CHECKPOINT_FILE):
            if frame.f_globals.get("__name__") == "torch.utils.checkpoint" and "ctx" in frame.f_locals:
                return frame.f_locals
        frame = frame.f_back
    return None


def _hook_frame() -> tuple[Any, bool] | None:
    """Return the non-reentrant checkpoint frame behind the active saved-tensor hooks, and whether it recomputes."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    if hooks is None:
        return None
    # torch wraps the recomputation's pack hook in torch._dynamo.disable, which keeps the
    # original function as __wrapped__.
    pack = inspect.unwrap(hooks[0])
    code = getattr(pack, "__code__", None)
    if code is None or not code.co_filename.endswith(_CHECKPOINT_FILE) or not pack.__closure__:
        return None
    cells = dict(zip(code.co_freevars, pack.__closure__, strict=False))
    if "frame" in cells:
        return cells["frame"].cell_contents, False
    if "target_frame_ref" in cells:
        target = cells["target_frame_ref"].cell_contents()
        return (target, True) if target is not None else None
    return None


def checkpoint_call(path: str) -> tuple[Any, bool] | None:
    """Return ``(token, recomputing)`` when a training call at ``path`` runs under `torch.utils.checkpoint`.

    ``token`` stays alive while backward may still recompute the call;
    ``recomputing`` is True when this call is the recomputation. Returns
    None outside a checkpoint, and while torch.compile traces the call.
    """
    if torch.compiler.is_compiling():
        # NOTE: inside a compiled region the check is skipped, because dynamo cannot trace
        # the autograd internals it reads.
        return None
    if torch.is_grad_enabled():
        found = _hook_frame()
        if found is not None:
            return found
        if _inside_backward():
            found = _reentrant_locals("backward")
            return (found["ctx"], True) if found is not None else None
        return None
    found = _reentrant_locals("forward")
    if found is None:
        return None
    inputs = found.get("args", ())
    if not any(isinstance(value, torch.Tensor) and value.requires_grad for value in inputs):
        _warn_no_input_grad(path)
    return found["ctx"], False


def _warn_no_input_grad(path: str) -> None:
    warnings.warn(
        f"adapters at {path!r} run inside torch.utils.checkpoint with use_reentrant=True, and no input "
        f"of the checkpointed block requires grad, so the adapters get no gradients. Use "
        f"use_reentrant=False, or make the block's input require grad (for a transformers model, call "
        f"model.enable_input_require_grads())",
        stacklevel=5,
    )
