"""A fake SLURM for the job-script tests: sbatch/srun/scontrol stand-ins around the real mpirun,
and a tiny ImageNet-layout folder prepared with the real CLI. Registered as a pytest plugin in
``tests/conftest.py`` so every test module gets the fixtures without importing them.

Why a fake instead of mocks: what can go wrong in a job script is the shell itself (quoting, traps,
``wait`` semantics, set -e) and the hand-off between the batch shell, the launcher and the ranks.
So the stubs are thin: ``sbatch`` records its argv and runs the script with bash and the SLURM_*
variables a real allocation sets, ``srun`` drops its options and ``exec``s ``mpirun -n $SLURM_NTASKS``
(which, like srun, forwards USR1 to every rank), ``scontrol`` records its argv.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
PYTHON = sys.executable
VENV_MPIRUN = Path(sys.executable).parent / "mpirun"
MPIRUN = str(VENV_MPIRUN) if VENV_MPIRUN.exists() else "mpirun"


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny ImageNet-layout folder prepared with the real CLI, and the fake SLURM


def make_imagefolder(root: Path, classes: int = 4, per_class: int = 12, side: int = 40) -> Path:
    """class<k>/img<i>.jpg: noise around a class colour, so the labels are learnable."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([60 * k, 255 - 60 * k, (97 * k) % 256], dtype=np.float64)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("imagefolder")
    folder = make_imagefolder(base / "folder")
    out = base / "data"
    subprocess.run([PYTHON, "-m", "osfed_hpc", "prepare", "--source", "imagefolder", "--root", str(folder),
                    "--out", str(out), "--workers", "1", "--quiet"], check=True, cwd=ROOT)
    return out


SBATCH_STUB = r'''#!{python}
"""sbatch stand-in: record argv; run the script with bash and SLURM_* set.

In the background (like a real submission; the batch shell's pid goes to job-<id>.pid, its exit
status to job-<id>.rc), or one array task after another in the foreground with --wait.
"""
import json, os, subprocess, sys
d = os.environ["FAKE_SLURM_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "sbatch.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
opts, i = {{}}, 0
while i < len(args) and args[i].startswith("-"):
    key, _, value = args[i].partition("=")
    opts[key] = value
    i += 1
script, script_args = args[i], args[i + 1:]
job = os.environ.get("FAKE_JOB_ID", "4242")
env = dict(os.environ, SLURM_JOB_ID=job, SLURM_NTASKS=os.environ.get("FAKE_NTASKS", "3"),
           SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=os.getcwd(),
           SLURM_RESTART_COUNT=os.environ.get("SLURM_RESTART_COUNT", "0"))
tasks = [None]
if "--array" in opts:
    low, high = opts["--array"].split("%")[0].split("-")
    tasks = list(range(int(low), int(high) + 1))
status = 0
for task in tasks:
    tag = job if task is None else f"{{job}}_{{task}}"
    task_env = dict(env)
    if task is not None:
        task_env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task))
    output = opts.get("--output", os.path.join(d, "slurm-%j.out"))
    output = output.replace("%A", job).replace("%a", str(task)).replace("%j", job)
    log = open(output, "ab")
    if "--wait" in opts:
        status |= subprocess.run(["bash", script, *script_args], env=task_env, stdout=log, stderr=log).returncode
    else:
        wrapper = 'bash "$0" "$@" & echo $! > "$PIDFILE"; wait $!; echo $? > "$RCFILE"'
        task_env.update(PIDFILE=os.path.join(d, f"job-{{tag}}.pid"), RCFILE=os.path.join(d, f"job-{{tag}}.rc"))
        proc = subprocess.Popen(["bash", "-c", wrapper, script, *script_args], env=task_env, stdout=log, stderr=log,
                                start_new_session=True)
        with open(os.path.join(d, f"job-{{tag}}.pgid"), "w") as f:
            f.write(str(proc.pid))
print(f"Submitted batch job {{job}}")
sys.exit(status)
'''

SRUN_STUB = r'''#!/bin/bash
# srun stand-in: record argv, drop srun's own options, start the ranks with mpirun (exec: same pid)
printf '%s\n' "$*" >> "$FAKE_SLURM_DIR/srun.argv"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "{mpirun}" -n "${{SLURM_NTASKS:-1}}" "$@"
'''

SCONTROL_STUB = r'''#!/bin/bash
# scontrol stand-in: record argv (a real requeue would end this allocation and queue the job again)
printf '%s\n' "$*" >> "$FAKE_SLURM_DIR/scontrol.argv"
'''


@pytest.fixture()
def fake_slurm(tmp_path):
    """An environment whose PATH starts with the stubs; FAKE_SLURM_DIR collects their records.

    On teardown, a background job that has not ended (a failed test) is killed by its process group.
    """
    bin_dir = tmp_path / "fake-slurm-bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH_STUB.format(python=PYTHON)), ("srun", SRUN_STUB.format(mpirun=MPIRUN)),
                       ("scontrol", SCONTROL_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    records = tmp_path / "fake-slurm"
    records.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_DIR=str(records), PYTHON=PYTHON,
               OMP_NUM_THREADS="1", OSFED_ROOT=str(ROOT))
    yield env
    for pgid_file in records.glob("job-*.pgid"):
        if not pgid_file.with_suffix(".rc").exists():
            try:
                os.killpg(int(pgid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError):
                pass
