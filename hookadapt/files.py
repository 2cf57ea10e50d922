"""File helpers shared by the checkpoint formats: atomic writes and safetensors header checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import CheckpointError

__all__ = ["MAX_HEADER_BYTES", "write_atomically", "write_files_atomically", "check_safetensors_header"]

# hookadapt's own bound on a safetensors header, checked before any parser reads it.
# A header this large would describe about a million adapter tensors (an estimate).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then rename the file to ``path``.

    The temporary file sits in the same folder, so the rename is atomic: a
    crash at any point leaves either the previous file or the new one.
    """
    write_files_atomically({path: write})


def write_files_atomically(writers: Mapping[Path, Callable[[str], None]]) -> None:
    """Write every file under a temporary name first, then rename them all, one after another.

    No file is replaced until every one is written and synced, which keeps
    the window in which a crash mixes old and new files to the renames alone.
    """
    temporaries: dict[Path, str] = {}
    try:
        for path, write in writers.items():
            handle, temporaries[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(handle)
            write(temporaries[path])
            with open(temporaries[path], "rb") as file:
                os.fsync(file.fileno())
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise
    for folder in {path.parent for path in writers}:
        # Persist the renames; a platform that cannot open a folder only loses durability.
        with contextlib.suppress(OSError):
            handle = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)


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
