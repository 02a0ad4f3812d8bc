"""Small in-memory stand-ins shared by the algorithm tests."""
from __future__ import annotations

import torch


class TensorClientData:
    """A client's samples as tensors, with the batching contract of ``osfed_hpc.data.loader.ClientData``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def batches(self, generator, batch_size, epochs=1, steps=None, drop_last=False):
        produced = 0
        while True:
            order = torch.randperm(len(self.y), generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                if drop_last and len(index) < batch_size:
                    continue
                yield self.x[index], self.y[index]
                produced += 1
                if steps is not None and produced >= steps:
                    return
            epochs -= 1
            if steps is None and epochs <= 0:
                return

    def full_batch(self):
        return self.x, self.y
