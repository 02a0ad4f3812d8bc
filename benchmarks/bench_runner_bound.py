"""The runner under ``mpirun -n 3`` vs the compute bound: a bare one-thread PyTorch loop doing the
same client work, split over the two workers.

Workload (issue 12): FedAvg, model ``cnn``, MNIST-5k in 10 Dirichlet(0.5) clients, 30 rounds x 20
local SGD steps of batch 32, lr 0.05 (no momentum), evaluation every 10 rounds, one torch thread
per process.

* **bare**: one process, one thread: for every round and client, restore W_t, then 20 steps of
  ``x[idx]``, forward, backward, ``SGD.step`` on a float tensor of the client's samples. No
  averaging, no evaluation, no MPI. **bound** = bare seconds / 2 (two workers sharing the work
  perfectly, nothing else costing anything).
* **runner, dealt**: ``mpirun -n 3 python -m osfed_hpc run ...`` as shipped (clients dealt to the
  worker that is free, adaptive polling on rank 0, evaluation with all of rank 0's cores).
* **runner, fixed**: the same with ``OSFED_PLACEMENT=static`` (the size-balanced fixed split).

A runner's time is its ``summary.json`` ``wall_seconds`` (the round loop: broadcast, client work,
exchange, fold, evaluation, checkpoints; not the interpreter and MPI start-up), also reported with
the start-up (the whole ``mpirun``). fraction of bound = bound / runner seconds (1.0 = perfect).
Runs alternate (bare, dealt, fixed, ...) and figures are medians, so load from other jobs on the
machine hits all sides alike; the ratios, not the seconds, are the result.

    .venv/bin/python benchmarks/bench_runner_bound.py            # 30 rounds, 3 runs each (~8 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_runner_bound.py --quick    # 5 rounds, 1 run each (~1.5 min)

Never asserts a timing; writes ``benchmarks/results/runner_bound.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (  # first: sets OMP_NUM_THREADS, puts ROOT on sys.path
    MPIRUN,
    ROOT,
    dataset,
    machine_info,
    partition,
    table,
    write_result,
)

AIM = 0.95
STEPS, BATCH, LR, EVAL_EVERY, CLIENTS = 20, 32, 0.05, 10, 10


def bare_pass(reader, part, rounds: int, seed: int) -> float:
    """Seconds of the bare loop over ``rounds`` x all clients (one process, one thread)."""
    from bench_client_overhead import BareClient, restore

    from osfed_hpc.models import build_model
    from osfed_hpc.rng import torch_stream

    net = build_model("cnn", reader.channels, reader.image_shape[1], reader.num_classes, seed=seed)
    params = list(net.parameters())
    start = [p.detach().clone() for p in params]
    clients = {k: BareClient(reader, part.client_indices(k)) for k in range(part.num_clients)}
    net.train()
    began = time.perf_counter()
    for round_ in range(1, rounds + 1):
        for cid, client in clients.items():
            restore(params, start)
            generator = torch_stream(seed, "client", round_, cid)
            optimizer = torch.optim.SGD(params, lr=LR)
            order = torch.randperm(client.n, generator=generator)
            position = 0
            for _ in range(STEPS):
                if position + BATCH > client.n:  # next epoch's order, as a step-counted loop would
                    order, position = torch.randperm(client.n, generator=generator), 0
                idx = order[position : position + BATCH]
                position += BATCH
                loss = F.cross_entropy(net(client.images[idx]), client.labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return time.perf_counter() - began


def runner_run(data: Path, part: Path, out: Path, rounds: int, seed: int, placement: str, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OSFED_BLOCKING_WAIT", None)
    env.pop("OSFED_PLACEMENT", None)
    if placement == "fixed":
        env["OSFED_PLACEMENT"] = "static"
    command = [MPIRUN, "-n", "3", sys.executable, "-m", "osfed_hpc", "run",
               str(ROOT / "configs" / "mnist5k_fedavg.yaml"), f"data.path={data}", f"data.partition={part}",
               f"out={out}", f"rounds={rounds}", f"seed={seed}", f"train.local_steps={STEPS}",
               f"train.batch_size={BATCH}", f"train.lr={LR}", "train.momentum=0.0", f"eval.every={EVAL_EVERY}",
               "runtime.threads=1", "runtime.device=cpu", "runtime.checkpoint_every=0", "name=bench-runner-bound"]
    began = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    launch = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    client = sum(sum(r["client_stats"]["seconds"]) for r in records)
    evaluation = sum(r["seconds"].get("evaluation", 0.0) for r in records)
    idle = []  # per round: |difference of the two workers' client seconds| (the idle end of the round)
    for r in records:
        local = r["seconds"].get("local_work", 0.0)
        idle.append(max(local - (sum(r["client_stats"]["seconds"]) - local), 0.0))
    return {"wall_seconds": summary["wall_seconds"], "launch_seconds": launch, "client_seconds": client,
            "evaluation_seconds": evaluation, "worker_idle_seconds": sum(idle),
            "final_accuracy": summary["final_accuracy"], "model_sha256": summary["model_sha256"],
            "dealt": "(dealt)" in proc.stdout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds, one run of each side")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 quick, 30 full")
    parser.add_argument("--reps", type=int, default=None, help="runs of each side (default 1 quick, 3 full)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench" / "mnist5k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mpirun")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 30)
    reps = args.reps or (1 if args.quick else 3)
    torch.set_num_threads(1)

    from osfed_hpc.data import load_partition

    reader = dataset(args.data)
    part_file = partition(reader, args.data, CLIENTS, "dirichlet", 0.5)
    part = load_partition(part_file, reader)
    info = machine_info(torch_threads=True, mpi="mpichversion")
    started = time.perf_counter()
    sides: dict[str, list] = {"bare": [], "dealt": [], "fixed": []}
    with tempfile.TemporaryDirectory(prefix="osfed-bound-") as tmp:
        for rep in range(reps):
            for side in sides:
                print(f"  run {rep + 1}/{reps}: {side} ...", flush=True)
                if side == "bare":
                    sides[side].append(bare_pass(reader, part, rounds, args.seed))
                else:
                    out = Path(tmp) / f"{side}-{rep}"
                    sides[side].append(runner_run(args.data, part_file, out, rounds, args.seed, side, args.timeout))
    bare = statistics.median(sides["bare"])
    bound = bare / 2
    rows, figures = [], {}
    for side in ("dealt", "fixed"):
        runs = sides[side]
        wall = statistics.median(r["wall_seconds"] for r in runs)
        launch = statistics.median(r["launch_seconds"] for r in runs)
        figures[side] = {
            "wall_seconds": wall, "launch_seconds": launch,
            "fraction_of_bound": bound / wall, "fraction_of_bound_with_startup": bound / launch,
            "client_seconds": statistics.median(r["client_seconds"] for r in runs),
            "evaluation_seconds": statistics.median(r["evaluation_seconds"] for r in runs),
            "worker_idle_seconds": statistics.median(r["worker_idle_seconds"] for r in runs),
            "client_seconds_over_bare": statistics.median(r["client_seconds"] for r in runs) / bare,
        }
        f = figures[side]
        rows.append([f"runner, {side}", wall, launch, f["fraction_of_bound"], f["fraction_of_bound_with_startup"],
                     f["client_seconds_over_bare"], f["worker_idle_seconds"], f["evaluation_seconds"]])
    shas = {r["model_sha256"] for side in ("dealt", "fixed") for r in sides[side]}
    print(f"\nrunner vs compute bound: FedAvg cnn MNIST-5k, {CLIENTS} clients, {rounds} rounds x {STEPS} steps of "
          f"{BATCH}, eval every {EVAL_EVERY}, 1 thread/process, mpirun -n 3; medians of {reps} "
          f"({info['cpu']}, {info['cores']} cores, load {' '.join(info.get('loadavg_start', []))})")
    print(f"bare loop, 1 process: {bare:.2f} s -> bound (2 workers) {bound:.2f} s")
    print(table(["side", "run s", "mpirun s", "bound / run", "bound / mpirun", "client s / bare",
                 "imbalance s", "eval s"], rows))
    print(f"same model from every runner run: {len(shas) == 1}; dealt placement active: "
          f"{all(r['dealt'] for r in sides['dealt'])}")
    verdict = "within" if figures["dealt"]["fraction_of_bound"] >= AIM else "BELOW"
    print(f"aim >= {AIM} of the bound: {verdict} ({figures['dealt']['fraction_of_bound']:.3f})")
    result = {
        "benchmark": "runner_bound", "quick": args.quick, "machine": info,
        "setup": {"model": "cnn", "data": "mnist5k", "clients": CLIENTS, "partition": "dirichlet 0.5",
                  "rounds": rounds, "local_steps": STEPS, "batch_size": BATCH, "lr": LR, "eval_every": EVAL_EVERY,
                  "threads": 1, "ranks": 3, "reps": reps, "seed": args.seed},
        "figures": {"bare_seconds": bare, "bound_seconds": bound, **figures, "aim": AIM,
                    "same_model": len(shas) == 1},
        "runs": sides, "wall_seconds": time.perf_counter() - started,
    }
    print(f"wrote {write_result('runner_bound', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
