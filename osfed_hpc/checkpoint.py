"""Atomic, rank-layout-free checkpoints.

A checkpoint of round r is a directory ``checkpoints/round-<r>/`` holding
- ``server.npz``: the flat global state and the algorithm's server state (rank 0 writes it),
- ``clients/client-<id>.npz``: each client's state, written by the rank that hosts the client,
- ``manifest.json``: written last by rank 0 (temp + rename), with sizes and SHA-256 of every file.
A directory without a manifest is an interrupted write and is ignored. ``latest.json`` names the
newest complete checkpoint. Because client state is stored per client, a job may resume with a
different number of ranks. Everything is plain arrays: loading never executes code.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_json_atomic
from .client_state import load_arrays, save_arrays
from .errors import CheckpointError

FORMAT_VERSION = 1
KEEP = 2
#: config keys that may change between a run and its resumption (they do not change the model)
RESUMABLE_KEYS = ("rounds", "out", "eval", "runtime.checkpoint_every", "runtime.threads",
                  "runtime.state_dir", "runtime.client_state", "runtime.debug", "runtime.gather_limit_mb",
                  "data.num_workers")


def _drop(config: dict[str, Any], dotted: str) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part, {})
    node.pop(parts[-1], None)


def model_defining_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines the trained model."""
    config = json.loads(json.dumps(config))
    for key in RESUMABLE_KEYS:
        _drop(config, key)
    return config


def config_digest(config: dict[str, Any]) -> str:
    text = json.dumps(model_defining_config(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_dir(run_dir: Path, round_done: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{round_done:06d}"


def write_client_states(directory: Path, states: dict[int, dict[str, np.ndarray]]) -> None:
    """Called on every worker rank for the clients it hosts (after rank 0 made ``directory``)."""
    clients_dir = directory / "clients"
    clients_dir.mkdir(parents=True, exist_ok=True)
    for client, state in states.items():
        if state:
            save_arrays(clients_dir / f"client-{client:05d}.npz", state)


def write_server_part(directory: Path, round_done: int, vector: np.ndarray, server_state: dict[str, np.ndarray],
                      config: dict[str, Any], model_sha256: str, extra: dict[str, Any]) -> Path:
    """Rank 0, after every rank wrote its clients: server arrays, then the manifest, then ``latest``."""
    arrays = {"vector": vector, **{f"state.{k}": v for k, v in server_state.items()}}
    save_arrays(directory / "server.npz", arrays)
    files = {}
    for path in sorted(directory.rglob("*.npz")):
        files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "format_version": FORMAT_VERSION, "round": round_done, "model_sha256": model_sha256,
        "config_digest": config_digest(config), "config": config, "files": files, **extra,
    }
    write_json_atomic(directory / "manifest.json", manifest)
    root = directory.parent
    write_json_atomic(root / "latest.json", {"round": round_done, "dir": directory.name})
    complete = sorted(p for p in root.glob("round-*") if (p / "manifest.json").exists())
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory with a manifest, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.glob("round-*") if (p / "manifest.json").exists())
    return complete[-1] if complete else None


class Checkpoint:
    """A validated checkpoint, ready to restore from."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {self.directory}: unreadable manifest ({exc})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {self.directory}: format {self.manifest.get('format_version')} unsupported")
        if self.manifest.get("config_digest") != config_digest(config):
            diff = _differences(model_defining_config(self.manifest.get("config", {})), model_defining_config(config))
            raise CheckpointError(
                f"checkpoint {self.directory} was written by a different config; differing keys: {', '.join(diff) or '?'}"
            )
        self.round = int(self.manifest["round"])

    def _verified(self, relative: str) -> dict[str, np.ndarray]:
        path = self.directory / relative
        expected = self.manifest["files"].get(relative)
        if expected is None:
            raise CheckpointError(f"checkpoint {self.directory}: {relative} is not in the manifest")
        if not path.exists() or path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {self.directory}: {relative} is missing or damaged (size/SHA-256 mismatch)")
        try:
            return load_arrays(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.directory}: {relative} cannot be read ({exc})") from None

    def server(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        arrays = self._verified("server.npz")
        state = {k[len("state."):]: v for k, v in arrays.items() if k.startswith("state.")}
        return arrays["vector"], state

    def client_state(self, client: int) -> dict[str, np.ndarray]:
        relative = f"clients/client-{client:05d}.npz"
        return self._verified(relative) if relative in self.manifest["files"] else {}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix]
