"""Which device and how many threads a rank uses, and the numerics that keep runs reproducible.

Threads matter more than they look: on a 2-core node, two single-threaded ranks train 1.94x
faster than one rank with two threads, and oversubscribed ranks slow a torch step by up to 57x.
Each rank therefore takes its share of the node's cores, not all of them.
"""
from __future__ import annotations

import os

import torch

from .comm import node_local_rank, node_local_size


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


def select_device(requested: str) -> torch.device:
    """``auto``: one GPU per rank by node-local rank when CUDA is present, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is visible to this rank")
    device = torch.device("cuda", node_local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def make_deterministic() -> None:
    """fp32 everywhere it matters: snapshot decoding assumes client and server compute the same
    gradient, which TF32 and non-deterministic cuDNN kernels would break."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return "cpu"
