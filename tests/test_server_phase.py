"""The server phase of one-shot and distillation methods, through the real runner: progress lines,
one metrics line per epoch, checkpoints between epochs, a stop by SIGUSR1 inside the phase and a
resume (also on another rank count) that reaches the model of an uninterrupted run bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import small_run_overrides
from tests.test_run_e2e import osfed, summary

EXTRA = {"OSFED_EXTRA_ALGORITHMS": "phase_test=tests.phase_algorithm:PhaseTest"}


def _args(digits_dir: Path, out: Path, rounds: int = 2, *more: str) -> list[str]:
    return [*small_run_overrides(digits_dir, out, "fedavg", rounds=rounds), "algorithm=phase_test", *more]


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(digits_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phase") / "full"
    result = osfed("run", *_args(digits_dir, out), np=3, timeout=300, env=EXTRA)
    assert result.returncode == 0, result.stderr
    assert "[server phase] round 2 epoch 4/4" in result.stdout
    return out


def test_phase_lines_and_round_lines(uninterrupted):
    lines = _lines(uninterrupted)
    phase = [(r["round"], r["phase_epoch"]) for r in lines if "phase_epoch" in r]
    assert phase == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    rounds = [r for r in lines if "phase_epoch" not in r]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["server_phase"]["epochs_done"] == 4
        assert record["server_phase"]["last"]["steps"] == 12 * record["round"]
        assert record["seconds"]["server_phase"] > 0
        assert record["seconds"]["round"] >= record["seconds"]["server_phase"]
    done = summary(uninterrupted)
    assert done["server_phase_seconds"] > 0 and done["rounds"] == 2


def test_same_model_in_one_process(digits_dir, tmp_path, uninterrupted):
    out = tmp_path / "one"
    assert osfed("run", *_args(digits_dir, out), env=EXTRA).returncode == 0
    assert summary(out)["model_sha256"] == summary(uninterrupted)["model_sha256"]


@pytest.mark.parametrize("np_resume", [1, 3])
def test_sigusr1_inside_the_phase_then_resume_is_bit_exact(digits_dir, tmp_path, uninterrupted, np_resume):
    out = tmp_path / "part"
    stopped = osfed("run", *_args(digits_dir, out), np=3, timeout=300, env={**EXTRA, "OSFED_TEST_SIGNAL_AT": "2:2"})
    assert stopped.returncode == 0, stopped.stderr
    assert not (out / "summary.json").exists()
    assert (out / "checkpoints" / "round-000001-phase-000002" / "manifest.json").exists()
    if np_resume == 1:
        short = osfed("run", "--resume", str(out), "rounds=1", env=EXTRA)
        assert short.returncode == 2 and "stopped inside round 2's server phase (give rounds >= 2)" in short.stderr
    resumed = osfed("run", "--resume", str(out), np=np_resume, timeout=300, env=EXTRA)
    assert resumed.returncode == 0, resumed.stderr
    assert "server phase of round 2 at epoch 2" in resumed.stdout
    assert "[server phase] round 2 epoch 3/4" in resumed.stdout
    assert "[server phase] round 2 epoch 1/4" not in resumed.stdout  # no epoch is redone
    a, b = summary(uninterrupted), summary(out)
    assert a["model_sha256"] == b["model_sha256"]
    assert (a["uplink_bytes"], a["downlink_bytes"]) == (b["uplink_bytes"], b["downlink_bytes"])
    phase = [(r["round"], r["phase_epoch"]) for r in _lines(out) if "phase_epoch" in r]
    assert phase == [(r["round"], r["phase_epoch"]) for r in _lines(uninterrupted) if "phase_epoch" in r]


def test_checkpoints_between_epochs_on_schedule_and_early_stop(digits_dir, tmp_path):
    out = tmp_path / "sched"
    result = osfed("run", *_args(digits_dir, out, 1, "runtime.checkpoint_every=2", "algorithm.phase_epochs=5",
                                 "algorithm.stop_early_at=3"), env=EXTRA)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert names == ["round-000000-phase-000002", "round-000001"]
    lines = _lines(out)
    assert [r["phase_epoch"] for r in lines if "phase_epoch" in r] == [1, 2, 3]
    assert [r for r in lines if "phase_epoch" not in r][0]["server_phase"]["epochs_done"] == 3


def test_one_shot_methods_refuse_more_than_one_round(digits_dir, tmp_path):
    result = osfed("run", "--dry-run", *small_run_overrides(digits_dir, tmp_path / "r", "fedsd2c", rounds=3))
    assert result.returncode == 2
    assert "'rounds': got 3, expected 1: fedsd2c is one-shot" in result.stderr
    started = osfed("run", *small_run_overrides(digits_dir, tmp_path / "s", "oscar", rounds=2))
    assert started.returncode == 2 and "oscar is one-shot" in started.stderr
    assert not (tmp_path / "s" / "metrics.jsonl").exists()
