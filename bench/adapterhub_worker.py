"""Time bottleneck adapter training steps with AdapterHub's ``adapters``, hookadapt and the inline floor.

This script runs inside ``.venv-adapterhub`` (see `adapterhub_env`), whose
transformers 4.57 ``adapters`` 1.3.0 requires; `case_adapterhub` starts it.
The three variants train their own copies of MiniLM-L6 on the same batch,
interleaved as in case 2, and the last line of output is one JSON object
with the raw samples and the versions used.

Usage: ``python bench/adapterhub_worker.py --rounds N [--warmup K] [--max-seconds S] [--threads T]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys

import torch
from torch import nn

from minilm import (
    BOTTLENECK_CONFIG,
    BOTTLENECK_DIM,
    Variant,
    hookadapt_variant,
    inline_bottleneck_variant,
    load_minilm,
    random_batch,
    training_step,
)
from timing import interleave

ADAPTER_NAME = "bottleneck"


def adapterhub_variant(model: nn.Module) -> Variant:
    """Add a ``seq_bn`` adapter with a bottleneck of 64 to ``model`` and train only it.

    ``reduction_factor`` is hidden size / 64; the SiLU (``swish``) activation
    and a LayerNorm before the down projection (``ln_before``) follow
    hookadapt's ``linear`` network as far as the config allows.
    """
    import adapters

    # add_adapter warns that no adapter is active yet; train_adapter activates it just after.
    logging.getLogger("adapters").setLevel(logging.ERROR)
    adapters.init(model)
    reduction = model.config.hidden_size / BOTTLENECK_DIM
    config = adapters.SeqBnConfig(reduction_factor=reduction, non_linearity="swish", ln_before=True)
    model.add_adapter(ADAPTER_NAME, config=config)
    model.train_adapter(ADAPTER_NAME)
    return Variant(model, [parameter for parameter in model.parameters() if parameter.requires_grad])


def versions() -> dict[str, str]:
    """Return the versions of Python and the packages this environment runs."""
    import adapters
    import transformers

    import hookadapt

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "adapters": adapters.__version__,
        "hookadapt": hookadapt.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved measurement and print its samples as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, required=True, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop after the round that passes this time")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = load_minilm()
    batch = random_batch(base)
    variants = {
        "hookadapt": hookadapt_variant(copy.deepcopy(base), BOTTLENECK_CONFIG),
        "adapters": adapterhub_variant(copy.deepcopy(base)),
        "inline": inline_bottleneck_variant(copy.deepcopy(base)),
    }
    trainable = {name: sum(parameter.numel() for parameter in variant.parameters) for name, variant in variants.items()}
    steps = {name: training_step(variant, batch) for name, variant in variants.items()}
    samples = interleave(steps, rounds=args.rounds, warmup_rounds=args.warmup, max_seconds=args.max_seconds)
    print(json.dumps({"samples": samples, "trainable_parameters": trainable, "versions": versions()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
