"""Train hookadapt adapters on MiniLM with DistributedDataParallel, one process per device.

Start it with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT for every process. Two processes on one CPU machine:

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 \\
        examples/ddp_train.py --steps 20 --output out/adapters.safetensors

Every process loads the MiniLM encoder and the review snippets from
site-packages (see README.md) and attaches the adapters before wrapping the
model in DDP. Each then trains on its own share of the data. At the end the
script checks that all processes hold bitwise-equal adapter weights, and
rank 0 saves the adapters and the head. ``--resume FILE`` loads such a file on every rank before
wrapping and trains on from there. The backend is NCCL when CUDA is
available and gloo otherwise.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import hookadapt
from hookadapt import demo


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", choices=sorted(demo.ADAPTER_CONFIGS), default="lora", help="adapter config from hookadapt.demo (default: lora); --resume takes the config from its file")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    parser.add_argument("--batch-size", type=int, default=16, help="review snippets per process and step (default: 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training snippets (default: all)")
    parser.add_argument("--output", type=Path, default=Path("ddp-output/adapters.safetensors"), help="checkpoint that rank 0 writes")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to load on every rank before training")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="process group backend (default: nccl with CUDA, else gloo)")
    return parser.parse_args(argv)


def collate(tokenizer: Any, rows: Sequence[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tokenize a list of (text, label) rows into a padded MiniLM batch and its labels."""
    encoded = tokenizer(
        [text for text, _ in rows],
        padding=True,
        truncation=True,
        max_length=demo.MAX_LENGTH,
        return_tensors="pt",
    )
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    return inputs, torch.tensor([label for _, label in rows])


def count_differences_from_rank0(adapter_set: hookadapt.AdapterSet) -> int:
    """Return how many adapter tensors, summed over all ranks, differ from rank 0's.

    Every rank must call it, because it broadcasts rank 0's tensors.
    """
    differences = 0
    for value in adapter_set.state_dict().values():
        reference = value.clone()
        dist.broadcast(reference, src=0)
        differences += int(not torch.equal(reference, value))
    total = torch.tensor([differences], device=next(adapter_set.parameters()).device)
    dist.all_reduce(total)
    return int(total.item())


def train(args: argparse.Namespace, device: torch.device) -> None:
    """Attach or load the adapters, train them under DDP, check the ranks agree and save from rank 0."""
    rank = dist.get_rank()
    world_size = dist.get_world_size()

    # The same seed on every rank gives the same head and adapter values, although
    # DDP would also copy rank 0's parameters to the other ranks when it wraps the model.
    torch.manual_seed(0)
    tokenizer, encoder = demo.load_encoder()
    model = demo.ReviewClassifier(encoder).to(device)

    # Attach (or load) before wrapping: DDP lists the parameters to synchronize when it is built.
    if args.resume is not None:
        adapter_set = hookadapt.load_adapters(model, args.resume, freeze_base=True)
    else:
        config = demo.ADAPTER_CONFIGS[args.adapter]
        adapter_set = hookadapt.attach(model, config, freeze_base=True, train_modules=["head"])
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(adapter_set.parameters(), lr=args.lr)

    train_rows, _ = demo.load_reviews()
    if args.limit is not None:
        train_rows = train_rows[: args.limit]
    # Each rank reads its own share of every epoch; all ranks take the same number of steps.
    sampler = DistributedSampler(train_rows, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_rows, batch_size=args.batch_size, sampler=sampler, collate_fn=functools.partial(collate, tokenizer))

    ddp_model.train()
    step = 0
    epoch = 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for inputs, labels in loader:
            inputs = {key: value.to(device) for key, value in inputs.items()}
            logits = ddp_model(**inputs)
            loss = nn.functional.cross_entropy(logits, labels.to(device)) + adapter_set.auxiliary_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if rank == 0:
                print(f"step {step}/{args.steps}: loss {loss.item():.4f} on rank 0's batch", flush=True)
            if step >= args.steps:
                break
        epoch += 1

    differences = count_differences_from_rank0(adapter_set)
    if differences:
        msg = f"{differences} adapter tensors differ from rank 0's after training; the ranks are out of sync"
        raise RuntimeError(msg)
    if rank == 0:
        print(f"adapter weights are bitwise equal on all {world_size} ranks", flush=True)

    # One process writes the file. The barrier keeps the others from going on, for example
    # to read the file, before it is complete.
    if rank == 0:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        hookadapt.save_adapters(adapter_set, args.output)
        print(f"saved {args.output}", flush=True)
    dist.barrier()


def main(argv: Sequence[str] | None = None) -> None:
    """Join the process group that torchrun describes, train, and leave the group."""
    args = parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    try:
        train(args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
