"""Fixtures of the data-layer tests: real small datasets and tiny image-folder trees.

Datasets are prepared once per session (a few seconds in all); tests that modify a dataset copy
it first (``copy_dataset``).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("cat", "dog", "owl")


def natural_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth random image (blurred noise + gradient): compresses like a photo, not like noise."""
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_tree(root: Path, per_class: int, seed: int, specials: bool) -> dict[str, list[str]]:
    """Class folders of JPEGs under ``root``; with ``specials`` add the awkward files.

    Specials (all in class ``dog``): a grey PNG, an RGBA PNG, a CMYK JPEG, an oversized JPEG,
    a file of random bytes named .jpg and a truncated JPEG. Returns the bad files' relative paths.
    """
    rng = np.random.default_rng(seed)
    bad: list[str] = []
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            (root / c / f"img{k:03d}.jpg").write_bytes(jpeg_bytes(natural_image(rng, w, h)))
    if specials:
        dog = root / "dog"
        natural_image(rng, 50, 70, "L").save(dog / "grey.png")
        natural_image(rng, 64, 48, "RGBA").save(dog / "alpha.png")
        natural_image(rng, 60, 60, "CMYK").save(dog / "cmyk.jpg", format="JPEG")
        (dog / "large.JPEG").write_bytes(jpeg_bytes(natural_image(rng, 300, 200)))
        (dog / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        whole = jpeg_bytes(natural_image(rng, 80, 80))
        (dog / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (dog / "notes.txt").write_text("not an image, ignored")
        bad = [str(p.relative_to(root.parent if root.name in ("train", "val") else root))
               for p in (dog / "corrupt.jpg", dog / "truncated.jpg")]
    return {"bad": bad}


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    """ROOT/train/<class> (6 JPEGs each + specials) and ROOT/val/<class> (2 JPEGs each)."""
    root = tmp_path_factory.mktemp("tree") / "imagenet"
    write_tree(root / "train", per_class=6, seed=1, specials=True)
    write_tree(root / "val", per_class=2, seed=2, specials=False)
    return root


@pytest.fixture(scope="session")
def flat_tree(tmp_path_factory) -> Path:
    """ROOT/<class>/*.jpg without train/val: split by test_fraction."""
    root = tmp_path_factory.mktemp("flat") / "photos"
    write_tree(root, per_class=10, seed=3, specials=False)
    return root


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    from osfed_hpc.data import prepare_dataset

    return prepare_dataset("mnist5k", tmp_path_factory.mktemp("mnist") / "mnist5k", progress=False)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> Path:
    from osfed_hpc.data import prepare_dataset

    return prepare_dataset("digits", tmp_path_factory.mktemp("digits") / "digits", progress=False)


@pytest.fixture(scope="session")
def jpeg_dir(tmp_path_factory, image_tree) -> Path:
    """The image tree prepared with small shards (4 images) and max side 64."""
    from osfed_hpc.data import prepare_dataset

    out = tmp_path_factory.mktemp("jpeg") / "ds"
    return prepare_dataset("imagefolder", out, root=image_tree, max_side=64, shard_size=4,
                           workers=1, progress=False)


@pytest.fixture
def copy_dataset(tmp_path) -> Callable[[Path], Path]:
    """Copy a prepared dataset to a fresh directory, to damage it safely."""

    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy-{src.name}"
        shutil.copytree(src, dst)
        return dst

    return copy
