"""A bank of augmented patches cut from ONE image: the shared distillation data of "Federated Learning
with a Single Shared Image" (Soni, Saeed, Asano, CVPR'24 LIMIT workshop; methods.md section 10.1).

Every party (server and clients) builds the same bank once, from the same image, the same seed and the
same run resolution, so what crosses the wire each round is a list of patch *indices*, never pixels.
That only works if the bank is bitwise identical on every rank: all random parameters are drawn from
one keyed stream (``torch_stream(seed, "patch-bank")``) on the CPU, the pixel operations are
deterministic torchvision functional ops on CPU tensors, and the result is quantised to uint8 (the
paper stores its patches as 8-bit JPEG files; we keep them as 8-bit pixels in memory, without the
JPEG loss). ``fingerprint`` lets a client check that its bank is the server's.

Per patch, the pipeline of the reference generator (``make_single_img_dataset.py``), with its
32-pixel output scaled to the run's resolution R:

1. RandomCrop of side 0.5 * min(H, W) from the source image;
2. RandomResizedCrop to int(sqrt(2) * R) pixels with area scale in [1/500, 1] and aspect ratio in
   [3/4, 4/3], bicubic (antialiased), retried until the box fits (no centre-crop fallback, as in the
   reference);
3. RandomAffine: rotation in [-30, 30] degrees, x-shear in [-30, 30] degrees, bilinear, black fill;
4. CenterCrop R;
5. with probability 0.5, ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1), its four
   operations in a random order;
6. (ours) to the dataset's channels: ITU-R 601 luma for 1-channel data (MNIST), RGB kept for 3.

The model input is then ``uint8 * scale + shift`` = (pixel / 255 - mean) / std with the dataset's
normalisation (``Environment.pixel_mean_std``), the same formula the data loader uses.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict

import numpy as np
import torch

from .rng import torch_stream

#: ``algorithm.image: null``: a real photograph every scikit-learn installation ships
DEFAULT_IMAGE = "china.jpg"
#: the reference generator's fixed augmentation parameters
INITIAL_CROP = 0.5
AREA_SCALE = (1.0 / 500.0, 1.0)
ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
DEGREES = 30.0
SHEAR = 30.0
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_P = 0.5
#: banks kept per process (server and worker of one rank share one)
_CACHE_SIZE = 4
_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def load_source_image(image: str | None) -> torch.Tensor:
    """The source image as uint8 (3, H, W). ``None``: scikit-learn's bundled ``china.jpg``; a path: the
    user's file read with Pillow. Errors name the option ``algorithm.image``."""
    if image is None:
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as exc:
            raise ImportError("algorithm.image: null uses scikit-learn's bundled photo; install it with "
                              "pip install 'osfed-hpc[demo]' or set algorithm.image to an image file") from exc
        array = np.asarray(load_sample_image(DEFAULT_IMAGE), dtype=np.uint8)
    else:
        from PIL import Image, UnidentifiedImageError

        path = os.fspath(image)
        try:
            with Image.open(path) as picture:
                array = np.asarray(picture.convert("RGB"), dtype=np.uint8)
        except FileNotFoundError:
            raise ValueError(f"algorithm.image: no such file {path!r}") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ValueError(f"algorithm.image: cannot read {path!r} as an image ({type(exc).__name__}: {exc})") from None
    if array.ndim != 3 or min(array.shape[:2]) < 2:
        raise ValueError(f"algorithm.image: the image must be at least 2x2 pixels, got {array.shape[:2]}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high: int) -> int:
    """An integer in [0, high)."""
    return int(torch.randint(0, high, (), generator=generator))


def _resized_crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop box, retried until it fits."""
    area = height * width
    log_low, log_high = math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1])
    for _ in range(10_000):  # the reference loops forever; a square source fits within a few tries
        target = area * _uniform(generator, *AREA_SCALE)
        aspect = math.exp(_uniform(generator, log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
    return 0, 0, height, width


def sample_patch(source: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One augmented RGB patch, float (3, size, size) in [0, 1], from ``source`` float (3, H, W) in [0, 1]."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    _, height, width = source.shape
    side = int(INITIAL_CROP * min(height, width))
    x = TF.crop(source, _randint(generator, height - side + 1), _randint(generator, width - side + 1), side, side)
    big = max(size, int(math.sqrt(2) * size))
    top, left, h, w = _resized_crop_box(side, side, generator)
    x = TF.resized_crop(x, top, left, h, w, [big, big], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clamps to 8 bits
    angle = _uniform(generator, -DEGREES, DEGREES)
    shear = _uniform(generator, -SHEAR, SHEAR)
    x = TF.affine(x, angle=angle, translate=[0.0, 0.0], scale=1.0, shear=[shear, 0.0],
                  interpolation=InterpolationMode.BILINEAR, fill=[0.0])
    x = TF.center_crop(x, [size, size])
    if float(torch.rand((), generator=generator, dtype=torch.float64)) < JITTER_P:
        order = torch.randperm(4, generator=generator).tolist()
        b, c, s, hue = JITTER
        factors = [_uniform(generator, 1 - b, 1 + b), _uniform(generator, 1 - c, 1 + c),
                   _uniform(generator, 1 - s, 1 + s), _uniform(generator, -hue, hue)]
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for i in order:
            x = ops[i](x, factors[i])
    return x.clamp_(0.0, 1.0)


def build_patch_bank(image: str | None, num_patches: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """The bank: uint8 (num_patches, channels, size, size) on the CPU, the same on every rank.

    Cached per process (a rank that is both server and worker builds it once); treat it as read-only."""
    if channels not in (1, 3):
        raise ValueError(f"algorithm.name=singleimage: patch banks are made for 1- or 3-channel data, got {channels}")
    if num_patches < 1 or size < 1:
        raise ValueError(f"algorithm.num_patches and the resolution must be >= 1, got {num_patches}, {size}")
    key = (_image_key(image), int(num_patches), int(channels), int(size), int(seed))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    source = load_source_image(image).float().div_(255.0)
    generator = torch_stream(seed, "patch-bank")
    bank = torch.empty((num_patches, channels, size, size), dtype=torch.uint8)
    with torch.no_grad():
        for i in range(num_patches):
            patch = sample_patch(source, size, generator)
            if channels == 1:
                import torchvision.transforms.v2.functional as TF

                patch = TF.rgb_to_grayscale(patch, num_output_channels=1)
            bank[i] = patch.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    _cache[key] = bank
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return bank


def _image_key(image: str | None) -> tuple:
    if image is None:
        return ("sklearn", DEFAULT_IMAGE)
    path = os.path.abspath(os.fspath(image))
    try:
        stat = os.stat(path)
    except OSError:
        return ("file", path)  # load_source_image raises the error that names the option
    return ("file", path, stat.st_size, stat.st_mtime_ns)


def normaliser(mean_std: tuple[tuple[float, ...], tuple[float, ...]], channels: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with model input = uint8 * scale + shift = (pixel / 255 - mean) / std.

    A single mean/std value serves every channel (as the data loader does)."""
    mean = torch.tensor(mean_std[0], dtype=torch.float32)
    std = torch.tensor(mean_std[1], dtype=torch.float32)
    if mean.numel() == 1:
        mean, std = mean.expand(channels), std.expand(channels)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"pixel mean/std have {mean.numel()}/{std.numel()} values for {channels}-channel patches")
    scale = (1.0 / (255.0 * std)).view(-1, 1, 1).to(device)
    shift = (-mean / std).view(-1, 1, 1).to(device)
    return scale, shift


def normalise(patches: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 patches -> normalised float32 model inputs (on ``scale``'s device)."""
    return patches.to(scale.device, non_blocking=True).float() * scale + shift


def fingerprint(bank: torch.Tensor) -> str:
    """SHA-256 (hex) of the bank's bytes: equal on every rank, or the run is wrong."""
    return hashlib.sha256(bank.contiguous().numpy().tobytes()).hexdigest()
