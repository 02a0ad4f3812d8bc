"""Checks for algorithm options: each error names the key as the user writes it (``algorithm.X``)."""
from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(key: str, value: Any, low: int, high: int | None = None) -> None:
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"algorithm.{key} must be an integer {bound}, got {value!r}")


def require_positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"algorithm.{key} must be a positive number, got {value!r}")


def require_nonnegative(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"algorithm.{key} must be a number >= 0, got {value!r}")


def require_fraction(key: str, value: Any, *, open_low: bool = True, closed_high: bool = True) -> None:
    """A number in (0, 1] (or [0, 1) / [0, 1] by the flags)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if open_low else value >= 0) and (value <= 1 if closed_high else value < 1)
    if not ok:
        interval = f"{'(' if open_low else '['}0, 1{']' if closed_high else ')'}"
        raise ValueError(f"algorithm.{key} must be a number in {interval}, got {value!r}")


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"algorithm.{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def require_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"algorithm.{key} must be true or false, got {value!r}")
