"""Error feedback (error compensation): what a compressor did not send this round is added to
what it compresses next round, so nothing is lost for good, only delayed.

Used by OS-Fed and 3SFC (the snapshot cannot express all of tau), top-k and RandTopk (the entries
not sent), quantization (the rounding error) and E-3SFC on the server (its own snapshot of the
aggregate). The residual lives in a state dict: a client's ``ctx.state`` (per client, on the rank
that hosts it, checkpointed per client) or the server's state.
"""
from __future__ import annotations

import numpy as np
import torch

RESIDUAL = "residual"


class ErrorFeedback:
    """e <- tau - sent, with tau = update + e. ``enabled=False`` makes it a pass-through."""

    def __init__(self, enabled: bool, size: int, key: str = RESIDUAL) -> None:
        self.enabled = enabled
        self.size = size
        self.key = key

    def residual(self, state: dict[str, np.ndarray], device: torch.device) -> torch.Tensor | None:
        if not self.enabled or self.key not in state:
            return None
        residual = state[self.key]
        if residual.shape != (self.size,) or residual.dtype != np.float32:
            raise ValueError(f"state {self.key!r} is {residual.dtype}{list(residual.shape)}, "
                             f"expected float32[{self.size}]")
        return torch.from_numpy(residual).to(device)

    def target(self, state: dict[str, np.ndarray], update: torch.Tensor) -> torch.Tensor:
        """tau = update + e (a new tensor; ``update`` is left as it is)."""
        residual = self.residual(state, update.device)
        return update.clone() if residual is None else update + residual

    def keep(self, state: dict[str, np.ndarray], residual: torch.Tensor | None) -> None:
        """Store e = tau - sent. ``None`` (nothing usable was computed) leaves the old residual:
        storing NaN would poison every later round of this client."""
        if self.enabled and residual is not None and bool(torch.isfinite(residual).all()):
            state[self.key] = residual.detach().to("cpu", torch.float32).numpy()
