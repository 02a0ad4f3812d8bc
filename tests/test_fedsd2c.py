"""FedSD2C: the Fourier mixing, the core-set choice, the three latent spaces, exact upload bytes per
teacher option, the server fold's checks, and a bit-exact resume between server-phase epochs."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms import ClientContext, Environment, get_algorithm
from osfed_hpc.algorithms.fedsd2c import (
    FedSD2C,
    crop_boxes,
    crop_images,
    fourier_mix,
    kl_distillation_loss,
    penultimate,
    rest_partners,
    select_coreset,
)
from osfed_hpc.autoencoders import PoolAutoencoder, build_autoencoder
from osfed_hpc.config import TrainConfig
from osfed_hpc.errors import UserError
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.conftest import ROOT
from tests.helpers import TensorClientData

SIDE, CLASSES = 12, 4
TRAIN = replace(TrainConfig(), lr=0.05, momentum=0.9, batch_size=16, local_epochs=1)


def _model(seed: int = 0) -> FlatModel:
    return FlatModel(build_model("cnn", 1, SIDE, CLASSES, seed=seed))


def _env(model: FlatModel, num_clients: int = 3) -> Environment:
    return Environment(model=model, train=TRAIN, num_classes=CLASSES, input_shape=(1, SIDE, SIDE),
                       device=torch.device("cpu"), seed=7, num_clients=num_clients,
                       pixel_mean_std=((0.5,), (0.25,)))


def _options(**overrides) -> FedSD2C.Options:
    base = dict(ipc=3, mipc=8, num_crop=3, autoencoder="pool", pool_factor=2, iterations=4, server_epochs=3,
                server_batch_size=8)
    return FedSD2C.Options(**{**base, **overrides})


def _data(seed: int, n: int = 30) -> TensorClientData:
    g = torch.Generator().manual_seed(seed)
    return TensorClientData(torch.randn(n, 1, SIDE, SIDE, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def _ctx(client: int, data_seed: int | None = None, round_: int = 1) -> ClientContext:
    data = _data(100 + client if data_seed is None else data_seed)
    return ClientContext(client, round_, data, {}, torch.Generator().manual_seed(client), 0)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


# Fourier amplitude mixing ------------------------------------------------------------------------
def test_fourier_mix_keeps_x1_phase_and_mixes_the_amplitude():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(5, 3, 10, 10, generator=g), torch.rand(5, 3, 10, 10, generator=g)
    torch.testing.assert_close(fourier_mix(x1, x2, 0.0), x1, atol=1e-6, rtol=0)
    for lam in (0.3, 0.8, 1.0):
        out = fourier_mix(x1.double(), x2.double(), lam)
        f1, f2, fo = torch.fft.fft2(x1.double()), torch.fft.fft2(x2.double()), torch.fft.fft2(out)
        torch.testing.assert_close(fo.abs(), lam * f2.abs() + (1 - lam) * f1.abs(), atol=1e-9, rtol=1e-9)
        # the phase is x1's wherever the mixed amplitude is not ~0: F(out) / |F(out)| == F(x1) / |F(x1)|
        keep = fo.abs() > 1e-6
        torch.testing.assert_close((fo / fo.abs())[keep], (f1 / f1.abs())[keep], atol=1e-9, rtol=1e-9)
    # the output is real and lam = 1 changes x1 (the amplitude is x2's)
    assert fourier_mix(x1, x2, 1.0).dtype == torch.float32
    assert not torch.allclose(fourier_mix(x1, x2, 1.0), x1, atol=1e-3)
    # mixing an image with itself is the identity for every lam
    torch.testing.assert_close(fourier_mix(x1, x1, 0.8), x1, atol=1e-6, rtol=0)


# the core set --------------------------------------------------------------------------------------
def test_select_coreset_picks_the_lowest_loss_crop_then_the_lowest_loss_images():
    losses = torch.tensor([[0.9, 0.5, 0.7],   # image 0: crop 1 (0.5)
                           [0.2, 0.3, 0.1],   # image 1: crop 2 (0.1)
                           [2.0, 2.0, 1.5],   # image 2: crop 2 (1.5)
                           [0.4, 0.4, 0.6],   # image 3: crop 0 (0.4, tie -> first)
                           [0.1, 3.0, 3.0]])  # image 4: crop 0 (0.1, ties image 1 -> lower index first)
    best, chosen, rest = select_coreset(losses, 3)
    assert best.tolist() == [1, 2, 2, 0, 0]
    assert chosen.tolist() == [1, 4, 3]  # ascending loss, ties to the lower index
    assert rest.tolist() == [0, 2]
    best, chosen, rest = select_coreset(losses, 10)  # more ipc than images: all, nothing left
    assert chosen.tolist() == [1, 4, 3, 0, 2] and rest.numel() == 0


def test_rest_partners_prefer_correct_high_loss_images_and_cycle():
    losses = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1])
    correct = torch.tensor([True, True, True, False, True])
    assert rest_partners(6, losses, correct).tolist() == [1, 2, 0, 4, 1, 2]  # 3 is wrong: excluded
    assert rest_partners(2, losses, torch.zeros(5, dtype=torch.bool)).tolist() == [3, 1]  # none correct: all
    assert rest_partners(3, torch.zeros(0), torch.zeros(0, dtype=torch.bool)).numel() == 0


def test_crops_are_square_inside_the_image_and_a_full_box_is_the_identity():
    boxes = crop_boxes(50, 4, 9, 12, 0.3, torch.Generator().manual_seed(1))
    assert boxes.shape == (50, 4, 3)
    top, left, side = boxes.reshape(-1, 3).T
    assert (side >= 1).all() and (side <= 9).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + side <= 9).all() and (left + side <= 12).all()
    assert torch.equal(boxes, crop_boxes(50, 4, 9, 12, 0.3, torch.Generator().manual_seed(1)))
    images = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    full = torch.tensor([[0, 0, 8]] * 3)
    torch.testing.assert_close(crop_images(images, full), images, atol=1e-6, rtol=0)
    # a 4x4 crop at (2, 4), resized x2: the crop's pixel centres land on the output's 2x2 blocks' centre
    crop = crop_images(images[:1], torch.tensor([[2, 4, 4]]))
    inner = torch.nn.functional.interpolate(images[:1, :, 2:6, 4:8], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop[..., 1:-1, 1:-1], inner[..., 1:-1, 1:-1], atol=1e-6, rtol=0)


def test_client_core_set_keeps_the_images_the_model_finds_easiest():
    """With a loss that is the pixel mean, the core set is the darkest images' best crops."""
    model = _model()
    algo = FedSD2C(_options(ipc=2, num_crop=1, crop_scale_min=1.0), _env(model))
    algo._logits = lambda x: torch.stack([-x.mean((1, 2, 3)), torch.zeros(len(x)), torch.zeros(len(x)),
                                          torch.zeros(len(x))], 1) * 50  # class 0: lower loss for darker
    levels = torch.tensor([0.3, -0.2, 0.9, -0.8, 0.1])
    images = levels.view(-1, 1, 1, 1).expand(5, 1, SIDE, SIDE).clone()
    x1, x2 = algo._core_set(images, 0, torch.Generator().manual_seed(0))
    assert sorted(x1[:, 0, 0, 0].tolist()) == pytest.approx([-0.8, -0.2])
    # the rest images (0.3, 0.9, 0.1) are all mispredicted (class 0 wins only for a negative mean), so all
    # of them are partners, highest loss (0.9, then 0.3) first
    assert x2[:, 0, 0, 0].tolist() == pytest.approx([0.9, 0.3])


# autoencoders --------------------------------------------------------------------------------------
def test_pool_autoencoder_shapes_bytes_and_round_trip():
    ae = build_autoencoder("pool", (1, 28, 28), pool_factor=4)
    assert isinstance(ae, PoolAutoencoder) and ae.latent_shape == (1, 7, 7) and ae.latent_bytes == 4 * 49
    x = torch.rand(6, 1, 28, 28)
    z = ae.encode(x)
    assert z.shape == (6, 1, 7, 7)
    torch.testing.assert_close(z[:, :, 0, 0], x[:, :, :4, :4].mean((2, 3)))
    assert ae.decode(z).shape == x.shape
    constant = torch.full((2, 1, 28, 28), 0.25)
    torch.testing.assert_close(ae.decode(ae.encode(constant)), constant)
    odd = build_autoencoder("pool", (3, 12, 10), pool_factor=5)
    assert odd.latent_shape == (3, 3, 2) and odd.decode(odd.encode(torch.rand(2, 3, 12, 10))).shape == (2, 3, 12, 10)
    with pytest.raises(ValueError, match="algorithm.pool_factor"):
        build_autoencoder("pool", (1, 8, 8), pool_factor=9)


def test_tiny_vae_is_deterministic_and_keeps_the_global_rng():
    pytest.importorskip("diffusers")
    from osfed_hpc.autoencoders import tiny_vae_model

    state = torch.random.get_rng_state()
    a, b = tiny_vae_model(1), tiny_vae_model(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ae = build_autoencoder("tiny_vae", (1, SIDE, SIDE))
    assert ae.latent_shape == (4, SIDE // 2, SIDE // 2) and ae.latent_bytes == 4 * 4 * 6 * 6
    x = torch.rand(3, 1, SIDE, SIDE)
    z = ae.encode(x)
    assert z.shape == (3, 4, 6, 6) and z.dtype == torch.float32
    z.requires_grad_(True)
    out = ae.decode(z)
    assert out.shape == x.shape
    out.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    torch.testing.assert_close(build_autoencoder("tiny_vae", (1, SIDE, SIDE)).encode(x), z.detach())


def test_a_three_channel_vae_replicates_gray_images_and_pads_the_size():
    """The SDXL path for MNIST (methods.md 7.3 B): 1 channel -> 3, 7x7 -> the next multiple of 2."""
    pytest.importorskip("diffusers")
    from osfed_hpc.autoencoders import DiffusersAutoencoder, tiny_vae_model

    ae = DiffusersAutoencoder(tiny_vae_model(3), (1, 7, 7), "tiny_vae")
    assert ae.work_size == (8, 8) and ae.latent_shape == (4, 4, 4)
    z = ae.encode(torch.rand(2, 1, 7, 7))
    assert z.shape == (2, 4, 4, 4) and ae.decode(z).shape == (2, 1, 7, 7)


def test_vae_loads_only_a_local_directory(tmp_path):
    with pytest.raises(UserError, match="algorithm.vae_path"):
        build_autoencoder("vae", (3, 32, 32), vae_path=None)
    with pytest.raises(UserError, match="no config.json"):
        build_autoencoder("vae", (3, 32, 32), vae_path=str(tmp_path))
    with pytest.raises(UserError, match="algorithm.vae_path"):
        FedSD2C(FedSD2C.Options(), _env(_model()))  # the paper's default needs the SDXL VAE's directory
    pytest.importorskip("diffusers")
    from osfed_hpc.autoencoders import tiny_vae_model

    saved = tiny_vae_model(3)
    saved.save_pretrained(tmp_path / "vae")  # a stand-in for a local copy of stabilityai/sdxl-vae
    ae = build_autoencoder("vae", (1, 8, 8), vae_path=str(tmp_path / "vae"))
    assert ae.name == "vae" and ae.latent_shape == (4, 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(ae.vae.state_dict().values(), saved.state_dict().values()))
    algo = FedSD2C(_options(autoencoder="vae", vae_path=str(tmp_path / "vae")), _env(_model()))
    assert algo.latent_shape == (4, SIDE // 2, SIDE // 2)


# the upload ----------------------------------------------------------------------------------------
def _formula(meta: dict, arrays: list[tuple[str, str, list[int], int]]) -> int:
    """The Payload layout: 12-byte prefix + JSON header padded to 8, every array but the last padded to 8."""
    entries, offset = [], 0
    for name, dtype, shape, nbytes in arrays:
        entries.append([name, dtype, shape, offset])
        offset = _aligned(offset + nbytes)
    header = json.dumps({"meta": meta, "arrays": entries}, separators=(",", ":")).encode()
    return _aligned(12 + len(header)) + entries[-1][3] + arrays[-1][3]


@pytest.mark.parametrize("teacher", ["none", "client_logits", "client_model"])
@pytest.mark.parametrize("flip", [True, False])
def test_payload_bytes_match_the_formula_for_each_teacher(teacher, flip):
    model = _model()
    algo = FedSD2C(_options(teacher=teacher, flip=flip), _env(model))
    result = algo.client_update(_ctx(2))
    payload = result.payload
    labels = payload.arrays["labels"]
    k = len(labels)
    counts = np.bincount(labels, minlength=CLASSES)
    present = np.bincount(_data(102).y.numpy(), minlength=CLASSES)
    assert counts.tolist() == [3 if n > 3 else 0 for n in present]  # ipc per class with more than ipc samples
    assert k == result.stats["distillates"] and k > 0
    latent = 1 * (SIDE // 2) ** 2  # pool by 2, one channel
    arrays = [("latents", "float32", [k, 1, SIDE // 2, SIDE // 2], 4 * k * latent), ("labels", "int32", [k], 4 * k)]
    views = 2 if flip else 1
    if teacher == "client_logits":
        arrays.append(("teacher_logits", "float32", [k, views, CLASSES], 4 * k * views * CLASSES))
    elif teacher == "client_model":
        arrays.append(("model", "float32", [model.numel], 4 * model.numel))
    assert sorted(payload.arrays) == sorted(a[0] for a in arrays)
    meta = {"algorithm": "fedsd2c", "round": 1, "client": 2, "teacher": teacher, "autoencoder": "pool"}
    assert payload.meta == meta
    formula = _formula(meta, arrays)
    assert payload.packed_size() == formula == len(payload.pack()) == algo.packed_size(1, 2, k)
    extra = {"none": 0, "client_logits": 4 * k * views * CLASSES, "client_model": 4 * model.numel}[teacher]
    assert 0 < formula - (4 * k * latent + 4 * k + extra) < 320  # the rest is a small header and padding
    hint = algo.payload_size_hint()
    assert hint >= algo.packed_size(1, 2, CLASSES * 3) >= formula
    if teacher == "client_logits":  # the teacher logits are the local model's on the decoded distillates
        decoded = algo.normalize(algo.autoencoder.decode(torch.from_numpy(payload.arrays["latents"].copy())))
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(payload.arrays["teacher_logits"][:, 0].copy()),
                                       model.model.eval()(decoded), atol=1e-5, rtol=1e-5)
    if teacher == "client_model":  # the model uploaded is the locally trained one, not W_0
        assert not np.array_equal(payload.arrays["model"], _model().vector.numpy())


def test_client_update_is_deterministic_and_synthesis_lowers_the_feature_loss():
    model = _model()
    start = model.vector.clone()
    packed = []
    for _ in range(2):
        model.load_(start)
        packed.append(FedSD2C(_options(), _env(model)).client_update(_ctx(1)).payload.pack())
    assert packed[0] == packed[1]
    # more latent steps: a lower feature-matching loss than the initial (encoded perturbed) latent
    algo = FedSD2C(_options(iterations=30, latent_lr=0.05), _env(model))
    g = torch.Generator().manual_seed(3)
    original = torch.randn(4, 1, SIDE, SIDE, generator=g)
    perturbed = algo.to_pixels(torch.randn(4, 1, SIDE, SIDE, generator=g)).clamp(0, 1)
    target = torch.zeros(4, dtype=torch.int64)
    with torch.no_grad(), penultimate(model.model) as captured:
        model.model(original)
        model.model(algo.normalize(algo.autoencoder.decode(algo.autoencoder.encode(perturbed))))
    initial = float(torch.nn.functional.mse_loss(captured[1], captured[0]))
    start = model.vector.clone()
    _, final = algo._synthesize(original, perturbed, target)
    assert final < 0.5 * initial
    assert torch.equal(model.vector, start)  # synthesis never touches the model


def test_kl_distillation_loss_is_zero_for_equal_logits_and_scaled_by_t_squared():
    s = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    assert float(kl_distillation_loss(s, s)) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(t, 1)
    expected = (p * (p.log() - torch.log_softmax(s, 1))).sum(1).mean()
    torch.testing.assert_close(kl_distillation_loss(s, t), expected)
    ps = torch.softmax(t / 2, 1)
    torch.testing.assert_close(kl_distillation_loss(s, t, 2.0),
                               4 * (ps * (ps.log() - torch.log_softmax(s / 2, 1))).sum(1).mean())


# the server ----------------------------------------------------------------------------------------
def _uploads(teacher: str, clients=(0, 1, 2)) -> tuple[FlatModel, torch.Tensor, list[Payload]]:
    model = _model()
    start = model.vector.clone()
    algo = FedSD2C(_options(teacher=teacher), _env(model))
    payloads = []
    for client in clients:
        model.load_(start)
        payloads.append(algo.client_update(_ctx(client)).payload)
    model.load_(start)
    return model, start, payloads


def _fold(algo: FedSD2C, payloads: list[Payload], round_: int = 1) -> torch.Tensor:
    algo.server_begin(round_)
    for payload in payloads:
        buffer = bytearray(payload.pack())
        algo.server_accumulate(int(payload.meta["client"]), Payload.unpack(buffer), 30.0)
        buffer[:] = bytes(len(buffer))  # the runner reuses its buffer: the fold must have copied
    return algo.server_finish()


@pytest.mark.parametrize("teacher", ["none", "client_logits", "client_model"])
def test_resuming_between_phase_epochs_gives_the_same_model_bit_for_bit(teacher):
    model, start, payloads = _uploads(teacher)
    algo = FedSD2C(_options(teacher=teacher), _env(model))
    new = _fold(algo, payloads)
    assert torch.equal(new, start)  # nothing is averaged: the phase starts from W_0
    assert algo.server_phase_epochs(1) == 3
    model.load_(new)
    first = algo.server_phase_epoch(1, 1)
    assert first["steps"] == math.ceil(sum(len(p.arrays["labels"]) for p in payloads) / 8)
    after_one = model.vector.clone()
    state = algo.server_state()
    assert "fedsd2c.momentum" in state and ("fedsd2c.models" in state) == (teacher == "client_model")
    for epoch in (2, 3):
        algo.server_phase_epoch(1, epoch)
    straight = model.vector.clone()
    assert not torch.equal(straight, after_one)
    algo.server_phase_end(1)
    assert algo.server_state() == {}

    # a fresh process: the checkpointed model and server state, then epochs 2 and 3
    other = _model(seed=99)
    other.load_(after_one)
    resumed = FedSD2C(_options(teacher=teacher), _env(other))
    resumed.load_server_state({k: np.array(v) for k, v in state.items()})
    for epoch in (2, 3):
        resumed.server_phase_epoch(1, epoch)
    assert torch.equal(other.vector, straight)


def test_server_phase_trains_towards_the_distillate_labels():
    model, start, payloads = _uploads("none")
    algo = FedSD2C(_options(server_epochs=8, server_lr=0.1), _env(model))
    model.load_(_fold(algo, payloads))
    losses = [algo.server_phase_epoch(1, e)["loss"] for e in range(1, 9)]
    assert losses[-1] < losses[0]


def test_no_distillates_ends_the_phase():
    model = _model()
    algo = FedSD2C(_options(ipc=40, mipc=40), _env(model))  # no class has more than 40 of 30 samples
    payload = algo.client_update(_ctx(0)).payload
    assert payload.arrays["latents"].shape == (0, 1, SIDE // 2, SIDE // 2)
    _fold(algo, [payload])
    assert algo.server_phase_epoch(1, 1)["stop_early"] == 1.0


def _damaged(kind: str, payload: Payload) -> Payload:
    arrays = {k: np.array(v) for k, v in payload.arrays.items()}
    meta = dict(payload.meta)
    if kind == "label_range":
        arrays["labels"][0] = CLASSES
    elif kind == "negative_label":
        arrays["labels"][0] = -1
    elif kind == "too_many_of_a_class":
        arrays["labels"][:] = 0
    elif kind == "nan_latent":
        arrays["latents"][0, 0, 0, 0] = np.nan
    elif kind == "huge_latent":
        arrays["latents"][0, 0, 0, 0] = 3e38
    elif kind == "inf_logits":
        arrays["teacher_logits"][1, 0, 0] = np.inf
    elif kind == "wrong_latent_shape":
        arrays["latents"] = arrays["latents"][:, :, :-1]
    elif kind == "count_mismatch":
        arrays["latents"] = arrays["latents"][:-1]
    elif kind == "missing_logits":
        del arrays["teacher_logits"]
    elif kind == "extra_model":
        arrays["model"] = np.zeros(3, np.float32)
    elif kind == "float64_latents":
        arrays["latents"] = arrays["latents"].astype(np.float64)
    elif kind == "wrong_teacher":
        meta["teacher"] = "none"
    elif kind == "wrong_autoencoder":
        meta["autoencoder"] = "vae"
    elif kind == "rejected":
        meta["rejected"] = "diverged"
    else:
        raise AssertionError(kind)
    return Payload(meta=meta, arrays=arrays)


@pytest.mark.parametrize("kind", ["label_range", "negative_label", "too_many_of_a_class", "nan_latent", "huge_latent",
                                  "inf_logits",
                                  "wrong_latent_shape", "count_mismatch", "missing_logits", "extra_model",
                                  "float64_latents", "wrong_teacher", "wrong_autoencoder", "rejected"])
def test_damaged_payloads_are_rejected_naming_client_and_round(kind):
    model, _, payloads = _uploads("client_logits", clients=(1,))
    algo = FedSD2C(_options(teacher="client_logits"), _env(model))
    algo.server_begin(1)
    with pytest.raises(ValueError, match="client 1, round 1"):
        algo.server_accumulate(1, Payload.unpack(_damaged(kind, payloads[0]).pack()), 30.0)
    algo.server_accumulate(1, Payload.unpack(payloads[0].pack()), 30.0)
    algo.server_finish()
    assert len(algo.server_state()["fedsd2c.labels"]) == len(payloads[0].arrays["labels"])


# options and config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"ipc": 0}, {"mipc": 2}, {"num_crop": 0}, {"crop_scale_min": 0}, {"fourier_lambda": 1.5},
    {"autoencoder": "sdxl"}, {"teacher": "model"}, {"iterations": -1}, {"latent_lr": 0}, {"r_c": -1.0},
    {"server_epochs": -1}, {"server_lr": 0}, {"server_momentum": 1.0}, {"server_weight_decay": -1},
    {"server_lr_schedule": "step"}, {"local_lr_schedule": "linear"}, {"flip": "yes"}, {"temperature": 0},
    {"keep_small_classes": 1}, {"pool_factor": 0}, {"vae_path": 3},
])
def test_invalid_options_are_refused(options):
    key = next(iter(options))
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        _options(**options).validate()


def test_shipped_config_resolves():
    from osfed_hpc.config import load_config

    config = load_config(ROOT / "configs" / "mnist5k_fedsd2c.yaml", [])
    assert get_algorithm("fedsd2c") is FedSD2C
    assert config.rounds == 1 and config.algorithm["name"] == "fedsd2c"
    assert config.algorithm["autoencoder"] == "pool" and config.algorithm["teacher"] == "client_logits"
