"""Client work inside the runner vs a bare PyTorch loop: what does the runner add per client?

The same client updates (model ``cnn``, MNIST-5k, Dirichlet(0.5) over 10 clients, batch 32, one
local epoch, SGD lr 0.05 momentum 0.9, the same per-(seed, round, client) batch order) are run

* **runner**: ``Runner(config, World(size 1), run_dir).run()`` in this process, per-client seconds
  read back from ``metrics.jsonl`` (``client_stats.seconds``: ClientContext + ``client_update``)
  and the round's ``local_work`` phase (also model restore, client state, payload pack);
* **bare**: a plain loop over one float tensor per client: ``randperm`` batches, ``x[idx]``,
  forward, backward, ``SGD.step``; nothing else.

Runs alternate (runner, bare, bare, runner, ...) and the figure is a ratio of medians, so a machine
that other jobs slow down slows both sides alike. A second, finer measurement replays the runner's
per-client path piece by piece (restore, state, ``client_update``, pack; and the package's
``local_sgd`` loop alone), interleaved client by client with the bare loop, to say where any
overhead goes. It also checks that the runner and the bare loop compute the same update.

    .venv/bin/python benchmarks/bench_client_overhead.py            # full
    .venv/bin/python benchmarks/bench_client_overhead.py --quick    # 20-55 s depending on load

Never asserts a timing; writes ``benchmarks/results/client_overhead.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (  # first: sets OMP_NUM_THREADS, puts ROOT on sys.path
    ROOT,
    dataset,
    machine_info,
    partition,
    table,
    write_result,
)

AIM = 1.05


# ---------------------------------------------------------------------------------------------
# the bare loop


class BareClient:
    """One client's samples as a normalised float tensor in client-index order (what the runner's
    ``InMemoryClient`` rows point at), and a plain SGD loop over them.

    ``layout="nchw"``: default contiguous strides, as the package's loader stores them.
    ``layout="nhwc"``: channels-last strides, which is what ``from_numpy(nhwc).permute(0, 3, 1, 2)``
    gives by accident; the CPU convolutions then take their channels-last path (see the README).
    """

    def __init__(self, reader, indices: np.ndarray, layout: str = "nchw") -> None:
        raw = torch.from_numpy(reader.read_raw("train", indices)).permute(0, 3, 1, 2).float()
        mean = torch.tensor(reader.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(reader.std, dtype=torch.float32).view(-1, 1, 1)
        # the loader's arithmetic (x * 1/(255 std) - mean/std), so both sides see bit-equal inputs
        images = raw * (1.0 / (255.0 * std)) + (-mean / std)
        n, c, h, w = images.shape
        strides = (c * h * w, h * w, w, 1) if layout == "nchw" else (c * h * w, 1, w * c, c)
        self.images = torch.empty_strided(images.shape, strides).copy_(images)
        self.labels = torch.from_numpy(reader.labels("train")[indices]).long()
        self.n = len(indices)


def bare_update(net: torch.nn.Module, client: BareClient, generator: torch.Generator, batch_size: int,
                epochs: int, lr: float, momentum: float) -> float:
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    loss = torch.zeros(())
    for _ in range(epochs):
        perm = torch.randperm(client.n, generator=generator)
        for start in range(0, client.n, batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(net(client.images[idx]), client.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return float(loss.detach())


def restore(params: list[torch.Tensor], start: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)


# ---------------------------------------------------------------------------------------------
# measurement 1: whole runner runs vs bare passes


def runner_config(data_dir: Path, part: Path, out: Path, rounds: int, seed: int):
    from osfed_hpc.config import load_config

    return load_config(ROOT / "configs" / "mnist5k_fedavg.yaml", [
        f"data.path={data_dir}", f"data.partition={part}", f"out={out}", f"rounds={rounds}", f"seed={seed}",
        "runtime.threads=1", "runtime.device=cpu", "eval.every=1000", "name=bench-client-overhead",
    ])


def run_runner(data_dir: Path, part: Path, work: Path, rounds: int, seed: int, tag: str) -> dict:
    from osfed_hpc.comm import World
    from osfed_hpc.runner import Runner

    out = work / tag
    config = runner_config(data_dir, part, out, rounds, seed)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            Runner(config, World(comm=None, rank=0, size=1), out).run()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = [{"clients": r["clients"], "client_seconds": r["client_stats"]["seconds"],
                  "local_work": r["seconds"]["local_work"]} for r in records]
    return {"client_seconds": sum(sum(r["client_seconds"]) for r in per_round),
            "local_work": sum(r["local_work"] for r in per_round), "rounds": per_round}


def run_bare_pass(net, params, start, clients: dict[int, BareClient], rounds: int, seed: int, train) -> dict:
    from osfed_hpc.rng import torch_stream

    client_seconds = total = 0.0
    for round_ in range(1, rounds + 1):
        for cid, client in clients.items():
            t0 = time.perf_counter()
            restore(params, start)
            t1 = time.perf_counter()
            generator = torch_stream(seed, "client", round_, cid)
            bare_update(net, client, generator, train.batch_size, train.local_epochs, train.lr, train.momentum)
            t2 = time.perf_counter()
            client_seconds += t2 - t1
            total += t2 - t0
    return {"client_seconds": client_seconds, "local_work": total}


# ---------------------------------------------------------------------------------------------
# measurement 2: the runner's per-client path, piece by piece, client by client


class RunnerPath:
    """The body of ``Runner._work`` for one client, on the package's own objects."""

    def __init__(self, reader, part, seed: int, train) -> None:
        from osfed_hpc.algorithms import Environment, get_algorithm
        from osfed_hpc.client_state import ClientStateStore
        from osfed_hpc.data import build_train_data
        from osfed_hpc.devices import make_deterministic
        from osfed_hpc.flat import FlatModel
        from osfed_hpc.models import build_model

        make_deterministic()
        self.seed, self.train = seed, train
        c, h = reader.channels, reader.image_shape[1]
        self.model = FlatModel(build_model("cnn", c, h, reader.num_classes, seed=seed))
        self.global_vector = self.model.vector.clone()
        cls = get_algorithm("fedavg")
        env = Environment(model=self.model, train=train, num_classes=reader.num_classes, input_shape=(c, h, h),
                          device=torch.device("cpu"), seed=seed)
        self.algorithm = cls(cls.Options(), env)
        self.store = ClientStateStore(None)
        clients = list(range(part.num_clients))
        union = np.unique(np.concatenate([part.client_indices(k) for k in clients]))
        data = build_train_data(reader, union, torch.device("cpu"), h, 0)
        self.data = {k: data.client(part.client_indices(k)) for k in clients}

    def full(self, cid: int, round_: int) -> tuple[dict, np.ndarray]:
        """Restore W_t, get state, client_update, put state, pack: as ``Runner._work`` does."""
        from osfed_hpc.algorithms import ClientContext
        from osfed_hpc.rng import torch_stream

        c0 = time.process_time()
        t0 = time.perf_counter()
        self.model.load_(self.global_vector)
        t1 = time.perf_counter()
        state = self.store.get(cid)
        ctx = ClientContext(client_id=cid, round=round_, data=self.data[cid], state=state,
                            generator=torch_stream(self.seed, "client", round_, cid), seed=self.seed)
        t2 = time.perf_counter()
        c2 = time.process_time()
        result = self.algorithm.client_update(ctx)
        t3 = time.perf_counter()
        c3 = time.process_time()
        self.store.put(cid, state)
        data = result.payload.pack()
        t4 = time.perf_counter()
        c4 = time.process_time()
        return ({"restore": t1 - t0, "context": t2 - t1, "client_update": t3 - t2, "state_and_pack": t4 - t3,
                 "total": t4 - t0, "cpu_client_update": c3 - c2, "cpu_total": c4 - c0,
                 "payload_bytes": len(data)}, result.payload.arrays["update"])

    def loop_only(self, cid: int, round_: int) -> tuple[float, float]:
        """The package's training loop alone (``local_sgd`` on a ``ClientData``): (wall, cpu)."""
        from osfed_hpc.algorithms.local_training import local_sgd
        from osfed_hpc.rng import torch_stream

        self.model.load_(self.global_vector)
        generator = torch_stream(self.seed, "client", round_, cid)
        c0, t0 = time.process_time(), time.perf_counter()
        local_sgd(self.model, self.data[cid], self.train, generator, self.train.lr)
        return time.perf_counter() - t0, time.process_time() - c0


def component_benchmark(reader, part, seed: int, train, reps: int) -> dict:
    from osfed_hpc.models import build_model
    from osfed_hpc.rng import torch_stream

    path = RunnerPath(reader, part, seed, train)
    net = build_model("cnn", reader.channels, reader.image_shape[1], reader.num_classes, seed=seed)
    params = list(net.parameters())
    start = [p.detach().clone() for p in params]
    bare = {k: BareClient(reader, part.client_indices(k)) for k in range(part.num_clients)}
    bare_nhwc = {k: BareClient(reader, part.client_indices(k), "nhwc") for k in range(part.num_clients)}

    def run_bare(cid: int, round_: int, clients: dict | None = None) -> tuple[float, float, float]:
        """(wall, cpu, restore wall): restore excluded from the first two, like the runner's seconds."""
        t0 = time.perf_counter()
        restore(params, start)
        t1 = time.perf_counter()
        c1 = time.process_time()
        bare_update(net, (clients or bare)[cid], torch_stream(seed, "client", round_, cid), train.batch_size,
                    train.local_epochs, train.lr, train.momentum)
        return time.perf_counter() - t1, time.process_time() - c1, t1 - t0

    def run_bare_nondet(cid: int, round_: int) -> tuple[float, float, float]:
        torch.use_deterministic_algorithms(False)
        try:
            return run_bare(cid, round_)
        finally:
            torch.use_deterministic_algorithms(True, warn_only=True)

    # warm-up and the equality check: same start, same batches -> the same update
    max_diff = 0.0
    for cid in bare:
        _, update = path.full(cid, 1)
        run_bare(cid, 1)
        bare_update_vec = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(params, start)]).numpy()
        max_diff = max(max_diff, float(np.abs(bare_update_vec - update[: bare_update_vec.size]).max()))

    variants = ["runner_path", "local_sgd", "bare", "bare_nhwc", "bare_nondeterministic"]
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    parts = {k: [] for k in ("restore", "context", "client_update", "state_and_pack", "bare_restore")}
    for rep in range(reps):
        round_ = rep + 2
        acc_w = {v: 0.0 for v in variants}
        acc_c = {v: 0.0 for v in variants}
        acc_parts = {k: 0.0 for k in parts}
        for i, cid in enumerate(bare):
            shift = (rep + i) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                if variant == "runner_path":
                    times, _ = path.full(cid, round_)
                    acc_w[variant] += times["context"] + times["client_update"]  # = client_stats.seconds
                    acc_c[variant] += times["cpu_client_update"]
                    for k in ("restore", "context", "client_update", "state_and_pack"):
                        acc_parts[k] += times[k]
                elif variant == "local_sgd":
                    w, c = path.loop_only(cid, round_)
                    acc_w[variant] += w
                    acc_c[variant] += c
                elif variant == "bare_nhwc":
                    w, c, _ = run_bare(cid, round_, bare_nhwc)
                    acc_w[variant] += w
                    acc_c[variant] += c
                else:
                    w, c, r = (run_bare if variant == "bare" else run_bare_nondet)(cid, round_)
                    acc_w[variant] += w
                    acc_c[variant] += c
                    if variant == "bare":
                        acc_parts["bare_restore"] += r
        for v in variants:
            wall[v].append(acc_w[v])
            cpu[v].append(acc_c[v])
        for k in parts:
            parts[k].append(acc_parts[k])
    med_w = {v: statistics.median(s) for v, s in wall.items()}
    med_c = {v: statistics.median(s) for v, s in cpu.items()}
    med_parts = {k: statistics.median(s) for k, s in parts.items()}
    pair_w = [a / b for a, b in zip(wall["runner_path"], wall["bare"])]
    return {
        "reps": reps, "clients": part.num_clients,
        "wall_seconds_per_pass_median": med_w, "wall_seconds_per_pass_all": wall,
        "cpu_seconds_per_pass_median": med_c, "cpu_seconds_per_pass_all": cpu,
        "breakdown_wall_seconds_per_pass_median": med_parts,
        "ratio_client_update_vs_bare_wall": med_w["runner_path"] / med_w["bare"],
        "ratio_client_update_vs_bare_wall_pairwise_median": statistics.median(pair_w),
        "ratio_client_update_vs_bare_cpu": med_c["runner_path"] / med_c["bare"],
        "ratio_whole_client_path_vs_bare_with_restore_wall": (
            sum(med_parts[k] for k in ("restore", "context", "client_update", "state_and_pack"))
            / (med_w["bare"] + med_parts["bare_restore"])),
        "ratio_local_sgd_vs_bare_cpu": med_c["local_sgd"] / med_c["bare"],
        "ratio_local_sgd_vs_bare_wall": med_w["local_sgd"] / med_w["bare"],
        "ratio_bare_deterministic_vs_not_cpu": med_c["bare"] / med_c["bare_nondeterministic"],
        "ratio_bare_nchw_vs_nhwc_cpu": med_c["bare"] / med_c["bare_nhwc"],
        "max_abs_update_difference_runner_vs_bare": max_diff,
    }


def whole_run_benchmark(data_dir: Path, part_file: Path, seed: int, rounds: int, reps: int, train, reader,
                        part) -> dict:
    from osfed_hpc.models import build_model

    net = build_model("cnn", reader.channels, reader.image_shape[1], reader.num_classes, seed=seed)
    params = list(net.parameters())
    start = [p.detach().clone() for p in params]
    clients = {k: BareClient(reader, part.client_indices(k)) for k in range(part.num_clients)}
    runner, bare = [], []
    with tempfile.TemporaryDirectory(prefix="osfed-bench-") as tmp:
        work = Path(tmp)
        run_bare_pass(net, params, start, clients, 1, seed, train)  # warm-up
        for rep in range(reps):
            order = ("runner", "bare") if rep % 2 == 0 else ("bare", "runner")
            for which in order:
                if which == "runner":
                    runner.append(run_runner(data_dir, part_file, work, rounds, seed, f"rep{rep}"))
                else:
                    bare.append(run_bare_pass(net, params, start, clients, rounds, seed, train))
    r_cs = statistics.median(r["client_seconds"] for r in runner)
    b_cs = statistics.median(b["client_seconds"] for b in bare)
    r_lw = statistics.median(r["local_work"] for r in runner)
    b_lw = statistics.median(b["local_work"] for b in bare)
    return {
        "reps": reps, "rounds": rounds, "clients": part.num_clients,
        "runner_client_seconds_per_run": [r["client_seconds"] for r in runner],
        "bare_client_seconds_per_run": [b["client_seconds"] for b in bare],
        "runner_local_work_per_run": [r["local_work"] for r in runner],
        "bare_local_work_per_run": [b["local_work"] for b in bare],
        "ratio_client_seconds": r_cs / b_cs,
        "ratio_local_work": r_lw / b_lw,
        "runner_rounds_first_run": runner[0]["rounds"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~40 s on an idle 2-core machine)")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "bench" / "mnist5k")
    parser.add_argument("--reps", type=int, default=None,
                        help="runner/bare run pairs and interleaved passes (default 2 quick, 6 full)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per runner run (default 1 quick, 3 full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps = args.reps or (2 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 3)

    from osfed_hpc.config import TrainConfig
    from osfed_hpc.data import load_partition

    reader = dataset(args.data)
    part_file = partition(reader, args.data, 10, "dirichlet", 0.5)
    part = load_partition(part_file, reader)
    train = TrainConfig(local_epochs=1, batch_size=32, lr=0.05, momentum=0.9)  # = configs/mnist5k_fedavg.yaml
    info = machine_info(torch_threads=True)
    started = time.perf_counter()
    whole = whole_run_benchmark(args.data, part_file, args.seed, rounds, reps, train, reader, part)
    comp = component_benchmark(reader, part, args.seed, train, reps=reps)
    b = comp["breakdown_wall_seconds_per_pass_median"]
    w = comp["wall_seconds_per_pass_median"]
    c = comp["cpu_seconds_per_pass_median"]
    pairs = [x / y for x, y in zip(whole["runner_client_seconds_per_run"], whole["bare_client_seconds_per_run"])]
    rows = [
        ["per client, CPU s: client_update / bare", comp["ratio_client_update_vs_bare_cpu"],
         f"{reps} passes x {part.num_clients} clients, interleaved"],
        ["per client, wall s: client_update / bare", comp["ratio_client_update_vs_bare_wall"], "same passes"],
        ["per client, wall s: _work body / bare+restore", comp["ratio_whole_client_path_vs_bare_with_restore_wall"],
         "restore + state + pack in"],
        ["per client, CPU s: package local_sgd / bare", comp["ratio_local_sgd_vs_bare_cpu"], "the training loop alone"],
        ["bare, CPU s: deterministic algos on / off", comp["ratio_bare_deterministic_vs_not_cpu"], "make_deterministic()"],
        ["bare, CPU s: NCHW input strides / NHWC strides", comp["ratio_bare_nchw_vs_nhwc_cpu"],
         "layout, not runner overhead"],
        ["real runs, wall s: client_stats.seconds / bare", whole["ratio_client_seconds"],
         f"median of {reps} runs x {rounds} rounds (pairs {min(pairs):.3f}..{max(pairs):.3f})"],
        ["real runs, wall s: local_work phase / bare+restore", whole["ratio_local_work"], "whole _work per round"],
    ]
    print(f"client overhead, cnn on MNIST-5k, {part.num_clients} clients, Dirichlet 0.5, 1 thread "
          f"({info['cpu']}, {info['cores']} cores, load {' '.join(info.get('loadavg_start', []))})")
    print(table(["ratio", "value", "note"], rows))
    print()
    print(table(["seconds per pass over the clients (median)", "wall", "CPU"], [
        ["bare loop (NCHW, as the loader)", w["bare"], c["bare"]],
        ["bare loop (NHWC strides)", w["bare_nhwc"], c["bare_nhwc"]],
        ["package local_sgd", w["local_sgd"], c["local_sgd"]],
        ["runner: ClientContext + client_update", w["runner_path"], c["runner_path"]],
        ["runner: model restore (load_)", b["restore"], "-"],
        ["runner: state put + payload pack", b["state_and_pack"], "-"], ["bare: restore", b["bare_restore"], "-"],
    ]))
    print(f"max |update(runner) - update(bare)| = {comp['max_abs_update_difference_runner_vs_bare']:.3g} "
          f"(same start, same batches; float rounding only)")
    primary = comp["ratio_client_update_vs_bare_cpu"]
    verdict = "within" if primary <= AIM else "ABOVE"
    print(f"aim <= {AIM}: {verdict} (per-client CPU-time ratio {primary:.3f}; wall-time ratios move with the "
          f"machine's load)")
    result = {
        "benchmark": "client_overhead", "quick": args.quick, "machine": info,
        "setup": {"model": "cnn", "data": "mnist5k", "partition": "dirichlet alpha 0.5, 10 clients",
                  "train": vars(train), "threads": 1, "seed": args.seed},
        "figures": {"ratio_client_update_vs_bare_cpu": primary,
                    "ratio_client_update_vs_bare_wall": comp["ratio_client_update_vs_bare_wall"],
                    "ratio_whole_client_path_vs_bare_wall": comp["ratio_whole_client_path_vs_bare_with_restore_wall"],
                    "ratio_local_sgd_vs_bare_cpu": comp["ratio_local_sgd_vs_bare_cpu"],
                    "ratio_bare_deterministic_vs_not_cpu": comp["ratio_bare_deterministic_vs_not_cpu"],
                    "ratio_bare_nchw_vs_nhwc_cpu": comp["ratio_bare_nchw_vs_nhwc_cpu"],
                    "ratio_real_run_client_seconds_vs_bare_wall": whole["ratio_client_seconds"],
                    "ratio_real_run_local_work_vs_bare_wall": whole["ratio_local_work"],
                    "max_abs_update_difference": comp["max_abs_update_difference_runner_vs_bare"],
                    "aim": AIM, "within_aim": primary <= AIM},
        "whole_runs": whole, "per_client": comp,
        "wall_seconds": time.perf_counter() - started,
    }
    print(f"wrote {write_result('client_overhead', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
