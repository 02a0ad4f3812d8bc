"""OS-Fed / 3SFC client and server hooks: decode identity, error feedback, rejection, one full round."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms import get_algorithm
from osfed_hpc.algorithms.base import ClientContext, Environment
from osfed_hpc.algorithms.local_training import local_sgd
from osfed_hpc.algorithms.osfed import OSFed, least_squares_scale
from osfed_hpc.algorithms.server_optimizer import ServerOptimizer
from osfed_hpc.algorithms.sfc3 import SFC3
from osfed_hpc.config import TrainConfig as PackageTrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

SIZE, CLASSES = 28, 10
FAST = dict(outer_steps=2, lbfgs_max_iter=10)


def TrainConfig(**changes):
    """The package's TrainConfig with test defaults: plain SGD, small batches."""
    return dataclasses.replace(PackageTrainConfig(), lr=0.05, momentum=0.0, batch_size=16, **changes)


TinyData = TensorClientData


def make_data(seed: int, n: int = 48, channels: int = 1) -> TinyData:
    """Class-dependent patterns plus noise, so local SGD makes a real, data-dependent update."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return TinyData(patterns[y] + 0.5 * torch.randn(n, channels, SIZE, SIZE, generator=gen), y)


def make_env(model: str = "cnn", channels: int = 1, seed: int = 0, server_lr: float = 1.0,
             channels_last: bool = False) -> Environment:
    net = build_model(model, channels, SIZE, CLASSES, seed=seed)
    return Environment(model=FlatModel(net, channels_last=channels_last), train=TrainConfig(), num_classes=CLASSES,
                       input_shape=(channels, SIZE, SIZE), device=torch.device("cpu"), seed=seed,
                       server_optimizer=ServerOptimizer(lr=server_lr))


def make_ctx(data, client_id: int = 1, round: int = 0, state=None) -> ClientContext:
    generator = torch.Generator().manual_seed(1000 * round + client_id)
    return ClientContext(client_id=client_id, round=round, data=data, state={} if state is None else state,
                         generator=generator, seed=0)


def true_update(env: Environment, data, client_id: int = 1, round: int = 0) -> torch.Tensor:
    """Delta = W_J - W_t from the same local training the client runs (same generator seed)."""
    start = env.model.vector.clone()
    ctx = make_ctx(data, client_id, round)
    local_sgd(env.model, data, env.train, ctx.generator, env.train.lr)
    delta = (env.model.vector - start)[: env.model.param_numel].clone()
    env.model.load_(start)
    return delta


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# options and construction -------------------------------------------------------------------


def test_registry_and_defaults():
    assert get_algorithm("osfed") is OSFed and get_algorithm("sfc3") is SFC3
    OSFed.Options().validate()
    SFC3.Options().validate()
    assert SFC3.Options().factor == 1 and OSFed.Options().factor == 2


@pytest.mark.parametrize(
    "key, value",
    [
        ("factor", 0), ("num_snapshots", 0), ("optimizer", "sgd"), ("lbfgs_lr", -1.0), ("lbfgs_max_iter", 0),
        ("lbfgs_history", 0), ("outer_steps", 0), ("adam_lr", 0.0), ("adam_steps", 0), ("codec", "webp"),
        ("jpeg_quality", 101), ("error_feedback", "yes"), ("weighting", "median"), ("segment_steps", 0),
        ("label_dtype", "int8"), ("multigrid", "learned"), ("factor", 2.5), ("num_snapshots", True),
    ],
)
def test_validate_names_the_bad_key(key, value):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        OSFed.Options(**{key: value}).validate()


def test_validate_multiscale_layout():
    with pytest.raises(ValueError, match="algorithm.multiscale_leaves"):
        OSFed.Options(multiscale_leaves=[[0, 0, 2]]).validate()
    with pytest.raises(ValueError, match="algorithm.multiscale_leaves"):
        OSFed.Options(multigrid="multiscale", factor=2, multiscale_leaves=[[0, 0, 1]]).validate()
    with pytest.raises(ValueError, match="algorithm.factor"):
        OSFed.Options(multigrid="multiscale", factor=6).validate()
    OSFed.Options(multigrid="multiscale", factor=8).validate()


def test_sfc3_refuses_multigrid():
    with pytest.raises(ValueError, match="algorithm.factor"):
        SFC3.Options(factor=2).validate()


def test_batchnorm_model_is_refused():
    with pytest.raises(ValueError, match="resnet18_gn"):
        OSFed(OSFed.Options(), make_env("resnet18", channels=3))


def test_factor_must_divide_resolution():
    with pytest.raises(ValueError, match=r"algorithm.factor.*28x28"):
        OSFed(OSFed.Options(factor=3), make_env())


# client encoding and server decoding ---------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_snapshots=2, label_dtype="float16"),
        dict(codec="png"),
        dict(codec="jpeg", jpeg_quality=75, factor=4),
        dict(multigrid="multiscale", factor=4,
             multiscale_leaves=[[0, 0, 2], [0, 2, 2], [2, 0, 2], [2, 2, 1], [2, 3, 1], [3, 2, 1], [3, 3, 1]]),
        dict(optimizer="adam", adam_steps=10),
    ],
    ids=["fp32", "2snap-fp16", "png", "jpeg", "multiscale", "adam"],
)
def test_server_decodes_the_clients_direction_bitwise(options):
    client_env, server_env = make_env(), make_env()  # separate replicas, same seed
    client, server = OSFed(OSFed.Options(**FAST, **options), client_env), OSFed(OSFed.Options(**FAST, **options),
                                                                               server_env)
    tau = true_update(client_env, make_data(1))
    encoding = client.compress(tau, make_ctx(make_data(1)))
    server.server_begin(0)
    scale, direction = server.decode(1, Payload.unpack(encoding.payload.pack()))
    assert torch.equal(direction, encoding.direction)
    assert scale == encoding.scale and np.float32(scale) == scale
    assert encoding.stats["cos"] > encoding.stats["cos_init"]


def test_channels_last_layout_decodes_bitwise_and_matches_the_standard_layout():
    """With channels-last conv weights the flat vector is NHWC-ordered; gradients must follow it."""
    standard, nhwc, server = make_env(), make_env(channels_last=True), make_env(channels_last=True)
    assert standard.model.model.features[0].weight.is_contiguous()
    assert nhwc.model.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    data = make_data(3)
    tau = true_update(nhwc, data)
    # the same local training in the standard layout gives the same update, up to the reordering
    reference = true_update(standard, data)
    first = nhwc.model.model.features[0].weight
    n = first.numel()
    torch.testing.assert_close(tau[:n].view(first.shape[0], *first.shape[2:], first.shape[1]).permute(0, 3, 1, 2),
                               reference[:n].view_as(first), rtol=1e-4, atol=1e-6)
    options = OSFed.Options(**FAST)
    encoding = OSFed(options, nhwc).compress(tau, make_ctx(data))
    decoder = OSFed(options, server)
    decoder.server_begin(0)
    scale, direction = decoder.decode(1, Payload.unpack(encoding.payload.pack()))
    assert torch.equal(direction, encoding.direction)
    assert abs(cos(encoding.residual, encoding.direction)) < 1e-3  # EF identity holds in NHWC order
    assert encoding.stats["cos"] > encoding.stats["cos_init"]


def test_per_tensor_scales_decode_bitwise_and_keep_each_tensor_orthogonal():
    client_env, server_env = make_env(), make_env()
    options = OSFed.Options(**FAST, scales="tensor")
    client, server = OSFed(options, client_env), OSFed(options, server_env)
    tau = true_update(client_env, make_data(1))
    encoding = client.compress(tau, make_ctx(make_data(1)))
    sizes = client.tensor_sizes
    assert encoding.payload.arrays["scale"].shape == (len(sizes),)
    server.server_begin(0)
    scale, direction = server.decode(1, Payload.unpack(encoding.payload.pack()))
    assert torch.equal(direction, encoding.direction) and torch.equal(scale, encoding.scale.cpu())
    server.server_accumulate(1, Payload.unpack(encoding.payload.pack()), 1.0)
    decoded = server.server_finish()[: server_env.model.param_numel] - server_env.model.params_vector
    assert torch.allclose(decoded, tau - encoding.residual, atol=1e-6)
    # least squares per tensor: the residual of every tensor is orthogonal to its own direction
    for e_l, g_l in zip(encoding.residual.split(sizes), encoding.direction.split(sizes)):
        if g_l.norm() > 0:
            assert abs(cos(e_l, g_l)) < 1e-3
    # and one scale per tensor explains at least as much as one global scale
    global_scale = least_squares_scale(encoding.direction, tau)
    assert encoding.residual.norm() <= (tau - global_scale * encoding.direction).norm() + 1e-6


def test_payload_holds_only_what_is_sent():
    env = make_env()
    encoding = OSFed(OSFed.Options(**FAST), env).compress(true_update(env, make_data(1)), make_ctx(make_data(1)))
    payload = encoding.payload
    assert set(payload.arrays) == {"snapshot", "labels", "scale"}
    assert set(payload.meta) == {"algorithm", "round", "client", "factor", "num_snapshots", "multigrid", "codec",
                                 "mode"}
    assert payload.arrays["snapshot"].shape == (1, 1, SIZE, SIZE) and payload.arrays["labels"].shape == (4, CLASSES)
    assert sum(a.nbytes for a in payload.arrays.values()) == SIZE * SIZE * 4 + 4 * CLASSES * 4 + 4
    assert payload.nbytes < 3300 + 300  # arrays plus a header of a few hundred bytes


def test_error_feedback_keeps_the_orthogonal_part():
    env = make_env()
    tau = true_update(env, make_data(2))
    encoding = OSFed(OSFed.Options(**FAST), env).compress(tau, make_ctx(make_data(2)))
    e, g = encoding.residual, encoding.direction
    assert abs(cos(e, g)) < 1e-3
    c = encoding.stats["cos"]
    assert float(e.norm() ** 2) == pytest.approx(float(tau.norm() ** 2) * (1 - c * c), rel=1e-3)
    assert encoding.stats["residual_norm"] == pytest.approx(float(e.norm()))


def test_client_update_stores_residual_and_adds_it_next_round():
    env, server_env = make_env(), make_env()
    options = OSFed.Options(**FAST)
    client, server = OSFed(options, env), OSFed(options, server_env)
    data, state = make_data(3), {}
    start = env.model.vector.clone()
    delta = true_update(env, data)
    result = client.client_update(make_ctx(data, state=state))
    server.server_begin(0)
    scale, g = server.decode(1, Payload.unpack(result.payload.pack()))
    residual = torch.from_numpy(state["residual"])
    assert state["residual"].dtype == np.float32 and residual.shape == (env.model.param_numel,)
    torch.testing.assert_close(residual, delta - scale * g, rtol=0, atol=1e-7)
    assert set(result.stats) == set(OSFed.client_stat_names)
    assert result.stats["local_steps"] == 3 and result.stats["scale"] == scale

    env.model.load_(start)
    stored = state["residual"].copy()
    second = client.client_update(make_ctx(data, round=1, state=state))
    delta1 = true_update(env, data, round=1)
    assert second.stats["tau_norm"] == pytest.approx(float((delta1 + torch.from_numpy(stored)).norm()), rel=1e-5)


def test_error_feedback_off_ignores_the_residual():
    env = make_env()
    state = {"residual": np.ones(env.model.param_numel, dtype=np.float32)}
    result = OSFed(OSFed.Options(error_feedback=False, **FAST), env).client_update(make_ctx(make_data(3), state=state))
    assert np.all(state["residual"] == 1)
    assert result.stats["tau_norm"] == pytest.approx(float(true_update(env, make_data(3)).norm()), rel=1e-5)


def test_segment_steps_limit_local_training():
    env = make_env()
    result = OSFed(OSFed.Options(segment_steps=2, **FAST), env).client_update(make_ctx(make_data(3)))
    assert result.stats["local_steps"] == 2


def test_residual_of_wrong_size_is_an_error():
    env = make_env()
    state = {"residual": np.zeros(5, dtype=np.float32)}
    with pytest.raises(ValueError, match="residual"):
        OSFed(OSFed.Options(**FAST), env).client_update(make_ctx(make_data(3), state=state))


def test_sfc3_equals_osfed_with_factor_one():
    results = []
    for cls, options in ((SFC3, SFC3.Options(**FAST)), (OSFed, OSFed.Options(factor=1, **FAST))):
        env = make_env()
        results.append(cls(options, env).client_update(make_ctx(make_data(4))))
    (a, b) = (r.payload for r in results)
    assert a.meta["algorithm"] == "sfc3" and b.meta["algorithm"] == "osfed"
    assert a.arrays["labels"].shape == (1, CLASSES)
    b.meta["algorithm"] = "sfc3"
    assert a.pack() == b.pack()


# rejection -----------------------------------------------------------------------------------


def test_least_squares_scale_of_zero_direction_is_none():
    assert least_squares_scale(torch.zeros(4), torch.ones(4)) is None
    assert least_squares_scale(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 5.0])) == 3.0


def test_zero_direction_is_rejected_and_residual_keeps_tau(monkeypatch):
    import osfed_hpc.algorithms.osfed as osfed_module

    env = make_env()
    tau = true_update(env, make_data(5))
    monkeypatch.setattr(osfed_module, "synthetic_gradient", lambda model, *args, **kwargs: torch.zeros_like(tau))
    encoding = OSFed(OSFed.Options(**FAST), env).compress(tau, make_ctx(make_data(5)))
    assert "rejected" in encoding.payload.meta and set(encoding.payload.arrays) == {"scale"}
    assert encoding.scale is None and torch.equal(encoding.residual, tau)


def test_non_finite_update_is_rejected_and_residual_kept():
    env, server_env = make_env(), make_env()
    data = make_data(5)
    data.x[0, 0, 0, 0] = float("nan")  # local training diverges
    previous = np.full(env.model.param_numel, 0.01, dtype=np.float32)
    state = {"residual": previous.copy()}
    result = OSFed(OSFed.Options(**FAST), env).client_update(make_ctx(data, client_id=2, state=state))
    assert "rejected" in result.payload.meta and result.stats["scale"] == 0
    assert np.array_equal(state["residual"], previous)
    server = OSFed(OSFed.Options(**FAST), server_env)
    w_t = server_env.model.vector.clone()
    server.server_begin(0)
    with pytest.raises(ValueError, match=r"client 2, round 0.*rejected"):
        server.server_accumulate(2, Payload.unpack(result.payload.pack()), 48.0)
    assert torch.equal(server.server_finish(), w_t)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.meta.update(factor=4),
        lambda p: p.meta.update(round=1),
        lambda p: p.meta.update(algorithm="sfc3"),
        lambda p: p.meta.update(mode="train"),
        lambda p: p.meta.update(codec="png"),
        lambda p: p.meta.update(extra=1),
        lambda p: p.arrays.update(labels=p.arrays["labels"][:3]),
        lambda p: p.arrays.update(snapshot=p.arrays["snapshot"][:, :, :14]),
        lambda p: p.arrays.update(scale=np.array([np.nan], dtype=np.float32)),
        lambda p: p.arrays.update(snapshot=np.full((1, 1, SIZE, SIZE), np.inf, dtype=np.float32)),
        lambda p: p.arrays.pop("labels"),
    ],
    ids=["factor", "round", "algorithm", "mode", "codec", "extra-meta", "labels-shape", "snapshot-shape", "nan-scale",
         "inf-snapshot", "missing-labels"],
)
def test_server_rejects_inconsistent_payload(change):
    env, server_env = make_env(), make_env()
    payload = OSFed(OSFed.Options(**FAST), env).client_update(make_ctx(make_data(6))).payload
    payload = Payload.unpack(payload.pack())
    payload.arrays = dict(payload.arrays)
    change(payload)
    server = OSFed(OSFed.Options(**FAST), server_env)
    w_t = server_env.model.vector.clone()
    server.server_begin(0)
    with pytest.raises(ValueError, match="client 1, round 0"):
        server.server_accumulate(1, Payload.unpack(payload.pack()), 48.0)
    assert torch.equal(server.server_finish(), w_t)


def test_server_rejects_payload_of_another_client():
    env, server_env = make_env(), make_env()
    payload = OSFed(OSFed.Options(**FAST), env).client_update(make_ctx(make_data(6), client_id=1)).payload
    server = OSFed(OSFed.Options(**FAST), server_env)
    server.server_begin(0)
    with pytest.raises(ValueError, match="client 3, round 0: payload client=1"):
        server.server_accumulate(3, payload, 1.0)


# one full round -------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_one_round_moves_the_model_along_the_mean_update(weighting):
    options = OSFed.Options(weighting=weighting, **FAST)
    client_env, server_env = make_env(), make_env(server_lr=0.5)
    client, server = OSFed(options, client_env), OSFed(options, server_env)
    w_t = client_env.model.vector.clone()
    datasets = {k: make_data(10 + k, n=32 + 16 * k) for k in (1, 2, 3)}
    deltas, payloads = {}, {}
    for k, data in datasets.items():
        deltas[k] = true_update(client_env, data, client_id=k)
        client_env.model.load_(w_t)  # what the runner does before every client
        payloads[k] = client.client_update(make_ctx(data, client_id=k)).payload.pack()

    server.server_begin(0)
    expected = torch.zeros(server_env.model.param_numel)
    for k, packed in payloads.items():
        weight = float(datasets[k].num_samples)
        scale, g = server.decode(k, Payload.unpack(packed))
        stats = server.server_accumulate(k, Payload.unpack(packed), weight)
        w = weight if weighting == "samples" else 1.0
        expected += w * scale * g
        assert stats["decoded_norm"] == pytest.approx(float((scale * g).norm()))
    total = sum(float(d.num_samples) for d in datasets.values()) if weighting == "samples" else 3.0
    new = server.server_finish()
    assert torch.equal(server_env.model.vector, w_t)  # the hooks do not touch the server replica
    step = (new - w_t)[: server_env.model.param_numel]
    torch.testing.assert_close(step, 0.5 * expected / total)
    mean_delta = sum(deltas.values()) / 3
    assert cos(step, mean_delta) > 0.2


def test_local_momentum_with_a_snapshot_method_is_warned_about():
    from dataclasses import replace as _replace

    from osfed_hpc.algorithms.osfed import OSFed
    from osfed_hpc.algorithms.sfc3 import SFC3
    from osfed_hpc.config import TrainConfig

    for cls in (OSFed, SFC3):
        warnings = cls.config_warnings(cls.Options(), _replace(TrainConfig(), momentum=0.9))
        assert len(warnings) == 1 and "train.momentum=0.9" in warnings[0] and cls.name in warnings[0]
        assert cls.config_warnings(cls.Options(), _replace(TrainConfig(), momentum=0.0)) == []
