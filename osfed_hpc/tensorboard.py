"""TensorBoard scalars per round (``runtime.tensorboard: true``), written by rank 0.

The event files go into the run directory itself, next to ``metrics.jsonl``, so
``tensorboard --logdir runs/`` shows every run under its directory name. ``metrics.jsonl`` stays
the record; this is a view of it. On resume the writer is opened with ``purge_step=start_round``:
TensorBoard then drops the steps the interrupted job logged after its last checkpoint, just as
``metrics.jsonl`` moves those lines aside.

Needs the ``tensorboard`` package (``pip install 'osfed-hpc[tensorboard]'``); a config that asks
for it without the package stops with a ConfigError before any work.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: metrics.jsonl key -> TensorBoard tag (the same names, so the two read alike)
SCALARS = {
    "test_accuracy": "test_accuracy",
    "test_loss": "test_loss",
    "train_loss": "train_loss",
    "uplink_bytes_total": "uplink_bytes_total",
    "downlink_bytes_total": "downlink_bytes_total",
    "uplink_bytes": "uplink_bytes",
    "downlink_bytes": "downlink_bytes",
}
ROUND_SECONDS_TAG = "round_seconds"
MISSING_MESSAGE = ("config key 'runtime.tensorboard': true needs the 'tensorboard' package, which is not "
                   "installed (pip install 'osfed-hpc[tensorboard]', or pip install tensorboard)")


def _summary_writer_class():
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def require_tensorboard() -> None:
    """Raise ConfigError when ``torch.utils.tensorboard`` cannot be imported."""
    from .config import ConfigError

    try:
        _summary_writer_class()
    except ImportError:
        raise ConfigError(MISSING_MESSAGE) from None


class TensorBoardLog:
    """Scalars of each logged round, flushed after every round (a killed job keeps them)."""

    def __init__(self, log_dir: Path, start_round: int = 1) -> None:
        from .config import ConfigError

        try:
            writer_cls = _summary_writer_class()
        except ImportError:
            raise ConfigError(MISSING_MESSAGE) from None
        # purge_step: a restart at start_round drops events of rounds >= start_round from older files
        self.writer = writer_cls(log_dir=str(log_dir), purge_step=start_round)
        self.closed = False

    @classmethod
    def open(cls, config, run_dir: Path, start_round: int) -> TensorBoardLog | None:
        """The writer when ``config.runtime.tensorboard`` is on, else None."""
        if not getattr(config.runtime, "tensorboard", False):
            return None
        return cls(run_dir, start_round)

    def log_round(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, tag in SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, float(value), step)
        seconds = (record.get("seconds") or {}).get("round")
        if isinstance(seconds, (int, float)):
            self.writer.add_scalar(ROUND_SECONDS_TAG, float(seconds), step)
        self.writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.writer.close()
            self.closed = True


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``log_dir`` as [(step, value)], after TensorBoard's own purging of
    restarted steps (what its UI would show). For tests and quick checks."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}
