"""OSCAR with tiny random foundation models: wire bytes per class, per-class averaging of the caption
encodings, the classifier-free guidance formula in the denoising loop, deterministic generation in
the run's input shape, tiny models identical when rebuilt, a bit-exact resume inside the server
phase, and clear errors for missing weights or packages.

The tiny models are random, so captions are random words and the generated images noise: these
tests check the pipeline and its bookkeeping, never accuracy."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from osfed_hpc import generative
from osfed_hpc.algorithms import ClientContext, Environment, get_algorithm
from osfed_hpc.algorithms.oscar import OSCAR, class_means, normalise, to_run_pixels, unit_rgb
from osfed_hpc.config import TrainConfig, load_config
from osfed_hpc.errors import RunError
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.conftest import ROOT
from tests.helpers import TensorClientData

MEAN_STD = ((0.5,), (0.25,))
FAST = {"tiny": True, "steps": 2, "images_per_class": 3, "caption_max_tokens": 6, "server_epochs": 3,
        "server_lr": 0.05, "server_batch_size": 8, "lr_step": 2, "generate_batch_size": 2}


def _options(**changes) -> OSCAR.Options:
    return OSCAR.Options(**{**FAST, **changes})


def _env(input_shape=(1, 8, 8), seed: int = 0) -> Environment:
    c, h, _ = input_shape
    model = FlatModel(build_model("cnn", c, h, 10, seed=3))
    return Environment(model=model, train=TrainConfig(), num_classes=10, input_shape=input_shape,
                       device=torch.device("cpu"), seed=seed, num_clients=4, pixel_mean_std=MEAN_STD)


def _data(seed: int, labels: list[int], shape=(1, 8, 8)) -> TensorClientData:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels, dtype=torch.int64)
    return TensorClientData(torch.randn(len(labels), *shape, generator=g), y)


def _ctx(client: int, data: TensorClientData, seed: int = 7, round_: int = 1) -> ClientContext:
    return ClientContext(client, round_, data, {}, torch.Generator().manual_seed(seed), 0)


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


# bytes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding_dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_payload_bytes_are_the_per_class_formula(encoding_dtype, itemsize):
    algo = OSCAR(_options(encoding_dtype=encoding_dtype), _env())
    labels = [3, 7, 3, 0, 7, 7, 3]  # classes 0, 3, 7 present
    result = algo.client_update(_ctx(2, _data(1, labels)))
    payload = result.payload
    seq, hidden = generative.TINY_SEQ_LEN, generative.TINY_HIDDEN
    k = 3
    assert payload.arrays["classes"].tolist() == [0, 3, 7] and payload.arrays["classes"].dtype == np.int32
    assert payload.arrays["encodings"].shape == (k, seq, hidden)
    assert payload.arrays["encodings"].dtype == np.dtype(encoding_dtype)
    assert payload.meta == {"algorithm": "oscar", "round": 1, "client": 2}
    # Payload layout: 12-byte prefix + JSON header padded to 8, then K int32 ids padded to 8, then the
    # encodings (last array, unpadded): per present class seq_len * hidden * itemsize bytes
    header = json.dumps({"meta": payload.meta, "arrays": [["classes", "int32", [k], 0],
                                                          ["encodings", encoding_dtype, [k, seq, hidden], 16]]},
                        separators=(",", ":")).encode()
    per_class = seq * hidden * itemsize
    assert per_class == {4: 9856, 2: 4928}[itemsize]
    assert payload.packed_size() == _aligned(12 + len(header)) + _aligned(4 * k) + k * per_class == len(payload.pack())
    assert algo.payload_size_hint() >= payload.packed_size()
    assert result.stats["images"] == 7 and result.stats["classes_present"] == 3
    assert result.stats["caption_words"] > 0


def test_a_client_without_samples_sends_no_class():
    algo = OSCAR(_options(), _env())
    payload = algo.client_update(_ctx(0, _data(0, []))).payload
    assert payload.arrays["classes"].shape == (0,) and payload.arrays["encodings"].shape == (0, 77, 32)
    algo.server_begin(1)
    algo.server_accumulate(0, Payload.unpack(payload.pack()), 0.0)
    algo.server_finish()
    assert algo.server_phase_epoch(1, 1)["images"] == 0


# per-class averaging ------------------------------------------------------------------------------------
def test_class_means_average_each_class_over_chunks():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(5, 4, 3, generator=g), torch.randn(4, 4, 3, generator=g)]
    labels = [torch.tensor([2, 0, 2, 2, 5]), torch.tensor([0, 5, 2, 9])]
    classes, means = class_means(chunks, labels, 10)
    assert classes.tolist() == [0, 2, 5, 9]
    x, y = torch.cat(chunks).double(), torch.cat(labels)
    for c, mean in zip(classes.tolist(), means):
        np.testing.assert_allclose(mean, x[y == c].mean(0).numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="label 10"):
        class_means(chunks, [labels[0], torch.tensor([0, 5, 2, 10])], 10)


@pytest.mark.parametrize("caption_batch_size", [2, 64])
def test_uploaded_encodings_are_the_class_means_of_the_caption_encodings(caption_batch_size):
    """Recompute by hand: caption every image with the same keyed stream, encode, average per class."""
    algo = OSCAR(_options(caption_batch_size=caption_batch_size), _env())
    labels = [4, 1, 4, 4, 1, 8]
    data = _data(3, labels)
    payload = algo.client_update(_ctx(1, data, seed=11)).payload
    captioner = generative.cached("captioner", None, True, torch.device("cpu"), torch.float32)
    encoder = generative.cached("text_encoder", None, True, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(11)
    captions = []
    for start in range(0, len(labels), caption_batch_size):
        captions += captioner.caption(unit_rgb(data.x[start : start + caption_batch_size], MEAN_STD), g, 0.9, 6)
    assert all(c.split() and all(w.startswith("w") for w in c.split()) for c in captions)
    encodings = encoder.encode(captions).double().numpy()
    y = np.array(labels)
    for c, mean in zip(payload.arrays["classes"].tolist(), payload.arrays["encodings"]):
        np.testing.assert_allclose(mean, encodings[y == c].mean(0), rtol=1e-6, atol=1e-6)
    # the same keyed stream gives the same upload; another stream other captions
    again = algo.client_update(_ctx(1, data, seed=11)).payload
    assert again.pack() == payload.pack()
    other = algo.client_update(_ctx(1, data, seed=12)).payload
    assert other.pack() != payload.pack()


def test_greedy_captions_need_no_random_stream():
    algo = OSCAR(_options(caption_sampling=False), _env())
    data = _data(5, [0, 1, 1])
    first = algo.client_update(_ctx(0, data, seed=1)).payload.pack()
    assert algo.client_update(_ctx(0, data, seed=2)).payload.pack() == first


# guidance -----------------------------------------------------------------------------------------------
class _RecordingScheduler:
    """Stands in for DDIM: records what the loop hands to ``step`` and moves the latents a little."""

    init_noise_sigma = 2.0

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def set_timesteps(self, steps: int) -> None:
        self.timesteps = torch.arange(steps - 1, -1, -1) * 10

    def scale_model_input(self, sample: torch.Tensor, t) -> torch.Tensor:
        return sample

    def step(self, model_output, t, sample, eta=0.0):
        assert eta == 0.0
        self.outputs.append(model_output.clone())
        return SimpleNamespace(prev_sample=sample - 0.1 * model_output)


def test_the_loop_uses_classifier_free_guidance_eps_u_plus_s_times_eps_c_minus_eps_u():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    latents = torch.randn(4, 2, 3, 3, generator=g)

    def eps_c(x, t):  # what a model conditioned on ``cond`` predicts
        return torch.sin(x) + 0.01 * float(t) + 1.0

    def eps_u(x, t):
        return torch.cos(x) - 0.02 * float(t)

    seen = []

    def eps_fn(model_input, t, embeddings):
        assert model_input.shape[0] == embeddings.shape[0] == 8
        seen.append(embeddings)
        half = model_input.shape[0] // 2
        # the batch is [unconditional; conditional]: the first half carries uncond's embedding
        assert torch.equal(embeddings[:half], uncond.expand(half, 5, 3))
        assert torch.equal(embeddings[half:], cond.expand(half, 5, 3))
        return torch.cat([eps_u(model_input[:half], t), eps_c(model_input[half:], t)])

    scale = 7.5
    scheduler = _RecordingScheduler()
    out = generative.sample_latents(eps_fn, scheduler, latents, cond, uncond, scale, steps=3)
    assert len(scheduler.outputs) == 3 and len(seen) == 3
    # replay the loop by hand with the formula
    x = latents * scheduler.init_noise_sigma
    for t, given in zip(scheduler.timesteps, scheduler.outputs):
        expected = eps_u(x, t) + scale * (eps_c(x, t) - eps_u(x, t))
        torch.testing.assert_close(given, expected, rtol=0, atol=0)
        x = x - 0.1 * expected
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    # the paper's Eq. 5, (1 + w) eps_c - w eps_u, is the same guidance with w = s - 1
    a, b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    torch.testing.assert_close(generative.guided_eps(a, b, scale), (1 + (scale - 1)) * b - (scale - 1) * a)
    assert torch.equal(generative.guided_eps(a, b, 0.0), a)
    torch.testing.assert_close(generative.guided_eps(a, b, 1.0), b)  # a + (b - a): b up to rounding


# generation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (3, 12, 12)])
def test_generation_is_deterministic_and_in_the_runs_input_shape(input_shape):
    algo = OSCAR(_options(images_per_class=3), _env(input_shape))
    condition = np.random.default_rng(0).standard_normal((77, 32)).astype(np.float32)
    first = algo.generate(1, 2, 5, condition)
    assert first.dtype == torch.uint8 and tuple(first.shape) == (3, *input_shape)
    assert torch.equal(first, algo.generate(1, 2, 5, condition))
    # keyed by (seed, round, client, class): another key, other noise
    assert not torch.equal(first, algo.generate(1, 3, 5, condition))
    assert not torch.equal(first, algo.generate(2, 2, 5, condition))
    other_seed = OSCAR(_options(images_per_class=3), _env(input_shape, seed=1))
    assert not torch.equal(first, other_seed.generate(1, 2, 5, condition))
    # the images become model inputs of the run's shape through the dataset's normalisation
    x = normalise(first, MEAN_STD, torch.device("cpu"))
    assert x.shape == (3, *input_shape)
    torch.testing.assert_close(x, (first.float() / 255 - 0.5) / 0.25)


def test_generated_pixels_follow_the_runs_channels_and_resolution():
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gray = to_run_pixels(rgb, (1, 8, 8))
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
    assert torch.equal(gray, (luma * 255).round().to(torch.uint8))
    assert to_run_pixels(rgb, (3, 28, 20)).shape == (2, 3, 28, 20)
    # normalised inputs back to pixels (what the captioner sees): gray becomes 3 equal channels
    pixels = unit_rgb(normalise(gray, MEAN_STD, torch.device("cpu")), MEAN_STD)
    assert pixels.shape == (2, 3, 8, 8) and torch.equal(pixels[:, 0], pixels[:, 2])
    torch.testing.assert_close(pixels[:, :1], gray.float() / 255)


def test_tiny_models_are_identical_when_built_twice_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    pairs = [(generative.tiny_captioner().model, generative.tiny_captioner().model),
             (generative.tiny_text_encoder().model, generative.tiny_text_encoder().model),
             (generative.tiny_diffusion().unet, generative.tiny_diffusion().unet),
             (generative.tiny_diffusion().vae, generative.tiny_diffusion().vae)]
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the tiny tokenizer is the caption's path between captioner and text encoder
    tokenizer = generative.tiny_tokenizer()
    ids = tokenizer(["w5 w999 hello"], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert ids[:6].tolist() == [1, 5, 999, 3, 2, 0] and ids.shape == (77,)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "w5 w999"


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory):
    """The tiny models saved the way real checkpoints come: a BLIP directory (model + processor) and a
    Stable Diffusion directory (text_encoder/, tokenizer/, unet/, vae/, scheduler/)."""
    import diffusers
    import transformers

    root = tmp_path_factory.mktemp("weights")
    captioner = generative.tiny_captioner()
    captioner.model.save_pretrained(root / "blip")
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=captioner.tokenizer).save_pretrained(root / "blip")
    encoder = generative.tiny_text_encoder()
    encoder.model.save_pretrained(root / "sd" / "text_encoder")
    encoder.tokenizer.save_pretrained(root / "sd" / "tokenizer")
    diffusion = generative.tiny_diffusion()
    diffusion.unet.save_pretrained(root / "sd" / "unet")
    diffusion.vae.save_pretrained(root / "sd" / "vae")
    diffusers.DDIMScheduler(**generative.DDIM_SETTINGS).save_pretrained(root / "sd" / "scheduler")
    return root


def test_weights_from_local_directories_give_what_the_same_models_give_in_memory(local_dirs):
    paths = {"captioner_path": str(local_dirs / "blip"), "text_encoder_path": str(local_dirs / "sd"),
             "diffusion_path": str(local_dirs / "sd")}
    assert generative.text_encoder_shape(paths["text_encoder_path"], tiny=False) == (77, 32)
    loaded = OSCAR(_options(tiny=False, **paths), _env())
    tiny = OSCAR(_options(), _env())
    data = _data(4, [0, 3, 3, 9])
    assert loaded.client_update(_ctx(1, data)).payload.pack() == tiny.client_update(_ctx(1, data)).payload.pack()
    condition = np.random.default_rng(1).standard_normal((77, 32)).astype(np.float32)
    assert torch.equal(loaded.generate(1, 1, 3, condition), tiny.generate(1, 1, 3, condition))
    assert loaded.payload_size_hint() == tiny.payload_size_hint()


# the fold and the server phase --------------------------------------------------------------------------------
def _fold(algo: OSCAR, uploads: dict[int, Payload], round_: int = 1) -> torch.Tensor:
    algo.server_begin(round_)
    for client, payload in sorted(uploads.items()):
        algo.server_accumulate(client, Payload.unpack(payload.pack()), 1.0)
    return algo.server_finish()


def _uploads() -> dict[int, Payload]:
    algo = OSCAR(_options(), _env())
    return {0: algo.client_update(_ctx(0, _data(0, [1, 2, 2]))).payload,
            2: algo.client_update(_ctx(2, _data(2, [2, 6]))).payload}


def _fresh() -> OSCAR:
    return OSCAR(_options(), _env())


def test_fold_keeps_every_client_class_and_the_model_is_not_averaged():
    uploads = _uploads()
    algo = _fresh()
    start = algo.env.model.vector.clone()
    new = _fold(algo, uploads)
    assert torch.equal(new, start)
    assert algo.server_message(1).model is False
    state = algo.server_state()
    assert state["oscar.clients"].tolist() == [0, 0, 2, 2] and state["oscar.classes"].tolist() == [1, 2, 2, 6]
    assert state["oscar.encodings"].shape == (4, 77, 32)
    assert algo.server_phase_epochs(1) == 3
    stats = algo.server_phase_epoch(1, 1)
    assert stats["images"] == 4 * 3 and stats["steps"] == 2 and stats["generate_seconds"] > 0
    assert not torch.equal(algo.env.model.vector, start)  # the classifier trained in place
    assert algo.server_state()["oscar.labels"].tolist() == [1] * 3 + [2] * 6 + [6] * 3
    algo.server_phase_end(1)
    assert algo.server_state() == {}


def test_a_picture_of_the_generated_set_when_snapshots_are_due(tmp_path):
    from PIL import Image

    algo = OSCAR(_options(), replace(_env(), run_dir=tmp_path, save_snapshots=1))
    _fold(algo, _uploads())
    algo.server_phase_epoch(1, 1)
    with Image.open(tmp_path / "snapshots" / "round-000001.png") as picture:
        assert picture.mode == "RGB" and picture.height == 20 + 4 * (56 + 4)  # 4 (client, class) rows of 8px x 7
    quiet = OSCAR(_options(), replace(_env(), run_dir=tmp_path / "quiet"))
    _fold(quiet, _uploads())
    quiet.server_phase_epoch(1, 1)
    assert not (tmp_path / "quiet").exists()


@pytest.mark.parametrize("stop_after", [0, 1, 2])
def test_resume_between_phase_epochs_reaches_the_same_model_bit_for_bit(stop_after):
    uploads = _uploads()
    straight = _fresh()
    _fold(straight, uploads)
    for epoch in (1, 2, 3):
        straight.server_phase_epoch(1, epoch)
    first = _fresh()
    _fold(first, uploads)
    for epoch in range(1, stop_after + 1):
        first.server_phase_epoch(1, epoch)
    # what a checkpoint keeps: the model vector and server_state() as numpy arrays (through npz)
    vector = first.env.model.vector.clone()
    state = {k: np.array(v) for k, v in first.server_state().items()}
    assert ("oscar.images" in state) == (stop_after > 0) and ("oscar.encodings" in state) == (stop_after == 0)
    if stop_after:
        assert "oscar.momentum" in state and state["oscar.images"].dtype == np.uint8
    resumed = _fresh()
    resumed.env.model.load_(vector)
    resumed.load_server_state(dict(state))
    for epoch in range(stop_after + 1, 4):
        resumed.server_phase_epoch(1, epoch)
    assert torch.equal(resumed.env.model.vector, straight.env.model.vector)
    # momentum is part of it: resuming without it gives another model
    if stop_after:
        state.pop("oscar.momentum")
        lost = _fresh()
        lost.env.model.load_(vector)
        lost.load_server_state(state)
        for epoch in range(stop_after + 1, 4):
            lost.server_phase_epoch(1, epoch)
        assert not torch.equal(lost.env.model.vector, straight.env.model.vector)


def test_learning_rate_steps_like_steplr():
    algo = OSCAR(_options(server_lr=0.1, lr_step=7, lr_gamma=0.1), _env())
    assert [algo.lr(e) for e in (1, 7, 8, 14, 15)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_bad_server_state_is_refused():
    algo = _fresh()
    with pytest.raises(ValueError, match="unexpected server state"):
        algo.load_server_state({"oscar.round": np.array([1]), "oscar.images": np.zeros((1, 1, 8, 8), np.uint8),
                                "oscar.labels": np.zeros(1, np.int64), "oscar.extra": np.zeros(1)})
    with pytest.raises(ValueError, match="do not fit"):
        algo.load_server_state({"oscar.round": np.array([1]), "oscar.images": np.zeros((1, 3, 8, 8), np.uint8),
                                "oscar.labels": np.zeros(1, np.int64)})
    with pytest.raises(ValueError, match="unexpected server state"):
        algo.load_server_state({"velocity": np.zeros(3)})
    algo.load_server_state({})
    assert algo.server_state() == {}


def _damage(kind: str, payload: Payload) -> Payload:
    classes, encodings, meta = payload.arrays["classes"].copy(), payload.arrays["encodings"].copy(), dict(payload.meta)
    if kind == "unsorted":
        classes = classes[::-1].copy()
    elif kind == "duplicate":
        classes[1] = classes[0]
    elif kind == "out_of_range":
        classes[-1] = 10
    elif kind == "negative":
        classes[0] = -1
    elif kind == "nan":
        encodings[0, 3, 1] = np.nan
    elif kind == "short":
        encodings = encodings[:, :76]
    elif kind == "count":
        encodings = encodings[:1]
    elif kind == "float64":
        encodings = encodings.astype(np.float64)
    elif kind == "int64_classes":
        classes = classes.astype(np.int64)
    elif kind == "round":
        meta["round"] = 2
    elif kind == "extra_meta":
        meta["note"] = "x"
    elif kind == "missing":
        return Payload(meta=meta, arrays={"classes": classes})
    else:
        raise AssertionError(kind)
    return Payload(meta=meta, arrays={"classes": classes, "encodings": encodings})


@pytest.mark.parametrize("kind", ["unsorted", "duplicate", "out_of_range", "negative", "nan", "short", "count",
                                  "float64", "int64_classes", "round", "extra_meta", "missing"])
def test_damaged_uploads_are_refused_naming_client_and_round(kind):
    good = _uploads()[0]
    algo = _fresh()
    algo.server_begin(1)
    with pytest.raises(ValueError, match="client 0, round 1"):
        algo.server_accumulate(0, Payload.unpack(_damage(kind, good).pack()), 1.0)
    algo.server_accumulate(0, Payload.unpack(good.pack()), 1.0)
    algo.server_finish()
    assert algo.server_state()["oscar.classes"].tolist() == [1, 2]


# errors and config -----------------------------------------------------------------------------------------------
def test_missing_weights_are_named_with_the_public_checkpoints():
    with pytest.raises(ValueError, match=r"algorithm\.captioner_path is not set.*local directory") as info:
        OSCAR.Options().validate()
    assert "stable-diffusion-v1-4" in str(info.value) or "BLIP" in str(info.value)
    with pytest.raises(ValueError, match=r"algorithm\.text_encoder_path") as info:
        OSCAR.Options(captioner_path="/models/blip").validate()
    assert "CLIP" in str(info.value)
    with pytest.raises(ValueError, match=r"algorithm\.diffusion_path.*CompVis/stable-diffusion-v1-4"):
        OSCAR.Options(captioner_path="/a", text_encoder_path="/b").validate()
    OSCAR.Options(captioner_path="/a", text_encoder_path="/b", diffusion_path="/c").validate()
    with pytest.raises(RunError, match=r"algorithm\.diffusion_path='/nonexistent/sd'.*not a directory"):
        generative.cached("diffusion", "/nonexistent/sd", False, torch.device("cpu"), torch.float32)
    with pytest.raises(RunError, match=r"algorithm\.text_encoder_path.*config.json"):
        generative.text_encoder_shape(str(ROOT / "configs"), tiny=False)


@pytest.mark.parametrize("options", [
    {"images_per_class": 0}, {"steps": 0}, {"guidance": -1.0}, {"guidance": float("nan")}, {"encoding_dtype": "int8"},
    {"model_dtype": "float64"}, {"caption_top_p": 0.0}, {"server_momentum": 1.0}, {"lr_gamma": 0.0},
    {"server_lr": 0.0}, {"tiny": "yes"}, {"captioner_path": ""}, {"latent_size": -1},
])
def test_invalid_options_name_the_key(options):
    key = next(iter(options))
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        _options(**options).validate()


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(RunError, match=r"pip install 'osfed-hpc\[generative\]'"):
        generative.require_generative()


def test_shipped_config_resolves_to_a_one_shot_run():
    config = load_config(ROOT / "configs" / "mnist5k_oscar.yaml", [])
    assert get_algorithm(config.algorithm["name"]) is OSCAR
    assert config.rounds == 1
    options = config.algorithm_options()
    assert options.tiny is True
    env = replace(_env((1, 28, 28)), num_classes=10)
    algo = OSCAR(options, env)
    assert algo.server_phase_epochs(1) == options.server_epochs
