"""``runtime.host_memory``: keep (ours, the default) against the C allocator's defaults (system), on
the CPU work that dominates a snapshot run: one evaluation of the synthesis objective (the double
backward of ``SingleEvaluator``) at the ablation sweep's decoded-sample counts, and one local SGD
step of FedAvg's training.

The setting is process-wide and cannot be undone, so every (case, setting) runs in a fresh
subprocess, one thread; the two settings alternate ``--repeat`` times and the fastest run of each
is reported (and its ratio, system / keep: > 1 means keeping pays). ``--ablate`` also times each of
keep's two mallopt calls alone on the largest case. Each process also checks that
the objective's value and gradient are bitwise the same under both settings (a digest of them is
compared across processes).

    .venv/bin/python benchmarks/bench_host_memory.py --ablate   # ~3 minutes on one core
    .venv/bin/python benchmarks/bench_host_memory.py --quick    # seconds, for a smoke check
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_info, table, write_result  # noqa: E402

SETTINGS = ("system", "keep")
#: ``keep``'s two mallopt calls one at a time (``--ablate``, on the largest case): is each needed?
PARTIAL = ("mmap threshold only", "trim threshold only")

#: name -> (what it is, grid, snapshots, resolution); grid "f4" = uniform factor 4, "ms8" = the
#: multi-scale layout with finest factor 8 (configs/sweeps/osfed_ablations.yaml's rows)
SYNTHESIS_CASES = {
    "demo f4-m1 (16 samples, 28 px)": ("f4", 1, 28),
    "sweep f4-m8 (128 samples, 32 px)": ("f4", 8, 32),
    "sweep ms8-m8 (320 samples, 32 px)": ("ms8", 8, 32),
}
TRAINING_CASE = "FedAvg local step (batch 32, 28 px)"


def measure(case: str, setting: str, inner: int) -> dict:
    """In this (fresh) process: apply ``setting``, warm up once, time ``inner`` repetitions."""
    import torch
    import torch.nn.functional as F

    from osfed_hpc.flat import FlatModel
    from osfed_hpc.host_memory import configure_host_memory
    from osfed_hpc.models import build_model
    from osfed_hpc.snapshot import MultiGrid, default_multiscale_leaves, exact_numerics
    from osfed_hpc.snapshot_search import Layout, SingleEvaluator, SynthesisConfig

    if setting in PARTIAL:
        from osfed_hpc import host_memory

        libc = host_memory._glibc()
        if libc is None:
            raise SystemExit("the partial settings need glibc")
        if setting == PARTIAL[0]:
            libc.mallopt(host_memory.M_MMAP_THRESHOLD, host_memory.MMAP_THRESHOLD)
        else:
            libc.mallopt(host_memory.M_TRIM_THRESHOLD, host_memory.TRIM_THRESHOLD)
        applied = setting
    else:
        applied = configure_host_memory(setting)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    if case == TRAINING_CASE:
        net = build_model("cnn", 1, 28, 10)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        images = torch.randn(32, 1, 28, 28, generator=generator)
        labels = torch.randint(0, 10, (32,), generator=generator)

        def step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(images), labels)
            loss.backward()
            optimizer.step()
            return loss.detach()
    else:
        grid_name, snapshots, size = SYNTHESIS_CASES[case]
        net = build_model("cnn", 1, size, 10)
        model = FlatModel(net)
        grid = MultiGrid(8, default_multiscale_leaves(8)) if grid_name == "ms8" else MultiGrid(4)
        samples = snapshots * grid.samples_per_snapshot
        layout = Layout((snapshots, 1, size, size), (samples, 10))
        target = torch.randn(model.param_numel, generator=generator)
        evaluate = SingleEvaluator(model, grid, layout, target, SynthesisConfig())
        point = torch.randn(layout.snapshot_numel + layout.labels_numel, generator=generator)

        def step() -> torch.Tensor:
            loss, gradient = evaluate(point)
            return torch.cat([torch.tensor([loss], dtype=gradient.dtype), gradient])
    with exact_numerics(net):
        first = step()  # warm-up; its digest is the bitwise check (the training step changes the model after)
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(inner):
            step()
        seconds, cpu_seconds = (time.perf_counter() - started) / inner, (time.process_time() - cpu) / inner
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "applied": applied,
            "digest": hashlib.sha256(first.numpy().tobytes()).hexdigest()}


def spawn(case: str, setting: str, inner: int) -> dict:
    command = [sys.executable, __file__, "--worker", case, "--setting", setting, "--inner", str(inner)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{setting} on {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke check)")
    parser.add_argument("--repeat", type=int, default=None, help="processes per setting (default 3; quick 1)")
    parser.add_argument("--inner", type=int, default=None, help="timed repetitions per process")
    parser.add_argument("--ablate", action="store_true",
                        help="also time each of keep's two mallopt settings alone on the largest case")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args.setting, args.inner)))
        return
    repeat = args.repeat or (1 if args.quick else 3)
    cases = [*SYNTHESIS_CASES, TRAINING_CASE]
    figures, rows = {}, []
    for case in cases:
        inner = args.inner or (2 if args.quick else 5 if "320" in case else 20 if "128" in case else 100)
        settings = SETTINGS + (PARTIAL if args.ablate and "320" in case else ())
        runs: dict[str, list[dict]] = {setting: [] for setting in settings}
        for _ in range(repeat):
            for setting in settings:
                runs[setting].append(spawn(case, setting, inner))
        best = {setting: min(r["seconds"] for r in runs[setting]) for setting in settings}
        best_cpu = {setting: min(r["cpu_seconds"] for r in runs[setting]) for setting in settings}
        digests = {r["digest"] for setting in settings for r in runs[setting]}
        figures[case] = {"seconds": best, "cpu_seconds": best_cpu, "system_over_keep": best["system"] / best["keep"],
                         "system_over_keep_cpu": best_cpu["system"] / best_cpu["keep"],
                         "bitwise_same": len(digests) == 1, "applied": runs["keep"][0]["applied"],
                         "all_seconds": {s: [r["seconds"] for r in runs[s]] for s in settings}}
        for setting in settings[1:]:  # each against system; the first row is keep's
            rows.append([case if setting == "keep" else f"  same, {setting}", best["system"] * 1e3,
                         best[setting] * 1e3, best["system"] / best[setting], best_cpu["system"] / best_cpu[setting],
                         ("yes" if len(digests) == 1 else "NO") if setting == "keep" else ""])
    print(table(["case", "system ms", "setting ms", "system/setting", "same, CPU s", "bitwise same"], rows))
    result = {"benchmark": "host_memory", "quick": args.quick, "repeat": repeat, "figures": figures,
              "machine": machine_info()}
    print(f"wrote {write_result('host_memory', result, args.out)}")
    if not all(f["bitwise_same"] for f in figures.values()):
        sys.exit("host_memory changed a result: the two settings must give bitwise the same numbers")


if __name__ == "__main__":
    main()
