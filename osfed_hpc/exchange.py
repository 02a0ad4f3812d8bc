"""Moving client payloads to rank 0: in-process, one Gatherv, or streamed point to point.

Which one is a question of size, not of method: a 3 KB snapshot from each of 60 clients is best
gathered in one collective; a 1 % top-k of a ViT-L from 60 clients (~1.4 GB) or a FedAvg update
must stream, with a bounded number in flight, and be folded into the aggregate as it arrives so
rank 0 never holds more than one. Rank 0 chooses per round from the largest payload of the
previous round (before the first one: the method's upper bound) and tells every rank with the
round's control broadcast, so all ranks agree without another message.

Every mode hands payloads to the fold in client-id order, so the choice never changes a result.

The frame used for gathered payloads (and for the server's message) is::

    int64 count | int64 (key, length) * count | payload bytes, back to back
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .comm import StreamSender, World
from .payload import Payload

IN_PROCESS, GATHER, STREAM = 0, 1, 2
MODE_NAMES = {IN_PROCESS: "in_process", GATHER: "gather", STREAM: "stream"}
_PAYLOAD_TAG = 11
#: with clients dealt at run time (``owner`` unknown to rank 0), client c streams with tag BASE + c
#: and rank 0 receives it from whichever rank sends that tag
CLIENT_TAG_BASE = 1000


def choose_mode(world_size: int, payload_bytes: int, clients: int, gather_limit_bytes: int) -> int:
    """In-process for one rank; one Gatherv while all payloads together fit ``gather_limit_bytes``
    on rank 0 (and MPI's int counts); streamed otherwise."""
    if world_size == 1:
        return IN_PROCESS
    total = payload_bytes * max(clients, 1)
    return GATHER if total <= min(gather_limit_bytes, 2**31 - 1) else STREAM


# ---------------------------------------------------------------------------------------------
# frames


def pack_frame(payloads: dict[int, Payload], buffer: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``payloads`` (key -> payload) into ``buffer`` (reused when large enough): one copy each.
    Returns (the frame, the buffer to keep for next time)."""
    sizes = {key: p.packed_size() for key, p in payloads.items()}
    head = 8 + 16 * len(payloads)
    total = head + sum(sizes.values())
    if buffer is None or buffer.size < total:
        buffer = np.empty(total, dtype=np.uint8)
    frame = buffer[:total]
    frame[:8].view(np.int64)[0] = len(payloads)
    if payloads:
        frame[8:head].view(np.int64)[:] = np.array([[k, n] for k, n in sizes.items()], dtype=np.int64).reshape(-1)
    position = head
    for key, payload in payloads.items():
        position += payload.pack_into(frame[position : position + sizes[key]])
    return frame, buffer


def unpack_frame(segment: memoryview | np.ndarray) -> dict[int, memoryview]:
    """Key -> payload bytes (views, no copy). Raises ``ValueError`` on a malformed frame."""
    segment = memoryview(segment).cast("B") if not isinstance(segment, memoryview) else segment
    if segment.nbytes < 8:
        raise ValueError(f"frame of {segment.nbytes} bytes has no header")
    count = int(np.frombuffer(segment[:8], dtype=np.int64)[0])
    if count < 0 or 8 + 16 * count > segment.nbytes:
        raise ValueError(f"frame says {count} entries, which do not fit {segment.nbytes} bytes")
    table = np.frombuffer(segment[8 : 8 + 16 * count], dtype=np.int64).reshape(count, 2)
    position = 8 + 16 * count
    result: dict[int, memoryview] = {}
    for key, length in table:
        if length < 0 or position + length > segment.nbytes:
            raise ValueError(f"frame entry {int(key)} of {int(length)} bytes runs past the frame")
        result[int(key)] = segment[position : position + int(length)]
        position += int(length)
    return result


# ---------------------------------------------------------------------------------------------
# the three modes


class Exchange:
    """Worker side: ``send`` each payload as its client finishes, ``end_of_work`` after the last.
    Rank 0: ``receive`` yields (client, bytes) in client-id order; each buffer is valid until the
    next one is taken. Workers call ``end_of_round`` after rank 0 has had everything."""

    def send(self, client: int, payload: Payload) -> None:
        raise NotImplementedError

    def end_of_work(self) -> None:
        pass

    def receive(self, selected: list[int]) -> Iterator[tuple[int, np.ndarray | memoryview]]:
        raise NotImplementedError

    def end_of_round(self) -> None:
        pass


class InProcessExchange(Exchange):
    """One rank plays server and worker: payloads are packed (so the fold reads wire bytes and
    the byte count is the same as over MPI) and handed over."""

    def __init__(self) -> None:
        self.packed: dict[int, bytes] = {}

    def send(self, client: int, payload: Payload) -> None:
        self.packed[client] = payload.pack()

    def receive(self, selected: list[int]) -> Iterator[tuple[int, bytes]]:
        packed, self.packed = self.packed, {}
        for client in selected:
            yield client, packed[client]


class GatherExchange(Exchange):
    """All payloads of a round to rank 0 in one Gatherv, packed straight into a reused frame."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.pending: dict[int, Payload] = {}
        self.buffer: np.ndarray | None = None

    def send(self, client: int, payload: Payload) -> None:
        self.pending[client] = payload

    def end_of_work(self) -> None:
        frame, self.buffer = pack_frame(self.pending, self.buffer)
        self.pending = {}
        self.world.gatherv_bytes(frame)

    def receive(self, selected: list[int]) -> Iterator[tuple[int, memoryview]]:
        data, counts = self.world.gatherv_bytes(np.zeros(8, dtype=np.uint8))
        payloads: dict[int, memoryview] = {}
        offset = 0
        for count in counts:
            payloads.update(unpack_frame(memoryview(data[offset : offset + int(count)])))
            offset += int(count)
        for client in selected:
            yield client, payloads[client]


class StreamExchange(Exchange):
    """Weight-sized payloads point to point, at most ``depth`` in flight per worker, received by
    rank 0 in client-id order into one reused buffer and folded before the next arrives.

    ``owner=None``: clients are dealt at run time, so rank 0 does not know who hosts whom; each
    payload then travels with its client's own tag and is taken from whichever rank sent it.
    Workers must then take their clients in increasing id order (each one's sends are in
    client-id order, so waiting for an older send still cannot deadlock)."""

    def __init__(self, world: World, owner: dict[int, int] | None, depth: int = 2) -> None:
        self.world = world
        self.owner = owner
        self.sender = StreamSender(world, dest=0, tag=_PAYLOAD_TAG, depth=depth)
        self.buffer: np.ndarray | None = None

    def send(self, client: int, payload: Payload) -> None:
        self.sender.send(payload, None if self.owner is not None else CLIENT_TAG_BASE + client)

    def receive(self, selected: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        for client in selected:
            if self.owner is None:
                self.buffer = self.world.recv_bytes(None, CLIENT_TAG_BASE + client, into=self.buffer)
            else:
                self.buffer = self.world.recv_bytes(self.owner[client], _PAYLOAD_TAG, into=self.buffer)
            yield client, self.buffer

    def end_of_round(self) -> None:
        self.sender.flush()


class Exchanges:
    """The exchange objects of a run, one per mode (each keeps its reused buffers)."""

    def __init__(self, world: World, owner: dict[int, int] | None) -> None:
        """``owner=None``: clients are dealt at run time (see ``StreamExchange``)."""
        self.by_mode: dict[int, Exchange] = {IN_PROCESS: InProcessExchange()}
        if world.size > 1:
            self.by_mode[GATHER] = GatherExchange(world)
            self.by_mode[STREAM] = StreamExchange(world, owner)

    def __getitem__(self, mode: int) -> Exchange:
        return self.by_mode[mode]
