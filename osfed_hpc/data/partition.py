"""Partitions: which train samples each federated client holds.

A partition is a small ``.npz`` of index lists (``indices`` concatenated, ``offsets`` N+1, and
``meta_json``) stored next to the shards, so a sweep over 20/40/60 clients reuses one conversion.
It is bound to its dataset by the manifest fingerprint: loading it against another dataset fails
instead of silently training on the wrong samples.

Dirichlet partitions with small alpha give some clients few or no samples. ``make_partition``
redraws with seeds derived deterministically from ``seed`` until every client has ``min_samples``,
and records which draw it kept, so the same arguments always give the same partition.
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes_atomic
from .errors import DataError
from .hdf5 import DatasetReader

SCHEMES = ("dirichlet", "iid")
PARTITION_FORMAT = 1


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Split sample indices among clients with per-class proportions drawn from Dir(alpha).

    For each class (in label order) the class's samples are shuffled and cut at the cumulative
    proportions of one Dirichlet draw. Returns ``num_clients`` sorted ``int64`` arrays that are
    disjoint and together cover every index.
    """
    _check_clients(num_clients)
    check_alpha(alpha)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    bounds = np.append(starts, len(labels))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(len(classes)):
        members = rng.permutation(order[bounds[k] : bounds[k + 1]])
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        if not np.all(np.isfinite(proportions)):  # tiny alpha can underflow every component
            proportions = np.zeros(num_clients)
            proportions[rng.integers(num_clients)] = 1.0
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into ``num_clients`` near-equal parts (sizes differ by at most 1)."""
    _check_clients(num_clients)
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def _check_clients(num_clients: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"num_clients must be a positive int, got {num_clients!r}")


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float, or ``DataError`` unless it is a finite number > 0.

    ``inf`` is the tempting value for "IID", but Dir(inf) draws NaN proportions, which the
    underflow guard of ``dirichlet_partition`` turns into "every sample on one random client",
    the opposite of IID; nan, 0 and negative values have no meaning at all.
    """
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not (math.isfinite(value) and value > 0):
        raise DataError(
            f"--alpha must be a finite number > 0 (the Dirichlet concentration; --scheme iid "
            f"for equal random shares), got {alpha!r}"
        )
    return value


def check_partition_args(num_clients: int, scheme: str, alpha: Any = 0.5, min_samples: int = 1,
                         max_redraws: int = 100) -> None:
    """Refuse bad partition arguments before any dataset is opened (cheap, no I/O).

    The CLI can call this before opening the dataset; ``make_partition`` calls it first too.
    ``alpha`` is only checked where it is used (dirichlet) or given (not None).
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; expected one of {SCHEMES}")
    _check_clients(num_clients)
    if scheme == "dirichlet" or alpha is not None:
        check_alpha(alpha)
    if min_samples < 0 or max_redraws < 0:
        raise DataError(f"min_samples and max_redraws must be >= 0, got {min_samples}, {max_redraws}")


def _check_feasible(num_clients: int, num_train: int, min_samples: int, allow_small: bool, where: Path) -> None:
    """Fail at once when no draw can give every client a sample (or ``min_samples`` of them).

    Without this, a typo such as 10**9 clients allocates per-client lists for a minute and
    ends in ``MemoryError``; and an impossible ``min_samples`` burns every redraw first.
    """
    if num_clients > num_train:
        raise DataError(
            f"--clients {num_clients:,} is more than the {num_train:,} train samples of {where}: "
            "every client needs at least one sample"
        )
    if not allow_small and num_clients * min_samples > num_train:
        raise DataError(
            f"--clients {num_clients:,} x --min-samples {min_samples:,} needs {num_clients * min_samples:,} "
            f"train samples, {where} has {num_train:,}: use fewer clients, a smaller --min-samples "
            "or --allow-small"
        )


def redraw_seed(seed: int, draw: int) -> int:
    """Seed of the ``draw``-th attempt: ``seed`` itself first, then derived via SeedSequence."""
    if draw == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), draw]).generate_state(1, np.uint32)[0])


def _format_alpha(alpha: float) -> str:
    return f"{float(alpha):g}"


class Partition:
    """Client -> sorted global train indices, with the metadata that ties it to a dataset."""

    def __init__(self, indices: np.ndarray, offsets: np.ndarray, meta: dict[str, Any]) -> None:
        self._indices = np.asarray(indices, dtype=np.int64)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._meta = dict(meta)

    @classmethod
    def from_lists(cls, parts: list[np.ndarray], meta: dict[str, Any]) -> Partition:
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts])
        indices = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return cls(indices, offsets, meta)

    @property
    def num_clients(self) -> int:
        return len(self._offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self._offsets)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def client_indices(self, cid: int) -> np.ndarray:
        """Sorted global train indices of client ``cid`` (a fresh ``int64`` array)."""
        if not 0 <= cid < self.num_clients:
            raise DataError(f"client {cid} does not exist (partition has {self.num_clients} clients)")
        return self._indices[self._offsets[cid] : self._offsets[cid + 1]].copy()

    def all_indices(self) -> np.ndarray:
        """Every client's indices, concatenated in client order."""
        return self._indices.copy()

    @staticmethod
    def default_path(data_dir: str | Path, scheme: str, num_clients: int, alpha: float | None, seed: int) -> Path:
        """``DIR/partitions/{scheme}-n{N}-a{alpha}-s{seed}.npz`` (no alpha part for iid)."""
        alpha_part = "" if scheme == "iid" else f"-a{_format_alpha(alpha)}"  # type: ignore[arg-type]
        return Path(data_dir) / "partitions" / f"{scheme}-n{num_clients}{alpha_part}-s{seed}.npz"

    def to_bytes(self) -> bytes:
        meta = np.frombuffer(json.dumps(self._meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, indices=self._indices, offsets=self._offsets, meta_json=meta)
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write atomically; an identical existing file is kept, a different one is refused."""
        path = Path(path)
        if path.exists():
            try:
                existing = _read_npz(path)
            except DataError:
                existing = None
            if existing is not None and self._same_as(*existing):
                return path
            raise DataError(
                f"{path}: a different partition file already exists; refusing to overwrite it "
                "(delete it, or choose another seed/path)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, self.to_bytes())
        return path

    def _same_as(self, indices: np.ndarray, offsets: np.ndarray, meta: dict[str, Any]) -> bool:
        return (
            np.array_equal(indices, self._indices)
            and np.array_equal(offsets, self._offsets)
            and meta == json.loads(json.dumps(self._meta))
        )

    def summary_table(self, reader: DatasetReader) -> str:
        """Per-client samples and classes present, then min / median / max of the sizes."""
        labels = reader.labels("train")
        sizes = self.sizes
        width = max(len(str(self.num_clients - 1)), len("client"))
        lines = [f"{'client':>{width}}  {'samples':>9}  {'classes':>7}"]
        for cid in range(self.num_clients):
            present = np.unique(labels[self.client_indices(cid)]).size
            lines.append(f"{cid:>{width}}  {int(sizes[cid]):>9,}  {present:>7}")
        if self.num_clients:
            lines.append(
                f"size min / median / max: {int(sizes.min()):,} / {float(np.median(sizes)):,.1f} / "
                f"{int(sizes.max()):,} samples over {self.num_clients} clients "
                f"({int(sizes.sum()):,} in all)"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        m = self._meta
        return f"Partition({m.get('scheme')}, clients={self.num_clients}, alpha={m.get('alpha')}, seed={m.get('seed')})"


def make_partition(
    reader: DatasetReader,
    num_clients: int,
    scheme: str,
    alpha: float = 0.5,
    seed: int = 0,
    min_samples: int = 1,
    allow_small: bool = False,
    max_redraws: int = 100,
) -> Partition:
    """Partition the train split of ``reader`` among ``num_clients`` clients.

    ``dirichlet``: if a client gets fewer than ``min_samples``, redraw with the next derived seed
    (up to ``max_redraws`` times); if none works, raise ``DataError`` naming the small clients,
    unless ``allow_small`` (then warn and keep the draw whose smallest client is largest). So
    ``allow_small`` only turns the error into a warning: whenever some draw satisfies
    ``min_samples`` the result is the same with or without it. ``iid``: equal shares.

    A client without samples can never train, so it is refused whatever ``min_samples`` (even 0)
    and ``allow_small`` say, exactly as ``load_partition`` refuses it.
    """
    check_partition_args(num_clients, scheme, alpha, min_samples, max_redraws)
    _check_feasible(int(num_clients), reader.count("train"), min_samples, allow_small, reader.path)
    labels = reader.labels("train")
    meta: dict[str, Any] = {
        "format": PARTITION_FORMAT,
        "scheme": scheme,
        "num_clients": int(num_clients),
        "alpha": float(alpha) if scheme == "dirichlet" else None,
        "seed": int(seed),
        "min_samples": int(min_samples),
        "dataset_fingerprint": reader.fingerprint,
        "num_train": int(len(labels)),
    }
    if scheme == "iid":
        parts = iid_partition(len(labels), num_clients, seed)
        _check_small(parts, min_samples, allow_small, "iid", num_clients, len(labels), 0, alpha)
        return Partition.from_lists(parts, dict(meta, draw=0, draw_seed=int(seed)))
    best: tuple[int, int, list[np.ndarray]] | None = None  # (smallest size, draw, parts)
    for draw in range(max_redraws + 1):
        draw_seed = redraw_seed(seed, draw)
        parts = dirichlet_partition(labels, num_clients, alpha, draw_seed)
        smallest = min(len(p) for p in parts)
        if smallest >= max(min_samples, 1):
            return Partition.from_lists(parts, dict(meta, draw=draw, draw_seed=draw_seed))
        if best is None or smallest > best[0]:
            best = (smallest, draw, parts)
    assert best is not None
    _, draw, parts = best
    _check_small(parts, min_samples, allow_small, "dirichlet", num_clients, len(labels), max_redraws, alpha)
    return Partition.from_lists(parts, dict(meta, draw=draw, draw_seed=redraw_seed(seed, draw)))


def _check_small(parts: list[np.ndarray], min_samples: int, allow_small: bool, scheme: str,
                 num_clients: int, n: int, redraws: int, alpha: float) -> None:
    what = f"{scheme} partition of {n} samples over {num_clients} clients"
    if scheme == "dirichlet":
        what += f" (alpha={_format_alpha(alpha)}, {redraws} redraws)"
    empty = [cid for cid, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"{what}: clients {_list_ids(empty)} get no samples and could never train "
            "(--allow-small keeps small clients, not empty ones); use a larger --alpha or fewer --clients"
        )
    small = [(cid, len(p)) for cid, p in enumerate(parts) if len(p) < min_samples]
    if not small:
        return
    listed = ", ".join(f"client {cid}: {size}" for cid, size in small[:20])
    more = f" and {len(small) - 20} more" if len(small) > 20 else ""
    if allow_small:
        warnings.warn(f"{what}: clients below min_samples={min_samples} ({listed}{more})", stacklevel=3)
        return
    raise DataError(
        f"{what}: clients below min_samples={min_samples}: {listed}{more}; "
        "use --allow-small, a larger alpha, fewer clients or a smaller min_samples"
    )


def _list_ids(ids: list[int], limit: int = 20) -> str:
    """``[3, 7]``, or the first ``limit`` ids and how many more: messages stay one short line."""
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{f', ... ({len(ids) - limit} more)' if len(ids) > limit else ''}]"


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"indices", "offsets", "meta_json"} - set(npz.files)
            if missing:
                raise DataError(f"{path}: not a partition file (missing arrays {sorted(missing)})")
            indices, offsets, meta_raw = npz["indices"], npz["offsets"], npz["meta_json"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: not a partition file ({type(exc).__name__}: {exc})") from None
    if indices.ndim != 1 or indices.dtype.kind not in "iu" or offsets.ndim != 1 or offsets.dtype.kind not in "iu":
        raise DataError(f"{path}: not a partition file (indices/offsets must be 1-D integer arrays)")
    if meta_raw.dtype != np.uint8:
        raise DataError(f"{path}: not a partition file (meta_json must be uint8 bytes)")
    try:
        meta = json.loads(meta_raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a partition file (meta_json is not JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a partition file (meta_json is not an object)")
    return indices.astype(np.int64), offsets.astype(np.int64), meta


def load_partition(path: str | Path, reader: DatasetReader) -> Partition:
    """Load and validate a partition file against ``reader``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: partition file does not exist")
    indices, offsets, meta = _read_npz(path)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(indices) or np.any(np.diff(offsets) < 0):
        raise DataError(
            f"{path}: offsets must start at 0, never decrease and end at {len(indices)} (the number of indices)"
        )
    if meta.get("num_clients") != len(offsets) - 1:
        raise DataError(
            f"{path}: meta num_clients={meta.get('num_clients')} but offsets describe {len(offsets) - 1} clients"
        )
    n_train = reader.count("train")
    if meta.get("dataset_fingerprint") != reader.fingerprint or meta.get("num_train") != n_train:
        raise DataError(
            f"partition {path} was made for another dataset (fingerprint {meta.get('dataset_fingerprint')}, "
            f"{meta.get('num_train')} train samples; {reader.path} has {reader.fingerprint}, {n_train})"
        )
    bad = np.flatnonzero((indices < 0) | (indices >= n_train))
    if bad.size:
        raise DataError(f"{path}: index {int(indices[bad[0]])} at position {int(bad[0])} is outside [0, {n_train})")
    uniq, counts = np.unique(indices, return_counts=True)
    if uniq.size != indices.size:
        dup = int(uniq[np.argmax(counts > 1)])
        owners = [c for c in range(len(offsets) - 1) if np.any(indices[offsets[c] : offsets[c + 1]] == dup)]
        raise DataError(f"{path}: sample {dup} appears more than once (clients {owners}); expected disjoint clients")
    _check_no_empty_client(path, offsets)
    return Partition(indices, offsets, meta)


def _check_no_empty_client(path: Path, offsets: np.ndarray) -> None:
    """Refuse a partition with a client that holds no sample, whatever its meta says.

    Such a client can never train: depending on the schedule it fails in the middle of a run
    ("cannot produce N steps") or contributes a zero-weight update; ``allow_small`` in a file
    means "below min_samples", and ``make_partition`` never writes an empty client.
    """
    empty = np.flatnonzero(np.diff(offsets) == 0).tolist()
    if empty:
        raise DataError(
            f"{path}: clients {_list_ids(empty)} have no samples; every client needs at least one to train "
            "(make the partition again with fewer clients or a larger alpha)"
        )
