"""A method with a server phase, to test the runner's phase machinery (progress, checkpoints between
epochs, stop and bit-exact resume) apart from any real one-shot method.

FedAvg's fold, then ``phase_epochs`` epochs per round in which rank 0 takes a few momentum-SGD
steps on a random regression target drawn from the keyed server stream. The momentum buffer and a
step counter live in ``server_state``, so a resume that lost them would give another model.
``OSFED_TEST_SIGNAL_AT=ROUND:EPOCH`` makes rank 0 send itself SIGUSR1 after that epoch: a SLURM
warning arriving at a known point of the phase.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import numpy as np
import torch

from osfed_hpc.algorithms.fedavg import FedAvg


class PhaseTest(FedAvg):
    name = "phase_test"

    @dataclass
    class Options(FedAvg.Options):
        phase_epochs: int = 4
        steps_per_epoch: int = 3
        stop_early_at: int = 0  # report stop_early after this epoch (0: never)

    def __init__(self, options, env) -> None:
        super().__init__(options, env)
        self.momentum: torch.Tensor | None = None
        self.steps = 0

    def server_phase_epochs(self, round: int) -> int:
        return self.options.phase_epochs

    def server_phase_epoch(self, round: int, epoch: int) -> dict[str, float]:
        net = self.env.model.model
        generator = self.server_generator(round, f"phase-{epoch}")
        c, h, w = self.env.input_shape
        if self.momentum is None:
            self.momentum = torch.zeros(self.env.model.param_numel)
        loss_value = 0.0
        for _ in range(self.options.steps_per_epoch):
            x = torch.randn(8, c, h, w, generator=generator)
            target = torch.randn(8, self.env.num_classes, generator=generator)
            net.zero_grad()
            loss = ((net(x) - target) ** 2).mean()
            loss.backward()
            grad = self.env.model.flat_grad()
            self.momentum.mul_(0.9).add_(grad)
            with torch.no_grad():
                self.env.model.params_vector.sub_(0.01 * self.momentum)
            self.steps += 1
            loss_value = float(loss)
        at = os.environ.get("OSFED_TEST_SIGNAL_AT")
        if at and tuple(int(v) for v in at.split(":")) == (round, epoch):
            os.kill(os.getpid(), signal.SIGUSR1)
        stats = {"loss": loss_value, "steps": float(self.steps)}
        if self.options.stop_early_at and epoch >= self.options.stop_early_at:
            stats["stop_early"] = 1.0
        return stats

    def server_phase_end(self, round: int) -> None:
        self.momentum = None

    def server_state(self) -> dict[str, np.ndarray]:
        state = {"steps": np.array([self.steps], np.int64)}
        if self.momentum is not None:
            state["momentum"] = self.momentum.numpy().copy()
        return state

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        self.steps = int(state["steps"][0])
        self.momentum = torch.from_numpy(state["momentum"].copy()) if "momentum" in state else None
