"""OS-Fed's learnable multi-grid (FSRCNN upsampler) in its three ownership modes: fixed, client, server.

Checks: the network (size, output shape, cell order), the shared-seed init, the server's training on
the public image, bitwise decode identity in every mode, the bytes each mode adds (uplink in client
mode, downlink in server mode, nothing in fixed mode), that the synthesis gradient reaches the FSRCNN
in client mode, the client-state and server-state handling, and option validation.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import osfed_hpc.algorithms.osfed as osfed_module
from osfed_hpc.algorithms.base import ReceivedMessage
from osfed_hpc.algorithms.e3sfc import E3SFC
from osfed_hpc.algorithms.osfed import FSRCNN_ARRAY, FSRCNN_SERVER_KEY, FSRCNN_STATE_KEY, OSFed
from osfed_hpc.algorithms.sfc3 import SFC3
from osfed_hpc.multigrid_fsrcnn import (
    FSRCNN,
    FSRCNNGrid,
    FSRCNNShape,
    grid_from_vector,
    public_image,
    shared_init,
    train_server_fsrcnn,
)
from osfed_hpc.payload import Payload
from osfed_hpc.snapshot import exact_numerics, multigrid_uniform, parameter_gradients
from tests.test_osfed import CLASSES, FAST, SIZE, make_ctx, make_data, make_env, true_update

#: a small FSRCNN for the tests that do not need the paper's size (d=56, s=12, m=4)
SMALL = dict(fsrcnn_d=8, fsrcnn_s=4, fsrcnn_m=1, fsrcnn_server_steps=3, fsrcnn_server_batch=4)
MODES = ("fixed", "client", "server")


def small_params(channels: int = 1) -> int:
    return FSRCNNShape(channels, 2, 8, 4, 1).num_parameters


def options(mode: str, **changes) -> OSFed.Options:
    return OSFed.Options(**{**FAST, **SMALL, "upsampler": "fsrcnn", "fsrcnn_mode": mode, **changes})


def received(message, round: int = 1) -> ReceivedMessage:
    """What a worker gets: the message's method data through the wire format."""
    common = None if message.common is None else Payload.unpack(message.common.pack())
    return ReceivedMessage(round=round, model=message.model, common=common)


def pair(mode: str, **changes) -> tuple[OSFed, OSFed]:
    """(client, server) instances on separate replicas of the same model; in server mode the
    worker has received round 1's message."""
    opts = options(mode, **changes)
    client, server = OSFed(opts, make_env()), OSFed(opts, make_env())
    client.client_begin_round(received(server.server_message(1)))
    return client, server


# the network ---------------------------------------------------------------------------------


def test_parameter_counts_match_the_reference():
    """methods.md 1.4.4: 12,809 parameters for one channel (51,236 B), 24,683 for three (98,732 B)."""
    for channels, count in ((1, 12_809), (3, 24_683)):
        shape = FSRCNNShape(channels, 4)
        assert shape.num_parameters == count == sum(p.numel() for p in FSRCNN(shape).parameters())
        assert shared_init(shape, 0).vector().shape == (count,)
    assert 4 * FSRCNNShape(1, 4).num_parameters == 51_236


@pytest.mark.parametrize("factor", [2, 4, 7])
def test_output_is_factor_times_the_cell(factor):
    net = shared_init(FSRCNNShape(1, factor, 8, 4, 1), 0)
    cell = SIZE // factor
    assert net(torch.randn(3, 1, cell, cell)).shape == (3, 1, SIZE, SIZE)
    grid = FSRCNNGrid(net)
    out = grid(torch.randn(2, 1, SIZE, SIZE))
    assert out.shape == (2 * factor * factor, 1, SIZE, SIZE) == multigrid_uniform(torch.zeros(2, 1, SIZE, SIZE), factor).shape


def test_grid_cells_follow_the_uniform_order():
    """Sample m*f*f + i*f + j is the FSRCNN of cell (i, j) of snapshot m, as in the bilinear grid."""
    factor, cell = 4, SIZE // 4
    net = shared_init(FSRCNNShape(1, factor, 8, 4, 1), 1)
    snapshots = torch.randn(2, 1, SIZE, SIZE)
    out = FSRCNNGrid(net)(snapshots)
    for m in range(2):
        for i in range(factor):
            for j in range(factor):
                piece = snapshots[m : m + 1, :, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
                torch.testing.assert_close(out[m * factor * factor + i * factor + j], net(piece)[0], rtol=1e-5, atol=1e-6)


def test_shared_init_is_deterministic_and_keyed_by_seed():
    shape = FSRCNNShape(1, 4, 8, 4, 1)
    a, b, c = shared_init(shape, 3).vector(), shared_init(shape, 3).vector(), shared_init(shape, 4).vector()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # "unit" rescales the reference deconvolution by a power of two so the output has std ~1
    reference, unit = shared_init(shape, 3, "reference"), shared_init(shape, 3, "unit")
    ratio = (unit.last_part.weight / reference.last_part.weight).detach().unique()
    assert ratio.numel() == 1 and float(torch.log2(ratio)).is_integer()
    probe = torch.randn(64, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert 0.3 < float(unit(probe).std()) < 3 and float(reference(probe).std()) < 0.05
    with pytest.raises(ValueError, match="fsrcnn_init"):
        shared_init(shape, 0, "xavier")


def test_load_vector_round_trips_and_checks_size():
    net = shared_init(FSRCNNShape(1, 2, 8, 4, 1), 0)
    values = net.vector()
    other = FSRCNN(FSRCNNShape(1, 2, 8, 4, 1)).load_vector(values)
    assert np.array_equal(other.vector(), values)
    with pytest.raises(ValueError, match="FSRCNN weights"):
        other.load_vector(values[:-1])
    with pytest.raises(ValueError, match="FSRCNN weights"):
        other.load_vector(np.full_like(values, np.nan))


def test_public_image_channels():
    grey, rgb = public_image(1), public_image(3)
    assert grey.shape == (1, 427, 640) and rgb.shape == (3, 427, 640) and grey.dtype == np.float32
    assert 0 <= grey.min() and grey.max() <= 1 and 0 <= rgb.min() and rgb.max() <= 1
    with pytest.raises(ValueError, match="1 or 3"):
        public_image(2)


def test_server_training_is_deterministic_and_learns():
    shape = FSRCNNShape(1, 4, 8, 4, 1)
    stats = ((0.1307,), (0.3081,))
    a, info = train_server_fsrcnn(shape, (SIZE, SIZE), stats, seed=0, steps=20, batch=4, lr=3e-3)
    b, _ = train_server_fsrcnn(shape, (SIZE, SIZE), stats, seed=0, steps=20, batch=4, lr=3e-3)
    assert np.array_equal(a.vector(), b.vector())
    assert not np.array_equal(a.vector(), shared_init(shape, 0).vector())
    assert info["loss"] < info["loss_start"]
    assert not any(p.requires_grad for p in a.parameters())


# decode identity and bytes -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_server_decodes_the_clients_direction_bitwise(mode):
    """The paper's FSRCNN size, factor 4: the server's g* equals the client's bit for bit."""
    client, server = pair(mode, factor=4, fsrcnn_d=56, fsrcnn_s=12, fsrcnn_m=4)
    data = make_data(1)
    encoding = client.compress(true_update(client.env, data), make_ctx(data))
    server.server_begin(0)
    scale, direction = server.decode(1, Payload.unpack(encoding.payload.pack()))
    assert torch.equal(direction, encoding.direction) and scale == encoding.scale
    assert encoding.stats["cos"] > encoding.stats["cos_init"]
    assert encoding.payload.meta["upsampler"] == f"fsrcnn-{mode}-d56-s12-m4"
    assert encoding.payload.arrays["labels"].shape == (16, CLASSES)


@pytest.mark.parametrize("mode", MODES)
def test_full_round_applies_the_decoded_update(mode):
    client, server = pair(mode)
    data = make_data(2)
    w_t = server.env.model.vector.clone()
    result = client.client_update(make_ctx(data))
    server.server_begin(0)
    scale, direction = server.decode(1, Payload.unpack(result.payload.pack()))
    server.server_accumulate(1, Payload.unpack(result.payload.pack()), 1.0)
    step = (server.server_finish() - w_t)[: server.env.model.param_numel]
    torch.testing.assert_close(step, server._scaled(scale, direction))
    assert float(step.norm()) > 0


def test_uplink_bytes_per_mode():
    """Client mode adds exactly 4 B per FSRCNN parameter of array data (plus its header entry and
    alignment); fixed and server mode send exactly what bilinear sends (the header names the upsampler)."""
    data = make_data(1)
    sizes, arrays = {}, {}
    for name, opts in (("bilinear", OSFed.Options(**FAST)), *((m, options(m)) for m in MODES)):
        client, server = OSFed(opts, make_env()), OSFed(opts, make_env())
        client.client_begin_round(received(server.server_message(1)))
        payload = client.compress(true_update(client.env, data), make_ctx(data)).payload
        sizes[name] = payload.packed_size()
        arrays[name] = sum(a.nbytes for a in payload.arrays.values())
    snapshot_labels_scale = SIZE * SIZE * 4 + 4 * CLASSES * 4 + 4
    assert arrays["bilinear"] == arrays["fixed"] == arrays["server"] == snapshot_labels_scale
    assert arrays["client"] == snapshot_labels_scale + 4 * small_params()
    header = len(',"upsampler":"fsrcnn-fixed-d8-s4-m1"')  # the same length for "client"/"server" +- 1
    assert abs(sizes["fixed"] - sizes["bilinear"] - header) <= 8 and abs(sizes["server"] - sizes["fixed"]) <= 8
    # the FSRCNN vector's own cost: its 4 B per parameter plus one header entry and alignment (< 64 B)
    assert 0 <= sizes["client"] - sizes["fixed"] - 4 * small_params() < 64
    assert OSFed(options("client"), make_env()).payload_size_hint() >= sizes["client"]


def test_server_mode_sends_in_the_first_round_of_each_server_process_and_counts_once_per_client():
    env = make_env()
    server = OSFed(options("server"), env)
    model_bytes = 4 * env.model.numel
    first = server.server_message(1)
    weights = first.common.arrays[FSRCNN_ARRAY]
    assert weights.dtype == np.float32 and weights.shape == (small_params(),)
    extra = first.common.packed_size()
    assert 4 * small_params() <= extra < 4 * small_params() + 256
    # kept data: not in the message's per-round count; the runner charges kept_downlink_bytes once
    # per client, the first round it is selected
    assert first.common_kept and server.kept_downlink_bytes() == extra
    for client in (0, 3):
        assert first.downlink_bytes(client, model_bytes) == model_bytes
    second = server.server_message(2)
    assert second.common is None and second.downlink_bytes(0, model_bytes) == model_bytes
    assert OSFed(options("fixed"), make_env()).kept_downlink_bytes() == 0
    # a resumed server process sends them again, the same weights (restored, not retrained)
    resumed = OSFed(options("server"), make_env())
    resumed.load_server_state(server.server_state())

    def fail(*args, **kwargs):
        raise AssertionError("a resumed server must not retrain its FSRCNN")

    original = osfed_module.train_server_fsrcnn
    osfed_module.train_server_fsrcnn = fail
    try:
        again = resumed.server_message(7)
    finally:
        osfed_module.train_server_fsrcnn = original
    assert again.common_kept and np.array_equal(again.common.arrays[FSRCNN_ARRAY], weights)
    assert resumed.server_message(8).common is None
    # fixed and client modes send nothing down besides the model
    for mode in ("fixed", "client"):
        assert OSFed(options(mode), make_env()).server_message(1).common is None


def test_server_mode_worker_keeps_the_weights_across_rounds():
    client, server = pair("server")
    assert server.server_message(2).common is None
    client.client_begin_round(received(server.server_message(2), round=2))  # nothing new: keep the cache
    data = make_data(3)
    encoding = client.compress(true_update(client.env, data, round=2), make_ctx(data, round=2))
    server.server_begin(2)
    _, direction = server.decode(1, Payload.unpack(encoding.payload.pack()))
    assert torch.equal(direction, encoding.direction)
    # a worker that never got them says so instead of decoding with other weights
    fresh = OSFed(options("server"), make_env())
    fresh.client_begin_round(ReceivedMessage(round=2, model=True))
    with pytest.raises(ValueError, match="has not received the server's FSRCNN"):
        fresh.client_update(make_ctx(data, round=2))


def test_server_mode_worker_checks_the_message():
    server = OSFed(options("server"), make_env())
    message = received(server.server_message(1))
    worker = OSFed(options("server"), make_env())
    foreign = Payload(meta={**message.common.meta, "algorithm": "sfc3"}, arrays=dict(message.common.arrays))
    with pytest.raises(ValueError, match="round 2: server FSRCNN weights"):
        worker.client_begin_round(ReceivedMessage(round=2, model=True, common=foreign))
    bad = Payload(meta=dict(message.common.meta), arrays={FSRCNN_ARRAY: np.zeros(5, dtype=np.float32)})
    with pytest.raises(ValueError, match="fsrcnn"):
        worker.client_begin_round(ReceivedMessage(round=1, model=True, common=bad))
    other = OSFed(options("server", fsrcnn_d=9), make_env())
    with pytest.raises(ValueError, match="upsampler"):
        other.client_begin_round(message)


def test_server_state_checks():
    server = OSFed(options("server"), make_env())
    assert server.server_state() == {}  # nothing trained yet
    server.server_message(1)
    state = server.server_state()
    assert set(state) == {FSRCNN_SERVER_KEY} and state[FSRCNN_SERVER_KEY].nbytes == 4 * small_params()
    with pytest.raises(ValueError, match=FSRCNN_SERVER_KEY):
        OSFed(options("server"), make_env()).load_server_state({FSRCNN_SERVER_KEY: np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="not fsrcnn/server"):
        OSFed(options("client"), make_env()).load_server_state(state)
    with pytest.raises(ValueError, match="keeps no server state"):
        OSFed(options("server"), make_env()).load_server_state({**state, "other": np.zeros(1)})


# client mode -----------------------------------------------------------------------------------


def test_client_mode_gradient_reaches_snapshot_and_fsrcnn():
    env = make_env()
    algorithm = OSFed(options("client"), env)
    grid = grid_from_vector(algorithm.fsrcnn, algorithm.shared_fsrcnn_weights(), torch.device("cpu"), learnable=True)
    snapshots = torch.randn(1, 1, SIZE, SIZE, requires_grad=True)
    labels = torch.randn(4, CLASSES, requires_grad=True)
    target = torch.randn(env.model.param_numel)
    with exact_numerics(env.model.model):
        grads = torch.cat(env.model.flatten(parameter_gradients(env.model, snapshots, labels, grid, create_graph=True)))
        loss = 1 - torch.dot(grads, target) / (grads.norm() * target.norm())
        weights = list(grid.net.parameters())
        outer = torch.autograd.grad(loss, [snapshots, labels, *weights], allow_unused=True)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in outer[:2])
    assert sum(float(g.abs().sum()) for g in outer[2:] if g is not None) > 0
    assert float(outer[-1].abs().sum()) > 0  # the deconvolution's bias, the last layer


def test_client_mode_learns_and_keeps_its_weights_per_client():
    client, server = pair("client")
    data, state = make_data(4), {}
    initial = client.shared_fsrcnn_weights().copy()
    first = client.client_update(make_ctx(data, state=state))
    sent = first.payload.arrays[FSRCNN_ARRAY]
    assert not np.array_equal(sent, initial)  # the synthesis moved the FSRCNN
    assert np.array_equal(state[FSRCNN_STATE_KEY], sent) and state[FSRCNN_STATE_KEY] is not sent
    # the next round starts from them ...
    grid, learnable = client._synthesis_grid(make_ctx(data, round=1, state=state))
    assert np.array_equal(grid.net.vector(), sent) and len(learnable) == len(list(grid.net.parameters()))
    # ... unless reset, which starts from the shared init and keeps nothing
    reset = OSFed(options("client", fsrcnn_client_weights="reset"), make_env())
    grid, _ = reset._synthesis_grid(make_ctx(data, round=1, state=state))
    assert np.array_equal(grid.net.vector(), initial)
    fresh: dict = {}
    reset.client_update(make_ctx(data, state=fresh))
    assert FSRCNN_STATE_KEY not in fresh and "residual" in fresh
    # a state of the wrong size (options changed on resume) is an error, not a silent re-init
    with pytest.raises(ValueError, match=FSRCNN_STATE_KEY):
        client._synthesis_grid(make_ctx(data, state={FSRCNN_STATE_KEY: np.zeros(3, np.float32)}))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: p.arrays.pop(FSRCNN_ARRAY), "payload arrays"),
        (lambda p: p.arrays.update({FSRCNN_ARRAY: p.arrays[FSRCNN_ARRAY][:-1]}), "fsrcnn"),
        (lambda p: p.arrays.update({FSRCNN_ARRAY: np.full_like(p.arrays[FSRCNN_ARRAY], np.nan)}), "FSRCNN weights"),
        (lambda p: p.meta.update(upsampler="fsrcnn-fixed-d8-s4-m1"), "upsampler"),
    ],
    ids=["missing", "short", "nan", "other-mode"],
)
def test_server_rejects_bad_client_fsrcnn(change, match):
    client, server = pair("client")
    payload = Payload.unpack(client.client_update(make_ctx(make_data(5))).payload.pack())
    payload.arrays = dict(payload.arrays)
    change(payload)
    server.server_begin(0)
    with pytest.raises(ValueError, match=f"client 1, round 0.*{match}"):
        server.server_accumulate(1, Payload.unpack(payload.pack()), 1.0)


def test_adam_synthesis_also_learns_the_fsrcnn():
    client, server = pair("client", optimizer="adam", adam_steps=5)
    data = make_data(6)
    encoding = client.compress(true_update(client.env, data), make_ctx(data))
    assert not np.array_equal(encoding.payload.arrays[FSRCNN_ARRAY], client.shared_fsrcnn_weights())
    server.server_begin(0)
    _, direction = server.decode(1, Payload.unpack(encoding.payload.pack()))
    assert torch.equal(direction, encoding.direction)


# options ---------------------------------------------------------------------------------------


def test_defaults_are_the_paper_bilinear():
    opts = OSFed.Options()
    assert opts.upsampler == "bilinear"
    assert (opts.fsrcnn_d, opts.fsrcnn_s, opts.fsrcnn_m) == (56, 12, 4)
    algorithm = OSFed(opts, make_env())
    assert algorithm.fsrcnn is None and "upsampler" not in algorithm.header(0, 0)
    assert algorithm.server_message(1).common is None


@pytest.mark.parametrize(
    "key, value",
    [
        ("upsampler", "bicubic"), ("fsrcnn_mode", "shared"), ("fsrcnn_d", 0), ("fsrcnn_s", 1.5), ("fsrcnn_m", -1),
        ("fsrcnn_init", "he"), ("fsrcnn_client_weights", "sometimes"), ("fsrcnn_server_steps", -1),
        ("fsrcnn_server_batch", 0), ("fsrcnn_server_lr", 0.0),
    ],
)
def test_validate_names_the_bad_key(key, value):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        OSFed.Options(**{"upsampler": "fsrcnn", key: value}).validate()


def test_fsrcnn_needs_a_uniform_grid_with_factor_two_or_more():
    with pytest.raises(ValueError, match="algorithm.upsampler.*uniform"):
        OSFed.Options(upsampler="fsrcnn", multigrid="multiscale", factor=4).validate()
    with pytest.raises(ValueError, match="algorithm.upsampler.*factor >= 2"):
        OSFed.Options(upsampler="fsrcnn", factor=1).validate()
    with pytest.raises(ValueError, match="algorithm.factor"):
        SFC3.Options(upsampler="fsrcnn").validate()
    with pytest.raises(ValueError, match="algorithm.upsampler.*osfed only"):
        E3SFC(E3SFC.Options(upsampler="fsrcnn", factor=2, **SMALL), make_env())
    OSFed.Options(upsampler="fsrcnn", factor=4).validate()


# end to end: the runner, a resume on another rank count ----------------------------------------


@pytest.mark.slow
def test_server_mode_run_resumes_bit_for_bit_and_counts_the_broadcast(digits_dir, tmp_path):
    """Rounds 1-2 in one go on one rank vs round 1, then 2 resumed on two ranks: the same model; the
    FSRCNN goes down again to the resumed run's new processes but is counted once per client, in the
    first round each client is selected (~12 s)."""
    import json

    from tests.conftest import small_run_overrides
    from tests.test_run_e2e import osfed, summary

    fsrcnn = ["algorithm.upsampler=fsrcnn", "algorithm.fsrcnn_mode=server", "algorithm.fsrcnn_d=8",
              "algorithm.fsrcnn_s=4", "algorithm.fsrcnn_m=1", "algorithm.fsrcnn_server_steps=3",
              "algorithm.fsrcnn_server_batch=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    first = osfed("run", *small_run_overrides(digits_dir, full, "osfed", rounds=2), *fsrcnn)
    assert first.returncode == 0, first.stderr
    assert "trained the server FSRCNN" in first.stdout
    assert osfed("run", *small_run_overrides(digits_dir, part, "osfed", rounds=1), *fsrcnn).returncode == 0
    resumed = osfed("run", "--resume", str(part), "rounds=2", np=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained the server FSRCNN" not in resumed.stdout  # restored from the checkpoint
    assert summary(part)["model_sha256"] == summary(full)["model_sha256"]
    downlink = {run: [json.loads(line)["downlink_bytes"] for line in (run / "metrics.jsonl").read_text().splitlines()]
                for run in (full, part)}
    model = downlink[full][1]  # round 2 of the uninterrupted run: the model alone, for every client
    extra = downlink[full][0] - model
    assert 4 * small_params() * 6 <= extra < (4 * small_params() + 256) * 6  # six clients, one FSRCNN each
    assert downlink[part] == [model + extra, model]  # round 2 re-sends it (new processes), nobody pays again


@pytest.mark.slow
def test_server_mode_partial_participation_charges_each_client_at_its_first_selection(digits_dir, tmp_path):
    """With half the clients per round, a client first selected in round 3 still needs the FSRCNN:
    the run charges it then (it went down physically in round 1 only), once per client (~10 s)."""
    import json

    import yaml

    from osfed_hpc.rng import select_clients
    from tests.conftest import small_run_overrides
    from tests.test_run_e2e import osfed

    fsrcnn = ["algorithm.upsampler=fsrcnn", "algorithm.fsrcnn_mode=server", "algorithm.fsrcnn_d=8",
              "algorithm.fsrcnn_s=4", "algorithm.fsrcnn_m=1", "algorithm.fsrcnn_server_steps=3",
              "algorithm.fsrcnn_server_batch=4", "server.sample_fraction=0.5"]
    run = tmp_path / "run"
    result = osfed("run", *small_run_overrides(digits_dir, run, "osfed", rounds=4), *fsrcnn)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((run / "config.yaml").read_text())
    kept = OSFed(options("server"), make_env()).kept_downlink_bytes()  # depends on the FSRCNN sizes only
    seen: set[int] = set()
    model_bytes = None
    for record in records:
        selected = [int(c) for c in select_clients(config["seed"], record["round"], 6, 0.5)]
        assert selected == record["clients"]
        new = len(set(selected) - seen)
        seen |= set(selected)
        per_client = (record["downlink_bytes"] - new * kept) / len(selected)
        model_bytes = model_bytes or per_client
        assert per_client == model_bytes
    assert any(set(r["clients"]) - set(records[0]["clients"]) for r in records[1:])  # late first selections
