"""Image work shared by conversion and loading: normalise to RGB, re-encode, decode + crop.

Kept free of torch so that conversion workers start fast and so the same code runs in a
DataLoader worker, a conversion process or a plain benchmark loop.

Two decisions worth knowing:
* Conversion stores an RGB JPEG with its longer side at most ``max_side``. A source file that is
  already such a JPEG is stored byte-for-byte (after a full decode to prove it is readable):
  no second lossy generation, and most of ImageNet is converted at decode cost only.
* Decoding for training crops first and resizes the crop in one antialiased PIL call. The crop box
  is drawn from the image size in the header with a per-sample ``np.random.Generator``, so the
  result does not depend on which process decodes the sample.
* ``draft=True`` (off by default, ``data.jpeg_draft``) asks libjpeg (``Image.draft``) to decode at
  1/2, 1/4 or 1/8 scale whenever the crop stays at least as large as the output: a 1024 px image
  cropped to 224 px decodes several times faster. It changes the pixels (libjpeg's DCT-domain
  scaling is not PIL's antialiased resize; mean difference ~1-3 grey levels), so it is an explicit
  choice. With stored images of at most 512 px it rarely applies at 224 px and never at 336+ px.
* Pixels are written straight into a caller's ``uint8 [3, r, r]`` slot (``*_into``), one colour
  plane at a time: no per-sample array, no strided HWC -> CHW copy.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # raised by some PIL plugins on malformed headers
    ValueError,
    EOFError,
    Image.DecompressionBombError,
)
EVAL_CROP_FRACTION = 0.875  # resize the shorter side to resolution / 0.875, then center crop


def describe_error(exc: BaseException) -> str:
    """``Type: message`` without PIL's ``<_io.BytesIO object at 0x...>`` (not reproducible)."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
    return f"{type(exc).__name__}: {text}"


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an RGB version of ``img`` (grey, palette, CMYK, 16-bit and alpha images included).

    Transparent pixels are composited onto white, which is how such an image is displayed;
    dropping alpha would expose whatever colour happens to be stored under them (often black).
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at most ``max_side``, aspect kept, never upscaled."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_for_storage(data: bytes, max_side: int, quality: int) -> bytes:
    """Turn the bytes of any image file into the stored RGB JPEG; raises a ``DECODE_ERRORS`` type.

    Decoding is complete (``load()``), so a truncated or corrupt file fails here, at conversion,
    and not in the middle of training.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        target = fit_size(*img.size, max_side)
        keep = img.format == "JPEG" and img.mode == "RGB" and target == img.size
        if img.format == "JPEG" and target != img.size:
            img.draft("RGB", target)  # decode at a reduced scale that is still >= target
        img.load()
    if keep:
        return data
    img = to_rgb(img)
    if img.size != target:
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, optimize=False)
    return out.getvalue()


def read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) as torchvision's ``RandomResizedCrop`` samples it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the whole image, clamped to the allowed aspect range, centered.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, resolution: int) -> tuple[float, float, float, float]:
    """Box (in source pixels) equal to "resize shorter side to resolution/0.875, center crop"."""
    resized_short = round(resolution / EVAL_CROP_FRACTION)
    side = min(width, height) * resolution / resized_short
    return (width - side) / 2, (height - side) / 2, side, side


def _decode_box(img: Image.Image, box: tuple[float, float, float, float], resolution: int,
                draft: bool = False) -> Image.Image:
    """Decode the opened ``img`` and resize ``box`` to r x r (at reduced DCT scale if ``draft``)."""
    width, height = img.size
    left, top, w, h = box
    if draft and img.format == "JPEG":
        # Largest libjpeg downscale for which the box still covers >= resolution pixels.
        img.draft("RGB", (math.ceil(width * resolution / w), math.ceil(height * resolution / h)))
    img = to_rgb(img)
    sx, sy = img.size[0] / width, img.size[1] / height
    region = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return img.resize((resolution, resolution), Image.Resampling.BILINEAR, box=region)


def write_chw(out: np.ndarray, img: Image.Image) -> None:
    """Copy RGB ``img`` into ``out`` (``uint8 [3, H, W]``, C-contiguous planes), plane by plane.

    PIL stores RGB as 4 bytes per pixel; its packer hands out one band ("R", "G", "B") as a
    contiguous plane, so three plain copies replace ``np.asarray`` + a strided HWC -> CHW copy
    (164 us instead of 617 us for a 448 px image on the benchmark machine).
    """
    _, h, w = out.shape
    for c, band in enumerate("RGB"):
        out[c] = np.frombuffer(img.tobytes("raw", band), dtype=np.uint8).reshape(h, w)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, without decoding pixels."""
    return Image.open(io.BytesIO(data)).size


def train_params(size: tuple[int, int], rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """(crop box, flip) of the training transform, in the order every decode path draws them."""
    box = random_resized_crop_box(*size, rng)
    return box, bool(rng.random() < 0.5)


def decode_train_into(out: np.ndarray, data: Any, resolution: int, rng: np.random.Generator,
                      draft: bool = False) -> None:
    """RandomResizedCrop(resolution, scale=(0.08, 1)) + horizontal flip into ``out`` ``uint8 [3, r, r]``."""
    img = Image.open(io.BytesIO(data))  # parses the header only: the size is known before decoding
    box, flip = train_params(img.size, rng)
    img = _decode_box(img, box, resolution, draft)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    write_chw(out, img)


def decode_eval_into(out: np.ndarray, data: Any, resolution: int, draft: bool = False) -> None:
    """Resize shorter side to round(resolution / 0.875) + center crop into ``out`` ``uint8 [3, r, r]``."""
    img = Image.open(io.BytesIO(data))
    write_chw(out, _decode_box(img, center_crop_box(*img.size, resolution), resolution, draft))


def decode_train(data: Any, resolution: int, rng: np.random.Generator, draft: bool = False) -> np.ndarray:
    """``decode_train_into`` a fresh ``uint8 [3, r, r]`` array."""
    out = np.empty((3, resolution, resolution), dtype=np.uint8)
    decode_train_into(out, data, resolution, rng, draft)
    return out


def decode_eval(data: Any, resolution: int, draft: bool = False) -> np.ndarray:
    """``decode_eval_into`` a fresh ``uint8 [3, r, r]`` array."""
    out = np.empty((3, resolution, resolution), dtype=np.uint8)
    decode_eval_into(out, data, resolution, draft)
    return out
