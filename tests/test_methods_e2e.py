"""Every method through the real runner: the same model on 1 and 3 ranks, bit-exact resume on
another rank count, and every registered name usable from the shipped configs with its defaults."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from osfed_hpc.algorithms import Environment, algorithm_names, get_algorithm
from osfed_hpc.config import TrainConfig, load_config
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from tests.conftest import ROOT, small_run_overrides
from tests.test_run_e2e import osfed, summary

METHODS = ["fedavg", "osfed", "sfc3", "e3sfc", "topk", "randtopk", "quant", "fedmpq_lite", "lora", "lorafair",
           "feddf", "singleimage", "fedaf", "fedsd2c", "oscar"]
#: one upload per client, then the server trains: rounds=1 and the server phase is the run
ONE_SHOT = ["fedsd2c", "oscar"]
#: options without which a method cannot start here: the papers' pretrained weights are not on this machine
REQUIRED_OPTIONS = {"fedsd2c": {"autoencoder": "pool"}, "oscar": {"tiny": True}}


def test_every_registered_method_is_tested_here():
    test_only = {"channel_echo"}  # registered by tests/test_exchange.py
    assert sorted(METHODS) == [name for name in algorithm_names() if name not in test_only]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_each_method_runs_from_the_shipped_config_with_its_defaults(name, model):
    """``osfed-hpc run configs/mnist5k_fedavg.yaml algorithm=NAME`` resolves, records every option
    with its default, and builds on the small models."""
    required = REQUIRED_OPTIONS.get(name, {})
    config = load_config(ROOT / "configs" / "mnist5k_fedavg.yaml", [f"algorithm={name}", f"model.name={model}",
                                                                      *(f"algorithm.{k}={v}" for k, v in required.items())])
    cls = get_algorithm(name)
    assert config.algorithm == {"name": name, **dataclasses.asdict(cls.Options(**required))}
    net = cls.adapt_model(build_model(model, 1, 28, 10, seed=0), config.algorithm_options(), 10, 0)
    env = Environment(model=FlatModel(net), train=TrainConfig(), num_classes=10, input_shape=(1, 28, 28),
                      device=torch.device("cpu"), seed=0, num_clients=10)
    algorithm = cls(config.algorithm_options(), env)
    assert algorithm.payload_size_hint() > 0


def test_method_options_follow_a_method_switch():
    config = load_config(ROOT / "configs" / "mnist5k_osfed.yaml", ["algorithm=topk", "algorithm.rate=0.05"])
    assert config.algorithm["name"] == "topk" and config.algorithm["rate"] == 0.05


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ONE_SHOT])
def test_same_model_on_1_and_3_ranks_and_bit_exact_resume_on_2(digits_dir, tmp_path, name):
    """3 rounds on 3 ranks == 2 rounds in one process, resumed from its checkpoint on 2 ranks."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = small_run_overrides(digits_dir, full, name, rounds=3)
    first = osfed("run", *args, np=3, timeout=300)
    assert first.returncode == 0, first.stderr
    args = small_run_overrides(digits_dir, part, name, rounds=2)
    assert osfed("run", *args, np=1, timeout=300).returncode == 0
    second = osfed("run", "--resume", str(part), "rounds=3", np=2, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    a, b = summary(full), summary(part)
    assert a["model_sha256"] == b["model_sha256"]
    assert (a["uplink_bytes"], a["downlink_bytes"]) == (b["uplink_bytes"], b["downlink_bytes"])
    assert a["rejected_payloads"] == 0 and a["final_accuracy"] > 0


@pytest.mark.parametrize("name", ONE_SHOT)
def test_one_shot_same_model_on_1_and_3_ranks_and_resume_inside_the_server_phase(digits_dir, tmp_path, name):
    """One upload round on 3 ranks == the same run in one process with a checkpoint after every
    server epoch, killed after its last checkpoint inside the phase (the final one removed) and
    resumed on 2 ranks."""
    full, part = tmp_path / "full", tmp_path / "part"
    first = osfed("run", *small_run_overrides(digits_dir, full, name, rounds=1), np=3, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "[server phase] round 1 epoch 1/" in first.stdout
    args = [*small_run_overrides(digits_dir, part, name, rounds=1), "runtime.checkpoint_every=1"]
    assert osfed("run", *args, timeout=300).returncode == 0
    inside = sorted((part / "checkpoints").glob("round-000000-phase-*/manifest.json"))
    assert inside, "no checkpoint was written inside the server phase"
    kept = inside[-1].parent
    epoch = int(kept.name.rsplit("-", 1)[1])
    for later in (part / "checkpoints").glob("round-*"):
        if later.name > kept.name:
            shutil.rmtree(later)
    (part / "summary.json").unlink()
    second = osfed("run", "--resume", str(part), np=2, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"server phase of round 1 at epoch {epoch}" in second.stdout
    a, b = summary(full), summary(part)
    assert a["model_sha256"] == b["model_sha256"]
    assert (a["uplink_bytes"], a["downlink_bytes"]) == (b["uplink_bytes"], b["downlink_bytes"])
    assert a["rounds"] == 1 and a["server_phase_seconds"] > 0 and a["final_accuracy"] > 0


def test_batched_osfed_search_same_model_on_1_and_3_ranks_and_resume_on_2(digits_dir, tmp_path):
    """``synthesis_batch: 2``: clients sit in blocks of two ids on every rank count, so every batch (and
    its rounding) is the same on 3 ranks, on 1 and after a resume on 2; with the early stop and the
    label guard on, so their bookkeeping is covered too."""
    options = ["algorithm.synthesis_batch=2", "algorithm.stop_tolerance=0.01", "algorithm.label_guard=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    first = osfed("run", *small_run_overrides(digits_dir, full, "osfed", rounds=3), *options, np=3, timeout=300)
    assert first.returncode == 0, first.stderr
    assert osfed("run", *small_run_overrides(digits_dir, part, "osfed", rounds=2), *options, np=1,
                 timeout=300).returncode == 0
    second = osfed("run", "--resume", str(part), "rounds=3", np=2, timeout=300)
    assert second.returncode == 0, second.stderr
    a, b = summary(full), summary(part)
    assert a["model_sha256"] == b["model_sha256"] and a["rejected_payloads"] == 0
    # the batched path ran: the hosts of each round hold whole blocks {0,1}, {2,3}, {4,5}
    hello = [line for line in first.stdout.splitlines() if "worker on" in line]
    for line in hello:
        hosted = [int(c) for c in line.split("clients [")[1].split("]")[0].split(",")]
        assert all((c ^ 1) in hosted for c in hosted), line
