"""What the C allocator does with large freed host blocks: keep them for the next allocation
(``runtime.host_memory: keep``, ours and the default) or hand them back to the kernel (``system``).

Why it matters: glibc's malloc serves a block above its mmap threshold with a fresh ``mmap`` and
returns it with ``munmap`` on free, and gives the free top of its heap back once it passes the
trim threshold. A CPU double backward (snapshot synthesis) allocates and frees the same
activations, several MiB to tens of MiB each, at every evaluation, so an evaluation can fault
them all in again page by page: on a 320-sample evaluation of the small CNN, zero-filling fresh
pages took 14 % of the profile. Raising the mmap threshold to glibc's ceiling (32 MiB) and the trim
threshold to 1 GiB keeps those blocks in the heap. Both are needed: the mmap threshold alone
gained 0.79-1.07x and the trim threshold alone was slower (0.50-0.60x), against 1.26-1.46x for the
two. ``benchmarks/bench_host_memory.py --ablate`` measures all of it; inside whole runs the gain is
smaller than in that isolated loop (benchmarks/README.md).

What it costs: a process keeps up to ``TRIM_THRESHOLD`` of freed memory resident instead of
returning it, so its resident size stays near its peak. What it never changes: any result; the
allocator decides where tensors live, not what they hold, so runs are bitwise the same either way
(``tests/test_host_memory.py``). Blocks above 32 MiB still come from ``mmap`` (glibc allows no
higher threshold), and allocators other than glibc's (macOS, musl, a preloaded jemalloc) are
left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: runtime.host_memory values
HOST_MEMORY_SETTINGS = ("keep", "system")

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's ceiling for the mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2); mallopt refuses more
MMAP_THRESHOLD = 32 * 1024 * 1024
#: free heap top kept before glibc trims it (above MMAP_THRESHOLD, so a block that large is reused)
TRIM_THRESHOLD = 1024 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (the only one whose mallopt this module knows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # musl has no gnu_get_libc_version
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None


def configure_host_memory(setting: str) -> str:
    """Apply ``runtime.host_memory`` to this process; returns what was done, for env.jsonl.

    Call it early (before the first large tensor) on every rank; ``system`` leaves the allocator as
    the process started. Irreversible within a process: glibc stops adapting its thresholds once
    they are set.
    """
    if setting not in HOST_MEMORY_SETTINGS:
        raise ValueError(f"runtime.host_memory: {setting!r}; expected one of {', '.join(HOST_MEMORY_SETTINGS)}")
    if setting == "system":
        return "system allocator defaults"
    libc = _glibc()
    if libc is None:
        return "system allocator defaults (not glibc)"
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "system allocator defaults (glibc refused mallopt)"
    return f"freed blocks kept (glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"
