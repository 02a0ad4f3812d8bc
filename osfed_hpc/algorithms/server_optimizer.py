"""The server optimizer: what rank 0 does with the aggregated update of a round, for any method.

W_{t+1} = W_t + lr * v_t with v_t = beta * v_{t-1} + Delta_t (FedAvgM, Hsu et al. 2019). beta = 0
and lr = 1 (the defaults) leave the aggregated update untouched, which is every paper's
formulation. Momentum averages the per-round noise of compressed updates over ~1/(1-beta) rounds;
it is ours for the snapshot methods, documented as such. The velocity is server state, checkpointed.
"""
from __future__ import annotations

import numpy as np
import torch

VELOCITY = "server_optimizer.velocity"


class ServerOptimizer:
    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr = lr
        self.momentum = momentum
        self.velocity: torch.Tensor | None = None

    def step(self, update: torch.Tensor) -> torch.Tensor:
        """The step to add to W_t for the aggregated ``update`` (parameters only)."""
        if self.momentum == 0:
            return update * self.lr if self.lr != 1.0 else update
        if self.velocity is None:
            self.velocity = torch.zeros_like(update)
        self.velocity.mul_(self.momentum).add_(update)
        return self.velocity * self.lr

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.velocity is None else {VELOCITY: self.velocity.cpu().numpy()}

    def load_state(self, state: dict[str, np.ndarray], device: torch.device) -> None:
        """Take (and remove) the optimizer's entries from a checkpoint's server state."""
        velocity = state.pop(VELOCITY, None)
        self.velocity = None if velocity is None else torch.from_numpy(velocity).to(device)
