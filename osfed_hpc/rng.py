"""Random streams keyed by what they are for, never by MPI rank.

Every random draw in a run (which clients a round selects, the order a client sees its data,
a snapshot's initial pixels) comes from a stream keyed by (seed, purpose, round, client). The
same config therefore gives the same model on 1, 2 or 60 ranks, and a resumed run continues
exactly where the interrupted one would have gone.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(seed: int, purpose: str, *ids: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(purpose.encode()), *[int(i) for i in ids]])


def numpy_stream(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng(_key(seed, purpose, *ids))


def torch_stream(seed: int, purpose: str, *ids: int) -> torch.Generator:
    """A CPU ``torch.Generator``; draw on CPU and move, so CPU and CUDA runs see the same numbers."""
    generator = torch.Generator()
    generator.manual_seed(int(_key(seed, purpose, *ids).generate_state(1, dtype=np.uint64)[0] >> 1))
    return generator


def select_clients(seed: int, round: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of round ``round``, sorted: max(1, round(fraction * N)) drawn without replacement."""
    count = max(1, int(round_half_up(fraction * num_clients)))
    if count >= num_clients:
        return list(range(num_clients))
    chosen = numpy_stream(seed, "select", round).choice(num_clients, size=count, replace=False)
    return sorted(int(c) for c in chosen)


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))
