"""A throttled progress line for long conversions (rate and ETA on stderr).

Converting ImageNet takes hours; a line at most every ``interval`` seconds says how far it is
without flooding a SLURM log. On a terminal the line is rewritten in place, in a log file each
update is its own line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = int(max(0, round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Count done items against a total; print ``label: done/total (pct) rate img/s ETA``."""

    def __init__(
        self,
        total: int,
        label: str,
        enabled: bool = True,
        interval: float = 2.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.label, self.enabled, self.interval = total, label, enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit(now, final=False)

    def close(self) -> None:
        if self.enabled:
            self._emit(time.monotonic(), final=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = format_duration(eta) if eta == eta else "?"
        return (
            f"{self.label}: {self.done:,}/{self.total:,} images ({pct:.1f}%) "
            f"{rate:,.0f} img/s, elapsed {format_duration(elapsed)}, ETA {eta_s}"
        )

    def _emit(self, now: float, final: bool) -> None:
        text = self.line(now)
        if self._tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
