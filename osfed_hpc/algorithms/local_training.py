"""Local SGD on one client: the work every method starts from (FedAvg sends its result,
OS-Fed and 3SFC compress it into a snapshot).

Kept free of per-step host synchronisation: the loss is accumulated on the device and read
once at the end, so a GPU never waits for the Python loop.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..flat import FlatModel

PARTICIPATIONS = "participations"


def client_lr(train, state: dict[str, np.ndarray]) -> float:
    """Learning rate for this participation: ``lr * lr_decay ** (times this client trained before)``.

    3SFC decays per participation, not per round; with ``lr_decay = 1`` (default) it is constant.
    """
    done = int(state[PARTICIPATIONS][0]) if PARTICIPATIONS in state else 0
    return float(train.lr * train.lr_decay**done)


def count_participation(state: dict[str, np.ndarray]) -> None:
    done = int(state[PARTICIPATIONS][0]) if PARTICIPATIONS in state else 0
    state[PARTICIPATIONS] = np.array([done + 1], dtype=np.int64)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast when configured, a no-op context otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def local_sgd(
    model: FlatModel,
    data,
    train,
    generator: torch.Generator,
    lr: float,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Train ``model`` in place on ``data``; return (mean batch loss, number of steps).

    ``train.local_steps`` (if set) overrides ``train.local_epochs``. A new optimizer per call:
    momentum does not carry across rounds, as in FedAvg.
    """
    net = model.model
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay, foreach=True
    )
    device = model.vector.device
    total = torch.zeros((), device=device)
    steps = 0
    for x, y in data.batches(
        generator, train.batch_size, epochs=train.local_epochs, steps=train.local_steps
    ):
        with autocast(device, autocast_dtype):
            loss = F.cross_entropy(net(model.to_input_format(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip, foreach=True)
        optimizer.step()
        total += loss.detach().float()
        steps += 1
    optimizer.zero_grad(set_to_none=True)
    return (float(total) / steps if steps else float("nan")), steps
