"""One client must not take the round down: each decoded contribution is checked before it enters
the fold, and a bad one is rejected and named while the others are kept.

The rule: a client's update is rejected when it holds NaN or Inf, or when its norm is more than
``ratio`` times the reference, which is the median norm of the updates accepted in the previous
round (in the first round, or after a round that accepted none: the norm of the model itself). One
finite but absurd update (3e38 everywhere) would otherwise overflow the sum, the server would discard
the whole round, and, with the same client every round, every round. A median of the previous round
is used because the fold streams payloads in client-id order and cannot look at the round's others
before folding one; the median of many clients is not moved by a single outlier.
"""
from __future__ import annotations

import math

import numpy as np
import torch

REFERENCE = "update_guard.reference"


class UpdateGuard:
    def __init__(self, ratio: float = 100.0) -> None:
        self.ratio = ratio
        self.previous: float | None = None  # median accepted norm of the last round that accepted any
        self.reference = math.inf
        self.accepted: list[float] = []

    def begin_round(self, model_norm: float) -> None:
        self.reference = self.previous if self.previous is not None else model_norm
        self.accepted = []

    def check(self, client: int, round: int, update: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the client when its update breaks the rule."""
        norm = float(update.detach().norm())  # one float32 pass: cheap next to the fold itself
        if not math.isfinite(norm):  # the slow checks only for a client that is being rejected anyway
            if not bool(torch.isfinite(update).all()):
                raise ValueError(f"client {client}, round {round}: update holds NaN or Inf")
            raise ValueError(f"client {client}, round {round}: update norm overflows float32")
        if self.ratio and self.reference > 0 and norm > self.ratio * self.reference:
            raise ValueError(f"client {client}, round {round}: update norm {norm:.4g} is more than "
                             f"{self.ratio:g} x the reference {self.reference:.4g} (server.max_update_ratio)")
        self.accepted.append(norm)

    def end_round(self) -> None:
        if self.accepted:
            self.previous = float(np.median(self.accepted))

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.previous is None else {REFERENCE: np.array([self.previous])}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Take (and remove) the guard's entry from a checkpoint's server state."""
        value = state.pop(REFERENCE, None)
        self.previous = None if value is None else float(value[0])
