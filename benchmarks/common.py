"""Helpers shared by the benchmark scripts: one place for machine info and result writing, so every
JSON has the same shape (``machine`` with CPU, cores, versions and load average at start and end;
quick runs to ``$TMPDIR/osfed-bench/<name>.quick.json``, full runs to ``benchmarks/results/<name>.json``).

The benchmarks are run as scripts (``python benchmarks/bench_x.py``), so ``benchmarks/`` is already on
``sys.path`` and they import this with ``from common import ...``. Importing it sets
``OMP_NUM_THREADS=1`` unless already set (so do it before importing torch) and puts the repository
root on ``sys.path`` so that ``osfed_hpc`` imports without installing the package.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
MPIRUN = str(BIN / "mpirun") if (BIN / "mpirun").exists() else (shutil.which("mpirun") or "mpirun")


def machine_info(*, torch_threads: bool = False, memory: bool = False, mpi: str | None = None) -> dict:
    """CPU model, cores, Python/torch/numpy versions, platform and the load average now.

    Extras, each where the benchmark needs it: ``torch_threads`` (torch's intra-op threads),
    ``memory`` (total physical memory in bytes), ``mpi`` (mpi4py and MPI library versions):
    ``"library"`` asks the MPI library itself (for code already running under ``mpirun``),
    ``"mpichversion"`` runs ``BIN/mpichversion`` (for a launcher, which must not initialise MPI).
    """
    import numpy as np
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}
    if torch_threads:
        info["torch_threads"] = torch.get_num_threads()
    if mpi is not None:
        try:
            import mpi4py

            info["mpi4py"] = mpi4py.__version__
            if mpi == "library":
                from mpi4py import MPI

                version = MPI.Get_library_version()
            elif mpi == "mpichversion":
                version = subprocess.run([str(BIN / "mpichversion")], capture_output=True, text=True,
                                         timeout=30).stdout
            else:
                raise ValueError(f"mpi={mpi!r}: expected 'library' or 'mpichversion'")
            info["mpi"] = " ".join(version.split("\n")[0].split())
        except Exception:  # noqa: BLE001 - informational only
            pass
    try:
        if memory:
            info["memory_total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except (OSError, ValueError):
        pass
    return info


def table(headers: list[str], rows: list[list]) -> str:
    """Right-aligned text table; floats to 4 significant digits, strings as given."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c)
                                             for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_result(name: str, result: dict, out: Path | None = None) -> Path:
    """Full runs go to benchmarks/results/<name>.json; quick runs (smoke checks) to a temp file,
    so they never overwrite the recorded figures, unless --out says otherwise."""
    quick_path = Path(tempfile.gettempdir()) / "osfed-bench" / f"{name}.quick.json"
    path = out or (quick_path if result.get("quick") else RESULTS / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return path


def dataset(path: Path):
    """The MNIST-5k reader at ``path``, prepared there with the package's ``prepare_dataset`` first if absent."""
    from osfed_hpc.data import DatasetReader, prepare_dataset

    if not (path / "dataset.json").exists():
        prepare_dataset("mnist5k", path, progress=False)
    return DatasetReader(path)


def partition(reader, path: Path, clients: int, scheme: str, alpha: float, seed: int = 0) -> Path:
    """``path/partitions/bench-<scheme>-n<clients>[-a<alpha>]-s<seed>.npz``, made with ``make_partition`` if absent."""
    from osfed_hpc.data import make_partition

    name = f"bench-{scheme}-n{clients}" + (f"-a{alpha:g}" if scheme == "dirichlet" else "") + f"-s{seed}.npz"
    file = path / "partitions" / name
    if not file.exists():
        make_partition(reader, clients, scheme, alpha, seed, min_samples=1, allow_small=True).save(file)
    return file
