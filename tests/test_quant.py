"""Stochastic uniform quantization (``quant``) and FedMPQ-lite (``fedmpq_lite``): bit packing,
unbiased rounding, exact payload bytes, error feedback, decode against a hand computation, the
server's width allocation and its downlink, and refusal of damaged payloads."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms import get_algorithm
from osfed_hpc.algorithms.base import ClientContext, Environment, ReceivedMessage
from osfed_hpc.algorithms.fedmpq import SENSITIVITY, FedMPQLite, allocate_bits, bits_digest
from osfed_hpc.algorithms.local_training import local_sgd
from osfed_hpc.algorithms.quant import Quant, dequantize, pack_codes, quantize, unpack_codes
from osfed_hpc.config import TrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

SIZE, CLASSES = 8, 10


def make_env(num_clients: int = 3, seed: int = 0) -> Environment:
    train = dataclasses.replace(TrainConfig(), lr=0.05, momentum=0.0, batch_size=16)
    return Environment(model=FlatModel(build_model("cnn", 1, SIZE, CLASSES, seed=seed)), train=train,
                       num_classes=CLASSES, input_shape=(1, SIZE, SIZE), device=torch.device("cpu"), seed=seed,
                       num_clients=num_clients)


def make_data(seed: int, n: int = 40) -> TensorClientData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIZE, SIZE, generator=gen)
    return TensorClientData(x, torch.randint(0, CLASSES, (n,), generator=gen))


def make_ctx(client_id: int, round: int = 1, state=None, message=None) -> ClientContext:
    return ClientContext(client_id=client_id, round=round, data=make_data(client_id),
                         state={} if state is None else state,
                         generator=torch.Generator().manual_seed(1000 * round + client_id), seed=0, message=message)


def true_update(env: Environment, client_id: int, round: int = 1) -> torch.Tensor:
    """Delta from the very local training the client runs (same data, same generator seed)."""
    start = env.model.vector.clone()
    ctx = make_ctx(client_id, round)
    local_sgd(env.model, ctx.data, env.train, ctx.generator, env.train.lr)
    delta = env.model.vector - start
    env.model.load_(start)
    return delta


def hand_decode(payload: Payload, sizes: list[int], bits: list[int]) -> torch.Tensor:
    """Decode a payload without the module: read the bit stream MSB first, value by value."""
    stream = np.unpackbits(np.asarray(payload.arrays["codes"]))
    out, bit = [], 0
    for l, (d, b) in enumerate(zip(sizes, bits)):
        lo, hi = np.float32(payload.arrays["lo"][l]), np.float32(payload.arrays["hi"][l])
        step = np.float32((hi - lo) / np.float32(2**b - 1))
        for _ in range(d):
            code = int("".join(map(str, stream[bit : bit + b])), 2)
            out.append(np.float32(lo + np.float32(code) * step))
            bit += b
    assert not stream[bit:].any()
    return torch.tensor(np.array(out, dtype=np.float32))


def received(message, round: int = 1) -> ReceivedMessage:
    """A ServerMessage as a worker receives it: every part through pack/unpack."""
    return ReceivedMessage(round=round, model=message.model,
                           common=None if message.common is None else Payload.unpack(message.common.pack()),
                           per_client={c: Payload.unpack(p.pack()) for c, p in message.per_client.items()})


def aligned(n: int) -> int:
    return (n + 7) // 8 * 8


def formula_bytes(meta: dict, count_bits: int, tensors: int) -> int:
    """prefix 12 + header, aligned 8; codes ceil(bits / 8), aligned 8; lo 4 L, aligned 8; hi 4 L."""
    codes = math.ceil(count_bits / 8)
    entries = [["codes", "uint8", [codes], 0], ["lo", "float32", [tensors], aligned(codes)],
               ["hi", "float32", [tensors], aligned(codes) + aligned(4 * tensors)]]
    header = json.dumps({"meta": meta, "arrays": entries}, separators=(",", ":")).encode()
    return aligned(12 + len(header)) + aligned(codes) + aligned(4 * tensors) + 4 * tensors


# bit packing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 3, 7, 9, 13, 1001])
def test_pack_unpack_round_trip(bits, count):
    codes = np.random.default_rng(bits * 100 + count).integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (math.ceil(count * bits / 8),)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_pack_is_msb_first_one_stream():
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 3], np.uint8), 3), [0b00101001, 0b10000000])


def test_variable_width_round_trip_across_chunks(monkeypatch):
    import osfed_hpc.algorithms.quant as quant

    monkeypatch.setattr(quant, "CHUNK", 5)  # chunk boundaries inside tensors and bytes
    sizes, bits = [3, 11, 1, 8, 17], [3, 1, 8, 5, 7]
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, 2**b, d) for d, b in zip(sizes, bits)]).astype(np.uint8)
    packed = pack_codes(codes, bits, sizes)
    assert packed.size == math.ceil(sum(d * b for d, b in zip(sizes, bits)) / 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, sum(sizes), sizes), codes)
    # the same widths everywhere give the single-width stream
    np.testing.assert_array_equal(pack_codes(codes % 8, [3] * 5, sizes), pack_codes(codes % 8, 3))


def test_unpack_refuses_wrong_length_and_padding():
    packed = pack_codes(np.array([1, 2, 3], np.uint8), 3)
    with pytest.raises(ValueError, match="expected uint8"):
        unpack_codes(packed[:1], 3, 3)
    with pytest.raises(ValueError, match="expected uint8"):
        unpack_codes(packed.astype(np.int8), 3, 3)
    bad = packed.copy()
    bad[-1] |= 1
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(bad, 3, 3)
    with pytest.raises(ValueError, match="fit"):
        pack_codes(np.array([8], np.uint8), 3)


# quantization ------------------------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    sizes, bits, draws = [25, 15], 2, 4000
    # 4000 independent draws in one call: the same two tensors repeated, each on its own grid
    q = quantize(x.repeat(draws), sizes * draws, bits, torch.Generator().manual_seed(1))
    decoded = dequantize(q.codes, q.lo, q.hi, sizes * draws, bits).reshape(draws, 40).double()
    np.testing.assert_array_equal(q.lo.reshape(draws, 2), np.broadcast_to(q.lo[:2], (draws, 2)))
    steps = torch.repeat_interleave(torch.stack([p.max() - p.min() for p in x.split(sizes)]) / 3, torch.tensor(sizes))
    # std of a mean of 4000 draws is at most step / (2 sqrt(4000)) ~ 0.008 step; allow 5 sigma
    assert ((decoded.mean(0) - x.double()).abs() <= 0.04 * steps.double() + 1e-6).all()
    # and rounding really is random: values between grid points take both neighbours
    assert len(np.unique(q.codes.reshape(draws, 40)[:, 0])) == 2


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_quantization_error_is_below_one_step_and_constant_tensor_is_exact(bits):
    x = torch.cat([torch.randn(50, generator=torch.Generator().manual_seed(bits)), torch.full((7,), 0.25)])
    sizes = [50, 7]
    q = quantize(x, sizes, bits, torch.Generator().manual_seed(0))
    decoded = dequantize(q.codes, q.lo, q.hi, sizes, bits)
    step = (q.hi[0] - q.lo[0]) / (2**bits - 1)
    assert (decoded[:50] - x[:50]).abs().max() <= step * (1 + 1e-5)
    assert int(q.codes.max()) <= 2**bits - 1
    np.testing.assert_array_equal(q.codes[50:], 0)
    assert torch.equal(decoded[50:], x[50:])


def test_per_tensor_bits():
    x = torch.randn(30, generator=torch.Generator().manual_seed(0))
    q = quantize(x, [10, 20], [1, 8], torch.Generator().manual_seed(0))
    assert int(q.codes[:10].max()) <= 1 and int(q.codes[10:].max()) > 1


# quant: options, bytes, decode, error feedback ---------------------------------------------------


def test_registry_and_defaults():
    assert get_algorithm("quant") is Quant and get_algorithm("fedmpq_lite") is FedMPQLite
    assert Quant.Options().bits == 4 and FedMPQLite.Options().budget == 4.0
    assert Quant.client_stat_names[:2] == FedMPQLite.client_stat_names[:2] == ("train_loss", "local_steps")


@pytest.mark.parametrize("key, value", [("bits", 0), ("bits", 9), ("bits", 2.5), ("bits", True),
                                        ("error_feedback", "yes"), ("weighting", "median")])
def test_quant_validate_names_the_bad_key(key, value):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        Quant.Options(**{key: value}).validate()


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_quant_payload_bytes_match_formula(bits):
    env = make_env()
    algo = Quant(Quant.Options(bits=bits), env)
    result = algo.client_update(make_ctx(2, round=17))
    payload = result.payload
    n, tensors = env.model.numel, len(env.model.tensor_sizes)
    assert payload.arrays["codes"].shape == (math.ceil(n * bits / 8),)
    meta = {"algorithm": "quant", "round": 17, "client": 2, "bits": bits}
    assert payload.meta == meta
    assert payload.packed_size() == len(payload.pack()) == formula_bytes(meta, n * bits, tensors)
    hint = algo.payload_size_hint()
    assert payload.packed_size() <= hint <= payload.packed_size() + 16
    assert hint == formula_bytes({**meta, "round": 9999999, "client": 9999999}, n * bits, tensors)


def test_quant_server_fold_equals_hand_computation():
    client_env, server_env = make_env(), make_env()
    start = server_env.model.vector.clone()
    client = Quant(Quant.Options(bits=3, weighting="samples"), client_env)
    server = Quant(Quant.Options(bits=3, weighting="samples"), server_env)
    sizes = client_env.model.tensor_sizes
    server.server_begin(1)
    decoded, weights = [], [40.0, 10.0]
    for cid, weight in zip([0, 1], weights):
        client_env.model.load_(start)
        payload = Payload.unpack(client.client_update(make_ctx(cid)).payload.pack())
        decoded.append(hand_decode(payload, sizes, [3] * len(sizes)))
        assert server.server_accumulate(cid, payload, weight) == {}
    expected = start + (weights[0] * decoded[0] + weights[1] * decoded[1]) / sum(weights)
    torch.testing.assert_close(server.server_finish(), expected, rtol=0, atol=1e-6)


def test_quant_uniform_weighting():
    env = make_env()
    algo = Quant(Quant.Options(weighting="uniform"), env)
    start = env.model.vector.clone()
    payloads = []
    for cid in (0, 1):
        env.model.load_(start)
        payloads.append(algo.client_update(make_ctx(cid)).payload)
    env.model.load_(start)
    algo.server_begin(1)
    decoded = []
    for cid, (payload, weight) in enumerate(zip(payloads, [1.0, 99.0])):
        algo.server_accumulate(cid, payload, weight)
        decoded.append(hand_decode(payload, env.model.tensor_sizes, [4] * len(env.model.tensor_sizes)))
    torch.testing.assert_close(algo.server_finish(), start + (decoded[0] + decoded[1]) / 2, rtol=0, atol=1e-6)


def test_error_feedback_keeps_the_rounding_error_and_adds_it_next_round():
    env = make_env()
    algo = Quant(Quant.Options(bits=2), env)
    sizes, bits = env.model.tensor_sizes, [2] * len(env.model.tensor_sizes)
    start = env.model.vector.clone()
    state: dict[str, np.ndarray] = {}
    delta1 = true_update(env, 1, round=1)
    result = algo.client_update(make_ctx(1, round=1, state=state))
    residual1 = torch.from_numpy(state["residual"].copy())
    torch.testing.assert_close(residual1, delta1 - hand_decode(result.payload, sizes, bits), rtol=0, atol=1e-6)
    assert result.stats["residual_norm"] == pytest.approx(float(residual1.norm()), rel=1e-5)
    assert result.stats["quant_error"] == pytest.approx(float(residual1.norm() / delta1.norm()), rel=1e-4)
    env.model.load_(start)
    delta2 = true_update(env, 1, round=2)
    result2 = algo.client_update(make_ctx(1, round=2, state=state))
    tau2 = delta2 + residual1
    torch.testing.assert_close(torch.from_numpy(state["residual"]), tau2 - hand_decode(result2.payload, sizes, bits),
                               rtol=0, atol=1e-6)


def test_without_error_feedback_nothing_is_kept():
    env = make_env()
    state: dict[str, np.ndarray] = {}
    result = Quant(Quant.Options(error_feedback=False), env).client_update(make_ctx(0, state=state))
    assert "residual" not in state and result.stats["residual_norm"] > 0


def test_diverged_client_sends_a_rejection_and_keeps_its_residual():
    env = make_env()
    algo = Quant(Quant.Options(), env)
    state = {"residual": np.zeros(env.model.numel, np.float32)}
    state["residual"][3] = np.inf  # tau = Delta + e is not finite
    result = algo.client_update(make_ctx(0, state=state))
    assert "rejected" in result.payload.meta and math.isnan(result.stats["quant_error"])
    assert np.isinf(state["residual"][3])  # untouched
    algo.server_begin(1)
    with pytest.raises(ValueError, match="rejected"):
        algo.server_accumulate(0, Payload.unpack(result.payload.pack()), 1.0)


# damaged payloads ------------------------------------------------------------------------------


def _good_payload(algo, cid=0, round=1, message=None):
    return algo.client_update(make_ctx(cid, round=round, message=message)).payload


def _damaged(payload: Payload) -> dict[str, Payload]:
    arrays, meta = payload.arrays, payload.meta
    codes, lo, hi = arrays["codes"], arrays["lo"], arrays["hi"]

    def with_(**changes):
        return Payload(meta=dict(meta), arrays={**arrays, **changes})

    nan_lo, inf_hi, swapped, huge = lo.copy(), hi.copy(), lo.copy(), lo.copy()
    nan_lo[0] = np.nan
    inf_hi[1] = np.inf
    swapped[2] = hi[2] + 1
    huge[0], huge_hi = -3e38, hi.copy()
    huge_hi[0] = 3e38
    return {
        "codes dtype": with_(codes=codes.astype(np.int8)),
        "codes short": with_(codes=codes[:-1].copy()),
        "codes long": with_(codes=np.concatenate([codes, np.zeros(8, np.uint8)])),
        "lo dtype": with_(lo=lo.astype(np.float64)),
        "hi shape": with_(hi=hi[:-1].copy()),
        "missing": Payload(meta=dict(meta), arrays={"codes": codes, "lo": lo}),
        "extra": with_(more=np.zeros(1, np.float32)),
        "nan lo": with_(lo=nan_lo),
        "inf hi": with_(hi=inf_hi),
        "lo > hi": with_(lo=swapped),
        "range overflows": with_(lo=huge, hi=huge_hi),
        "wrong algorithm": Payload(meta={**meta, "algorithm": "fedavg"}, arrays=dict(arrays)),
        "extra meta": Payload(meta={**meta, "note": 1}, arrays=dict(arrays)),
    }


@pytest.mark.parametrize("name", ["quant", "fedmpq_lite"])
def test_damaged_payloads_raise_value_error(name):
    env = make_env()
    if name == "quant":
        algo = Quant(Quant.Options(bits=3), env)
        payload = _good_payload(algo)
    else:
        algo = FedMPQLite(FedMPQLite.Options(budget=3.0), env)
        payload = _good_payload(algo, message=received(algo.server_message(1)))
    cases = _damaged(payload)
    if name == "quant":
        cases["bits"] = Payload(meta={**payload.meta, "bits": 4}, arrays=dict(payload.arrays))
    else:
        cases["crc"] = Payload(meta={**payload.meta, "bits_crc32": 1}, arrays=dict(payload.arrays))
    total_bits = 3 * env.model.numel
    if total_bits % 8:
        padded = payload.arrays["codes"].copy()
        padded[-1] |= 1
        cases["padding bits"] = Payload(meta=dict(payload.meta), arrays={**payload.arrays, "codes": padded})
    for case, bad in cases.items():
        algo.server_begin(1)
        with pytest.raises(ValueError):
            algo.server_accumulate(0, Payload.unpack(bad.pack()), 1.0)
        assert torch.equal(algo.server_finish(), env.model.vector), case
    # random byte damage: any failure is a ValueError, from unpack or from the server
    wire = bytearray(payload.pack())
    rng = np.random.default_rng(0)
    for _ in range(300):
        damaged = bytearray(wire)
        for index in rng.integers(0, len(wire), 3):
            damaged[index] = int(rng.integers(0, 256))
        algo.server_begin(1)
        try:
            algo.server_accumulate(0, Payload.unpack(bytes(damaged)), 1.0)
        except ValueError:
            pass
        assert torch.isfinite(algo.server_finish()).all()


# fedmpq_lite: options and allocation -------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("budget", 0.5), ("budget", 9), ("budget", "4"), ("budget", float("nan")), ("budgets", [4.0, 9.0]),
    ("budgets", []), ("budgets", "4"), ("min_bits", 0), ("max_bits", 9), ("error_feedback", 1),
    ("weighting", "x"),
])
def test_fedmpq_validate_names_the_bad_key(key, value):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        FedMPQLite.Options(**{key: value}).validate()


def test_fedmpq_budget_relations():
    with pytest.raises(ValueError, match="algorithm.max_bits"):
        FedMPQLite.Options(min_bits=4, max_bits=3).validate()
    with pytest.raises(ValueError, match="algorithm.budget"):
        FedMPQLite.Options(min_bits=3, budget=2.0).validate()
    with pytest.raises(ValueError, match="algorithm.budgets"):
        FedMPQLite.Options(min_bits=3, budgets=[2.0, 4.0, 4.0]).validate()
    with pytest.raises(ValueError, match="algorithm.budgets has 2 entries.*3 clients"):
        FedMPQLite(FedMPQLite.Options(budgets=[2.0, 4.0]), make_env(num_clients=3))


def test_allocation_meets_budget_and_bounds():
    rng = np.random.default_rng(0)
    for _trial in range(50):
        sizes = rng.integers(1, 500, rng.integers(1, 12)).tolist()
        s = rng.exponential(size=len(sizes)) * rng.choice([0, 1, 1e6], size=len(sizes))
        min_bits = int(rng.integers(1, 5))
        max_bits = int(rng.integers(min_bits, 9))
        budget = float(rng.uniform(min_bits, 8))
        bits = allocate_bits(s, sizes, budget, min_bits, max_bits)
        assert bits.dtype == np.uint8 and bits.shape == (len(sizes),)
        assert (bits >= min_bits).all() and (bits <= max_bits).all()
        used = int(np.dot(bits.astype(np.int64), sizes))
        assert used <= budget * sum(sizes)
        # greedy fills up: no tensor below max_bits could take another bit
        room = math.floor(budget * sum(sizes)) - used
        assert all(bits[l] == max_bits or sizes[l] > room for l in range(len(sizes)))
        np.testing.assert_array_equal(bits, allocate_bits(s, sizes, budget, min_bits, max_bits))


def test_allocation_exact_budget_and_sensitivity_order():
    sizes = [100, 100, 100, 100]
    np.testing.assert_array_equal(allocate_bits(np.ones(4), sizes, 4.0, 1, 8), [4, 4, 4, 4])
    bits = allocate_bits(np.array([1.0, 100.0, 1.0, 1.0]), sizes, 4.0, 1, 8)
    assert int(np.dot(bits.astype(np.int64), sizes)) == 4 * 400 and bits[1] > bits[0]
    # each bit divides the modelled error by 4: s = 100 is worth log4(100) ~ 3.3 more bits than s = 1
    np.testing.assert_array_equal(bits, [3, 7, 3, 3])
    # ... and the cap: s = 1e4 would want ~6.6 more, max_bits stops it at 8, the rest is shared by index
    np.testing.assert_array_equal(allocate_bits(np.array([1.0, 1e4, 1.0, 1.0]), sizes, 4.0, 1, 8), [3, 8, 3, 2])
    # ties go to the lower index
    np.testing.assert_array_equal(allocate_bits(np.ones(4), sizes, 1.5, 1, 8), [2, 2, 1, 1])
    np.testing.assert_array_equal(allocate_bits(np.array([0, 0, 5.0, 0]), sizes, 8, 2, 6), [6, 6, 6, 6])
    np.testing.assert_array_equal(allocate_bits(np.array([1.0, 9.0]), [10, 10], 8, 2, 5), [5, 5])


# fedmpq_lite: messages, client, server -----------------------------------------------------------


def test_equal_budgets_send_one_common_payload():
    env = make_env(num_clients=3)
    model_bytes = 4 * env.model.numel
    for options in (FedMPQLite.Options(budget=3.0), FedMPQLite.Options(budgets=[3.0, 3, 3.0])):
        message = FedMPQLite(options, env).server_message(1)
        assert message.model and message.per_client == {} and message.common is not None
        bits = message.common.arrays["bits"]
        np.testing.assert_array_equal(bits, [3] * len(env.model.tensor_sizes))
        assert message.downlink_bytes(0, model_bytes) == model_bytes + message.common.packed_size()


def test_per_client_budgets_give_per_client_messages_and_downlink():
    env = make_env(num_clients=3)
    budgets = [2.0, 4.0, 6.5]
    algo = FedMPQLite(FedMPQLite.Options(budgets=budgets), env)
    message = algo.server_message(1)
    model_bytes = 4 * env.model.numel
    assert message.common is None and sorted(message.per_client) == [0, 1, 2]
    sizes = env.model.tensor_sizes
    for cid, budget in enumerate(budgets):
        part = message.per_client[cid]
        np.testing.assert_array_equal(part.arrays["bits"], allocate_bits(np.ones(len(sizes)), sizes, budget, 1, 8))
        assert part.arrays["bits"].dtype == np.uint8
        meta = {"algorithm": "fedmpq_lite", "round": 1}
        header = json.dumps({"meta": meta, "arrays": [["bits", "uint8", [len(sizes)], 0]]}, separators=(",", ":"))
        assert part.packed_size() == aligned(12 + len(header)) + len(sizes)
        assert message.downlink_bytes(cid, model_bytes) == model_bytes + part.packed_size()


def test_client_uses_the_bits_it_received_and_server_checks_them():
    client_env, server_env = make_env(num_clients=3), make_env(num_clients=3)
    start = server_env.model.vector.clone()
    options = FedMPQLite.Options(budgets=[2.0, 4.0, 5.5])
    client, server = FedMPQLite(options, client_env), FedMPQLite(options, server_env)
    server.sensitivity = np.linspace(1.0, 50.0, len(server.sizes))  # a mixed allocation
    message = received(server.server_message(1))
    sizes, numel = client_env.model.tensor_sizes, client_env.model.numel
    server.server_begin(1)
    decoded, payloads = [], {}
    for cid in range(3):
        client_env.model.load_(start)
        bits = message.for_client(cid).arrays["bits"]
        assert len(set(bits.tolist())) > 1
        result = client.client_update(make_ctx(cid, message=message))
        payload = Payload.unpack(result.payload.pack())
        payloads[cid] = payload
        total = int(np.dot(bits.astype(np.int64), sizes))
        assert total <= options.budgets[cid] * numel
        assert payload.arrays["codes"].shape == (math.ceil(total / 8),)
        assert result.stats["mean_bits"] == pytest.approx(total / numel)
        assert payload.meta["bits_crc32"] == bits_digest(bits)
        n = len(sizes)
        assert payload.packed_size() == formula_bytes(dict(payload.meta), total, n)
        assert payload.packed_size() <= server.payload_size_hint()
        decoded.append(hand_decode(payload, sizes, bits.tolist()))
        server.server_accumulate(cid, payload, 10.0)
    new = server.server_finish()
    torch.testing.assert_close(new, start + sum(decoded) / 3, rtol=0, atol=1e-6)
    # a payload quantized at another client's widths is refused, with or without a matching digest
    server.server_begin(1)
    foreign = Payload(meta={**payloads[0].meta, "client": 1}, arrays=dict(payloads[0].arrays))
    with pytest.raises(ValueError, match="bits_crc32"):
        server.server_accumulate(1, foreign, 10.0)
    forged = Payload(meta={**foreign.meta, "bits_crc32": payloads[1].meta["bits_crc32"]}, arrays=dict(foreign.arrays))
    with pytest.raises(ValueError, match="'codes'"):
        server.server_accumulate(1, forged, 10.0)
    with pytest.raises(ValueError, match="no such client"):
        server.server_accumulate(7, payloads[0], 10.0)


def test_same_length_other_widths_are_refused():
    env = make_env(num_clients=1)
    algo = FedMPQLite(FedMPQLite.Options(budget=4.0), env)
    sizes = env.model.tensor_sizes
    message = algo.server_message(1)
    bits = message.common.arrays["bits"].copy()
    # move bits between the two conv biases of 16 and 32 values: 16*2 = 32*1, same total length
    assert sizes[1] == 16 and sizes[3] == 32
    bits[1] += 2
    bits[3] -= 1
    other = ReceivedMessage(round=1, model=True, common=Payload(meta=dict(message.common.meta), arrays={"bits": bits}))
    payload = algo.client_update(make_ctx(0, message=other)).payload
    algo.server_begin(1)
    with pytest.raises(ValueError, match="bits_crc32"):
        algo.server_accumulate(0, payload, 1.0)


def test_client_refuses_a_message_without_or_with_bad_bits():
    env = make_env(num_clients=1)
    algo = FedMPQLite(FedMPQLite.Options(min_bits=2), env)
    with pytest.raises(ValueError, match="no bit-widths"):
        algo.client_update(make_ctx(0, message=ReceivedMessage(round=1, model=True)))
    bad = np.ones(len(env.model.tensor_sizes), np.uint8)  # below min_bits
    message = ReceivedMessage(round=1, model=True, common=Payload(arrays={"bits": bad}))
    with pytest.raises(ValueError, match="do not fit"):
        algo.client_update(make_ctx(0, message=message))


def test_sensitivities_follow_the_mean_update_and_resume_bit_exactly():
    env = make_env(num_clients=2)
    algo = FedMPQLite(FedMPQLite.Options(budget=3.0), env)
    start = env.model.vector.clone()
    message = received(algo.server_message(1))
    algo.server_begin(1)
    for cid in (0, 1):
        env.model.load_(start)
        algo.server_accumulate(cid, algo.client_update(make_ctx(cid, message=message)).payload, 20.0)
    env.model.load_(start)
    new = algo.server_finish()
    mean = (new - start).double()
    expected = [float(p.dot(p)) / p.numel() for p in mean.split(env.model.tensor_sizes)]
    np.testing.assert_allclose(algo.sensitivity, expected, rtol=1e-4)  # W + u - W rounds u
    state = algo.server_state()
    assert state[SENSITIVITY].dtype == np.float64
    restored = FedMPQLite(FedMPQLite.Options(budget=3.0), make_env(num_clients=2))
    restored.load_server_state({k: v.copy() for k, v in state.items()})
    np.testing.assert_array_equal(restored.server_message(2).common.arrays["bits"],
                                  algo.server_message(2).common.arrays["bits"])
    with pytest.raises(ValueError):
        restored.load_server_state({SENSITIVITY: np.ones(3)})
    with pytest.raises(ValueError):
        restored.load_server_state({SENSITIVITY: np.full(len(algo.sizes), np.nan)})
    with pytest.raises(ValueError):
        restored.load_server_state({"other": np.ones(1)})
    # a round without accepted payloads leaves the sensitivities alone
    before = algo.sensitivity.copy()
    algo.server_begin(2)
    algo.server_finish()
    np.testing.assert_array_equal(algo.sensitivity, before)


def test_payload_size_hint_bounds_every_budget():
    env = make_env(num_clients=3)
    algo = FedMPQLite(FedMPQLite.Options(budgets=[2.0, 8.0, 3.0]), env)
    message = received(algo.server_message(1))
    sizes = []
    for cid in range(3):
        sizes.append(algo.client_update(make_ctx(cid, message=message)).payload.packed_size())
    assert max(sizes) <= algo.payload_size_hint() <= max(sizes) + 24
