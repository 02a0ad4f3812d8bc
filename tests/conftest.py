"""Shared fixtures: small real datasets prepared once per session (digits: 1,797 8x8 images)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MPIRUN = str(VENV_BIN / "mpirun") if (VENV_BIN / "mpirun").exists() else "mpirun"

os.environ.setdefault("OMP_NUM_THREADS", "1")

#: the fake SLURM fixtures (fake_slurm, jpeg_data) for the job-script and sweep tests
pytest_plugins = ["tests.fake_slurm"]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from osfed_hpc.data import prepare_dataset

    path = tmp_path_factory.mktemp("digits") / "digits"
    prepare_dataset("digits", path, progress=False)
    return path


def small_run_overrides(data_dir: Path, out: Path, algorithm: str = "fedavg", rounds: int = 2) -> list[str]:
    """A run of a few seconds: digits, 6 clients, the small CNN, one thread per rank."""
    overrides = [
        f"data.path={data_dir}", "data.clients=6", "data.alpha=1.0", "model.name=cnn", f"rounds={rounds}",
        f"out={out}", "seed=1", "runtime.threads=1", "train.batch_size=32", "name=small",
        f"algorithm.name={algorithm}",
    ]
    if algorithm in ("osfed", "sfc3", "e3sfc"):
        overrides += ["algorithm.outer_steps=2", "algorithm.lbfgs_max_iter=4"]
    if algorithm == "osfed":
        overrides += ["algorithm.factor=2"]
    return overrides
