"""Snapshot synthesis: ``osfed_hpc.snapshot_search.synthesize`` against a 3SFC-style reference
loop, with and without the early stop, and the batched search of several clients against one at a time.

The reference does what the 3SFC code does each iteration: deep-copy the model once, take the
parameter gradient with ``autograd.grad(create_graph=True)``, then ``loss.backward()``, which also
computes second-order gradients into every model parameter, and re-evaluate the full closure
(double backward included) after each LBFGS step. Ours differentiates w.r.t. (S, Y) only, does not
copy the model, takes the cosine from per-tensor dot products (no concatenated g) and re-evaluates
with a first-order pass. Both start from the same (S, Y), run the same LBFGS settings and must reach
the same cosine. ``ours+stop`` is the same search with ``stop_tolerance`` (``--stop-tolerance``).
``sequential`` runs ``synthesize`` for ``--clients`` different targets one after the other,
``batched`` runs ``synthesize_batch`` on the same targets and starts; both report seconds per client.
The whole-search ResNet-18-GN case also reports the cosine of ``--cos-targets`` targets (untimed) and
judges equal cosine on their mean: one target's cosine depends on the search's path.

Every (case, variant) runs in a fresh subprocess, so the peak memory (CPU: ``ru_maxrss`` growth
over the process's state before synthesis; CUDA: ``max_memory_allocated`` growth) belongs to that
variant alone. In each process a warm-up (one LBFGS step of one evaluation) precedes ``--inner`` timed
runs; processes of the two variants alternate ``--repeat`` times; the fastest run is reported (wall
clock and process CPU time, which is the steadier figure on a shared machine).

    .venv/bin/python benchmarks/bench_synthesis.py            # cnn 28 px (3SFC settings), resnet18_gn 224 px
                                                              # (3 evaluations) and 32 px (3SFC settings)
    .venv/bin/python benchmarks/bench_synthesis.py --quick    # seconds, for a smoke check
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from osfed_hpc.flat import FlatModel  # noqa: E402
from osfed_hpc.models import build_model  # noqa: E402
from osfed_hpc.snapshot import MultiGrid, cosine, exact_numerics  # noqa: E402
from osfed_hpc.snapshot_search import SynthesisConfig, synthesize, synthesize_batch  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "synthesis.json"
VARIANTS = ("ours", "ours+stop", "reference", "sequential", "batched")
COS_TOLERANCE = 0.02


@dataclass
class Case:
    name: str
    model: str
    channels: int
    size: int
    classes: int
    factor: int
    outer_steps: int
    max_iter: int
    target_batch: int = 32
    seed: int = 0
    clients: int = 5
    stop_tolerance: float = 1e-3
    #: False: only ours / ours+stop / reference (the batched comparison is left to the other cases)
    batch: bool = True
    #: targets whose achieved cosine ours / ours+stop / reference also report (untimed, after the timed runs
    #: on target 0): one target's cosine depends on the search's path, their mean does not
    cos_targets: int = 1


def cases(args: argparse.Namespace) -> list[Case]:
    small_outer = 2 if args.quick else args.small_outer_steps
    large_size = 64 if args.quick else args.large_size
    cos_targets = args.cos_targets or (1 if args.quick else 3)
    return [
        Case("cnn-28px-f2", "cnn", 1, 28, 10, 2, small_outer, args.small_max_iter, clients=args.clients,
             stop_tolerance=args.stop_tolerance),
        Case("cnn-28px-f4", "cnn", 1, 28, 10, 4, small_outer, args.small_max_iter, clients=args.clients,
             stop_tolerance=args.stop_tolerance),
        Case(f"resnet18_gn-{large_size}px-f2", "resnet18_gn", 3, large_size, 10, 2, 1, args.large_evals,
             target_batch=4, clients=args.clients, stop_tolerance=args.stop_tolerance),
        # the whole 3SFC search on ResNet-18-GN, at a resolution where 10 x 20 evaluations fit a CPU benchmark:
        # the 224-px case above runs 3 evaluations, too few for the early stop to act
        Case(f"resnet18_gn-{args.full_size}px-f2-full", "resnet18_gn", 3, args.full_size, 10, 2, small_outer,
             args.small_max_iter, target_batch=4, clients=max(args.clients, cos_targets),
             stop_tolerance=args.stop_tolerance, batch=False, cos_targets=cos_targets),
    ]


# --------------------------------------------------------------------------------------------
# the reference: how the 3SFC code synthesises (deep copy, create_graph, .backward(), closure re-eval)


def reference_synthesize(net: torch.nn.Module, target: torch.Tensor, shape, labels_shape, grid: MultiGrid,
                         case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    started = time.perf_counter()
    net = copy.deepcopy(net)
    x = torch.randn(shape, generator=generator, device=generator.device).to(target.device).requires_grad_()
    y = torch.randn(labels_shape, generator=generator, device=generator.device).to(target.device).requires_grad_()
    optimizer = torch.optim.LBFGS([x, y], lr=1.0, max_iter=case.max_iter, history_size=100)
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = F.cross_entropy(net(grid(x)), y)
        grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True, allow_unused=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        objective = 1.0 - cosine(flat, target).abs()
        objective.backward()
        return objective

    best, best_x, best_y = float("inf"), x.detach().clone(), y.detach().clone()
    with exact_numerics(net):
        for _ in range(case.outer_steps):
            optimizer.step(closure)
            value = float(closure().detach())
            if 0 <= value < best:
                best, best_x, best_y = value, x.detach().clone(), y.detach().clone()
    return best_x, best_y, {"cos": 1.0 - best, "iterations": evaluations, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------
# one variant in one process


def make_targets(case: Case, device: torch.device) -> torch.Tensor:
    """[clients, P]: -lr * gradient of a random labelled batch per client, shaped like real local updates."""
    net = build_model(case.model, case.channels, case.size, case.classes, seed=case.seed).to(device)
    targets = []
    for client in range(case.clients):
        gen = torch.Generator().manual_seed(case.seed + 1 + client)
        x = torch.randn(case.target_batch, case.channels, case.size, case.size, generator=gen).to(device)
        y = torch.randint(0, case.classes, (case.target_batch,), generator=gen).to(device)
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
        targets.append(-0.05 * torch.cat([g.reshape(-1) for g in grads]).detach())
    return torch.stack(targets)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, case: Case, target_path: str, device: torch.device, inner: int) -> dict:
    targets = torch.load(target_path).to(device)
    target = targets[0]
    net = build_model(case.model, case.channels, case.size, case.classes, seed=case.seed).to(device)
    model = FlatModel(net)
    grid = MultiGrid(case.factor)
    shape = (1, case.channels, case.size, case.size)
    labels_shape = (grid.samples_per_snapshot, case.classes)

    def run(outer_steps: int, max_iter: int, target: torch.Tensor = target) -> tuple[torch.Tensor, torch.Tensor, dict]:
        generator = torch.Generator().manual_seed(1234)
        tolerance = case.stop_tolerance if variant == "ours+stop" else 0.0
        config = SynthesisConfig(outer_steps=outer_steps, lbfgs_max_iter=max_iter, stop_tolerance=tolerance)
        if variant in ("ours", "ours+stop"):
            return synthesize(model, target, shape[1:], 1, grid, case.classes, config, generator)
        if variant in ("sequential", "batched"):
            generators = [torch.Generator().manual_seed(1234 + c) for c in range(len(targets))]
            if variant == "batched":
                found = synthesize_batch(model, list(targets), shape[1:], 1, grid, case.classes, config, generators)
            else:
                found = [synthesize(model, t, shape[1:], 1, grid, case.classes, config, g)
                         for t, g in zip(targets, generators)]
            info = {"cos": sum(f[2]["cos"] for f in found) / len(found),
                    "iterations": sum(f[2]["iterations"] for f in found) / len(found),
                    "seconds": sum(f[2]["seconds"] for f in found) / len(found)}  # per client
            return found[0][0], found[0][1], info
        short = Case(**{**asdict(case), "outer_steps": outer_steps, "max_iter": max_iter})
        return reference_synthesize(net, target, shape, labels_shape, grid, short, generator)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_bytes(device)
    run(1, 1)  # warm-up: lazy initialisation, allocator and thread pools
    wall, cpu = [], []
    per = case.clients if variant in ("sequential", "batched") else 1
    for _ in range(inner):  # the same computation each time; the fastest is the least disturbed
        started = time.process_time()
        _, _, info = run(case.outer_steps, case.max_iter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu.append((time.process_time() - started) / per)
        wall.append(info["seconds"])
    per_target = [info] + [run(case.outer_steps, case.max_iter, t)[2] for t in targets[1:case.cos_targets]]
    return {"seconds": min(wall), "cpu_seconds": min(cpu), "cos": info["cos"],
            "cos_per_target": [i["cos"] for i in per_target],
            "evaluations_per_target": [round(float(i["iterations"]), 1) for i in per_target],
            "evaluations": round(float(info["iterations"]), 1), "peak_mib": (_peak_bytes(device) - base) / 2**20}


# --------------------------------------------------------------------------------------------
# driver


def spawn(variant: str, case: Case, target_path: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--case", json.dumps(asdict(case)),
               "--target", target_path, "--device", args.device, "--threads", str(args.threads),
               "--inner", str(args.inner)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{variant} on {case.name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Fastest wall and CPU time over the runs (CPU time is more robust on a busy machine)."""
    return {**runs[0], "seconds": min(r["seconds"] for r in runs), "cpu_seconds": min(r["cpu_seconds"] for r in runs),
            "peak_mib": max(r["peak_mib"] for r in runs), "all_seconds": [r["seconds"] for r in runs],
            "all_cpu_seconds": [r["cpu_seconds"] for r in runs]}


def benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args):
            target_path = os.path.join(tmp, f"{case.name}.pt")
            torch.save(make_targets(case, device).cpu(), target_path)
            variants = VARIANTS if case.batch else VARIANTS[:3]
            runs: dict[str, list[dict]] = {name: [] for name in variants}
            for _ in range(args.repeat):  # interleaved, so all variants see the same machine load
                for variant in runs:
                    runs[variant].append(spawn(variant, case, target_path, args))
            done = {name: summarize(r) for name, r in runs.items()}
            ours, reference, stop = done["ours"], done["reference"], done["ours+stop"]
            for variant in (ours, reference, stop):  # equal cosine is judged on the mean over the targets
                variant["mean_cos"] = sum(variant["cos_per_target"]) / len(variant["cos_per_target"])
            result = {
                "case": asdict(case), "name": case.name, **done,
                "speedup": reference["seconds"] / ours["seconds"],
                "speedup_cpu_time": reference["cpu_seconds"] / ours["cpu_seconds"],
                "cos_difference": abs(ours["mean_cos"] - reference["mean_cos"]),
                "same_cos": abs(ours["mean_cos"] - reference["mean_cos"]) <= COS_TOLERANCE,
                "stop_speedup": reference["seconds"] / stop["seconds"],
                "stop_speedup_cpu_time": reference["cpu_seconds"] / stop["cpu_seconds"],
                "stop_same_cos": abs(stop["mean_cos"] - reference["mean_cos"]) <= COS_TOLERANCE,
            }
            if case.batch:
                sequential, batched = done["sequential"], done["batched"]
                result.update({
                    "batch_speedup": sequential["seconds"] / batched["seconds"],
                    "batch_speedup_cpu_time": sequential["cpu_seconds"] / batched["cpu_seconds"],
                    "batch_same_cos": abs(batched["cos"] - sequential["cos"]) <= COS_TOLERANCE,
                })
            results.append(result)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device, "threads": args.threads, "repeat": args.repeat, "inner": args.inner,
        "quick": args.quick,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "cos_tolerance": COS_TOLERANCE,
        "cases": results,
    }


def print_table(report: dict) -> None:
    header = (f"{'case':<30}{'variant':<12}{'evals':>8}{'s/client':>10}{'cpu s':>9}{'cos':>8}{'peak MiB':>10}"
              f"{'speed-up (wall, cpu)':>26}")
    print(header)
    print("-" * len(header))
    for r in report["cases"]:
        against = {"ours": ("reference", "speedup"), "ours+stop": ("reference", "stop_speedup"),
                   "batched": ("sequential", "batch_speedup")}
        for variant in VARIANTS:
            if variant not in r:
                continue
            v = r[variant]
            ratio = ""
            if variant in against:
                base, key = against[variant]
                ratio = f"{r[key]:.2f}x, {r[key + '_cpu_time']:.2f}x vs {base}"
            print(f"{r['name']:<30}{variant:<12}{v['evaluations']:>8}{v['seconds']:>10.3f}{v['cpu_seconds']:>9.3f}"
                  f"{v['cos']:>8.4f}{v['peak_mib']:>10.1f}  {ratio}")
            if len(v.get("cos_per_target", [])) > 1:
                print(f"{'':<42}targets: cos {' / '.join(f'{c:.4f}' for c in v['cos_per_target'])} "
                      f"(mean {v['mean_cos']:.4f}), evaluations {' / '.join(map(str, v['evaluations_per_target']))}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 outer steps at 28 px; the large case at 64 px")
    parser.add_argument("--small-outer-steps", type=int, default=10, help="LBFGS outer steps, cnn case (3SFC: 10)")
    parser.add_argument("--small-max-iter", type=int, default=20, help="LBFGS max_iter, cnn case (3SFC: 20)")
    parser.add_argument("--large-size", type=int, default=224, help="resolution of the resnet18_gn case")
    parser.add_argument("--full-size", type=int, default=32,
                        help="resolution of the resnet18_gn case that runs the whole LBFGS search")
    parser.add_argument("--cos-targets", type=int, default=None,
                        help="targets whose mean cosine the whole-search resnet18_gn case compares (default 3; quick 1)")
    parser.add_argument("--large-evals", type=int, default=3,
                        help="LBFGS max_iter (= closure evaluations) of the single outer step, resnet18_gn case")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest is reported")
    parser.add_argument("--inner", type=int, default=3, help="timed runs inside each process (after a warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--clients", type=int, default=5, help="clients of the sequential/batched comparison")
    parser.add_argument("--stop-tolerance", type=float, default=1e-3, help="stop_tolerance of the ours+stop variant")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        result = run_variant(args.worker, Case(**json.loads(args.case)), args.target, torch.device(args.device),
                             args.inner)
        print(json.dumps(result))
        return
    report = benchmark(args)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
