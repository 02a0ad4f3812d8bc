"""The runner's round on a shared machine: adaptive waiting, batched client calls, clients dealt to
whichever worker is free. Correctness only (the speed itself is measured in
``benchmarks/bench_runner_bound.py``): the same model and the same checkpoint files whichever way
the clients were placed, and a method that declares no client state but writes some is stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from osfed_hpc import comm
from osfed_hpc.algorithms import register
from osfed_hpc.algorithms.fedavg import FedAvg
from tests.conftest import MPIRUN, small_run_overrides

EXTRA = {"OSFED_EXTRA_ALGORITHMS": "batched_test=tests.test_runner_speed:Batched,"
                                   "leaky_test=tests.test_runner_speed:Leaky"}


class Batched(FedAvg):
    """FedAvg whose runner hands over ``batch`` clients per call; records the calls it got."""

    name = "batched_test"
    calls: list[list[int]] = []

    @dataclass
    class Options(FedAvg.Options):
        batch: int = 3

    def client_batch_size(self) -> int:
        return self.options.batch

    def client_updates(self, contexts, load_start):
        Batched.calls.append([ctx.client_id for ctx in contexts])
        results = super().client_updates(contexts, load_start)
        for i, result in enumerate(results):
            result.seconds = 100.0 + contexts[i].client_id  # the method's own clock wins
        return results


class Leaky(FedAvg):
    """Declares no client state (inherited from FedAvg) but keeps a residual: must be refused."""

    name = "leaky_test"

    def client_update(self, ctx):
        ctx.state["residual"] = np.zeros(3, np.float32)
        return super().client_update(ctx)


class _Request:
    def __init__(self, polls: int) -> None:
        self.polls = polls

    def Test(self, status=None) -> bool:  # noqa: N802 - mpi4py's name
        self.polls -= 1
        return self.polls < 0


def test_wait_sleeps_grow_geometrically_to_the_cap_and_restart_small(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(comm.time, "sleep", sleeps.append)
    monkeypatch.setattr(comm, "_BLOCKING_WAIT", False)
    world = comm.World(comm=None, rank=0, size=1)
    world.wait(_Request(40))
    assert len(sleeps) == 40
    assert sleeps[0] == comm._POLL_FIRST_S
    assert all(b >= a for a, b in zip(sleeps, sleeps[1:]))
    assert max(sleeps) == comm._POLL_CAP_S and sleeps[-1] == comm._POLL_CAP_S
    sleeps.clear()
    world.wait(_Request(1))  # the next request starts small again
    assert sleeps == [comm._POLL_FIRST_S]


def _run_in_process(digits_dir: Path, out: Path, algorithm: str, extra: list[str]) -> dict:
    from osfed_hpc.config import load_config
    from osfed_hpc.runner import Runner

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        config = load_config(None, small_run_overrides(digits_dir, out, algorithm=algorithm, rounds=2)
                             + ["runtime.device=cpu", *extra])
        assert Runner(config, comm.World(comm=None, rank=0, size=1), out).run() == "finished"
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return json.loads((out / "summary.json").read_text())


def test_batched_calls_take_chunks_in_client_id_order_and_report_method_seconds(digits_dir, tmp_path):
    register("batched_test", "tests.test_runner_speed:Batched")
    Batched.calls = []
    batched = _run_in_process(digits_dir, tmp_path / "batched", "batched_test", ["algorithm.batch=4"])
    assert Batched.calls == [[0, 1, 2, 3], [4, 5]] * 2  # 6 clients, one rank, two rounds
    records = [json.loads(line) for line in (tmp_path / "batched" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["client_stats"]["seconds"] == [100.0 + c for c in range(6)]
    plain = _run_in_process(digits_dir, tmp_path / "plain", "fedavg", [])
    assert batched["model_sha256"] == plain["model_sha256"]  # each client still starts from W_t


def _mpirun(np_: int, args: list[str], env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [MPIRUN, "-n", str(np_), sys.executable, "-m", "osfed_hpc", "run", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **EXTRA, **(env or {})})


def _client_files(run: Path) -> dict:
    manifest = json.loads(next(run.glob("checkpoints/round-*/manifest.json")).read_text())
    return {name: record for name, record in manifest["files"].items() if name.startswith("clients/")}


@pytest.mark.parametrize("exchange", ["gather", "stream"])
def test_dealt_clients_give_the_fixed_placements_model_and_checkpoint(digits_dir, tmp_path, exchange):
    """3 ranks, clients dealt at run time vs the fixed split vs one rank: the same model bits, the
    same client-state files (lr_decay makes the participation count matter), every client once."""
    extra = ["train.lr_decay=0.9", "runtime.checkpoint_every=1"]
    if exchange == "stream":
        extra.append("runtime.gather_limit_mb=0")
    runs = {}
    for name, np_, env in (("dealt", 3, {}), ("fixed", 3, {"OSFED_PLACEMENT": "static"}), ("one", 1, {})):
        out = tmp_path / name
        result = _mpirun(np_, small_run_overrides(digits_dir, out, rounds=3) + extra, env)
        assert result.returncode == 0, result.stderr
        runs[name] = (out, result.stdout)
    assert "(dealt)" in runs["dealt"][1] and "(dealt)" not in runs["fixed"][1]
    shas = {name: json.loads((out / "summary.json").read_text())["model_sha256"] for name, (out, _) in runs.items()}
    assert len(set(shas.values())) == 1, shas
    assert _client_files(runs["dealt"][0]) == _client_files(runs["fixed"][0])
    for line in (runs["dealt"][0] / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["exchange"] == exchange
        assert record["clients"] == list(range(6)) and len(record["client_stats"]["seconds"]) == 6


def test_dealt_run_resumes_on_the_fixed_placement_bit_for_bit(digits_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["train.lr_decay=0.9"]
    assert _mpirun(1, small_run_overrides(digits_dir, full, rounds=3) + extra).returncode == 0
    first = _mpirun(3, small_run_overrides(digits_dir, part, rounds=2) + extra)
    assert first.returncode == 0, first.stderr
    second = _mpirun(3, ["--resume", str(part), "rounds=3"], {"OSFED_PLACEMENT": "static"})
    assert second.returncode == 0, second.stderr
    assert (json.loads((part / "summary.json").read_text())["model_sha256"]
            == json.loads((full / "summary.json").read_text())["model_sha256"])


def test_a_dealt_method_that_writes_client_state_is_stopped(digits_dir, tmp_path):
    result = _mpirun(3, small_run_overrides(digits_dir, tmp_path / "run", algorithm="leaky_test", rounds=1),
                     timeout=90)
    assert result.returncode != 0
    assert "keeps_client_state" in result.stderr and "residual" in result.stderr
