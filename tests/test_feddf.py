"""FedDF: the distillation loss, the client payload and its exact bytes, the fold (FedAvg start plus
teachers' targets), the server phase (loss goes down, Adam as torch's, cosine schedule) and a bit-exact
resume between phase epochs."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms import ClientContext, Environment, get_algorithm
from osfed_hpc.algorithms.distillation import TeacherFold, kl_distillation_loss, kl_to_targets, soft_targets
from osfed_hpc.algorithms.fedavg import FedAvg
from osfed_hpc.algorithms.feddf import FedDF
from osfed_hpc.config import TrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

TRAIN = replace(TrainConfig(), lr=0.1, momentum=0.0, local_steps=3, batch_size=8)
SMALL = dict(distill_samples=40, server_epochs=3, steps_per_epoch=4, distill_batch_size=16)


def _model(name: str = "cnn", seed: int = 3) -> FlatModel:
    return FlatModel(build_model(name, 1, 8, 10, seed=seed))


def _env(model: FlatModel, **fields) -> Environment:
    return Environment(model=model, train=TRAIN, num_classes=10, input_shape=(1, 8, 8), device=torch.device("cpu"),
                       seed=0, num_clients=4, pixel_mean_std=((0.5,), (0.25,)), **fields)


def _feddf(model_seed: int = 3, **options) -> FedDF:
    return FedDF(FedDF.Options(**{**SMALL, **options}), _env(_model(seed=model_seed)))


def _ctx(client: int, round_: int = 1) -> ClientContext:
    g = torch.Generator().manual_seed(100 + client)
    data = TensorClientData(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g))
    return ClientContext(client, round_, data, {}, torch.Generator().manual_seed(client), 0)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


def _client_payloads(algo: FedDF, clients=(0, 1, 2), round_: int = 1) -> list[Payload]:
    """Each client's payload from the same W_t (the runner reloads W_t before every client)."""
    start = algo.env.model.vector.clone()
    payloads = []
    for client in clients:
        algo.env.model.load_(start)
        payloads.append(Payload.unpack(algo.client_update(_ctx(client, round_)).payload.pack()))
    algo.env.model.load_(start)
    return payloads


def _fold(server: FedDF, payloads: list[Payload], round_: int = 1) -> torch.Tensor:
    server.server_begin(round_)
    for client, payload in enumerate(payloads):
        server.server_accumulate(client, payload, 24.0)
    state = server.server_finish()
    server.env.model.load_(state)
    return state


def _distill_loss(algo: FedDF) -> float:
    """The student's loss on the whole distillation set (eval mode: the small models have no BN anyway)."""
    with torch.no_grad():
        logits = algo.env.model.model(algo.distillation_inputs())
        probs, neg_entropy = algo._targets
        return float(kl_to_targets(logits, probs, neg_entropy, algo.options.temperature))


# the loss ------------------------------------------------------------------------------------------
def test_kl_distillation_loss_is_zero_for_equal_logits_positive_otherwise_and_reaches_the_student():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 10, generator=g, requires_grad=True)
    same = teacher.detach() + torch.randn(6, 1, generator=g)  # a per-row shift is the same distribution
    assert float(kl_distillation_loss(same, teacher)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(6, 10, generator=g, requires_grad=True)
    loss = kl_distillation_loss(student, teacher, temperature=2.0)
    assert float(loss.detach()) > 0
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    assert teacher.grad is None  # the teacher is a fixed target
    # by hand: mean over rows of sum p (log p - log q) at T, times T^2
    p = torch.softmax(teacher.detach() / 2, 1)
    manual = (p * (torch.log_softmax(teacher.detach() / 2, 1) - torch.log_softmax(student.detach() / 2, 1))).sum(1)
    assert float(loss.detach()) == pytest.approx(4 * float(manual.mean()), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_avg_losses_fold_is_the_mean_of_the_teachers_kls_value_and_gradient(temperature):
    g = torch.Generator().manual_seed(1)
    teachers = [torch.randn(8, 10, generator=g) * 3 for _ in range(4)]
    student = torch.randn(8, 10, generator=g, requires_grad=True)
    literal = sum(kl_distillation_loss(student, t, temperature) for t in teachers) / len(teachers)
    (literal_grad,) = torch.autograd.grad(literal, student)
    fold = TeacherFold("avg_losses", (8, 10), temperature)
    for t in teachers:
        fold.add(t)
    probs, neg_entropy = fold.targets()
    folded = kl_to_targets(student, probs, neg_entropy, temperature)
    (folded_grad,) = torch.autograd.grad(folded, student)
    assert float(folded.detach()) == pytest.approx(float(literal.detach()), rel=1e-5, abs=1e-6)
    assert torch.allclose(folded_grad, literal_grad, atol=1e-6)
    # one teacher: the targets are that teacher's soft labels
    single = TeacherFold("avg_losses", (8, 10), temperature)
    single.add(teachers[0])
    assert torch.allclose(single.targets()[0], soft_targets(teachers[0], temperature)[0], atol=1e-7)


def test_avg_logits_fold_distils_from_the_mean_logits():
    g = torch.Generator().manual_seed(2)
    teachers = [torch.randn(5, 10, generator=g) for _ in range(3)]
    student = torch.randn(5, 10, generator=g)
    fold = TeacherFold("avg_logits", (5, 10))
    for t in teachers:
        fold.add(t)
    expected = kl_distillation_loss(student, sum(teachers) / 3)
    assert float(kl_to_targets(student, *fold.targets())) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert TeacherFold("avg_losses", (5, 10)).targets() is None


# the distillation set ------------------------------------------------------------------------------
def test_noise_inputs_are_keyed_min_max_pixels_normalised_like_images():
    a, b = _feddf(), _feddf(model_seed=9)
    x = a.distillation_inputs()
    assert x.shape == (40, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, b.distillation_inputs())  # every rank and role builds the same set
    pixels = x * 0.25 + 0.5
    assert float(pixels.min()) == pytest.approx(0.0, abs=1e-6) and float(pixels.max()) == pytest.approx(1.0, abs=1e-6)
    other_seed = FedDF(FedDF.Options(**SMALL), replace(_env(_model()), seed=1))
    assert not torch.equal(x, other_seed.distillation_inputs())


def test_train_unlabeled_reads_a_keyed_subset_of_the_training_split_without_labels():
    calls = []

    def load_images(split, indices):
        calls.append((split, np.array(indices)))
        x = torch.from_numpy(np.asarray(indices, np.float32)).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
        return x, torch.full((len(indices),), -1)  # labels that would break anything that used them

    def make() -> FedDF:
        env = _env(_model(), load_images=load_images, split_sizes={"train": 500, "test": 100})
        return FedDF(FedDF.Options(**{**SMALL, "distill_data": "train_unlabeled"}), env)

    x = make().distillation_inputs()
    make().distillation_inputs()
    (split, first), (_, second) = calls
    assert split == "train" and np.array_equal(first, second)
    assert len(np.unique(first)) == 40 and np.all(np.diff(first) > 0) and first.max() < 500
    assert torch.equal(x[:, 0, 0, 0], torch.from_numpy(first.astype(np.float32)))
    with pytest.raises(ValueError, match="algorithm.distill_samples"):
        FedDF(FedDF.Options(**{**SMALL, "distill_data": "train_unlabeled", "distill_samples": 501}),
              _env(_model(), load_images=load_images, split_sizes={"train": 500}))


# the client payload --------------------------------------------------------------------------------
@pytest.mark.parametrize("logits_dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_client_payload_is_the_update_plus_the_trained_models_logits_with_exact_bytes(logits_dtype, itemsize):
    algo = _feddf(logits_dtype=logits_dtype)
    model = algo.env.model
    start = model.vector.clone()
    result = algo.client_update(_ctx(2, round_=7))
    payload = result.payload
    d, n, k = model.numel, 40, 10
    update, logits = payload.arrays["update"], payload.arrays["logits"]
    assert update.dtype == np.float32 and update.shape == (d,)
    assert logits.dtype == np.dtype(logits_dtype) and logits.shape == (n, k)
    assert payload.meta == {"algorithm": "feddf", "round": 7, "client": 2}
    # the logits are the trained local model's, in eval mode, on the distillation set
    model.load_(start + torch.from_numpy(update))
    with torch.no_grad():
        expected = model.model.eval()(algo.distillation_inputs())
    assert np.allclose(logits.astype(np.float32), expected.numpy(), atol=1e-5 if itemsize == 4 else 1e-2)
    assert result.stats["local_steps"] == 3.0
    # Payload layout: prefix (12 bytes) + JSON header, padded to 8; update (4 d) padded to 8; logits (n K b)
    header = json.dumps({"meta": payload.meta, "arrays": [["update", "float32", [d], 0],
                                                          ["logits", logits_dtype, [n, k], _aligned(4 * d)]]},
                        separators=(",", ":")).encode()
    formula = _aligned(12 + len(header)) + _aligned(4 * d) + n * k * itemsize
    assert payload.packed_size() == formula == len(payload.pack()) == algo.packed_size(7, 2)
    hint = algo.payload_size_hint()
    assert formula <= hint <= formula + 16
    # uplink = FedAvg's payload + the logits (+ a few header bytes); the downlink is the model alone
    fedavg = FedAvg(FedAvg.Options(), _env(_model())).client_update(_ctx(2, round_=7)).payload.packed_size()
    assert 0 <= formula - fedavg - n * k * itemsize <= 64
    assert algo.server_message(7).downlink_bytes(2, 4 * d) == 4 * d


# the fold -------------------------------------------------------------------------------------------
def test_fold_is_the_fedavg_mean_before_the_phase():
    fedavg = FedAvg(FedAvg.Options(), _env(_model()))
    start = fedavg.env.model.vector.clone()
    fedavg.server_begin(1)
    for client in range(3):
        fedavg.env.model.load_(start)
        payload = Payload.unpack(fedavg.client_update(_ctx(client)).payload.pack())
        fedavg.server_accumulate(client, payload, 24.0)
    fedavg.env.model.load_(start)
    expected = fedavg.server_finish()
    algo = _feddf()
    state = _fold(algo, _client_payloads(algo))
    assert torch.equal(state, expected)
    assert algo._targets is not None and algo._targets[0].shape == (40, 10)
    assert torch.allclose(algo._targets[0].sum(1), torch.ones(40), atol=1e-5)


def test_damaged_logits_are_refused_and_a_refused_client_teaches_nothing():
    algo = _feddf()
    payloads = _client_payloads(algo)
    bad = Payload(payloads[1].meta, {"update": payloads[1].arrays["update"],
                                     "logits": np.full((40, 10), np.nan, np.float32)})
    wrong_dtype = Payload(payloads[1].meta, {"update": payloads[1].arrays["update"],
                                             "logits": payloads[1].arrays["logits"].astype(np.float16)})
    algo.server_begin(1)
    algo.server_accumulate(0, payloads[0], 24.0)
    with pytest.raises(ValueError, match="client 1, round 1: logits hold NaN"):
        algo.server_accumulate(1, bad, 24.0)
    with pytest.raises(ValueError, match="logits"):
        algo.server_accumulate(1, wrong_dtype, 24.0)
    assert algo._fold.count == 1 and algo._mean.weight == 24.0
    algo.server_finish()
    only = TeacherFold("avg_losses", (40, 10))
    only.add(torch.from_numpy(payloads[0].arrays["logits"].astype(np.float64)))
    assert torch.equal(algo._targets[0], only.targets()[0])


def test_no_accepted_client_means_no_phase_and_zero_epochs_keep_nothing():
    algo = _feddf()
    algo.server_begin(1)
    algo.env.model.load_(algo.server_finish())
    before = algo.env.model.vector.clone()
    assert algo.server_phase_epoch(1, 1)["stop_early"] == 1.0
    assert torch.equal(algo.env.model.vector, before) and algo.server_state() == {}
    fedavg_like = _feddf(server_epochs=0)
    _fold(fedavg_like, _client_payloads(fedavg_like))
    assert fedavg_like.server_phase_epochs(1) == 0 and fedavg_like.server_state() == {}


# the server phase ----------------------------------------------------------------------------------
def test_one_phase_epoch_reduces_the_distillation_loss():
    """A learnable toy problem: the teacher is another model (other init, logits x 10) on the same
    inputs; FedDF's own settings (Adam 1e-3, cosine) cut the loss several-fold in 30 steps."""
    algo = _feddf(steps_per_epoch=30, server_epochs=1)
    payloads = _client_payloads(algo, clients=(0,))
    with torch.no_grad():
        teacher = _model(seed=11).model(algo.distillation_inputs()) * 10
    # the student starts at W_t (a zero update)
    zero = [Payload(p.meta, {"update": np.zeros_like(p.arrays["update"]), "logits": teacher.numpy()})
            for p in payloads]
    start = algo.env.model.vector.clone()
    assert torch.equal(_fold(algo, zero), start)
    before = _distill_loss(algo)
    stats = algo.server_phase_epoch(1, 1)
    after = _distill_loss(algo)
    assert stats["steps"] == 30.0 and math.isfinite(stats["loss"])
    assert before > 0.1 and after < 0.3 * before
    assert not torch.equal(algo.env.model.vector, start)
    algo.server_phase_end(1)
    assert algo.server_state() == {}


def test_server_state_round_trip_between_epochs_is_bit_exact():
    """Epochs 1..3 straight == epoch 1, checkpoint (model vector + server_state), a fresh instance, 2..3."""
    straight = _feddf()
    payloads = _client_payloads(straight)
    _fold(straight, payloads)
    for epoch in (1, 2, 3):
        straight.server_phase_epoch(1, epoch)

    first = _feddf()
    _fold(first, payloads)
    first.server_phase_epoch(1, 1)
    vector = first.env.model.vector.cpu().numpy().copy()
    state = {k: v.copy() for k, v in first.server_state().items()}
    assert set(state) == {"feddf_targets", "feddf_target_neg_entropy", "feddf_adam_m", "feddf_adam_v", "feddf_step"}
    assert int(state["feddf_step"][0]) == 4

    resumed = _feddf(model_seed=5)  # a different init: everything must come from the checkpoint
    resumed.env.model.load_(torch.from_numpy(vector))
    resumed.load_server_state(state)
    for epoch in (2, 3):
        resumed.server_phase_epoch(1, epoch)
    assert torch.equal(resumed.env.model.vector, straight.env.model.vector)
    assert resumed._step == straight._step == 12
    # a bad checkpoint is a named ValueError
    with pytest.raises(ValueError, match="feddf_adam_v"):
        _feddf().load_server_state({**state, "feddf_adam_v": state["feddf_adam_v"][:3]})
    with pytest.raises(ValueError, match="unexpected"):
        _feddf().load_server_state({**state, "other": np.zeros(1)})


def test_adam_step_is_torchs_adam_with_gradient_clipping():
    algo = _feddf(grad_clip=0.5)
    g = torch.Generator().manual_seed(4)
    params = torch.randn(50, generator=g)
    reference = params.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=1e-2, foreach=False)
    algo._adam_m, algo._adam_v, algo._step = torch.zeros(50), torch.zeros(50), 0
    for _ in range(5):
        grad = torch.randn(50, generator=g) * 3
        reference.grad = grad.clone()
        torch.nn.utils.clip_grad_norm_([reference], 0.5)
        optimizer.step()
        algo._adam_step(params, grad.clone(), 1e-2)
    assert torch.allclose(params, reference.detach(), atol=1e-6)


def test_learning_rate_is_cosine_over_the_rounds_steps():
    algo = _feddf(server_epochs=2, steps_per_epoch=50, distill_lr=1e-3)
    assert algo.learning_rate(0) == 1e-3
    assert algo.learning_rate(50) == pytest.approx(5e-4)
    assert algo.learning_rate(100) == pytest.approx(0.0, abs=1e-18)
    assert _feddf(cosine=False).learning_rate(7) == 1e-3
    assert algo.server_phase_epochs(3) == 2


# options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("distill_data", "public"), ("distill_samples", 0), ("logits_dtype", "int8"), ("update_student_scheme", "avg"),
    ("server_epochs", -1), ("steps_per_epoch", 0), ("distill_batch_size", 1.5), ("distill_lr", 0.0),
    ("cosine", "yes"), ("temperature", -1.0), ("grad_clip", -1.0), ("grad_clip", True), ("weighting", "clients"),
])
def test_bad_options_name_the_option(key, value):
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        FedDF.Options(**{key: value}).validate()


def test_registered_and_defaults_are_fedddfs():
    assert get_algorithm("feddf") is FedDF
    options = FedDF.Options()
    assert (options.server_epochs * options.steps_per_epoch, options.distill_batch_size, options.distill_lr,
            options.temperature, options.update_student_scheme, options.grad_clip) == (10_000, 128, 1e-3, 1.0,
                                                                                      "avg_losses", 5.0)
