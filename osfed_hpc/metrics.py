"""The run's record: one JSON line per round, a progress line, and phase timers.

``metrics.jsonl`` is appended and fsynced line by line, so a job killed mid-round leaves every
finished round intact; on resume, lines past the checkpoint are moved aside, not deleted.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text_atomic


class PhaseTimer:
    """Wall seconds per named phase of a round."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null rather than produce an unreadable file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(_clean(record), sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed job
        return out

    def truncate_after(self, round_done: int, phase: tuple[int, int] | None = None) -> None:
        """Keep the lines of rounds <= ``round_done`` (and, with ``phase=(round, epoch)``, that round's
        server-phase lines up to ``epoch``); move the rest to ``metrics.jsonl.discarded``."""
        if not self.path.exists():
            return
        keep, drop = [], []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                drop.append(line)
                continue
            (keep if _kept(record, round_done, phase) else drop).append(line)
        if drop:
            with open(self.path.with_suffix(".jsonl.discarded"), "a") as handle:
                handle.write("\n".join(drop) + "\n")
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))


def _kept(record: dict[str, Any], round_done: int, phase: tuple[int, int] | None) -> bool:
    round_ = record.get("round", 0)
    if round_ <= round_done:
        return True
    return phase is not None and round_ == phase[0] and "phase_epoch" in record and record["phase_epoch"] <= phase[1]


def round_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The one line per round of ``metrics.jsonl`` (server-phase lines, which carry ``phase_epoch``, left out)."""
    return [r for r in records if "phase_epoch" not in r]


def phase_progress_line(line: dict[str, Any], eta_seconds: float | None = None) -> str:
    """``[server phase] round 1 epoch 3/20 loss 0.4121 (2.1 s) acc 91.20% ETA 0:00:36``"""
    stats = " ".join(f"{k} {v:.4g}" for k, v in line["phase_stats"].items())
    text = (f"[server phase] round {line['round']} epoch {line['phase_epoch']}/{line['phase_epochs']} "
            f"{stats} ({line['seconds']:.1f} s)")
    if line.get("test_accuracy") is not None:
        text += f" acc {100 * line['test_accuracy']:.2f}%"
    if eta_seconds is not None:
        text += f" ETA {format_duration(eta_seconds)}"
    return text


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded): 192.4 -> '0:03:12', 90061 -> '25:01:01'."""
    total = max(0, int(round(seconds)))
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def round_eta(round_seconds: list[float], rounds_left: int) -> float | None:
    """Mean seconds of the rounds done in this process x rounds left (None before the first round
    or after the last)."""
    if not round_seconds or rounds_left <= 0:
        return None
    return sum(round_seconds) / len(round_seconds) * rounds_left


def client_done_line(rank: int, size: int, round_: int, client: int, seconds: float, done: int, total: int) -> str:
    """A worker's line for a finished client in a slow round:
    ``[rank 2/3] round 5: client 17 done in 64.2 s (3/10)``."""
    return f"[rank {rank}/{size}] round {round_}: client {client} done in {seconds:.1f} s ({done}/{total})"


def progress_line(record: dict[str, Any], eta_seconds: float | None = None) -> str:
    acc = record.get("test_accuracy")
    acc_text = f"{100 * acc:6.2f}%" if isinstance(acc, float) else "   -   "
    loss = record.get("train_loss")
    return (
        f"round {record['round']:4d} | acc {acc_text} | loss {'  -   ' if loss is None else f'{loss:.4f}'} | "
        f"uplink {record['uplink_bytes_total'] / 1e6:10.3f} MB | {record['seconds']['round']:6.2f} s"
        + (f" | rejected {record['rejected']}" if record.get("rejected") else "")
        + (f" | eta {format_duration(eta_seconds)}" if eta_seconds is not None else "")
    )


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory since the last reset on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
