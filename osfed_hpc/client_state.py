"""Per-client persistent state (error-feedback residuals, participation counts).

It lives on the rank that hosts the client. In memory by default; for large models (a ViT-L
residual is 1.2 GB, 60 of them 72 GB) in one ``.npz`` file per client on node-local disk,
loaded for the client's update and written back right after.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import RunError


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write plain arrays atomically (temp file + rename): a crash never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read arrays written by ``save_arrays``; never unpickles."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


class ClientStateStore:
    """Client state owned by one run: a fresh run refuses a state directory that already holds
    client files (another run's residuals would silently become this run's), and a resumed run
    empties it and restores exactly what its checkpoint holds (files written after that checkpoint,
    e.g. by a round that crashed, must not survive)."""

    def __init__(self, directory: str | Path | None = None, resume: bool = False) -> None:
        self.directory = Path(directory) if directory else None
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            found = sorted(self.directory.glob("client-*.npz"))
            if found and not resume:
                raise RunError(f"runtime.state_dir: {str(self.directory)!r} already holds the state of {len(found)} "
                               f"clients from another run; remove it or choose an empty directory")
            for stale in found:
                stale.unlink()
        self._memory: dict[int, dict[str, np.ndarray]] = {}

    def _file(self, client: int) -> Path:
        return self.directory / f"client-{client:05d}.npz"

    def get(self, client: int) -> dict[str, np.ndarray]:
        if self.directory is None:
            return self._memory.setdefault(client, {})
        file = self._file(client)
        return load_arrays(file) if file.exists() else {}

    def put(self, client: int, state: dict[str, np.ndarray]) -> None:
        if self.directory is None:
            self._memory[client] = state
        elif state:
            save_arrays(self._file(client), state)
        else:
            self._file(client).unlink(missing_ok=True)

    def clients(self) -> list[int]:
        if self.directory is None:
            return sorted(c for c, s in self._memory.items() if s)
        return sorted(int(p.stem.split("-")[1]) for p in self.directory.glob("client-*.npz"))

    def nbytes(self, client: int) -> int:
        return sum(a.nbytes for a in self.get(client).values())
