"""Run every benchmark and print one summary table (``make bench`` = ``run_all.py --quick``).

Each benchmark runs as its own process (several start ``mpirun``), one after the other, so they do
not compete for the cores. Their own tables are printed as they finish; the summary at the end
reads the JSON each one wrote.

    .venv/bin/python benchmarks/run_all.py --quick        # a few minutes on 2 cores; writes to a temp dir
    .venv/bin/python benchmarks/run_all.py                # full versions (tens of minutes)
    .venv/bin/python benchmarks/run_all.py --save         # results into benchmarks/results/ (the recorded figures)
    .venv/bin/python benchmarks/run_all.py --quick --only exchange,memory

Without ``--save`` results go to a temporary directory, so a smoke run never overwrites the recorded
full-mode figures in ``benchmarks/results/``. Never asserts timings: the exit status is non-zero
only when a benchmark fails to run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"

#: name -> (script, result file stem); loader and synthesis belong to other owners, run if present
BENCHMARKS = {
    "client_overhead": ("bench_client_overhead.py", "client_overhead"),
    "runner_bound": ("bench_runner_bound.py", "runner_bound"),
    "efficiency": ("bench_efficiency.py", "efficiency"),
    "exchange": ("bench_exchange.py", "exchange"),
    "memory": ("bench_memory.py", "memory"),
    "loader": ("bench_loader.py", "loader"),
    "synthesis": ("bench_synthesis.py", "synthesis"),
    "host_memory": ("bench_host_memory.py", "host_memory"),
}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _get(data, *path, default=None):
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return default
    return data


def summarise(name: str, data: dict) -> list[tuple[str, str, str]]:
    """(figure, value, aim or note) rows for one benchmark's JSON; tolerant of missing keys."""
    rows: list[tuple[str, str, str]] = []
    if name == "client_overhead":
        f = data.get("figures", {})
        rows.append(("client update in runner / bare loop (CPU s)", _fmt(f.get("ratio_client_update_vs_bare_cpu")),
                     f"aim <= {f.get('aim', 1.05)}"))
        rows.append(("  same, wall s (interleaved / real runs)",
                     f"{_fmt(f.get('ratio_client_update_vs_bare_wall'))} / "
                     f"{_fmt(f.get('ratio_real_run_client_seconds_vs_bare_wall'))}", "noisy when loaded"))
    elif name == "runner_bound":
        f = data.get("figures", {})
        for side in ("dealt", "fixed"):
            rows.append((f"mpirun -n 3 runner ({side} clients) / compute bound",
                         _fmt(_get(f, side, "fraction_of_bound")),
                         f"aim >= {f.get('aim', 0.95)}" if side == "dealt" else "fixed split, for comparison"))
    elif name == "efficiency":
        for case, f in data.get("figures", {}).items():
            rows.append((f"efficiency {case}: longest-first / round-robin*",
                         f"{_fmt(f.get('efficiency_lpt'))} / {_fmt(f.get('efficiency_round_robin_rebinned'))}",
                         "client s / (workers x round s)"))
            rows.append((f"  busy wait / polite polling, {case}: round s, job CPU s",
                         f"{_fmt(f.get('busy_over_polite_round_seconds'))}, "
                         f"{_fmt(f.get('busy_over_polite_job_cpu_seconds'))}", "> 1: polling pays"))
    elif name == "exchange":
        figures = data.get("figures", {})
        for case, f in figures.items():
            bare = "Gatherv" if case.startswith("snapshots") else "Send+Recv"
            transport = f.get("ratio_world_gatherv_only_vs_bare", f.get("ratio_transfer_only_vs_bare"))
            rows.append((f"{case.replace('_', ' ')}: runner / raw MPI {bare}", _fmt(f.get("ratio_runner_vs_bare")),
                         f"aim <= {data.get('aim', 1.2)}; World transport alone {_fmt(transport)}"))
        checks = data.get("checks", {})
        if checks:
            rows.append(("exchange checks: gathered bytes == pack(), FedAvg model bits == bare",
                         "ok" if all(checks.values()) else "FAILED",
                         ", ".join(k for k, v in checks.items() if not v) or f"{len(checks)} checks"))
    elif name == "memory":
        figures = data.get("figures", {})
        for key, value in figures.get("store", {}).items():
            if key.endswith("_30") or "disk" in key:
                rows.append((f"state store {key}: growth per client / model bytes", _fmt(value), "1.0 = one model"))
        for key, value in figures.get("runs", {}).items():
            if key.endswith("_30"):
                rows.append((f"run {key}: worker peak growth per client / model bytes", _fmt(value), "mpirun -n 2"))
    elif name == "synthesis":
        for case in data.get("cases", []):
            rows.append((f"synthesis {case.get('name', '?')}: ours vs 3SFC loop (CPU s speed-up)",
                         _fmt(case.get("speedup_cpu_time"), 2), f"same cos: {case.get('same_cos')}"))
            if "stop_speedup_cpu_time" in case:
                rows.append((f"synthesis {case.get('name', '?')}: ours+stop vs 3SFC loop (CPU s speed-up)",
                             _fmt(case.get("stop_speedup_cpu_time"), 2), f"same cos: {case.get('stop_same_cos')}"))
            if "batch_speedup_cpu_time" in case:
                rows.append((f"synthesis {case.get('name', '?')}: batched vs sequential clients (CPU s speed-up)",
                             _fmt(case.get("batch_speedup_cpu_time"), 2), f"same cos: {case.get('batch_same_cos')}"))
    elif name == "host_memory":
        for case, f in data.get("figures", {}).items():
            rows.append((f"host memory {case}: system / keep (wall s)", _fmt(f.get("system_over_keep"), 2),
                         f"> 1: keeping pays; bitwise same: {f.get('bitwise_same')}"))
    elif name == "loader":
        for case in data.get("raw_in_memory", []):
            rows.append((f"loader {case.get('case', '?')}: ours / plain", _fmt(case.get("ratio_ours_over_plain")), ""))
        jpeg = data.get("jpeg")
        if not isinstance(jpeg, dict):  # older JSON: {"jpeg_224": {"rows": [...]}}
            jpeg = {"224": _get(data, "jpeg_224", "rows", default=[]) or []}
        for res, cases in jpeg.items():
            if res == "setup" or not isinstance(cases, list):
                continue
            ratios = {}
            for case in cases:
                name_ = str(case.get("case", ""))
                if name_.startswith("ours, 1 process"):
                    kind = "RandomResizedCrop" if "RandomResizedCrop" in name_ else "center crop" if "center crop" in name_ else None
                    if kind:
                        ratios[kind] = case.get("ratio_vs_plain_decode_resize_cpu")
            if ratios:
                rows.append((f"loader JPEG {res} px, ours 1 process: RandomResizedCrop / center crop",
                             f"{_fmt(ratios.get('RandomResizedCrop'), 2)} / {_fmt(ratios.get('center crop'), 2)}",
                             "x plain decode+resize loop (CPU time, > 1 = faster)"))
    return rows or [("(no figures recognised)", "-", "see its JSON")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick version of every benchmark")
    parser.add_argument("--save", action="store_true", help="write results to benchmarks/results/ (default: temp dir)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = parser.parse_args()
    chosen = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    out_dir = (HERE / "results") if args.save else Path(tempfile.mkdtemp(prefix="osfed-bench-all-"))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    status: dict[str, tuple[str, float, Path | None]] = {}
    started = time.perf_counter()
    for name in chosen:
        script, stem = BENCHMARKS[name]
        path = HERE / script
        if not path.exists():
            status[name] = ("absent", 0.0, None)
            continue
        out = out_dir / f"{stem}.json"
        command = [sys.executable, str(path), *(["--quick"] if args.quick else []), "--out", str(out)]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
        seconds = time.perf_counter() - t0
        status[name] = ("ok" if code == 0 and out.exists() else f"failed ({code})", seconds, out if out.exists() else None)

    print(f"\n=== summary ({'quick' if args.quick else 'full'}; results in {out_dir}; "
          f"{time.perf_counter() - started:.0f} s)")
    rows = []
    for name in chosen:
        state, seconds, out = status[name]
        if out is None:
            rows.append((name, state, f"{seconds:.0f} s", "", ""))
            continue
        try:
            data = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            rows.append((name, f"unreadable JSON: {exc}", f"{seconds:.0f} s", "", ""))
            continue
        for i, (figure, value, note) in enumerate(summarise(name, data)):
            rows.append((name if i == 0 else "", state if i == 0 else "", f"{seconds:.0f} s" if i == 0 else "",
                         figure, f"{value}  {note}".rstrip()))
    headers = ("benchmark", "status", "time", "figure", "value")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    failed = [n for n, (s, _, _) in status.items() if s.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
