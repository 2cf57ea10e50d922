"""Command line: ``python -m hookadapt demo`` and ``python -m hookadapt inspect FILE``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import read_checkpoint
    from .errors import CheckpointError

    from .config import config_to_dict

    try:
        stored = read_checkpoint(args.path)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if stored.format == "peft":
        print(f"{args.path}: PEFT LoRA checkpoint, read as hookadapt adapter 'default'")
    else:
        metadata = stored.metadata
        print(f"{args.path}: hookadapt format {metadata['format_version']}, written by hookadapt {metadata.get('hookadapt_version', '?')}")
    print(f"train modules: {', '.join(stored.train_modules) or 'none'}")
    print("config:")
    print(json.dumps(config_to_dict(stored.specs), indent=2))
    tensors = stored.tensors
    total = sum(tensor.numel() for tensor in tensors.values())
    print(f"tensors: {len(tensors)}, {total:,} values")
    for key, tensor in tensors.items():
        print(f"  {key}  {tuple(tensor.shape)}  {str(tensor.dtype).replace('torch.', '')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run a subcommand; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m hookadapt", description="hookadapt command line")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="fine-tune adapters on MiniLM and Rotten Tomatoes reviews", add_help=False)
    inspect_parser = commands.add_parser("inspect", help="print the config and tensors of an adapter checkpoint")
    inspect_parser.add_argument("path", help="a .safetensors file written by hookadapt.save_adapters")

    if argv and argv[0] == "demo":
        from . import demo

        return demo.main(argv[1:])
    args = parser.parse_args(argv)
    return _inspect(args)
