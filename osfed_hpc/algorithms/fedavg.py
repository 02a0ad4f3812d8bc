"""FedAvg: clients send their whole local update; rank 0 forms the sample-weighted mean.

The upper bound every compressor is measured against, and the uplink cost (one model per
client per round) the snapshot methods exist to avoid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..payload import Payload, require, to_tensor
from .base import Algorithm, ClientContext, ClientResult
from .local_training import client_lr, count_participation, local_sgd


class FedAvg(Algorithm):
    name = "fedavg"
    streams_payloads = True

    @dataclass
    class Options:
        #: "samples" weights each client by its sample count (McMahan et al.); "uniform" by 1
        weighting: str = "samples"

        def validate(self) -> None:
            if self.weighting not in ("samples", "uniform"):
                raise ValueError(f"algorithm.weighting must be 'samples' or 'uniform', got {self.weighting!r}")

    def client_update(self, ctx: ClientContext) -> ClientResult:
        model = self.env.model
        start = model.vector.clone()
        loss, steps = local_sgd(
            model, ctx.data, self.env.train, ctx.generator, client_lr(self.env.train, ctx.state),
            self.env.autocast_dtype,
        )
        count_participation(ctx.state)
        update = (model.vector - start).cpu().numpy()
        payload = Payload(meta={"algorithm": self.name, "round": ctx.round, "client": ctx.client_id},
                          arrays={"update": update})
        return ClientResult(payload, {"train_loss": loss, "local_steps": float(steps)})

    def server_begin(self, round: int) -> None:
        self._round = round
        self._sum = torch.zeros_like(self.env.model.vector)
        self._total_weight = 0.0

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        context = f"client {client_id}, round {self._round}"
        require(payload, {"update": ("float32", (self.env.model.numel,))}, context)
        if not np.isfinite(payload.arrays["update"]).all():  # numpy: ~25x faster than torch here
            raise ValueError(f"{context}: update holds NaN or Inf")
        update = to_tensor(payload.arrays["update"], self._sum.device)
        w = weight if self.options.weighting == "samples" else 1.0
        self._sum.add_(update, alpha=w)
        self._total_weight += w
        return {}

    def server_finish(self) -> torch.Tensor:
        model = self.env.model
        if self._total_weight == 0:
            return model.vector.clone()
        server_lr = self.env.server_lr
        return torch.mul(self._sum, server_lr / self._total_weight).add_(model.vector)
