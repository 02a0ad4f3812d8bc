"""A run that records itself: env.jsonl per start, TensorBoard scalars, the ETA and slow-round lines."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from osfed_hpc import __version__, provenance
from tests.conftest import small_run_overrides
from tests.test_run_e2e import osfed

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# env.jsonl


def test_git_info_of_this_checkout_and_of_no_checkout(tmp_path, monkeypatch):
    info = provenance.git_info(ROOT)
    if (ROOT / ".git").exists() and shutil.which("git"):
        assert info["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["commit"])
        assert info["dirty"] in (None, True, False)
    assert provenance.git_info(tmp_path) == {"commit": None, "dirty": None}  # not a checkout
    fake = tmp_path / "checkout"
    (fake / ".git").mkdir(parents=True)  # looks like one, but git cannot read it
    assert provenance.git_info(fake) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git at all: None, never an error
    assert provenance.git_info(ROOT) == {"commit": None, "dirty": None}


def test_environment_record_of_a_single_process(tmp_path, monkeypatch):
    from osfed_hpc.comm import World

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    world = World(comm=None, rank=0, size=1)  # no MPI: gatherv_bytes is a local copy
    argv = ["osfed-hpc", "run", "cfg.yaml", "train.lr=0.1", "--resume", "x", "rounds=3"]
    record = provenance.record_environment(tmp_path, world, "cpu", resume=True, start_round=3, threads=2, argv=argv)
    lines = provenance.read_environment(tmp_path)
    assert lines == [json.loads(json.dumps(record))]
    assert record["osfed_hpc_version"] == __version__
    assert record["argv"] == argv and record["overrides"] == ["train.lr=0.1", "rounds=3"]
    assert record["resume"] is True and record["start_round"] == 3
    assert record["slurm"] == {"job_id": "4242", "array_job_id": "4240", "array_task_id": "2", "restart_count": 1,
                               "nodelist": None}
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    import torch

    assert record["torch"] == torch.__version__
    for key in ("cuda", "cudnn", "nccl", "mpi_library", "git"):
        assert key in record
    assert record["world_size"] == 1
    assert record["ranks"][0]["rank"] == 0 and record["ranks"][0]["device"] == "cpu"
    assert record["ranks"][0]["threads"] == 2 and record["ranks"][0]["host"]


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_env_jsonl_per_start_and_tensorboard_purged_on_resume(digits_dir, tmp_path):
    """3 ranks with TensorBoard; then a SLURM requeue after the round-1 checkpoint: env.jsonl gets a
    second line saying so, and TensorBoard shows each round once (round 2 of the lost job purged)."""
    pytest.importorskip("tensorboard")
    from osfed_hpc.tensorboard import read_scalars

    out = tmp_path / "run"
    args = small_run_overrides(digits_dir, out, rounds=2) + ["runtime.checkpoint_every=1", "runtime.tensorboard=true"]
    first = osfed("run", *args, np=3, env={"SLURM_JOB_ID": "777"})
    assert first.returncode == 0, first.stderr
    env = provenance.read_environment(out)
    assert len(env) == 1
    line = env[0]
    assert line["resume"] is False and line["start_round"] == 1
    assert line["world_size"] == 3 and [r["rank"] for r in line["ranks"]] == [0, 1, 2]
    assert all(r["host"] and r["device"] == "cpu" and r["threads"] == 1 for r in line["ranks"])
    assert all(r["host_memory"] for r in line["ranks"])  # runtime.host_memory's effect, every rank
    assert line["mpi_library"] and line["mpi4py"]
    assert line["slurm"]["job_id"] == "777"
    assert "runtime.tensorboard=true" in line["overrides"] and "run" in line["argv"]
    assert line["osfed_hpc_version"] == __version__

    scalars = read_scalars(out)
    assert {"test_accuracy", "test_loss", "train_loss", "uplink_bytes_total", "downlink_bytes_total",
            "round_seconds"} <= set(scalars)
    metrics = _read_metrics(out)
    assert [step for step, _ in scalars["test_accuracy"]] == [1, 2]
    assert [v for _, v in scalars["test_accuracy"]] == pytest.approx([r["test_accuracy"] for r in metrics])
    assert [v for _, v in scalars["uplink_bytes_total"]] == pytest.approx([r["uplink_bytes_total"] for r in metrics])

    # the job died after the round-1 checkpoint (round 2 logged, its checkpoint and summary lost)
    shutil.rmtree(out / "checkpoints" / "round-000002")
    (out / "summary.json").unlink()
    again = osfed("run", *args, np=2, env={"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    env = provenance.read_environment(out)
    assert len(env) == 2
    assert env[1]["resume"] is True and env[1]["start_round"] == 2 and env[1]["slurm"]["restart_count"] == 1
    assert env[1]["world_size"] == 2
    scalars = read_scalars(out)
    assert [step for step, _ in scalars["test_accuracy"]] == [1, 2]  # not [1, 2, 2]
    assert [step for step, _ in scalars["round_seconds"]] == [1, 2]
    assert len(list(out.glob("events.out.tfevents.*"))) == 2


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    from osfed_hpc.config import ConfigError, load_config

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"runtime\.tensorboard.*pip install"):
        load_config(None, ["runtime.tensorboard=true"])
    assert load_config(None, []).runtime.tensorboard is False  # off by default: no package needed


def test_tensorboard_key_does_not_change_the_checkpoint_digest():
    from osfed_hpc.checkpoint import config_digest
    from osfed_hpc.config import load_config

    on = load_config(None, ["runtime.tensorboard=false"]).to_dict()
    off = load_config(None, []).to_dict()
    on["runtime"]["tensorboard"] = True  # (no validation here: the package may be missing)
    assert config_digest(on) == config_digest(off)


def test_tensorboard_log_writes_readable_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from osfed_hpc.tensorboard import TensorBoardLog, read_scalars

    log = TensorBoardLog(tmp_path, start_round=1)
    for r in (1, 2, 3):
        log.log_round({"round": r, "test_accuracy": 0.1 * r, "train_loss": float("nan"), "uplink_bytes_total": 100 * r,
                       "seconds": {"round": 1.5}})
    log.close()
    resumed = TensorBoardLog(tmp_path, start_round=3)  # checkpoint of round 2: round 3 is redone
    resumed.log_round({"round": 3, "test_accuracy": 0.9, "seconds": {"round": 2.0}})
    resumed.close()
    scalars = read_scalars(tmp_path)
    assert scalars["test_accuracy"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.9))]
    assert "train_loss" not in scalars  # NaN is skipped, as metrics.jsonl writes null
    assert scalars["uplink_bytes_total"] == [(1, 100.0), (2, 200.0)]
    assert scalars["round_seconds"] == [(1, 1.5), (2, 1.5), (3, 2.0)]


# ---------------------------------------------------------------------------------------------
# progress: the ETA on rank 0, a line per client in slow rounds


def test_eta_formatting():
    from osfed_hpc.metrics import format_duration, progress_line, round_eta

    assert format_duration(192.4) == "0:03:12"
    assert format_duration(0) == "0:00:00"
    assert format_duration(90061) == "25:01:01"
    assert round_eta([], 5) is None
    assert round_eta([10.0, 20.0], 0) is None
    assert round_eta([10.0, 20.0], 4) == 60.0
    record = {"round": 3, "test_accuracy": 0.5, "train_loss": 1.25, "uplink_bytes_total": 2_000_000,
              "seconds": {"round": 7.5}}
    line = progress_line(record, eta_seconds=192.4)
    assert line.startswith("round    3 | acc  50.00% | loss 1.2500 | uplink      2.000 MB |   7.50 s")
    assert line.endswith(" | eta 0:03:12")
    assert "eta" not in progress_line(record)


def test_worker_prints_finished_clients_in_slow_rounds_and_rank0_an_eta(digits_dir, tmp_path, monkeypatch, capsys):
    """In-process, one rank (server and worker), the slow-round threshold patched to 0 s."""
    import signal

    from osfed_hpc import runner

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        _slow_round_lines_and_eta(digits_dir, tmp_path, monkeypatch, capsys, runner)
    finally:  # the Runner installs its own stop handlers: put the previous ones back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _slow_round_lines_and_eta(digits_dir, tmp_path, monkeypatch, capsys, runner) -> None:
    from osfed_hpc.comm import World
    from osfed_hpc.config import load_config

    out = tmp_path / "run"
    config = load_config(None, small_run_overrides(digits_dir, out, rounds=2) + ["runtime.device=cpu"])
    world = World(comm=None, rank=0, size=1)
    monkeypatch.setattr(runner, "SLOW_ROUND_S", 0.0)
    run = runner.Runner(config, world, out)
    assert run.run() == "finished"
    stdout = capsys.readouterr().out
    client_lines = re.findall(r"^\[rank 0/1\] round (\d+): client (\d+) done in \d+\.\d s \((\d+)/6\)$", stdout, re.M)
    assert client_lines == [(str(r), str(c), str(c + 1)) for r in (1, 2) for c in range(6)]
    progress = [line for line in stdout.splitlines() if line.startswith("round ")]
    assert len(progress) == 2
    assert re.search(r" \| eta \d+:\d\d:\d\d$", progress[0])  # one round left
    assert "eta" not in progress[1]  # the last round
    assert len(provenance.read_environment(out)) == 1  # the in-process run records itself too

    monkeypatch.setattr(runner, "SLOW_ROUND_S", 3600.0)  # the default behaviour: fast rounds stay quiet
    quiet = tmp_path / "quiet"
    config = load_config(None, small_run_overrides(digits_dir, quiet, rounds=1) + ["runtime.device=cpu"])
    assert runner.Runner(config, world, quiet).run() == "finished"
    assert not re.search(r"client \d+ done in", capsys.readouterr().out)
