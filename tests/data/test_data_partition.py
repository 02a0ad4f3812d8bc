"""Partitions: Dirichlet / IID draws, redraws for min_samples, save/load and its checks."""

from __future__ import annotations

import io
import json
import math
import os
import time
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osfed_hpc.cli import main as cli_main
from osfed_hpc.data import (
    DataError,
    DatasetReader,
    Partition,
    dirichlet_partition,
    iid_partition,
    load_partition,
    make_partition,
)


@pytest.fixture(scope="module")
def reader(mnist_dir):
    return DatasetReader(mnist_dir)


def _write_npz(path, indices, offsets, meta):
    buf = io.BytesIO()
    np.savez(buf, indices=np.asarray(indices, dtype=np.int64), offsets=np.asarray(offsets, dtype=np.int64),
             meta_json=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    path.write_bytes(buf.getvalue())


def test_dirichlet_disjoint_cover_sorted_deterministic():
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    parts = dirichlet_partition(labels, 7, 0.3, seed=4)
    assert len(parts) == 7 and sum(len(p) for p in parts) == 3000
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(3000))  # disjoint and complete
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = dirichlet_partition(labels, 7, 0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(labels, 7, 0.3, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_small_alpha_many_classes_is_skewed():
    labels = np.repeat(np.arange(1000), 13)
    parts = dirichlet_partition(labels, 60, 0.01, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == 13000 and sizes.min() < sizes.max() / 5
    classes_per_client = [len(np.unique(labels[p])) for p in parts]
    assert np.median(classes_per_client) < 100  # each class lands (almost) on one client


def test_iid_partition_sizes():
    parts = iid_partition(103, 10, seed=1)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] == 10 and sizes[-1] == 11
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))


def test_make_partition_meta_and_summary(reader):
    part = make_partition(reader, 5, "dirichlet", alpha=0.5, seed=3)
    meta = part.meta
    assert meta["scheme"] == "dirichlet" and meta["num_clients"] == 5 and meta["alpha"] == 0.5
    assert meta["seed"] == 3 and meta["min_samples"] == 1 and meta["num_train"] == 4000
    assert meta["dataset_fingerprint"] == reader.fingerprint
    assert part.sizes.sum() == 4000 and part.client_indices(2).dtype == np.int64
    table = part.summary_table(reader)
    assert "client" in table and "classes" in table and "min / median / max" in table
    assert len(table.splitlines()) == 5 + 2
    with pytest.raises(DataError, match="client 5 does not exist"):
        part.client_indices(5)


def test_min_samples_redraws_deterministically(reader):
    # alpha 0.05 over 10 classes and 40 clients: the first draws leave clients empty.
    part = make_partition(reader, 40, "dirichlet", alpha=0.05, seed=0, min_samples=1, max_redraws=2000)
    assert part.sizes.min() >= 1 and part.meta["draw"] > 0
    again = make_partition(reader, 40, "dirichlet", alpha=0.05, seed=0, min_samples=1, max_redraws=2000)
    assert np.array_equal(part.all_indices(), again.all_indices())


def test_min_samples_error_names_clients(reader):
    with pytest.raises(DataError) as info:
        make_partition(reader, 30, "dirichlet", alpha=0.05, seed=0, min_samples=100, max_redraws=3)
    message = str(info.value)
    assert "client " in message and "min_samples=100" in message and "--allow-small" in message
    with pytest.warns(UserWarning, match="below min_samples=100"):
        part = make_partition(reader, 30, "dirichlet", alpha=0.05, seed=0, min_samples=100,
                              max_redraws=3, allow_small=True)
    assert part.sizes.sum() == 4000


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("clients", [4001, 5000, 10**9])
def test_more_clients_than_samples_fails_at_once(reader, scheme, clients):
    """10**9 clients used to allocate per-client lists for a minute and end in MemoryError."""
    start = time.monotonic()
    with pytest.raises(DataError, match=rf"--clients {clients:,} is more than the 4,000 train samples of .*mnist5k"):
        make_partition(reader, clients, scheme, seed=0)
    assert time.monotonic() - start < 1.0


def test_impossible_min_samples_fails_before_redrawing(reader):
    start = time.monotonic()
    with pytest.raises(DataError, match=r"--clients 50 x --min-samples 100 needs 5,000 train samples"):
        make_partition(reader, 50, "dirichlet", alpha=0.5, min_samples=100, max_redraws=10_000)
    assert time.monotonic() - start < 1.0


def test_default_path(tmp_path):
    expected = tmp_path / "partitions" / "dirichlet-n60-a0.01-s0.npz"
    assert Partition.default_path(tmp_path, "dirichlet", 60, 0.01, 0) == expected
    assert Partition.default_path(tmp_path, "dirichlet", 20, 0.5, 2).name == "dirichlet-n20-a0.5-s2.npz"
    assert Partition.default_path(tmp_path, "iid", 8, 0.5, 1).name == "iid-n8-s1.npz"


def test_save_load_round_trip(reader, tmp_path):
    part = make_partition(reader, 6, "iid", seed=2)
    path = part.save(Partition.default_path(tmp_path, "iid", 6, None, 2))
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    loaded = load_partition(path, reader)
    assert loaded.num_clients == 6 and loaded.meta == part.meta
    assert all(np.array_equal(loaded.client_indices(c), part.client_indices(c)) for c in range(6))
    part.save(path)  # identical: fine
    other = make_partition(reader, 6, "iid", seed=3)
    with pytest.raises(DataError, match="different partition file already exists"):
        other.save(path)
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"indices", "offsets", "meta_json"}
        assert npz["meta_json"].dtype == np.uint8 and npz["offsets"].shape == (7,)


def test_load_errors(reader, tmp_path, mnist_dir):
    good = make_partition(reader, 4, "iid", seed=0)
    meta = good.meta
    with pytest.raises(DataError, match=r"missing\.npz: partition file does not exist"):
        load_partition(tmp_path / "missing.npz", reader)

    path = tmp_path / "trunc.npz"
    path.write_bytes(good.to_bytes()[:200])
    with pytest.raises(DataError, match=r"trunc\.npz: not a partition file"):
        load_partition(path, reader)

    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"text\.npz: not a partition file"):
        load_partition(path, reader)

    path = tmp_path / "keys.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("other.npy", b"")
    with pytest.raises(DataError, match=r"keys\.npz: not a partition file"):
        load_partition(path, reader)

    path = tmp_path / "range.npz"
    _write_npz(path, [0, 1, 4000], [0, 1, 3], dict(meta, num_clients=2))
    with pytest.raises(DataError, match=r"range\.npz: index 4000 at position 2 is outside \[0, 4000\)"):
        load_partition(path, reader)

    path = tmp_path / "dup.npz"
    _write_npz(path, [0, 5, 5, 7], [0, 2, 4], dict(meta, num_clients=2))
    with pytest.raises(DataError, match=r"dup\.npz: sample 5 appears more than once \(clients \[0, 1\]\)"):
        load_partition(path, reader)

    path = tmp_path / "offsets.npz"
    _write_npz(path, [0, 5, 6, 7], [0, 3, 2, 4], dict(meta, num_clients=3))
    with pytest.raises(DataError, match=r"offsets\.npz: offsets must"):
        load_partition(path, reader)

    path = tmp_path / "other.npz"
    _write_npz(path, [0, 1], [0, 1, 2], dict(meta, num_clients=2, dataset_fingerprint="0123456789abcdef"))
    with pytest.raises(DataError, match=r"partition .*other\.npz was made for another dataset"):
        load_partition(path, reader)


def test_partition_of_other_dataset(reader, digits_data, tmp_path):
    path = make_partition(DatasetReader(digits_data), 3, "iid").save(tmp_path / "p.npz")
    with pytest.raises(DataError, match="was made for another dataset"):
        load_partition(path, reader)
    os.remove(path)



@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300),
    classes=st.integers(1, 12),
    clients=st.integers(1, 20),
    alpha=st.floats(0.001, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_is_always_a_disjoint_cover(n, classes, clients, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, classes, n)
    parts = dirichlet_partition(labels, clients, alpha, seed)
    assert len(parts) == clients
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


BAD_ALPHAS = [math.inf, -math.inf, math.nan, 0.0, -0.5]


@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_bad_alpha_is_refused_before_any_work(alpha):
    class Untouchable:
        """A reader that fails the test if make_partition reads anything before checking alpha."""

        def __getattr__(self, name):
            raise AssertionError(f"reader.{name} used before the arguments were checked")

    with pytest.raises(DataError, match=r"^--alpha must be a finite number > 0 .*got (inf|-inf|nan|0\.0|-0\.5)$"):
        make_partition(Untouchable(), 5, "dirichlet", alpha=alpha)
    with pytest.raises(ValueError, match="--alpha"):  # DataError is a ValueError
        dirichlet_partition(np.zeros(10, np.int64), 2, alpha, seed=0)


@pytest.mark.parametrize("alpha", ["inf", "nan", "0", "-1", "-inf"])
def test_cli_bad_alpha_is_one_line_exit_2(mnist_dir, tmp_path, capsys, alpha):
    out = tmp_path / "p.npz"
    code = cli_main(["partition", "--data", str(mnist_dir), "--clients", "3", f"--alpha={alpha}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("osfed-hpc partition: error: --alpha must be a finite number > 0")
    assert not out.exists()


def test_empty_client_in_partition_file_is_refused(reader, tmp_path):
    meta = make_partition(reader, 4, "iid", seed=0).meta
    for extra in ({}, {"allow_small": True, "min_samples": 0}):  # no file can make an empty client usable
        path = tmp_path / "empty.npz"
        _write_npz(path, [0, 1, 2], [0, 1, 1, 3, 3], dict(meta, **extra))
        with pytest.raises(DataError, match=r"empty\.npz: clients \[1, 3\] have no samples; every client needs"):
            load_partition(path, reader)


def test_make_partition_never_keeps_an_empty_client(reader):
    """min_samples=0 or --allow-small keep small clients, but never write one that load refuses."""
    with pytest.raises(DataError, match=r"clients \[.*\] get no samples and could never train"):
        make_partition(reader, 200, "dirichlet", alpha=0.001, seed=0, min_samples=0, max_redraws=2)
    with pytest.raises(DataError, match=r"get no samples .*--allow-small keeps small clients, not empty ones"):
        make_partition(reader, 200, "dirichlet", alpha=0.001, seed=0, allow_small=True, max_redraws=2)


def test_allow_small_partition_round_trips(reader, tmp_path):
    with pytest.warns(UserWarning, match="below min_samples=150"):
        part = make_partition(reader, 20, "dirichlet", alpha=0.3, seed=0, min_samples=150, max_redraws=0,
                              allow_small=True)
    assert 0 < part.sizes.min() < 150
    loaded = load_partition(part.save(tmp_path / "small.npz"), reader)
    assert np.array_equal(loaded.sizes, part.sizes)
