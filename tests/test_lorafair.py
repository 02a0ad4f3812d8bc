"""LoRA (FedAvg over adapters + head) and LoRA-FAIR (averaged factors + ridge correction of B)."""
from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms import ClientContext, Environment, get_algorithm
from osfed_hpc.algorithms.lorafair import LoRA, LoRAFair, ridge_correction
from osfed_hpc.config import TrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.lora import LoRAConv2d, LoRALinear, lora_slices
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

CLASSES = 10
SIZE = 28  # the cnn's size formula below is for 28 x 28, 1 channel


def _flat(cls=LoRAFair, rank: int = 4, seed: int = 0, **options) -> tuple[FlatModel, object]:
    opts = cls.Options(rank=rank, **options)
    net = cls.adapt_model(build_model("cnn", 1, SIZE, CLASSES, seed=seed), opts, CLASSES, seed)
    return FlatModel(net), opts


def _algo(cls=LoRAFair, rank: int = 4, train: TrainConfig | None = None, **options):
    model, opts = _flat(cls, rank, **options)
    env = Environment(model=model, train=train or TrainConfig(), num_classes=CLASSES, input_shape=(1, SIZE, SIZE),
                      device=torch.device("cpu"), seed=0)
    return cls(opts, env)


def _payload(client: int, update: np.ndarray, round: int = 1, name: str = "lorafair") -> Payload:
    return Payload(meta={"algorithm": name, "round": round, "client": client}, arrays={"update": update})


def _random_updates(algo, count: int, seed: int = 0, scale: float = 0.1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(algo.env.model.numel)).astype(np.float32) for _ in range(count)]


def _fold(algo, updates: list[np.ndarray], weights: list[float]) -> torch.Tensor:
    algo.server_begin(1)
    for cid, (update, weight) in enumerate(zip(updates, weights)):
        algo.server_accumulate(cid, Payload.unpack(_payload(cid, update).pack()), weight)  # read-only views
    return algo.server_finish()


def _numpy_lorafair(start: np.ndarray, updates: list[np.ndarray], weights: list[float], slices, ridge: float):
    """The method written out in float64 numpy, one client matrix at a time."""
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    states = [start.astype(np.float64) + u for u in updates]
    target = sum(pk * s for pk, s in zip(p, states))
    for s in slices:
        a_shape, b_shape = tuple(s.layer.lora_A.shape), tuple(s.layer.lora_B.shape)
        a_bar, b_bar = target[s.a].reshape(a_shape), target[s.b].reshape(b_shape)
        dw = sum(pk * st[s.b].reshape(b_shape) @ st[s.a].reshape(a_shape) for pk, st in zip(p, states))
        db = (dw - b_bar @ a_bar) @ a_bar.T @ np.linalg.inv(a_bar @ a_bar.T + ridge * np.eye(a_shape[0]))
        target[s.b] = (b_bar + db).reshape(-1)
    return target


# the correction --------------------------------------------------------------------------------
def test_server_matches_numpy_for_conv_and_linear_layers():
    algo = _algo(ridge=0.05)
    slices = algo.slices
    assert [type(s.layer) for s in slices] == [LoRAConv2d, LoRAConv2d, LoRALinear]
    start = algo.env.model.vector.numpy().copy()
    updates, weights = _random_updates(algo, 4), [30.0, 7.0, 12.0, 51.0]
    result = _fold(algo, updates, weights).numpy()
    expected = _numpy_lorafair(start, updates, weights, slices, ridge=0.05)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=2e-5)
    # the head is the plain weighted mean; A is the plain mean; only B moved away from it
    mean = start + sum(w * u for w, u in zip(weights, updates)) / sum(weights)
    head = slice(slices[-1].b.stop, None)
    np.testing.assert_allclose(result[head], mean[head], rtol=1e-5, atol=1e-6)
    for s in slices:
        np.testing.assert_allclose(result[s.a], mean[s.a], rtol=1e-5, atol=1e-6)
        assert np.abs(result[s.b] - mean[s.b]).max() > 1e-4
    assert algo.last_correction_norm > 0


def test_uniform_weighting_gives_equal_weights():
    algo = _algo(weighting="uniform", ridge=0.05)
    start = algo.env.model.vector.numpy().copy()
    updates = _random_updates(algo, 3, seed=2)
    result = _fold(algo, updates, [1.0, 50.0, 300.0]).numpy()
    expected = _numpy_lorafair(start, updates, [1.0, 1.0, 1.0], algo.slices, ridge=0.05)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=2e-5)


def test_identical_a_factors_need_no_correction():
    algo = _algo()
    updates = _random_updates(algo, 3, seed=1)
    for u in updates[1:]:  # every client reports the same A, different B and head
        for s in algo.slices:
            u[s.a] = updates[0][s.a]
    result = _fold(algo, updates, [5.0, 9.0, 2.0])
    plain = _algo(LoRA)
    expected = _fold(plain, updates, [5.0, 9.0, 2.0])
    assert algo.last_correction_norm < 1e-4
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 3, 20), (9, 5, 5 * 3 * 3)], ids=["linear", "conv"])
def test_ridge_correction_equals_direct_formula(shape):
    out, r, fan_in = shape
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(r, fan_in, generator=g), torch.randn(out, r, generator=g)
    dw = torch.randn(out, fan_in, generator=g)
    got = ridge_correction(dw, a, b, 0.3)
    a64, b64, dw64 = a.double(), b.double(), dw.double()
    expected = (dw64 - b64 @ a64) @ a64.T @ torch.linalg.inv(a64 @ a64.T + 0.3 * torch.eye(r, dtype=torch.float64))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ridge", [0.0, 1e-9])
def test_vanishing_ridge_projects_onto_the_row_space_of_a(ridge):
    g = torch.Generator().manual_seed(4)
    a, b, dw = torch.randn(3, 12, generator=g), torch.randn(7, 3, generator=g), torch.randn(7, 12, generator=g)
    corrected = (b.double() + ridge_correction(dw, a, b, ridge).double()) @ a.double()
    q, _ = torch.linalg.qr(a.double().T)  # orthonormal basis of A's row space (A has full row rank)
    projection = dw.double() @ q @ q.T
    torch.testing.assert_close(corrected, projection, rtol=1e-5, atol=1e-5)


def test_zero_ridge_handles_rank_deficient_a():
    a = torch.ones(2, 5)  # rank 1
    b, dw = torch.randn(4, 2), torch.randn(4, 5)
    delta = ridge_correction(dw, a, b, 0.0)
    assert torch.isfinite(delta).all()
    corrected = (b + delta) @ a
    torch.testing.assert_close(corrected, dw @ torch.full((5, 5), 0.2), rtol=1e-5, atol=1e-5)


def test_server_optimizer_learning_rate_scales_the_step_to_the_target():
    algo = _algo()
    start = algo.env.model.vector.clone()
    updates = _random_updates(algo, 2)
    target = _fold(algo, updates, [1.0, 3.0])
    algo = _algo()
    algo.env.server_optimizer.lr = 0.5
    half = _fold(algo, updates, [1.0, 3.0])
    torch.testing.assert_close(half, start + 0.5 * (target - start), rtol=1e-5, atol=1e-6)


def test_fold_memory_is_one_matrix_per_layer_and_no_clients_keep_the_model():
    algo = _algo()
    algo.server_begin(1)
    shapes = [tuple(p.shape) for p in algo._products]
    assert shapes == [(s.layer.lora_B.shape[0], s.layer.lora_A.shape[1]) for s in algo.slices]
    assert torch.equal(algo.server_finish(), algo.env.model.vector)


def test_lora_is_fedavg_on_the_trainable_vector():
    algo = _algo(LoRA)
    start = algo.env.model.vector.clone()
    updates, weights = _random_updates(algo, 3), [2.0, 3.0, 5.0]
    expected = start + sum(w * torch.from_numpy(u) for w, u in zip(weights, updates)) / 10.0
    torch.testing.assert_close(_fold(algo, updates, weights), expected, rtol=1e-5, atol=1e-6)


# the model and the wire ------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_trainable_vector_holds_only_adapters_and_head(rank):
    model, _ = _flat(rank=rank)
    net = model.model
    assert model.numel == model.param_numel == 4873 * rank + 650
    names = set(model.param_names)
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert names == {n for n, _ in net.named_parameters() if "lora_" in n} | head
    assert not any(p.requires_grad for n, p in net.named_parameters() if ".base." in n)


def test_adapters_follow_the_seed_alone():
    a, _ = _flat(seed=0)
    b, _ = _flat(seed=0)
    c, _ = _flat(seed=1)
    assert torch.equal(a.vector, b.vector)
    first = lora_slices(a.model)[0].a
    assert not torch.equal(a.vector[first], c.vector[first])


@pytest.mark.parametrize("cls", [LoRA, LoRAFair])
def test_payload_bytes_are_the_trainable_vector_plus_header(cls):
    train = replace(TrainConfig(), lr=0.1, local_steps=2, batch_size=8)
    algo = _algo(cls, train=train)
    g = torch.Generator().manual_seed(0)
    data = TensorClientData(torch.randn(16, 1, SIZE, SIZE, generator=g), torch.arange(16) % CLASSES)
    result = algo.client_update(ClientContext(3, 1, data, {}, torch.Generator().manual_seed(1), 0))
    wire = result.payload.pack()
    header_len = struct.unpack_from("<I", wire, 8)[0]
    header = (12 + header_len + 7) // 8 * 8
    assert len(wire) == result.payload.packed_size() == 4 * (4873 * 4 + 650) + header
    assert result.payload.packed_size() <= algo.payload_size_hint()
    assert result.payload.meta == {"algorithm": cls.name, "round": 1, "client": 3}
    assert set(result.stats) == set(cls.client_stat_names) == {"train_loss", "local_steps"}


def test_frozen_backbone_is_bitwise_unchanged_by_training_and_the_server():
    train = replace(TrainConfig(), lr=0.5, momentum=0.9, weight_decay=1e-3, local_steps=3, batch_size=8)
    algo = _algo(train=train)
    net = algo.env.model.model
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen
    start = algo.env.model.vector.clone()
    g = torch.Generator().manual_seed(0)
    data = TensorClientData(torch.randn(16, 1, SIZE, SIZE, generator=g), torch.arange(16) % CLASSES)
    payloads = []
    for cid in range(2):
        algo.env.model.load_(start)
        result = algo.client_update(ClientContext(cid, 1, data, {}, torch.Generator().manual_seed(cid), 0))
        payloads.append(Payload.unpack(result.payload.pack()))
    algo.env.model.load_(start)
    algo.server_begin(1)
    for cid, payload in enumerate(payloads):
        algo.server_accumulate(cid, payload, 16.0)
    algo.env.model.load_(algo.server_finish())
    assert not torch.equal(algo.env.model.vector, start)
    for n, p in net.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


# damaged payloads and options -------------------------------------------------------------------
def _damaged(numel: int) -> dict[str, Payload]:
    good = np.zeros(numel, dtype=np.float32)
    nan, inf = good.copy(), good.copy()
    nan[3], inf[-1] = np.nan, -np.inf
    return {
        "wrong dtype": _payload(0, good.astype(np.float64)),
        "wrong shape": _payload(0, good[:-1]),
        "2-d": _payload(0, good.reshape(1, -1)),
        "missing": Payload(meta={"algorithm": "lorafair", "round": 1, "client": 0}, arrays={}),
        "extra": Payload(meta={}, arrays={"update": good, "more": good[:4]}),
        "renamed": Payload(meta={}, arrays={"delta": good}),
        "nan": _payload(0, nan),
        "inf": _payload(0, inf),
    }


@pytest.mark.parametrize("cls", [LoRA, LoRAFair])
@pytest.mark.parametrize("kind", ["wrong dtype", "wrong shape", "2-d", "missing", "extra", "renamed", "nan", "inf"])
def test_damaged_payloads_raise_value_error_and_leave_the_round_intact(cls, kind):
    algo = _algo(cls)
    reference = _algo(cls)
    update = _random_updates(algo, 1)[0]
    algo.server_begin(1)
    with pytest.raises(ValueError, match="client 0, round 1"):
        algo.server_accumulate(0, Payload.unpack(_damaged(algo.env.model.numel)[kind].pack()), 10.0)
    algo.server_accumulate(1, _payload(1, update), 10.0)
    reference.server_begin(1)
    reference.server_accumulate(1, _payload(1, update), 10.0)
    assert torch.equal(algo.server_finish(), reference.server_finish())


@pytest.mark.parametrize(
    "key, value",
    [("rank", 0), ("rank", -2), ("rank", 2.5), ("rank", True), ("rank", "4"), ("alpha", 0.0), ("alpha", -1.0),
     ("alpha", float("nan")), ("alpha", float("inf")), ("alpha", True), ("ridge", -0.1), ("ridge", float("nan")),
     ("ridge", float("inf")), ("ridge", "x"), ("ridge", False), ("weighting", "median")],
)
def test_invalid_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        replace(LoRAFair.Options(), **{key: value}).validate()
    if key != "ridge":
        with pytest.raises(ValueError, match=f"algorithm.{key}"):
            replace(LoRA.Options(), **{key: value}).validate()


def test_registered_names_and_defaults():
    assert get_algorithm("lora") is LoRA and get_algorithm("lorafair") is LoRAFair
    opts = LoRAFair.Options()
    assert (opts.rank, opts.alpha, opts.weighting, opts.ridge) == (4, 8.0, "samples", 0.01)
    assert not hasattr(LoRA.Options(), "ridge")
    opts.validate()


def test_a_model_without_adapters_is_refused():
    model = FlatModel(build_model("cnn", 1, SIZE, CLASSES))
    env = Environment(model=model, train=TrainConfig(), num_classes=CLASSES, input_shape=(1, SIZE, SIZE),
                      device=torch.device("cpu"), seed=0)
    with pytest.raises(ValueError, match="adapters"):
        LoRAFair(LoRAFair.Options(), env)
