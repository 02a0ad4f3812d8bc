"""Optional 8-bit image coding of snapshots (OS-Fed D.5): PNG (lossless on the 8-bit values) or JPEG.

Each snapshot is quantised to uint8 with its own float32 [min, max] range and written as one image
through Pillow: 1 channel as an "L" image, 3 channels as "RGB", any other channel count as its
planes stacked vertically in one "L" image. The wire arrays are the concatenated image files
(``snapshot_bytes``), one int32 length per snapshot (``snapshot_lengths``) and the ranges
(``snapshot_range``, [M, 2]).

The client must compute its scale and error-feedback residual from the *decoded* snapshot (what
the server will see), so decoding is a pure function of the wire arrays, shared by both sides,
and it treats the bytes as untrusted: every inconsistency is a ``ValueError``.
"""
from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

CODECS = ("png", "jpeg")
_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
ARRAY_NAMES = ("snapshot_bytes", "snapshot_lengths", "snapshot_range")


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown snapshot codec {codec!r}; choose one of {', '.join(CODECS)}")


def _to_image(plane: np.ndarray) -> Image.Image:
    """[C, H, W] uint8 -> an "RGB" image for C = 3, else an "L" image of the stacked planes."""
    c, h, w = plane.shape
    if c == 3:
        return Image.fromarray(np.ascontiguousarray(plane.transpose(1, 2, 0)))
    return Image.fromarray(np.ascontiguousarray(plane.reshape(c * h, w)))


def _image_layout(channels: int, height: int, width: int) -> tuple[str, tuple[int, int]]:
    """Pillow mode and (width, height) the image of one snapshot must have."""
    if channels == 3:
        return "RGB", (width, height)
    return "L", (width, channels * height)


def quantize(snapshots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[M, C, H, W] float -> (uint8 codes, float32 [M, 2] ranges), per snapshot min/max.

    A constant snapshot gets codes 0 and decodes to its value exactly.
    """
    x = np.asarray(snapshots, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("cannot quantise a snapshot holding NaN or Inf")
    lo = x.min(axis=(1, 2, 3))
    hi = x.max(axis=(1, 2, 3))
    if not np.isfinite(hi - lo).all():
        raise ValueError("snapshot value range overflows float32; cannot quantise it")
    span = (hi - lo).astype(np.float64)[:, None, None, None]
    scaled = np.divide(x - lo[:, None, None, None], span, out=np.zeros(x.shape), where=span > 0)
    codes = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return codes, np.stack([lo, hi], axis=1).astype(np.float32)


def dequantize(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """uint8 codes and [M, 2] ranges -> float32 values ``lo + u * (hi - lo) / 255``, all in float32."""
    lo = ranges[:, 0][:, None, None, None]
    step = ((ranges[:, 1] - ranges[:, 0]) / np.float32(255.0))[:, None, None, None]
    return (lo + codes.astype(np.float32) * step).astype(np.float32)


def encode_image(plane: np.ndarray, codec: str, quality: int) -> bytes:
    """One snapshot's uint8 codes [C, H, W] -> image file bytes (JPEG with 4:4:4 chroma, no subsampling)."""
    _check_codec(codec)
    buffer = io.BytesIO()
    if codec == "png":
        _to_image(plane).save(buffer, format="PNG")
    else:
        _to_image(plane).save(buffer, format="JPEG", quality=int(quality), subsampling=0)
    return buffer.getvalue()


def encode_snapshots(snapshots: torch.Tensor | np.ndarray, codec: str, quality: int = 90) -> dict[str, np.ndarray]:
    """[M, C, H, W] float snapshots -> the wire arrays (see the module docstring)."""
    if isinstance(snapshots, torch.Tensor):
        snapshots = snapshots.detach().to("cpu", torch.float32).numpy()
    codes, ranges = quantize(snapshots)
    blobs = [encode_image(plane, codec, quality) for plane in codes]
    return {
        "snapshot_bytes": np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(),
        "snapshot_lengths": np.array([len(b) for b in blobs], dtype=np.int32),
        "snapshot_range": ranges,
    }


def array_spec(num_snapshots: int) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """dtype and shape of each wire array, for ``payload.require`` (bytes have a data-dependent length)."""
    return {
        "snapshot_bytes": ("uint8", None),
        "snapshot_lengths": ("int32", (num_snapshots,)),
        "snapshot_range": ("float32", (num_snapshots, 2)),
    }


def _decode_image(blob: bytes, codec: str, channels: int, height: int, width: int) -> np.ndarray:
    """Image file bytes -> uint8 [C, H, W]; the format, mode and size are checked before decoding."""
    mode, size = _image_layout(channels, height, width)
    try:
        with Image.open(io.BytesIO(blob), formats=[_FORMATS[codec]]) as image:
            if image.mode != mode or image.size != size:
                raise ValueError(f"image is {image.mode} {image.size}, expected {mode} {size}")
            image.load()
            pixels = np.asarray(image, dtype=np.uint8)
    except ValueError:
        raise
    except Exception as exc:  # Pillow raises many types on damaged files; all mean "bad data"
        raise ValueError(f"cannot decode {codec} snapshot: {exc}") from None
    if channels == 3:
        return pixels.transpose(2, 0, 1)
    return pixels.reshape(channels, height, width)


def decode_snapshots(
    arrays: Mapping[str, np.ndarray], shape: tuple[int, int, int, int], codec: str
) -> torch.Tensor:
    """Wire arrays -> float32 [M, C, H, W] (CPU). ``ValueError`` on any inconsistency."""
    _check_codec(codec)
    m, c, h, w = shape
    data = np.asarray(arrays["snapshot_bytes"])
    lengths = np.asarray(arrays["snapshot_lengths"])
    ranges = np.asarray(arrays["snapshot_range"])
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"snapshot_bytes must be 1-D uint8, got {data.dtype}{list(data.shape)}")
    if lengths.shape != (m,) or ranges.shape != (m, 2) or ranges.dtype != np.float32:
        raise ValueError(f"snapshot_lengths {list(lengths.shape)} / snapshot_range {list(ranges.shape)} "
                         f"do not match {m} snapshots")
    if (lengths <= 0).any() or int(lengths.astype(np.int64).sum()) != data.size:
        raise ValueError(f"snapshot lengths {lengths.tolist()} do not add up to the {data.size} coded bytes")
    with np.errstate(over="ignore", invalid="ignore"):
        spans = ranges[:, 1] - ranges[:, 0]
    if not np.isfinite(spans).all() or (spans < 0).any():
        raise ValueError("snapshot ranges must be finite with min <= max and a finite span")
    offsets = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))])
    codes = np.stack([
        _decode_image(data[offsets[i] : offsets[i + 1]].tobytes(), codec, c, h, w) for i in range(m)
    ])
    return torch.from_numpy(dequantize(codes, ranges))
