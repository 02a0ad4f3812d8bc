"""A method that exists to test the server-to-client channel through the real runner.

Each round the server sends the model, a common payload (the round number), a per-client payload
(the client id times the round) for even clients only, and a diagnostics payload. Each client
echoes what it received; the server checks the echo and rejects a client whose echo is wrong, so a
broken channel shows up as rejected payloads in ``metrics.jsonl`` and a failed assertion in the test.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from osfed_hpc.algorithms.base import ReceivedMessage, ServerMessage
from osfed_hpc.algorithms.fedavg import FedAvg
from osfed_hpc.payload import Payload


class ChannelEcho(FedAvg):
    name = "channel_echo"
    client_stat_names = ("train_loss", "local_steps", "begin_calls")

    @dataclass
    class Options(FedAvg.Options):
        #: send the model only on odd rounds (even rounds: the worker keeps its replica)
        model_every_other_round: bool = False

    def server_message(self, round: int) -> ServerMessage:
        model = not (self.options.model_every_other_round and round % 2 == 0)
        norm = float(self.env.model.vector.norm())
        self.norms = getattr(self, "norms", {})
        self.norms[round] = norm if model else self.norms[round - 1]  # what the worker's replica holds
        per_client = {c: Payload(arrays={"value": np.array([c * round], np.int64)})
                      for c in range(self.env.num_clients) if c % 2 == 0}
        return ServerMessage(
            model=model,
            common=Payload(arrays={"round": np.array([round], np.int64)}),
            per_client=per_client,
            diagnostics=Payload(arrays={"norm": np.array([self.norms[round]], np.float64)}),
        )

    def client_begin_round(self, message: ReceivedMessage) -> None:
        self.begin_calls = getattr(self, "begin_calls", 0) + 1
        self.replica_norm = float(self.env.model.vector.norm())
        self.diagnostic_norm = float(message.diagnostics.arrays["norm"][0])

    def client_update(self, ctx):
        result = super().client_update(ctx)
        mine = ctx.message.for_client(ctx.client_id)
        result.payload.arrays["echo_round"] = np.array(ctx.message.common.arrays["round"], np.int64)
        result.payload.arrays["echo_value"] = np.array([-1 if mine is None else int(mine.arrays["value"][0])], np.int64)
        result.payload.arrays["echo_norms"] = np.array([self.replica_norm, self.diagnostic_norm], np.float64)
        result.stats["begin_calls"] = float(self.begin_calls)
        return result

    def server_accumulate(self, client_id, payload, weight):
        arrays = dict(payload.arrays)
        expected_value = client_id * self._round if client_id % 2 == 0 else -1
        if int(arrays.pop("echo_round")[0]) != self._round or int(arrays.pop("echo_value")[0]) != expected_value:
            raise ValueError(f"client {client_id}: the message it received is not the one sent")
        replica, diagnostic = arrays.pop("echo_norms")
        if replica != diagnostic:  # the worker starts from what it was sent (or kept), bitwise
            raise ValueError(f"client {client_id}: replica norm {replica} != server norm {diagnostic}")
        return super().server_accumulate(client_id, Payload(meta=payload.meta, arrays=arrays), weight)
