"""``dataset.json``: the manifest that makes a directory of shards a dataset.

The manifest is written last, so its presence means "conversion finished"; its bytes are hashed
into the dataset fingerprint that partitions and checkpoints refer to. This module only knows the
schema (read, check, write); ``hdf5.py`` checks the shards against it and ``prepare.py`` builds it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic
from .errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
SOURCES = ("mnist5k", "digits", "imagefolder")
ENCODINGS = ("raw", "jpeg")
SPLITS = ("train", "test")

# ImageNet statistics: the conventional normalisation for natural RGB images, used for every
# imagefolder dataset so that pretrained-style models see the inputs they expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def manifest_bytes(meta: dict[str, Any]) -> bytes:
    """The canonical serialisation (sorted keys, indented, trailing newline) that gets hashed."""
    return (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8")


def write_manifest(directory: Path, meta: dict[str, Any]) -> None:
    """Validate ``meta`` and write it atomically as ``directory/dataset.json``."""
    check_manifest(meta, directory / MANIFEST_NAME)
    write_bytes_atomic(directory / MANIFEST_NAME, manifest_bytes(meta))


def fingerprint_of(data: bytes) -> str:
    """First 16 hex characters of the sha256 of the manifest bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def read_manifest(directory: Path) -> tuple[dict[str, Any], bytes]:
    """Read and check ``directory/dataset.json``; return the parsed dict and its raw bytes."""
    if not directory.exists():
        raise DataError(f"{directory}: dataset directory does not exist")
    if not directory.is_dir():
        raise DataError(f"{directory}: expected a dataset directory, found a file")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: missing; expected the manifest of a prepared dataset "
            "(a directory without it is an unfinished conversion: rerun 'prepare' to resume it)"
        )
    data = path.read_bytes()
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    check_manifest(meta, path)
    return meta, data


def _require(meta: dict[str, Any], key: str, types: type | tuple[type, ...], path: Path) -> Any:
    if key not in meta:
        raise DataError(f"{path}: missing key '{key}'")
    value = meta[key]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        raise DataError(f"{path}: key '{key}' should be {_type_names(types)}, found {value!r}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(types))


def check_manifest(meta: Any, path: Path) -> None:
    """Raise ``DataError`` (naming ``path`` and the key) unless ``meta`` follows the schema."""
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    version = _require(meta, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {version} is not supported (this code reads {FORMAT_VERSION})"
        )
    source = _require(meta, "source", str, path)
    if source not in SOURCES:
        raise DataError(f"{path}: key 'source' should be one of {SOURCES}, found {source!r}")
    encoding = _require(meta, "encoding", str, path)
    if encoding not in ENCODINGS:
        raise DataError(f"{path}: key 'encoding' should be one of {ENCODINGS}, found {encoding!r}")
    channels = _require(meta, "channels", int, path)
    if channels < 1:
        raise DataError(f"{path}: key 'channels' should be >= 1, found {channels}")
    shape = meta.get("image_shape")
    if encoding == "raw":
        if (
            not isinstance(shape, list)
            or len(shape) != 3
            or not all(isinstance(v, int) and v > 0 for v in shape)
        ):
            raise DataError(
                f"{path}: key 'image_shape' should be [C, H, W] (positive ints) for raw "
                f"encoding, found {shape!r}"
            )
        if shape[0] != channels:
            raise DataError(f"{path}: image_shape {shape} disagrees with channels {channels}")
    elif shape is not None:
        raise DataError(f"{path}: key 'image_shape' should be null for jpeg encoding, found {shape!r}")
    classes = _require(meta, "classes", list, path)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: key 'classes' should be a non-empty list of names")
    for key in ("mean", "std"):
        stats = _require(meta, key, list, path)
        if len(stats) != channels or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in stats
        ):
            raise DataError(f"{path}: key '{key}' should hold {channels} finite numbers, found {stats!r}")
    if any(v <= 0 for v in meta["std"]):
        raise DataError(f"{path}: key 'std' should be positive, found {meta['std']!r}")
    _require(meta, "seed", int, path)
    splits = _require(meta, "splits", dict, path)
    for split in SPLITS:
        if split not in splits:
            raise DataError(f"{path}: missing split '{split}' under 'splits'")
    for split, info in splits.items():
        _check_split(split, info, len(classes), path)


def _check_split(split: str, info: Any, num_classes: int, path: Path) -> None:
    where = f"{path}: splits.{split}"
    if not isinstance(info, dict):
        raise DataError(f"{where} should be an object")
    count = info.get("count")
    if not isinstance(count, int) or count < 0:
        raise DataError(f"{where}.count should be a non-negative int, found {count!r}")
    class_counts = info.get("class_counts")
    if not isinstance(class_counts, list) or len(class_counts) != num_classes:
        raise DataError(f"{where}.class_counts should be a list of {num_classes} ints")
    if sum(class_counts) != count:
        raise DataError(f"{where}.class_counts sum to {sum(class_counts)}, expected count {count}")
    shards = info.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{where}.shards should be a list")
    total = 0
    for k, shard in enumerate(shards):
        if (
            not isinstance(shard, dict)
            or not isinstance(shard.get("file"), str)
            or not isinstance(shard.get("count"), int)
            or shard["count"] < 0
        ):
            raise DataError(f"{where}.shards[{k}] should be {{'file': str, 'count': int >= 0}}")
        if Path(shard["file"]).name != shard["file"]:
            raise DataError(f"{where}.shards[{k}].file should be a bare file name, found {shard['file']!r}")
        total += shard["count"]
    if total != count:
        raise DataError(f"{where}: shard counts sum to {total}, expected count {count}")
