"""Peak RSS of a worker rank hosting 1, 10 and 30 clients with per-client state, against model size x clients.

OS-Fed keeps an error-feedback residual per client: one float32 value per model parameter, on the
rank that hosts the client (``ClientStateStore``, in memory by default, ``runtime.client_state=disk``
for one ``.npz`` per client). So a worker's memory should grow by ~4 x parameters bytes per hosted
client and by nothing else. Two measurements, each case in a fresh process so peaks are its own:

* **state store** (always): a process builds the model (``cnn``: 28 px, 10 classes;
  ``resnet18_gn``: 224 px, 1000 classes), then does what OS-Fed's ``client_update`` does to the
  store for N clients over two rounds (``store.get``, a model-sized float32 residual produced by a
  torch op and kept as ``.numpy()``, a participation count, ``store.put``). Reported: RSS growth
  per client / (4 x parameters), for ``memory`` and ``disk`` stores.
* **real runs** (``mpirun -n 2``: rank 0 serves, rank 1 hosts all N clients; MNIST-5k split IID
  among N clients so the hosted data is the same 4,000 samples whatever N; 2 local steps): the
  worker's peak RSS is the largest ``client_stats.peak_memory_bytes`` of the run. Per-client cost
  = (peak(N) - peak(1)) / (N - 1). ``osfed`` with ``cnn`` always; in full mode also ``osfed`` with
  ``resnet18_gn`` and ``fedavg`` with ``resnet18_gn`` (no state at all, so any growth is something
  else the worker keeps per client).

    .venv/bin/python benchmarks/bench_memory.py            # everything (~7 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_memory.py --quick    # store cases + osfed/cnn runs with 1 and 30 clients

Never asserts; writes ``benchmarks/results/memory.json``.
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

from common import (  # first: sets OMP_NUM_THREADS, puts ROOT on sys.path
    MPIRUN,
    ROOT,
    dataset,
    machine_info,
    partition,
    table,
    write_result,
)

MODEL_SHAPES = {"cnn": (1, 28, 10), "resnet18_gn": (3, 224, 1000)}  # channels, side, classes
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# measurement 1: the state store, one fresh process per case


def rss() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def store_case(model_name: str, clients: int, storage: str, rounds: int = 2) -> dict:
    """Runs inside the child process: build the model, then fill the store like OS-Fed does."""
    import torch

    from osfed_hpc.algorithms.local_training import count_participation
    from osfed_hpc.client_state import ClientStateStore
    from osfed_hpc.flat import FlatModel
    from osfed_hpc.models import build_model

    torch.set_num_threads(1)
    c, side, classes = MODEL_SHAPES[model_name]
    model = FlatModel(build_model(model_name, c, side, classes, seed=0))
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="osfed-bench-state-") as tmp:
        store = ClientStateStore(Path(tmp) if storage == "disk" else None)
        # one warm-up residual (allocator and torch kernels initialised), then the baseline
        warm = torch.empty(model.param_numel).normal_(generator=generator).numpy()
        del warm
        base_current, base_peak = rss()
        for _ in range(rounds):
            for client in range(clients):
                state = store.get(client)
                # OS-Fed: e = tau - s g*, computed by torch, stored as .to("cpu", float32).numpy()
                tau = model.params_vector + torch.empty(model.param_numel).normal_(generator=generator)
                residual = (tau - 0.5 * model.params_vector).to("cpu", torch.float32).numpy()
                state["residual"] = residual
                count_participation(state)
                store.put(client, state)
                del state, tau, residual
        current, peak = rss()
        state_bytes = sum(store.nbytes(k) for k in store.clients())
        disk_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.npz")) if storage == "disk" else 0
    model_bytes = 4 * model.param_numel
    return {"model": model_name, "clients": clients, "storage": storage, "params": model.param_numel,
            "model_bytes": model_bytes, "baseline_rss": base_current, "rss_after": current, "peak_rss": peak,
            "rss_growth_per_client": (current - base_current) / clients,
            "peak_growth_per_client": (peak - base_peak) / clients,
            "state_bytes_per_client": state_bytes / clients, "disk_bytes_per_client": disk_bytes / clients,
            "growth_per_client_over_model_bytes": (current - base_current) / clients / model_bytes}


def run_store_case(model: str, clients: int, storage: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--store-case", f"{model},{clients},{storage}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# measurement 2: real runs


def real_run(algorithm: str, model: str, clients: int, data: Path, part: Path, out: Path, timeout: float) -> dict:
    extra = ["algorithm.outer_steps=1", "algorithm.lbfgs_max_iter=2", "algorithm.factor=2"] if algorithm == "osfed" else []
    command = [MPIRUN, "-n", "2", sys.executable, "-m", "osfed_hpc", "run", str(ROOT / "configs" / "mnist5k_fedavg.yaml"),
               f"data.path={data}", f"data.partition={part}", f"out={out}", "rounds=2", "runtime.threads=1",
               "runtime.device=cpu", "eval.every=1000", "train.local_steps=2", f"algorithm.name={algorithm}",
               f"model.name={model}", "name=bench-memory", *extra]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    peaks = [max(r["client_stats"]["peak_memory_bytes"]) for r in records]
    return {"algorithm": algorithm, "model": model, "clients": clients, "params": summary["model_params"],
            "model_bytes": 4 * summary["model_params"], "worker_peak_rss": max(peaks),
            "worker_peak_rss_per_round": peaks, "payload_bytes": records[-1]["client_stats"]["payload_bytes"][0],
            "launch_seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="store cases + osfed/cnn runs with 1 and 30 clients (~1 min)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench" / "mnist5k")
    parser.add_argument("--clients", default="1,10,30", help="hosted client counts")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mpirun")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--store-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.store_case:
        model, clients, storage = args.store_case.split(",")
        print(json.dumps(store_case(model, int(clients), storage)))
        return 0
    counts = [int(c) for c in args.clients.split(",")]
    info = machine_info(memory=True)
    started = time.perf_counter()

    store_specs = [(m, n, "memory") for m in MODEL_SHAPES for n in counts]
    store_specs += [("resnet18_gn", max(counts), "disk")] if args.quick else [(m, max(counts), "disk") for m in MODEL_SHAPES]
    store = []
    for model, n, storage in store_specs:
        print(f"  state store: {model}, {n} clients, {storage} ...", flush=True)
        store.append(run_store_case(model, n, storage))

    run_specs = [("osfed", "cnn")] + ([] if args.quick else [("osfed", "resnet18_gn"), ("fedavg", "resnet18_gn")])
    reader = dataset(args.data)
    runs = []
    with tempfile.TemporaryDirectory(prefix="osfed-bench-mem-") as tmp:
        run_counts = [min(counts), max(counts)] if args.quick else counts
        for algorithm, model in run_specs:
            for n in run_counts:
                part = partition(reader, args.data, n, "iid", 1.0)
                print(f"  mpirun -n 2: {algorithm}/{model}, worker hosting {n} clients ...", flush=True)
                runs.append(real_run(algorithm, model, n, args.data, part, Path(tmp) / f"{algorithm}-{model}-{n}",
                                     args.timeout))

    print(f"\nmemory per hosted client ({info['cpu']}, {info['cores']} cores)")
    rows = [[s["model"], s["params"], s["storage"], s["clients"], f"{s['baseline_rss'] / MiB:.0f}",
             f"{s['rss_after'] / MiB:.0f}", f"{s['peak_rss'] / MiB:.0f}", f"{s['rss_growth_per_client'] / MiB:.2f}",
             f"{s['state_bytes_per_client'] / MiB:.2f}", s["growth_per_client_over_model_bytes"]] for s in store]
    print(table(["model", "params", "store", "clients", "RSS before MiB", "RSS after MiB", "peak MiB",
                 "growth/client MiB", "state/client MiB", "growth / model bytes"], rows))
    print()
    run_rows, figures = [], {"store": {}, "runs": {}}
    for s in store:
        figures["store"][f"{s['model']}_{s['storage']}_{s['clients']}"] = s["growth_per_client_over_model_bytes"]
    for algorithm, model in run_specs:
        group = [r for r in runs if r["algorithm"] == algorithm and r["model"] == model]
        base = min(group, key=lambda r: r["clients"])
        for r in group:
            per = (r["worker_peak_rss"] - base["worker_peak_rss"]) / (r["clients"] - base["clients"]) \
                if r["clients"] > base["clients"] else None
            r["peak_growth_per_extra_client"] = per
            r["growth_over_model_bytes"] = None if per is None else per / r["model_bytes"]
            run_rows.append([f"{algorithm}/{model}", r["params"], r["clients"], f"{r['worker_peak_rss'] / MiB:.0f}",
                             f"{r['model_bytes'] * r['clients'] / MiB:.0f}",
                             "-" if per is None else f"{per / MiB:.2f}",
                             "-" if per is None else r["growth_over_model_bytes"],
                             f"{r['payload_bytes'] / MiB:.3f}"])
            if per is not None:
                figures["runs"][f"{algorithm}_{model}_{r['clients']}"] = r["growth_over_model_bytes"]
    print(table(["run (mpirun -n 2)", "params", "clients", "worker peak MiB", "model x clients MiB",
                 "growth/extra client MiB", "growth / model bytes", "payload MiB"], run_rows))
    result = {"benchmark": "memory", "quick": args.quick, "machine": info, "figures": figures,
              "store_cases": store, "real_runs": runs, "wall_seconds": time.perf_counter() - started,
              "note": "growth / model bytes = memory added per hosted client divided by 4 x parameters "
                      "(1.0 = exactly one float32 model copy per client)"}
    print(f"wrote {write_result('memory', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
