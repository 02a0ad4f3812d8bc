"""A run that plans itself: --version, the config keys in --help, and --dry-run (no MPI, no writes)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from osfed_hpc import __version__
from tests.conftest import small_run_overrides
from tests.test_run_e2e import osfed


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and key != "algorithm":
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}" if key != "algorithm" else "algorithm.name")
    return keys


def test_version():
    result = osfed("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"osfed-hpc {__version__}"


def test_run_help_lists_every_config_key_with_its_default():
    from osfed_hpc.config import Config
    from osfed_hpc.plan import config_keys

    rows = {key: (kind, default) for key, kind, default in config_keys()}
    assert set(_flat_keys(Config().to_dict())) <= set(rows)
    assert rows["train.lr"] == ("float", "0.05")
    assert rows["out"] == ("str | None", "null")
    assert rows["runtime.tensorboard"] == ("bool", "false")
    assert rows["algorithm.name"] == ("str", "fedavg")
    result = osfed("run", "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for key in _flat_keys(Config().to_dict()):
        assert any(line.split()[:1] == [key] for line in lines), key
    assert any(line.split() == ["data.clients", "int", "10"] for line in lines)
    assert "--dry-run" in result.stdout and "--ranks" in result.stdout


@pytest.fixture
def fresh_digits(digits_dir, tmp_path) -> Path:
    """A private copy of the prepared digits, without any partition file."""
    copy = tmp_path / "digits"
    shutil.copytree(digits_dir, copy, ignore=shutil.ignore_patterns("partitions"))
    return copy


def _poisoned_mpi4py(tmp_path: Path) -> dict:
    """An environment in which importing mpi4py fails loudly: a dry run must never touch MPI."""
    fake = tmp_path / "fake-site" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('mpi4py imported by a dry run')\n")
    return {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_dry_run_prints_config_and_placement_without_mpi_or_writes(fresh_digits, tmp_path):
    from osfed_hpc.comm import assign_clients
    from osfed_hpc.data import DatasetReader, make_partition

    out = tmp_path / "never-created"
    before = sorted(p.name for p in fresh_digits.rglob("*"))
    result = osfed("run", "--dry-run", *small_run_overrides(fresh_digits, out, "osfed"), "--ranks", "3",
                   "--runs-dir", str(tmp_path / "no-runs"), env=_poisoned_mpi4py(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    assert sorted(p.name for p in fresh_digits.rglob("*")) == before  # no partition file written
    text = result.stdout
    config_text, plan_text = text.split("# plan", 1)
    resolved = yaml.safe_load(config_text)
    assert resolved["algorithm"]["name"] == "osfed" and resolved["algorithm"]["factor"] == 2
    assert resolved["data"]["partition"].endswith("partitions/dirichlet-n6-a1-s0.npz")
    assert "computed in memory" in plan_text
    partition = make_partition(DatasetReader(fresh_digits), 6, "dirichlet", 1.0, 0)
    placement = assign_clients(partition.sizes, [1, 2])
    rows = {int(line.split()[0]): line.split() for line in plan_text.splitlines()
            if line.strip() and line.split()[0].isdigit() and len(line.split()) > 5}
    assert sorted(rows) == [0, 1, 2]
    assert rows[0][1] == "server" and rows[0][2] == "-"
    for rank in (1, 2):
        assert rows[rank][1] == "worker"
        assert rows[rank][2] == ",".join(map(str, placement[rank]))
        assert int(rows[rank][3]) == int(sum(partition.sizes[c] for c in placement[rank]))
    assert "no earlier finished run of cnn at 8 px" in plan_text


@pytest.mark.parametrize("algorithm, env, expected", [
    ("fedavg", {}, "dealt"),
    ("fedavg", {"OSFED_PLACEMENT": "static"}, "fixed: OSFED_PLACEMENT=static"),
    ("osfed", {}, "fixed: the method keeps client state"),
])
def test_dry_run_shows_the_placement_the_run_uses(fresh_digits, tmp_path, algorithm, env, expected):
    """The plan and the runner share one decision (comm.placement_mode): a stateless method's
    workers are shown as taking dealt clients, not a fixed split the run would not use."""
    result = osfed("run", "--dry-run", *small_run_overrides(fresh_digits, tmp_path / "out", algorithm), "--ranks", "3",
                   "--runs-dir", str(tmp_path / "no-runs"), env={"OSFED_PLACEMENT": "", **env})
    assert result.returncode == 0, result.stderr
    plan_text = result.stdout.split("# plan", 1)[1]
    assert f"placement:  {expected}" in plan_text
    rows = {int(line.split()[0]): line.split() for line in plan_text.splitlines()
            if line.strip() and line.split()[0].isdigit() and len(line.split()) > 5}
    worker_clients = {rows[rank][2] for rank in (1, 2)}
    assert (worker_clients == {"dealt"}) == (expected == "dealt")
    if expected == "dealt":
        assert float(rows[1][4]) == float(rows[2][4]) == pytest.approx(float(rows[0][4]) / 2)


def test_placement_mode_reasons():
    from osfed_hpc.algorithms.fedavg import FedAvg
    from osfed_hpc.comm import placement_mode

    class Batched(FedAvg):
        def client_batch_size(self) -> int:
            return 2

    fedavg, batched = FedAvg.__new__(FedAvg), Batched.__new__(Batched)
    assert placement_mode(fedavg, 2, True, None) == "fixed: one worker"
    assert placement_mode(fedavg, 3, True, None) == "dealt"
    assert placement_mode(batched, 3, True, None) == "fixed: the method batches a rank's clients"
    assert placement_mode(fedavg, 3, False, None) == "fixed: more clients than MPI tags"
    assert placement_mode(fedavg, 3, True, 2**30) == "dealt"
    assert placement_mode(fedavg, 3, True, 2**30 + 1).startswith("fixed: the training split (1.0 GiB)")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.lr=-1"], "train.lr"),
        (["algorithm.name=osfed", "algorithm.factor=3"], "algorithm.factor: multi-grid factor 3 does not divide"),
        (["--ranks", "8"], "7 worker ranks for 6 clients"),
        (["data.path=/nonexistent/data"], "holds no prepared dataset"),
    ],
)
def test_dry_run_bad_input_is_one_line_and_exit_2(digits_dir, tmp_path, extra, message):
    result = osfed("run", "--dry-run", *small_run_overrides(digits_dir, tmp_path / "r"), *extra,
                   env=_poisoned_mpi4py(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("osfed-hpc run: error: ")
    assert message in result.stderr
    assert "# plan" not in result.stdout


def test_plan_estimates(digits_dir, tmp_path):
    from osfed_hpc.config import load_config
    from osfed_hpc.plan import make_plan

    def plan(algorithm, *extra, ranks=3):
        config = load_config(None, small_run_overrides(digits_dir, tmp_path / "r", algorithm) + list(extra))
        return make_plan(config, ranks, runs_dir=tmp_path / "no-runs")

    osfed_plan = plan("osfed", "server.momentum=0.5")
    residual = 4 * osfed_plan.param_numel
    assert osfed_plan.client_state_bytes == residual and osfed_plan.server_state_bytes == residual  # velocity
    server, *workers = osfed_plan.rank_plans
    assert server.clients == [] and server.client_state_bytes == 0
    assert server.checkpoint_bytes == 4 * osfed_plan.model_numel + residual
    assert sorted(c for w in workers for c in w.clients) == list(range(6))
    for worker in workers:
        assert worker.client_state_bytes == worker.checkpoint_bytes == residual * len(worker.clients)
        assert worker.selected_per_round == len(worker.clients)
        assert worker.uplink_bytes == osfed_plan.payload_hint * len(worker.clients)
        assert worker.downlink_bytes == 4 * osfed_plan.model_numel * len(worker.clients)
    assert server.uplink_bytes == osfed_plan.payload_hint * 6
    assert osfed_plan.payload_hint < 10_000  # a snapshot, not a weight vector

    no_feedback = plan("osfed", "algorithm.error_feedback=false")
    assert no_feedback.client_state_bytes == 0 and no_feedback.server_state_bytes == 0

    fedavg = plan("fedavg", "server.sample_fraction=0.5", ranks=1)
    assert fedavg.client_state_bytes == 0
    assert fedavg.payload_hint >= 4 * fedavg.model_numel
    (alone,) = fedavg.rank_plans
    assert alone.role == "server+worker" and alone.clients == list(range(6))
    assert alone.selected_per_round == 3  # round(0.5 x 6) clients each round
    assert alone.checkpoint_bytes == 4 * fedavg.model_numel


def _fake_run(root: Path, name: str, model: str, resolution: int, algorithm: str, seconds: list[float]) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"model": model, "resolution": resolution, "algorithm": algorithm,
                                                  "world_size": 3}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": i + 1, "seconds": {"round": s}}) + "\n"
                                               for i, s in enumerate(seconds)))


def test_seconds_per_round_from_earlier_runs(digits_dir, tmp_path):
    from osfed_hpc.plan import median_round_seconds

    runs = tmp_path / "runs"
    _fake_run(runs, "a", "cnn", 8, "fedavg", [1.0, 2.0, 3.0])
    _fake_run(runs / "sweep", "b", "cnn", 8, "osfed", [10.0, 20.0])
    _fake_run(runs, "c", "mlp", 8, "fedavg", [100.0])  # another model
    _fake_run(runs, "d", "cnn", 16, "fedavg", [100.0])  # another resolution
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "metrics.jsonl").write_text(json.dumps({"round": 1, "seconds": {"round": 99.0}}) + "\n")
    same = median_round_seconds(runs, "cnn", 8, "fedavg")
    assert same["median_seconds"] == 2.0 and same["rounds"] == 3 and same["same_algorithm"]
    other = median_round_seconds(runs, "cnn", 8, "sfc3")
    assert other["median_seconds"] == 3.0 and other["rounds"] == 5 and not other["same_algorithm"]
    assert median_round_seconds(runs, "vit_b_32", 8) is None
    assert median_round_seconds(tmp_path / "missing", "cnn", 8) is None

    result = osfed("run", "--dry-run", *small_run_overrides(digits_dir, tmp_path / "r"), "rounds=10",
                   "--runs-dir", str(runs))
    assert result.returncode == 0, result.stderr
    assert "median 2.00 s per round over 3 rounds of 1 earlier run(s) of cnn at 8 px" in result.stdout
    assert "~0:00:20 for 10 rounds" in result.stdout
