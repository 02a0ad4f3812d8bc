"""``verify_dataset``: the thorough check to run once after a conversion (or a copy to scratch).

``DatasetReader`` already checks structure, lengths, dtypes and labels when it opens a dataset;
this adds what costs real I/O: names and skipped records agree with the manifest, and a random
sample of images per split actually decodes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataError
from .hdf5 import DatasetReader, open_h5_read
from .imaging import DECODE_ERRORS


def verify_dataset(path: str | Path, sample: int = 64, seed: int = 0) -> dict[str, Any]:
    """Check counts and labels, decode ``sample`` random images per split; return a report.

    Raises ``DataError`` naming the shard and index of the first problem.
    """
    reader = DatasetReader(path)
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {
        "path": str(reader.path),
        "fingerprint": reader.fingerprint,
        "source": reader.meta["source"],
        "encoding": reader.encoding,
        "num_classes": reader.num_classes,
        "skipped": reader.meta.get("skipped", 0),
        "splits": {},
    }
    try:
        for split in reader.splits:
            n = reader.count(split)
            _check_attrs(reader, split)
            chosen = np.sort(rng.choice(n, size=min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
            sizes = _decode_sample(reader, split, chosen)
            labels = reader.labels(split)
            report["splits"][split] = {
                "count": n,
                "shards": len(reader.shard_paths(split)),
                "classes_present": int(np.count_nonzero(np.bincount(labels, minlength=reader.num_classes))),
                "decoded": len(chosen),
                "image_sizes": sizes,
            }
    finally:
        reader.close()
    report["ok"] = True
    return report


def _check_attrs(reader: DatasetReader, split: str) -> None:
    """Each shard's own ``count``/``split`` attributes agree with the manifest."""
    expected = {s["file"]: s["count"] for s in reader.meta["splits"][split]["shards"]}
    for path in reader.shard_paths(split):
        try:
            with open_h5_read(path) as f:
                count = f.attrs.get("count")
                attr_split = f.attrs.get("split")
        except OSError as exc:
            raise DataError(f"{path}: not an HDF5 file or truncated ({exc})") from None
        if count is None or int(count) != expected[path.name]:
            raise DataError(f"{path}: attribute count={count}, expected {expected[path.name]} as in the manifest")
        if attr_split is None or str(attr_split) != split:
            raise DataError(f"{path}: attribute split={attr_split!r}, expected '{split}'")


def _decode_sample(reader: DatasetReader, split: str, chosen: np.ndarray) -> dict[str, list[int]]:
    """Decode the chosen samples with PIL; return min/max width and height seen."""
    widths, heights = [], []
    if reader.encoding == "raw" and len(chosen):
        for arr in reader.read_raw(split, chosen):
            img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            widths.append(img.size[0])
            heights.append(img.size[1])
    elif reader.encoding == "jpeg":
        for k in chosen:
            data = reader.read_encoded(split, int(k))
            try:
                img = Image.open(io.BytesIO(data))
                img.load()
            except DECODE_ERRORS as exc:
                shard, local = reader.locate(split, int(k))
                raise DataError(
                    f"{shard}: image {local} (global {int(k)} of '{split}') does not decode: {exc}"
                ) from None
            widths.append(img.size[0])
            heights.append(img.size[1])
    if not widths:
        return {}
    return {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)]}
