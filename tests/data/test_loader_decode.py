"""Loader at the decode bound: batched HDF5 reads, decoding into recycled batch buffers, the
optional reduced-scale (draft) decode and the optional GPU decode path's CPU-side behaviour."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from osfed_hpc.config import DataConfig
from osfed_hpc.data import DataError, DatasetReader, build_eval_data, build_train_data
from osfed_hpc.data.imaging import center_crop_box, decode_eval, decode_train, random_resized_crop_box
from osfed_hpc.data.loader import EncodedBytes, EncodedSamples, batch_plan, decode_on_device

from .conftest import jpeg_bytes, natural_image


@pytest.fixture(scope="module")
def jpeg(jpeg_dir):
    return DatasetReader(jpeg_dir)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_train(data: bytes, resolution: int, seed: int) -> np.ndarray:
    """The training transform written the obvious way: full decode, crop+resize, flip, CHW."""
    rng = np.random.default_rng(seed)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    left, top, w, h = random_resized_crop_box(*img.size, rng)
    flip = rng.random() < 0.5
    arr = np.asarray(img.resize((resolution, resolution), Image.Resampling.BILINEAR,
                                box=(left, top, left + w, top + h)))
    return np.ascontiguousarray((arr[:, ::-1] if flip else arr).transpose(2, 0, 1))


def test_default_decode_is_the_full_decode_and_draft_is_opt_in():
    data = jpeg_bytes(natural_image(np.random.default_rng(4), 1024, 768))
    exact = [reference_train(data, 64, s) for s in range(12)]
    assert all(np.array_equal(decode_train(data, 64, np.random.default_rng(s)), e) for s, e in enumerate(exact))
    drafted = [decode_train(data, 64, np.random.default_rng(s), draft=True) for s in range(12)]
    assert any(not np.array_equal(d, e) for d, e in zip(drafted, exact))  # draft changes pixels...
    assert max(np.abs(d.astype(int) - e).mean() for d, e in zip(drafted, exact)) < 6  # ...a little
    box = center_crop_box(1024, 768, 64)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    eval_exact = np.asarray(img.resize((64, 64), Image.Resampling.BILINEAR,
                                       box=(box[0], box[1], box[0] + box[2], box[1] + box[3]))).transpose(2, 0, 1)
    assert np.array_equal(decode_eval(data, 64), eval_exact)


def test_batched_reads_match_single_reads(jpeg):
    n = jpeg.count("train")
    order = [5, 1, 5, n - 1, 0, 3, 3]
    assert [b.tobytes() for b in jpeg.read_encoded_many("train", order)] == [jpeg.read_encoded("train", k) for k in order]
    assert jpeg.read_encoded_many("train", []) == []
    with pytest.raises(DataError, match="out of range"):
        jpeg.read_encoded_many("train", [0, n])


def test_getitems_equals_per_sample_decoding(jpeg):
    ds = EncodedSamples(jpeg, "train", 40)
    keys = [(3, 17), (0, -1), (7, 5), (3, 17), (20, 2**61)]
    images, labels = ds.__getitems__(keys)
    assert images.shape == (5, 3, 40, 40) and images.dtype == torch.uint8
    for slot, key in enumerate(keys):
        one, label = ds[key]
        assert np.array_equal(images[slot].numpy(), one) and int(labels[slot]) == label
    assert np.array_equal(images[0].numpy(), reference_train(jpeg.read_encoded("train", 3), 40, 17))


@pytest.mark.parametrize("workers", [0, 2])
def test_recycled_buffers_do_not_leak_between_batches(jpeg, workers):
    """Many more batches than buffers, workers running ahead: every batch equals a fresh decode."""
    clients = np.arange(22)
    data = build_train_data(jpeg, clients, "cpu", 24, num_workers=workers)
    assert data.dataset.recycle >= 3
    fresh = EncodedSamples(jpeg, "train", 24)  # recycle 0: a new buffer per batch
    scale, shift = data._scale, data._shift
    got = [(x.clone(), y.clone()) for x, y in data.client(clients).batches(gen(9), 2, epochs=3)]
    g_ref = gen(9)  # the same plan, drawn as EncodedClient.batches draws it
    positions, slices = batch_plan(g_ref, len(clients), 2, 3)
    seeds = torch.randint(0, 2**62, (len(positions),), generator=g_ref)
    assert len(got) == len(slices) == 33
    for (x, y), (start, end) in zip(got, slices):
        keys = [(int(clients[p]), int(s)) for p, s in zip(positions[start:end], seeds[start:end])]
        images, labels = fresh.__getitems__(keys)
        assert torch.equal(x, images.float() * scale + shift) and torch.equal(y, labels)
    data.close()


def test_decode_device_cuda_fails_early_on_cpu(jpeg):
    with pytest.raises(DataError, match=r"data.decode_device='cuda'.*training device is 'cpu'"):
        build_train_data(jpeg, np.arange(4), "cpu", 32, num_workers=0, decode_device="cuda")
    with pytest.raises(DataError, match="decode_device must be one of"):
        build_eval_data(jpeg, "cpu", 32, 4, 0, decode_device="nvjpeg")
    with pytest.raises(Exception, match="data.decode_device"):
        DataConfig(decode_device="gpu").validate()
    DataConfig(decode_device="cuda", jpeg_draft=True).validate()  # valid keys; the device check is the loader's


def test_cpu_path_unchanged_by_the_new_options(jpeg):
    """decode_device='cpu' with draft off is the default: same tensors with or without the keywords."""
    a = build_train_data(jpeg, np.arange(22), "cpu", 32, num_workers=0)
    b = build_train_data(jpeg, np.arange(22), "cpu", 32, num_workers=0, draft=False, decode_device="cpu")
    xa = [x for x, _ in a.client(np.arange(22)).batches(gen(1), 8)]
    xb = [x for x, _ in b.client(np.arange(22)).batches(gen(1), 8)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb)) and len(xa) == 3


def test_device_decode_logic_on_cpu_crops_like_pil(jpeg):
    """The GPU path's crop/resize/flip, run with torchvision's CPU decoder: same regions as PIL."""
    keys = [(k, 100 + k) for k in range(6)] + [(6, -1)]
    images, _ = EncodedSamples(jpeg, "train", 32).__getitems__(keys)
    batch = EncodedBytes(jpeg, "train", 32).__getitems__(keys)
    x = decode_on_device(batch, 32, torch.device("cpu"))
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32
    diff = (x - images.float()).abs().mean(dim=(1, 2, 3))
    assert float(diff.max()) < 12, diff  # other IDCT / resize: close, not equal
    flipped = x.flip(-1)
    assert float((flipped - images.float()).abs().mean()) > float(diff.mean())  # flips go the same way
