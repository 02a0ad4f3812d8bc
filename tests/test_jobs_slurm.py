"""The job scripts under a fake SLURM: sbatch/srun/scontrol stand-ins around the real mpirun.

Why a fake instead of mocks: what can go wrong in a job script is the shell itself (quoting, traps,
``wait`` semantics, set -e) and the hand-off between the batch shell, the launcher and the ranks.
So the stubs are thin: ``sbatch`` records its argv and runs the script with bash and the SLURM_*
variables a real allocation sets, ``srun`` drops its options and ``exec``s ``mpirun -n $SLURM_NTASKS``
(which, like srun, forwards USR1 to every rank), ``scontrol`` records its argv. Everything else
(the scripts, the CLI, MPI, checkpoints) is the real thing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from osfed_hpc.checkpoint import latest_checkpoint
from osfed_hpc.config import load_config
from tests.fake_slurm import JOBS, PYTHON, ROOT


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _rounds_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line)["round"])
        except (json.JSONDecodeError, KeyError):
            pass
    return rounds


def _submit(env: dict[str, str], records: Path, job: str, **knobs: str) -> tuple[int, Path]:
    """sbatch jobs/imagenet1k.slurm in the background; returns (batch shell pid, its .rc file)."""
    job_env = dict(env, FAKE_JOB_ID=job, **knobs)
    result = subprocess.run(["sbatch", str(JOBS / "imagenet1k.slurm")], env=job_env, cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert f"Submitted batch job {job}" in result.stdout
    pid = int(_wait_for(lambda: (records / f"job-{job}.pid").exists() and (records / f"job-{job}.pid").read_text().strip(),
                        30, "the batch shell's pid"))
    return pid, records / f"job-{job}.rc"


def _job_status(rc_file: Path, log: Path, timeout: float = 150) -> int:
    try:
        text = _wait_for(lambda: rc_file.exists() and rc_file.read_text().strip(), timeout, f"{rc_file.name}")
    except AssertionError:
        raise AssertionError(f"job did not end; log:\n{log.read_text() if log.exists() else '(none)'}") from None
    return int(text)


# ---------------------------------------------------------------------------------------------
# static checks


@pytest.mark.parametrize("script", sorted(p.name for p in JOBS.glob("*.slurm")) + ["common.sh"])
def test_job_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(JOBS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_job_scripts_request_what_the_runner_relies_on():
    text = (JOBS / "imagenet1k.slurm").read_text()
    for directive in ("--gpus-per-task=1", "--signal=B:USR1@120", "--requeue", "--open-mode=append",
                      "--cpus-per-task=", "--ntasks-per-node=", "--nodes=", "--time=", "--output="):
        assert f"#SBATCH {directive}" in text, directive
    assert "%j" in text and "set -euo pipefail" in text and "HDF5_USE_FILE_LOCKING=FALSE" in text
    assert "# osfed_step mpirun" in text  # the commented alternative launcher
    for knob in ("CONFIG", "RES", "CLIENTS", "DATA", "ALGO", "OUT", "PYTHON"):
        assert f"{knob}=${{{knob}:-" in text, knob


def test_step_forwards_usr1_and_returns_the_step_status(tmp_path):
    """The trap/wait loop of jobs/common.sh: the signal reaches the step, the shell waits for its end."""
    script = tmp_path / "step.sh"
    script.write_text(f"""set -euo pipefail
source {JOBS / 'common.sh'}
status=0
osfed_step bash -c 'trap "sleep 0.5; exit 3" USR1; for i in $(seq 100); do sleep 0.1; done; exit 5' || status=$?
echo "first=$status"
status=0
osfed_step bash -c 'exit 7' || status=$?
echo "second=$status"
""")
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "got SIGUSR1" in out and "first=3" in out and "second=7" in out


def test_imagenet_config_loads_and_its_overrides_validate():
    config = load_config(ROOT / "configs" / "imagenet1k.yaml")
    assert (config.data.clients, config.data.alpha, config.data.resolution) == (20, 0.01, 224)
    assert config.model.name == "resnet18_gn" and config.algorithm["name"] == "fedavg"
    assert config.eval.every == 5 and config.runtime.checkpoint_every == 1 and config.data.num_workers == 6
    osfed = load_config(ROOT / "configs" / "imagenet1k.yaml", ["algorithm.name=osfed", "algorithm.factor=4"])
    assert osfed.algorithm_options().factor == 4


def test_imagenet_config_runs_on_other_data(jpeg_data, tmp_path):
    """The short run the config promises: a given partition, 64 px, plain ResNet-18, 2 rounds, one rank."""
    partition = tmp_path / "p4.npz"
    subprocess.run([PYTHON, "-m", "osfed_hpc", "partition", "--data", str(jpeg_data), "--clients", "4",
                    "--alpha", "1.0", "--out", str(partition)], check=True, cwd=ROOT, capture_output=True)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        [PYTHON, "-m", "osfed_hpc", "run", "configs/imagenet1k.yaml", f"data.path={jpeg_data}",
         f"data.partition={partition}", "data.resolution=64", "model.name=resnet18", "rounds=2", f"out={out}",
         "runtime.device=cpu"],
        cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["resolution"] == 64 and summary["num_clients"] == 4
    assert summary["model"] == "resnet18" and summary["final_accuracy"] is not None


# ---------------------------------------------------------------------------------------------
# end to end: time-limit signal -> checkpoint -> requeue -> resume == uninterrupted


def _knobs(data: Path, out: Path, res: int, workers: int) -> dict[str, str]:
    # local_steps makes a round last about a second, so the signal lands mid-run on any machine
    return dict(DATA=str(data), RES=str(res), CLIENTS="4", ALGO="fedavg", OUT=str(out),
                EXTRA=f"model.name=cnn rounds=4 data.alpha=1.0 train.local_steps=30 train.batch_size=8 "
                      f"data.num_workers={workers} seed=3 runtime.threads=1 runtime.device=cpu")


@pytest.mark.slow
@pytest.mark.parametrize("res,workers", [(32, 0), (48, 1)])
def test_usr1_checkpoints_requeues_and_resumes_bitwise(jpeg_data, fake_slurm, tmp_path, res, workers):
    records = Path(fake_slurm["FAKE_SLURM_DIR"])

    # uninterrupted reference, through the same script
    reference = tmp_path / "reference"
    _, rc_file = _submit(fake_slurm, records, "100", **_knobs(jpeg_data, reference, res, workers))
    assert _job_status(rc_file, records / "slurm-100.out") == 0
    expected = json.loads((reference / "summary.json").read_text())
    assert expected["rounds"] == 4 and expected["resolution"] == res and expected["world_size"] == 3

    # the same job, signalled as SLURM does before the time limit (B:USR1 -> the batch shell only)
    out = tmp_path / "interrupted"
    pid, rc_file = _submit(fake_slurm, records, "200", **_knobs(jpeg_data, out, res, workers))
    _wait_for(lambda: 1 in _rounds_logged(out), 120, "round 1 in metrics.jsonl")
    os.kill(pid, signal.SIGUSR1)
    status = _job_status(rc_file, records / "slurm-200.out")
    job_log = (records / "slurm-200.out").read_text()
    assert status == 0, job_log
    assert "got SIGUSR1" in job_log
    assert not (out / "summary.json").exists(), "the run finished before the signal arrived"
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None, job_log
    stopped_at = json.loads((checkpoint / "manifest.json").read_text())["round"]
    assert 1 <= stopped_at < 4
    assert (records / "scontrol.argv").read_text().split("\n")[0] == "requeue 200"

    # SLURM requeues: the same job id, SLURM_RESTART_COUNT=1, the script from the top
    for stale in ("job-200.pid", "job-200.rc"):
        (records / stale).unlink()
    _, rc_file = _submit(fake_slurm, records, "200", SLURM_RESTART_COUNT="1", **_knobs(jpeg_data, out, res, workers))
    assert _job_status(rc_file, records / "slurm-200.out") == 0
    job_log = (records / "slurm-200.out").read_text()
    assert "resuming from the last checkpoint" in job_log and f"(round {stopped_at})" in job_log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_sha256"] == expected["model_sha256"]
    assert _rounds_logged(out) == [1, 2, 3, 4]
    assert summary["uplink_bytes"] == expected["uplink_bytes"]
    srun_lines = (records / "srun.argv").read_text().splitlines()
    assert all("--kill-on-bad-exit=1" in line for line in srun_lines)
    assert any(f"--resume {out}" in line for line in srun_lines)
