"""Top-k + error feedback and RandTopk: exact wire bytes, which entries are sent, what stays in the
residual, the sampling distribution of RandTopk, the server fold and its checks."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from osfed_hpc.algorithms import ClientContext, Environment, get_algorithm
from osfed_hpc.algorithms.error_feedback import RESIDUAL
from osfed_hpc.algorithms.fedavg import FedAvg
from osfed_hpc.algorithms.topk import RandTopK, TopK, gumbel_top_k, keep_count, top_indices
from osfed_hpc.config import TrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

TRAIN = replace(TrainConfig(), lr=0.1, momentum=0.0, local_steps=3, batch_size=8)


def _env(model: FlatModel, train=TRAIN, num_clients: int = 4) -> Environment:
    return Environment(model=model, train=train, num_classes=10, input_shape=(1, 8, 8),
                       device=torch.device("cpu"), seed=0, num_clients=num_clients)


def _model(name: str = "cnn") -> FlatModel:
    return FlatModel(build_model(name, 1, 8, 10, seed=3))


def _bn_model() -> FlatModel:
    """A small model with float buffers (BatchNorm running statistics) in its trainable vector."""
    torch.manual_seed(5)
    return FlatModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10)))


def _vector_model(size: int) -> FlatModel:
    """One parameter tensor of ``size`` entries: for testing the selection alone."""
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(size))
    return FlatModel(module)


def _data(seed: int, n: int = 24) -> TensorClientData:
    g = torch.Generator().manual_seed(seed)
    return TensorClientData(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _ctx(client: int, round_: int, state: dict, seed: int, data_seed: int = 0) -> ClientContext:
    return ClientContext(client, round_, _data(data_seed + client), state, torch.Generator().manual_seed(seed), 0)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


def _expected_k(sizes: list[int], rate: float) -> int:
    return sum(max(1, math.floor(round(rate * d, 9))) for d in sizes)


def _dense(payload: Payload, numel: int) -> torch.Tensor:
    out = torch.zeros(numel)
    index = torch.from_numpy(payload.arrays["indices"].astype(np.int64))
    out[index] = torch.from_numpy(payload.arrays["values"].copy())
    return out


# wire bytes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TopK, RandTopK])
@pytest.mark.parametrize("model_name, rate", [("cnn", 0.01), ("cnn", 0.05), ("mlp", 0.01), ("mlp", 0.3)])
def test_packed_size_is_exactly_the_layout_formula(cls, model_name, rate):
    model = _model(model_name)
    algo = cls(cls.Options(rate=rate), _env(model))
    k = _expected_k(model.tensor_sizes, rate)
    assert algo.num_kept == k and algo.array_bytes == 8 * k
    result = algo.client_update(_ctx(3, 7, {}, seed=1))
    payload = result.payload
    assert payload.arrays["values"].dtype == np.float32 and payload.arrays["values"].shape == (k,)
    assert payload.arrays["indices"].dtype == np.int32 and payload.arrays["indices"].shape == (k,)
    assert payload.meta == {"algorithm": cls.name, "round": 7, "client": 3, "rate": rate}
    # the Payload layout: prefix (4 s magic, u16, u16, u32 = 12 bytes) + JSON header, padded to 8;
    # values (4 K bytes) padded to 8; indices (4 K bytes), the last array, unpadded
    header = json.dumps({"meta": payload.meta, "arrays": [["values", "float32", [k], 0],
                                                          ["indices", "int32", [k], _aligned(4 * k)]]},
                        separators=(",", ":")).encode()
    formula = _aligned(12 + len(header)) + _aligned(4 * k) + 4 * k
    assert payload.packed_size() == formula == len(payload.pack())
    assert algo.packed_size(7, 3) == formula
    # the hint is the same formula for the longest header of the run: exact arrays, at most a few
    # 8-byte blocks of header more
    hint = algo.payload_size_hint()
    assert formula <= hint <= formula + 16
    assert hint - 8 * k - 12 <= 200  # everything but the 8 K array bytes is a small header


def test_keep_count_reads_the_rate_as_written():
    assert keep_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in binary floats
    assert keep_count(0.01, 99) == 1 and keep_count(0.01, 10) == 1 and keep_count(0.01, 250) == 2
    assert keep_count(1.0, 17) == 17 and keep_count(1, 17) == 17


# which entries are sent ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_topk_selects_exactly_the_largest_per_tensor(model_name):
    model = _model(model_name)
    algo = TopK(TopK.Options(rate=0.05), _env(model))
    tau = torch.randn(model.numel, generator=torch.Generator().manual_seed(0))
    indices = algo.select(tau, torch.Generator().manual_seed(0))
    assert torch.all(indices[1:] > indices[:-1])
    start = 0
    for size, k in zip(model.tensor_sizes, algo.keep_counts):
        piece = tau[start : start + size].abs()
        mine = indices[(indices >= start) & (indices < start + size)] - start
        assert mine.numel() == k
        expected = torch.argsort(piece, descending=True, stable=True)[:k].sort().values
        assert torch.equal(mine, expected)
        if k < size:
            others = torch.ones(size, dtype=torch.bool)
            others[mine] = False
            assert piece[mine].min() > piece[others].max()
        start += size


def test_topk_ties_go_to_the_lowest_indices():
    magnitude = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    assert top_indices(magnitude, 3).tolist() == [1, 2, 3]
    assert top_indices(magnitude, 1).tolist() == [1]
    assert top_indices(torch.zeros(10), 4).tolist() == [0, 1, 2, 3]
    assert top_indices(magnitude, 7).tolist() == list(range(7))
    assert top_indices(magnitude, 9).tolist() == list(range(7))


def test_rate_one_sends_everything_and_keeps_no_residual():
    model = _bn_model()
    algo = RandTopK(RandTopK.Options(rate=1.0, alpha=0.5), _env(model))
    state: dict = {}
    result = algo.client_update(_ctx(0, 1, state, seed=4))
    assert np.array_equal(result.payload.arrays["indices"], np.arange(model.numel, dtype=np.int32))
    assert result.stats["kept_fraction"] == 1.0 and result.stats["residual_norm"] == 0.0
    assert not state[RESIDUAL].any()


# error feedback ------------------------------------------------------------------------------------
def _fedavg_update(start: torch.Tensor, model: FlatModel, client: int, round_: int, seed: int) -> torch.Tensor:
    """Delta of one client's local training from ``start`` (FedAvg sends exactly that)."""
    model.load_(start)
    result = FedAvg(FedAvg.Options(), _env(model)).client_update(_ctx(client, round_, {}, seed))
    return torch.from_numpy(result.payload.arrays["update"].copy())


@pytest.mark.parametrize("make_model", [_model, _bn_model], ids=["cnn", "batchnorm"])
def test_error_feedback_keeps_what_was_not_sent_and_adds_it_next_round(make_model):
    model = make_model()
    start = model.vector.clone()
    reference = make_model()
    algo = TopK(TopK.Options(rate=0.05), _env(model))
    state: dict = {}
    delta1 = _fedavg_update(start, reference, 2, 1, seed=11)
    model.load_(start)
    first = algo.client_update(_ctx(2, 1, state, seed=11))
    sent1 = _dense(first.payload, model.numel)
    # what was sent is tau = Delta at its top entries; everything else stays in the residual
    expected_idx = algo.select(delta1, torch.Generator())
    assert np.array_equal(first.payload.arrays["indices"], expected_idx.numpy().astype(np.int32))
    assert np.array_equal(first.payload.arrays["values"], delta1[expected_idx].numpy())
    residual1 = torch.from_numpy(state[RESIDUAL].copy())
    assert torch.equal(residual1 + sent1, delta1)
    assert torch.equal(residual1[expected_idx], torch.zeros(expected_idx.numel()))
    assert first.stats["kept_fraction"] == pytest.approx(float(sent1.norm() ** 2 / delta1.norm() ** 2), rel=1e-5)
    assert first.stats["residual_norm"] == pytest.approx(float(residual1.norm()), rel=1e-6)
    assert 0 < first.stats["kept_fraction"] < 1

    # round 2 compresses tau = Delta_2 + e_1
    delta2 = _fedavg_update(start, reference, 2, 2, seed=12)
    model.load_(start)
    second = algo.client_update(_ctx(2, 2, state, seed=12))
    tau2 = delta2 + residual1
    idx2 = algo.select(tau2, torch.Generator())
    assert np.array_equal(second.payload.arrays["indices"], idx2.numpy().astype(np.int32))
    assert np.array_equal(second.payload.arrays["values"], tau2[idx2].numpy())
    residual2 = torch.from_numpy(state[RESIDUAL].copy())
    assert torch.equal(residual2 + _dense(second.payload, model.numel), tau2)
    # nothing is lost, only delayed: sent_1 + sent_2 + e_2 = Delta_1 + Delta_2
    torch.testing.assert_close(sent1 + _dense(second.payload, model.numel) + residual2, delta1 + delta2)

    # without error feedback no residual is kept and round 2 compresses Delta_2 alone
    plain = TopK(TopK.Options(rate=0.05, error_feedback=False), _env(model))
    plain_state: dict = {}
    model.load_(start)
    plain.client_update(_ctx(2, 1, plain_state, seed=11))
    model.load_(start)
    result = plain.client_update(_ctx(2, 2, plain_state, seed=12))
    assert RESIDUAL not in plain_state
    assert np.array_equal(result.payload.arrays["values"], delta2[plain.select(delta2, torch.Generator())].numpy())


def test_diverged_update_is_refused_and_keeps_the_old_residual():
    model = _model()
    algo = TopK(TopK.Options(rate=0.05), _env(model))
    state = {RESIDUAL: np.full(model.numel, 0.5, dtype=np.float32)}
    tau = torch.zeros(model.numel)
    tau[3] = float("nan")
    payload, residual, stats = algo.compress(tau, _ctx(1, 4, state, seed=0))
    assert residual is None and math.isnan(stats["kept_fraction"])
    algo.error_feedback.keep(state, residual)
    assert (state[RESIDUAL] == 0.5).all()
    algo.server_begin(4)
    with pytest.raises(ValueError, match="client 1, round 4.*NaN"):
        algo.server_accumulate(1, Payload.unpack(payload.pack()), 3.0)


# RandTopk ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_randtopk_draws_k_distinct_indices_per_tensor_deterministically(model_name):
    model = _model(model_name)
    algo = RandTopK(RandTopK.Options(rate=0.05, alpha=0.3), _env(model))
    tau = torch.randn(model.numel, generator=torch.Generator().manual_seed(1))
    indices = algo.select(tau, torch.Generator().manual_seed(7))
    assert torch.all(indices[1:] > indices[:-1])  # sorted, hence distinct
    assert indices.min() >= 0 and indices.max() < model.numel
    bounds = torch.tensor(np.cumsum([0, *model.tensor_sizes]))
    counts = torch.diff(torch.searchsorted(indices, bounds))
    assert counts.tolist() == algo.keep_counts
    assert torch.equal(indices, algo.select(tau, torch.Generator().manual_seed(7)))
    assert not torch.equal(indices, algo.select(tau, torch.Generator().manual_seed(8)))
    assert not torch.equal(indices, TopK(TopK.Options(rate=0.05), _env(model)).select(tau, torch.Generator()))


def test_randtopk_client_update_is_deterministic_for_a_fixed_generator():
    model = _model()
    start = model.vector.clone()
    algo = RandTopK(RandTopK.Options(rate=0.05, alpha=0.5), _env(model))
    payloads = []
    for _ in range(2):
        model.load_(start)
        payloads.append(algo.client_update(_ctx(1, 3, {}, seed=21)).payload.pack())
    assert payloads[0] == payloads[1]


def test_randtopk_prefers_the_top_set_with_the_without_replacement_probabilities():
    d, rate, alpha, draws = 20, 0.25, 0.5, 4000
    model = _vector_model(d)
    algo = RandTopK(RandTopK.Options(rate=rate, alpha=alpha), _env(model))
    k = algo.keep_counts[0]
    assert k == 5
    tau = torch.linspace(-1.0, 1.0, d) ** 3 + 0.01 * torch.arange(d)  # distinct magnitudes
    top = set(top_indices(tau.abs(), k).tolist())
    generator = torch.Generator().manual_seed(123)
    freq = torch.zeros(d)
    for _ in range(draws):
        chosen = algo.select(tau, generator)
        assert chosen.numel() == k and len(set(chosen.tolist())) == k
        freq[chosen] += 1
    freq /= draws
    inside = torch.tensor([i in top for i in range(d)])
    assert freq[inside].min() > freq[~inside].max()
    assert freq.sum().item() == pytest.approx(k)
    # the same inclusion frequencies as sequential sampling without replacement (torch.multinomial)
    probs = torch.where(inside, (1 - alpha) / k, alpha / (d - k)).double()
    reference = torch.zeros(d)
    g = torch.Generator().manual_seed(321)
    for _ in range(draws):
        reference[torch.multinomial(probs, k, replacement=False, generator=g)] += 1
    reference /= draws
    assert torch.allclose(freq, reference, atol=0.04)
    # exact inclusion probabilities: the draw is a sequence of k picks, each of a top entry with
    # probability (top left) * p_top / (mass left); a dynamic program over (top, other) picks so far
    p_top, p_other = (1 - alpha) / k, alpha / (d - k)
    paths = {(0, 0): 1.0}
    for _ in range(k):
        step: dict = {}
        for (i, j), p in paths.items():
            top_mass, other_mass = (k - i) * p_top, (d - k - j) * p_other
            step[(i + 1, j)] = step.get((i + 1, j), 0.0) + p * top_mass / (top_mass + other_mass)
            step[(i, j + 1)] = step.get((i, j + 1), 0.0) + p * other_mass / (top_mass + other_mass)
        paths = step
    top_inclusion = sum(p * i for (i, _), p in paths.items()) / k
    other_inclusion = (k - top_inclusion * k) / (d - k)
    assert top_inclusion > 2 * other_inclusion
    assert float(freq[inside].mean()) == pytest.approx(top_inclusion, abs=0.015)
    assert float(freq[~inside].mean()) == pytest.approx(other_inclusion, abs=0.01)


def test_gumbel_top_k_never_draws_zero_probability_categories():
    log_probs = torch.full((50,), -math.inf, dtype=torch.float64)
    allowed = torch.tensor([3, 9, 17, 40])
    log_probs[allowed] = 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert gumbel_top_k(log_probs, 4, g).tolist() == allowed.tolist()
        assert set(gumbel_top_k(log_probs, 2, g).tolist()) <= set(allowed.tolist())


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_randtopk_with_alpha_zero_is_topk(model_name):
    model = _model(model_name)
    start = model.vector.clone()
    rand = RandTopK(RandTopK.Options(rate=0.02, alpha=0.0), _env(model))
    plain = TopK(TopK.Options(rate=0.02), _env(model))
    tau = torch.randn(model.numel, generator=torch.Generator().manual_seed(2))
    for seed in range(3):
        assert torch.equal(rand.select(tau, torch.Generator().manual_seed(seed)), plain.select(tau, torch.Generator()))
    results = []
    for algo in (rand, plain):
        model.load_(start)
        results.append(algo.client_update(_ctx(0, 1, {}, seed=5)).payload)
    for name in ("values", "indices"):
        assert np.array_equal(results[0].arrays[name], results[1].arrays[name])


# server ----------------------------------------------------------------------------------------------
def _payload(algo: TopK, client: int, round_: int, tau: torch.Tensor) -> Payload:
    indices = algo.select(tau, torch.Generator().manual_seed(client))
    return Payload(meta=algo.header(round_, client),
                   arrays={"values": tau[indices].numpy(), "indices": indices.numpy().astype(np.int32)})


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
@pytest.mark.parametrize("cls", [TopK, RandTopK])
def test_server_fold_is_the_weighted_mean_of_the_sparse_updates(cls, weighting):
    model = _model()
    start = model.vector.clone()
    algo = cls(cls.Options(rate=0.1, weighting=weighting), _env(model))
    weights = {0: 7.0, 2: 19.0, 3: 30.0}
    algo.server_begin(5)
    expected = torch.zeros(model.numel, dtype=torch.float64)
    total = 0.0
    for client, samples in weights.items():
        tau = torch.randn(model.numel, generator=torch.Generator().manual_seed(100 + client))
        payload = Payload.unpack(_payload(algo, client, 5, tau).pack())  # read-only views, as the runner passes
        assert algo.server_accumulate(client, payload, samples) == {}
        w = samples if weighting == "samples" else 1.0
        expected += w * _dense(payload, model.numel).double()
        total += w
    new = algo.server_finish()
    torch.testing.assert_close(new, start + (expected / total).float(), rtol=1e-6, atol=1e-7)
    assert torch.equal(model.vector, start)  # the server's W_t is not modified in place


def test_server_without_payloads_keeps_the_model():
    model = _model()
    algo = TopK(TopK.Options(), _env(model))
    algo.server_begin(1)
    assert torch.equal(algo.server_finish(), model.vector)


def _damage(kind: str, payload: Payload, algo: TopK) -> Payload:
    values = payload.arrays["values"].copy()
    indices = payload.arrays["indices"].copy()
    meta = dict(payload.meta)
    if kind == "duplicate":
        indices[5] = indices[4]
    elif kind == "out_of_range":
        indices[-1] = algo.env.model.numel
    elif kind == "negative":
        indices[0] = -1
    elif kind == "unsorted":
        indices[[3, 4]] = indices[[4, 3]]
    elif kind == "wrong_tensor":  # right K, sorted, unique, but one tensor short and another long
        free = np.setdiff1d(np.arange(algo.offsets[1]), indices)
        indices = np.sort(np.concatenate([indices[indices != indices[-1]], free[:1]])).astype(np.int32)
    elif kind == "fewer":
        values, indices = values[:-1], indices[:-1]
    elif kind == "more":
        values, indices = np.append(values, 1.0).astype(np.float32), np.append(indices, 0).astype(np.int32)
    elif kind == "nan":
        values[2] = np.nan
    elif kind == "inf":
        values[2] = -np.inf
    elif kind == "float64_values":
        values = values.astype(np.float64)
    elif kind == "int64_indices":
        indices = indices.astype(np.int64)
    elif kind == "missing_array":
        return Payload(meta=meta, arrays={"values": values})
    elif kind == "extra_array":
        return Payload(meta=meta, arrays={"values": values, "indices": indices, "scale": np.ones(1, np.float32)})
    elif kind == "wrong_rate":
        meta["rate"] = 0.5
    elif kind == "wrong_algorithm":
        meta["algorithm"] = "fedavg"
    elif kind == "rejected":
        meta["rejected"] = "diverged"
    else:
        raise AssertionError(kind)
    return Payload(meta=meta, arrays={"values": values, "indices": indices})


DAMAGES = ["duplicate", "out_of_range", "negative", "unsorted", "wrong_tensor", "fewer", "more", "nan", "inf",
           "float64_values", "int64_indices", "missing_array", "extra_array", "wrong_rate", "wrong_algorithm",
           "rejected"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_payloads_are_rejected_naming_client_and_round(kind):
    model = _model()
    algo = RandTopK(RandTopK.Options(rate=0.05), _env(model))
    tau = torch.randn(model.numel, generator=torch.Generator().manual_seed(9))
    good = _payload(algo, 3, 6, tau)
    algo.server_begin(6)
    with pytest.raises(ValueError, match="client 3, round 6"):
        algo.server_accumulate(3, Payload.unpack(_damage(kind, good, algo).pack()), 10.0)
    # a rejected payload leaves no trace in the fold; a good one still counts
    algo.server_accumulate(3, Payload.unpack(good.pack()), 10.0)
    torch.testing.assert_close(algo.server_finish(), model.vector + _dense(good, model.numel))


def test_update_guard_rejects_an_absurd_sparse_update():
    model = _model()
    algo = TopK(TopK.Options(rate=0.05), _env(model))
    tau = torch.randn(model.numel, generator=torch.Generator().manual_seed(4))
    good = _payload(algo, 1, 2, tau)
    assert float(np.linalg.norm(good.arrays["values"])) < 100
    algo.env.update_guard.begin_round(1.0)  # reference norm 1: more than 100x is refused
    algo.server_begin(2)
    huge = Payload(meta=good.meta, arrays={"values": good.arrays["values"] * np.float32(1e6),
                                           "indices": good.arrays["indices"]})
    with pytest.raises(ValueError, match="client 1, round 2"):
        algo.server_accumulate(1, Payload.unpack(huge.pack()), 5.0)
    algo.server_accumulate(1, Payload.unpack(good.pack()), 5.0)
    torch.testing.assert_close(algo.server_finish(), model.vector + _dense(good, model.numel))


# options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"rate": 0}, {"rate": 0.0}, {"rate": -0.1}, {"rate": 1.5}, {"rate": float("nan")}, {"rate": "0.1"},
    {"rate": True}, {"error_feedback": "yes"}, {"error_feedback": 1}, {"weighting": "median"},
])
@pytest.mark.parametrize("cls", [TopK, RandTopK])
def test_invalid_options_are_refused(cls, options):
    key = next(iter(options))
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        cls(cls.Options(**options), _env(_model()))


@pytest.mark.parametrize("alpha", [-0.1, 1.01, float("inf"), "0.1", None])
def test_invalid_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="algorithm.alpha"):
        RandTopK.Options(alpha=alpha).validate()
    for ok in (0, 0.0, 0.5, 1, 1.0):
        RandTopK.Options(alpha=ok).validate()
    assert not hasattr(TopK.Options(), "alpha")


def test_registered_names_and_config_options():
    from osfed_hpc.config import ConfigError, config_from_dict

    assert get_algorithm("topk") is TopK and get_algorithm("randtopk") is RandTopK
    config = config_from_dict({"algorithm": {"name": "randtopk", "rate": 0.05}})
    assert config.algorithm == {"name": "randtopk", "rate": 0.05, "error_feedback": True,
                                "weighting": "samples", "alpha": 0.1}
    with pytest.raises(ConfigError, match="algorithm.rate"):
        config_from_dict({"algorithm": {"name": "topk", "rate": 2.0}})
    with pytest.raises(ConfigError):
        config_from_dict({"algorithm": {"name": "topk", "alpha": 0.2}})  # topk has no alpha


def test_int32_index_limit_is_checked():
    class Huge:
        numel = 2**31
        tensor_sizes = [2**31]

    with pytest.raises(ValueError, match="int32"):
        TopK(TopK.Options(), _env(Huge()))
