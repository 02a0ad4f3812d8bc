"""Runs a cluster user can trust: one run directory for all ranks, client state owned by the run,
no silent rewrites on resume, resumable early stops, and one bad client never stalls the job."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from osfed_hpc.algorithms.update_guard import UpdateGuard
from osfed_hpc.comm import World
from osfed_hpc.config import load_config
from osfed_hpc.runner import Runner
from tests.conftest import small_run_overrides
from tests.test_run_e2e import osfed, summary


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_out_null_gives_one_run_directory_for_all_ranks(digits_dir, tmp_path):
    """Every rank used to stamp its own directory: rank 0 now names it and the workers' client state
    lands in rank 0's checkpoint."""
    args = [a for a in small_run_overrides(digits_dir, tmp_path, "osfed", rounds=1) if not a.startswith("out=")]
    for attempt in range(2):
        cwd = tmp_path / f"cwd{attempt}"
        cwd.mkdir()
        result = osfed_in(cwd, "run", *args, "out=null", np=3)
        assert result.returncode == 0, result.stderr
        runs = list((cwd / "runs").iterdir())
        assert len(runs) == 1, runs
        clients = sorted(p.name for p in (runs[0] / "checkpoints").glob("round-*/clients/*.npz"))
        assert len(clients) == 6  # every client's residual, from both workers


def osfed_in(cwd, *args, np=1):
    import subprocess

    from tests.conftest import MPIRUN
    from tests.test_run_e2e import PY

    command = ([MPIRUN, "-n", str(np)] if np > 1 else []) + [PY, "-m", "osfed_hpc", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=cwd)


def test_a_state_dir_with_another_runs_state_is_refused(digits_dir, tmp_path):
    state = tmp_path / "state"
    disk = ["runtime.client_state=disk", f"runtime.state_dir={state}"]
    first = osfed("run", *small_run_overrides(digits_dir, tmp_path / "a", "osfed", rounds=1), *disk, np=3)
    assert first.returncode == 0, first.stderr
    second = osfed("run", *small_run_overrides(digits_dir, tmp_path / "b", "osfed", rounds=1), *disk, np=3)
    assert second.returncode == 2
    assert "runtime.state_dir" in second.stderr and "another run" in second.stderr


def test_resume_restores_disk_state_exactly_despite_files_of_a_crashed_round(digits_dir, tmp_path):
    full, part, state = tmp_path / "full", tmp_path / "part", tmp_path / "state"
    extra = ["runtime.client_state=disk", "server.sample_fraction=0.5"]
    assert osfed("run", *small_run_overrides(digits_dir, full, "osfed", rounds=3), *extra,
                 f"runtime.state_dir={tmp_path / 'state_full'}", np=3).returncode == 0
    first = osfed("run", *small_run_overrides(digits_dir, part, "osfed", rounds=2), *extra,
                  f"runtime.state_dir={state}", np=3)
    assert first.returncode == 0, first.stderr
    # a crash in round 3 would leave round-3 files behind, also of clients the checkpoint has no state for
    for rank_dir in state.iterdir():
        for client in range(6):
            np.savez(rank_dir / f"client-{client:05d}.npz", residual=np.full(10, 7.0, np.float32))
    resumed = osfed("run", "--resume", str(part), "rounds=3", np=2)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(part)["model_sha256"] == summary(full)["model_sha256"]


def test_resume_with_fewer_rounds_than_done_is_refused(digits_dir, tmp_path):
    out = tmp_path / "r"
    assert osfed("run", *small_run_overrides(digits_dir, out, rounds=3)).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("summary.json", "config.yaml", "metrics.jsonl")}
    result = osfed("run", "--resume", str(out), "rounds=2")
    assert result.returncode == 2
    assert "already done 3 rounds" in result.stderr
    assert {name: (out / name).read_bytes() for name in before} == before


def test_stop_before_the_first_round_leaves_a_resumable_directory(digits_dir, tmp_path):
    """A SLURM signal during setup: the run stops at the first round boundary with a round-0
    checkpoint, and resuming it gives the uninterrupted run's model."""
    world = World(comm=None, rank=0, size=1)
    full, part = tmp_path / "full", tmp_path / "part"
    Runner(load_config(None, small_run_overrides(digits_dir, full, rounds=2)), world, full).run()
    runner = Runner(load_config(None, small_run_overrides(digits_dir, part, rounds=2)), world, part)
    runner.stop_requested = True
    assert runner.run() == "stopped"
    assert (part / "checkpoints" / "round-000000" / "manifest.json").exists()
    config = load_config(part / "config.yaml", [f"out={part}"])
    assert Runner(config, world, part, resume=True).run() == "finished"
    assert summary(part)["model_sha256"] == summary(full)["model_sha256"]
    assert [r["round"] for r in _records(part)] == [1, 2]


def test_update_guard_names_and_rejects_an_absurd_client_and_keeps_the_rest():
    guard = UpdateGuard(ratio=100)
    guard.begin_round(model_norm=10.0)
    guard.check(0, 1, torch.ones(100))
    with pytest.raises(ValueError, match="client 3, round 1: update norm"):
        guard.check(3, 1, torch.full((100,), 3e38))
    with pytest.raises(ValueError, match="client 4, round 1: update holds NaN"):
        guard.check(4, 1, torch.tensor([1.0, float("nan")]))
    guard.end_round()
    guard.begin_round(model_norm=1e9)
    assert guard.reference == 10.0  # the previous round's median accepted norm, not the model's


def test_one_extreme_client_is_rejected_every_round_and_the_job_trains(digits_dir, tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "from osfed_hpc.algorithms import fedavg\n"
        "original = fedavg.FedAvg.client_update\n"
        "def extreme(self, ctx):\n"
        "    result = original(self, ctx)\n"
        "    if ctx.client_id == 1:\n"
        "        result.payload.arrays['update'][:] = 3e38\n"
        "    return result\n"
        "fedavg.FedAvg.client_update = extreme\n"
    )
    env = {"PYTHONPATH": f"{inject}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "r"
    result = osfed("run", *small_run_overrides(digits_dir, out, rounds=3), np=3, env=env)
    assert result.returncode == 0, result.stderr
    records = _records(out)
    assert [r["rejected_clients"] for r in records] == [[1], [1], [1]]
    assert "client 1, round 1: update norm" in result.stderr
    print([r["test_accuracy"] for r in records])
    assert records[-1]["test_accuracy"] > 0.3  # the other five clients still train the model
