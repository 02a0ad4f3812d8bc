"""The MPI world: roles, client placement, and every byte that crosses ranks.

Rules this module enforces:
- Only upper-case (buffer) mpi4py calls: payloads are bytes, never pickled objects.
- Nobody spins while waiting. Blocking collectives busy-poll a core; with more ranks than cores
  (3 ranks on a 2-core laptop, the server idle during local work) that steals the core a worker
  needs. Every wait here is a non-blocking request polled with sleeps that grow while nothing
  arrives (50 us, x1.5 per empty poll, at most 2 ms): a short wait answers within microseconds, a
  long one (rank 0 during a round's local work) wakes ~500 times a second instead of 5,000.
- An exception on any rank aborts the whole job with the message printed (``install_abort_hook``),
  so a bad client on rank 7 cannot leave ranks 0-6 waiting in a collective forever.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: adaptive polling: first sleep, growth per empty poll, cap. The cap bounds the latency a long wait
#: adds when its message arrives (a few per round on the critical path: ~0.1 % of a 2 s round)
_POLL_FIRST_S, _POLL_GROWTH, _POLL_CAP_S = 5e-5, 1.5, 2e-3
_BLOCKING_WAIT = os.environ.get("OSFED_BLOCKING_WAIT") == "1"
_ABORT_GRACE_S = 1.0


def _mpi():
    from mpi4py import MPI

    return MPI


@dataclass
class ByteCounter:
    """Bytes MPI actually moved, as seen from rank 0 (counted once per link)."""

    sent: int = 0
    received: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.received


@dataclass
class World:
    comm: object
    rank: int
    size: int
    counter: ByteCounter = field(default_factory=ByteCounter)

    @classmethod
    def from_mpi(cls, comm=None) -> World:
        """The job's world (or any communicator, e.g. a sub-world in tests)."""
        comm = comm if comm is not None else _mpi().COMM_WORLD
        return cls(comm=comm, rank=comm.Get_rank(), size=comm.Get_size())

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def is_worker(self) -> bool:
        """Ranks that host clients: 1..P-1, or rank 0 itself when it runs alone."""
        return self.size == 1 or self.rank > 0

    @property
    def worker_ranks(self) -> list[int]:
        return [0] if self.size == 1 else list(range(1, self.size))

    # waiting -------------------------------------------------------------------------------
    def wait(self, request) -> None:
        """Wait for one request without occupying a core (``OSFED_BLOCKING_WAIT=1``: plain
        ``Wait``, kept so benchmarks can measure what polling saves)."""
        if _BLOCKING_WAIT:
            request.Wait()
            return
        self.wait_status(request)

    def wait_status(self, request, status=None) -> None:
        """``wait`` that also fills an ``MPI.Status`` (the source of an ``ANY_SOURCE`` receive).

        Sleeps grow geometrically while nothing arrives and start small again with the next
        request: each wake-up is a context switch that a worker sharing the core pays for."""
        if _BLOCKING_WAIT:
            request.Wait(status)
            return
        sleep = _POLL_FIRST_S
        while not request.Test(status):
            time.sleep(sleep)
            sleep = min(sleep * _POLL_GROWTH, _POLL_CAP_S)

    def wait_all(self, requests: list) -> None:
        for request in requests:
            self.wait(request)

    def barrier(self) -> None:
        if self.size > 1:
            self.wait(self.comm.Ibarrier())

    # collectives ---------------------------------------------------------------------------
    def bcast_buffer(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Broadcast a contiguous array in place (every rank passes a buffer of the same shape)."""
        if self.size > 1:
            self.wait(self.comm.Ibcast(array, root=root))
            if self.rank == root:
                self.counter.sent += array.nbytes * (self.size - 1)
        return array

    def bcast_text(self, text: str, root: int = 0) -> str:
        """A short string from ``root`` to every rank (length, then UTF-8 bytes; never pickled)."""
        if self.size == 1:
            return text
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.rank == root else None
        length = self.bcast_buffer(np.array([0 if data is None else data.size], dtype=np.int64), root)
        buffer = data.copy() if self.rank == root else np.empty(int(length[0]), dtype=np.uint8)
        return bytes(self.bcast_buffer(buffer, root)).decode()

    def gatherv_bytes(self, data: np.ndarray, root: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """Gather variable-length uint8 buffers on ``root``; returns (all bytes, per-rank counts) there."""
        data = np.ascontiguousarray(data, dtype=np.uint8)
        if self.size == 1:
            return data, np.array([data.size], dtype=np.int64)
        counts = np.zeros(self.size, dtype=np.int64) if self.rank == root else None
        self.wait(self.comm.Igather(np.array([data.size], dtype=np.int64), counts, root=root))
        if self.rank != root:
            self.wait(self.comm.Igatherv(data, None, root=root))
            return None
        received = np.empty(int(counts.sum()), dtype=np.uint8)
        displacements = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.wait(self.comm.Igatherv(data, [received, counts, displacements, _mpi().BYTE], root=root))
        self.counter.received += int(counts.sum()) - int(counts[root])
        return received, counts

    # point to point (streamed payloads) ----------------------------------------------------
    def isend_bytes(self, data, dest: int, tag: int) -> list:
        """Start sending ``data`` (length first, then the bytes); keep ``data`` alive until waited.
        Returns [length array, request, request]."""
        header = np.array([len(data)], dtype=np.int64)
        return [header, self.comm.Isend(header, dest=dest, tag=tag), self.comm.Isend(data, dest=dest, tag=tag)]

    def recv_bytes(self, source: int, tag: int, into: np.ndarray | None = None) -> np.ndarray:
        """Receive one ``isend_bytes`` message; into ``into`` (reused, grown if needed) when given.
        ``source=None``: from whichever rank sends with ``tag`` (the body then comes from that rank)."""
        header = np.empty(1, dtype=np.int64)
        if source is None:
            status = _mpi().Status()
            self.wait_status(self.comm.Irecv(header, source=_mpi().ANY_SOURCE, tag=tag), status)
            source = status.Get_source()
        else:
            self.wait(self.comm.Irecv(header, source=source, tag=tag))
        size = int(header[0])
        buffer = into if into is not None and into.size >= size else np.empty(size, dtype=np.uint8)
        self.wait(self.comm.Irecv(buffer[:size], source=source, tag=tag))
        self.counter.received += size + header.nbytes
        return buffer[:size]

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


#: dealt clients need every client's data on every worker: for in-memory (raw) data only while the
#: whole training split, as float32 on the device, stays below this (JPEG data is read on demand)
DEALT_DATA_LIMIT_BYTES = 2**30


def placement_mode(algorithm: Any, world_size: int, tags_fit: bool, raw_bytes: int | None,
                   raw_limit: int = DEALT_DATA_LIMIT_BYTES) -> str:
    """"dealt" (workers take the next unclaimed client) or, when the split stays fixed, why.

    One decision for the runner and ``--dry-run``'s plan, so the plan shows the placement the run
    will use. ``raw_bytes`` is the training split as float32 when the data is held in memory on
    every worker (None for data read on demand)."""
    if world_size < 3:
        return "fixed: one worker"
    if os.environ.get("OSFED_PLACEMENT", "").strip().lower() == "static":
        return "fixed: OSFED_PLACEMENT=static"
    if type(algorithm).keeps_client_state:
        return "fixed: the method keeps client state"
    if algorithm.client_batch_size() > 1:
        return "fixed: the method batches a rank's clients"
    if not tags_fit:
        return "fixed: more clients than MPI tags"
    if raw_bytes is not None and raw_bytes > raw_limit:
        return f"fixed: the training split ({raw_bytes / 2**30:.1f} GiB) would be on every worker"
    return "dealt"


def tag_limit(world: World) -> int:
    """The largest MPI tag this library accepts (at least 32767 by the standard)."""
    if world.size == 1:
        return 2**31 - 1
    return int(world.comm.Get_attr(_mpi().TAG_UB))


class ClaimCounter:
    """A job-wide "next item" counter on rank 0: workers take the next unclaimed client of a round
    with one MPI fetch-and-add (one-sided: rank 0 runs no code to answer, and never spins).

    Workers open one passive-target epoch (``Lock_all``) for the run and complete each claim with
    ``Flush``: ~20 us with MPICH on one node, where ``Lock``/``Unlock`` per claim waited for
    rank 0's next poll (~3 ms). Each worker calls ``claim`` until it gets an index past the round's
    clients, so a round takes exactly ``clients + workers`` claims; every rank adds that to ``base``
    (``end_round``) instead of resetting the counter, which would need a synchronisation of its
    own. Collective to create and to ``free``.
    """

    def __init__(self, world: World) -> None:
        MPI = _mpi()
        self.world = world
        self.window = MPI.Win.Allocate(8 if world.rank == 0 else 0, 8, comm=world.comm)
        if world.rank == 0:
            self.window.Lock(0, MPI.LOCK_EXCLUSIVE)
            self.window.Put(np.zeros(1, dtype=np.int64), 0)
            self.window.Unlock(0)
        world.wait(world.comm.Ibarrier())  # once, at start-up: nobody claims before the counter is zero
        if world.rank != 0:
            self.window.Lock_all()
        self.base = 0
        self._one = np.ones(1, dtype=np.int64)
        self._got = np.zeros(1, dtype=np.int64)

    def claim(self) -> int:
        """The index (within this round) of the item this worker takes next (workers only)."""
        self.window.Fetch_and_op(self._one, self._got, 0, 0, _mpi().SUM)
        self.window.Flush(0)
        return int(self._got[0]) - self.base

    def end_round(self, items: int, workers: int) -> None:
        self.base += items + workers

    def free(self) -> None:
        if self.world.rank != 0:
            self.window.Unlock_all()
        self.window.Free()


def assign_clients(sizes: list[int] | np.ndarray, worker_ranks: list[int], block: int = 1) -> dict[int, list[int]]:
    """Longest-processing-time-first placement of clients on worker ranks.

    A round lasts as long as its slowest rank, and Dirichlet(0.01) client sizes differ by orders
    of magnitude, so round-robin can leave one rank with all the big clients. Greedy by size,
    ties by client id, gives a placement that depends only on the sizes: reproducible.

    ``block > 1`` places whole blocks of ``block`` consecutive client ids (weighted by their total
    size): a method that batches a rank's clients (``client_batch_size``) then forms the same batches
    whatever the number of ranks, because a batch never spans two blocks.
    """
    block = max(1, int(block))
    groups = [list(range(start, min(start + block, len(sizes)))) for start in range(0, len(sizes), block)]
    weight = [sum(int(sizes[c]) for c in group) for group in groups]
    load = {rank: 0 for rank in worker_ranks}
    placement: dict[int, list[int]] = {rank: [] for rank in worker_ranks}
    for g in sorted(range(len(groups)), key=lambda g: (-weight[g], g)):
        rank = min(worker_ranks, key=lambda r: (load[r], r))
        placement[rank].extend(groups[g])
        load[rank] += max(weight[g], 1)
    return {rank: sorted(clients) for rank, clients in placement.items()}


def owner_map(placement: dict[int, list[int]]) -> dict[int, int]:
    return {client: rank for rank, clients in placement.items() for client in clients}


def install_abort_hook(world: World) -> None:
    """Print any uncaught exception with the rank, then abort every rank of the job.

    Without this an exception on one rank leaves the others blocked in the next collective until
    the SLURM time limit. Exit code 1; the message goes to stderr, flushed before ``Abort``.
    """

    def hook(exc_type, exc, tb):
        sys.stdout.flush()
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        from .errors import UserError

        if isinstance(exc, UserError) and os.environ.get("OSFED_TRACEBACK") != "1":
            text = f"{exc}\n"  # bad input: the message says it all, a traceback only hides it
        sys.stderr.write(f"[rank {world.rank}/{world.size}] error: {text}")
        sys.stderr.flush()
        if world.size > 1:
            # the launcher forwards our stderr through a pipe; Abort tears that down at once, and
            # without a moment to drain it the one message that says what went wrong can be lost
            time.sleep(_ABORT_GRACE_S)
            world.abort(1)
        else:
            os._exit(1)

    sys.excepthook = hook


def node_local_rank() -> int:
    """This rank's index among the ranks on its node (for picking a GPU)."""
    for variable in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    comm = _mpi().COMM_WORLD.Split_type(_mpi().COMM_TYPE_SHARED)
    try:
        return comm.Get_rank()
    finally:
        comm.Free()


def node_local_size(comm=None) -> int:
    """Ranks of ``comm`` (default: the world) that share this node."""
    if comm is not None and comm.Get_size() == 1:
        return 1
    comm = (comm or _mpi().COMM_WORLD).Split_type(_mpi().COMM_TYPE_SHARED)
    try:
        return comm.Get_size()
    finally:
        comm.Free()


class StreamSender:
    """Sends weight-sized payloads to rank 0 with at most ``depth`` in flight.

    Each in-flight payload has its own send buffer, packed in place and reused round after round:
    one copy per payload, and a worker's memory holds ``depth`` payloads, not one per client it
    hosts (30 ViT-L updates would be 36 GB). Rank 0 receives in client-id order and workers send in
    client-id order, so waiting for an older send cannot deadlock.
    """

    def __init__(self, world: World, dest: int, tag: int, depth: int = 2) -> None:
        self.world, self.dest, self.tag = world, dest, tag
        self.buffers: list[np.ndarray | None] = [None] * depth
        self.pending: list[list] = [[] for _ in range(depth)]
        self.next = 0

    def send(self, payload, tag: int | None = None) -> int:
        """Pack ``payload`` into a free slot and start sending it (with ``tag``, default the stream's)."""
        slot = self.next
        self.next = (self.next + 1) % len(self.buffers)
        self.world.wait_all(self.pending[slot][1:])
        size = payload.packed_size()
        if self.buffers[slot] is None or self.buffers[slot].size < size:
            self.buffers[slot] = np.empty(size, dtype=np.uint8)
        payload.pack_into(self.buffers[slot])
        self.pending[slot] = self.world.isend_bytes(self.buffers[slot][:size], self.dest,
                                                    self.tag if tag is None else tag)
        return size

    def flush(self) -> None:
        for requests in self.pending:
            self.world.wait_all(requests[1:])
