"""Frozen foundation models for generative one-shot methods (OSCAR): an image captioner, a text
encoder and a text-conditioned latent diffusion model, loaded from LOCAL directories or built tiny
and random from configs.

Why local directories only: compute nodes of a cluster usually have no internet, and a run must not
depend on what a hub serves today. Every ``from_pretrained`` here passes ``local_files_only=True``;
download the weights once on a machine with internet (see ``PUBLIC_CHECKPOINTS``) and point the
options at the directories.

Why tiny random models: BLIP, CLIP and Stable Diffusion cannot be downloaded in the test
environment and would take hours on a CPU. ``tiny_*`` builds the same classes
(``BlipForConditionalGeneration``, ``CLIPTextModel``, ``UNet2DConditionModel``, ``AutoencoderKL``,
``DDIMScheduler``) from small configs with a fixed seed, identical on every rank and every run, so
the whole pipeline (captions, encodings, guided sampling, decoding) runs in seconds. Their output is
noise: a classifier trained on it is at chance level. They test the plumbing, not the method.

The tiny tokenizer: a word-level ``tokenizers`` vocabulary built in memory (no vocab files):
``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3 and the words ``w4`` ... ``w999`` for ids 4..999.
The tiny captioner writes ids in that vocabulary, which decode to captions like ``"w17 w532 w8"``;
the tiny text encoder tokenizes those captions back into ids (``<bos> ... <eos>`` padded with
``<pad>`` to 77), so the caption really crosses from the captioner to the text encoder as text, as
with the real models.

Randomness: caption sampling (nucleus, as in the OSCAR code) draws from a ``torch.Generator`` passed
in (Gumbel-max: argmax of the nucleus-filtered logits plus Gumbel noise drawn on the CPU is a draw
from the filtered softmax), never from the global RNG; DDIM with eta = 0 is deterministic given the
initial latents, which the caller draws from its keyed stream.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import RunError
from .rng import torch_stream

EXTRA = "pip install 'osfed-hpc[generative]'"

#: where the models the OSCAR paper and code used come from (download on a machine with internet)
PUBLIC_CHECKPOINTS = {
    "captioner_path": (
        "a transformers BLIP captioner directory, e.g. Salesforce/blip-image-captioning-large "
        "(the OSCAR code captions with BLIP-2 FlanT5-XL through LAVIS, blip2_t5/caption_coco_flant5xl; "
        "this project uses transformers' BlipForConditionalGeneration instead)"
    ),
    "text_encoder_path": (
        "a CLIP text encoder + tokenizer directory, e.g. the text_encoder/ and tokenizer/ of "
        "CompVis/stable-diffusion-v1-4 (the Stable Diffusion directory itself works: its text_encoder/ and "
        "tokenizer/ subfolders are used) or openai/clip-vit-large-patch14"
    ),
    "diffusion_path": (
        "a diffusers Stable Diffusion directory with unet/, vae/ (and scheduler/) subfolders, "
        "e.g. CompVis/stable-diffusion-v1-4 (the paper's model)"
    ),
}
DOWNLOAD_HINT = (
    "download on a machine with internet, e.g. `huggingface-cli download CompVis/stable-diffusion-v1-4 "
    "--local-dir /shared/models/sd-v1-4` and `huggingface-cli download Salesforce/blip-image-captioning-large "
    "--local-dir /shared/models/blip-large`, copy the directories to the cluster and set the option to the path"
)

#: the tiny models' sizes (tests and CPU demos)
TINY_VOCAB = 1000
TINY_SEQ_LEN = 77
TINY_HIDDEN = 32
TINY_CAPTION_IMAGE = 32
TINY_LATENT = 8
_SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}

#: DDIM as the OSCAR code builds it (Stable Diffusion's betas, no clipping, no alpha-to-one)
DDIM_SETTINGS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def require_generative() -> tuple[Any, Any]:
    """(transformers, diffusers), or a clear error naming the extra that installs them."""
    try:
        import diffusers
        import transformers
    except ImportError as exc:
        raise RunError(f"OSCAR's captioner, text encoder and diffusion model need transformers and diffusers "
                       f"({exc.msg}): {EXTRA}") from None
    return transformers, diffusers


def missing_path_message(option: str) -> str:
    """The error for ``algorithm.<option>`` unset while ``algorithm.tiny`` is false."""
    return (f"algorithm.{option} is not set: give a local directory with {PUBLIC_CHECKPOINTS[option]}; "
            f"{DOWNLOAD_HINT}. Weights are never fetched from a hub at run time. "
            f"(algorithm.tiny=true builds tiny random models instead: a pipeline test, accuracy at chance)")


def _directory(path: str | Path, option: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise RunError(f"algorithm.{option}={str(path)!r} is not a directory; it must hold {PUBLIC_CHECKPOINTS[option]}")
    return directory


def _load(loader: Callable[..., Any], directory: Path, option: str, **kwargs: Any) -> Any:
    """``loader(directory, local_files_only=True, ...)``, with a missing/damaged file named as the option's."""
    try:
        return loader(str(directory), local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise RunError(f"algorithm.{option}={str(directory)!r}: cannot load {getattr(loader, '__qualname__', loader)} "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); it must hold "
                       f"{PUBLIC_CHECKPOINTS[option]}") from None


def _to(module: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """``module`` on ``device`` in ``dtype``, frozen, in eval mode (dtype given to ``.to`` only when it
    changes: diffusers warns about casting otherwise)."""
    module = module.to(device) if next(module.parameters()).dtype == dtype else module.to(device, dtype)
    return module.eval().requires_grad_(False)


@contextmanager
def _seeded(part: str):
    """Global RNG seeded with a fixed key for one model's random init, restored afterwards: model
    constructors draw from the global generator and take no ``generator`` argument."""
    seed = torch_stream(0, f"generative-tiny-{part}").initial_seed()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# tokenizer -----------------------------------------------------------------------------------------
def tiny_tokenizer(max_length: int = TINY_SEQ_LEN) -> Any:
    """A word-level tokenizer of ``TINY_VOCAB`` ids built in memory (see the module docstring)."""
    transformers, _ = require_generative()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = dict(_SPECIALS)
    vocab.update({f"w{i}": i for i in range(len(_SPECIALS), TINY_VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", _SPECIALS["<bos>"]), ("<eos>", _SPECIALS["<eos>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        model_max_length=max_length)


# captioner -----------------------------------------------------------------------------------------
class _GumbelNoise:
    """Logits processor: adds Gumbel(0, 1) noise drawn on the CPU from ``generator``. Followed by
    greedy decoding, argmax(logits + G) is an exact draw from softmax(logits) (-inf stays -inf, so a
    nucleus filter before it is respected), and the draw is keyed instead of global."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.rand(scores.shape, generator=self.generator, dtype=torch.float32)
        uniform.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - 2**-24)
        gumbel = -torch.log(-torch.log(uniform))
        return scores + gumbel.to(scores.device, scores.dtype)


@dataclass
class Captioner:
    """A frozen image-to-text model (transformers BLIP) and the tokenizer that decodes its ids."""

    model: Any  # BlipForConditionalGeneration
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB pixels in [0, 1] (N, 3, H, W) -> the captioner's input: bicubic resize to its image
        size and its normalisation (what BlipImageProcessor does, in torch on the device)."""
        x = pixels.to(self.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def caption(self, pixels: torch.Tensor, generator: torch.Generator | None, top_p: float = 0.9,
                max_tokens: int = 30) -> list[str]:
        """One caption per image. ``generator`` given: nucleus sampling with ``top_p`` (the OSCAR
        code's setting), keyed; None: greedy decoding."""
        transformers, _ = require_generative()
        if pixels.shape[0] == 0:
            return []
        processors = transformers.LogitsProcessorList()
        if generator is not None:
            processors.append(transformers.TopPLogitsWarper(top_p=top_p))
            processors.append(_GumbelNoise(generator))
        ids = self.model.generate(pixel_values=self.preprocess(pixels), do_sample=False, num_beams=1,
                                  max_new_tokens=max_tokens, logits_processor=processors)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def tiny_captioner(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Captioner:
    """A random BLIP (vision 32x32 in 8x8 patches, 2 layers, hidden 32; text decoder over the tiny
    vocabulary), the same weights on every call."""
    transformers, _ = require_generative()
    config = transformers.BlipConfig(
        text_config={"vocab_size": TINY_VOCAB, "hidden_size": TINY_HIDDEN, "encoder_hidden_size": TINY_HIDDEN,
                     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 64, "bos_token_id": _SPECIALS["<bos>"],
                     "eos_token_id": _SPECIALS["<eos>"], "sep_token_id": _SPECIALS["<eos>"],
                     "pad_token_id": _SPECIALS["<pad>"]},
        vision_config={"hidden_size": TINY_HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": TINY_CAPTION_IMAGE, "patch_size": 8},
        projection_dim=TINY_HIDDEN,
    )
    with _seeded("captioner"):
        model = transformers.BlipForConditionalGeneration(config)
    model = _to(model, device, dtype)
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return Captioner(model, tiny_tokenizer(), TINY_CAPTION_IMAGE, clip_mean, clip_std)


def load_captioner(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   option: str = "captioner_path") -> Captioner:
    """BLIP from a local directory (``BlipForConditionalGeneration`` + its processor's tokenizer,
    image size and normalisation)."""
    transformers, _ = require_generative()
    directory = _directory(path, option)
    processor = _load(transformers.BlipProcessor.from_pretrained, directory, option)
    model = _load(transformers.BlipForConditionalGeneration.from_pretrained, directory, option, dtype=dtype)
    model = model.to(device).eval().requires_grad_(False)
    image = processor.image_processor
    size = image.size.get("height", model.config.vision_config.image_size) if isinstance(image.size, dict) \
        else model.config.vision_config.image_size
    return Captioner(model, processor.tokenizer, int(size), tuple(image.image_mean), tuple(image.image_std))


# text encoder --------------------------------------------------------------------------------------
@dataclass
class TextEncoder:
    """A frozen CLIP text encoder and its tokenizer. ``encode`` gives the last hidden states
    (N, seq_len, hidden): Stable Diffusion's conditioning (the tokens padded to seq_len, no
    attention mask, as diffusers' StableDiffusionPipeline does)."""

    model: Any  # CLIPTextModel
    tokenizer: Any
    seq_len: int
    hidden: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.seq_len, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """float32 (N, seq_len, hidden) on the model's device."""
        if not captions:
            return torch.zeros((0, self.seq_len, self.hidden), device=self.device)
        ids = self.token_ids(captions).to(self.device)
        return self.model(input_ids=ids).last_hidden_state.float()


def tiny_text_encoder(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    """A random CLIPTextModel (hidden 32, 2 layers, 2 heads, vocabulary 1000, 77 positions)."""
    transformers, _ = require_generative()
    config = transformers.CLIPTextConfig(
        vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TINY_SEQ_LEN, projection_dim=TINY_HIDDEN,
        pad_token_id=_SPECIALS["<pad>"], bos_token_id=_SPECIALS["<bos>"], eos_token_id=_SPECIALS["<eos>"])
    with _seeded("text-encoder"):
        model = transformers.CLIPTextModel(config)
    model = _to(model, device, dtype)
    return TextEncoder(model, tiny_tokenizer(TINY_SEQ_LEN), TINY_SEQ_LEN, TINY_HIDDEN)


def _text_encoder_dirs(directory: Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir): a Stable Diffusion directory's text_encoder/ and tokenizer/, or
    one directory holding both."""
    if (directory / "text_encoder").is_dir():
        tokenizer = directory / "tokenizer"
        return directory / "text_encoder", tokenizer if tokenizer.is_dir() else directory
    return directory, directory


def text_encoder_shape(path: str | Path | None, tiny: bool, option: str = "text_encoder_path") -> tuple[int, int]:
    """(seq_len, hidden) of the text encoder's output, from its config.json alone (no model load,
    no transformers import): what the server checks payloads against."""
    if tiny:
        return TINY_SEQ_LEN, TINY_HIDDEN
    if path is None:
        raise RunError(missing_path_message(option))
    model_dir, _ = _text_encoder_dirs(_directory(path, option))
    try:
        config = json.loads((model_dir / "config.json").read_text())
        config = config.get("text_config", config)
        return int(config.get("max_position_embeddings", 77)), int(config["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"algorithm.{option}={str(path)!r}: cannot read the text encoder's config.json ({exc}); "
                       f"it must hold {PUBLIC_CHECKPOINTS[option]}") from None


def load_text_encoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      option: str = "text_encoder_path") -> TextEncoder:
    """CLIPTextModel + its tokenizer from a local directory (see ``_text_encoder_dirs``)."""
    transformers, _ = require_generative()
    model_dir, tokenizer_dir = _text_encoder_dirs(_directory(path, option))
    model = _load(transformers.CLIPTextModel.from_pretrained, model_dir, option, dtype=dtype)
    tokenizer = _load(transformers.AutoTokenizer.from_pretrained, tokenizer_dir, option)
    model = model.to(device).eval().requires_grad_(False)
    seq_len = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
    return TextEncoder(model, tokenizer, seq_len, int(model.config.hidden_size))


# diffusion -----------------------------------------------------------------------------------------
def guided_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as the OSCAR code (and diffusers) writes it: eps_u + s (eps_c - eps_u).
    The paper's Eq. 5, (1 + w) eps_c - w eps_u, is the same with w = s - 1."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sample_latents(eps_fn: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor], scheduler: Any,
                   latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
                   steps: int) -> torch.Tensor:
    """The denoising loop, written out: for each of the scheduler's ``steps`` timesteps, one call of
    ``eps_fn(model_input, t, embeddings)`` on the batch [unconditional; conditional] (2B samples, as
    Stable Diffusion does it), the guided noise ``guided_eps`` and one DDIM step (eta = 0: no noise).

    ``latents``: the initial noise (B, C, h, w); ``cond``/``uncond``: (seq, d) or (B, seq, d)."""
    batch = latents.shape[0]
    cond = cond.expand(batch, *cond.shape[-2:]) if cond.dim() == 2 else cond
    uncond = uncond.expand(batch, *uncond.shape[-2:]) if uncond.dim() == 2 else uncond
    embeddings = torch.cat([uncond, cond])
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_uncond, eps_cond = eps_fn(model_input, t, embeddings).chunk(2)
        latents = scheduler.step(guided_eps(eps_uncond, eps_cond, guidance), t, latents, eta=0.0).prev_sample
    return latents


@dataclass
class Diffusion:
    """A frozen latent diffusion model: UNet (text cross-attention), VAE decoder, DDIM settings."""

    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    scheduler_config: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def cross_attention_dim(self) -> int:
        dim = self.unet.config.cross_attention_dim
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    def latent_shape(self, latent_size: int = 0) -> tuple[int, int, int]:
        """(channels, size, size) of the initial noise; ``latent_size`` 0: the UNet's sample size."""
        size = latent_size or int(self.unet.config.sample_size)
        return int(self.unet.config.in_channels), size, size

    def scheduler(self) -> Any:
        """A fresh DDIM scheduler (it keeps per-run state: one per generation call)."""
        _, diffusers = require_generative()
        return diffusers.DDIMScheduler.from_config(self.scheduler_config)

    def _eps(self, model_input: torch.Tensor, t: Any, embeddings: torch.Tensor) -> torch.Tensor:
        return self.unet(model_input, t, encoder_hidden_states=embeddings).sample

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, uncond: torch.Tensor, noise: torch.Tensor, guidance: float,
                 steps: int, batch_size: int) -> torch.Tensor:
        """Images in [0, 1], float32 (N, 3, H, W) on the CPU, one per row of ``noise`` (N, C, h, w),
        all conditioned on ``cond`` (seq, d) and guided away from ``uncond`` (seq, d)."""
        cond = cond.to(self.device, self.dtype)
        uncond = uncond.to(self.device, self.dtype)
        images = []
        for start in range(0, noise.shape[0], batch_size):
            latents = noise[start : start + batch_size].to(self.device, self.dtype)
            latents = sample_latents(self._eps, self.scheduler(), latents, cond, uncond, guidance, steps)
            images.append(self.decode(latents))
        if not images:
            return torch.zeros((0, 3, 0, 0))
        return torch.cat(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode as Stable Diffusion does: x = D(z / scaling + shift), then [-1, 1] -> [0, 1]."""
        config = self.vae.config
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            latents = latents + config.shift_factor
        image = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp_(0.0, 1.0).cpu()


def tiny_diffusion(cross_attention_dim: int = TINY_HIDDEN, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Diffusion:
    """A random UNet2DConditionModel (8x8 latents, blocks (32, 64), cross-attention ``cross_attention_dim``)
    and AutoencoderKL (one block of 32: no downsampling, 4 latent channels, so 8x8 RGB images)."""
    _, diffusers = require_generative()
    with _seeded("unet"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=TINY_LATENT, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    with _seeded("vae"):
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), latent_channels=4, sample_size=TINY_LATENT)
    return Diffusion(_to(unet, device, dtype), _to(vae, device, dtype), dict(DDIM_SETTINGS))


def load_diffusion(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   option: str = "diffusion_path") -> Diffusion:
    """UNet and VAE of a local Stable Diffusion directory; DDIM with the checkpoint's scheduler/
    betas when present (clip_sample and set_alpha_to_one off, as the OSCAR code sets them), else
    ``DDIM_SETTINGS``."""
    _, diffusers = require_generative()
    directory = _directory(path, option)
    unet = _load(diffusers.UNet2DConditionModel.from_pretrained, directory, option, subfolder="unet", torch_dtype=dtype)
    vae = _load(diffusers.AutoencoderKL.from_pretrained, directory, option, subfolder="vae", torch_dtype=dtype)
    settings = dict(DDIM_SETTINGS)
    if (directory / "scheduler").is_dir():
        loaded = _load(diffusers.DDIMScheduler.from_pretrained, directory, option, subfolder="scheduler")
        settings = {**dict(loaded.config), "clip_sample": False, "set_alpha_to_one": False}
    return Diffusion(unet.to(device).eval().requires_grad_(False), vae.to(device).eval().requires_grad_(False), settings)


# one copy per process ------------------------------------------------------------------------------
_CACHE: dict[tuple, Any] = {}


def cached(kind: str, path: str | None, tiny: bool, device: torch.device, dtype: torch.dtype,
           extra: Any = None) -> Any:
    """The model ``kind`` ("captioner", "text_encoder", "diffusion") built or loaded once per process:
    with one rank, the server and the worker side share it instead of holding two copies."""
    key = (kind, "tiny" if tiny else str(path), str(device), str(dtype), extra)
    if key not in _CACHE:
        option = f"{kind}_path"
        if not tiny and path is None:
            raise RunError(missing_path_message(option))
        if kind == "captioner":
            model = tiny_captioner(device, dtype) if tiny else load_captioner(path, device, dtype)
        elif kind == "text_encoder":
            model = tiny_text_encoder(device, dtype) if tiny else load_text_encoder(path, device, dtype)
        elif kind == "diffusion":
            model = tiny_diffusion(extra or TINY_HIDDEN, device, dtype) if tiny else load_diffusion(path, device, dtype)
        else:
            raise ValueError(f"unknown generative model kind {kind!r}")
        _CACHE[key] = model
    return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached model (tests; a long-lived process between runs)."""
    _CACHE.clear()
