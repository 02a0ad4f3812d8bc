"""The OS-Fed demo bars, measured: FedAvg, OS-Fed and 3SFC on MNIST-5k, one run each, same seed.

Runs ``configs/mnist5k_{fedavg,osfed,sfc3}.yaml`` under ``mpirun -n 3`` (or ``--np``), then reports
final accuracy, uplink bytes per client per round, the uplink ratio to FedAvg, the accuracy gap to
FedAvg in points, and whether the issue's bars hold (OS-Fed >= 92 % in 30 rounds with >= 80x less
uplink than FedAvg; multi-grid ahead of 3SFC at about equal bytes). Nothing is asserted: the figures
go to a table and ``benchmarks/results/osfed_demo.json``.

    .venv/bin/python benchmarks/bench_osfed_demo.py            # 30 rounds each (several minutes)
    .venv/bin/python benchmarks/bench_osfed_demo.py --quick    # 5 rounds each
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from osfed_hpc.report import compare, load_summary  # noqa: E402

METHODS = ("fedavg", "osfed", "sfc3")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of the configs' 30")
    parser.add_argument("--np", type=int, default=3)
    parser.add_argument("--data", default=str(ROOT / "data" / "mnist5k"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "osfed_demo.json"))
    args = parser.parse_args()
    mpirun = str(Path(sys.executable).with_name("mpirun"))
    workdir = Path(tempfile.mkdtemp(prefix="osfed-demo-"))
    summaries, seconds = [], {}
    for method in METHODS:
        run = workdir / method
        command = [mpirun, "-n", str(args.np), sys.executable, "-m", "osfed_hpc", "run",
                   str(ROOT / "configs" / f"mnist5k_{method}.yaml"), f"out={run}", f"data.path={args.data}"]
        if args.quick:
            command.append("rounds=5")
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds[method] = time.perf_counter() - start
        summaries.append(load_summary(run))
    rows = {row["algorithm"]: row for row in compare(summaries)}
    osfed, sfc3 = rows["osfed"], rows["sfc3"]
    figures = {
        method: {key: rows[method].get(key) for key in
                 ("final_accuracy", "uplink_bytes_per_client_round", "uplink_bytes", "uplink_ratio_vs_fedavg",
                  "gap_to_fedavg_points", "rounds")} | {"job_seconds": seconds[method]}
        for method in METHODS
    }
    bars = {
        "osfed_accuracy_at_least_0.92": (osfed["final_accuracy"] or 0) >= 0.92,
        "osfed_uplink_ratio_at_least_80": (osfed["uplink_ratio_vs_fedavg"] or 0) >= 80,
        "osfed_beats_sfc3_points": 100 * ((osfed["final_accuracy"] or 0) - (sfc3["final_accuracy"] or 0)),
        "osfed_over_sfc3_bytes": osfed["uplink_bytes_per_client_round"] / sfc3["uplink_bytes_per_client_round"],
    }
    print(f"{'method':8} {'acc %':>7} {'B/client/round':>15} {'ratio':>8} {'gap pts':>8} {'job s':>7}")
    for method in METHODS:
        f = figures[method]
        ratio = f["uplink_ratio_vs_fedavg"]
        gap = f["gap_to_fedavg_points"]
        print(f"{method:8} {100 * f['final_accuracy']:7.2f} {f['uplink_bytes_per_client_round']:15,.0f} "
              f"{'-' if ratio is None else f'{ratio:7.1f}x':>8} {'-' if gap is None else f'{gap:8.2f}':>8} "
              f"{f['job_seconds']:7.1f}")
    print(json.dumps(bars))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "figures": figures, "bars": bars, "quick": args.quick, "np": args.np,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cores": len(__import__("os").sched_getaffinity(0))},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
