"""HDF5 shards: writing them once, reading a client's samples many times.

A prepared dataset is a directory of shards (``train-00000.h5`` ...) plus ``dataset.json``. Each
shard holds ``images`` (raw ``uint8 [n, H, W, C]``, or one encoded JPEG per sample as variable-length
``uint8``), ``labels`` (``int64 [n]``) and, for image folders, ``names`` (the source path). One big
dataset per shard, not one object per image: h5py pays a fixed cost per object access.

Reading follows the rules learnt the hard way with h5py (see hpc-lessons C.4): nothing is opened
at import or before a fork; each process opens each shard once, lazily, read-only and without file
locking (parallel file systems reject or stall on locks), and reopens after a fork because a
handle inherited from the parent returns garbage or fails with "bad object header".
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..atomic import atomic_path, fsync_path, temp_path_for
from .errors import DataError
from .manifest import FORMAT_VERSION, MANIFEST_NAME, SPLITS, fingerprint_of, read_manifest

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_RAW_READ_WINDOW_BYTES = 8 << 20  # read raw images in windows of ~8 MiB: bounded memory, few calls


def open_h5_read(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only without file locking (falls back to the env variable)."""
    try:
        return h5py.File(path, "r", locking=False)
    except (TypeError, ValueError):  # h5py/HDF5 too old for the keyword
        os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
        return h5py.File(path, "r")


def shard_name(split: str, index: int) -> str:
    """``train-00000.h5``: zero-padded so that sorted names are shard order."""
    return f"{split}-{index:05d}.h5"


def _shard_attrs(split: str, index: int, count: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"split": split, "index": index, "count": count, "format_version": FORMAT_VERSION, **extra}


def write_raw_shard(
    path: Path, split: str, index: int, images: np.ndarray, labels: np.ndarray, attrs: dict[str, Any]
) -> None:
    """Write a shard of decoded ``uint8 [n, H, W, C]`` images atomically.

    Stored contiguous and uncompressed: raw shards are small images read in large slices, where
    chunking or compression would only add decode work.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"{path}: expected images [n,H,W,C] and n labels, got {images.shape} and {labels.shape}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images)
            f.create_dataset("labels", data=labels)
            f.attrs.update(_shard_attrs(split, index, len(labels), attrs))


def vlen_block(arrays: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """A 1-D array of ``dtype`` (an h5py vlen dtype) holding ``arrays``, one per element.

    Filled element by element: assigning a list would let numpy broadcast equal-length arrays
    into a second dimension instead of storing each array as one element.
    """
    block = np.empty(len(arrays), dtype=dtype)
    for k, arr in enumerate(arrays):
        block[k] = arr
    return block


class JpegShardWriter:
    """Incrementally write one shard of encoded images, committing it atomically on ``commit``.

    Images are written in blocks as they arrive so a worker never holds a whole shard
    (10,000 JPEGs, ~1 GB) in memory. Samples that could not be converted are recorded in the
    ``skipped`` dataset ([k, 2] strings: path, reason) of the same shard, so a resumed conversion
    can rebuild ``skipped.tsv`` from finished shards alone.
    """

    _BLOCK = 256

    def __init__(self, path: Path, split: str, index: int, planned: int, attrs: dict[str, Any]) -> None:
        self.path = path
        self._split, self._index, self._attrs = split, index, dict(attrs, planned=planned)
        self._tmp = temp_path_for(path)
        self._file = h5py.File(self._tmp, "w")
        self._images = self._file.create_dataset(
            "images",
            (max(planned, 1),),
            maxshape=(max(planned, 1),),
            dtype=h5py.vlen_dtype(np.uint8),
            chunks=(max(1, min(planned, self._BLOCK)),),
        )
        self._pending: list[np.ndarray] = []
        self._labels: list[int] = []
        self._names: list[str] = []
        self._skipped: list[tuple[str, str]] = []
        self._written = 0

    def add(self, data: bytes, label: int, name: str) -> None:
        """Append one encoded image with its label and source path."""
        self._pending.append(np.frombuffer(data, dtype=np.uint8))
        self._labels.append(int(label))
        self._names.append(name)
        if len(self._pending) >= self._BLOCK:
            self._flush()

    def skip(self, name: str, reason: str) -> None:
        """Record a source file that was not converted, and why."""
        self._skipped.append((name, reason))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return list(self._skipped)

    def _flush(self) -> None:
        """Write the pending images as one block, bypassing h5py's value conversion.

        ``dataset[a:b] = block`` lets h5py convert ``block`` with numpy first, and numpy turns
        images of identical encoded length (one image alone, two identical files) into a 2-D
        ``[n, length]`` array that h5py then refuses ("Can't broadcast (n, length) -> (n,)").
        ``write_direct`` hands a 1-D array of the dataset's own vlen dtype to HDF5 unchanged,
        whatever the lengths.
        """
        if not self._pending:
            return
        block = vlen_block(self._pending, self._images.dtype)
        end = self._written + len(block)
        self._images.write_direct(block, dest_sel=np.s_[self._written : end])
        self._written = end
        self._pending = []

    def commit(self) -> int:
        """Finish the shard (labels, names, skipped, attrs), rename it into place; return its count."""
        try:
            self._flush()
            count = self._written
            self._images.resize((count,))
            f = self._file
            f.create_dataset("labels", data=np.asarray(self._labels, dtype=np.int64))
            str_dt = h5py.string_dtype()
            f.create_dataset("names", data=np.asarray(self._names, dtype=object), dtype=str_dt, shape=(count,))
            skipped = np.empty((len(self._skipped), 2), dtype=object)
            if self._skipped:
                skipped[:] = self._skipped
            f.create_dataset("skipped", data=skipped, dtype=str_dt, shape=skipped.shape)
            f.attrs.update(_shard_attrs(self._split, self._index, count, self._attrs))
            f.close()
            fsync_path(self._tmp)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return count

    def abort(self) -> None:
        """Discard the temporary file (idempotent)."""
        if self._file.id.valid:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


@dataclass(frozen=True)
class _Shard:
    path: Path
    count: int
    start: int  # global index of its first sample


class DatasetReader:
    """Read-only access to a prepared dataset directory, validated eagerly and cheaply.

    The constructor checks everything that can be checked without decoding images (manifest,
    every shard's presence, HDF5-ness, dataset names, lengths, dtypes, shapes, label range and
    class counts) so that a broken dataset fails before any training starts, with a message that
    names the file. It then closes every file: handles are opened lazily, once per process.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._meta, raw = read_manifest(self._path)
        self._fingerprint = fingerprint_of(raw)
        self._shards: dict[str, list[_Shard]] = {}
        self._starts: dict[str, np.ndarray] = {}
        for split, info in self._meta["splits"].items():
            shards, start = [], 0
            for entry in info["shards"]:
                shards.append(_Shard(self._path / entry["file"], entry["count"], start))
                start += entry["count"]
            self._shards[split] = shards
            self._starts[split] = np.array([s.start for s in shards] + [start], dtype=np.int64)
        self._labels: dict[str, np.ndarray] = {}
        self._validate()
        self._pid: int | None = None
        self._handles: dict[Path, h5py.File] = {}
        self._images: dict[Path, h5py.Dataset] = {}  # "images" of open handles: a lookup is ~50 us
        self._orphans: list[h5py.File] = []

    # -- metadata ---------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def meta(self) -> dict[str, Any]:
        return self._meta

    @property
    def num_classes(self) -> int:
        return len(self._meta["classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self._meta["classes"])

    @property
    def encoding(self) -> str:
        return self._meta["encoding"]

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        shape = self._meta.get("image_shape")
        return tuple(shape) if shape is not None else None  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return int(self._meta["channels"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self._meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self._meta["std"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the ``dataset.json`` bytes (16 hex chars): what partitions are bound to."""
        return self._fingerprint

    @property
    def splits(self) -> list[str]:
        return list(self._shards)

    def count(self, split: str) -> int:
        return int(self._starts[self._check_split(split)][-1])

    def labels(self, split: str) -> np.ndarray:
        """All labels of ``split`` as ``int64`` (read during validation; a read-only view)."""
        return self._labels[self._check_split(split)]

    def shard_paths(self, split: str) -> list[Path]:
        return [s.path for s in self._shards[self._check_split(split)]]

    def locate(self, split: str, index: int) -> tuple[Path, int]:
        """(shard file, index inside it) of global sample ``index`` of ``split``."""
        s = self._shard_of(split, np.asarray([index], dtype=np.int64))[0]
        return self._shards[split][s].path, int(index - self._starts[split][s])

    # -- reading ----------------------------------------------------------------------------
    def read_raw(self, split: str, indices: np.ndarray | None = None) -> np.ndarray:
        """Decoded images ``uint8 [n, H, W, C]`` for global ``indices`` (any order, repeats allowed).

        Samples are grouped by shard and read in contiguous windows, so a sorted or a random
        selection costs about the same few large reads; the result follows the order given.
        """
        if self.encoding != "raw":
            raise DataError(f"{self._path}: read_raw needs a raw dataset, this one is '{self.encoding}' encoded")
        split = self._check_split(split)
        n_total = self.count(split)
        idx = np.arange(n_total, dtype=np.int64) if indices is None else self._check_indices(split, indices)
        c, h, w = self.image_shape  # type: ignore[misc]
        out = np.empty((len(idx), h, w, c), dtype=np.uint8)
        if len(idx) == 0:
            return out
        shard_of = self._shard_of(split, idx)
        window = max(1, _RAW_READ_WINDOW_BYTES // (h * w * c))
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            local = idx[sel] - self._starts[split][s]
            uniq, inverse = np.unique(local, return_inverse=True)
            rows = np.empty((len(uniq), h, w, c), dtype=np.uint8)
            ds = self._file(split, int(s))["images"]
            n_shard = self._shards[split][s].count
            win_of = uniq // window
            for win in np.unique(win_of):
                pos = np.flatnonzero(win_of == win)
                lo, hi = int(win * window), int(min((win + 1) * window, n_shard))
                if len(pos) * 64 < hi - lo:  # sparse: a few single-row reads beat one big read
                    for p in pos:
                        r = int(uniq[p])
                        ds.read_direct(rows, np.s_[r : r + 1], np.s_[p : p + 1])
                else:
                    rows[pos] = ds[lo:hi][uniq[pos] - lo]
            out[sel] = rows[inverse.reshape(-1)]
        return out

    def read_encoded(self, split: str, index: int) -> bytes:
        """The stored JPEG bytes of global sample ``index`` of ``split``."""
        if self.encoding != "jpeg":
            raise DataError(f"{self._path}: read_encoded needs a jpeg dataset, this one is '{self.encoding}' encoded")
        split = self._check_split(split)
        idx = self._check_indices(split, np.asarray([index]))
        s = int(self._shard_of(split, idx)[0])
        local = int(idx[0] - self._starts[split][s])
        return self._images_of(split, s)[local].tobytes()

    def read_encoded_many(self, split: str, indices: Any) -> list[np.ndarray]:
        """The stored JPEG bytes (``uint8`` arrays) of global ``indices`` (any order, repeats allowed).

        One h5py selection per shard touched instead of one read per sample: a single-element
        read costs ~150 us of h5py overhead (dataset lookup, selection, vlen conversion), about
        as much as 10 % of decoding a 500x375 JPEG; read as a batch it is ~40 us per sample.
        """
        if self.encoding != "jpeg":
            raise DataError(f"{self._path}: read_encoded needs a jpeg dataset, this one is '{self.encoding}' encoded")
        split = self._check_split(split)
        idx = self._check_indices(split, indices)
        out: list[np.ndarray] = [None] * len(idx)  # type: ignore[list-item]
        if not len(idx):
            return out
        shard_of = self._shard_of(split, idx)
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            uniq, inverse = np.unique(idx[sel] - self._starts[split][s], return_inverse=True)
            ds = self._images_of(split, int(s))
            lo, hi = int(uniq[0]), int(uniq[-1]) + 1
            # h5py wants increasing indices; a dense run is one contiguous read.
            rows = ds[lo:hi][uniq - lo] if hi - lo <= 2 * len(uniq) else ds[uniq]
            for k, j in zip(sel.tolist(), inverse.reshape(-1).tolist()):
                out[k] = rows[j]
        return out

    def close(self) -> None:
        """Close the handles this process opened (inherited ones are left alone)."""
        if self._pid == os.getpid():
            for f in self._handles.values():
                if f.id.valid:
                    f.close()
        self._handles, self._images = {}, {}
        self._pid = None

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Sent to spawned DataLoader workers: everything but open handles (h5py objects cannot
        # cross a process boundary, and must not).
        state = self.__dict__.copy()
        state.update(_pid=None, _handles={}, _images={}, _orphans=[])
        return state

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s)}" for s in self._shards)
        return f"DatasetReader({str(self._path)!r}, {self._meta['source']}, {self.encoding}, {counts})"

    # -- internals --------------------------------------------------------------------------
    def _check_split(self, split: str) -> str:
        if split not in self._shards:
            raise DataError(f"{self._path}: no split '{split}' (expected one of {sorted(self._shards)})")
        return split

    def _check_indices(self, split: str, indices: Any) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise DataError(
                f"{self._path}: indices for split '{split}' must be a 1-D integer array, got {idx.dtype} {idx.shape}"
            )
        idx = idx.astype(np.int64, copy=False)
        n = self.count(split)
        bad = np.flatnonzero((idx < 0) | (idx >= n))
        if bad.size:
            raise DataError(
                f"{self._path}: index {int(idx[bad[0]])} out of range for split '{split}' (expected 0..{n - 1})"
            )
        return idx

    def _shard_of(self, split: str, idx: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts[split], idx, side="right") - 1

    def _file(self, split: str, s: int) -> h5py.File:
        pid = os.getpid()
        if self._pid != pid:
            # After a fork the parent's handles share HDF5 state with the parent: keep them
            # referenced (closing them here could touch that state) and open our own.
            self._orphans.extend(self._handles.values())
            self._handles, self._images = {}, {}
            self._pid = pid
        path = self._shards[split][s].path
        f = self._handles.get(path)
        if f is None:
            try:
                f = open_h5_read(path)
            except OSError as exc:
                raise DataError(f"{path}: not an HDF5 file or truncated ({exc})") from None
            self._handles[path] = f
        return f

    def _images_of(self, split: str, s: int) -> h5py.Dataset:
        f = self._file(split, s)
        ds = self._images.get(self._shards[split][s].path)
        if ds is None:
            ds = self._images[self._shards[split][s].path] = f["images"]
        return ds

    def _validate(self) -> None:
        manifest = self._path / MANIFEST_NAME
        for split in SPLITS:
            if split not in self._shards:
                raise DataError(f"{manifest}: missing split '{split}'")
        for split, shards in self._shards.items():
            labels = [self._validate_shard(split, k, shard, manifest) for k, shard in enumerate(shards)]
            all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
            all_labels.setflags(write=False)
            expected = self._meta["splits"][split]["class_counts"]
            found = np.bincount(all_labels, minlength=self.num_classes).tolist()
            if found != expected:
                raise DataError(
                    f"{manifest}: labels in the '{split}' shards count {found} per class, "
                    f"expected class_counts {expected}"
                )
            self._labels[split] = all_labels

    def _validate_shard(self, split: str, k: int, shard: _Shard, manifest: Path) -> np.ndarray:
        path = shard.path
        if not path.is_file():
            raise DataError(f"{path}: shard {k} of split '{split}' listed in {manifest} is missing")
        with open(path, "rb") as fh:
            head = fh.read(len(HDF5_SIGNATURE))
        if head != HDF5_SIGNATURE:
            raise DataError(f"{path}: not an HDF5 file or truncated (no HDF5 signature)")
        try:
            with open_h5_read(path) as f:
                return self._check_shard_contents(f, split, shard)
        except OSError as exc:
            raise DataError(f"{path}: not an HDF5 file or truncated ({exc})") from None

    def _check_shard_contents(self, f: h5py.File, split: str, shard: _Shard) -> np.ndarray:
        path, n = shard.path, shard.count
        for key in ("images", "labels") + (("names",) if self._meta["source"] == "imagefolder" else ()):
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise DataError(f"{path}: missing dataset '{key}'")
        images, labels = f["images"], f["labels"]
        if labels.ndim != 1 or labels.shape[0] != n:
            raise DataError(f"{path}: dataset 'labels' has shape {labels.shape}, expected ({n},) as in the manifest")
        if labels.dtype.kind not in "iu":
            raise DataError(f"{path}: dataset 'labels' has dtype {labels.dtype}, expected an integer type")
        if images.shape[0:1] != (n,):
            found = images.shape[0] if images.ndim else 0
            raise DataError(f"{path}: dataset 'images' has {found} samples, expected {n} as in the manifest")
        if "names" in f and f["names"].shape != (n,):
            raise DataError(f"{path}: dataset 'names' has shape {f['names'].shape}, expected ({n},)")
        if self.encoding == "raw":
            c, h, w = self.image_shape  # type: ignore[misc]
            if images.dtype != np.uint8:
                raise DataError(f"{path}: dataset 'images' has dtype {images.dtype}, expected uint8")
            if images.shape != (n, h, w, c):
                raise DataError(
                    f"{path}: dataset 'images' has shape {images.shape}, expected {(n, h, w, c)} [n, H, W, C]"
                )
        else:
            if images.ndim != 1 or h5py.check_vlen_dtype(images.dtype) != np.uint8:
                raise DataError(
                    f"{path}: dataset 'images' should be 1-D variable-length uint8 (encoded JPEG), "
                    f"found {images.dtype} {images.shape}"
                )
        attr_split = f.attrs.get("split")
        if attr_split is not None and str(attr_split) != split:
            raise DataError(f"{path}: shard attribute split={attr_split!r}, expected '{split}'")
        values = labels[()].astype(np.int64, copy=False)
        bad = np.flatnonzero((values < 0) | (values >= self.num_classes))
        if bad.size:
            raise DataError(
                f"{path}: label {int(values[bad[0]])} at index {int(bad[0])} out of range "
                f"(expected 0..{self.num_classes - 1})"
            )
        return values


def shard_summary(path: Path) -> dict[str, Any] | None:
    """Attributes and label counts of a finished shard, or None if it is absent or unreadable.

    Used to decide whether a shard of a resumed conversion can be kept.
    """
    if not path.is_file():
        return None
    try:
        with open_h5_read(path) as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            labels = f["labels"][()].astype(np.int64)
            n_images = f["images"].shape[0]
            skipped = f["skipped"].asstr()[()].tolist() if "skipped" in f else []
    except (OSError, KeyError, ValueError):
        return None
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    if attrs.get("count") != len(labels) or n_images != len(labels):
        return None
    return {"attrs": attrs, "labels": labels, "skipped": [tuple(r) for r in skipped]}


__all__ = [
    "DatasetReader",
    "JpegShardWriter",
    "open_h5_read",
    "shard_name",
    "shard_summary",
    "write_raw_shard",
]
