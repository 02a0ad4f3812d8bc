"""The contract between the runner and a federated method.

One round, as the runner drives it::

    rank 0:   message = server_message(round)                 -> broadcast
    workers:  client_begin_round(received message)            (every worker, every round)
              client_update(ctx) -> ClientResult              (each selected client it hosts)
                                                              -> exchange to rank 0
    rank 0:   server_begin(round); server_accumulate(client, payload, weight) in client-id order;
              server_finish() -> the new trainable state

The runner knows nothing else about a method: it moves bytes, keeps time and counts.

Why a fold instead of ``server_update(payloads)``: a FedAvg payload of a ViT-L is 1.2 GB, and
60 of them do not fit on rank 0. Folding one payload at a time in client-id order keeps rank 0's
memory at one payload and makes the rounding of the sum independent of which rank hosted whom.

Why a message instead of "the model": E-3SFC sends a server snapshot instead of the weights,
FedMPQ sends each client its bit-widths, FedAF class logits. What goes down is a
``ServerMessage`` and its logical size, per client, is the downlink we report.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..flat import FlatModel
from ..payload import Payload
from ..rng import torch_stream
from .server_optimizer import ServerOptimizer
from .update_guard import UpdateGuard


@dataclass
class ServerMessage:
    """What rank 0 sends to the clients of a round.

    ``model``: the trainable state W_t goes down as float32 (4 bytes per value per client).
    ``common``: method data every client receives. ``per_client``: data for one client only (counted
    for that client alone). ``diagnostics``: sent for measurement (e.g. client drift) and never
    counted as downlink, because a deployment would not send it. ``common_kept``: ``common`` is data
    a client keeps once it has it (OS-Fed's server-trained FSRCNN); the simulation re-sends it to
    new worker processes, so it is not counted here but as ``Algorithm.kept_downlink_bytes`` for
    each client in the first round that client is selected.
    """

    model: bool = True
    common: Payload | None = None
    per_client: dict[int, Payload] = field(default_factory=dict)
    diagnostics: Payload | None = None
    common_kept: bool = False

    def downlink_bytes(self, client: int, model_bytes: int) -> int:
        """Logical bytes client ``client`` receives this round, less data it keeps (``common_kept``)."""
        total = model_bytes if self.model else 0
        if self.common is not None and not self.common_kept:
            total += self.common.packed_size()
        if client in self.per_client:
            total += self.per_client[client].packed_size()
        return total


@dataclass
class ReceivedMessage:
    """The message as a worker received it (arrays are read-only views of the receive buffer)."""

    round: int
    model: bool
    common: Payload | None = None
    per_client: dict[int, Payload] = field(default_factory=dict)
    diagnostics: Payload | None = None

    def for_client(self, client: int) -> Payload | None:
        return self.per_client.get(client)


@dataclass
class ClientContext:
    """Everything one client update may use. ``state`` persists across rounds for this client."""

    client_id: int
    round: int
    data: Any  # osfed_hpc.data.loader.ClientData
    state: dict[str, np.ndarray]
    generator: torch.Generator
    seed: int
    message: ReceivedMessage | None = None

    @property
    def num_samples(self) -> int:
        return self.data.num_samples


@dataclass
class ClientResult:
    """A payload (what goes on the wire) and diagnostics (logged, never counted as uplink)."""

    payload: Payload
    stats: dict[str, float]
    #: wall seconds this client cost, when the method knows better than the runner's clock (a batch of
    #: clients sharing one synthesis reports each client's own training plus its share of the batch)
    seconds: float | None = None


@dataclass
class Environment:
    """What an algorithm instance needs to know about the run it is part of."""

    model: FlatModel  # this rank's replica; holds W_t whenever a hook is called
    train: Any  # config.TrainConfig
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W as fed to the model
    device: torch.device
    seed: int
    server_optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)  # used on rank 0
    update_guard: UpdateGuard = field(default_factory=UpdateGuard)  # used on rank 0
    num_clients: int = 1
    autocast_dtype: torch.dtype | None = None
    debug: bool = False  # runtime.debug: extra diagnostics that cost time
    #: the run directory (rank 0 writes there; workers must not)
    run_dir: Path | None = None
    #: ``runtime.save_snapshots``: every N rounds a method may write pictures of what clients send (rank 0)
    save_snapshots: int = 0
    #: ``load_images(split, indices) -> (images, labels)``: samples of the run's dataset, normalised, at the
    #: run's resolution, on ``device``, in the order given. Any rank may call it (e.g. a public unlabeled
    #: slice that the server and the clients both read); it decodes on every call, so keep what you reuse.
    load_images: Callable[[str, np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: the dataset's per-channel normalisation, (mean, std) of pixel values in [0, 1]: model input =
    #: (pixel / 255 - mean) / std. Methods that make images (patch banks, pictures) use it both ways
    pixel_mean_std: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), (1.0,))
    #: the number of samples of each split of the dataset ({"train": n, "test": m})
    split_sizes: dict[str, int] = field(default_factory=dict)
    #: rank 0 only: ``evaluate(module) -> (accuracy, loss)`` on the run's test split (a second model
    #: family, a teacher); the runner evaluates ``model`` itself
    evaluate: Callable[[nn.Module], tuple[float, float]] | None = None


class Algorithm:
    """Base class. Subclasses set ``name``, ``Options`` and implement the hooks.

    Defaults give FedAvg's shape: the model goes down, nothing else, and the server's new state is
    ``apply_update(aggregated update)``.
    """

    name: ClassVar[str] = ""

    @dataclass
    class Options:
        def validate(self) -> None:
            pass

    #: one upload per client, then the server trains (FedSD2C, OSCAR): the run must have ``rounds: 1``,
    #: and the server phase's epochs are the method's server epochs
    one_shot: ClassVar[bool] = False

    #: True (default): ``ctx.state`` carries something across rounds, so a client is always updated on
    #: the rank that hosts its state (static placement). False: ``ctx.state`` holds at most the
    #: participation count of ``local_training`` (which the runner derives from the selection history),
    #: so any worker may take any client and the runner deals clients to whichever worker is free
    #: (it raises if such a method writes any other key). Set False only when that provably holds.
    keeps_client_state: ClassVar[bool] = True

    #: keys of ``ClientResult.stats``, in a fixed order so stats cross MPI as float64 records
    client_stat_names: ClassVar[tuple[str, ...]] = ("train_loss", "local_steps")

    def __init__(self, options: Algorithm.Options, env: Environment) -> None:
        if hasattr(options, "validate"):  # a plain dataclass without checks is fine too
            options.validate()
        self.options = options
        self.env = env

    @classmethod
    def check_rounds(cls, rounds: int) -> None:
        """A one-shot method runs exactly one round; ValueError naming the key otherwise."""
        if cls.one_shot and rounds != 1:
            raise ValueError(f"config key 'rounds': got {rounds}, expected 1: {cls.name} is one-shot (one upload "
                             f"per client, then the server trains; its epochs are algorithm.server_epochs)")

    @classmethod
    def config_warnings(cls, options: Algorithm.Options, train: Any) -> list[str]:
        """Settings that run but that the method's paper does not use and that are known to hurt it;
        rank 0 prints each once at start-up (a warning, not an error: the user may mean it)."""
        return []

    # the model ---------------------------------------------------------------------------------
    @classmethod
    def adapt_model(cls, net: nn.Module, options: Algorithm.Options, num_classes: int, seed: int,
                    input_shape: tuple[int, int, int] | None = None) -> nn.Module:
        """Change the freshly built (and pretrained-loaded) model before it is flattened, e.g. add
        LoRA adapters and freeze the backbone, or add a second model family. Must be deterministic:
        every rank calls it. ``input_shape`` is (C, H, W) as fed to the model."""
        return net

    def payload_size_hint(self) -> int:
        """An upper bound of one client's payload bytes, used before any payload was seen to choose
        between gathering and streaming. Default: a weight-sized payload."""
        return 4 * self.env.model.numel + 4096

    # server to clients -------------------------------------------------------------------------
    def server_message(self, round: int) -> ServerMessage:
        """What the clients of ``round`` receive (rank 0, before the round's work)."""
        return ServerMessage(model=True)

    def client_begin_round(self, message: ReceivedMessage) -> None:
        """Every worker, every round, before its clients: ``env.model`` holds the broadcast model
        (when the message carries one) or this rank's replica from the previous round."""

    # worker side -------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        raise NotImplementedError

    def client_batch_size(self) -> int:
        """How many of a worker's selected clients ``client_updates`` may take in one call.

        1 (default): one at a time. A method whose clients share expensive work at W_t (OS-Fed's
        snapshot synthesis runs batched over clients) returns more; the runner then hands over up to
        that many of a rank's clients, in client-id order.
        """
        return 1

    def client_updates(self, contexts: list[ClientContext], load_start: Callable[[], None]) -> list[ClientResult]:
        """Update several clients of this rank at once (at most ``client_batch_size``), results in order.

        ``load_start()`` puts W_t (this round's start) back into ``env.model``; the default runs
        ``client_update`` once per client, each from W_t. The runner stores each context's
        ``state`` and sends each payload after the call returns.
        """
        results = []
        for ctx in contexts:
            load_start()
            results.append(self.client_update(ctx))
        return results

    # server side -------------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        raise NotImplementedError

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        """Fold one payload in. Raise ``ValueError`` to reject it (the round goes on).

        The payload's arrays are views into a receive buffer the runner reuses for the next
        payload: fold them in here, and copy anything that must outlive this call."""
        raise NotImplementedError

    def server_finish(self) -> torch.Tensor:
        """Return the new flat trainable state (parameters then float buffers)."""
        raise NotImplementedError

    def new_mean(self, like: torch.Tensor, round: int) -> WeightedMean:
        """A weighted mean for this round's fold whose ``add`` first checks each client's update
        with the run's update guard (non-finite or absurdly large: rejected, named)."""
        return WeightedMean(like, self.env.update_guard, round)

    def apply_mean(self, mean: WeightedMean) -> torch.Tensor:
        """The new state from a round's weighted mean: W_t unchanged when no client was accepted."""
        update = mean.mean()
        return self.env.model.vector.clone() if update is None else self.apply_update(update)

    def server_generator(self, round: int, purpose: str = "server") -> torch.Generator:
        """The server's random stream for ``round``: keyed by (seed, purpose, round), never by rank."""
        return torch_stream(self.env.seed, purpose, round)

    def apply_update(self, update: torch.Tensor) -> torch.Tensor:
        """W_t + the server optimizer's step on the aggregated ``update`` (parameters), plus the
        plain update on float buffers (running statistics are averaged, not optimised)."""
        model = self.env.model
        state = model.vector.clone()
        n = model.param_numel
        state[:n].add_(self.env.server_optimizer.step(update[:n]))
        if update.numel() > n:
            state[n:].add_(update[n:])
        return state

    def client_model_bytes(self, client: int, model_bytes: int) -> int:
        """The logical size of the model that ``client`` receives when the message carries one.
        Default: the whole trainable state. A method whose clients each use part of it (one model
        family of several) returns that part's bytes."""
        return model_bytes

    def kept_downlink_bytes(self) -> int:
        """Logical bytes each client receives once, in the first round it is selected, and keeps:
        data sent as ``ServerMessage.common`` with ``common_kept`` (default: none). Charged by
        participation, so the count does not depend on when worker processes (re)started."""
        return 0

    # the server phase (one-shot and distillation methods) --------------------------------------
    def server_phase_epochs(self, round: int) -> int:
        """Epochs of server-only training that follow round ``round``'s fold (0: none). Called on
        rank 0 before the round starts, so the schedule must not depend on the round's uploads."""
        return 0

    def server_phase_epoch(self, round: int, epoch: int) -> dict[str, float]:
        """One epoch (1-based) of server training after ``server_finish``: train ``env.model`` in
        place (it holds the folded state). Draw randomness only from ``server_generator(round,
        f"phase-{epoch}")``, and keep in ``server_state`` whatever the next epoch needs (the data the
        clients sent, optimizer moments): the runner checkpoints between epochs, and a resumed run
        continues at the next epoch and must reach the same model bit for bit. Returns numbers to
        log (``loss``, ``steps``...); ``stop_early: 1`` ends the phase after this epoch."""
        raise NotImplementedError(f"{self.name} declares server phase epochs but no server_phase_epoch")

    def server_phase_end(self, round: int) -> None:
        """After the last epoch of ``round``'s phase: drop what only the phase needed (it would
        otherwise be checkpointed with every later round)."""

    # checkpointing -----------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        return {}

    def prefixed_state(self, state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
        """The arrays of ``state`` whose keys start with ``prefix`` (prefix removed); any other key is a
        ValueError naming it (a checkpoint of another method or version)."""
        mine = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        other = sorted(key for key in state if not key.startswith(prefix))
        if other:
            raise ValueError(f"{self.name}: unexpected server state {other}")
        return mine

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no server state, but the checkpoint has {sorted(state)}")


class WeightedMean:
    """A running weighted sum of updates and its total weight: the server half most methods share.
    With a guard, ``add`` checks each client's update before it enters the sum."""

    def __init__(self, like: torch.Tensor, guard: UpdateGuard | None = None, round: int = 0) -> None:
        self.sum = torch.zeros_like(like)
        self.weight = 0.0
        self.guard = guard
        self.round = round

    def add(self, update: torch.Tensor, weight: float, client: int | None = None) -> None:
        if self.guard is not None and client is not None:
            self.guard.check(client, self.round, update)
        self.sum.add_(update, alpha=weight)
        self.weight += weight

    def add_sparse(self, indices: torch.Tensor, values: torch.Tensor, weight: float, client: int | None = None) -> None:
        """``add`` for an update that is zero outside ``indices`` (unique); its norm is that of ``values``."""
        if self.guard is not None and client is not None:
            self.guard.check(client, self.round, values)
        self.sum.index_add_(0, indices, values, alpha=weight)
        self.weight += weight

    def mean(self) -> torch.Tensor | None:
        """The weighted mean, or None when nothing was added."""
        if self.weight == 0:
            return None
        return self.sum / self.weight


def client_weight(weighting: str, samples: float) -> float:
    """``samples``: weight by sample count (McMahan et al.); ``uniform``: every client counts 1."""
    return samples if weighting == "samples" else 1.0
