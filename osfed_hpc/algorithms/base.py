"""The contract between the runner and a federated method.

The runner knows nothing about any method: it hands a client's data, state and RNG to
``client_update`` on the worker that hosts the client, moves the returned ``Payload`` bytes to
rank 0, and folds them into the next global model with ``server_begin`` /
``server_accumulate`` / ``server_finish``.

Why a fold instead of ``server_update(payloads)``: a FedAvg payload of a ViT-L is 1.2 GB, and
60 of them do not fit on rank 0. Folding one payload at a time in client-id order keeps rank 0's
memory at one payload and makes the rounding of the sum independent of which rank hosted whom.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..flat import FlatModel
from ..payload import Payload


@dataclass
class ClientContext:
    """Everything one client update may use. ``state`` persists across rounds for this client."""

    client_id: int
    round: int
    data: Any  # osfed_hpc.data.loader.ClientData
    state: dict[str, np.ndarray]
    generator: torch.Generator
    seed: int

    @property
    def num_samples(self) -> int:
        return self.data.num_samples


@dataclass
class ClientResult:
    """A payload (what goes on the wire) and diagnostics (logged, never counted as uplink)."""

    payload: Payload
    stats: dict[str, float]


@dataclass
class Environment:
    """What an algorithm instance needs to know about the run it is part of."""

    model: FlatModel  # this rank's replica; holds W_t whenever a hook is called
    train: Any  # config.TrainConfig
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W as fed to the model
    device: torch.device
    seed: int
    server_lr: float = 1.0  # server.lr: scales the aggregated update on rank 0
    autocast_dtype: torch.dtype | None = None
    debug: bool = False  # runtime.debug: extra diagnostics that cost time


class Algorithm:
    """Base class. Subclasses set ``name``, ``Options`` and implement the hooks."""

    name: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    #: keys of ``ClientResult.stats``, in a fixed order so stats cross MPI as float64 records
    client_stat_names: ClassVar[tuple[str, ...]] = ("train_loss", "local_steps")
    #: True when a payload is weight-sized: the runner then streams payloads to rank 0 one at a
    #: time instead of gathering them all in one collective
    streams_payloads: ClassVar[bool] = False

    def __init__(self, options: "Algorithm.Options", env: Environment) -> None:
        self.options = options
        self.env = env

    # worker side -----------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        raise NotImplementedError

    # server side -----------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        raise NotImplementedError

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        """Fold one payload in. Raise ``ValueError`` to reject it (the round goes on).

        The payload's arrays are views into a receive buffer the runner reuses for the next
        payload: fold them in here, and copy anything that must outlive this call."""
        raise NotImplementedError

    def server_finish(self) -> torch.Tensor:
        """Return the new flat global state (params then float buffers)."""
        raise NotImplementedError

    # checkpointing ---------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        return {}

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no server state, but the checkpoint has {sorted(state)}")
