"""What every method owes the runner, checked for all of them: a real payload is accepted, and any
damaged one is refused with ``ValueError`` (a rejected client), never another exception (a crash
of rank 0 and the whole job)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms import ClientContext, Environment, ReceivedMessage, get_algorithm
from osfed_hpc.config import TrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData
from tests.test_methods_e2e import METHODS

FAST = {"outer_steps": 1, "lbfgs_max_iter": 3}
#: option sets the fold is fuzzed with: every method's defaults, plus OS-Fed's image codecs (a damaged
#: coded snapshot once crashed rank 0 with a TypeError) and the teacher choices of FedSD2C
VARIANTS = {
    **{name: {} for name in METHODS}, "osfed+png": {"codec": "png"}, "osfed+jpeg": {"codec": "jpeg"},
    "feddf": {"distill_samples": 50},
    "fedaf": {"ipc": 2, "iterations": 3},
    "fedsd2c": {"autoencoder": "pool", "ipc": 2, "mipc": 10, "num_crop": 2, "iterations": 3},
    "fedsd2c+model": {"autoencoder": "pool", "ipc": 2, "mipc": 10, "num_crop": 2, "iterations": 3,
                      "teacher": "client_model"},
    "oscar": {"tiny": True, "steps": 2, "images_per_class": 2, "caption_max_tokens": 5},
}
SNAPSHOT_METHODS = ("osfed", "sfc3", "e3sfc")


def _instance(variant: str, num_clients: int = 3):
    name = variant.split("+")[0]
    cls = get_algorithm(name)
    options = cls.Options(**VARIANTS[variant], **(FAST if name in SNAPSHOT_METHODS else {}))
    net = cls.adapt_model(build_model("mlp", 1, 8, 10, seed=0), options, 10, 0)
    env = Environment(model=FlatModel(net), train=TrainConfig(local_steps=2, momentum=0.0), num_classes=10,
                      input_shape=(1, 8, 8), device=torch.device("cpu"), seed=0, num_clients=num_clients)
    return cls(options, env)


def _real_payload(name: str) -> tuple[object, bytes]:
    server, worker = _instance(name), _instance(name)
    message = server.server_message(1)
    parts = {key: Payload.unpack(p.pack()) for key, p in message.per_client.items()}
    received = ReceivedMessage(round=1, model=message.model,
                               common=None if message.common is None else Payload.unpack(message.common.pack()),
                               per_client=parts,
                               diagnostics=None if message.diagnostics is None
                               else Payload.unpack(message.diagnostics.pack()))
    if message.model:
        worker.env.model.load_(server.env.model.vector)
    worker.client_begin_round(received)
    gen = torch.Generator().manual_seed(0)
    data = TensorClientData(torch.randn(40, 1, 8, 8, generator=gen), torch.randint(0, 10, (40,), generator=gen))
    ctx = ClientContext(client_id=1, round=1, data=data, state={}, generator=torch.Generator().manual_seed(1),
                        seed=0, message=received)
    return server, worker.client_update(ctx).payload.pack()


def _damaged(payload: Payload, rng: np.random.Generator):
    """Variants of a real payload: each array dropped, retyped, cut, filled with NaN/huge/random."""
    for name, array in payload.arrays.items():
        others = {k: v for k, v in payload.arrays.items() if k != name}
        yield f"{name} missing", Payload(payload.meta, others)
        for dtype in ("float64", "int64", "uint8", "float16"):
            if array.dtype.name != dtype:
                yield f"{name} as {dtype}", Payload(payload.meta, {**others, name: array.astype(dtype)})
        if array.size > 1:
            yield f"{name} cut", Payload(payload.meta, {**others, name: array.reshape(-1)[: array.size // 2]})
        yield f"{name} empty", Payload(payload.meta, {**others, name: array.reshape(-1)[:0]})
        if array.dtype.kind == "f":
            for fill in (np.nan, np.inf, 3e38):
                yield f"{name} = {fill}", Payload(payload.meta, {**others, name: np.full_like(array, fill)})
        raw = rng.integers(0, 256, array.nbytes, dtype=np.uint8).view(array.dtype).reshape(array.shape)
        yield f"{name} random bytes", Payload(payload.meta, {**others, name: raw})
    yield "extra array", Payload(payload.meta, {**payload.arrays, "extra": np.zeros(3, np.float32)})
    yield "meta algorithm", Payload({**payload.meta, "algorithm": "other"}, payload.arrays)


@pytest.mark.parametrize("name", VARIANTS)
def test_real_payload_is_accepted_and_damaged_ones_are_value_errors(name):
    server, packed = _real_payload(name)
    server.server_begin(1)
    server.server_accumulate(1, Payload.unpack(packed), 40.0)
    assert torch.isfinite(server.server_finish()).all()
    rng = np.random.default_rng(0)
    for label, damaged in _damaged(Payload.unpack(packed), rng):
        server.server_begin(1)
        try:
            server.server_accumulate(1, Payload.unpack(damaged.pack()), 40.0)
        except ValueError:
            continue
        except Exception as exc:  # anything else would take rank 0 down
            pytest.fail(f"{name}, {label}: {type(exc).__name__}: {exc}")
        # accepted (e.g. random bytes that happen to be valid): the fold must stay usable
        server.server_finish()
