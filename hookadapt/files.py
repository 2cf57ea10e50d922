"""File helpers shared by the checkpoint formats: atomic writes and safetensors header checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointError

__all__ = ["MAX_HEADER_BYTES", "write_atomically", "check_safetensors_header"]

# hookadapt's own bound on a safetensors header, checked before any parser reads it.
# A header this large would describe about a million adapter tensors (an estimate).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then rename the file to ``path``.

    The temporary file sits in the same folder, so the rename is atomic: a
    crash at any point leaves either the previous file or the new one.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # Persist the rename itself; some platforms cannot open a folder, which only weakens durability.
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def check_safetensors_header(path: Path) -> None:
    """Raise `CheckpointError` unless ``path`` starts with a plausible safetensors header.

    The check reads 8 bytes, so a truncated or hostile file is rejected before
    a parser allocates memory for its header.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
    if len(prefix) < 8:
        msg = f"adapter checkpoint {str(path)!r} is truncated: {size} bytes, shorter than a safetensors header"
        raise CheckpointError(msg)
    header_bytes = int.from_bytes(prefix, "little")
    if header_bytes > MAX_HEADER_BYTES:
        msg = (
            f"adapter checkpoint {str(path)!r} declares a {header_bytes:,}-byte header, over the "
            f"{MAX_HEADER_BYTES:,}-byte limit; the file is corrupt or not a safetensors file"
        )
        raise CheckpointError(msg)
    if 8 + header_bytes > size:
        msg = (
            f"adapter checkpoint {str(path)!r} is truncated: its header needs {8 + header_bytes:,} bytes "
            f"but the file has {size:,}"
        )
        raise CheckpointError(msg)
