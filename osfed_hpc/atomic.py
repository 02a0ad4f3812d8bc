"""Atomic file writes: a reader never sees half a file.

The one place that knows how: every artefact (shards, ``dataset.json``, partitions, ``skipped.tsv``,
checkpoints and their manifests, client state, ``metrics.jsonl`` rewrites, ``summary.json``) is written
to a temporary name in the same directory, flushed to disk, then ``os.replace``d onto its final
name. A crash (or a SLURM time limit) therefore leaves either the old file, the new file, or a
``*.tmp-*`` leftover that the next run deletes, and a conversion can be resumed by looking at which
final names exist.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def temp_path_for(path: Path) -> Path:
    """The temporary sibling of ``path`` used while it is being written (unique per process)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def fsync_path(path: Path) -> None:
    """Flush a closed file's data to disk, so that the rename cannot overtake the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    Use it for writers that want a file name (h5py, numpy); ``write_bytes_atomic`` covers bytes.
    """
    final = Path(path)
    tmp = temp_path_for(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent))


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete ``*.tmp-*`` leftovers of interrupted writes in ``directory``; return what was removed."""
    removed = []
    if directory.is_dir():
        for entry in sorted(directory.iterdir()):
            if TMP_MARK in entry.name and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed
