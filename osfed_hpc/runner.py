"""The round loop, for the server (rank 0) and the workers (ranks 1..P-1). Nothing method- or
transport-specific: it reads as broadcast, work, exchange, fold, log.

One round::

    rank 0:  message = algorithm.server_message(r)
             control Bcast [exchange mode, model?, message length, phase epochs] -> model Bcast -> message Bcast
    workers: algorithm.client_begin_round(message); for each of my selected clients (a rank's own, or
             the next unclaimed one: see "placement" below): client_updates -> send
    rank 0:  fold the payloads in client-id order as the exchange hands them over
             [server phase: E epochs of server-only training; one control word per epoch tells the
              workers to wait, checkpoint with rank 0, or stop]  -> evaluate -> log

With a single rank, rank 0 plays both parts. The exchange (in-process, one Gatherv, or streamed)
is chosen per round from the payload sizes (``osfed_hpc.exchange``).

Placement. Methods whose clients keep state across rounds (error-feedback residuals) update each
client on the rank that holds its state: a fixed, size-balanced placement (``assign_clients``).
For the others (``Algorithm.keeps_client_state = False``) a fixed split leaves the faster worker
idle at the end of every round, so workers instead take the next unclaimed selected client as
they finish (one MPI fetch-and-add on a counter held by rank 0). A client's result depends only
on (W_t, its data, its (seed, round, client) stream), and rank 0 folds in client-id order, so
either way the model is bit-identical whatever the rank count. ``OSFED_PLACEMENT=static`` forces
the fixed split (for comparisons).
"""
from __future__ import annotations

import io
import itertools
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from . import checkpoint as ckpt
from .algorithms import Algorithm, ClientContext, Environment, ReceivedMessage, ServerMessage, get_algorithm
from .algorithms.local_training import PARTICIPATIONS
from .algorithms.server_optimizer import ServerOptimizer
from .algorithms.update_guard import UpdateGuard
from .atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from .client_state import ClientStateStore
from .comm import ClaimCounter, World, assign_clients, owner_map, placement_mode, tag_limit
from .config import Config, ConfigError
from .devices import configure_threads, describe, deterministic_numerics, make_deterministic, select_device
from .errors import AgreedStop, RunError
from .exchange import CLIENT_TAG_BASE, GATHER, MODE_NAMES, Exchanges, choose_mode, pack_frame, unpack_frame
from .flat import FlatModel
from .host_memory import configure_host_memory
from .metrics import (
    MetricsLog,
    PhaseTimer,
    client_done_line,
    peak_memory_bytes,
    phase_progress_line,
    progress_line,
    reset_peak_memory,
    round_eta,
    round_records,
)
from .models import build_model, load_pretrained
from .payload import Payload
from .provenance import record_environment
from .rng import select_clients, torch_stream
from .tensorboard import TensorBoardLog

#: the control word after each server-phase epoch (rank 0 -> workers)
_PHASE_GO, _PHASE_CHECKPOINT, _PHASE_STOP, _PHASE_DONE = 0, 1, 2, 3
#: frame keys of the server message's method data (per-client data uses the client id)
_COMMON, _DIAGNOSTICS = -1, -2
_RECORD_HEAD = ("client", "seconds", "peak_memory_bytes", "payload_bytes", "num_samples")
#: once a rank's work in a round has run this long, it prints a line per finished client (a long
#: ImageNet round is never silent); a module constant so tests can lower it
SLOW_ROUND_S = 60.0


@dataclass
class Inputs:
    """What every rank needs to know about the data, resolved once on rank 0's say-so."""

    reader: Any
    partition: Any
    resolution: int
    input_shape: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# setup


def resolve_run_dir(config: Config, resume: bool) -> Path:
    if config.out:
        return Path(config.out)
    if resume:
        raise RunError("resuming needs the run directory (out=... or --resume RUN_DIR)")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.name}-{stamp}"


def _prepare_inputs_on_root(config: Config, world: World, run_dir: Path, resume: bool) -> None:
    """Everything that can fail because of user input, checked before any training starts."""
    from .data import DatasetReader, Partition, load_partition, make_partition, prepare_dataset

    data = config.data
    path = Path(data.path)
    if not (path / "dataset.json").exists():
        if data.source is None:
            raise RunError(f"data.path {str(path)!r} holds no prepared dataset (no dataset.json); run "
                           f"'osfed-hpc prepare' first or set data.source")
        print(f"[osfed-hpc] preparing {data.source} into {path}", flush=True)
        prepare_dataset(data.source, path, progress=False)
    reader = DatasetReader(path)
    if not data.partition:  # checked before a partition is made: an absurd count must not start one
        samples = reader.count("train")
        if data.clients > samples:
            raise ConfigError(f"config key 'data.clients': got {data.clients}, expected at most {samples} (the "
                              f"training samples of {path}: every client needs at least one)")
        if data.clients * data.min_samples > samples:
            raise ConfigError(f"config keys 'data.clients' x 'data.min_samples': {data.clients} x {data.min_samples} "
                              f"samples needed, {path} has {samples} training samples; use fewer clients or a "
                              f"smaller data.min_samples")
    if data.partition:
        part_path = Path(data.partition)
        if not part_path.exists():
            raise RunError(f"data.partition {str(part_path)!r} does not exist")
    else:
        part_path = Partition.default_path(path, data.scheme, data.clients, data.alpha, data.partition_seed)
        if not part_path.exists():
            partition = make_partition(reader, data.clients, data.scheme, data.alpha, data.partition_seed,
                                       min_samples=data.min_samples)
            partition.save(part_path)
            print(f"[osfed-hpc] wrote partition {part_path}", flush=True)
    partition = load_partition(part_path, reader)
    if data.partition is None and partition.num_clients != data.clients:
        raise RunError(f"partition {part_path} has {partition.num_clients} clients, data.clients is {data.clients}")
    workers = len(world.worker_ranks)
    if workers > partition.num_clients:
        raise RunError(f"{workers} worker ranks for {partition.num_clients} clients: ranks would idle; "
                       f"start at most {partition.num_clients + 1} ranks")
    ntasks = os.environ.get("SLURM_NTASKS")
    if ntasks and int(ntasks) > 1 and world.size == 1 and not os.environ.get("OSFED_ALLOW_SINGLETON"):
        raise RunError(f"SLURM started {ntasks} tasks but this MPI world has 1 rank: the MPI library was "
                       f"not started by srun (check --mpi=pmix) and each task runs alone")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"out={str(run_dir)!r} is an existing file, expected a run directory (a new or empty one); "
                       f"choose another out=")
    if run_dir.exists() and not resume and any(run_dir.iterdir()):
        raise RunError(f"run directory {str(run_dir)!r} exists and is not empty; use "
                       f"'osfed-hpc run --resume {run_dir}' or another out=")
    if resume and ckpt.latest_checkpoint(run_dir) is None:
        raise RunError(f"cannot resume: {str(run_dir)!r} has no complete checkpoint")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"run directory {str(run_dir)!r} cannot be created: {exc.strerror or exc}") from None
    if not os.access(run_dir, os.W_OK):
        raise RunError(f"run directory {str(run_dir)!r} is not writable")
    config.data.partition = str(part_path)  # resolved, so every rank and the saved config agree


def _agree(world: World, error: str | None) -> None:
    """Rank 0 tells every rank whether setup succeeded; all stop together, no rank left waiting."""
    message = world.bcast_text(error or "")
    if message:
        raise AgreedStop(message)


def setup_inputs(config: Config, world: World, run_dir: Path, resume: bool) -> Inputs:
    from .data import DatasetReader, load_partition

    error = None
    if world.is_server:
        try:
            _prepare_inputs_on_root(config, world, run_dir, resume)
        except ValueError as exc:  # ConfigError, DataError, RunError
            error = str(exc)
    if world.size > 1:
        _agree(world, error)
        config.data.partition = world.bcast_text(str(config.data.partition or ""))
    elif error:
        raise RunError(error)
    reader = DatasetReader(config.data.path)
    partition = load_partition(config.data.partition, reader)
    resolution = config.data.resolution or (reader.image_shape[1] if reader.image_shape else None)
    if resolution is None:
        raise RunError(f"data.resolution must be set for {reader.encoding} dataset {config.data.path}")
    return Inputs(reader, partition, resolution, (reader.channels, resolution, resolution))


# ---------------------------------------------------------------------------------------------
# the run


class Runner:
    def __init__(self, config: Config, world: World, run_dir: Path, resume: bool = False) -> None:
        self.config = config
        self.world = world
        self.run_dir = run_dir
        self.stop_requested = False
        self.install_signal_handlers()  # first: a SLURM signal during setup must not kill a rank
        self.threads = configure_threads(config.runtime.threads, world.comm, config.data.num_workers)
        self.host_memory = configure_host_memory(config.runtime.host_memory)  # before the first large tensor
        self.device = select_device(config.runtime.device)
        make_deterministic(deterministic_numerics(config.runtime.deterministic, self.device))
        self.inputs = setup_inputs(config, world, run_dir, resume)
        self.num_clients = self.inputs.partition.num_clients
        self.sizes = np.asarray(self.inputs.partition.sizes, dtype=np.int64)
        self.algorithm_cls = get_algorithm(config.algorithm["name"])
        try:
            self.algorithm_cls.check_rounds(config.rounds)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.options = config.algorithm_options()
        self.stat_names = self.algorithm_cls.client_stat_names
        self.autocast = torch.bfloat16 if config.runtime.amp == "bf16" else None
        self._message_buffer: np.ndarray | None = None  # the message frame, reused across rounds
        if world.is_server:
            self.server_model = self._new_model()
            self.server_optimizer = ServerOptimizer(config.server.lr, config.server.momentum)
            self.update_guard = UpdateGuard(config.server.max_update_ratio)
            self.server_algorithm = self._new_algorithm(self.server_model, self.server_optimizer, self.update_guard)
            self.payload_bytes = self.server_algorithm.payload_size_hint()  # until a round shows the real size
            self.eval_data = self._build_eval_data()
        if world.is_worker:
            self.worker_model = self._new_model()
            self.worker_algorithm = self._new_algorithm(self.worker_model)
            self.replica: torch.Tensor | None = None  # the worker's W_t when the server sends no model
            self.store = ClientStateStore(self._state_dir(), resume=resume)
        # a method batching a rank's clients gets whole blocks of that many ids per rank (same batches on any rank count)
        algorithm = self.server_algorithm if world.is_server else self.worker_algorithm
        self.client_batch = max(1, int(algorithm.client_batch_size()))
        self.placement = assign_clients(self.sizes, world.worker_ranks, block=self.client_batch)
        self.owner = owner_map(self.placement)
        self.my_clients = self.placement.get(world.rank, []) if world.is_worker else []
        self.placement_note = self._choose_placement()
        self.claims = ClaimCounter(world) if self.placement_note == "dealt" else None
        self.exchanges = Exchanges(world, None if self.claims is not None else self.owner)
        self.round_hosts: dict[int, int] = {}  # client -> the rank that updated it, this round
        self._participations: tuple[int, np.ndarray] = (0, np.zeros(self.num_clients, dtype=np.int64))
        if world.is_worker:
            self.train_data = self._build_train_data()
        self.start_round = 1
        self.resume_phase: dict[str, Any] | None = None  # set by a checkpoint taken inside a server phase
        self.phase_seconds: list[float] = []  # server-phase epochs done in this process, for the ETA
        if world.is_server:
            self.log = MetricsLog(run_dir / "metrics.jsonl")
        self.totals = {"uplink": 0, "downlink": 0, "mpi": 0, "rejected": 0}
        if resume:
            self._restore(ckpt.latest_checkpoint(run_dir))
        self._say_hello()
        if world.is_server:
            for warning in self.algorithm_cls.config_warnings(self.options, config.train):
                print(f"[osfed-hpc] warning: {warning}", file=sys.stderr, flush=True)
        record_environment(run_dir, world, describe(self.device), resume, self.start_round, self.threads,
                           host_memory=self.host_memory)  # env.jsonl
        self.tensorboard = TensorBoardLog.open(config, run_dir, self.start_round) if world.is_server else None
        self.round_seconds: list[float] = []  # rounds done in this process, for the ETA

    # construction helpers --------------------------------------------------------------------
    def _new_model(self) -> FlatModel:
        c, h, _ = self.inputs.input_shape
        classes = self.inputs.reader.num_classes
        net = build_model(self.config.model.name, c, h, classes, seed=self.config.seed)
        if self.config.model.pretrained:
            try:
                load_pretrained(net, self.config.model.pretrained)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        net = self.algorithm_cls.adapt_model(net, self.options, classes, self.config.seed, self.inputs.input_shape)
        return FlatModel(net.to(self.device), channels_last=self.config.runtime.channels_last)

    def _new_algorithm(self, model: FlatModel, server_optimizer: ServerOptimizer | None = None,
                       update_guard: UpdateGuard | None = None) -> Algorithm:
        env = Environment(
            model=model, train=self.config.train, num_classes=self.inputs.reader.num_classes,
            input_shape=self.inputs.input_shape, device=self.device, seed=self.config.seed,
            server_optimizer=server_optimizer or ServerOptimizer(), update_guard=update_guard or UpdateGuard(),
            num_clients=self.num_clients, autocast_dtype=self.autocast,
            debug=self.config.runtime.debug, run_dir=self.run_dir, save_snapshots=self.config.runtime.save_snapshots,
            load_images=self._load_images, split_sizes=self._split_sizes(),
            pixel_mean_std=(tuple(self.inputs.reader.mean), tuple(self.inputs.reader.std)),
            evaluate=self.evaluate if server_optimizer is not None else None,
        )
        try:
            return self.algorithm_cls(self.options, env)
        except ValueError as exc:  # options that do not fit this model or data (e.g. factor vs resolution)
            raise ConfigError(str(exc)) from None

    def _load_images(self, split: str, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from .data import load_samples

        return load_samples(self.inputs.reader, split, indices, self.device, self.inputs.resolution,
                            **self._decode_options())

    def _decode_options(self) -> dict[str, Any]:
        """``data.jpeg_draft`` / ``data.decode_device`` for every JPEG reader this rank builds."""
        return {"draft": self.config.data.jpeg_draft, "decode_device": self.config.data.decode_device}

    def _split_sizes(self) -> dict[str, int]:
        from .data import DataError

        sizes = {}
        for split in ("train", "test"):
            try:
                sizes[split] = self.inputs.reader.count(split)
            except DataError:  # a dataset without that split
                pass
        return sizes

    def _state_dir(self) -> Path | None:
        if self.config.runtime.client_state != "disk":
            return None
        base = Path(self.config.runtime.state_dir or (self.run_dir / "client_state"))
        return base / f"rank-{self.world.rank:04d}"

    def _choose_placement(self) -> str:
        """Either "dealt" (workers take the next unclaimed client) or why the placement stays fixed.

        Rank 0 decides and tells every rank: the counter's window is collective to create."""
        world = self.world
        if world.size < 3:
            return "fixed: one worker"
        note = ""
        if world.is_server:
            reader, (c, h, w) = self.inputs.reader, self.inputs.input_shape
            raw_bytes = 4 * c * h * w * int(self.sizes.sum()) if reader.encoding == "raw" else None
            note = placement_mode(self.server_algorithm, world.size,
                                  CLIENT_TAG_BASE + self.num_clients <= tag_limit(world), raw_bytes)
        return world.bcast_text(note)

    def _participations_before(self, round_: int) -> np.ndarray:
        """How often each client was selected in rounds 1..round_-1: what ``local_training``'s
        participation count in ``ctx.state`` holds, derived instead of stored when clients are dealt."""
        done, counts = self._participations
        if done > round_ - 1:
            done, counts = 0, np.zeros(self.num_clients, dtype=np.int64)
        counts = counts.copy()
        for r in range(done + 1, round_):
            counts[select_clients(self.config.seed, r, self.num_clients, self.config.server.sample_fraction)] += 1
        self._participations = (round_ - 1, counts)
        return counts

    def _derived_state(self, client: int, round_: int) -> dict[str, np.ndarray]:
        """A stateless method's ``ctx.state`` before ``round_``: its participation count, if any."""
        count = int(self._participations_before(round_)[client])
        return {PARTICIPATIONS: np.array([count], dtype=np.int64)} if count else {}

    def _build_train_data(self):
        from .data import build_train_data

        part = self.inputs.partition
        hosted = range(self.num_clients) if self.claims is not None else self.my_clients
        union = np.unique(np.concatenate([part.client_indices(c) for c in hosted] or [np.empty(0, np.int64)]))
        data = build_train_data(self.inputs.reader, union, self.device, self.inputs.resolution,
                                self.config.data.num_workers, **self._decode_options())
        return {c: data.client(part.client_indices(c)) for c in hosted}

    def _build_eval_data(self):
        from .data import build_eval_data

        return build_eval_data(self.inputs.reader, self.device, self.inputs.resolution,
                               self.config.eval.batch_size, self.config.data.num_workers, **self._decode_options())

    def _say_hello(self) -> None:
        role = "server" if self.world.is_server and not self.world.is_worker else (
            "server+worker" if self.world.is_server else "worker")
        clients = f", clients {self.my_clients}" if self.world.is_worker else ""
        if self.world.is_worker and self.claims is not None:
            clients = ", clients: the next unclaimed one (dealt)"
        print(f"[rank {self.world.rank}/{self.world.size}] {role} on {socket.gethostname()}, "
              f"{describe(self.device)}, {self.threads} threads{clients}", flush=True)

    # signals ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: stop at the next round boundary.

        Every rank catches them (the default action would kill a worker mid-collective), but only
        rank 0's flag counts: it is broadcast at the start of each round, so all ranks stop together.
        """

        def request_stop(signum, frame):
            self.stop_requested = True
            if self.world.is_server:
                print(f"[osfed-hpc] {signal.Signals(signum).name}: will checkpoint and stop at the next round boundary",
                      flush=True)

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_stop)

    # the loop --------------------------------------------------------------------------------
    def run(self) -> str:
        """Run until ``config.rounds`` or a stop request; returns 'finished' or 'stopped'."""
        if self.world.is_server:
            with ckpt.disk_full_guard(self.run_dir / "config.yaml", self.run_dir):
                write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self.wall_start = time.perf_counter()
        for round_ in range(self.start_round, self.config.rounds + 1):
            if self._broadcast_stop():
                self._checkpoint(round_ - 1)
                return self._close("stopped")
            if self.resume_phase is not None:  # the round's uploads were folded before the stop
                phase, self.resume_phase = self.resume_phase, None
                finished = self._phase_then_log(round_, phase["epochs"], phase["epoch"] + 1, phase.get("record"))
            else:
                finished = self._round(round_)
            if not finished:
                return self._close("stopped")  # the phase checkpointed itself
            every = self.config.runtime.checkpoint_every
            if every and round_ % every == 0 and round_ < self.config.rounds:
                self._checkpoint(round_)
        self._checkpoint(self.config.rounds)
        if self.world.is_server:
            self._finish()
        return self._close("finished")

    def _close(self, outcome: str) -> str:
        """Free the claim counter (collective: every rank ends the run at the same point)."""
        if self.claims is not None:
            self.claims.free()
            self.claims = None
        return outcome

    def _broadcast_stop(self) -> bool:
        """rank 0's stop flag, broadcast at every round boundary so all ranks stop together."""
        flag = np.array([int(self.stop_requested)], dtype=np.int64)
        return bool(self.world.bcast_buffer(flag)[0])

    def _round(self, round_: int) -> bool:
        """One round; False when a stop request ended its server phase early (checkpointed)."""
        world = self.world
        timer = PhaseTimer()
        round_start = time.perf_counter()
        mpi_before = world.counter.total
        selected = select_clients(self.config.seed, round_, self.num_clients, self.config.server.sample_fraction)
        with timer.phase("broadcast"):
            message, received, mode, phase_epochs = self._broadcast(round_, selected)
        exchange = self.exchanges[mode]
        records = []
        if world.is_worker:
            with timer.phase("local_work"):
                records = self._work(round_, selected, received, exchange, mode)
        if world.is_server:
            with timer.phase("exchange_and_aggregation"):
                outcome = self._aggregate(round_, selected, exchange, timer)
        if world.is_worker:
            exchange.end_of_round()
        gathered = self._gather_records(records)
        record = None
        if world.is_server:
            outcome["downlink"] = self._downlink(round_, message, selected)
            outcome["exchange"] = MODE_NAMES[mode]
            self.payload_bytes = int(gathered[:, _RECORD_HEAD.index("payload_bytes")].max(initial=0))
            record = self._round_record(round_, selected, outcome, gathered, timer, round_start, mpi_before)
        return self._phase_then_log(round_, phase_epochs, 1, record)

    # broadcast ---------------------------------------------------------------------------------
    def _broadcast(self, round_: int, selected: list[int]) -> tuple[ServerMessage | None, ReceivedMessage | None, int, int]:
        """rank 0's message -> every worker: control words, then the model (straight into the
        replica's memory on CPU), then the method data as one frame. Returns (the message on rank 0,
        the received message on workers, the exchange mode of this round, the epochs of the server
        phase that follows the round)."""
        world = self.world
        message, frame = None, np.zeros(8, dtype=np.uint8)
        control = np.zeros(4, dtype=np.int64)
        if world.is_server:
            message = self.server_algorithm.server_message(round_)
            parts = dict(message.per_client)
            if message.common is not None:
                parts[_COMMON] = message.common
            if message.diagnostics is not None:
                parts[_DIAGNOSTICS] = message.diagnostics
            frame, self._message_buffer = pack_frame(parts, self._message_buffer)
            mode = choose_mode(world.size, self.payload_bytes, len(selected),
                               self.config.runtime.gather_limit_mb * 2**20)
            control[:] = (mode, int(message.model), frame.size, self.server_algorithm.server_phase_epochs(round_))
        world.bcast_buffer(control)
        mode, model_sent, length, phase_epochs = (int(v) for v in control)
        if model_sent:
            self._broadcast_model()
        if world.size > 1:
            if world.is_worker:
                frame = self._message_buffer = np.empty(length, dtype=np.uint8)
            world.bcast_buffer(frame)
        received = None
        if world.is_worker:
            if not model_sent and self.replica is not None:
                self.worker_model.load_(self.replica)
            received = self._received(round_, bool(model_sent), frame)
            self.worker_algorithm.client_begin_round(received)
            self.replica = self.worker_model.vector.clone()
        return message, received, mode, phase_epochs

    def _broadcast_model(self) -> None:
        """rank 0's trainable state -> every worker's replica."""
        world = self.world
        if world.size == 1:
            self.worker_model.load_(self.server_model.vector)
            return
        model = self.server_model if world.is_server else self.worker_model
        if self.device.type == "cpu":
            world.bcast_buffer(model.vector.numpy())  # straight into the model's memory
        else:
            host = model.vector.cpu().numpy() if world.is_server else np.empty(model.numel, np.float32)
            world.bcast_buffer(host)
            if world.is_worker:
                model.load_(torch.from_numpy(host).to(self.device, non_blocking=False))

    @staticmethod
    def _received(round_: int, model_sent: bool, frame: np.ndarray) -> ReceivedMessage:
        parts = {key: Payload.unpack(data) for key, data in unpack_frame(frame).items()}
        return ReceivedMessage(round=round_, model=model_sent, common=parts.pop(_COMMON, None),
                               diagnostics=parts.pop(_DIAGNOSTICS, None), per_client=parts)

    def _downlink(self, round_: int, message: ServerMessage, selected: list[int]) -> int:
        """Logical downlink of the round: what each selected client receives, summed, plus the data
        a client keeps (``kept_downlink_bytes``) for each client selected for the first time."""
        model_bytes = 4 * self.server_model.numel
        algorithm = self.server_algorithm
        total = sum(message.downlink_bytes(client, algorithm.client_model_bytes(client, model_bytes))
                    for client in selected)
        kept = algorithm.kept_downlink_bytes()
        if kept:
            first_time = self._participations_before(round_)[np.asarray(selected, dtype=np.int64)] == 0
            total += kept * int(first_time.sum())
        return total

    # work --------------------------------------------------------------------------------------
    def _work(self, round_: int, selected: list[int], message: ReceivedMessage, exchange, mode: int) -> list[list[float]]:
        """Run this rank's clients of the round, each from the round's W_t: its own in client-id
        order, ``client_batch_size()`` at a time, or (dealt) the next unclaimed one until none is left.

        A client's seconds are the method's own (``ClientResult.seconds``) or its chunk's wall time
        split evenly; its peak memory is its chunk's."""
        records: list[list[float]] = []
        work_start = time.perf_counter()
        for chunk, done_before, total in self._chunks(selected, mode):
            contexts = [ClientContext(client_id=client, round=round_, data=self.train_data[client],
                                      state=self._client_state(client, round_),
                                      generator=torch_stream(self.config.seed, "client", round_, client),
                                      seed=self.config.seed, message=message) for client in chunk]
            reset_peak_memory(self.device)
            start = time.perf_counter()
            try:
                results = self.worker_algorithm.client_updates(contexts, self._load_start)
            except Exception as exc:
                which = f"client {chunk[0]}" if len(chunk) == 1 else f"clients {chunk}"
                raise RuntimeError(f"{which} failed in round {round_} on rank {self.world.rank}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - start
            if len(results) != len(contexts):
                raise RunError(f"{self.algorithm_cls.name}: client_updates returned {len(results)} results for "
                               f"{len(contexts)} clients {chunk}")
            memory = peak_memory_bytes(self.device)
            for i, (ctx, result) in enumerate(zip(contexts, results)):
                client = ctx.client_id
                seconds = float(result.seconds) if result.seconds is not None else wall / len(chunk)
                self._keep_state(client, ctx.state)
                exchange.send(client, result.payload)
                stats = [result.stats.get(name, float("nan")) for name in self.stat_names]
                records.append([client, seconds, memory, result.payload.packed_size(),
                                self.train_data[client].num_samples, *stats])
                if time.perf_counter() - work_start >= SLOW_ROUND_S:
                    print(client_done_line(self.world.rank, self.world.size, round_, client, seconds,
                                           done_before + i + 1, total), flush=True)
        exchange.end_of_work()
        return records

    def _load_start(self) -> None:
        """W_t back into the worker's model (before each client; a method's batch calls it)."""
        self.worker_model.load_(self.replica)

    def _chunks(self, selected: list[int], mode: int):
        """(clients, how many of ``total`` came before, total) for each call of ``client_updates``.

        Fixed placement: this rank's selected clients in client-id order, grouped by their block of
        ``client_batch_size()`` consecutive ids (a batch never spans two blocks, so it is the same
        on any rank count; the progress count is this rank's). Dealt: one client per claim, until the claims
        run past the round's clients (the count is the round's). Streamed payloads are dealt in
        client-id order (rank 0 folds them in that order from whoever sends them); gathered ones
        largest client first, so that no big client starts last."""
        if self.claims is None:
            mine = [c for c in selected if self.owner[c] == self.world.rank]
            done = 0
            for _, chunk in itertools.groupby(mine, key=lambda c: c // self.client_batch):  # never across blocks
                chunk = list(chunk)
                yield chunk, done, len(mine)
                done += len(chunk)
            return
        order = sorted(selected, key=lambda c: (-int(self.sizes[c]), c)) if mode == GATHER else list(selected)
        while (index := self.claims.claim()) < len(order):
            yield [order[index]], index, len(order)
        self.claims.end_round(len(order), len(self.world.worker_ranks))

    def _client_state(self, client: int, round_: int) -> dict[str, np.ndarray]:
        return self._derived_state(client, round_) if self.claims is not None else self.store.get(client)

    def _keep_state(self, client: int, state: dict[str, np.ndarray]) -> None:
        """Store a client's state (fixed placement), or check that a dealt method kept none."""
        if self.claims is None:
            self.store.put(client, state)
        elif set(state) - {PARTICIPATIONS}:
            raise RunError(f"{self.algorithm_cls.name} declares keeps_client_state = False, but client {client} "
                           f"wrote ctx.state keys {sorted(set(state) - {PARTICIPATIONS})}: set it True")

    # fold --------------------------------------------------------------------------------------
    def _aggregate(self, round_: int, selected: list[int], exchange, timer: PhaseTimer) -> dict:
        """Fold payloads into the new global model, strictly in client-id order."""
        algorithm = self.server_algorithm
        self.update_guard.begin_round(float(self.server_model.vector.double().norm()))
        algorithm.server_begin(round_)
        uplink, rejected, server_stats = 0, [], {}
        for client, data in exchange.receive(selected):
            uplink += len(data)
            start = time.perf_counter()
            try:
                payload = Payload.unpack(data)
                if payload.meta.get("client") != client or payload.meta.get("round") != round_:
                    raise ValueError(f"client {client}, round {round_}: payload header says client "
                                     f"{payload.meta.get('client')}, round {payload.meta.get('round')}")
                for key, value in algorithm.server_accumulate(client, payload, float(self.sizes[client])).items():
                    server_stats.setdefault(key, []).append(value)
            except ValueError as exc:
                rejected.append(client)
                print(f"[osfed-hpc] warning: rejected payload of client {client} in round {round_}: {exc}",
                      file=sys.stderr, flush=True)
            timer.seconds["aggregation"] = timer.seconds.get("aggregation", 0.0) + time.perf_counter() - start
        self.update_guard.end_round()
        start = time.perf_counter()
        new_vector = algorithm.server_finish()
        if not torch.isfinite(new_vector).all():
            print(f"[osfed-hpc] warning: round {round_} produced a non-finite model; keeping the previous one",
                  file=sys.stderr, flush=True)
            rejected = list(selected)
        else:
            self.server_model.load_(new_vector)
        timer.seconds["aggregation"] = timer.seconds.get("aggregation", 0.0) + time.perf_counter() - start
        return {"uplink": uplink, "rejected": rejected,
                "server_stats": {k: float(np.mean(v)) for k, v in server_stats.items()}}

    def _gather_records(self, records: list[list[float]]) -> np.ndarray | None:
        width = len(_RECORD_HEAD) + len(self.stat_names)
        array = np.asarray(records, dtype=np.float64).reshape(-1, width)
        gathered = self.world.gatherv_bytes(array.view(np.uint8).reshape(-1))
        if gathered is None:
            return None
        table = np.frombuffer(gathered[0].tobytes(), dtype=np.float64).reshape(-1, width)
        rows_per_rank = np.asarray(gathered[1]) // (8 * width)
        hosts = np.repeat(np.arange(len(rows_per_rank)), rows_per_rank)
        self.round_hosts = {int(client): int(rank) for client, rank in zip(table[:, 0], hosts)}
        return table[np.argsort(table[:, 0], kind="stable")]

    # logging ---------------------------------------------------------------------------------
    def evaluate(self, module: torch.nn.Module | None = None) -> tuple[float, float]:
        """(accuracy, mean loss) of the server model (or ``module``) on the test split."""
        net = self.server_model.model if module is None else module
        was_training = net.training
        net.eval()
        correct = torch.zeros((), device=self.device)
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        threads = torch.get_num_threads()
        torch.set_num_threads(self._eval_threads())
        try:
            with torch.no_grad():
                for x, y in self.eval_data.eval_batches(self.config.eval.batch_size):
                    logits = net(self.server_model.to_input_format(x))
                    loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
                    correct += (logits.argmax(1) == y).sum()
                    count += y.numel()
        finally:
            torch.set_num_threads(threads)
            net.train(was_training)
        return float(correct) / max(count, 1), float(loss) / max(count, 1)

    def _eval_threads(self) -> int:
        """Threads for rank 0's evaluation. With workers, rank 0 evaluates while every worker waits
        for the next round (or server-phase epoch) in a sleeping poll, so it may use every core it
        is allowed on, not just its share; alone (one rank) or on a GPU, its usual threads."""
        if self.world.size == 1 or self.device.type != "cpu":
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(self.threads, cores)

    def _round_record(self, round_, selected, outcome, table, timer, round_start, mpi_before) -> dict[str, Any]:
        """The round's metrics line up to the fold (the server phase and the evaluation add to it)."""
        downlink = outcome["downlink"]
        self.totals["uplink"] += outcome["uplink"]
        self.totals["downlink"] += downlink
        self.totals["rejected"] += len(outcome["rejected"])
        record: dict[str, Any] = {"round": round_, "clients": selected}
        columns = {name: table[:, i] for i, name in enumerate(_RECORD_HEAD + tuple(self.stat_names))}
        weights = columns["num_samples"]
        loss = columns.get("train_loss")
        if loss is not None and len(loss) and np.isfinite(loss).any():
            ok = np.isfinite(loss)
            record["train_loss"] = float(np.average(loss[ok], weights=weights[ok]))
        per_rank = {}
        for row in table:
            host = self.round_hosts.get(int(row[0]), self.owner[int(row[0])])
            per_rank[host] = per_rank.get(host, 0.0) + row[1]
        local = max(per_rank.values(), default=0.0)
        seconds = dict(timer.seconds)
        exchange_agg = seconds.pop("exchange_and_aggregation", 0.0)
        if self.world.size > 1:
            seconds["local_work"] = local
            seconds["exchange"] = max(exchange_agg - local - seconds.get("aggregation", 0.0), 0.0)
        seconds["round"] = time.perf_counter() - round_start
        mpi_bytes = self.world.counter.total - mpi_before
        self.totals["mpi"] += mpi_bytes
        record.update(
            uplink_bytes=outcome["uplink"], uplink_bytes_total=self.totals["uplink"],
            downlink_bytes=downlink, downlink_bytes_total=self.totals["downlink"],
            mpi_bytes=mpi_bytes, exchange=outcome["exchange"], rejected=len(outcome["rejected"]), rejected_clients=outcome["rejected"],
            seconds={k: round(v, 6) for k, v in seconds.items()},
            client_stats={name: [float(v) for v in columns[name]] for name in _RECORD_HEAD[1:] + tuple(self.stat_names)},
            server_stats=outcome["server_stats"],
        )
        return record

    def _log_round(self, round_: int, record: dict[str, Any]) -> None:
        """Evaluate (when due), then write and print the round's line (rank 0)."""
        start = time.perf_counter()
        if round_ % self.config.eval.every == 0 or round_ == self.config.rounds:
            accuracy, test_loss = self.evaluate()
            record.update(test_accuracy=accuracy, test_loss=test_loss)
            record["seconds"]["evaluation"] = round(time.perf_counter() - start, 6)
        record["seconds"]["round"] = round(record["seconds"]["round"] + time.perf_counter() - start, 6)
        with ckpt.disk_full_guard(self.log.path, self.run_dir):
            self.log.append(record)
        if self.tensorboard is not None:
            self.tensorboard.log_round(record)
        self.round_seconds.append(record["seconds"]["round"])
        print(progress_line(record, round_eta(self.round_seconds, self.config.rounds - round_)), flush=True)
        self.last_record = record

    # the server phase ----------------------------------------------------------------------------
    def _phase_then_log(self, round_: int, epochs: int, first_epoch: int, record: dict[str, Any] | None) -> bool:
        """Every rank: the round's server phase (if any), then rank 0 logs the round. False when a
        stop request ended the phase early (a checkpoint holds where it stopped)."""
        if epochs and not self._server_phase(round_, epochs, first_epoch, record):
            return False
        if self.world.is_server:
            self._log_round(round_, record)
        return True

    def _server_phase(self, round_: int, epochs: int, first_epoch: int, record: dict[str, Any] | None) -> bool:
        """Epochs ``first_epoch..epochs`` of server-only training after round ``round_``'s fold.

        Rank 0 trains; after every epoch it tells the workers (one control word) whether to go on,
        to write a checkpoint with it (every ``runtime.checkpoint_every`` epochs), or to checkpoint
        and stop (SIGUSR1/SIGTERM, or the method's ``stop_early``). A checkpoint between epochs is
        ``round-<r-1>-phase-<e>``: round r's uploads are folded, its phase is at epoch e, and a
        resumed run continues at epoch e + 1 (no client work is redone).
        """
        world = self.world
        every = self.config.runtime.checkpoint_every
        epoch = first_epoch - 1
        while True:
            code = np.zeros(1, dtype=np.int64)
            if world.is_server:
                if epoch >= epochs:
                    code[0] = _PHASE_DONE
                elif self.stop_requested:
                    code[0] = _PHASE_STOP
                else:
                    epoch += 1
                    stats = self._phase_epoch(round_, epoch, epochs, record)
                    if stats.get("stop_early"):
                        epochs = epoch
                    code[0] = (_PHASE_STOP if self.stop_requested and epoch < epochs else
                               _PHASE_CHECKPOINT if every and epoch % every == 0 and epoch < epochs else _PHASE_GO)
            world.bcast_buffer(code)
            action = int(code[0])
            if action in (_PHASE_CHECKPOINT, _PHASE_STOP):
                state = None
                if world.is_server:
                    state = {"round": round_, "epoch": epoch, "epochs": epochs, "record": record}
                self._checkpoint_phase(round_, state)
            if action == _PHASE_STOP:
                return False
            if action == _PHASE_DONE:
                if world.is_server:
                    self.server_algorithm.server_phase_end(round_)
                    record["server_phase"]["epochs_done"] = epochs
                return True

    def _phase_epoch(self, round_: int, epoch: int, epochs: int, record: dict[str, Any]) -> dict[str, float]:
        """One epoch on rank 0, timed and logged (its own metrics line), with progress and ETA."""
        reset_peak_memory(self.device)
        start = time.perf_counter()
        stats = dict(self.server_algorithm.server_phase_epoch(round_, epoch))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if not torch.isfinite(self.server_model.vector).all():
            raise RunError(f"round {round_}, server phase epoch {epoch}: the model became non-finite "
                           f"(NaN/Inf); lower the method's server learning rate")
        memory = peak_memory_bytes(self.device)
        line: dict[str, Any] = {"round": round_, "phase_epoch": epoch, "phase_epochs": epochs,
                                "phase_stats": {k: float(v) for k, v in stats.items()},
                                "seconds": round(seconds, 6), "peak_memory_bytes": memory}
        phase_every = self.config.eval.phase_every
        if phase_every and epoch % phase_every == 0 and epoch < epochs:
            line["test_accuracy"], line["test_loss"] = self.evaluate()
        summary = record.setdefault("server_phase", {"epochs": epochs, "seconds": 0.0, "peak_memory_bytes": 0})
        summary["epochs"] = epochs
        summary["seconds"] = round(summary["seconds"] + seconds, 6)
        summary["peak_memory_bytes"] = max(summary["peak_memory_bytes"], memory)
        summary["last"] = line["phase_stats"]
        record["seconds"]["server_phase"] = summary["seconds"]
        record["seconds"]["round"] = round(record["seconds"]["round"] + seconds, 6)
        with ckpt.disk_full_guard(self.log.path, self.run_dir):
            self.log.append(line)
        self.phase_seconds.append(seconds)
        eta = round_eta(self.phase_seconds, epochs - epoch)
        print(phase_progress_line(line, eta), flush=True)
        return stats

    def _checkpoint_phase(self, round_: int, state: dict[str, Any] | None) -> None:
        """Every rank: a checkpoint between two epochs of round ``round_``'s server phase."""
        epoch = self.world.bcast_buffer(np.array([state["epoch"] if state else 0], dtype=np.int64))[0]
        self._write_checkpoint(ckpt.phase_checkpoint_dir(self.run_dir, round_ - 1, int(epoch)), round_ - 1,
                               {"phase": state} if state else {}, clients_through=round_)

    # checkpoint / resume ---------------------------------------------------------------------
    def _checkpoint(self, round_done: int) -> None:
        """Write checkpoint ``round_done`` unless it is the one this run resumed from. A stop before
        the first round writes round 0 (the initial state), so the directory is resumable."""
        if 0 < round_done < self.start_round:
            return
        self._write_checkpoint(ckpt.checkpoint_dir(self.run_dir, round_done), round_done, {})

    def _write_checkpoint(self, directory: Path, round_done: int, extra: dict[str, Any],
                          clients_through: int | None = None) -> None:
        """Every rank: client states by their hosts, then rank 0's server part and manifest.
        ``clients_through``: the last round whose client updates the states include (default
        ``round_done``; a checkpoint inside round r's server phase holds round r's)."""
        clients_through = round_done if clients_through is None else clients_through
        if self.world.is_server:
            ckpt.begin_checkpoint(directory)
        self.world.barrier()
        records = {}
        if self.world.is_worker:  # each writer hashes what it writes: rank 0 never reads client files back
            if self.claims is not None:  # dealt: the states a fixed placement would hold (same files)
                states = {c: self._derived_state(c, clients_through + 1) for c in self.my_clients}
            else:
                states = {c: self.store.get(c) for c in self.my_clients}
            records = ckpt.write_client_states(directory, states)
        gathered = self.world.gatherv_bytes(ckpt.encode_file_records(records))  # also: every rank has written
        if self.world.is_server:
            ckpt.write_server_part(
                directory, round_done, self.server_model.vector.cpu().numpy(), self._server_state(),
                self.config.to_dict(), self.server_model.sha256(),
                {"totals": self.totals, "world_size": self.world.size, "wall_seconds": self._wall(), **extra},
                client_files=ckpt.decode_file_records(*gathered),
            )
        self.world.barrier()

    def _server_state(self) -> dict[str, np.ndarray]:
        state = dict(self.server_algorithm.server_state())
        state.update(self.server_optimizer.state())
        state.update(self.update_guard.state())
        return state

    def _wall(self) -> float:
        return getattr(self, "previous_wall", 0.0) + time.perf_counter() - getattr(self, "wall_start", time.perf_counter())

    def _restore(self, directory: Path) -> None:
        checkpoint = ckpt.Checkpoint(directory, self.config.to_dict())
        if checkpoint.round > self.config.rounds:
            raise RunError(f"cannot resume {str(self.run_dir)!r} with rounds={self.config.rounds}: it has already "
                           f"done {checkpoint.round} rounds (give rounds >= {checkpoint.round})")
        vector, server_state = checkpoint.server()
        model = self.server_model if self.world.is_server else self.worker_model
        if vector.shape != (model.numel,):
            raise ckpt.CheckpointError(f"checkpoint {directory}: model has {vector.size} values, "
                                       f"expected {model.numel}")
        if self.world.is_worker:  # the replica methods that send no model continue from
            self.worker_model.load_(torch.from_numpy(vector).to(self.device))
            self.replica = self.worker_model.vector.clone()
        if self.world.is_server:
            self.server_model.load_(torch.from_numpy(vector).to(self.device))
            self.server_optimizer.load_state(server_state, self.device)
            self.update_guard.load_state(server_state)
            self.server_algorithm.load_server_state(server_state)
        phase = checkpoint.manifest.get("phase")
        if phase is not None:
            if phase["round"] > self.config.rounds:
                raise RunError(f"cannot resume {str(self.run_dir)!r} with rounds={self.config.rounds}: it stopped inside "
                               f"round {phase['round']}'s server phase (give rounds >= {phase['round']})")
            self.resume_phase = phase
        if self.world.is_server:
            self.log.truncate_after(checkpoint.round, (phase["round"], phase["epoch"]) if phase else None)
        if self.world.is_worker:
            for client in self.my_clients:
                self.store.put(client, checkpoint.client_state(client))
        self.totals = dict(checkpoint.manifest.get("totals", self.totals))
        self.previous_wall = float(checkpoint.manifest.get("wall_seconds", 0.0))
        self.start_round = checkpoint.round + 1
        if self.world.is_server:
            where = f", server phase of round {phase['round']} at epoch {phase['epoch']}" if phase else ""
            print(f"[osfed-hpc] resumed from {directory} (round {checkpoint.round}{where})", flush=True)

    # the end ---------------------------------------------------------------------------------
    def _finish(self) -> dict[str, Any]:
        records = round_records(self.log.records())
        evaluated = [r for r in records if r.get("test_accuracy") is not None]
        final = evaluated[-1] if evaluated else {}
        client_rounds = sum(len(r["clients"]) for r in records) or 1
        summary = {
            "name": self.config.name,
            "algorithm": self.config.algorithm["name"],
            "model": self.config.model.name,
            "rounds": self.config.rounds,
            "final_accuracy": final.get("test_accuracy"),
            "final_test_loss": final.get("test_loss"),
            "uplink_bytes": self.totals["uplink"],
            "downlink_bytes": self.totals["downlink"],
            "uplink_bytes_per_client_round": self.totals["uplink"] / client_rounds,
            "downlink_bytes_per_client_round": self.totals["downlink"] / client_rounds,
            "mpi_bytes": self.totals["mpi"],
            "server_phase_seconds": sum(r.get("server_phase", {}).get("seconds", 0.0) for r in records),
            "server_phase_peak_memory_bytes": max((r.get("server_phase", {}).get("peak_memory_bytes", 0)
                                                   for r in records), default=0),
            "rejected_payloads": self.totals["rejected"],
            "wall_seconds": self._wall(),
            "world_size": self.world.size,
            "num_clients": self.num_clients,
            "resolution": self.inputs.resolution,
            "model_params": self.server_model.param_numel,
            "model_sha256": self.server_model.sha256(),
        }
        model_file = io.BytesIO()  # serialised first: a full disk is then an OSError naming model.pt, never half a file
        torch.save(self.server_model.model.state_dict(), model_file)
        with ckpt.disk_full_guard(self.run_dir / "model.pt", self.run_dir):
            write_bytes_atomic(self.run_dir / "model.pt", model_file.getbuffer())
        with ckpt.disk_full_guard(self.run_dir / "summary.json", self.run_dir):
            write_json_atomic(self.run_dir / "summary.json", summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        print(f"[osfed-hpc] done: {json.dumps(summary)}", flush=True)
        return summary
