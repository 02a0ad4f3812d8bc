"""What a client puts on the wire: named arrays plus a small header, packed into one byte buffer.

Why a format of our own instead of pickle or ``torch.save``: the bytes come from another rank
(in a real deployment, another organisation) and must be treated as data, never as code; and the
packed size is exactly the *logical* uplink cost we report, so it has to be what a deployment
would send: raw array bytes plus a header of a few hundred bytes.

Layout (little-endian)::

    b"OSFP" | u16 version | u16 reserved | u32 header_len | header (UTF-8 JSON) | pad to 8 | arrays

The header is ``{"meta": {str: str|int|float|bool}, "arrays": [[name, dtype, shape, offset], ...]}``
with offsets relative to the start of the array section, 8-byte aligned, in order, not overlapping,
and the buffer ends exactly where the last array ends. ``unpack`` checks all of that and raises
``ValueError`` (never anything else) on any violation, so a damaged or hostile buffer is a clear
error, not a crash or a huge allocation.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

MAGIC = b"OSFP"
VERSION = 1
_PREFIX = struct.Struct("<4sHHI")
_ALIGN = 8
MAX_HEADER_BYTES = 1 << 20
ALLOWED_DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int32", "int64")
MetaValue = str | int | float | bool


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class Payload:
    """Named arrays and scalar metadata; ``pack()`` gives the wire bytes."""

    meta: dict[str, MetaValue] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def _layout(self) -> tuple[bytes, list[list], int, int]:
        """(header, entries, start of the array section, total size) without touching array data."""
        entries = []
        offset = 0
        for name, array in self.arrays.items():
            dtype = np.asarray(array).dtype.name
            if dtype not in ALLOWED_DTYPES:
                raise TypeError(f"payload array {name!r} has dtype {dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
            entries.append([name, dtype, list(np.shape(array)), offset])
            offset = _aligned(offset + np.asarray(array).nbytes)
        for key, value in self.meta.items():
            if not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"payload meta {key!r} must be str/int/float/bool, got {type(value).__name__}")
        header = json.dumps({"meta": self.meta, "arrays": entries}, separators=(",", ":")).encode()
        start = _aligned(_PREFIX.size + len(header))
        last = np.asarray(self.arrays[entries[-1][0]]).nbytes if entries else 0
        return header, entries, start, start + (entries[-1][3] + last if entries else 0)

    def packed_size(self) -> int:
        return self._layout()[3]

    def pack_into(self, buffer) -> int:
        """Write the wire bytes into ``buffer`` (any writable buffer of at least ``packed_size()``
        bytes, e.g. a reused send buffer) and return how many were written: one copy of each array.
        Padding bytes are left as they are: they carry nothing and are never read."""
        header, entries, start, end = self._layout()
        out = memoryview(buffer).cast("B") if not isinstance(buffer, np.ndarray) else memoryview(buffer.reshape(-1))
        if out.nbytes < end:
            raise ValueError(f"buffer of {out.nbytes} bytes is too small for a {end}-byte payload")
        _PREFIX.pack_into(out, 0, MAGIC, VERSION, 0, len(header))
        out[_PREFIX.size : _PREFIX.size + len(header)] = header
        filled = _PREFIX.size + len(header)
        for (_, _, _, off), array in zip(entries, self.arrays.values()):
            out[filled : start + off] = bytes(start + off - filled)
            raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
            out[start + off : start + off + raw.size] = raw.data
            filled = start + off + raw.size
        out[filled:end] = bytes(end - filled)
        return end

    def pack(self) -> bytes:
        out = bytearray(self.packed_size())
        self.pack_into(out)
        return bytes(out)

    @property
    def nbytes(self) -> int:
        """Size on the wire (header included): the logical byte count we report."""
        return self.packed_size()

    @classmethod
    def unpack(cls, buffer: bytes | bytearray | memoryview | np.ndarray) -> Payload:
        """Parse wire bytes; arrays are read-only views into ``buffer`` (no copy)."""
        view = memoryview(buffer).cast("B") if not isinstance(buffer, np.ndarray) else memoryview(
            np.ascontiguousarray(buffer).view(np.uint8).reshape(-1)
        )
        size = view.nbytes
        if size < _PREFIX.size:
            raise ValueError(f"payload too short: {size} bytes, need at least {_PREFIX.size}")
        magic, version, _, header_len = _PREFIX.unpack_from(view, 0)
        if magic != MAGIC:
            raise ValueError(f"not a payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ValueError(f"payload version {version} is not supported (expected {VERSION})")
        if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > size:
            raise ValueError(f"payload header length {header_len} does not fit a {size}-byte buffer")
        try:
            header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + header_len]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"payload header is not valid JSON: {exc}") from None
        meta, entries = _validate_header(header)
        start = _aligned(_PREFIX.size + header_len)
        arrays: dict[str, np.ndarray] = {}
        expected_offset = 0
        end = start
        for name, dtype, shape, offset in entries:
            if offset != expected_offset:
                raise ValueError(f"payload array {name!r} at offset {offset}, expected {expected_offset}")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            nbytes = count * np.dtype(dtype).itemsize
            lo = start + offset
            if lo + nbytes > size:
                raise ValueError(f"payload array {name!r} ({nbytes} bytes) runs past the end of a {size}-byte buffer")
            arrays[name] = np.frombuffer(view, dtype=dtype, count=count, offset=lo).reshape(shape)
            end = lo + nbytes
            expected_offset = _aligned(offset + nbytes)
        if end != size:
            raise ValueError(f"payload has {size - end} trailing bytes after its last array")
        return cls(meta=meta, arrays=arrays)


def _validate_header(header: Any) -> tuple[dict[str, MetaValue], list[tuple[str, str, tuple[int, ...], int]]]:
    if not isinstance(header, dict) or set(header) != {"meta", "arrays"}:
        raise ValueError("payload header must be an object with exactly 'meta' and 'arrays'")
    meta = header["meta"]
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in meta.items()
    ):
        raise ValueError("payload meta must map strings to str/int/float/bool")
    entries = header["arrays"]
    if not isinstance(entries, list):
        raise ValueError("payload 'arrays' must be a list")
    parsed = []
    names = set()
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ValueError(f"payload array entry {entry!r} must be [name, dtype, shape, offset]")
        name, dtype, shape, offset = entry
        if not isinstance(name, str) or name in names:
            raise ValueError(f"payload array name {name!r} is not a unique string")
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"payload array {name!r} has dtype {dtype!r}; allowed: {', '.join(ALLOWED_DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            raise ValueError(f"payload array {name!r} has an invalid shape {shape!r}")
        if type(offset) is not int or offset < 0:
            raise ValueError(f"payload array {name!r} has an invalid offset {offset!r}")
        names.add(name)
        parsed.append((name, dtype, tuple(shape), offset))
    return meta, parsed


def require(payload: Payload, expected: Mapping[str, tuple[str, tuple[int, ...]]], context: str) -> None:
    """Check that a payload holds exactly the arrays an algorithm expects (dtype and shape).

    A wrong-size payload from one client is then a clear ``ValueError`` naming ``context``
    (client and round), which the server turns into a rejected payload instead of a crash.
    """
    if set(payload.arrays) != set(expected):
        raise ValueError(f"{context}: payload arrays {sorted(payload.arrays)} != expected {sorted(expected)}")
    for name, (dtype, shape) in expected.items():
        array = payload.arrays[name]
        if array.dtype.name != dtype or (shape is not None and tuple(array.shape) != tuple(shape)):
            raise ValueError(
                f"{context}: payload array {name!r} is {array.dtype.name}{list(array.shape)}, expected {dtype}"
                + ("" if shape is None else str(list(shape)))
            )


def require_meta(meta: Mapping[str, Any], expected: Mapping[str, Any], context: str) -> None:
    """Check a payload header against what this round and config expect: every expected key with
    its value, nothing else, and no ``rejected`` mark (a client that could not encode its update
    sends one so the round's bookkeeping still sees it)."""
    if "rejected" in meta:
        raise ValueError(f"{context}: the client rejected its own update: {meta['rejected']}")
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(f"{context}: payload {key}={meta.get(key)!r}, expected {value!r}")
    extra = set(meta) - set(expected)
    if extra:
        raise ValueError(f"{context}: unexpected payload meta {sorted(extra)}")


def to_tensor(array: np.ndarray, device) -> torch.Tensor:
    """A payload array as a tensor on ``device``; zero-copy on CPU when the buffer is writable."""
    import torch

    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)
