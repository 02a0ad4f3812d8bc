"""Loaders: order from the caller's generator only; in-memory and JPEG paths agree in shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from osfed_hpc.data import DataError, DatasetReader, EncodedImages, InMemoryImages, build_eval_data, build_train_data
from osfed_hpc.data.loader import batch_plan

ROOT = Path(__file__).resolve().parents[2]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def collect(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return DatasetReader(mnist_dir)


@pytest.fixture(scope="module")
def jpeg(jpeg_dir):
    return DatasetReader(jpeg_dir)


def test_batch_plan_covers_each_sample_once_per_epoch():
    positions, slices = batch_plan(gen(0), 10, 4, epochs=3)
    assert [e - s for s, e in slices] == [4, 4, 2] * 3
    for p in range(3):
        assert sorted(positions[p * 10 : (p + 1) * 10].tolist()) == list(range(10))
    _, slices = batch_plan(gen(0), 10, 4, epochs=2, drop_last=True)
    assert [e - s for s, e in slices] == [4, 4, 4, 4]


def test_batch_plan_steps_cycle_with_fresh_permutations():
    positions, slices = batch_plan(gen(1), 10, 4, steps=7)
    assert [e - s for s, e in slices] == [4, 4, 2, 4, 4, 2, 4]
    assert not torch.equal(positions[:10], positions[10:20])
    with pytest.raises(DataError, match="3 samples < batch_size 4 with drop_last"):
        batch_plan(gen(1), 3, 4, steps=2, drop_last=True)
    with pytest.raises(DataError, match="no samples"):
        batch_plan(gen(1), 0, 4, steps=2)
    assert batch_plan(gen(1), 0, 4, epochs=1)[1] == []


def test_in_memory_same_generator_same_batches(mnist):
    data = InMemoryImages(mnist, "train", np.arange(0, 4000, 3), "cpu")
    client = data.client(np.arange(0, 900, 3))
    a = collect(client.batches(gen(7), 32, epochs=2))
    b = collect(client.batches(gen(7), 32, epochs=2))
    c = collect(client.batches(gen(8), 32, epochs=2))
    assert same(a, b) and not same(a, c)
    assert a[0][0].shape == (32, 1, 28, 28) and a[0][0].dtype == torch.float32 and a[0][1].dtype == torch.int64


def test_in_memory_batches_follow_the_plan_and_do_not_depend_on_the_union(mnist):
    client_idx = np.arange(100, 400, 7)
    small = InMemoryImages(mnist, "train", client_idx, "cpu").client(client_idx)
    large = InMemoryImages(mnist, "train", np.arange(4000), "cpu").client(client_idx)
    a = collect(small.batches(gen(3), 16, steps=5))
    assert same(a, collect(large.batches(gen(3), 16, steps=5)))
    x_all, y_all = small.full_batch()
    assert np.array_equal(y_all.numpy(), mnist.labels("train")[client_idx])
    positions, slices = batch_plan(gen(3), len(client_idx), 16, steps=5)
    for (x, y), (s, e) in zip(a, slices):
        assert torch.equal(x, x_all[positions[s:e]]) and torch.equal(y, y_all[positions[s:e]])


def test_in_memory_normalisation_and_resolution(mnist):
    native = InMemoryImages(mnist, "train", None, "cpu")
    assert abs(float(native.images.mean())) < 1e-3 and abs(float(native.images.std()) - 1) < 1e-3
    for res in (32, 48):
        data = InMemoryImages(mnist, "train", np.arange(50), "cpu", resolution=res)
        x, y = next(data.client(np.arange(50)).batches(gen(0), 8))
        assert x.shape == (8, 1, res, res) and y.shape == (8,)


def test_client_outside_the_loaded_union(mnist):
    data = InMemoryImages(mnist, "train", np.arange(10), "cpu")
    with pytest.raises(DataError, match="sample 10 is not among the samples loaded here"):
        data.client(np.array([1, 10]))


def test_in_memory_eval_batches_in_order(mnist):
    data = build_eval_data(mnist, "cpu", None, 300, 0)
    assert isinstance(data, InMemoryImages) and data.num_samples == 1000
    labels = torch.cat([y for _, y in data.eval_batches(300)])
    assert np.array_equal(labels.numpy(), mnist.labels("test"))


def test_encoded_workers_do_not_change_tensors(jpeg):
    clients = np.arange(0, 22, 2)
    zero = build_train_data(jpeg, np.arange(22), "cpu", 32, num_workers=0)
    two = build_train_data(jpeg, np.arange(22), "cpu", 32, num_workers=2)
    assert isinstance(zero, EncodedImages)
    a = collect(zero.client(clients).batches(gen(5), 4, epochs=2))
    b = collect(two.client(clients).batches(gen(5), 4, epochs=2))
    assert same(a, b) and a[0][0].shape == (4, 3, 32, 32) and a[-1][0].shape == (3, 3, 32, 32)
    b2 = collect(two.client(clients).batches(gen(5), 4, epochs=2))  # persistent workers, reused
    assert same(a, b2)
    c = collect(two.client(clients).batches(gen(6), 4, epochs=2))
    assert not same(a, c)
    two.close()


def test_encoded_full_batch_inside_a_batches_loop_and_resolution_48(jpeg):
    data = build_train_data(jpeg, np.arange(22), "cpu", 48, num_workers=0)
    client = data.client(np.array([1, 2, 3, 10]))
    for x, _ in client.batches(gen(0), 2):
        full_x, full_y = client.full_batch()
        assert x.shape == (2, 3, 48, 48) and full_x.shape == (4, 3, 48, 48)
    assert np.array_equal(full_y.numpy(), jpeg.labels("train")[[1, 2, 3, 10]])


def test_encoded_eval_is_deterministic_and_ordered(jpeg):
    data = build_eval_data(jpeg, "cpu", 32, 4, 0)
    a = collect(data.eval_batches())
    b = collect(data.eval_batches(4))
    assert same(a, b) and [x.shape[0] for x, _ in a] == [4, 2]
    assert np.array_equal(torch.cat([y for _, y in a]).numpy(), jpeg.labels("test"))
    x = torch.cat([x for x, _ in a])
    assert -3 < float(x.mean()) < 3 and float(x.min()) >= -2.2 and float(x.max()) <= 2.7  # normalised range


def test_corrupt_jpeg_at_load_names_shard_and_index(copy_dataset, jpeg_dir):
    ds = copy_dataset(jpeg_dir)
    with h5py.File(ds / "train-00001.h5", "a") as f:
        f["images"][2] = np.frombuffer(b"\xff\xd8 garbage", dtype=np.uint8)
    reader = DatasetReader(ds)
    for workers in (0, 2):
        data = build_train_data(reader, np.arange(22), "cpu", 32, num_workers=workers)
        with pytest.raises(DataError, match=r"train-00001\.h5: image 2 \(global index 6 of split 'train'\)"):
            list(data.client(np.arange(22)).batches(gen(0), 8))
        data.close()


def test_jpeg_needs_resolution(jpeg):
    with pytest.raises(DataError, match="needs a positive resolution"):
        build_train_data(jpeg, np.arange(3), "cpu", None, 0)


def test_loader_module_does_not_import_mpi4py():
    code = "import sys, osfed_hpc.data.loader; print('mpi4py' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"



@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 16), steps=st.integers(0, 30), drop_last=st.booleans())
def test_batch_plan_steps_is_exact(n, batch, steps, drop_last):
    if drop_last and n < batch:
        with pytest.raises(DataError):
            batch_plan(gen(0), n, batch, steps=steps or 1, drop_last=True)
        return
    positions, slices = batch_plan(gen(0), n, batch, steps=steps, drop_last=drop_last)
    assert len(slices) == steps
    for s, e in slices:
        assert 0 < e - s <= batch and (not drop_last or e - s == batch)
        assert len(set(positions[s:e].tolist())) == e - s  # no repeats within a batch
