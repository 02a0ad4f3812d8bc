"""End-to-end runs through the CLI, under mpirun where ranks matter: outputs, resume, bad input, faults.

These start ``mpirun`` as a subprocess (never nested inside an MPI test) with a timeout, so a hang
is a test failure, not a stuck CI job.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MPIRUN, small_run_overrides

PY = sys.executable


def osfed(*args: str, np: int = 1, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    command = ([MPIRUN, "-n", str(np)] if np > 1 else []) + [PY, "-m", "osfed_hpc", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_outputs_of_a_run(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = osfed("run", *small_run_overrides(digits_dir, out, rounds=2), np=3)
    assert result.returncode == 0, result.stderr
    assert "round    2 | acc" in result.stdout
    s = summary(out)
    for key in ("algorithm", "final_accuracy", "rounds", "uplink_bytes", "downlink_bytes",
                "uplink_bytes_per_client_round", "wall_seconds", "world_size", "model_sha256"):
        assert key in s
    assert s["world_size"] == 3 and s["rounds"] == 2 and 0 <= s["final_accuracy"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    first = records[0]
    assert first["clients"] == list(range(6))
    # FedAvg uplink: one packed fp32 update per client (plus a small header)
    per_client = first["uplink_bytes"] / 6
    assert s["model_params"] * 4 < per_client < s["model_params"] * 4 + 512
    assert first["mpi_bytes"] >= first["uplink_bytes"]
    assert set(first["seconds"]) >= {"broadcast", "local_work", "exchange", "aggregation", "evaluation", "round"}
    assert (out / "config.yaml").exists() and (out / "model.pt").exists()
    import torch

    state = torch.load(out / "model.pt", weights_only=True)
    assert isinstance(state, dict) and state


def test_existing_run_dir_is_not_overwritten(digits_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = osfed("run", *small_run_overrides(digits_dir, out))
    assert result.returncode == 2
    assert "exists and is not empty" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-1", "train.lr"),
        ("train.lerning_rate=0.1", "did you mean 'learning_rate'|unknown config key 'train.lerning_rate'"),
        ("data.path=/nonexistent/data", "holds no prepared dataset"),
        ("data.partition=/nonexistent/p.npz", "does not exist"),
        ("algorithm.name=fedprox", "unknown algorithm 'fedprox'"),
        ("algorithm.name=osfed algorithm.factor=3", "algorithm.factor: multi-grid factor 3 does not divide"),
        ("algorithm.name=osfed model.name=resnet18 data.resolution=32", "cannot use a BatchNorm model"),
    ],
)
def test_bad_input_stops_before_training(digits_dir, tmp_path, override, message):
    result = osfed("run", *small_run_overrides(digits_dir, tmp_path / "r"), *override.split())
    assert result.returncode == 2, result.stderr
    assert "round" not in result.stdout
    import re

    assert re.search(message, result.stderr), result.stderr


def test_world_too_large_for_clients_stops_every_rank(digits_dir, tmp_path):
    start = time.monotonic()
    result = osfed("run", *small_run_overrides(digits_dir, tmp_path / "r"), "data.clients=2", np=4, timeout=60)
    assert result.returncode != 0
    assert "3 worker ranks for 2 clients" in result.stderr
    assert time.monotonic() - start < 60


def test_exception_on_one_worker_aborts_the_job(digits_dir, tmp_path):
    """A fault on one worker rank only: the whole job ends quickly, naming rank, client and round."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('PMI_RANK') == '2':\n"
        "    from osfed_hpc.algorithms import fedavg\n"
        "    original = fedavg.FedAvg.client_update\n"
        "    def broken(self, ctx):\n"
        "        if ctx.round == 2:\n"
        "            raise RuntimeError('injected fault')\n"
        "        return original(self, ctx)\n"
        "    fedavg.FedAvg.client_update = broken\n"
    )
    start = time.monotonic()
    env = {"PYTHONPATH": f"{inject}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = osfed("run", *small_run_overrides(digits_dir, tmp_path / "r", rounds=4), np=3, env=env, timeout=90)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "[rank 2/3]" in result.stderr and "injected fault" in result.stderr
    assert "round 2" in result.stderr and "client" in result.stderr
    assert elapsed < 60


def test_resume_is_bit_for_bit_with_another_rank_count(digits_dir, tmp_path):
    """Also with server momentum, whose velocity must travel through the checkpoint."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = small_run_overrides(digits_dir, full, rounds=4) + ["server.momentum=0.5"]
    assert osfed("run", *args, np=3).returncode == 0
    first = osfed("run", *small_run_overrides(digits_dir, part, rounds=2), "server.momentum=0.5", np=3)
    assert first.returncode == 0, first.stderr
    second = osfed("run", "--resume", str(part), "rounds=4", np=2)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    assert summary(part)["model_sha256"] == summary(full)["model_sha256"]
    rounds = [json.loads(line)["round"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_sigusr1_checkpoints_and_stops_cleanly(digits_dir, tmp_path):
    out = tmp_path / "run"
    command = [MPIRUN, "-n", "3", PY, "-m", "osfed_hpc", "run",
               *small_run_overrides(digits_dir, out, rounds=200)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)  # mpiexec forwards SIGUSR1 to every rank
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "checkpoint" in stdout
    manifests = sorted(out.glob("checkpoints/round-*/manifest.json"))
    assert manifests
    done = json.loads(manifests[-1].read_text())["round"]
    assert 2 <= done < 200
    assert not (out / "summary.json").exists()
    resumed = osfed("run", "--resume", str(out), f"rounds={done + 1}", np=3)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(out)["rounds"] == done + 1


def test_damaged_checkpoint_is_refused(digits_dir, tmp_path):
    out = tmp_path / "run"
    assert osfed("run", *small_run_overrides(digits_dir, out, rounds=1)).returncode == 0
    server = next(out.glob("checkpoints/round-*/server.npz"))
    server.write_bytes(server.read_bytes()[:-10])
    result = osfed("run", "--resume", str(out), "rounds=2")
    assert result.returncode == 2
    assert "damaged" in result.stderr
    changed = osfed("run", "--resume", str(out), "rounds=2", "train.lr=0.5")
    assert changed.returncode == 2 and "train.lr" in changed.stderr


def _rank_pid(marker: str, rank: int) -> int | None:
    """PID of the rank-``rank`` process whose command line contains ``marker``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and "osfed_hpc" in cmdline and f"PMI_RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_sigkill_of_a_worker_ends_the_job_and_leaves_a_resumable_run(digits_dir, tmp_path):
    out, full = tmp_path / "killed", tmp_path / "full"
    rounds = 12
    args = small_run_overrides(digits_dir, out, rounds=rounds) + ["runtime.checkpoint_every=1"]
    process = subprocess.Popen([MPIRUN, "-n", "3", PY, "-m", "osfed_hpc", "run", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    pid = _rank_pid(str(out), 2)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("mpirun did not end within 30 s of a worker's SIGKILL")
    assert process.returncode != 0
    assert time.monotonic() - killed_at < 30
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line)["round"] == i + 1 for i, line in enumerate(lines))  # intact, in order
    assert sorted(out.glob("checkpoints/round-*/manifest.json"))
    if (out / "summary.json").exists():
        pytest.skip("the run finished before the kill landed")
    resumed = osfed("run", "--resume", str(out), np=3)
    assert resumed.returncode == 0, resumed.stderr
    assert osfed("run", *small_run_overrides(digits_dir, full, rounds=rounds), np=3).returncode == 0
    assert summary(out)["model_sha256"] == summary(full)["model_sha256"]


def test_bf16_autocast_runs_and_changes_the_numerics(digits_dir, tmp_path):
    """runtime.amp=bf16 takes the autocast path for local training (CPU here, CUDA on clusters)."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert osfed("run", *small_run_overrides(digits_dir, fp32, rounds=1)).returncode == 0
    result = osfed("run", *small_run_overrides(digits_dir, bf16, rounds=1), "runtime.amp=bf16")
    assert result.returncode == 0, result.stderr
    assert summary(bf16)["model_sha256"] != summary(fp32)["model_sha256"]


@pytest.mark.parametrize("algorithm", ["fedavg", "osfed"])
def test_channels_last_run_trains_the_same_model(digits_dir, tmp_path, algorithm):
    """runtime.channels_last=true changes the memory layout, not the model (up to float rounding)."""
    import torch

    standard, nhwc = tmp_path / "standard", tmp_path / "nhwc"
    assert osfed("run", *small_run_overrides(digits_dir, standard, algorithm, rounds=1)).returncode == 0
    result = osfed("run", *small_run_overrides(digits_dir, nhwc, algorithm, rounds=1), "runtime.channels_last=true")
    assert result.returncode == 0, result.stderr
    a = torch.load(standard / "model.pt", weights_only=True)
    b = torch.load(nhwc / "model.pt", weights_only=True)
    assert b["features.0.weight"].is_contiguous(memory_format=torch.channels_last)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)


def test_checkpoint_files_are_hashed_by_the_ranks_that_write_them(digits_dir, tmp_path):
    """3 ranks: each worker hashes the client files it writes and sends rank 0 only the records
    (rank 0 never reads them back); the manifest matches the files, and a 2-rank resume verifies them."""
    import hashlib

    out = tmp_path / "run"
    first = osfed("run", *small_run_overrides(digits_dir, out, rounds=1), np=3)
    assert first.returncode == 0, first.stderr
    directory = next(out.glob("checkpoints/round-*"))
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(["server.npz", *(f"clients/client-{c:05d}.npz" for c in range(6))])
    for relative, record in manifest["files"].items():
        data = (directory / relative).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    second = osfed("run", "--resume", str(out), "rounds=2", np=2)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
