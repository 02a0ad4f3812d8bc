"""``env.jsonl``: what ran, where and with what, one JSON line per start or restart of a run.

Weeks after a 60-client ImageNet job, "which commit was that, on which nodes, with which NCCL"
should be a ``jq`` away, also for a run that SLURM requeued three times. Every rank contributes
its host and device (gathered as UTF-8 JSON with the World's buffer calls, never pickled); rank 0
appends the line after setup succeeded. Nothing here may fail a run: a missing ``git``, a source
tree that is no checkout, a CPU build without cuDNN or NCCL all give ``None``.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__

ENV_FILE = "env.jsonl"
#: seconds each git call may take (a slow network file system must not hold up the job)
GIT_TIMEOUT_S = 5.0
#: the directory that holds the ``osfed_hpc`` package (a checkout's root, or site-packages)
SOURCE_DIR = Path(__file__).resolve().parent.parent


def _git(source: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_info(source: Path | None = None) -> dict[str, Any]:
    """``commit`` (``git rev-parse HEAD``) and ``dirty`` (``git status --porcelain`` is non-empty) of
    the source tree, both None when it is not a git checkout or git does not answer in time."""
    source = Path(source) if source is not None else SOURCE_DIR
    if not (source / ".git").exists():  # an installed package inside some other repository is not ours
        return {"commit": None, "dirty": None}
    commit = _git(source, "rev-parse", "HEAD")
    status = _git(source, "status", "--porcelain") if commit else None
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status.strip())}


def library_versions() -> dict[str, Any]:
    """python, numpy, torch, CUDA, cuDNN, NCCL, mpi4py and the MPI library (None where absent)."""
    versions: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        nccl = None
        if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
            raw = torch.cuda.nccl.version()
            nccl = ".".join(str(v) for v in raw) if isinstance(raw, tuple) else str(raw)
        versions["nccl"] = nccl
    except Exception:  # noqa: BLE001 -- a broken accelerator stack must not fail the run
        versions.setdefault("torch", None)
        for key in ("cuda", "cudnn", "nccl"):
            versions.setdefault(key, None)
    versions["mpi4py"], versions["mpi_library"] = None, None
    if "mpi4py.MPI" in sys.modules:  # only where the run started MPI; importing it here would start it
        try:
            import mpi4py
            from mpi4py import MPI

            versions["mpi4py"] = mpi4py.__version__
            versions["mpi_library"] = " ".join(MPI.Get_library_version().split()) or None
        except Exception:  # noqa: BLE001
            pass
    return versions


def slurm_info() -> dict[str, Any]:
    env = os.environ
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": int(env["SLURM_RESTART_COUNT"]) if env.get("SLURM_RESTART_COUNT", "").isdigit() else None,
        "nodelist": env.get("SLURM_JOB_NODELIST"),
    }


def command_overrides(argv: list[str]) -> list[str]:
    """The ``key.sub=value`` arguments of an ``osfed-hpc run`` command line."""
    return [item for item in argv[1:] if "=" in item and not item.startswith("-")]


def gather_ranks(world, device_text: str, threads: int | None = None,
                 host_memory: str | None = None) -> list[dict[str, Any]] | None:
    """Every rank's host, device, pid, threads and host allocator policy on rank 0 (None elsewhere). A
    collective: every rank of ``world`` calls it. UTF-8 JSON through ``World.gatherv_bytes``; nothing is
    unpickled."""
    mine = {"rank": world.rank, "host": socket.gethostname(), "device": device_text, "pid": os.getpid(),
            "threads": threads, "host_memory": host_memory}
    data = np.frombuffer(json.dumps(mine).encode(), dtype=np.uint8)
    gathered = world.gatherv_bytes(data)
    if gathered is None:
        return None
    raw, counts = gathered
    out, offset = [], 0
    for count in counts:
        out.append(json.loads(bytes(raw[offset : offset + int(count)]).decode()))
        offset += int(count)
    return out


def environment_record(ranks: list[dict[str, Any]], resume: bool, start_round: int,
                       argv: list[str] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv if argv is None else argv)
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "osfed_hpc_version": __version__,
        "git": git_info(),
        "argv": argv,
        "overrides": command_overrides(argv) if overrides is None else list(overrides),
        "resume": bool(resume),
        "start_round": int(start_round),
        "slurm": slurm_info(),
        **library_versions(),
        "world_size": len(ranks),
        "ranks": ranks,
    }


def record_environment(run_dir: Path, world, device_text: str, resume: bool, start_round: int = 1,
                       threads: int | None = None, argv: list[str] | None = None,
                       overrides: list[str] | None = None, host_memory: str | None = None) -> dict[str, Any] | None:
    """Append this start's line to ``run_dir/env.jsonl`` (rank 0); a collective over ``world``.
    Returns the record on rank 0, None elsewhere. A failure to write is a warning, not an error."""
    ranks = gather_ranks(world, device_text, threads, host_memory)
    if ranks is None:
        return None
    record = environment_record(ranks, resume, start_round, argv, overrides)
    try:
        with open(Path(run_dir) / ENV_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        print(f"[osfed-hpc] warning: could not write {ENV_FILE}: {exc}", file=sys.stderr, flush=True)
    return record


def read_environment(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``run_dir/env.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / ENV_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
