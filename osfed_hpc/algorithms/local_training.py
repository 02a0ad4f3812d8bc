"""Local SGD on one client: the work every method starts from (FedAvg sends its result, the
compressors compress it, OS-Fed and 3SFC turn it into a snapshot).

Kept free of per-step host synchronisation: the loss is accumulated on the device and read
once at the end, so a GPU never waits for the Python loop. ``TrainHooks`` let a method change the
step without copying the loop: a regulariser added to the loss (FedMPQ's group lasso), a forward
of its own (quantization-aware training), something after each step (a projection).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..flat import FlatModel

PARTICIPATIONS = "participations"


@dataclass
class TrainHooks:
    #: extra loss term, e.g. a regulariser: f(net) -> scalar tensor
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None
    #: replaces ``net(x)``, e.g. a forward with fake-quantized weights
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    #: runs after every optimizer step, e.g. a projection or clipping of the weights
    after_step: Callable[[nn.Module], None] | None = None


@dataclass
class LocalResult:
    """A client's local training: its update of the trainable state and what to log."""

    update: torch.Tensor  # W_local - W_t over the whole trainable vector (params then buffers)
    start: torch.Tensor  # W_t, for methods that go back to it (snapshot synthesis)
    loss: float
    steps: int

    @property
    def stats(self) -> dict[str, float]:
        return {"train_loss": self.loss, "local_steps": float(self.steps)}


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


def with_local_steps(train: Any, steps: int | None) -> Any:
    """``train`` with ``local_steps`` replaced when ``steps`` is set (a trajectory segment)."""
    return train if steps is None else dataclasses.replace(train, local_steps=steps)


def local_sgd(
    model: FlatModel,
    data,
    train,
    generator: torch.Generator,
    lr: float,
    autocast_dtype: torch.dtype | None = None,
    hooks: TrainHooks | None = None,
) -> tuple[float, int]:
    """Train ``model`` in place on ``data``; return (mean batch loss, number of steps).

    ``train.local_steps`` (if set) overrides ``train.local_epochs``. A new optimizer per call:
    momentum does not carry across rounds, as in FedAvg.
    """
    hooks = hooks or TrainHooks()
    net = model.model
    net.train()
    params = model.params
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay, foreach=True
    )
    device = model.vector.device
    total = torch.zeros((), device=device)
    steps = 0
    for x, y in data.batches(
        generator, train.batch_size, epochs=train.local_epochs, steps=train.local_steps
    ):
        x = model.to_input_format(x)
        with autocast(device, autocast_dtype):
            logits = hooks.forward(net, x) if hooks.forward else net(x)
            loss = F.cross_entropy(logits, y)
            if hooks.regularizer is not None:
                loss = loss + hooks.regularizer(net)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip, foreach=True)
        optimizer.step()
        if hooks.after_step is not None:
            hooks.after_step(net)
        total += loss.detach().float()
        steps += 1
    optimizer.zero_grad(set_to_none=True)
    return (float(total) / steps if steps else float("nan")), steps


def local_update(env, ctx, train: Any = None, hooks: TrainHooks | None = None) -> LocalResult:
    """Run a client's local SGD from W_t (``env.model``) and return its update.

    The model is left at the trained weights; ``LocalResult.start`` holds W_t for methods that
    return to it. The client's participation count (for ``train.lr_decay``) is advanced.
    """
    model = env.model
    start = model.vector.clone()
    loss, steps = local_sgd(model, ctx.data, train or env.train, ctx.generator, client_lr(env.train, ctx.state),
                            env.autocast_dtype, hooks)
    count_participation(ctx.state)
    return LocalResult(update=model.vector - start, start=start, loss=loss, steps=steps)
