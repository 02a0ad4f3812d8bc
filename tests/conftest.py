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
    return overrides + [f"algorithm.{key}" for key in SMALL_OPTIONS.get(algorithm, ())]


#: per method, options that make a test run take seconds (the defaults are the papers' budgets)
SMALL_OPTIONS = {
    "feddf": ("server_epochs=2", "steps_per_epoch=5", "distill_samples=200"),
    "fedaf": ("ipc=2", "iterations=5", "server_epochs=4", "server_lr=0.05", "server_batch_size=32"),
    "fedsd2c": ("autoencoder=pool", "pool_factor=2", "ipc=3", "mipc=20", "num_crop=2", "iterations=5",
                "server_epochs=4"),
    "singleimage": ("num_patches=200", "num_select=50", "kmeans_clusters=10", "server_steps=4", "server_epochs=2",
                    "families=[cnn,mlp]"),
    "oscar": ("tiny=true", "steps=2", "images_per_class=2", "server_epochs=3", "caption_max_tokens=6"),
}
