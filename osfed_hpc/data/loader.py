"""Client data for training: batches whose order depends only on the caller's generator.

The runner trains many virtual clients per MPI rank and must get the same model on 2 or 5 ranks,
so nothing here looks at the rank, the worker count or global RNG state. A client's batches are a
deterministic function of the ``torch.Generator`` the caller passes (seeded from
(seed, round, client)): one ``randperm`` per pass over the client's samples and, for JPEG
datasets, one augmentation seed per sample drawn from the same generator. The whole plan is drawn
when ``batches`` is called, so the generator ends in the same state however far the caller
iterates and whatever the number of DataLoader workers.

Two storage forms, one interface (``ClientData``):
* ``InMemoryImages`` (raw datasets): the rank's samples are decoded once into one normalised
  float32 tensor on the device; a batch is one ``index_select`` on the device, no host round trip.
* ``EncodedImages`` (JPEG datasets): a ``torch.utils.data.Dataset`` over (global index, sample seed)
  keys feeding one DataLoader per worker count, whose persistent workers serve every client and
  round. Workers open HDF5 themselves, lazily (see ``DatasetReader``), read a batch's JPEG bytes
  in one h5py selection per shard, decode with PIL straight into the batch's slot (in shared
  memory when in a worker: nothing is copied to send it) and send uint8 batches; conversion to
  normalised float happens on the device, 4x fewer bytes to move. With ``decode_device="cuda"``
  the workers only read bytes and draw crop boxes; nvjpeg decodes on the GPU (pixels differ
  slightly from PIL's, see ``decode_on_device``).

This module must never import mpi4py: a spawned DataLoader worker that imports it would call
``MPI_Init``.
"""

from __future__ import annotations

import abc
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .errors import DataError
from .hdf5 import DatasetReader
from .imaging import (
    DECODE_ERRORS,
    center_crop_box,
    decode_eval_into,
    decode_train_into,
    describe_error,
    image_size,
    train_params,
)

Batch = tuple[Tensor, Tensor]
EVAL_SEED = -1  # sample seed meaning "eval transform" (resize + center crop, no randomness)
DECODE_DEVICES = ("cpu", "cuda")
_SEED_HIGH = 2**62


def batch_plan(
    generator: torch.Generator,
    n: int,
    batch_size: int,
    epochs: int = 1,
    steps: int | None = None,
    drop_last: bool = False,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Draw the visiting order of ``n`` samples: (positions int64 CPU/generator device, batch slices).

    One ``torch.randperm(n, generator=...)`` per pass. Without ``steps``: ``epochs`` passes. With
    ``steps``: exactly ``steps`` batches, cycling over as many fresh passes as needed. A partial
    last batch of a pass is dropped when ``drop_last``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if epochs < 0 or (steps is not None and steps < 0):
        raise DataError(f"epochs and steps must be >= 0, got epochs={epochs}, steps={steps}")
    if steps is not None:
        if steps == 0:
            return torch.zeros(0, dtype=torch.int64), []
        per_pass = n // batch_size if drop_last else math.ceil(n / batch_size)
        if per_pass == 0:
            why = "no samples" if n == 0 else f"{n} samples < batch_size {batch_size} with drop_last"
            raise DataError(f"client has {why}: cannot produce {steps} steps")
        passes = math.ceil(steps / per_pass)
    else:
        passes = epochs
    perms = [torch.randperm(n, generator=generator, device=generator.device) for _ in range(passes)]
    positions = torch.cat(perms) if perms else torch.zeros(0, dtype=torch.int64)
    slices = []
    for p in range(passes):
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            if drop_last and end - start < batch_size:
                break
            slices.append((p * n + start, p * n + end))
    return positions, slices if steps is None else slices[:steps]


def _norm_constants(reader: DatasetReader, device: torch.device) -> tuple[Tensor, Tensor]:
    """(scale, shift) with x_norm = uint8 * scale + shift, i.e. (x / 255 - mean) / std."""
    mean = torch.tensor(reader.mean, dtype=torch.float32)
    std = torch.tensor(reader.std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).view(-1, 1, 1).to(device)
    shift = (-mean / std).view(-1, 1, 1).to(device)
    return scale, shift


def _union(reader: DatasetReader, split: str, indices: np.ndarray | None) -> np.ndarray:
    """Sorted unique global indices to serve (None: the whole split)."""
    if indices is None:
        return np.arange(reader.count(split), dtype=np.int64)
    return np.unique(np.asarray(indices, dtype=np.int64))


def _check_subset(known: np.ndarray, wanted: Any, what: str) -> np.ndarray:
    """Positions of ``wanted`` global indices inside sorted ``known``; DataError if one is absent."""
    wanted = np.asarray(wanted, dtype=np.int64)
    if wanted.ndim != 1:
        raise DataError(f"{what}: client indices must be 1-D, got shape {wanted.shape}")
    pos = np.searchsorted(known, wanted)
    if len(known):
        missing = np.flatnonzero((pos >= len(known)) | (known[np.minimum(pos, len(known) - 1)] != wanted))
    else:
        missing = np.arange(len(wanted))
    if missing.size:
        raise DataError(
            f"{what}: sample {int(wanted[missing[0]])} is not among the samples loaded here "
            "(build the data with the union of this rank's client indices)"
        )
    return pos


class ClientData(abc.ABC):
    """One client's samples, as batches on the training device."""

    num_samples: int

    @abc.abstractmethod
    def batches(
        self,
        generator: torch.Generator,
        batch_size: int,
        epochs: int = 1,
        steps: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield ``(x float32 [b, C, H, W] normalised, y int64 [b])`` on the device.

        The plan (permutations, augmentation seeds) is drawn from ``generator`` when this is
        called; iterating is then deterministic.
        """

    @abc.abstractmethod
    def full_batch(self) -> Batch:
        """All samples in index order (no augmentation)."""


# -- raw datasets: everything on the device ----------------------------------------------------
class InMemoryImages:
    """The samples of ``indices`` (a rank's clients' union) as one normalised tensor on ``device``.

    Conversion happens once, in chunks, on the device: uint8 -> float -> optional bilinear
    antialiased resize to ``resolution`` -> normalise. Clients are views by row index.
    """

    def __init__(
        self,
        reader: DatasetReader,
        split: str,
        indices: np.ndarray | None,
        device: torch.device | str,
        resolution: int | None = None,
        batch_size: int = 256,
        chunk: int = 2048,
    ) -> None:
        if reader.encoding != "raw":
            raise DataError(f"{reader.path}: InMemoryImages needs a raw dataset, this one is '{reader.encoding}'")
        self.reader, self.split, self.device = reader, split, torch.device(device)
        self.batch_size = batch_size
        self.indices = _union(reader, split, indices)
        c, h, w = reader.image_shape  # type: ignore[misc]
        size = (h, w) if resolution is None else (int(resolution), int(resolution))
        scale, shift = _norm_constants(reader, self.device)
        raw = reader.read_raw(split, self.indices)
        self.images = torch.empty((len(raw), c, *size), dtype=torch.float32, device=self.device)
        for start in range(0, len(raw), chunk):
            block = torch.from_numpy(raw[start : start + chunk]).to(self.device).permute(0, 3, 1, 2).float()
            if size != (h, w):
                block = F.interpolate(block, size=size, mode="bilinear", antialias=True, align_corners=False)
            self.images[start : start + chunk] = block * scale + shift
        self.labels = torch.from_numpy(reader.labels(split)[self.indices]).to(self.device)
        self.image_size = size

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def client(self, global_indices: np.ndarray, num_workers: int | None = None) -> InMemoryClient:
        """The samples of one client (``num_workers`` is ignored: nothing to decode)."""
        pos = _check_subset(self.indices, global_indices, f"{self.reader.path} split '{self.split}'")
        return InMemoryClient(self, torch.from_numpy(pos).to(self.device))

    def eval_batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """All loaded samples in index order (views of the stored tensor: do not modify in place)."""
        bs = batch_size or self.batch_size
        for start in range(0, self.num_samples, bs):
            yield self.images[start : start + bs], self.labels[start : start + bs]


class InMemoryClient(ClientData):
    def __init__(self, parent: InMemoryImages, rows: Tensor) -> None:
        self._parent, self._rows = parent, rows
        self.num_samples = len(rows)

    def batches(self, generator: torch.Generator, batch_size: int, epochs: int = 1,
                steps: int | None = None, drop_last: bool = False) -> Iterator[Batch]:
        positions, slices = batch_plan(generator, self.num_samples, batch_size, epochs, steps, drop_last)
        order = self._rows[positions.to(self._rows.device)] if len(positions) else positions
        images, labels = self._parent.images, self._parent.labels

        def iterate() -> Iterator[Batch]:
            for start, end in slices:
                rows = order[start:end]
                yield images.index_select(0, rows), labels.index_select(0, rows)

        return iterate()

    def full_batch(self) -> Batch:
        return self._parent.images.index_select(0, self._rows), self._parent.labels.index_select(0, self._rows)


# -- JPEG datasets: decode in DataLoader workers -----------------------------------------------
class EncodedSamples(Dataset):
    """Map-style dataset over keys ``(global index, sample seed)`` of one split.

    ``seed >= 0``: training transform (RandomResizedCrop + flip) driven by
    ``np.random.default_rng(seed)``; ``seed == EVAL_SEED``: resize + center crop. ``dataset[key]``
    returns ``(uint8 [3, r, r], label)``; the DataLoader calls ``__getitems__(keys)``, which returns
    the collated batch ``(uint8 [b, 3, r, r], int64 [b])``. HDF5 is opened inside the worker on
    first use. ``draft``: reduced-scale JPEG decoding (see ``imaging``; changes pixels).

    ``recycle = k > 0`` makes ``__getitems__`` cycle through k batch buffers per process instead
    of allocating one per batch: a fresh 19 MiB buffer (32 images at 448 px) costs ~4,700 page
    faults, 0.3-0.5 ms per image on the benchmark VM (more in shared memory), ~10 % of decoding.
    Only for a consumer that is done with a batch before it asks for k - 1 more per worker;
    ``EncodedImages.run_plan`` is (it converts each batch to float before fetching the next, and a
    worker runs at most ``prefetch_factor`` batches ahead), and sets k = ``prefetch_factor + 2``.
    """

    def __init__(self, reader: DatasetReader, split: str, resolution: int, draft: bool = False) -> None:
        self.reader, self.split, self.resolution, self.draft = reader, split, int(resolution), bool(draft)
        self.labels = reader.labels(split)
        self.recycle = 0
        self._ring: list[Tensor] = []  # this process's buffers (a forked worker starts with none)
        self._ring_pid, self._ring_next = 0, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, seed = int(key[0]), int(key[1])
        out = np.empty((3, self.resolution, self.resolution), dtype=np.uint8)
        self._decode_into(out, self.reader.read_encoded(self.split, index), index, seed)
        return out, int(self.labels[index])

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Batch:
        """A whole batch: one HDF5 read per shard, each image decoded into its slot of the batch."""
        indices = [int(k[0]) for k in keys]
        blobs = self.reader.read_encoded_many(self.split, indices)
        images = self._buffer(len(keys))
        out = images.numpy()
        for slot, (index, key, data) in enumerate(zip(indices, keys, blobs)):
            self._decode_into(out[slot], data, index, int(key[1]))
        return images, torch.from_numpy(self.labels[indices].astype(np.int64, copy=False))

    def _buffer(self, count: int) -> Tensor:
        r = self.resolution
        if self.recycle < 1:
            return batch_buffer((count, 3, r, r))
        if self._ring_pid != os.getpid():  # forked worker: the parent's buffers are not shared ones
            self._ring, self._ring_pid, self._ring_next = [], os.getpid(), 0
        k = self._ring_next % self.recycle
        self._ring_next += 1
        if k == len(self._ring) or self._ring[k].shape[0] < count:
            if k == len(self._ring):
                self._ring.append(batch_buffer((count, 3, r, r)))
            else:
                self._ring[k] = batch_buffer((count, 3, r, r))
        return self._ring[k][:count]

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers: no buffers (they would be copied, and would not be shared memory).
        return dict(self.__dict__, _ring=[], _ring_pid=0, _ring_next=0)

    def _decode_into(self, out: np.ndarray, data: Any, index: int, seed: int) -> None:
        try:
            if seed == EVAL_SEED:
                decode_eval_into(out, data, self.resolution, self.draft)
            else:
                decode_train_into(out, data, self.resolution, np.random.default_rng(seed), self.draft)
        except DECODE_ERRORS as exc:
            raise self._decode_error(index, exc) from None

    def _decode_error(self, index: int, exc: BaseException) -> DataError:
        shard, local = self.reader.locate(self.split, index)
        return DataError(
            f"{shard}: image {local} (global index {index} of split '{self.split}') "
            f"is not a decodable JPEG: {describe_error(exc)}"
        )


class EncodedBytes(EncodedSamples):
    """The same keys, for decoding on the device: a batch is the JPEG bytes plus the crop boxes.

    Boxes and flips are drawn exactly as ``decode_train`` draws them (same generator, same order),
    from the size in the JPEG header, so the CPU and device paths crop the same regions.
    """

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> EncodedBatch:
        indices = [int(k[0]) for k in keys]
        blobs = self.reader.read_encoded_many(self.split, indices)
        boxes = np.empty((len(keys), 4), dtype=np.float64)
        flips = np.zeros(len(keys), dtype=bool)
        for slot, (index, key, data) in enumerate(zip(indices, keys, blobs)):
            try:
                size = image_size(data)
            except DECODE_ERRORS as exc:
                raise self._decode_error(index, exc) from None
            seed = int(key[1])
            if seed == EVAL_SEED:
                boxes[slot] = center_crop_box(*size, self.resolution)
            else:
                boxes[slot], flips[slot] = train_params(size, np.random.default_rng(seed))
        labels = torch.from_numpy(self.labels[indices].astype(np.int64, copy=False))
        return EncodedBatch([torch.from_numpy(b) for b in blobs], torch.from_numpy(boxes),
                            torch.from_numpy(flips), labels, indices)


class EncodedBatch(NamedTuple):
    """A batch still encoded: what ``EncodedBytes`` workers send for ``decode_on_device``."""

    data: list[Tensor]  # one uint8 tensor of JPEG bytes per sample (CPU)
    boxes: Tensor  # float64 [b, 4]: (left, top, width, height) in source pixels
    flips: Tensor  # bool [b]
    labels: Tensor  # int64 [b]
    indices: list[int]  # global indices, for error messages


def batch_buffer(shape: tuple[int, ...]) -> Tensor:
    """A uint8 tensor for one batch; inside a DataLoader worker it lives in shared memory.

    Sending a tensor from a worker moves its storage to shared memory; allocating it there in
    the first place (as ``default_collate`` does) saves a copy of the whole batch per send.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def collate_uint8(samples: Any) -> Any:
    """Batches from ``__getitems__`` pass through; a list of samples is stacked (uint8)."""
    if isinstance(samples, tuple):
        return samples
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels


def decode_on_device(batch: EncodedBatch, resolution: int, device: torch.device,
                     dataset: EncodedSamples | None = None) -> Tensor:
    """Decode a batch with ``torchvision.io.decode_jpeg`` on ``device`` (nvjpeg on CUDA), crop,
    resize (bilinear, antialiased) and flip: ``float32 [b, 3, r, r]`` in 0..255, not normalised.

    Differs from the PIL path by design: another IDCT, torch's resize instead of PIL's, boxes
    rounded to whole pixels and no rounding to uint8 after the resize (typically 1-2 grey levels).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    data, boxes, flips, _, indices = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        try:
            images = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            if dataset is None:
                raise
            for index, blob in zip(indices, data):  # find the culprit on the CPU for the message
                try:
                    decode_jpeg(blob, mode=ImageReadMode.RGB)
                except RuntimeError as one:
                    raise dataset._decode_error(index, one) from None
            raise
    out = torch.empty((len(images), 3, resolution, resolution), dtype=torch.float32, device=device)
    for k, (img, box, flip) in enumerate(zip(images, boxes.tolist(), flips.tolist())):
        left, top, w, h = box
        x0, y0 = max(0, round(left)), max(0, round(top))
        x1, y1 = max(x0 + 1, round(left + w)), max(y0 + 1, round(top + h))
        crop = img[:, y0:y1, x0:x1].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(resolution, resolution), mode="bilinear",
                                antialias=True, align_corners=False)[0]
        out[k] = resized.flip(-1) if flip else resized
    return out


def check_decode_device(decode_device: str, device: torch.device) -> None:
    """Fail before any work if ``decode_device`` cannot be honoured on ``device``."""
    if decode_device not in DECODE_DEVICES:
        raise DataError(f"data.decode_device must be one of {DECODE_DEVICES}, got {decode_device!r}")
    if decode_device == "cpu":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise DataError(
            f"data.decode_device='cuda' decodes JPEGs with nvjpeg on the training GPU, but the training "
            f"device is '{device}'{'' if torch.cuda.is_available() else ' and CUDA is not available here'}; "
            "use data.decode_device: cpu (the default)"
        )
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError as exc:
        raise DataError(f"data.decode_device='cuda' needs torchvision.io.decode_jpeg: {exc}") from None


class _PlanSampler:
    """A batch sampler whose batches are set before each iteration (lets workers persist)."""

    def __init__(self) -> None:
        self.plan: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class EncodedImages:
    """JPEG samples of one split, decoded and resized at load time, for any number of clients.

    DataLoaders (per worker count) are created on first use and kept with their persistent
    workers, so a rank pays worker start-up once, not per client or round. Iterations may
    interleave (e.g. ``full_batch`` inside a ``batches`` loop): a second loader is then made.

    ``mp_context`` is the DataLoader's start method (default: the platform's, fork on Linux).
    With ``spawn``/``forkserver`` the workers import this package afresh, which is safe only if
    nothing on that import path imports mpi4py.

    ``draft``: reduced-scale JPEG decoding where the crop allows it (changes pixels; off by
    default). ``decode_device="cuda"``: decode on the training GPU with nvjpeg (``device`` must be
    a CUDA device; checked here, before any work); ``draft`` does not apply there.
    """

    def __init__(
        self,
        reader: DatasetReader,
        split: str,
        device: torch.device | str,
        resolution: int,
        num_workers: int = 0,
        indices: np.ndarray | None = None,
        batch_size: int = 256,
        mp_context: str | None = None,
        prefetch_factor: int = 2,
        draft: bool = False,
        decode_device: str = "cpu",
    ) -> None:
        if reader.encoding != "jpeg":
            raise DataError(f"{reader.path}: EncodedImages needs a jpeg dataset, this one is '{reader.encoding}'")
        if resolution is None or int(resolution) < 1:
            raise DataError(f"{reader.path}: a JPEG dataset needs a positive resolution, got {resolution!r}")
        self.reader, self.split, self.device = reader, split, torch.device(device)
        check_decode_device(decode_device, self.device)
        self.resolution, self.num_workers, self.batch_size = int(resolution), num_workers, batch_size
        self.decode_device = decode_device
        self.indices = _union(reader, split, indices)
        kind = EncodedBytes if decode_device == "cuda" else EncodedSamples
        self.dataset = kind(reader, split, self.resolution, draft)
        self.dataset.recycle = prefetch_factor + 2  # see EncodedSamples: run_plan consumes in time
        self._mp_context, self._prefetch = mp_context, prefetch_factor
        self._scale, self._shift = _norm_constants(reader, self.device)
        self._idle: dict[int, list[tuple[DataLoader, _PlanSampler]]] = {}

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def client(self, global_indices: np.ndarray, num_workers: int | None = None) -> EncodedClient:
        """One client's samples; batches are decoded by ``num_workers`` workers (default: ours)."""
        _check_subset(self.indices, global_indices, f"{self.reader.path} split '{self.split}'")
        workers = self.num_workers if num_workers is None else num_workers
        return EncodedClient(self, np.asarray(global_indices, dtype=np.int64), workers)

    def eval_batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """Every sample in index order with the eval transform."""
        bs = batch_size or self.batch_size
        plan = [[(int(i), EVAL_SEED) for i in self.indices[s : s + bs]] for s in range(0, self.num_samples, bs)]
        return self.run_plan(plan, self.num_workers)

    def run_plan(self, plan: list[list[tuple[int, int]]], num_workers: int) -> Iterator[Batch]:
        """Decode the batches of ``plan`` (lists of keys) in order and yield them on the device.

        Each iteration borrows an idle DataLoader for ``num_workers`` (creating one only when all
        are busy, i.e. when iterations interleave) and returns it when finished or dropped.
        """
        device, scale, shift = self.device, self._scale, self._shift
        on_device = self.decode_device != "cpu"

        def iterate() -> Iterator[Batch]:
            loader, sampler = self._acquire(num_workers)
            try:
                if num_workers > 0:
                    self.reader.close()  # workers may start now: let none inherit an open HDF5 file
                sampler.plan = plan  # read once, by iter(loader) below
                for batch in loader:
                    if on_device:
                        x = decode_on_device(batch, self.resolution, device, self.dataset).mul_(scale).add_(shift)
                        yield x, batch.labels.to(device, non_blocking=True)
                        continue
                    images, labels = batch
                    x = images.to(device, non_blocking=True).float().mul_(scale).add_(shift)
                    yield x, labels.to(device, non_blocking=True)
            finally:
                self._idle.setdefault(num_workers, []).append((loader, sampler))

        return iterate()

    def _acquire(self, num_workers: int) -> tuple[DataLoader, _PlanSampler]:
        idle = self._idle.setdefault(num_workers, [])
        if idle:
            return idle.pop()
        sampler = _PlanSampler()
        extra: dict[str, Any] = {}
        if num_workers > 0:
            extra = {"persistent_workers": True, "prefetch_factor": self._prefetch,
                     "multiprocessing_context": self._mp_context, "worker_init_fn": ignore_stop_signals}
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_uint8,
            pin_memory=self.device.type == "cuda" and self.decode_device == "cpu",
            **extra,
        )
        return loader, sampler

    def close(self) -> None:
        """Stop the idle loaders' persistent workers (they also stop on garbage collection)."""
        for loaders in self._idle.values():
            for loader, _ in loaders:
                iterator = getattr(loader, "_iterator", None)
                if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                    iterator._shutdown_workers()
        self._idle.clear()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGUSR1 (SLURM's "time is nearly up"): ``srun`` signals every
    process of the step, and the rank, not its decoders, stops at a round boundary. SIGTERM keeps
    its default action: multiprocessing ends workers with it at exit."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class EncodedClient(ClientData):
    def __init__(self, parent: EncodedImages, indices: np.ndarray, num_workers: int) -> None:
        self._parent, self._indices, self._workers = parent, indices, num_workers
        self.num_samples = len(indices)

    def batches(self, generator: torch.Generator, batch_size: int, epochs: int = 1,
                steps: int | None = None, drop_last: bool = False) -> Iterator[Batch]:
        positions, slices = batch_plan(generator, self.num_samples, batch_size, epochs, steps, drop_last)
        seeds = torch.randint(0, _SEED_HIGH, (len(positions),), generator=generator, device=generator.device)
        keys = list(zip(self._indices[positions.cpu().numpy()].tolist(), seeds.cpu().tolist()))
        plan = [keys[start:end] for start, end in slices]
        return self._parent.run_plan(plan, self._workers)

    def full_batch(self) -> Batch:
        plan = [[(int(i), EVAL_SEED) for i in self._indices]] if self.num_samples else []
        batches = list(self._parent.run_plan(plan, self._workers))
        if not batches:
            c, r = 3, self._parent.resolution
            return (torch.zeros((0, c, r, r), device=self._parent.device),
                    torch.zeros(0, dtype=torch.int64, device=self._parent.device))
        return batches[0]


# -- entry points used by the runner -----------------------------------------------------------
def build_train_data(
    reader: DatasetReader,
    indices_union: np.ndarray,
    device: torch.device | str,
    resolution: int | None,
    num_workers: int,
    *,
    mp_context: str | None = None,
    draft: bool = False,
    decode_device: str = "cpu",
) -> InMemoryImages | EncodedImages:
    """Train data for one rank: ``indices_union`` = all samples of the clients it hosts.

    ``draft`` / ``decode_device`` (``data.jpeg_draft`` / ``data.decode_device``) apply to JPEG
    datasets only; raw datasets are already decoded, on the device.
    """
    if reader.encoding == "raw":
        return InMemoryImages(reader, "train", indices_union, device, resolution)
    return EncodedImages(reader, "train", device, resolution, num_workers,  # type: ignore[arg-type]
                         indices=indices_union, mp_context=mp_context, draft=draft, decode_device=decode_device)


def build_eval_data(
    reader: DatasetReader,
    device: torch.device | str,
    resolution: int | None,
    batch_size: int,
    num_workers: int,
    *,
    split: str = "test",
    mp_context: str | None = None,
    draft: bool = False,
    decode_device: str = "cpu",
) -> InMemoryImages | EncodedImages:
    """The evaluation split, iterated in order by ``eval_batches(batch_size)``."""
    if reader.encoding == "raw":
        return InMemoryImages(reader, split, None, device, resolution, batch_size=batch_size)
    return EncodedImages(reader, split, device, resolution, num_workers,  # type: ignore[arg-type]
                         batch_size=batch_size, mp_context=mp_context, draft=draft, decode_device=decode_device)


def load_samples(
    reader: DatasetReader,
    split: str,
    indices: np.ndarray,
    device: torch.device | str,
    resolution: int | None,
    *,
    draft: bool = False,
    decode_device: str = "cpu",
) -> Batch:
    """Samples ``indices`` of ``split`` (in the order given, repeats allowed) as one normalised batch
    on ``device``, decoded like evaluation data: for methods that need a few samples outside any
    client's partition (a server's public slice, a distillation set)."""
    indices = np.asarray(indices, dtype=np.int64)
    count = reader.count(split)
    if indices.size and (indices.min() < 0 or indices.max() >= count):
        raise DataError(f"{reader.path}: split '{split}' has {count} samples; asked for index "
                        f"{int(indices.min() if indices.min() < 0 else indices.max())}")
    unique = np.unique(indices)
    if reader.encoding == "raw":
        data = InMemoryImages(reader, split, unique, device, resolution)
    else:
        data = EncodedImages(reader, split, device, resolution, 0, indices=unique,  # type: ignore[arg-type]
                             draft=draft, decode_device=decode_device)
    return data.client(indices).full_batch()
