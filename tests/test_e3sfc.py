"""E-3SFC: the server compresses its own update into a snapshot that replaces the model downlink.

The central property: a worker that follows only the server snapshots stays bitwise on the
server's model (on CPU), round after round, with the runner's order of hooks.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms import get_algorithm
from osfed_hpc.algorithms.base import ClientContext, Environment, ReceivedMessage, ServerMessage
from osfed_hpc.algorithms.e3sfc import E3SFC, RESIDUAL_KEY, SERVER
from osfed_hpc.algorithms.server_optimizer import ServerOptimizer
from osfed_hpc.config import TrainConfig as PackageTrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

SIZE, CLASSES = 28, 10
FAST = dict(outer_steps=2, lbfgs_max_iter=10)
CLIENTS = (0, 1, 2)


def make_env(seed: int = 0, server_lr: float = 1.0) -> Environment:
    train = dataclasses.replace(PackageTrainConfig(), lr=0.05, momentum=0.0, batch_size=16)
    net = build_model("cnn", 1, SIZE, CLASSES, seed=seed)
    return Environment(model=FlatModel(net), train=train, num_classes=CLASSES, input_shape=(1, SIZE, SIZE),
                       device=torch.device("cpu"), seed=seed, server_optimizer=ServerOptimizer(lr=server_lr))


def make_data(seed: int, n: int = 32) -> TensorClientData:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return TensorClientData(patterns[y] + 0.5 * torch.randn(n, 1, SIZE, SIZE, generator=gen), y)


DATA = {k: make_data(10 + k, n=32 + 8 * k) for k in CLIENTS}


def transmit(message: ServerMessage, round: int) -> ReceivedMessage:
    """What a worker receives: every part through the wire format."""
    wire = lambda p: None if p is None else Payload.unpack(p.pack())  # noqa: E731
    return ReceivedMessage(round=round, model=message.model, common=wire(message.common),
                           diagnostics=wire(message.diagnostics),
                           per_client={k: wire(p) for k, p in message.per_client.items()})


class Federation:
    """A server and one worker (separate models from the same seed), driven in the runner's order."""

    def __init__(self, server_lr: float = 1.0, **options) -> None:
        self.options = E3SFC.Options(**{**FAST, **options})
        self.server_env, self.worker_env = make_env(server_lr=server_lr), make_env()
        self.server = E3SFC(self.options, self.server_env)
        self.worker = E3SFC(self.options, self.worker_env)
        self.states = {k: {} for k in CLIENTS}
        self.messages: dict[int, ServerMessage] = {}
        self.payloads: dict[int, dict[int, bytes]] = {}
        self.stats: dict[int, dict[int, dict[str, float]]] = {}

    def begin(self, round: int) -> ReceivedMessage:
        message = self.messages[round] = self.server.server_message(round)
        received = transmit(message, round)
        if message.model:
            self.worker_env.model.load_(self.server_env.model.vector)
        self.worker.client_begin_round(received)
        return received

    def work(self, round: int, received: ReceivedMessage) -> None:
        replica = self.worker_env.model.vector.clone()
        self.payloads[round], self.stats[round] = {}, {}
        for k in CLIENTS:
            self.worker_env.model.load_(replica)
            ctx = ClientContext(client_id=k, round=round, data=DATA[k], state=self.states[k],
                                generator=torch.Generator().manual_seed(1000 * round + k), seed=0, message=received)
            result = self.worker.client_update(ctx)
            self.payloads[round][k] = result.payload.pack()
            self.stats[round][k] = result.stats
        self.worker_env.model.load_(replica)

    def fold(self, round: int) -> torch.Tensor:
        self.server.server_begin(round)
        for k, packed in self.payloads[round].items():
            self.server.server_accumulate(k, Payload.unpack(packed), float(DATA[k].num_samples))
        new = self.server.server_finish()
        self.server_env.model.load_(new)
        return new

    def round(self, round: int) -> None:
        self.work(round, self.begin(round))
        self.fold(round)


@pytest.fixture(scope="module")
def fed1() -> Federation:
    """A federation after round 1 (drift measured every round), shared by the tests that must
    leave it as they found it: a refused message changes no state."""
    fed = Federation(drift_every=1)
    fed.round(1)
    return fed


# (a) the worker follows the server bitwise ---------------------------------------------------------


def test_worker_replica_follows_the_server_bitwise():
    fed = Federation(drift_every=1)
    start = fed.server_env.model.vector.clone()
    for r in (1, 2, 3):
        fed.begin(r)
        assert torch.equal(fed.worker_env.model.vector, fed.server_env.model.vector), f"round {r}"
        fed.work(r, transmit(fed.messages[r], r))
        for k in CLIENTS:
            assert fed.stats[r][k]["drift"] == 0.0
        before = fed.server_env.model.vector.clone()
        fed.fold(r)
        assert not torch.equal(fed.server_env.model.vector, before), f"round {r}: the server's model did not move"
    assert [fed.messages[r].model for r in (1, 2, 3)] == [True, False, False]
    fed.begin(4)  # the round-3 snapshot
    assert torch.equal(fed.worker_env.model.vector, fed.server_env.model.vector)
    assert not torch.equal(fed.server_env.model.vector, start)
    assert fed.worker_env.model.vector.data_ptr() == fed.worker_env.model.params[0].data_ptr()  # updated in place


def test_stat_names_and_drift_only_in_drift_rounds():
    assert E3SFC.client_stat_names[:2] == ("train_loss", "local_steps")
    assert E3SFC.client_stat_names[-1] == "drift"
    fed = Federation(drift_every=2)
    for r in (1, 2, 3):
        fed.round(r)
    assert all(math.isnan(fed.stats[r][k]["drift"]) for r in (1, 3) for k in CLIENTS)
    assert all(fed.stats[2][k]["drift"] == 0.0 for k in CLIENTS)
    assert fed.messages[1].diagnostics is None and fed.messages[2].diagnostics is not None
    assert set(fed.stats[2][0]) == set(E3SFC.client_stat_names)


def test_drift_measures_the_distance_to_the_servers_weights():
    fed = Federation(drift_every=1)
    fed.round(1)
    received = transmit(fed.server.server_message(2), 2)
    fed.worker_env.model.vector[3] += 0.25  # a replica that went astray
    fed.worker.client_begin_round(received)
    assert fed.worker._drift[0] == 2 and fed.worker._drift[1] == pytest.approx(0.25, abs=1e-3)


# (b) server error feedback -------------------------------------------------------------------------


def test_server_residual_is_target_minus_the_sent_step():
    fed = Federation(server_lr=0.5)
    for r in (1, 2):
        previous = fed.server.server_state().get(RESIDUAL_KEY)
        fed.work(r, fed.begin(r))
        w_t = fed.server_env.model.vector.clone()
        fed.server.server_begin(r)
        mean = torch.zeros(fed.server_env.model.param_numel)
        for k, packed in fed.payloads[r].items():
            scale, g = fed.server.decode(k, Payload.unpack(packed))
            mean += fed.server._scaled(scale, g)
        tau_g = 0.5 * mean / len(CLIENTS)
        if previous is not None:
            tau_g += torch.from_numpy(previous)
        new = fed.fold(r)
        fed.server_env.model.load_(w_t)  # decode the server snapshot at W_t
        s_g, g_g = fed.server.decode_server_snapshot(fed.server.pending, r)
        sent = fed.server._scaled(s_g, g_g)
        fed.server_env.model.load_(new)
        residual = torch.from_numpy(fed.server.server_state()[RESIDUAL_KEY])
        torch.testing.assert_close(residual, tau_g - sent, rtol=1e-5, atol=1e-6)
        assert torch.equal(new[: len(sent)], w_t[: len(sent)] + sent)  # W_{t+1} = W_t + s_g g_g, nothing else
        assert fed.server.server_stats["server_cos"] > 0.0


def test_server_error_feedback_off_keeps_no_residual():
    fed = Federation(server_error_feedback=False)
    fed.round(1)
    assert RESIDUAL_KEY not in fed.server.server_state()
    assert fed.server.pending is not None


# (c) downlink and (d) resync ----------------------------------------------------------------------


def test_downlink_is_the_server_snapshot_except_in_resync_rounds():
    fed = Federation(resync_every=3, drift_every=2)
    model_bytes = 4 * fed.server_env.model.numel
    for r in (1, 2, 3, 4):
        fed.round(r)
    for r, resync in ((1, True), (2, False), (3, True), (4, False)):
        message = fed.messages[r]
        assert message.model is resync and message.per_client == {}
        for k in CLIENTS:
            expected = model_bytes if resync else message.common.packed_size()
            assert message.downlink_bytes(k, model_bytes) == expected
    snapshot_bytes = fed.messages[2].common.packed_size()
    uplink = len(fed.payloads[2][0])
    assert abs(snapshot_bytes - uplink) < 64  # the same arrays; only the header's "client" differs
    assert snapshot_bytes < model_bytes / 10
    assert fed.messages[2].diagnostics is not None  # drift diagnostics are never counted


def test_resync_round_sends_the_model_and_the_worker_continues_after_it():
    fed = Federation(resync_every=2)
    for r in (1, 2, 3):
        fed.round(r)
        assert fed.messages[r].common is None if fed.messages[r].model else fed.messages[r].common is not None
    fed.begin(4)
    assert torch.equal(fed.worker_env.model.vector, fed.server_env.model.vector)


def test_failed_server_synthesis_keeps_the_model_and_resyncs(monkeypatch):
    fed = Federation()
    fed.work(1, fed.begin(1))
    w_t = fed.server_env.model.vector.clone()
    monkeypatch.setattr("osfed_hpc.algorithms.osfed.least_squares_scale", lambda g, t: None)
    new = fed.fold(1)
    assert torch.equal(new, w_t) and fed.server.pending is None
    assert fed.server.server_message(2).model is True
    assert RESIDUAL_KEY in fed.server.server_state()  # tau_g is kept for the next round


# (e) damaged server snapshots ----------------------------------------------------------------------


def _set(name, value):
    return lambda p: p.arrays.update({name: value})


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.meta.update(round=2),
        lambda p: p.meta.update(client=0),
        lambda p: p.meta.update(factor=2),
        lambda p: p.meta.update(algorithm="sfc3"),
        lambda p: p.meta.update(rejected="no"),
        _set("snapshot", np.zeros((1, 1, SIZE, SIZE - 1), dtype=np.float32)),
        _set("labels", np.zeros((2, CLASSES), dtype=np.float32)),
        _set("scale", np.array([np.nan], dtype=np.float32)),
        _set("scale", np.array([1.0], dtype=np.float64)),
        _set("snapshot", np.full((1, 1, SIZE, SIZE), np.inf, dtype=np.float32)),
        lambda p: p.arrays.pop("labels"),
    ],
    ids=["round", "client", "factor", "algorithm", "extra-meta", "snapshot-shape", "labels-shape", "nan-scale",
         "scale-dtype", "inf-snapshot", "missing-labels"],
)
def test_worker_refuses_a_damaged_server_snapshot(change, fed1):
    fed = fed1
    message = fed.server.server_message(2)
    message.common = Payload(meta=dict(message.common.meta), arrays=dict(message.common.arrays))
    change(message.common)
    replica = fed.worker_env.model.vector.clone()
    with pytest.raises(ValueError, match="server snapshot of round 1"):
        fed.worker.client_begin_round(transmit(message, 2))
    assert torch.equal(fed.worker_env.model.vector, replica)


def test_worker_refuses_a_snapshot_that_skips_a_round(fed1):
    received = transmit(fed1.server.server_message(2), 2)
    received.round = 3  # the round-1 snapshot arriving as round 3's message (round 2 was missed)
    received.diagnostics = None
    with pytest.raises(ValueError, match="replica holds the start of round 1"):
        fed1.worker.client_begin_round(received)


def test_worker_refuses_a_message_without_model_or_snapshot(fed1):
    with pytest.raises(ValueError, match="neither the model nor a server snapshot"):
        fed1.worker.client_begin_round(ReceivedMessage(round=2, model=False))


def test_worker_refuses_drift_diagnostics_of_the_wrong_size(fed1):
    fed = fed1
    message = fed.server.server_message(2)
    message.diagnostics.arrays["model"] = message.diagnostics.arrays["model"][:-1]
    with pytest.raises(ValueError, match="drift diagnostics"):
        fed.worker.client_begin_round(transmit(message, 2))


# (f) checkpointing ---------------------------------------------------------------------------------


def test_server_state_round_trip_resumes_bit_exactly():
    fed = Federation()
    fed.round(1)
    fed.round(2)
    state = fed.server.server_state()
    assert set(state) >= {RESIDUAL_KEY, "e3sfc.pending.round"}
    # a resumed server: the checkpointed vector and state, a fresh instance
    env = make_env()
    env.model.load_(fed.server_env.model.vector)
    resumed = E3SFC(fed.options, env)
    resumed.load_server_state({k: np.array(v) for k, v in state.items()})
    assert resumed.server_message(3).common.pack() == fed.server.server_message(3).common.pack()
    # a resumed worker: its replica is the checkpointed vector, which already holds the pending step
    worker_env = make_env()
    worker_env.model.load_(fed.server_env.model.vector)
    E3SFC(fed.options, worker_env).client_begin_round(transmit(resumed.server_message(3), 3))
    assert torch.equal(worker_env.model.vector, fed.server_env.model.vector)
    # both servers fold the same round-3 payloads into the same state
    fed.round(3)
    resumed.server_begin(3)
    for k, packed in fed.payloads[3].items():
        resumed.server_accumulate(k, Payload.unpack(packed), float(DATA[k].num_samples))
    assert torch.equal(resumed.server_finish(), fed.server_env.model.vector)
    after, expected = resumed.server_state(), fed.server.server_state()
    assert set(after) == set(expected) and all(np.array_equal(after[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update(other=np.zeros(1)), "unexpected server state"),
        (lambda s: s.update({RESIDUAL_KEY: np.zeros(3, np.float32)}), "expected float32"),
        (lambda s: s.pop("e3sfc.pending.round"), "without its round"),
        (lambda s: s.update({"e3sfc.pending.round": np.array([1], np.int32)}), "int64"),
        (lambda s: s.update({"e3sfc.pending.array.scale": np.array([np.inf], np.float32)}), "NaN or Inf"),
    ],
    ids=["unknown-key", "residual-shape", "no-round", "round-dtype", "bad-scale"],
)
def test_load_server_state_refuses_damaged_state(change, match, fed1):
    fed = fed1
    state = fed.server.server_state()
    change(state)
    with pytest.raises(ValueError, match=match):
        E3SFC(fed.options, make_env()).load_server_state(state)


def test_empty_server_state_resyncs():
    server = E3SFC(E3SFC.Options(**FAST), make_env())
    server.load_server_state({})
    assert server.server_message(5).model is True


# options -----------------------------------------------------------------------------------------


def test_registry_and_defaults():
    assert get_algorithm("e3sfc") is E3SFC
    options = E3SFC.Options()
    options.validate()
    assert (options.factor, options.resync_every, options.drift_every) == (1, 0, 10)
    E3SFC.Options(factor=2).validate()  # a multi-grid variant is allowed
    assert SERVER < 0


@pytest.mark.parametrize(
    "key, value",
    [("resync_every", -1), ("resync_every", 1.5), ("drift_every", -2), ("drift_every", True),
     ("server_error_feedback", "yes"), ("factor", 0)],
)
def test_validate_names_the_bad_key(key, value):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        E3SFC.Options(**{key: value}).validate()


def test_multigrid_variant_follows_bitwise():
    fed = Federation(factor=2, scales="tensor", drift_every=1)
    for r in (1, 2):
        fed.round(r)
    fed.begin(3)
    assert torch.equal(fed.worker_env.model.vector, fed.server_env.model.vector)
    assert all(fed.stats[2][k]["drift"] == 0.0 for k in CLIENTS)
