"""``prepare_dataset``: convert a source into a directory of HDF5 shards, once, resumably.

The flow: check arguments -> if ``dataset.json`` exists, return (same settings) or refuse ->
list the source deterministically -> claim the directory (``conversion.json`` records the settings
and source listing, so a rerun can only resume with the same ones) -> write every shard
that is not already complete, in parallel for image folders -> ``skipped.tsv`` -> ``dataset.json``
last. A shard is kept on a rerun when its attributes say it was made from exactly the planned
items (a sha256 of the item list) and its lengths agree; anything else is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue as queue_mod
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import remove_stale_temps, write_bytes_atomic
from .errors import DataError
from .hdf5 import JpegShardWriter, shard_name, shard_summary, write_raw_shard
from .imaging import DECODE_ERRORS, describe_error, encode_for_storage, read_file
from .manifest import (
    FORMAT_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MANIFEST_NAME,
    SOURCES,
    SPLITS,
    write_manifest,
)
from .progress import Progress
from .sources import ArraySource, FolderSource, load_digits, load_mnist5k, scan_imagefolder

CONVERSION_NAME = "conversion.json"  # settings + source listing + start time of the conversion
SKIPPED_NAME = "skipped.tsv"


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: which split/index, and the exact items that belong in it."""

    split: str
    index: int
    path: Path
    items: Any  # imagefolder: [(relative path, label)], raw: source indices
    items_sha256: str


@dataclass
class ShardResult:
    split: str
    index: int
    file: str
    count: int
    class_counts: np.ndarray
    skipped: list[tuple[str, str]]


def prepare_dataset(
    source: str,
    out: str | Path,
    root: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_side: int = 512,
    quality: int = 90,
    shard_size: int = 10000,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Convert ``source`` into HDF5 shards under ``out`` and return ``out``.

    Reruns are cheap and safe: a finished dataset with identical settings is returned as is,
    one with other settings is refused, and an unfinished one is resumed shard by shard.
    """
    out = Path(out)
    _check_args(source, root, test_fraction, max_side, quality, shard_size, workers)
    settings = _settings(source, root, test_fraction, seed, max_side, quality, shard_size)
    if _already_prepared(out, settings, progress):
        return out
    src: ArraySource | FolderSource
    if source == "imagefolder":
        src = scan_imagefolder(root, test_fraction, seed)  # type: ignore[arg-type]
        listing = src.listing_digest()
    else:
        loader = load_mnist5k if source == "mnist5k" else load_digits
        src = loader(test_fraction, seed)
        listing = None
    started = _claim_directory(out, settings, listing)
    remove_stale_temps(out)
    if isinstance(src, FolderSource):
        results = _convert_folder(src, out, max_side, quality, shard_size, workers, progress)
    else:
        results = _convert_arrays(src, out, shard_size)
    meta = _build_meta(src, settings, seed, results, out, started)
    if isinstance(src, FolderSource):
        _write_skipped(out, results)
    write_manifest(out, meta)
    if progress:
        counts = ", ".join(f"{s} {meta['splits'][s]['count']:,}" for s in SPLITS)
        print(f"prepared {out}: {counts}, skipped {meta['skipped']}", file=sys.stderr)
    return out


# -- arguments and settings -------------------------------------------------------------------
def _check_args(source: str, root: Any, test_fraction: float, max_side: int, quality: int,
                shard_size: int, workers: int | None) -> None:
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; expected one of {SOURCES}")
    if source == "imagefolder":
        if root is None:
            raise DataError("source 'imagefolder' needs root (the folder with train/ and val/, or class folders)")
        if not Path(root).is_dir():
            raise DataError(f"{root}: image folder does not exist or is not a directory")
    elif root is not None:
        raise DataError(f"source {source!r} is built in and takes no root (got {root})")
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_side < 8:
        raise DataError(f"max_side must be >= 8, got {max_side}")
    if not 1 <= quality <= 100:
        raise DataError(f"quality must be in 1..100, got {quality}")
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    if workers is not None and workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")


def _settings(source: str, root: Any, test_fraction: float, seed: int, max_side: int,
              quality: int, shard_size: int) -> dict[str, Any]:
    """The settings that determine the output bytes (and nothing else, e.g. not ``workers``)."""
    settings: dict[str, Any] = {"source": source, "shard_size": int(shard_size), "seed": int(seed),
                                "test_fraction": float(test_fraction)}
    if source == "imagefolder":
        root_path = Path(root).resolve()  # type: ignore[arg-type]
        settings.update(root=str(root_path), max_side=int(max_side), quality=int(quality))
        if (root_path / "train").is_dir() and (root_path / "val").is_dir():
            settings.update(seed=None, test_fraction=None)  # the split is given by the folders
    return settings


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _already_prepared(out: Path, settings: dict[str, Any], progress: bool) -> bool:
    """True if ``out`` holds a finished dataset with these settings and all its shards.

    Other settings: refused. Same settings but shards missing: False, and the caller resumes
    (rewriting only the missing shards; the manifest comes out byte-identical).
    """
    manifest = out / MANIFEST_NAME
    if not manifest.exists():
        return False
    try:
        meta = json.loads(manifest.read_text())
        previous = meta["settings"]
        files = [s["file"] for split in meta["splits"].values() for s in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest}: exists but is unreadable ({exc}); refusing to overwrite it") from None
    if previous != settings:
        raise DataError(
            f"{out}: already holds a finished dataset prepared with other settings "
            f"({_diff(previous, settings)}); refusing to overwrite it: choose another directory or delete it"
        )
    missing = [f for f in files if not (out / f).is_file()]
    if missing:
        if progress:
            print(f"{out}: {len(missing)} shard(s) missing ({missing[0]} ...), resuming", file=sys.stderr)
        return False
    if progress:
        print(f"{out}: already prepared with these settings", file=sys.stderr)
    return True


def _claim_directory(out: Path, settings: dict[str, Any], listing: str | None) -> str:
    """Make ``out`` ours and return the conversion's start time (the manifest's ``created``).

    ``out`` must be new or empty, or hold ``conversion.json`` with the very same settings and
    source listing (an unfinished or damaged conversion, which is then resumed). The start time
    is kept across resumes so that a resumed conversion writes the same manifest bytes, hence
    the same fingerprint, and partitions made before stay valid.
    """
    record = out / CONVERSION_NAME
    claim = {"settings": settings, "listing_sha256": listing}
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if record.exists():
        try:
            previous = json.loads(record.read_text())
            started = previous.pop("started")
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise DataError(f"{record}: unreadable ({exc}); delete the directory to start over") from None
        if previous != claim:
            what = "the source folder changed" if previous.get("settings") == settings else \
                _diff(previous.get("settings") or {}, settings)
            raise DataError(
                f"{out}: holds a conversion with other settings ({what}); "
                "rerun with the same settings and source to resume it, or delete the directory"
            )
        return str(started)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: directory is not empty and holds no dataset or conversion; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    write_bytes_atomic(record, (json.dumps(dict(claim, started=started), indent=1, sort_keys=True) + "\n").encode())
    return started


def _items_digest(items: Any) -> str:
    if isinstance(items, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(items, dtype="<i8").tobytes()).hexdigest()
    return hashlib.sha256("\n".join(f"{rel}\t{label}" for rel, label in items).encode()).hexdigest()


def _plan(out: Path, splits: dict[str, Any], shard_size: int) -> list[ShardJob]:
    jobs = []
    for split in SPLITS:
        items = splits[split]
        for index, start in enumerate(range(0, len(items), shard_size)):
            chunk = items[start : start + shard_size]
            jobs.append(ShardJob(split, index, out / shard_name(split, index), chunk, _items_digest(chunk)))
    return jobs


def _finished(job: ShardJob, num_classes: int) -> ShardResult | None:
    """The result of an already written shard that matches ``job`` exactly, else None."""
    summary = shard_summary(job.path)
    if summary is None:
        return None
    attrs = summary["attrs"]
    if (
        attrs.get("format_version") != FORMAT_VERSION
        or attrs.get("split") != job.split
        or attrs.get("index") != job.index
        or attrs.get("planned") != len(job.items)
        or attrs.get("items_sha256") != job.items_sha256
    ):
        return None
    labels = summary["labels"]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        return None
    return ShardResult(job.split, job.index, job.path.name, len(labels),
                       np.bincount(labels, minlength=num_classes), summary["skipped"])


# -- built-in arrays --------------------------------------------------------------------------
def _convert_arrays(src: ArraySource, out: Path, shard_size: int) -> list[ShardResult]:
    num_classes = len(src.classes)
    results = []
    for job in _plan(out, src.splits, shard_size):
        result = _finished(job, num_classes)
        if result is None:
            labels = src.labels[job.items]
            write_raw_shard(job.path, job.split, job.index, src.images[job.items], labels,
                            {"planned": len(job.items), "items_sha256": job.items_sha256, "encoding": "raw"})
            result = ShardResult(job.split, job.index, job.path.name, len(labels),
                                 np.bincount(labels, minlength=num_classes), [])
        results.append(result)
    return results


# -- image folders ----------------------------------------------------------------------------
def convert_shard(job: ShardJob, root: Path, max_side: int, quality: int, num_classes: int,
                  report: Callable[[int], None]) -> ShardResult:
    """Re-encode the images of one shard and write it atomically; unreadable files are skipped."""
    writer = JpegShardWriter(job.path, job.split, job.index, len(job.items),
                             {"items_sha256": job.items_sha256, "encoding": "jpeg"})
    counts = np.zeros(num_classes, dtype=np.int64)
    try:
        for rel, label in job.items:
            try:
                encoded = encode_for_storage(read_file(root / rel), max_side, quality)
            except DECODE_ERRORS as exc:
                writer.skip(rel, describe_error(exc))
            else:
                writer.add(encoded, label, rel)
                counts[label] += 1
            report(1)
        count = writer.commit()
    except DataError:
        writer.abort()
        raise
    except Exception as exc:
        writer.abort()
        raise RuntimeError(f"{job.path}: conversion failed: {type(exc).__name__}: {exc}") from exc
    return ShardResult(job.split, job.index, job.path.name, count, counts, writer.skipped)


_QUEUE: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _QUEUE
    _QUEUE = progress_queue


def _convert_in_worker(job: ShardJob, root: Path, max_side: int, quality: int, num_classes: int) -> ShardResult:
    pending = [0, time.monotonic()]

    def report(n: int) -> None:
        pending[0] += n
        now = time.monotonic()
        if now - pending[1] >= 0.5:
            _QUEUE.put(pending[0])
            pending[0], pending[1] = 0, now

    result = convert_shard(job, root, max_side, quality, num_classes, report)
    if pending[0]:
        _QUEUE.put(pending[0])
    return result


def _convert_folder(src: FolderSource, out: Path, max_side: int, quality: int, shard_size: int,
                    workers: int | None, progress: bool) -> list[ShardResult]:
    num_classes = len(src.classes)
    jobs = _plan(out, src.splits, shard_size)
    results: dict[tuple[str, int], ShardResult] = {}
    todo = []
    for job in jobs:
        done = _finished(job, num_classes)
        if done is None:
            todo.append(job)
        else:
            results[(job.split, job.index)] = done
    if progress and results:
        print(f"{out}: resuming, {len(results)} of {len(jobs)} shards already complete", file=sys.stderr)
    bar = Progress(sum(len(j.items) for j in todo), f"prepare {out.name}", enabled=progress)
    n_workers = min(workers or len(os.sched_getaffinity(0)), max(len(todo), 1))
    if n_workers <= 1:
        for job in todo:
            results[(job.split, job.index)] = convert_shard(job, src.root, max_side, quality, num_classes, bar.update)
    else:
        _run_pool(todo, src.root, max_side, quality, num_classes, n_workers, bar, results)
    bar.close()
    return [results[(j.split, j.index)] for j in jobs]


def _run_pool(todo: list[ShardJob], root: Path, max_side: int, quality: int, num_classes: int,
              n_workers: int, bar: Progress, results: dict[tuple[str, int], ShardResult]) -> None:
    """Convert shards in a process pool.

    ``fork`` where available: it starts at once and, unlike ``spawn``, does not re-run the main
    module (which fails for stdin or notebooks, and could import mpi4py). It is safe here because
    at this point the process holds no open HDF5 file (shards checked on resume are closed
    again), and ``prepare`` runs neither MPI nor torch.
    """
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress_queue,)) as pool:
        pending: set[Future] = {
            pool.submit(_convert_in_worker, job, root, max_side, quality, num_classes) for job in todo
        }
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                for fut in finished:
                    result = fut.result()
                    results[(result.split, result.index)] = result
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        finally:
            _drain(progress_queue, bar)


def _drain(progress_queue: Any, bar: Progress) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue_mod.Empty:
            return


# -- manifest ---------------------------------------------------------------------------------
def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``uint8 [n, H, W, C]`` images scaled to 0..1 (float64 sums)."""
    c = images.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    for start in range(0, len(images), 4096):
        block = images[start : start + 4096].reshape(-1, c).astype(np.float64) / 255.0
        total += block.sum(0)
        total_sq += (block * block).sum(0)
        count += len(block)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 0.0))
    std = np.where(std > 0, std, 1.0)
    return [float(v) for v in mean], [float(v) for v in std]


def _build_meta(src: ArraySource | FolderSource, settings: dict[str, Any], seed: int,
                results: list[ShardResult], out: Path, started: str) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        mine = [r for r in results if r.split == split]
        class_counts = np.sum([r.class_counts for r in mine], axis=0).astype(int).tolist()
        splits[split] = {
            "count": sum(r.count for r in mine),
            "class_counts": class_counts,
            "shards": [{"file": r.file, "count": r.count} for r in mine],
        }
        if splits[split]["count"] == 0:
            raise DataError(f"{out}: no readable images in split '{split}' (see {out / SKIPPED_NAME})")
    if isinstance(src, ArraySource):
        n, h, w, c = src.images.shape
        mean, std = _channel_stats(src.images[src.splits["train"]])
        image_info: dict[str, Any] = {"encoding": "raw", "image_shape": [c, h, w], "channels": c}
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        image_info = {"encoding": "jpeg", "image_shape": None, "channels": 3}
    return {
        "format_version": FORMAT_VERSION,
        "source": settings["source"],
        "seed": int(seed),
        "test_fraction": settings["test_fraction"],  # None when train/ and val/ give the split
        **image_info,
        "classes": list(src.classes),
        "mean": mean,
        "std": std,
        "splits": splits,
        "skipped": sum(len(r.skipped) for r in results),
        "created": started,  # when the conversion began: stable across resumes
        "settings": settings,
    }


def _clean(text: str) -> str:
    """One TSV field: tabs and line breaks become spaces."""
    return str(text).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _write_skipped(out: Path, results: list[ShardResult]) -> None:
    lines = ["path\treason"] + [f"{_clean(p)}\t{_clean(r)}" for res in results for p, r in res.skipped]
    write_bytes_atomic(out / SKIPPED_NAME, ("\n".join(lines) + "\n").encode("utf-8"))
