"""DatasetReader: eager validation with messages that name the file, and reading."""

from __future__ import annotations

import json
import os
import pickle

import h5py
import numpy as np
import pytest

from osfed_hpc.data import DataError, DatasetReader, verify_dataset


def _rewrite_shard(path, **datasets):
    """Replace datasets of a shard in place (keeping the others and the attributes)."""
    with h5py.File(path, "a") as f:
        for key, value in datasets.items():
            del f[key]
            f.create_dataset(key, data=value)


def test_properties(mnist_dir):
    reader = DatasetReader(mnist_dir)
    assert reader.path == mnist_dir and reader.num_classes == 10
    assert reader.class_names == [str(c) for c in range(10)]
    assert reader.encoding == "raw" and reader.image_shape == (1, 28, 28) and reader.channels == 1
    assert len(reader.mean) == 1 and len(reader.std) == 1
    assert reader.count("train") == 4000 and reader.labels("train").shape == (4000,)
    assert len(reader.fingerprint) == 16 and reader.meta["format_version"] == 1
    assert reader.locate("train", 5) == (mnist_dir / "train-00000.h5", 5)


def test_read_raw_order_repeats_and_across_shards(tmp_path):
    from osfed_hpc.data import prepare_dataset

    out = prepare_dataset("digits", tmp_path / "d", shard_size=100, progress=False)
    reader = DatasetReader(out)
    assert len(reader.shard_paths("train")) > 10
    everything = reader.read_raw("train")
    idx = np.array([1400, 3, 3, 250, 99, 100, 0, 1437])
    assert np.array_equal(reader.read_raw("train", idx), everything[idx])
    rng = np.random.default_rng(0)
    sparse = rng.choice(len(everything), 30, replace=False)
    assert np.array_equal(reader.read_raw("train", sparse), everything[sparse])
    assert reader.read_raw("train", np.array([], dtype=np.int64)).shape == (0, 8, 8, 1)
    with pytest.raises(DataError, match=r"index 5000 out of range for split 'train'"):
        reader.read_raw("train", [5000])
    with pytest.raises(DataError, match="no split 'val'"):
        reader.count("val")


def test_read_raw_sparse_selection(mnist_dir):
    reader = DatasetReader(mnist_dir)
    everything = reader.read_raw("train")
    few = np.array([3999, 17, 2048, 17])  # few rows of a large shard: read row by row
    assert np.array_equal(reader.read_raw("train", few), everything[few])


def test_reader_reopens_after_fork_and_pickles_without_handles(mnist_dir):
    reader = DatasetReader(mnist_dir)
    first = reader.read_raw("test", [0, 1])
    assert reader._handles  # opened lazily by the read
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handles == {} and np.array_equal(clone.read_raw("test", [0, 1]), first)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's handle
        ok = np.array_equal(reader.read_raw("test", [0, 1]), first) and reader._pid == os.getpid()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    reader.close()


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DatasetReader(tmp_path / "nope")
    with pytest.raises(DataError, match=r"dataset\.json: missing"):
        DatasetReader(tmp_path)


def test_bad_manifest(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    (ds / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON"):
        DatasetReader(ds)
    meta = json.loads((mnist_dir / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps(dict(meta, format_version=7)))
    with pytest.raises(DataError, match="format_version 7 is not supported"):
        DatasetReader(ds)


def test_missing_shard(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    (ds / "test-00000.h5").unlink()
    with pytest.raises(DataError, match=r"test-00000\.h5: shard 0 of split 'test' .* is missing"):
        DatasetReader(ds)


def test_truncated_shard(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    shard = ds / "train-00000.h5"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(DataError, match=r"train-00000\.h5: not an HDF5 file or truncated"):
        DatasetReader(ds)


def test_non_hdf5_shard(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    (ds / "train-00000.h5").write_bytes(b"PK\x03\x04 certainly not HDF5" * 100)
    with pytest.raises(DataError, match=r"train-00000\.h5: not an HDF5 file or truncated"):
        DatasetReader(ds)


def test_labels_out_of_range(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    shard = ds / "test-00000.h5"
    with h5py.File(shard, "r") as f:
        labels = f["labels"][()]
    labels[17] = 10
    _rewrite_shard(shard, labels=labels)
    with pytest.raises(DataError, match=r"test-00000\.h5: label 10 at index 17 out of range \(expected 0\.\.9\)"):
        DatasetReader(ds)


def test_labels_disagree_with_class_counts(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    shard = ds / "test-00000.h5"
    with h5py.File(shard, "r") as f:
        labels = f["labels"][()]
    labels[labels == 3] = 4
    _rewrite_shard(shard, labels=labels)
    with pytest.raises(DataError, match="expected class_counts"):
        DatasetReader(ds)


def test_wrong_length(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    shard = ds / "test-00000.h5"
    with h5py.File(shard, "r") as f:
        images, labels = f["images"][()], f["labels"][()]
    _rewrite_shard(shard, images=images[:-1], labels=labels[:-1])
    with pytest.raises(DataError, match=r"test-00000\.h5: dataset 'labels' has shape \(999,\), expected \(1000,\)"):
        DatasetReader(ds)


def test_raw_images_wrong_dtype(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    shard = ds / "test-00000.h5"
    with h5py.File(shard, "r") as f:
        images = f["images"][()]
    _rewrite_shard(shard, images=images.astype(np.float32))
    with pytest.raises(DataError, match=r"test-00000\.h5: dataset 'images' has dtype float32, expected uint8"):
        DatasetReader(ds)


def test_raw_images_wrong_shape(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    shard = ds / "test-00000.h5"
    with h5py.File(shard, "r") as f:
        images = f["images"][()]
    _rewrite_shard(shard, images=images.reshape(1000, 1, 28, 28))
    with pytest.raises(DataError, match=r"expected \(1000, 28, 28, 1\) \[n, H, W, C\]"):
        DatasetReader(ds)


def test_missing_images_dataset(copy_dataset, mnist_dir):
    ds = copy_dataset(mnist_dir)
    with h5py.File(ds / "train-00000.h5", "a") as f:
        del f["images"]
    with pytest.raises(DataError, match=r"train-00000\.h5: missing dataset 'images'"):
        DatasetReader(ds)


def test_jpeg_reading_and_corrupt_sample_found_by_verify(copy_dataset, jpeg_dir):
    reader = DatasetReader(jpeg_dir)
    data = reader.read_encoded("test", 5)
    assert data[:2] == b"\xff\xd8"
    with pytest.raises(DataError, match="needs a raw dataset"):
        reader.read_raw("train", [0])
    ds = copy_dataset(jpeg_dir)
    shard = ds / "train-00001.h5"
    with h5py.File(shard, "a") as f:
        f["images"][2] = np.frombuffer(b"\xff\xd8 garbage", dtype=np.uint8)
    with pytest.raises(DataError, match=r"train-00001\.h5: image 2 \(global 6 of 'train'\) does not decode"):
        verify_dataset(ds, sample=1000)
