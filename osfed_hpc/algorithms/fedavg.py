"""FedAvg: clients send their whole local update; rank 0 forms the sample-weighted mean.

The upper bound every compressor is measured against, and the uplink cost (one model per
client per round) the snapshot methods exist to avoid. With a LoRA model (``lora``) the same
code sends only the adapters and the head: the trainable vector is all that exists on the wire.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..payload import Payload, require, to_tensor
from .base import Algorithm, ClientContext, ClientResult, client_weight
from .local_training import local_update
from .options import require_choice


class FedAvg(Algorithm):
    name = "fedavg"
    keeps_client_state = False  # ctx.state: only local_update's participation count (any worker may take any client)

    @dataclass
    class Options:
        #: "samples" weights each client by its sample count (McMahan et al.); "uniform" by 1
        weighting: str = "samples"

        def validate(self) -> None:
            require_choice("weighting", self.weighting, ("samples", "uniform"))

    def client_update(self, ctx: ClientContext) -> ClientResult:
        local = local_update(self.env, ctx)
        payload = Payload(meta={"algorithm": self.name, "round": ctx.round, "client": ctx.client_id},
                          arrays={"update": local.update.cpu().numpy()})
        return ClientResult(payload, local.stats)

    def server_begin(self, round: int) -> None:
        self._round = round
        self._mean = self.new_mean(self.env.model.vector, round)

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        context = f"client {client_id}, round {self._round}"
        require(payload, {"update": ("float32", (self.env.model.numel,))}, context)
        # NaN/Inf (and absurd norms) are refused by the run's update guard inside add(): one norm
        # over the update instead of a separate finiteness pass keeps the fold at memory speed
        update = to_tensor(payload.arrays["update"], self._mean.sum.device)
        self._mean.add(update, client_weight(self.options.weighting, weight), client_id)
        return {}

    def server_finish(self) -> torch.Tensor:
        return self.apply_mean(self._mean)
