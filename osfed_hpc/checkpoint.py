"""Atomic, rank-layout-free checkpoints.

A checkpoint of round r is a directory ``checkpoints/round-<r>/`` holding
- ``server.npz``: the flat global state and the algorithm's server state (rank 0 writes it),
- ``clients/client-<id>.npz``: each client's state, written by the rank that hosts the client,
- ``manifest.json``: written last by rank 0 (temp + rename), with sizes and SHA-256 of every file.
A directory without a manifest is an interrupted write and is ignored. ``latest.json`` names the
newest complete checkpoint. Because client state is stored per client, a job may resume with a
different number of ranks. Everything is plain arrays: loading never executes code.

Each file is hashed by the rank that writes it, from the bytes it writes (serialised in memory,
hashed, then written atomically); the workers send rank 0 only their small {file: bytes, sha256}
records, so rank 0 never reads the client files back (60 ResNet-18 residuals are 2.8 GB a round).

A full disk (ENOSPC, or EDQUOT for a quota) while writing a checkpoint or a result file is a
one-line ``RunError`` naming the file; since every file is written atomically and old checkpoints
are removed only after a newer one is complete, the previous complete checkpoint stays usable.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .atomic import write_json_atomic
from .client_state import load_arrays
from .errors import CheckpointError, RunError

FORMAT_VERSION = 1
KEEP = 2
#: config keys that may change between a run and its resumption (they do not change the model)
RESUMABLE_KEYS = ("rounds", "out", "eval", "runtime.checkpoint_every", "runtime.threads",
                  "runtime.state_dir", "runtime.client_state", "runtime.debug", "runtime.gather_limit_mb",
                  "runtime.tensorboard", "runtime.save_snapshots", "runtime.host_memory",
                  "data.num_workers")


def _drop(config: dict[str, Any], dotted: str) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
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


def phase_checkpoint_dir(run_dir: Path, round_done: int, epoch: int) -> Path:
    """A checkpoint inside round ``round_done + 1``'s server phase, after ``epoch`` epochs. The name
    sorts after ``round-<round_done>`` and before ``round-<round_done + 1>``, so "newest" stays the
    last name in order."""
    return Path(run_dir) / "checkpoints" / f"round-{round_done:06d}-phase-{epoch:06d}"


def _run_dir_of(directory: Path) -> Path:
    """``RUN/checkpoints/round-N`` -> ``RUN``."""
    return Path(directory).parent.parent


#: errno values that mean "the file system is full for us", and how the error says it
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


@contextlib.contextmanager
def disk_full_guard(path: Path, run_dir: Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised while writing ``path`` into a one-line ``RunError`` that names the file
    and the newest complete checkpoint of ``run_dir`` (still intact: writes are atomic and a
    checkpoint is pruned only after a newer one is complete). Other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        reason = _DISK_FULL.get(exc.errno)
        if reason is None:
            raise
        latest = latest_checkpoint(run_dir)
        if latest is None:
            kept = "no checkpoint of this run is complete yet"
        else:
            kept = (f"the previous checkpoint {latest.name} is intact (free space, then resume with "
                    f"'osfed-hpc run --resume {run_dir}')")
        raise RunError(f"{reason} while writing {path}; {kept}") from None


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write plain arrays atomically; return the file's {bytes, sha256}, computed from the bytes
    written (serialised in memory first: the writer never reads its file back)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getbuffer()
    record = {"bytes": data.nbytes, "sha256": hashlib.sha256(data).hexdigest()}
    atomic.write_bytes_atomic(path, data)
    return record


def begin_checkpoint(directory: Path) -> None:
    """Rank 0, before any rank writes into ``directory``: create it. Leftovers of an interrupted
    attempt at the same round (no manifest) are removed first: they are in no manifest, and a
    complete checkpoint is never touched."""
    directory = Path(directory)
    if directory.is_dir() and not (directory / "manifest.json").exists():
        shutil.rmtree(directory, ignore_errors=True)
    with disk_full_guard(directory, _run_dir_of(directory)):
        directory.mkdir(parents=True, exist_ok=True)


def write_client_states(directory: Path, states: dict[int, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Called on every worker rank for the clients it hosts (after rank 0 made ``directory``).

    Returns {path relative to ``directory``: {"bytes", "sha256"}} of the files written, for rank 0's
    manifest (``encode_file_records`` / ``decode_file_records`` carry it there)."""
    directory = Path(directory)
    run_dir = _run_dir_of(directory)
    clients_dir = directory / "clients"
    records: dict[str, dict[str, Any]] = {}
    for client, state in sorted(states.items()):
        if not state:
            continue
        relative = f"clients/client-{client:05d}.npz"
        with disk_full_guard(directory / relative, run_dir):
            clients_dir.mkdir(parents=True, exist_ok=True)
            records[relative] = _write_npz(directory / relative, state)
    return records


def encode_file_records(records: dict[str, dict[str, Any]]) -> np.ndarray:
    """A rank's file records as UTF-8 JSON bytes for ``World.gatherv_bytes`` (never pickled)."""
    if not records:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(json.dumps(records, sort_keys=True).encode(), dtype=np.uint8)


def decode_file_records(data: np.ndarray, counts: np.ndarray) -> dict[str, dict[str, Any]]:
    """Rank 0: the gathered records of every rank (``counts`` bytes each, in rank order), merged."""
    merged: dict[str, dict[str, Any]] = {}
    offset = 0
    for count in (int(c) for c in counts):
        if count:
            merged.update(json.loads(bytes(data[offset:offset + count]).decode()))
        offset += count
    return merged


def write_server_part(directory: Path, round_done: int, vector: np.ndarray, server_state: dict[str, np.ndarray],
                      config: dict[str, Any], model_sha256: str, extra: dict[str, Any],
                      client_files: dict[str, dict[str, Any]]) -> Path:
    """Rank 0, after every rank wrote its clients: server arrays, then the manifest, then ``latest``.

    ``client_files``: the records the writing ranks returned from ``write_client_states`` (rank 0
    does not read the client files); ``server.npz`` is hashed here as it is written."""
    directory = Path(directory)
    run_dir = _run_dir_of(directory)
    arrays = {"vector": vector, **{f"state.{k}": v for k, v in server_state.items()}}
    with disk_full_guard(directory / "server.npz", run_dir):
        files = {"server.npz": _write_npz(directory / "server.npz", arrays)}
    files.update(client_files)
    manifest = {
        "format_version": FORMAT_VERSION, "round": round_done, "model_sha256": model_sha256,
        "config_digest": config_digest(config), "config": config, "files": dict(sorted(files.items())), **extra,
    }
    with disk_full_guard(directory / "manifest.json", run_dir):
        write_json_atomic(directory / "manifest.json", manifest)
    root = directory.parent
    with disk_full_guard(root / "latest.json", run_dir):
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
    """A validated checkpoint, ready to restore from.

    The manifest is checked whole on opening (a JSON object with an integer ``round``, a
    ``config_digest`` and ``files`` of {bytes, sha256}), so a malformed one is a ``CheckpointError``
    naming it, never a KeyError or TypeError later; the model must hold only finite values.
    """

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory / "manifest.json")
        stored_digest, digest = self.manifest["config_digest"], config_digest(config)
        if stored_digest != digest:
            diff = _differences(model_defining_config(self.manifest.get("config", {})), model_defining_config(config))
            if diff:
                raise CheckpointError(f"checkpoint {self.directory} was written by a different config; "
                                      f"differing keys: {'; '.join(diff)}")
            raise CheckpointError(
                f"checkpoint {self.directory}: its config digest {stored_digest} differs from this config's {digest}, "
                f"though no model-defining key differs: it was probably written by another osfed-hpc version "
                f"(another digest recipe); resume it with that version, or start a new run")
        self.round = self.manifest["round"]

    def _verified(self, relative: str) -> dict[str, np.ndarray]:
        path = self.directory / relative
        expected = self.manifest["files"].get(relative)
        if expected is None:
            raise CheckpointError(f"checkpoint {self.directory}: {relative} is not in the manifest")
        if not path.exists() or path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {self.directory}: {relative} is missing or damaged "
                                  f"(size/SHA-256 mismatch)")
        try:
            return load_arrays(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.directory}: {relative} cannot be read ({exc})") from None

    def server(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        arrays = self._verified("server.npz")
        vector = arrays.get("vector")
        if vector is None or vector.ndim != 1 or vector.dtype != np.float32:
            found = "none" if vector is None else f"{vector.dtype}{list(vector.shape)}"
            raise CheckpointError(f"checkpoint {self.directory}: server.npz holds no float32 model vector "
                                  f"(found: {found})")
        bad = int(vector.size - np.count_nonzero(np.isfinite(vector)))
        if bad:
            raise CheckpointError(f"checkpoint {self.directory}: the model in server.npz holds {bad} non-finite values "
                                  f"(NaN or Inf) of {vector.size}; it cannot be resumed from")
        state = {k[len("state."):]: v for k, v in arrays.items() if k.startswith("state.")}
        return vector, state

    def client_state(self, client: int) -> dict[str, np.ndarray]:
        relative = f"clients/client-{client:05d}.npz"
        return self._verified(relative) if relative in self.manifest["files"] else {}


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint's ``manifest.json``, checked: any flaw is a CheckpointError naming the file."""
    path = Path(path)

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint manifest {path}: {problem}")

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror or exc})") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad(f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); expected JSON") from None
    except json.JSONDecodeError as exc:
        raise bad(f"is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
        kind = kinds.get(type(manifest), "null")
        raise bad(f"holds a JSON {kind}, expected an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version is {_show(manifest.get('format_version'))}, this osfed-hpc reads {FORMAT_VERSION}")
    for key, expected in (("round", "an integer >= 0"), ("config_digest", "a SHA-256 hex string"),
                          ("files", "an object {file: {bytes, sha256}}")):
        if key not in manifest:
            raise bad(f"has no {key!r} (expected {expected})")
    if not _is_int(manifest["round"]) or manifest["round"] < 0:
        raise bad(f"'round' is {_show(manifest['round'])}, expected an integer >= 0")
    if not isinstance(manifest["config_digest"], str):
        raise bad(f"'config_digest' is {_show(manifest['config_digest'])}, expected a SHA-256 hex string")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise bad(f"'files' is {_show(files)}, expected an object {{file: {{bytes, sha256}}}}")
    for name, entry in files.items():
        ok = (isinstance(entry, dict) and _is_int(entry.get("bytes")) and entry["bytes"] >= 0
              and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)
        if not ok:
            raise bad(f"files[{name!r}] is {_show(entry)}, expected {{'bytes': an integer >= 0, "
                      f"'sha256': 64 hex digits}}")
    if not isinstance(manifest.get("config", {}), dict):
        raise bad(f"'config' is {_show(manifest['config'])}, expected an object")
    totals = manifest.get("totals", {})
    if not isinstance(totals, dict) or not all(_is_number(v) for v in totals.values()):
        raise bad(f"'totals' is {_show(totals)}, expected an object of numbers")
    wall = manifest.get("wall_seconds", 0.0)
    if not _is_number(wall):
        raise bad(f"'wall_seconds' is {_show(wall)}, expected a finite number")
    phase = manifest.get("phase")
    if phase is not None:
        ok = (isinstance(phase, dict) and all(_is_int(phase.get(k)) for k in ("round", "epoch", "epochs"))
              and phase["round"] == manifest["round"] + 1 and 0 <= phase["epoch"] <= phase["epochs"]
              and isinstance(phase.get("record"), dict))
        if not ok:
            raise bad(f"'phase' is {_show(phase)}, expected {{'round': the next round, 'epoch' <= 'epochs', "
                      f"'record': an object}}")
    return manifest


_ABSENT = object()


def _canonical(value: Any) -> str:
    """Values compare as the digest sees them: 1 and 1.0, or true and 1, differ."""
    return json.dumps(value, sort_keys=True)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """'key (checkpoint: X, now: Y)' for every leaf whose JSON differs (a list is one leaf)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}.{key}" if prefix else key)
        return out
    if a is not _ABSENT and b is not _ABSENT and _canonical(a) == _canonical(b):
        return []
    shown = ["absent" if v is _ABSENT else _show(v) for v in (a, b)]
    return [f"{prefix or 'the config'} (checkpoint: {shown[0]}, now: {shown[1]})"]
