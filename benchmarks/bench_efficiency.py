"""Runner efficiency over whole runs under ``mpirun -n P``: how much of the workers' time is client work?

    efficiency = (sum of client-update seconds) / ((P - 1) x sum of round wall seconds)

both read from the run's own ``metrics.jsonl`` (``client_stats.seconds`` and ``seconds.round``,
the final evaluation subtracted), so the ratio compares two things measured in the same run. 1.0
means every worker computed for the whole of every round; what is missing went to broadcast,
exchange, aggregation, logging, or to a worker waiting for a slower one (imbalance).

Cases (FedAvg, ``cnn``, MNIST-5k, 10 clients, one local epoch, one torch thread per rank):

* **iid**: balanced clients (400 samples each);
* **dirichlet 0.01**: client sizes differ by orders of magnitude. The run uses the runner's
  size-aware placement (``comm.assign_clients``: longest first). For **round-robin** placement the
  package has no switch, so the round is *re-binned*: the measured per-client seconds are summed
  per rank under round-robin placement (client c -> worker c mod (P-1)), the slowest rank's sum
  replaces the measured slowest rank's sum, everything else in the round is kept. Client seconds
  were measured with both workers busy, so the estimate slightly favours round-robin.
* **polite polling vs busy wait**: the same runs with ``OSFED_BLOCKING_WAIT=1`` (every MPI wait a
  plain ``Wait()``, which spins a core) alternated with the default (nonblocking request + 0.2 ms
  sleeps). With 3 ranks on 2 cores the waiting rank competes with the workers for a core.

    .venv/bin/python benchmarks/bench_efficiency.py            # 10 rounds, 2 pairs per case
    .venv/bin/python benchmarks/bench_efficiency.py --quick    # 3 rounds, 1 pair per case

Never asserts a timing; writes ``benchmarks/results/efficiency.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (  # first: sets OMP_NUM_THREADS, puts ROOT on sys.path
    MPIRUN,
    ROOT,
    dataset,
    machine_info,
    partition,
    table,
    write_result,
)

# ---------------------------------------------------------------------------------------------
# one run and its analysis


def launch(np_: int, data: Path, part: Path, out: Path, rounds: int, blocking: bool, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OSFED_BLOCKING_WAIT", None)
    if blocking:
        env["OSFED_BLOCKING_WAIT"] = "1"
    command = [MPIRUN, "-n", str(np_), sys.executable, "-m", "osfed_hpc", "run",
               str(ROOT / "configs" / "mnist5k_fedavg.yaml"), f"data.path={data}", f"data.partition={part}",
               f"out={out}", f"rounds={rounds}", "runtime.threads=1", "runtime.device=cpu", "eval.every=1000",
               "name=bench-efficiency"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"records": records, "summary": summary, "launch_wall_seconds": wall, "launch_cpu_seconds": cpu}


def analyse(run: dict, sizes: np.ndarray, workers: list[int], skip_first: bool) -> dict:
    from osfed_hpc.comm import assign_clients, owner_map

    lpt = owner_map(assign_clients(sizes, workers))
    records = run["records"][1:] if skip_first and len(run["records"]) > 1 else run["records"]
    client_s = round_s = round_rr = 0.0
    lpt_max = rr_max = lpt_mean = 0.0
    round_list, local_check = [], []
    phases: dict[str, float] = {}
    for r in records:
        secs = r["client_stats"]["seconds"]
        clients = r["clients"]
        wall = r["seconds"]["round"] - r["seconds"].get("evaluation", 0.0)
        load_lpt = {w: 0.0 for w in workers}
        load_rr = {w: 0.0 for w in workers}
        for c, s in zip(clients, secs):
            load_lpt[lpt[c]] += s
            load_rr[workers[c % len(workers)]] += s
        m_lpt, m_rr = max(load_lpt.values()), max(load_rr.values())
        client_s += sum(secs)
        round_s += wall
        round_rr += wall - m_lpt + m_rr
        lpt_max += m_lpt
        rr_max += m_rr
        lpt_mean += sum(secs) / len(workers)
        round_list.append(r["seconds"]["round"])
        for phase, value in r["seconds"].items():
            phases[phase] = phases.get(phase, 0.0) + value
        local_check.append(abs(m_lpt - r["seconds"]["local_work"]))
    w = len(workers)
    return {
        "rounds_used": len(records),
        "client_seconds": client_s, "round_seconds": round_s,
        "efficiency": client_s / (w * round_s),
        # efficiency = balance x local fraction: (sum / (W max-rank)) x (max-rank / round)
        "balance": client_s / (w * lpt_max), "local_fraction": lpt_max / round_s,
        "phase_seconds_per_round": {k: v / max(len(records), 1) for k, v in phases.items()},
        "efficiency_round_robin_rebinned": client_s / (w * round_rr),
        "imbalance_lpt": lpt_max / lpt_mean, "imbalance_round_robin": rr_max / lpt_mean,
        "round_seconds_median": statistics.median(round_list),
        "round_seconds_list": round_list,
        "mean_client_seconds": client_s / sum(len(r["clients"]) for r in records),
        "run_efficiency_wall": sum(sum(r["client_stats"]["seconds"]) for r in run["records"])
        / (w * run["summary"]["wall_seconds"]),
        "summary_wall_seconds": run["summary"]["wall_seconds"],
        "launch_wall_seconds": run["launch_wall_seconds"],
        "launch_cpu_seconds": run["launch_cpu_seconds"],
        "max_abs_local_work_vs_lpt_rebinned": max(local_check) if local_check else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, one polite/busy pair per case")
    parser.add_argument("--np", type=int, default=3, help="MPI ranks (rank 0 + P-1 workers)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 3 quick, 10 full)")
    parser.add_argument("--pairs", type=int, default=None, help="polite/busy pairs per case (default 1 quick, 2 full)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench" / "mnist5k")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mpirun")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    pairs = args.pairs or (1 if args.quick else 2)
    workers = list(range(1, args.np))

    from osfed_hpc.data import load_partition

    reader = dataset(args.data)
    cases = {"iid": partition(reader, args.data, 10, "iid", 1.0),
             "dirichlet0.01": partition(reader, args.data, 10, "dirichlet", 0.01)}
    sizes = {name: np.asarray(load_partition(file, reader).sizes) for name, file in cases.items()}
    info = machine_info(mpi="mpichversion")
    started = time.perf_counter()
    runs: dict[str, dict[str, list]] = {name: {"polite": [], "busy": []} for name in cases}
    with tempfile.TemporaryDirectory(prefix="osfed-bench-eff-") as tmp:
        for pair in range(pairs):
            for name, file in cases.items():
                order = ("polite", "busy") if pair % 2 == 0 else ("busy", "polite")
                for mode in order:
                    out = Path(tmp) / f"{name}-{mode}-{pair}"
                    print(f"  mpirun -n {args.np}: {name}, {mode} waits, {rounds} rounds ...", flush=True)
                    run = launch(args.np, args.data, file, out, rounds, mode == "busy", args.timeout)
                    runs[name][mode].append(analyse(run, sizes[name], workers, skip_first=rounds > 1))

    def med(name: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name][mode])

    figures: dict[str, dict] = {}
    for name in cases:
        figures[name] = {
            "client_sizes": sizes[name].tolist(),
            "efficiency_lpt": med(name, "polite", "efficiency"),
            "efficiency_round_robin_rebinned": med(name, "polite", "efficiency_round_robin_rebinned"),
            "balance_lpt": med(name, "polite", "balance"),
            "local_fraction": med(name, "polite", "local_fraction"),
            "imbalance_lpt": med(name, "polite", "imbalance_lpt"),
            "imbalance_round_robin": med(name, "polite", "imbalance_round_robin"),
            "run_efficiency_wall": med(name, "polite", "run_efficiency_wall"),
            "efficiency_busy_wait": med(name, "busy", "efficiency"),
            "busy_over_polite_round_seconds": med(name, "busy", "round_seconds_median")
            / med(name, "polite", "round_seconds_median"),
            "busy_over_polite_run_wall": med(name, "busy", "summary_wall_seconds")
            / med(name, "polite", "summary_wall_seconds"),
            "busy_over_polite_launch_wall": med(name, "busy", "launch_wall_seconds")
            / med(name, "polite", "launch_wall_seconds"),
            "busy_over_polite_client_seconds": med(name, "busy", "mean_client_seconds")
            / med(name, "polite", "mean_client_seconds"),
            "busy_over_polite_job_cpu_seconds": med(name, "busy", "launch_cpu_seconds")
            / med(name, "polite", "launch_cpu_seconds"),
        }
    rows = []
    for name, f in figures.items():
        rows.append([name, f["efficiency_lpt"], f["efficiency_round_robin_rebinned"],
                     f"{f['imbalance_lpt']:.2f} / {f['imbalance_round_robin']:.2f}",
                     f"{f['balance_lpt']:.3f} x {f['local_fraction']:.3f}", f["run_efficiency_wall"]])
    print(f"\nrunner efficiency, mpirun -n {args.np} ({len(workers)} workers), FedAvg cnn MNIST-5k, 10 clients, "
          f"{rounds} rounds (first skipped), median of {pairs} run(s) "
          f"({info['cpu']}, {info['cores']} cores, load {' '.join(info.get('loadavg_start', []))})")
    print(table(["case", "eff. longest-first", "eff. round-robin*", "imbalance LPT / RR",
                 "= balance x local fraction", "eff. whole run"], rows))
    print("  * round-robin re-binned from the measured per-client seconds (see the docstring)")
    phase_rows = []
    keys = ("broadcast", "local_work", "exchange", "aggregation", "evaluation")
    for name in cases:
        first = runs[name]["polite"][0]["phase_seconds_per_round"]
        other = first.get("round", 0.0) - sum(first.get(k, 0.0) for k in keys)
        phase_rows.append([name] + [first.get(k, 0.0) for k in keys] + [other, first.get("round", 0.0)])
    print(table(["s per round (polite, first run)", "broadcast", "local_work", "exchange", "aggregation",
                 "evaluation", "rest", "round"], phase_rows))
    print("  local_work = slowest worker's client seconds and exchange is derived from it (runner.py _log_round),"
          " so 'rest' is ~0 and may be slightly negative")
    print()
    print(table(["case", "busy/polite round s", "busy/polite run wall", "busy/polite mpirun wall",
                 "busy/polite client s", "busy/polite job CPU s"],
                [[n, f["busy_over_polite_round_seconds"], f["busy_over_polite_run_wall"],
                  f["busy_over_polite_launch_wall"], f["busy_over_polite_client_seconds"],
                  f["busy_over_polite_job_cpu_seconds"]] for n, f in figures.items()]))
    pays = [f["busy_over_polite_round_seconds"] for f in figures.values()]
    print(f"polite polling {'pays' if min(pays) > 1.0 else 'does not pay everywhere'}: busy-wait rounds take "
          f"{', '.join(f'{p:.2f}x' for p in pays)} the polite ones")
    result = {"benchmark": "efficiency", "quick": args.quick, "machine": info,
              "setup": {"np": args.np, "rounds": rounds, "pairs": pairs, "algorithm": "fedavg", "model": "cnn",
                        "data": "mnist5k", "clients": 10, "threads_per_rank": 1, "first_round_skipped": rounds > 1},
              "figures": figures, "runs": runs, "wall_seconds": time.perf_counter() - started}
    print(f"wrote {write_result('efficiency', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
