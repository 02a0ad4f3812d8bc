"""FedAF: the sliced Wasserstein and LGKM terms, model re-sampling, condensation, exact wire bytes,
V going down one round later, the aggregation-free fold and a bit-exact resume inside the server phase."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from osfed_hpc.algorithms import ClientContext, Environment, ReceivedMessage, get_algorithm
from osfed_hpc.algorithms.fedaf import (
    FeatureNet,
    FedAF,
    Resampler,
    class_means,
    lgkm_loss,
    random_directions,
    sliced_wasserstein,
    symmetric_kl,
)
from osfed_hpc.config import TrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

K = 10
FAST = {"ipc": 2, "iterations": 4, "server_epochs": 3, "server_lr": 0.05, "server_batch_size": 8}


def _model(name: str = "mlp", size: int = 8, seed: int = 3) -> FlatModel:
    return FlatModel(build_model(name, 1, size, K, seed=seed))


def _algo(model: FlatModel | None = None, size: int = 8, **options) -> FedAF:
    model = model or _model(size=size)
    env = Environment(model=model, train=TrainConfig(), num_classes=K, input_shape=(1, size, size),
                      device=torch.device("cpu"), seed=0, num_clients=4)
    return FedAF(FedAF.Options(**{**FAST, **options}), env)


def _data(seed: int, n: int = 30, classes: tuple[int, ...] = tuple(range(K)), size: int = 8) -> TensorClientData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    return TensorClientData(torch.randn(n, 1, size, size, generator=g), labels)


def _ctx(client: int, round_: int, data, message: ReceivedMessage | None = None, seed: int = 1) -> ClientContext:
    return ClientContext(client, round_, data, {}, torch.Generator().manual_seed(seed), 0, message)


def _received(algo: FedAF, round_: int) -> ReceivedMessage:
    """Round ``round_``'s message as a worker receives it (read-only views of packed bytes)."""
    message = algo.server_message(round_)
    common = None if message.common is None else Payload.unpack(message.common.pack())
    return ReceivedMessage(round=round_, model=message.model, common=common)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


def _header_bytes(meta: dict, arrays: list) -> int:
    return len(json.dumps({"meta": meta, "arrays": arrays}, separators=(",", ":")).encode())


# sliced Wasserstein ----------------------------------------------------------------------------------
def test_sliced_wasserstein_is_differentiable_zero_for_equal_sets_symmetric_and_order_free():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, K, generator=g, requires_grad=True)
    y = torch.randn(7, K, generator=g, requires_grad=True)
    d = random_directions(K, 50, torch.Generator().manual_seed(1))
    assert torch.allclose(d.norm(dim=1), torch.ones(50))
    assert torch.equal(d, random_directions(K, 50, torch.Generator().manual_seed(1)))
    value = sliced_wasserstein(x, y, d)
    assert value > 0
    value.backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    with torch.no_grad():
        assert sliced_wasserstein(x, x, d) == 0
        assert torch.equal(sliced_wasserstein(x, y, d), sliced_wasserstein(y, x, d))
        assert torch.equal(sliced_wasserstein(x[torch.randperm(5, generator=g)], y[torch.randperm(7, generator=g)], d),
                           value)
        # equal counts: plain matching of sorted projections
        z = torch.randn(5, K, generator=g)
        direct = ((torch.sort(d @ x.T, 1).values - torch.sort(d @ z.T, 1).values) ** 2).mean()
        torch.testing.assert_close(sliced_wasserstein(x, z, d), direct)
        # one point on one side (a class logit V_c): the mean squared projected distance to it
        v = torch.randn(1, K, generator=g)
        torch.testing.assert_close(sliced_wasserstein(x, v, d), ((d @ (x - v).T) ** 2).mean())
        # interpolated quantiles: two points {0, 1} vs four points {0, 1/3, 2/3, 1} on one axis
        axis = torch.eye(2)[:1]
        two = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
        four = torch.tensor([[0.0, 0.0], [1 / 3, 0.0], [2 / 3, 0.0], [1.0, 0.0]])
        # levels 1/8, 3/8, 5/8, 7/8 of {0, 1}: 0, 0.25, 0.75, 1 (linear between the order statistics)
        expected = ((torch.tensor([0.0, 0.25, 0.75, 1.0]) - torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])) ** 2).mean()
        torch.testing.assert_close(sliced_wasserstein(two, four, axis), expected)


def test_sliced_wasserstein_refuses_mismatched_shapes():
    d = random_directions(4, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="do not fit"):
        sliced_wasserstein(torch.zeros(2, 4), torch.zeros(2, 5), d)
    with pytest.raises(ValueError, match="empty"):
        sliced_wasserstein(torch.zeros(0, 4), torch.zeros(2, 4), d)


# LGKM ----------------------------------------------------------------------------------------------------
def test_symmetric_kl_is_symmetric_non_negative_and_zero_for_equal_distributions():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, K, generator=g) * 3, 1)
    q = torch.softmax(torch.randn(6, K, generator=g) * 3, 1)
    assert torch.equal(symmetric_kl(p, q), symmetric_kl(q, p))
    assert (symmetric_kl(p, q) > 0).all()
    assert torch.equal(symmetric_kl(p, p), torch.zeros(6))
    one_hot = torch.eye(K)[:6]  # zero probabilities: finite thanks to the smoothing
    assert torch.isfinite(symmetric_kl(one_hot, q)).all() and (symmetric_kl(one_hot, q) > 0).all()
    # the definition, 1/2 [KL(p||q) + KL(q||p)], for strictly positive rows (the smoothing moves it by < 0.1%)
    kl = lambda a, b: (a * (a / b).log()).sum(1)  # noqa: E731
    torch.testing.assert_close(symmetric_kl(p, q), 0.5 * (kl(p, q) + kl(q, p)), rtol=1e-3, atol=1e-6)


def test_lgkm_uses_the_batch_class_means_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, K, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3, 3, 5, 5, 7])
    present = torch.ones(K, dtype=torch.bool)
    q, counts = class_means(torch.softmax(logits / 2.0, 1), labels, K)
    assert counts.tolist() == [2, 3, 0, 4, 0, 2, 0, 1, 0, 0]
    torch.testing.assert_close(q[3], torch.softmax(logits[5:9] / 2.0, 1).mean(0))
    # R equal to the batch's Q: zero; otherwise positive, with a gradient on the logits
    assert float(lgkm_loss(logits.detach(), labels, q.detach(), present, 2.0)) == pytest.approx(0.0, abs=1e-6)
    r = torch.softmax(torch.randn(K, K, generator=g), 1)
    loss = lgkm_loss(logits, labels, r, present, 2.0)
    assert loss > 0
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # the mean over the classes of the batch that have client soft labels
    expected = symmetric_kl(r[[0, 1, 3, 5, 7]], q.detach()[[0, 1, 3, 5, 7]]).mean()
    torch.testing.assert_close(lgkm_loss(logits.detach(), labels, r, present, 2.0), expected)
    only = torch.zeros(K, dtype=torch.bool)
    only[3] = True
    torch.testing.assert_close(lgkm_loss(logits.detach(), labels, r, only, 2.0), symmetric_kl(r[3], q.detach()[3]))
    assert lgkm_loss(logits.detach(), labels, r, torch.zeros(K, dtype=torch.bool), 2.0) == 0


# model re-sampling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_resampling_draws_a_keyed_fresh_init_and_interpolates(name):
    model = _model(name)
    resampler = Resampler(model)
    assert bool(resampler.covered.all())
    before = torch.get_rng_state()
    rand = resampler.random_params(0, 4)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert torch.equal(rand, Resampler(model).random_params(0, 4))  # same key, same numbers (any rank)
    assert not torch.equal(rand, resampler.random_params(0, 5))
    assert not torch.equal(rand, resampler.random_params(1, 4))
    # exactly a fresh build of the model under the round's key (the same numbers as build_model)
    fresh = FlatModel(build_model(name, 1, 8, K, seed=Resampler.key(0, 4)))
    assert torch.equal(rand, fresh.vector)
    # independent of the current weights
    other = _model(name, seed=11)
    assert torch.equal(Resampler(other).random_params(0, 4), rand)
    w = model.vector
    torch.testing.assert_close(resampler.embedding_state(w, 0.9, 0, 4), 0.9 * w + 0.1 * rand, rtol=0, atol=1e-7)
    assert torch.equal(resampler.embedding_state(w, 1.0, 0, 4), w)
    assert torch.equal(resampler.embedding_state(w, 0.0, 0, 4), rand)


def test_resampling_keeps_parameters_no_module_reinitialises_and_the_buffers():
    vit = _model("vit_tiny")
    resampler = Resampler(vit)
    names = [n for n, p in vit.model.named_parameters() for _ in range(p.numel())]
    uncovered = {names[i] for i in torch.nonzero(~resampler.covered).squeeze(1).tolist()}
    assert uncovered == {"class_token", "encoder.pos_embedding"}
    state = resampler.embedding_state(vit.vector, 0.0, 0, 1)
    assert torch.equal(state[~resampler.covered], vit.vector[~resampler.covered])
    bn = FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, K)))
    bn.vector[bn.param_numel:] = 5.0  # running statistics
    state = Resampler(bn).embedding_state(bn.vector, 0.5, 0, 1)
    assert torch.equal(state[bn.param_numel:], bn.vector[bn.param_numel:])


def test_the_embedding_net_is_the_resampled_frozen_model_of_the_round():
    algo = _algo(gamma=0.9)
    net = algo.embedding(3, 0)
    expected = Resampler(algo.env.model).embedding_state(algo.env.model.vector, 0.9, 0, 3)
    assert torch.equal(net.flat.vector, expected)
    assert not net.flat.model.training and not any(p.requires_grad for p in net.flat.model.parameters())
    assert algo.embedding(3, 0) is net and torch.equal(net.flat.vector, expected)  # once per round
    assert not torch.equal(algo.embedding(4, 0).flat.vector, expected)


@pytest.mark.parametrize("name, size, width", [("cnn", 8, 64), ("mlp", 8, 200), ("vit_tiny", 8, 64),
                                               ("resnet18_gn", 16, 512)])
def test_features_are_the_classifier_input(name, size, width):
    model = _model(name, size)
    net = FeatureNet(model, K)
    x = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(0))
    features, logits = net(x)
    assert features.shape == (3, width)
    model.model.eval()
    torch.testing.assert_close(logits, model.model(x))


def test_a_model_without_a_class_head_is_a_clear_error():
    model = FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 7)))
    env = Environment(model=model, train=TrainConfig(), num_classes=K, input_shape=(1, 8, 8),
                      device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError, match="nn.Linear classifier with 10 outputs"):
        FedAF(FedAF.Options(), env)


# condensation ----------------------------------------------------------------------------------------------
def test_condensation_lowers_the_distribution_matching_loss():
    algo = _algo(ipc=3, iterations=40, lr_img=1.0)
    start = algo.env.model.vector.clone()
    result = algo.client_update(_ctx(0, 1, _data(0, n=40, classes=(1, 4, 6))))
    stats = result.stats
    assert stats["classes_present"] == 3 and stats["cdc_loss_last"] == 0.0  # round 1: no V, no CDC
    assert stats["dm_loss_last"] < 0.5 * stats["dm_loss_first"]
    assert torch.equal(algo.env.model.vector, start)  # the global model is not touched


def test_synthetic_images_start_from_real_images_of_their_class():
    algo = _algo(ipc=3, iterations=0)
    data = _data(2, n=20, classes=(0, 2, 9))
    payload = algo.client_update(_ctx(0, 1, data)).payload
    images = torch.from_numpy(payload.arrays["images"].copy())
    assert payload.arrays["classes"].tolist() == [0, 2, 9]
    for j, c in enumerate([0, 2, 9]):
        real = data.x[data.y == c]
        for image in images[3 * j : 3 * j + 3]:
            assert any(torch.equal(image, r) for r in real)
    # a class with fewer than ipc images repeats some of them
    few = TensorClientData(torch.randn(4, 1, 8, 8), torch.tensor([5, 5, 7, 7]))
    payload = algo.client_update(_ctx(0, 1, few)).payload
    assert payload.arrays["images"].shape == (6, 1, 8, 8)


def test_client_update_is_deterministic_for_a_fixed_generator():
    packs = []
    for _ in range(2):
        algo = _algo(iterations=3)
        packs.append(algo.client_update(_ctx(2, 1, _data(1), seed=9)).payload.pack())
    assert packs[0] == packs[1]
    other = _algo(iterations=3).client_update(_ctx(2, 1, _data(1), seed=10)).payload.pack()
    assert other != packs[0]


# wire bytes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ipc, classes", [(2, (0, 3, 4)), (5, tuple(range(K)))])
def test_payload_shapes_and_exact_bytes(ipc, classes):
    algo = _algo(ipc=ipc, iterations=1)
    data = _data(3, n=60, classes=classes)
    result = algo.client_update(_ctx(1, 7, data))
    payload = result.payload
    c = len(classes)
    assert payload.meta == {"algorithm": "fedaf", "round": 7, "client": 1, "ipc": ipc}
    assert payload.arrays["images"].dtype == np.float32 and payload.arrays["images"].shape == (c * ipc, 1, 8, 8)
    assert payload.arrays["classes"].dtype == np.int32 and payload.arrays["classes"].tolist() == list(classes)
    for name in ("v", "r"):
        assert payload.arrays[name].dtype == np.float32 and payload.arrays[name].shape == (c, K)
    np.testing.assert_allclose(payload.arrays["r"].sum(1), 1.0, rtol=1e-5)
    # v, r: the re-sampled model's class means of logits and softmax(logits / T) on the real data
    net = algo.embedding(7, 0)
    with torch.no_grad():
        logits = net(data.x)[1]
    for j, cls in enumerate(classes):
        rows = data.y == cls
        torch.testing.assert_close(torch.from_numpy(payload.arrays["v"][j].copy()), logits[rows].mean(0))
        torch.testing.assert_close(torch.from_numpy(payload.arrays["r"][j].copy()),
                                   torch.softmax(logits[rows] / 2.0, 1).mean(0))
    # bytes: images 4 c ipc C H W + classes 4 c + v and R 2 c K 4, plus the header
    images, labels, vr = 4 * c * ipc * 64, 4 * c, 4 * c * K
    arrays = [["images", "float32", [c * ipc, 1, 8, 8], 0], ["classes", "int32", [c], _aligned(images)],
              ["v", "float32", [c, K], _aligned(images) + _aligned(labels)],
              ["r", "float32", [c, K], _aligned(images) + _aligned(labels) + _aligned(vr)]]
    header = _header_bytes(payload.meta, arrays)
    formula = _aligned(12 + header) + _aligned(images) + _aligned(labels) + _aligned(vr) + vr
    assert payload.packed_size() == formula == len(payload.pack()) == algo.packed_size(7, 1, c)
    assert images + labels + 2 * vr <= formula - 12 - header <= images + labels + 2 * vr + 16
    hint = algo.payload_size_hint()
    assert hint >= algo.packed_size(7, 1, K) and hint <= algo.packed_size(7, 1, K) + 16


def test_downlink_is_the_model_and_from_round_2_the_class_logits():
    algo = _algo()
    model_bytes = 4 * algo.env.model.numel
    first = algo.server_message(1)
    assert first.model and first.common is None and first.downlink_bytes(0, model_bytes) == model_bytes
    _fold(algo, 1, {0: (0, 1), 1: (1, 2)})
    common = algo.server_message(2).common
    arrays = [["v", "float32", [K, K], 0], ["present", "uint8", [K], _aligned(4 * K * K)]]
    formula = _aligned(12 + _header_bytes(common.meta, arrays)) + _aligned(4 * K * K) + K
    assert common.packed_size() == formula
    assert algo.server_message(2).downlink_bytes(3, model_bytes) == model_bytes + formula


# server ---------------------------------------------------------------------------------------------------------
def _client_payload(algo: FedAF, client: int, round_: int, classes: tuple[int, ...],
                    message: ReceivedMessage | None = None) -> Payload:
    worker = _algo(replace_model(algo), **{k: getattr(algo.options, k) for k in FAST})
    return worker.client_update(_ctx(client, round_, _data(10 + client, n=24, classes=classes), message,
                                     seed=client)).payload


def replace_model(algo: FedAF) -> FlatModel:
    """A worker's replica of the server's W_t."""
    model = _model()
    model.load_(algo.env.model.vector)
    return model


def _fold(algo: FedAF, round_: int, clients: dict[int, tuple[int, ...]],
          message: ReceivedMessage | None = None) -> dict[int, Payload]:
    payloads = {c: Payload.unpack(_client_payload(algo, c, round_, classes, message).pack())
                for c, classes in clients.items()}
    algo.server_begin(round_)
    for client, payload in payloads.items():
        assert algo.server_accumulate(client, payload, 24.0) == {"synthetic_images": float(len(payload.arrays["images"]))}
    start = algo.env.model.vector.clone()
    assert torch.equal(algo.server_finish(), start)  # aggregation-free: W_t unchanged
    return payloads


def test_v_is_the_mean_over_clients_having_the_class_and_goes_down_next_round():
    server = _algo()
    payloads = _fold(server, 1, {0: (0, 1, 2), 2: (1, 2, 5), 3: (2,)})
    message = _received(server, 2)
    v = message.common.arrays["v"]
    assert message.common.arrays["present"].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    p0, p2, p3 = (payloads[c].arrays["v"] for c in (0, 2, 3))
    np.testing.assert_allclose(v[0], p0[0], rtol=1e-6)
    np.testing.assert_allclose(v[1], (p0[1] + p2[0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(v[2], (p0[2] + p2[1] + p3[0]) / 3, rtol=1e-6)
    np.testing.assert_allclose(v[5], p2[2], rtol=1e-6)
    assert not v[3].any()
    # R: the same per-class mean, used by this round's server phase
    np.testing.assert_allclose(server._r[2].numpy(), (payloads[0].arrays["r"][2] + payloads[2].arrays["r"][1]
                                                      + payloads[3].arrays["r"][0]) / 3, rtol=1e-6)
    # a client of round 2 uses the V it received: the CDC term is on for classes V has
    worker = _algo(replace_model(server))
    data = _data(4, n=24, classes=(1, 3))
    with_v = worker.client_update(_ctx(1, 2, data, message))
    assert with_v.stats["cdc_loss_last"] > 0
    without = _algo(replace_model(server)).client_update(_ctx(1, 2, data, None))
    assert without.stats["cdc_loss_last"] == 0
    assert not np.array_equal(with_v.payload.arrays["images"], without.payload.arrays["images"])
    # only classes present in V count: a client of class 3 alone gets no CDC term
    alone = _algo(replace_model(server)).client_update(_ctx(1, 2, _data(5, n=10, classes=(3,)), message))
    assert alone.stats["cdc_loss_last"] == 0


def test_the_cdc_term_pulls_synthetic_logits_towards_v():
    server = _algo()
    _fold(server, 1, {0: tuple(range(K))})
    message = _received(server, 2)
    data = _data(6, n=30)
    losses = {}
    for lam in (0.0, 50.0):
        worker = _algo(replace_model(server), iterations=15, lambda_loc=lam, lr_img=0.5)
        payload = worker.client_update(_ctx(0, 2, data, message)).payload
        net = worker.embedding(2, 0)
        with torch.no_grad():
            logits = net(torch.from_numpy(payload.arrays["images"].copy()))[1]
        v = torch.from_numpy(message.common.arrays["v"].copy())[torch.from_numpy(payload.arrays["classes"]).long()]
        losses[lam] = float(((logits.reshape(-1, 2, K) - v.unsqueeze(1)) ** 2).mean())
    assert losses[50.0] < losses[0.0]


def test_server_phase_trains_the_model_and_resumes_bit_exactly_between_epochs():
    def fresh_server() -> FedAF:
        return _algo(_model(seed=3), server_epochs=3)

    clients = {0: (0, 1, 2, 3), 1: (2, 3, 4, 5, 6), 2: (6, 7, 8, 9)}
    whole = fresh_server()
    _fold(whole, 1, clients)
    assert whole.server_phase_epochs(1) == 3
    losses = [whole.server_phase_epoch(1, e)["loss"] for e in (1, 2, 3)]
    assert losses[-1] < losses[0]
    expected = whole.env.model.vector.clone()

    part = fresh_server()
    _fold(part, 1, clients)
    stats = part.server_phase_epoch(1, 1)
    assert stats["steps"] == math.ceil(2 * 13 / 8) and set(stats) == {"loss", "ce", "lgkm", "steps"}
    state = {k: v.copy() for k, v in part.server_state().items()}
    assert {"fedaf.images", "fedaf.labels", "fedaf.velocity", "fedaf.r", "fedaf.v"} <= set(state)
    assert len(state["fedaf.images"]) == 2 * 13
    vector = part.env.model.vector.clone()

    resumed = fresh_server()  # a new process: nothing but the checkpoint
    resumed.env.model.load_(vector)
    resumed.load_server_state(dict(state))
    for epoch in (2, 3):
        resumed.server_phase_epoch(1, epoch)
    assert torch.equal(resumed.env.model.vector, expected)
    assert resumed.server_state()["fedaf.steps"][0] == whole.server_state()["fedaf.steps"][0] == 12

    # after the phase only V stays (it goes down in round 2)
    resumed.server_phase_end(1)
    assert set(resumed.server_state()) == {"fedaf.v", "fedaf.v_present"}
    again = fresh_server()
    again.load_server_state(resumed.server_state())
    assert again.server_message(2).common.pack() == resumed.server_message(2).common.pack()


def test_bad_server_state_is_refused():
    algo = _algo()
    with pytest.raises(ValueError, match="unexpected server state"):
        algo.load_server_state({"other": np.zeros(1)})
    with pytest.raises(ValueError, match="unexpected server state"):
        algo.load_server_state({"fedaf.nope": np.zeros(1)})
    with pytest.raises(ValueError, match="fedaf: server state v"):
        algo.load_server_state({"fedaf.v": np.zeros((3, 3), np.float32), "fedaf.v_present": np.zeros(3, np.uint8)})


def test_a_phase_without_data_stops_at_once():
    algo = _algo()
    algo.server_begin(1)
    algo.server_finish()
    assert algo.server_phase_epoch(1, 1) == {"steps": 0.0, "stop_early": 1.0}


def _damage(kind: str, payload: Payload) -> Payload:
    arrays = {k: v.copy() for k, v in payload.arrays.items()}
    meta = dict(payload.meta)
    if kind == "unsorted":
        arrays["classes"] = arrays["classes"][::-1].copy()
    elif kind == "out_of_range":
        arrays["classes"][-1] = K
    elif kind == "duplicate":
        arrays["classes"][1] = arrays["classes"][0]
    elif kind == "nan_image":
        arrays["images"][0, 0, 0, 0] = np.nan
    elif kind == "huge_logit":
        arrays["v"][0, 0] = 1e30
    elif kind == "r_not_probabilities":
        arrays["r"][0] *= 2
    elif kind == "negative_r":
        arrays["r"][0, 0] = -0.5
        arrays["r"][0, 1] += 0.5
    elif kind == "fewer_images":
        arrays["images"] = arrays["images"][:-1]
    elif kind == "wrong_image_size":
        arrays["images"] = np.zeros((len(arrays["images"]), 1, 8, 9), np.float32)
    elif kind == "no_classes":
        arrays = {"images": arrays["images"][:0], "classes": arrays["classes"][:0], "v": arrays["v"][:0],
                  "r": arrays["r"][:0]}
    elif kind == "wrong_ipc":
        meta["ipc"] = 3
    elif kind == "int64_classes":
        arrays["classes"] = arrays["classes"].astype(np.int64)
    elif kind == "missing_r":
        del arrays["r"]
    else:
        raise AssertionError(kind)
    return Payload(meta=meta, arrays=arrays)


@pytest.mark.parametrize("kind", ["unsorted", "out_of_range", "duplicate", "nan_image", "huge_logit",
                                  "r_not_probabilities", "negative_r", "fewer_images", "wrong_image_size",
                                  "no_classes", "wrong_ipc", "int64_classes", "missing_r"])
def test_damaged_payloads_are_rejected_and_leave_no_trace(kind):
    server = _algo()
    good = _client_payload(server, 3, 2, (1, 4, 7))
    server.server_begin(2)
    with pytest.raises(ValueError, match="client 3, round 2"):
        server.server_accumulate(3, Payload.unpack(_damage(kind, good).pack()), 10.0)
    server.server_accumulate(3, Payload.unpack(good.pack()), 10.0)
    server.server_finish()
    assert len(server._images) == 6
    np.testing.assert_array_equal(server._v[[1, 4, 7]].numpy(), good.arrays["v"])
    assert server._v_present.sum() == 3


# options ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"ipc": 0}, {"ipc": 1.5}, {"iterations": -1}, {"lr_img": 0}, {"lambda_loc": -0.1}, {"lambda_glob": "1"},
    {"temperature": 0}, {"gamma": 1.5}, {"gamma": -0.1}, {"swd_directions": 0}, {"real_batch_size": 0},
    {"server_epochs": 0}, {"server_lr": float("nan")}, {"server_momentum": 1.0}, {"server_batch_size": True},
])
def test_invalid_options_are_refused(options):
    key = next(iter(options))
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        FedAF.Options(**options).validate()


def test_registered_with_the_paper_defaults():
    from osfed_hpc.config import config_from_dict

    assert get_algorithm("fedaf") is FedAF
    config = config_from_dict({"algorithm": {"name": "fedaf"}})
    assert config.algorithm == {"name": "fedaf", "ipc": 50, "iterations": 500, "lr_img": 1.0, "lambda_loc": 0.8,
                                "lambda_glob": 0.8, "temperature": 2.0, "gamma": 0.9, "swd_directions": 100,
                                "real_batch_size": 256, "server_epochs": 500, "server_lr": 0.001,
                                "server_momentum": 0.9, "server_batch_size": 256}
    FedAF.Options(gamma=0, lambda_loc=0, lambda_glob=0, iterations=0).validate()
