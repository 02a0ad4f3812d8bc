"""Which device and how many threads a rank uses, and the numerics that keep runs reproducible.

Threads matter more than they look: on a 2-core node, two single-threaded ranks train 1.94x
faster than one rank with two threads, and oversubscribed ranks slow a torch step by up to 57x.
Each rank therefore takes its share of the node's cores, not all of them.

Devices are chosen honestly: ``runtime.device: auto`` runs on the CPU only where no GPU was
allocated. Inside a GPU allocation (SLURM's GPU variables, or a ``CUDA_VISIBLE_DEVICES`` naming
devices) a CUDA that cannot start is an error that says why, not an ImageNet job that quietly
trains on the CPU for days.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

from .comm import node_local_rank, node_local_size
from .errors import RunError

#: environment variables that show a GPU allocation, in the order they are reported
GPU_ALLOCATION_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_STEP_GPUS",
                            "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")
#: values of those variables that mean "no GPU" (NoDevFiles: what SLURM sets when none was given)
NO_GPU_VALUES = ("", "-1", "NoDevFiles")
#: the variables among them that hold a count ("2", "a100:2"), where 0 also means no GPU
_GPU_COUNT_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK")
#: runtime.deterministic values
DETERMINISTIC_SETTINGS = ("auto", "on", "off")


def configure_threads(requested: int, comm, loader_workers: int = 0) -> int:
    """Threads for this rank: the request, else SLURM's CPUs per task, else a fair share of the node,
    minus the cores its DataLoader workers will keep busy decoding JPEGs."""
    if requested > 0:
        threads = requested
    else:
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            cores = int(os.environ["SLURM_CPUS_PER_TASK"])
        else:
            available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            cores = available // node_local_size(comm)
        threads = max(1, cores - loader_workers)
    torch.set_num_threads(threads)
    return threads


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _zero_count(value: str) -> bool:
    """'0', 'a100:0', '0,0' -> True: a GPU count variable that allocates none."""
    counts = [part.rsplit(":", 1)[-1].strip() for part in value.split(",")]
    return all(count.isdigit() and int(count) == 0 for count in counts)


def gpu_allocation(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(variable, value) of the first environment variable that shows this process holds GPUs, or None."""
    environ = os.environ if environ is None else environ
    for name in GPU_ALLOCATION_VARIABLES:
        value = environ.get(name)
        if value is None or value.strip() in NO_GPU_VALUES:
            continue
        if name in _GPU_COUNT_VARIABLES and _zero_count(value):
            continue
        return name, value
    return None


def cuda_status() -> tuple[int, str | None, bool]:
    """(usable CUDA devices, why none, whether CUDA *failed*) for this process.

    ``torch.cuda.is_available()`` answers False both where there is no GPU and where the driver
    cannot start (it then only warns, e.g. "The NVIDIA driver on your system is too old"), and
    ``device_count()`` can raise: the warnings and errors are caught and returned as the reason,
    and ``failed`` says that CUDA is present but broken rather than absent.
    """
    if not torch.backends.cuda.is_built():
        return 0, f"this PyTorch ({torch.__version__}) is built without CUDA", False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = torch.cuda.is_available()
        except Exception as exc:  # noqa: BLE001 - any failure of CUDA's start is reported, not raised
            return 0, f"CUDA initialisation failed: {type(exc).__name__}: {_one_line(exc)}", True
    said = "; ".join(_one_line(w.message) for w in caught)
    if not available:
        return 0, said or "torch.cuda.is_available() is False (no NVIDIA driver or no visible device)", bool(said)
    try:
        count = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001
        return 0, f"torch.cuda.device_count() failed: {type(exc).__name__}: {_one_line(exc)}", True
    if count < 1:
        return 0, said or "torch.cuda.device_count() is 0", True
    return count, None, False


def select_device(requested: str) -> torch.device:
    """The device of this rank for ``runtime.device``.

    ``cpu``: the CPU. ``cuda``: GPU ``node_local_rank % device_count``, an error if CUDA is not
    usable. ``auto``: like ``cuda`` when CUDA works; the CPU when it does not, *unless* the job
    holds GPUs (``GPU_ALLOCATION_VARIABLES``): then CPU training would be a silent 100x slowdown,
    so it is an error naming the variable, the reason CUDA failed, and ``runtime.device: cpu`` as
    the way to run on the CPU anyway. Every failure is a ``RunError`` (one line, exit 2).
    """
    if requested == "cpu":
        return torch.device("cpu")
    count, why, failed = cuda_status()
    if count == 0:
        if requested == "cuda":
            raise RunError(f"runtime.device is 'cuda' but CUDA is not usable on this rank: {why}")
        allocation = gpu_allocation()
        if allocation is not None:
            name, value = allocation
            raise RunError(f"runtime.device is 'auto' and this job holds GPUs ({name}={value}), but CUDA is not "
                           f"usable: {why}; fix the CUDA setup (driver, modules, --gpus), or set "
                           f"runtime.device: cpu to run on CPU anyway")
        if failed:
            print(f"[osfed-hpc] warning: runtime.device auto: CUDA is not usable ({why}); running on CPU",
                  file=sys.stderr, flush=True)
        return torch.device("cpu")
    index = node_local_rank() % count
    device = torch.device("cuda", index)
    try:
        torch.cuda.set_device(device)
    except Exception as exc:  # noqa: BLE001 - e.g. a device in exclusive-process mode held by another job
        raise RunError(f"runtime.device is {requested!r}: cannot use CUDA device {index} of {count} on this rank: "
                       f"{type(exc).__name__}: {_one_line(exc)}") from None
    return device


def deterministic_numerics(setting: str, device: torch.device) -> bool:
    """``runtime.deterministic`` -> whether local training runs with deterministic kernels and no TF32:
    ``on`` and ``off`` as said; ``auto`` is on for the CPU (where it costs next to nothing) and off
    for CUDA (where TF32 and autotuned cuDNN kernels are much faster)."""
    if setting not in DETERMINISTIC_SETTINGS:
        raise ValueError(f"runtime.deterministic must be one of {DETERMINISTIC_SETTINGS}, got {setting!r}")
    if setting == "auto":
        return device.type != "cuda"
    return setting == "on"


def make_deterministic(enabled: bool = True) -> None:
    """Set the process-wide numerics of everything *outside* ``snapshot.exact_numerics``.

    ``enabled``: fp32 without TF32, deterministic cuDNN and algorithms (``warn_only``: kernels
    without a deterministic version warn), no cuDNN autotuning. Not ``enabled``: TF32 matmuls and
    convolutions, autotuned (``cudnn.benchmark``) and nondeterministic kernels allowed.

    Snapshot synthesis and decoding do not depend on this: they always run inside
    ``snapshot.exact_numerics``, which switches the strict settings on and restores these on exit
    (snapshot decoding assumes the client and the server compute the same gradient).
    ``CUBLAS_WORKSPACE_CONFIG`` is therefore set either way (before the first cuBLAS call).

    What each setting guarantees bitwise (same config, seed and ``runtime.threads``):

    * CPU, either way: the same model (``model_sha256``) on any number of ranks and run to run,
      at a fixed thread count (the flags here only concern CUDA kernels and TF32).
    * CUDA, ``runtime.deterministic: on``: the same model run to run on the same GPU model,
      driver and library versions (kernels that have no deterministic version only warn).
    * CUDA, ``off`` (the ``auto`` default there): local training is not bitwise reproducible (TF32,
      autotuned and atomic-add kernels); snapshot synthesis and decoding stay exact, so the server
      still decodes exactly the update the client encoded.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    backends = torch.backends
    backends.cuda.matmul.allow_tf32 = not enabled
    backends.cudnn.allow_tf32 = not enabled
    backends.cudnn.benchmark = not enabled
    backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return "cpu"
