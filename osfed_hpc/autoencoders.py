"""Latent spaces for distillate synthesis (FedSD2C): one small interface, three implementations.

FedSD2C (NeurIPS 2024) optimises each distillate as a latent ``z`` of a pretrained autoencoder and
uploads ``z`` instead of pixels, so the upload is the latent's size and the server sees only
``decode(z)``. Every implementation here maps *pixel* images (values in [0, 1], ``[B, C, H, W]`` at
the run's resolution) to latents and back, differentiably in ``z``:

- ``vae`` (the paper): a pretrained ``diffusers.AutoencoderKL`` (SDXL's VAE, "stabilityai/sdxl-vae")
  read from a **local** directory (never a hub: compute nodes have no network). Inputs go in as
  ``2 x pixels - 1`` (the diffusers convention); 1-channel images are replicated to the VAE's 3
  channels and resized to a multiple of the VAE's downsampling factor (methods.md 7.3 B: MNIST 28^2 ->
  32^2 -> a 4x4x4 latent); decoding undoes both (channel mean, resize back).
- ``tiny_vae``: a tiny, randomly initialised ``AutoencoderKL`` built from a config under a fixed seed
  (identical on every rank and every run): exercises the diffusers path on a CPU, in tests. Its
  latents carry no learned structure, so accuracy with it means nothing.
- ``pool`` (ours, not the paper's): parameter free. ``encode`` = average pooling by ``factor``,
  ``decode`` = bilinear upsampling to the image size. It keeps the method's shape (a compressed,
  optimisable latent the server decodes) where no pretrained VAE is available, e.g. MNIST on a laptop.
  With factor 4 a 1-channel image has as many latent values (H W / 16) as SDXL's 4-channel latent.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UserError

AUTOENCODERS = ("vae", "tiny_vae", "pool")
#: the seed the tiny VAE's weights are drawn from: fixed, so every rank (and every run) builds the same one
TINY_VAE_SEED = 20240917


class Autoencoder:
    """``encode(pixels) -> latents``, ``decode(latents) -> pixels``, ``latent_shape`` (one image).

    Pixels are ``[B, C, H, W]`` in [0, 1] at ``image_shape``; latents are float32
    ``[B, *latent_shape]``. ``decode`` must be differentiable in its input."""

    name: str = ""

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        self.image_shape = tuple(int(s) for s in image_shape)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def latent_bytes(self) -> int:
        """Bytes of one image's latent as float32: what a client uploads per distillate."""
        return 4 * math.prod(self.latent_shape)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != self.image_shape:
            raise ValueError(f"{self.name} autoencoder expects images of shape [B, {', '.join(map(str, self.image_shape))}], "
                             f"got {list(pixels.shape)}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 1 + len(self.latent_shape) or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.name} autoencoder expects latents of shape [B, {', '.join(map(str, self.latent_shape))}], "
                             f"got {list(latents.shape)}")


class PoolAutoencoder(Autoencoder):
    """Ours: latent = the image average-pooled by ``factor`` (per channel), decode = bilinear upsampling.

    A side that ``factor`` does not divide gets ``ceil(side / factor)`` latent rows (adaptive pooling)."""

    name = "pool"

    def __init__(self, image_shape: tuple[int, int, int], factor: int) -> None:
        super().__init__(image_shape)
        c, h, w = self.image_shape
        if not (isinstance(factor, int) and not isinstance(factor, bool) and 1 <= factor <= min(h, w)):
            raise ValueError(f"algorithm.pool_factor must be an integer in [1, {min(h, w)}] for {h}x{w} images, got {factor!r}")
        self.factor = factor
        self._latent = (c, -(-h // factor), -(-w // factor))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        return F.adaptive_avg_pool2d(pixels.float(), self._latent[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return F.interpolate(latents, size=self.image_shape[1:], mode="bilinear", align_corners=False)


class DiffusersAutoencoder(Autoencoder):
    """A ``diffusers.AutoencoderKL`` (frozen, eval mode): the paper's SDXL VAE or the tiny test VAE.

    The latent is the mode of the posterior (as the paper's code: ``latent_dist.mode()``); the VAE's
    ``scaling_factor`` is not applied (it only matters to a diffusion model)."""

    def __init__(self, vae: Any, image_shape: tuple[int, int, int], name: str) -> None:
        super().__init__(image_shape)
        self.name = name
        self.vae = vae.eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        c, h, w = self.image_shape
        config = vae.config
        self.vae_channels = int(config.in_channels)
        if int(config.out_channels) != self.vae_channels:
            raise ValueError(f"{name}: the VAE maps {config.in_channels} channels to {config.out_channels}; expected the same")
        if c != self.vae_channels and not (c == 1 and self.vae_channels == 3):
            raise ValueError(f"{name}: images have {c} channels, the VAE takes {self.vae_channels} "
                             "(only 1-channel images are replicated to 3)")
        #: spatial downsampling: every down block but the last halves the resolution
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.work_size = (-(-h // self.factor) * self.factor, -(-w // self.factor) * self.factor)
        self._latent = (int(config.latent_channels), self.work_size[0] // self.factor, self.work_size[1] // self.factor)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent

    def _param_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        x = pixels.float() * 2 - 1
        if x.shape[1] != self.vae_channels:
            x = x.expand(-1, self.vae_channels, -1, -1)
        if tuple(x.shape[2:]) != self.work_size:
            x = F.interpolate(x, size=self.work_size, mode="bilinear", align_corners=False, antialias=True)
        z = self.vae.encode(x.to(self._param_dtype())).latent_dist.mode()
        return z.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        x = self.vae.decode(latents.to(self._param_dtype())).sample.float()
        if tuple(x.shape[2:]) != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False, antialias=True)
        if self.image_shape[0] != self.vae_channels:
            x = x.mean(dim=1, keepdim=True)
        return (x + 1) / 2


def _autoencoder_kl():
    """``diffusers.AutoencoderKL``, or a one-line error naming the extra that installs it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise UserError("algorithm.autoencoder=vae/tiny_vae needs the diffusers package: "
                        f"pip install 'osfed-hpc[generative]' ({exc})") from None
    return AutoencoderKL


def tiny_vae_model(channels: int, seed: int = TINY_VAE_SEED) -> Any:
    """A tiny ``AutoencoderKL`` (two blocks of 8 and 16 channels, 4 latent channels, factor 2, about
    43k parameters for one channel) with weights drawn from ``seed`` on the CPU without touching the
    global random state: the same weights on every rank."""
    AutoencoderKL = _autoencoder_kl()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=channels, out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        )


def pretrained_vae_model(path: str | os.PathLike | None) -> Any:
    """``AutoencoderKL.from_pretrained`` of a local directory (``config.json`` + weights), offline."""
    if not path:
        raise UserError("algorithm.autoencoder=vae needs algorithm.vae_path: a local directory holding a diffusers "
                        "AutoencoderKL (the paper uses stabilityai/sdxl-vae; download it where there is network, "
                        "copy it here); or choose algorithm.autoencoder=pool (ours, no weights)")
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"algorithm.vae_path {path!r}: no config.json there; expected a local diffusers "
                        "AutoencoderKL directory (e.g. a copy of stabilityai/sdxl-vae)")
    AutoencoderKL = _autoencoder_kl()
    try:
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"algorithm.vae_path {path!r}: cannot load a diffusers AutoencoderKL ({type(exc).__name__}: {exc})") from None


def build_autoencoder(kind: str, image_shape: tuple[int, int, int], device: torch.device | str = "cpu", *,
                      pool_factor: int = 4, vae_path: str | None = None) -> Autoencoder:
    """The autoencoder ``kind`` (one of ``AUTOENCODERS``) for images of ``image_shape``, on ``device``."""
    if kind == "pool":
        return PoolAutoencoder(image_shape, pool_factor)
    if kind == "tiny_vae":
        return DiffusersAutoencoder(tiny_vae_model(int(image_shape[0])).to(device), image_shape, "tiny_vae")
    if kind == "vae":
        return DiffusersAutoencoder(pretrained_vae_model(vae_path).to(device), image_shape, "vae")
    raise ValueError(f"algorithm.autoencoder must be one of {', '.join(map(repr, AUTOENCODERS))}, got {kind!r}")
