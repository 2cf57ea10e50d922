"""Adapters under torch.distributed: DDP, FSDP2 and FSDP1 with two processes.

Each job runs on two processes started with ``torch.multiprocessing.spawn``
(or torchrun for the example script) on the gloo backend, with the process
group's store and gloo's sockets on 127.0.0.1 only. Every rank writes its
results to a file, and the tests compare the ranks with each other and with
the same training run in this single process. The NCCL variants need two
CUDA devices and are skipped without them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hookadapt

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)

REPOSITORY = Path(__file__).resolve().parent.parent
EXAMPLE = REPOSITORY / "examples" / "ddp_train.py"
WORLD_SIZE = 2
# Seconds a whole job may take before the test kills its processes and fails.
JOB_TIMEOUT = 120
# The example loads the real MiniLM in both processes, which takes longer on a busy 2-core machine.
EXAMPLE_TIMEOUT = 180
# Seconds a collective may wait inside a job. It is shorter than JOB_TIMEOUT, so a hang
# inside the process group fails with gloo's own error message first.
COLLECTIVE_TIMEOUT = 60
STEPS = 3
LEARNING_RATE = 0.1
# Distributed gradients are averaged in another order than one process sums them.
ATOL = 1e-6
RTOL = 1e-5
TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="the NCCL cases need two CUDA devices",
)

CONFIG = {
    "bottleneck": {"target": "blocks.*.fc2", "network": {"kind": "linear", "dim": 4}},
    "lora": {
        "target": "blocks.*.fc1",
        "insertion": "parallel",
        "network": {"kind": "lora", "rank": 2, "alpha": 4},
    },
}


def bottleneck_config(stochastic_depth: float) -> dict[str, Any]:
    """Return a config of one bottleneck adapter whose residual_add drops it with this probability."""
    return {
        "bottleneck": {
            "target": "blocks.*.fc2",
            "network": {"kind": "linear", "dim": 4},
            "strategy": {"kind": "residual_add", "stochastic_depth": stochastic_depth, "stochastic_depth_mode": "batch"},
        }
    }


# The model and the data.


class Block(nn.Module):
    """A residual two-layer MLP with a LayerNorm, shaped like a transformer layer's feed-forward half."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class TinyNet(nn.Module):
    """An input projection, two blocks in an nn.ModuleList and a classifier head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def rank_batch(rank: int, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Return rank ``rank``'s batch of step ``step``: 4 inputs of 8 features and their class labels."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    inputs = torch.randn(4, 8, generator=generator)
    labels = torch.randint(0, 4, (4,), generator=generator)
    return inputs.to(device), labels.to(device)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the batches of every rank at ``step``, concatenated, as a single-process run uses them."""
    pairs = [rank_batch(rank, step) for rank in range(WORLD_SIZE)]
    return torch.cat([inputs for inputs, _ in pairs]), torch.cat([labels for _, labels in pairs])


def probe_input(device: torch.device | str = "cpu") -> torch.Tensor:
    """Return a fixed input for comparing outputs."""
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(99)).to(device)


def train_steps(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int = STEPS,
    loss_scale: float = 1.0,
) -> None:
    """Take ``steps`` SGD steps on ``params`` with the cross-entropy of ``model`` on ``batches(step)``."""
    params = list(params)
    model.train()
    for step in range(steps):
        inputs, labels = batches(step)
        loss = nn.functional.cross_entropy(model(inputs), labels) * loss_scale
        zero_grad(params)
        loss.backward()
        sgd_step(params)


def zero_grad(params: Iterable[nn.Parameter]) -> None:
    """Drop the gradients of ``params``, as ``optimizer.zero_grad()`` does."""
    for param in params:
        param.grad = None


def sgd_step(params: Iterable[nn.Parameter]) -> None:
    """Update ``params`` in place by plain SGD, which is what torch.optim.SGD does without options.

    Writing the update out avoids torch.optim's first-use import of torch._dynamo, which
    takes seconds in every process.
    """
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.sub_(param.grad, alpha=LEARNING_RATE)


def randomize_adapters(adapter_set: hookadapt.AdapterSet, seed: int) -> None:
    """Give every adapter parameter random values, so that no adapter output is zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_set.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return detached CPU copies of the tensors in ``state``."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return CPU copies of the model's own tensors, without those of attached adapters."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items() if "_hookadapt" not in key}


def differing_keys(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, exact: bool) -> list[str]:
    """Return the keys whose tensors differ in shape or value (bitwise when ``exact``), or are missing."""
    keys = sorted(set(actual) | set(expected))
    differing = []
    for key in keys:
        if key not in actual or key not in expected or actual[key].shape != expected[key].shape:
            differing.append(key)
        elif exact and not torch.equal(actual[key], expected[key]):
            differing.append(key)
        elif not exact and not torch.allclose(actual[key], expected[key], atol=ATOL, rtol=RTOL):
            differing.append(key)
    return differing


def reference_state(
    config: Mapping[str, Any],
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] = global_batch,
    *,
    steps: int = STEPS,
    loss_scale: float = 1.0,
    randomize_seed: int | None = None,
) -> tuple[nn.Module, hookadapt.AdapterSet]:
    """Train the adapters of ``config`` in this process from seed 0, as a distributed job would on rank 0."""
    torch.manual_seed(0)
    model = TinyNet()
    adapter_set = hookadapt.attach(model, config, freeze_base=True)
    if randomize_seed is not None:
        randomize_adapters(adapter_set, randomize_seed)
    train_steps(model, adapter_set.parameters(), batches, steps=steps, loss_scale=loss_scale)
    return model, adapter_set


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread, as each rank does, since kernels may round differently on more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def describe_error(err: BaseException) -> str:
    """Return ``Type: message`` and the innermost frame, to report an error from a rank."""
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {err}{where}"


# Starting jobs.


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_interface() -> str | None:
    """Return the name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), if found."""
    if not hasattr(socket, "if_nameindex"):
        return None
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def loopback_environment() -> dict[str, str]:
    """Return environment variables that keep gloo's sockets on the loopback interface."""
    interface = loopback_interface()
    return {"GLOO_SOCKET_IFNAME": interface} if interface and "GLOO_SOCKET_IFNAME" not in os.environ else {}


def rank_main(rank: int, job_name: str, port: int, folder: str, backend: str) -> None:
    """Join the process group, run one job and save its results to ``folder/rank{rank}.pt``."""
    os.environ.update(loopback_environment())
    # Two processes share the machine's cores; one thread each avoids oversubscription.
    torch.set_num_threads(1)
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
    )
    try:
        results = JOBS[job_name](rank, device, Path(folder))
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_job(job_name: str, folder: Path, backend: str = "gloo") -> list[dict[str, Any]]:
    """Run ``job_name`` on two processes and return each rank's results; fail the test after JOB_TIMEOUT seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    context = mp.spawn(
        rank_main,
        args=(job_name, free_port(), str(folder), backend),
        nprocs=WORLD_SIZE,
        join=False,
    )
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        # join raises ProcessRaisedException, with the rank's traceback, when a rank fails.
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed job {job_name!r} did not finish within {JOB_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def run_bounded(command: list[str], *, env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group and kill the whole group if it outlives ``timeout``."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env),
        cwd=REPOSITORY,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun's workers are in the same new session, so this ends them too.
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s; output:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


# The DDP job.


def ddp_job(rank: int, device: torch.device, folder: Path) -> dict[str, Any]:
    """Train adapters under DDP in several ways and return what each rank ends with."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    results: dict[str, Any] = {}

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rank_batch(rank, step, device)

    # Attached before wrapping, from a different seed on each rank: DDP copies rank 0's
    # parameters, adapters included, to every rank when it wraps the model.
    torch.manual_seed(rank)
    model = TinyNet().to(device)
    adapter_set = hookadapt.attach(model, CONFIG, freeze_base=True)
    ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    base_before = base_state(model)
    initial = cpu_state(adapter_set.state_dict())
    train_steps(ddp_model, adapter_set.parameters(), batches)
    results["sync"] = {
        "initial": initial,
        "trained": cpu_state(adapter_set.state_dict()),
        "base_before": base_before,
        "base_after": base_state(model),
    }

    # The checkpoint: rank 0 saves, every rank loads it into a fresh model of rank 0's base.
    path = folder / "ddp.safetensors"
    if rank == 0:
        hookadapt.save_adapters(adapter_set, path)
    dist.barrier()
    torch.manual_seed(0)
    fresh = TinyNet().to(device)
    hookadapt.load_adapters(fresh, path)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        results["checkpoint"] = {
            "path": str(path),
            "trained_output": model(probe_input(device)).cpu(),
            "loaded_output": fresh(probe_input(device)).cpu(),
        }

    # Stochastic depth with a different random draw on each rank: a rank that drops the
    # adapter multiplies its output by zero, so its parameters still get (zero) gradients.
    torch.manual_seed(0)
    model = TinyNet().to(device)
    adapter_set = hookadapt.attach(model, {**bottleneck_config(0.5), "lora": CONFIG["lora"]}, freeze_base=True)
    randomize_adapters(adapter_set, seed=1)
    ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    dropped: list[bool] = []
    for adapter in adapter_set.adapters["bottleneck"].values():
        adapter.strategy.register_forward_hook(lambda module, args, output: dropped.append(torch.equal(output, args[0])))
    torch.manual_seed(100 + rank)
    train_steps(ddp_model, adapter_set.parameters(), batches, steps=2 * STEPS)
    results["stochastic"] = {"dropped": dropped, "trained": cpu_state(adapter_set.state_dict())}

    # Rank 0 always drops the adapter and rank 1 never does, so the averaged gradient is
    # half of rank 1's.
    torch.manual_seed(0)
    model = TinyNet().to(device)
    adapter_set = hookadapt.attach(model, bottleneck_config(1.0 if rank == 0 else 0.0), freeze_base=True)
    ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    train_steps(ddp_model, adapter_set.parameters(), batches)
    results["one_rank_drops"] = {"trained": cpu_state(adapter_set.state_dict())}

    # An adapter disabled on one rank for one step has no gradient there, which DDP accepts
    # only with find_unused_parameters=True.
    torch.manual_seed(0)
    model = TinyNet().to(device)
    adapter_set = hookadapt.attach(model, CONFIG, freeze_base=True)
    ddp_model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
    params = list(adapter_set.parameters())
    for step in range(STEPS):
        inputs, labels = batches(step)
        with adapter_set.disabled("bottleneck") if rank == 0 and step == 1 else contextlib.nullcontext():
            loss = nn.functional.cross_entropy(ddp_model(inputs), labels)
        zero_grad(params)
        loss.backward()
        sgd_step(params)
    results["disabled_one_rank"] = {"trained": cpu_state(adapter_set.state_dict())}

    # Attached after wrapping, to the wrapper or to the module inside it, from a different
    # seed on each rank: DDP's parameter list was built without the adapters.
    for target in ("wrapper", "module"):
        torch.manual_seed(rank)
        model = TinyNet().to(device)
        ddp_model = DistributedDataParallel(model, device_ids=device_ids)
        try:
            late_set = hookadapt.attach(ddp_model if target == "wrapper" else ddp_model.module, CONFIG, freeze_base=True)
            train_steps(ddp_model, late_set.parameters(), batches)
        except hookadapt.HookadaptError as err:
            results[f"late_{target}"] = {"error": describe_error(err), "error_type": type(err).__name__}
            continue
        results[f"late_{target}"] = {"error": None, "trained": cpu_state(late_set.state_dict())}
        late_set.detach()
    return results


# The FSDP job.

FSDP2_LAYOUTS = ("blocks", "root", "hosts")
FSDP1_LAYOUTS = ("root", "blocks")


def shard_fsdp2(model: TinyNet, layout: str, mesh: Any) -> None:
    """Apply ``fully_shard`` per block, to the root only, or to every adapter host, then to the root."""
    from torch.distributed.fsdp import fully_shard

    if layout == "blocks":
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
    elif layout == "hosts":
        for block in model.blocks:
            fully_shard(block.fc1, mesh=mesh)
            fully_shard(block.fc2, mesh=mesh)
    fully_shard(model, mesh=mesh)


def fsdp2_part(rank: int, device: torch.device, folder: Path, layout: str) -> dict[str, Any]:
    """Train adapters on a model sharded with FSDP2's fully_shard and gather them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from hookadapt.checkpoint import model_fingerprint

    torch.manual_seed(0)
    model = TinyNet().to(device)
    adapter_set = hookadapt.attach(model, CONFIG, freeze_base=True)
    shard_fsdp2(model, layout, init_device_mesh(device.type, (WORLD_SIZE,)))
    train_steps(model, adapter_set.parameters(), lambda step: rank_batch(rank, step, device))

    part: dict[str, Any] = {}
    # full_tensor() is a collective: every rank gathers the whole tensor.
    gathered = {
        key: value.full_tensor() if isinstance(value, DTensor) else value
        for key, value in adapter_set.state_dict().items()
    }
    part["gathered"] = cpu_state(gathered)
    part["sharded"] = all(isinstance(param, DTensor) for param in adapter_set.parameters())
    # With cpu_offload, only rank 0 receives the full tensors.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_state = get_model_state_dict(model, options=options)
    part["model_state"] = {key: value for key, value in cpu_state(full_state).items() if "_hookadapt" in key}

    # Every rank calls save_adapters with the same path, as a save that gathers would need.
    path = folder / f"fsdp2-{layout}.safetensors"
    try:
        hookadapt.save_adapters(adapter_set, path)
        part["save_error"] = None
    except Exception as err:  # noqa: BLE001 - any failure is a result to report
        part["save_error"] = describe_error(err)
    dist.barrier()
    part["save_path"] = str(path)
    part["fingerprint_class"] = model_fingerprint(model, ["blocks.0.fc1"])["blocks.0.fc1"]["class"]

    # What works today: rank 0 copies the gathered tensors into the same adapters on an
    # unsharded model of the same architecture and saves those.
    path = folder / f"fsdp2-{layout}-plain.safetensors"
    if rank == 0:
        plain_model = TinyNet()
        plain_set = hookadapt.attach(plain_model, CONFIG)
        with torch.no_grad():
            for key, value in plain_set.state_dict().items():
                value.copy_(gathered[key])
        hookadapt.save_adapters(plain_set, path)
    dist.barrier()
    part["plain_save_path"] = str(path)
    return part


def fsdp2_load_part(rank: int, device: torch.device, path: Path) -> dict[str, Any]:
    """Load a checkpoint on every rank before sharding, and return the sharded model's output."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = TinyNet().to(device)
    hookadapt.load_adapters(model, path)
    shard_fsdp2(model, "blocks", init_device_mesh(device.type, (WORLD_SIZE,)))
    model.eval()
    with torch.no_grad():
        return {"path": str(path), "output": model(probe_input(device)).cpu()}


def fsdp1_part(rank: int, device: torch.device, folder: Path, layout: str) -> dict[str, Any]:
    """Train adapters under FullyShardedDataParallel with use_orig_params=True, gather and save them."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    model = TinyNet().to(device)
    adapter_set = hookadapt.attach(model, CONFIG, freeze_base=True)
    policy = ModuleWrapPolicy({Block}) if layout == "blocks" else None
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=device, auto_wrap_policy=policy)
    trainable = [param for param in wrapped.parameters() if param.requires_grad]
    train_steps(wrapped, trainable, lambda step: rank_batch(rank, step, device))

    part: dict[str, Any] = {}
    # Outside forward, each rank's parameters are views of its flat shard, and save_adapters reads those.
    path = folder / f"fsdp1-{layout}-rank{rank}.safetensors"
    part["sharded_save_error"] = None
    part["sharded_save_error_is_hookadapt"] = False
    try:
        hookadapt.save_adapters(adapter_set, path)
    except Exception as err:  # noqa: BLE001 - any failure is a result to report
        part["sharded_save_error"] = describe_error(err)
        part["sharded_save_error_is_hookadapt"] = isinstance(err, hookadapt.HookadaptError)
    part["sharded_save_path"] = str(path)

    # summon_full_params is a collective that gives every rank the whole parameters.
    path = folder / f"fsdp1-{layout}-full.safetensors"
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        part["gathered"] = cpu_state(adapter_set.state_dict())
        part["full_save_error"] = None
        if rank == 0:
            try:
                hookadapt.save_adapters(adapter_set, path)
            except Exception as err:  # noqa: BLE001 - any failure is a result to report
                part["full_save_error"] = describe_error(err)
    dist.barrier()
    part["full_save_path"] = str(path)
    return part


def fsdp1_flat_params_error(device: torch.device) -> str | None:
    """Return the error of wrapping a frozen base with adapters in FSDP1 with use_orig_params=False."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    model = TinyNet().to(device)
    hookadapt.attach(model, CONFIG, freeze_base=True)
    try:
        FullyShardedDataParallel(model, use_orig_params=False, device_id=device)
    except ValueError as err:
        return str(err)
    return None


def fsdp_job(rank: int, device: torch.device, folder: Path) -> dict[str, Any]:
    """Train adapters under FSDP2 and FSDP1 in several layouts and return what each rank ends with."""
    results: dict[str, Any] = {}
    for layout in FSDP2_LAYOUTS:
        results[f"fsdp2_{layout}"] = fsdp2_part(rank, device, folder, layout)
    results["fsdp2_load"] = fsdp2_load_part(rank, device, Path(results["fsdp2_blocks"]["plain_save_path"]))
    for layout in FSDP1_LAYOUTS:
        results[f"fsdp1_{layout}"] = fsdp1_part(rank, device, folder, layout)
    results["fsdp1_flat_error"] = fsdp1_flat_params_error(device)
    return results


JOBS = {"ddp": ddp_job, "fsdp": fsdp_job}


# Fixtures: one run of each job per module.


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The per-rank results of the DDP job on gloo."""
    return spawn_job("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The per-rank results of the FSDP job on gloo."""
    return spawn_job("fsdp", tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """The adapter state after single-process training on both ranks' batches."""
    _, adapter_set = reference_state(CONFIG)
    return cpu_state(adapter_set.state_dict())


# DDP.


def test_ddp_ranks_start_from_rank0(ddp_results: list[dict[str, Any]]) -> None:
    """DDP copies rank 0's initial adapter values to rank 1, which drew others."""
    rank0, rank1 = (result["sync"]["initial"] for result in ddp_results)
    assert differing_keys(rank1, rank0, exact=True) == []


def test_ddp_ranks_identical_after_training(ddp_results: list[dict[str, Any]]) -> None:
    """Adapter weights are bitwise equal on both ranks after training on different data."""
    rank0, rank1 = (result["sync"]["trained"] for result in ddp_results)
    assert differing_keys(rank1, rank0, exact=True) == []


def test_ddp_adapters_change(ddp_results: list[dict[str, Any]]) -> None:
    """Training moves every adapter tensor away from its initial value."""
    sync = ddp_results[0]["sync"]
    unchanged = [key for key, value in sync["trained"].items() if torch.equal(value, sync["initial"][key])]
    assert unchanged == []


def test_ddp_base_stays_frozen(ddp_results: list[dict[str, Any]]) -> None:
    """The frozen base parameters are bitwise unchanged by training."""
    sync = ddp_results[0]["sync"]
    assert differing_keys(sync["base_after"], sync["base_before"], exact=True) == []


def test_ddp_matches_single_process(ddp_results: list[dict[str, Any]], reference: dict[str, torch.Tensor]) -> None:
    """Two ranks with half the batch each reach the single-process result on the whole batch."""
    assert differing_keys(ddp_results[0]["sync"]["trained"], reference, exact=False) == []


def test_ddp_stochastic_depth_differs_by_rank(ddp_results: list[dict[str, Any]]) -> None:
    """The job covers a forward where one rank dropped the adapter and the other kept it."""
    rank0, rank1 = (result["stochastic"]["dropped"] for result in ddp_results)
    assert len(rank0) == len(rank1)
    assert any(first != second for first, second in zip(rank0, rank1))


def test_ddp_stochastic_depth_ranks_identical(ddp_results: list[dict[str, Any]]) -> None:
    """Dropping an adapter on one rank only neither hangs DDP nor splits the weights."""
    rank0, rank1 = (result["stochastic"]["trained"] for result in ddp_results)
    assert differing_keys(rank1, rank0, exact=True) == []


def test_ddp_dropping_rank_adds_zero_gradient(ddp_results: list[dict[str, Any]]) -> None:
    """A rank that always drops the adapter contributes an exact zero gradient to the average."""
    _, adapter_set = reference_state(
        bottleneck_config(0.0), lambda step: rank_batch(1, step), loss_scale=1.0 / WORLD_SIZE
    )
    expected = cpu_state(adapter_set.state_dict())
    rank0, rank1 = (result["one_rank_drops"]["trained"] for result in ddp_results)
    assert differing_keys(rank1, rank0, exact=True) == []
    assert differing_keys(rank0, expected, exact=False) == []


def test_ddp_disabled_on_one_rank(ddp_results: list[dict[str, Any]]) -> None:
    """With find_unused_parameters=True, disabling an adapter on one rank keeps the ranks identical."""
    rank0, rank1 = (result["disabled_one_rank"]["trained"] for result in ddp_results)
    assert differing_keys(rank1, rank0, exact=True) == []


def test_ddp_checkpoint_loads_on_every_rank(ddp_results: list[dict[str, Any]]) -> None:
    """The file rank 0 saved gives every rank's fresh model the trained model's output."""
    for rank, result in enumerate(ddp_results):
        checkpoint = result["checkpoint"]
        assert torch.equal(checkpoint["loaded_output"], checkpoint["trained_output"]), f"rank {rank}"


def test_ddp_checkpoint_loads_in_one_process(ddp_results: list[dict[str, Any]]) -> None:
    """The file saved in the distributed job gives a single-process model the same output."""
    checkpoint = ddp_results[0]["checkpoint"]
    torch.manual_seed(0)
    model = TinyNet()
    with one_thread(), hookadapt.load_adapters(model, checkpoint["path"]):
        model.eval()
        with torch.no_grad():
            output = model(probe_input())
    assert torch.equal(output, checkpoint["trained_output"])


@pytest.mark.parametrize("target", ["wrapper", "module"])
def test_ddp_attach_after_wrapping(ddp_results: list[dict[str, Any]], target: str) -> None:
    """Attaching after DDP wraps the model raises AttachError, or the adapters still stay in sync."""
    rank0, rank1 = (result[f"late_{target}"] for result in ddp_results)
    if rank0["error"] is not None:
        assert rank0["error_type"] == "AttachError", rank0["error"]
        return
    differing = differing_keys(rank1["trained"], rank0["trained"], exact=True)
    assert differing == [], (
        f"attach to the DDP {target} raised nothing, and {len(differing)} of {len(rank0['trained'])} "
        f"adapter tensors differ between the ranks after training"
    )


# FSDP2.


@pytest.mark.parametrize("layout", FSDP2_LAYOUTS)
def test_fsdp2_shards_adapters(fsdp_results: list[dict[str, Any]], layout: str) -> None:
    """fully_shard turns the adapter parameters into DTensors, in every layout."""
    assert fsdp_results[0][f"fsdp2_{layout}"]["sharded"]


@pytest.mark.parametrize("layout", FSDP2_LAYOUTS)
def test_fsdp2_matches_single_process(
    fsdp_results: list[dict[str, Any]], reference: dict[str, torch.Tensor], layout: str
) -> None:
    """The gathered adapters equal single-process training on the whole batch, on both ranks."""
    for rank, result in enumerate(fsdp_results):
        assert differing_keys(result[f"fsdp2_{layout}"]["gathered"], reference, exact=False) == [], f"rank {rank}"


def test_fsdp2_full_state_dict(fsdp_results: list[dict[str, Any]]) -> None:
    """get_model_state_dict with full_state_dict gathers the adapters to rank 0 under their module paths."""
    model, _ = reference_state(CONFIG)
    expected = {key: value for key, value in cpu_state(model.state_dict()).items() if "_hookadapt" in key}
    assert differing_keys(fsdp_results[0]["fsdp2_blocks"]["model_state"], expected, exact=False) == []


@pytest.mark.parametrize("layout", ["blocks", "hosts"])
def test_fsdp2_save_adapters_gathers(
    fsdp_results: list[dict[str, Any]], reference: dict[str, torch.Tensor], layout: str
) -> None:
    """save_adapters called on every rank of a sharded model writes the full adapter tensors."""
    part = fsdp_results[0][f"fsdp2_{layout}"]
    assert part["save_error"] is None
    torch.manual_seed(0)
    model = TinyNet()
    adapter_set = hookadapt.load_adapters(model, part["save_path"])
    assert differing_keys(cpu_state(adapter_set.state_dict()), reference, exact=False) == []


@pytest.mark.parametrize("layout", FSDP2_LAYOUTS)
def test_fsdp2_save_through_plain_copy(
    fsdp_results: list[dict[str, Any]], reference: dict[str, torch.Tensor], layout: str
) -> None:
    """Gathered tensors copied into an unsharded model's adapters save and load as trained."""
    torch.manual_seed(0)
    model = TinyNet()
    adapter_set = hookadapt.load_adapters(model, fsdp_results[0][f"fsdp2_{layout}"]["plain_save_path"])
    assert differing_keys(cpu_state(adapter_set.state_dict()), reference, exact=False) == []


def test_fsdp2_load_before_sharding(fsdp_results: list[dict[str, Any]]) -> None:
    """A checkpoint loaded on every rank before fully_shard gives the single-process output."""
    part = fsdp_results[0]["fsdp2_load"]
    torch.manual_seed(0)
    model = TinyNet()
    with one_thread(), hookadapt.load_adapters(model, part["path"]):
        model.eval()
        with torch.no_grad():
            output = model(probe_input())
    for rank, result in enumerate(fsdp_results):
        assert torch.equal(result["fsdp2_load"]["output"], output), f"rank {rank}"


def test_fsdp2_fingerprint_names_base_class(fsdp_results: list[dict[str, Any]]) -> None:
    """The checkpoint fingerprint of a host that fully_shard wrapped names the host's own class."""
    assert fsdp_results[0]["fsdp2_hosts"]["fingerprint_class"] == "Linear"


# FSDP1 (FullyShardedDataParallel).


@pytest.mark.parametrize("layout", FSDP1_LAYOUTS)
def test_fsdp1_matches_single_process(
    fsdp_results: list[dict[str, Any]], reference: dict[str, torch.Tensor], layout: str
) -> None:
    """With use_orig_params=True the adapters, gathered by summon_full_params, equal single-process training."""
    for rank, result in enumerate(fsdp_results):
        assert differing_keys(result[f"fsdp1_{layout}"]["gathered"], reference, exact=False) == [], f"rank {rank}"


@pytest.mark.parametrize("layout", FSDP1_LAYOUTS)
def test_fsdp1_save_of_shards(fsdp_results: list[dict[str, Any]], reference: dict[str, torch.Tensor], layout: str) -> None:
    """save_adapters outside summon_full_params raises a HookadaptError or writes the full tensors."""
    part = fsdp_results[0][f"fsdp1_{layout}"]
    if part["sharded_save_error"] is not None:
        assert part["sharded_save_error_is_hookadapt"], part["sharded_save_error"]
        return
    shapes = {key: tuple(value.shape) for key, value in hookadapt.checkpoint.read_checkpoint(part["sharded_save_path"]).tensors.items()}
    expected = {key: tuple(value.shape) for key, value in reference.items()}
    wrong = sorted(key for key in expected if shapes.get(key) != expected[key])
    assert wrong == [], f"save_adapters wrote rank 0's flat shards, for example {wrong[0]}: {shapes.get(wrong[0])}"


@pytest.mark.parametrize("layout", FSDP1_LAYOUTS)
def test_fsdp1_save_in_summon(fsdp_results: list[dict[str, Any]], reference: dict[str, torch.Tensor], layout: str) -> None:
    """save_adapters on rank 0 inside summon_full_params writes the full adapters."""
    part = fsdp_results[0][f"fsdp1_{layout}"]
    assert part["full_save_error"] is None
    torch.manual_seed(0)
    model = TinyNet()
    adapter_set = hookadapt.load_adapters(model, part["full_save_path"])
    assert differing_keys(cpu_state(adapter_set.state_dict()), reference, exact=False) == []


def test_fsdp1_flat_params_need_orig_params(fsdp_results: list[dict[str, Any]]) -> None:
    """FSDP1 rejects a frozen base with trainable adapters unless use_orig_params=True, naming that option."""
    message = fsdp_results[0]["fsdp1_flat_error"]
    assert message is not None
    assert "use_orig_params" in message


# NCCL on two GPUs.


@TWO_GPUS
def test_ddp_nccl_identical_across_ranks(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """On NCCL, DDP keeps the adapters bitwise equal across ranks and matches single-process training."""
    results = spawn_job("ddp", tmp_path, backend="nccl")
    rank0, rank1 = (result["sync"]["trained"] for result in results)
    assert differing_keys(rank1, rank0, exact=True) == []
    assert differing_keys(rank0, reference, exact=False) == []
    rank0, rank1 = (result["stochastic"]["trained"] for result in results)
    assert differing_keys(rank1, rank0, exact=True) == []


@TWO_GPUS
def test_fsdp2_nccl_matches_single_process(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """On NCCL, FSDP2 and FSDP1 adapters gathered from the shards equal single-process training."""
    results = spawn_job("fsdp", tmp_path, backend="nccl")
    for key in [f"fsdp2_{layout}" for layout in FSDP2_LAYOUTS] + [f"fsdp1_{layout}" for layout in FSDP1_LAYOUTS]:
        assert differing_keys(results[0][key]["gathered"], reference, exact=False) == [], key


@TWO_GPUS
def test_ddp_example_nccl(tmp_path: Path) -> None:
    """The torchrun example trains MiniLM adapters on two GPUs with NCCL."""
    completed = run_example(tmp_path, "--backend", "nccl")
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert "bitwise equal on all 2 ranks" in completed.stdout


# The torchrun example on the real MiniLM.


def run_example(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run examples/ddp_train.py on two processes with torchrun for three small steps."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(EXAMPLE),
        "--adapter",
        "lora",
        "--steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--limit",
        "64",
        "--output",
        str(folder / "adapters.safetensors"),
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **loopback_environment()}
    return run_bounded(command, env=env, timeout=EXAMPLE_TIMEOUT)


@pytest.mark.slow
def test_ddp_example_minilm(tmp_path: Path) -> None:
    """The torchrun example trains LoRA on MiniLM, checks the ranks agree, and rank 0 saves a loadable file."""
    completed = run_example(tmp_path)
    assert completed.returncode == 0, completed.stdout[-4000:]
    assert "bitwise equal on all 2 ranks" in completed.stdout
    stored = hookadapt.checkpoint.read_checkpoint(tmp_path / "adapters.safetensors")
    assert list(stored.specs) == ["lora_qv"]
    assert stored.train_modules == ["head"]
    non_finite = [key for key, value in stored.tensors.items() if not torch.isfinite(value).all()]
    assert non_finite == []
