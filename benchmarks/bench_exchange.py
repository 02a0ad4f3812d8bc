"""Payload exchange through the runner's path vs raw MPI of the same bytes, under ``mpirun -n 3``.

Two exchange paths of the runner, each against the bare mpi4py call that moves the same bytes:

* **snapshots** (OS-Fed-like, gathered): each worker hands one ``Payload`` object per client
  (``snapshot`` float32[1,3,R,R], ``labels`` float32[16,1000], ``scale`` float32[1]) to the
  runner's own ``exchange.GatherExchange`` (kept across rounds with its reused frame buffer):
  each payload is ``pack_into``'d straight into the frame,
  which goes to rank 0 through ``World.gatherv_bytes`` (``Igather`` of the counts + ``Igatherv``
  with polite waits); rank 0 then ``Payload.unpack``s every client in client-id order. Bare: one
  blocking ``Gatherv`` of the already-packed bytes into a preallocated buffer, counts known
  beforehand.
* **FedAvg** (ResNet-18-sized, streamed): each worker sends one update (float32[11,699,112]) per
  client with the runner's ``exchange.StreamExchange.send`` (packed into one of two reused buffers,
  at most two in flight) and flushes at the end; rank 0 takes them in client-id order from
  ``StreamExchange.receive`` (``World.recv_bytes(..., into=<reused buffer>)``), ``Payload.unpack`` and
  ``FedAvg.server_accumulate`` (the real fold, into the real ``FlatModel`` of ``resnet18``), then
  ``server_finish``, as ``Runner._aggregate`` does. Bare: blocking ``Send``/``Recv`` of the same
  packed bytes into one reused buffer, folded with one ``add_``; and, as a second reference,
  ``Reduce`` of the float32 updates (two clients per call), folded the same way.

Checks (not timings), recorded under ``checks``: the bytes rank 0 gets from the gather exchange
equal ``Payload.pack()`` of every client, and the runner path's folded FedAvg model equals the
bare path's bit for bit.

The runner path also runs with ``OSFED_BLOCKING_WAIT`` semantics (plain ``Wait()``) to show what
the polite polling costs the exchange itself. 60 clients (30 per worker) by default; variants
alternate within each repetition and the figure is median(runner) / median(bare), timed on rank 0
from a barrier to the last payload unpacked (folded).

    .venv/bin/python benchmarks/bench_exchange.py            # re-launches itself: mpirun -n 3
    .venv/bin/python benchmarks/bench_exchange.py --quick    # FedAvg with 10 clients, fewer repetitions
    .venv/bin/mpirun -n 3 .venv/bin/python benchmarks/bench_exchange.py

Never asserts a timing; writes ``benchmarks/results/exchange.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import MPIRUN, machine_info, table, write_result  # first: sets OMP_NUM_THREADS, puts ROOT on sys.path

AIM = 1.2
TAG = 11  # the runner's payload tag
UNDER_MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "OSFED_BENCH_UNDER_MPI")


# ---------------------------------------------------------------------------------------------
# the cases


class Blocking:
    """Switch the package's waits to plain ``Wait()`` (what ``OSFED_BLOCKING_WAIT=1`` does at import)."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        from osfed_hpc import comm

        self.saved = comm._BLOCKING_WAIT
        comm._BLOCKING_WAIT = self.on

    def __exit__(self, *exc):
        from osfed_hpc import comm

        comm._BLOCKING_WAIT = self.saved


def snapshot_payload(client: int, snapshot: np.ndarray, labels: np.ndarray, scale: np.ndarray):
    from osfed_hpc.payload import Payload

    meta = {"algorithm": "osfed", "round": 1, "client": client, "factor": 4, "num_snapshots": 1,
            "multigrid": "uniform", "codec": "none", "mode": "eval"}
    return Payload(meta=meta, arrays={"snapshot": snapshot, "labels": labels, "scale": scale})


def snapshot_arrays(rank: int, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A worker's snapshot arrays (the same for all its clients); rank 0 regenerates them to check bytes."""
    rng = np.random.default_rng(rank)
    return (rng.standard_normal((1, 3, resolution, resolution), dtype=np.float32),
            rng.standard_normal((16, 1000), dtype=np.float32), np.array([0.5], dtype=np.float32))


class SnapshotCase:
    """Gathered payloads: the runner's ``exchange.GatherExchange`` (Payload objects packed straight
    into its reused frame, then ``World.gatherv_bytes``) vs one bare ``Gatherv``."""

    def __init__(self, world, comm, clients: int, resolution: int) -> None:
        from osfed_hpc.comm import assign_clients, owner_map
        from osfed_hpc.exchange import GatherExchange

        self.world, self.comm, self.clients, self.resolution = world, comm, clients, resolution
        self.name = f"snapshots {resolution}px"
        self.owner = owner_map(assign_clients(np.full(clients, 100), world.worker_ranks))
        self.mine = sorted(c for c, r in self.owner.items() if r == world.rank)
        self.exchange = GatherExchange(world)  # kept across rounds, as the runner keeps it
        self.snapshot, self.labels, self.scale = snapshot_arrays(world.rank, resolution)
        # the bare side: the same packed bytes, concatenated once, counts known in advance
        packed = [p.pack() for p in self.payloads().values()]
        self.payload_bytes = len(packed[0]) if packed else 0
        self.frame = np.frombuffer(b"".join(packed), dtype=np.uint8) if packed else np.zeros(0, np.uint8)
        sizes = comm.gather(self.frame.size, root=0)
        if world.is_server:
            self.counts = np.asarray(sizes, dtype=np.int64)
            self.displs = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            self.received = np.empty(int(self.counts.sum()), dtype=np.uint8)
        self.payload_bytes = comm.allreduce(self.payload_bytes, op=_mpi().MAX)

    def payloads(self) -> dict:
        """What a worker's ``_work`` hands to the exchange: one Payload object per client."""
        return {c: snapshot_payload(c, self.snapshot, self.labels, self.scale) for c in self.mine}

    def gather(self, payloads: dict) -> dict | None:
        """A worker: ``send`` each payload, then ``end_of_work`` (the Gatherv), as ``Runner._work``
        does. Rank 0: ``receive`` (its Gatherv and the frame parsing), as ``Runner._aggregate`` does."""
        if self.world.is_server:
            return dict(self.exchange.receive(list(range(self.clients))))
        for client, payload in payloads.items():
            self.exchange.send(client, payload)
        self.exchange.end_of_work()
        return None

    def check(self) -> dict:
        """One runner gather: every client arrives, with exactly the bytes ``Payload.pack()`` gives."""
        got = self.gather({} if self.world.is_server else self.payloads())
        if not self.world.is_server:
            return {}
        arrays = {r: snapshot_arrays(r, self.resolution) for r in set(self.owner.values())}
        same = sorted(got) == list(range(self.clients)) and all(
            bytes(got[c]) == snapshot_payload(c, *arrays[self.owner[c]]).pack() for c in range(self.clients))
        return {f"gathered_bytes_equal_pack_{self.resolution}px": bool(same)}

    def variants(self) -> list[str]:
        return ["runner", "runner_busy_wait", "world_gatherv_only", "bare_gatherv"]

    def run(self, variant: str) -> dict:
        from osfed_hpc.payload import Payload

        if variant == "bare_gatherv":
            t0 = time.perf_counter()
            if self.world.is_server:
                self.comm.Gatherv(self.frame, [self.received, self.counts, self.displs, _mpi().BYTE], root=0)
            else:
                self.comm.Gatherv(self.frame, None, root=0)
            return {"exchange": time.perf_counter() - t0}
        if variant == "world_gatherv_only":  # the transport alone: no pack, no framing, no unpack
            t0 = time.perf_counter()
            self.world.gatherv_bytes(self.frame)
            return {"exchange": time.perf_counter() - t0}
        with Blocking(variant.endswith("busy_wait")):
            if self.world.is_server:
                t0 = time.perf_counter()
                got = self.gather({})
                t1 = time.perf_counter()
                for client in range(self.clients):
                    payload = Payload.unpack(got[client])
                    if payload.meta["client"] != client:
                        raise RuntimeError(f"client {client}: payload says {payload.meta['client']}")
                return {"exchange": t1 - t0, "unpack": time.perf_counter() - t1}
            t0 = time.perf_counter()
            self.gather(self.payloads())  # pack into the frame + gatherv, as one call (as in Runner._work)
            return {"exchange": time.perf_counter() - t0}


class FedAvgCase:
    """Streamed payloads: ``StreamExchange.send`` per client + ``end_of_round`` on the workers;
    ``World.recv_bytes(into=...)`` + ``Payload.unpack`` + ``FedAvg.server_accumulate`` /
    ``server_finish`` on rank 0 (as ``Runner._aggregate``), vs bare ``Send``/``Recv`` + ``add_``."""

    def __init__(self, world, comm, clients: int) -> None:
        import torch

        from osfed_hpc.comm import assign_clients, owner_map
        from osfed_hpc.exchange import StreamExchange
        from osfed_hpc.payload import Payload

        self.world, self.comm, self.clients = world, comm, clients
        self.name = "FedAvg resnet18"
        self.owner = owner_map(assign_clients(np.full(clients, 100), world.worker_ranks))
        self.mine = sorted(c for c, r in self.owner.items() if r == world.rank)
        numel = None
        if world.is_server:
            from osfed_hpc.algorithms import Environment, get_algorithm
            from osfed_hpc.config import TrainConfig
            from osfed_hpc.flat import FlatModel
            from osfed_hpc.models import build_model

            model = FlatModel(build_model("resnet18", 3, 224, 1000, seed=0))
            numel = model.numel
            cls = get_algorithm("fedavg")
            env = Environment(model=model, train=TrainConfig(), num_classes=1000, input_shape=(3, 224, 224),
                              device=torch.device("cpu"), seed=0)
            self.algorithm = cls(cls.Options(weighting="uniform"), env)
            self.model = model
        self.numel = comm.bcast(numel, root=0)
        rng = np.random.default_rng(world.rank)
        self.update = (rng.standard_normal(self.numel, dtype=np.float32) * 1e-3) if world.is_worker else None
        example = Payload(meta={"algorithm": "fedavg", "round": 1, "client": 0},
                          arrays={"update": np.zeros(self.numel, np.float32)}).pack()
        self.payload_bytes = len(example)
        self.array_offset = len(example) - 4 * self.numel
        self.result: dict[str, object] = {}
        self.exchange = StreamExchange(world, self.owner)  # the runner keeps one for its lifetime
        if world.is_worker:
            self.packed = self.payload(0).pack()
        else:
            self.recv_buffer = np.empty(self.payload_bytes, dtype=np.uint8)
            self.transfer_buffer = None
            self.reduce_buffer = np.empty(self.numel, dtype=np.float32)
            self.zeros = np.zeros(self.numel, dtype=np.float32)
            self.sum = torch.zeros(self.numel, dtype=torch.float32)

    def payload(self, client: int):
        from osfed_hpc.payload import Payload

        return Payload(meta={"algorithm": "fedavg", "round": 1, "client": client}, arrays={"update": self.update})

    def check(self) -> dict:
        """The runner path's folded model equals the bare path's, bit for bit."""
        import torch

        for variant in ("runner", "bare_send_recv"):
            self.comm.Barrier()
            self.run(variant)
        if not self.world.is_server:
            return {}
        return {"fedavg_model_bits_equal_bare": bool(torch.equal(self.result["runner"], self.result["bare_send_recv"]))}

    def variants(self) -> list[str]:
        return ["runner", "runner_busy_wait", "transfer_only", "bare_send_recv", "bare_reduce"]

    def run(self, variant: str) -> dict:
        import torch

        from osfed_hpc.payload import Payload

        world, comm = self.world, self.comm
        if variant == "bare_send_recv":
            if world.is_server:
                recv = fold = 0.0
                self.sum.zero_()
                view = torch.from_numpy(self.recv_buffer[self.array_offset:].view(np.float32))
                for client in range(self.clients):
                    t0 = time.perf_counter()
                    comm.Recv(self.recv_buffer, source=self.owner[client], tag=TAG)
                    t1 = time.perf_counter()
                    self.sum.add_(view)
                    fold += time.perf_counter() - t1
                    recv += t1 - t0
                t0 = time.perf_counter()
                self.result[variant] = self.model.vector + self.sum / self.clients  # as WeightedMean.mean
                return {"exchange": recv, "fold": fold + time.perf_counter() - t0}
            for _ in self.mine:
                comm.Send(self.packed, dest=0, tag=TAG)
            return {}
        if variant == "bare_reduce":
            calls = -(-self.clients // len(world.worker_ranks))  # each call folds one client per worker
            if world.is_server:
                recv = fold = 0.0
                self.sum.zero_()
                view = torch.from_numpy(self.reduce_buffer)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    comm.Reduce(self.zeros, self.reduce_buffer, op=_mpi().SUM, root=0)
                    t1 = time.perf_counter()
                    self.sum.add_(view)
                    fold += time.perf_counter() - t1
                    recv += t1 - t0
                t0 = time.perf_counter()
                _ = self.model.vector + self.sum * (1.0 / self.clients)
                return {"exchange": recv, "fold": fold + time.perf_counter() - t0}
            for _ in range(calls):
                comm.Reduce(self.update, None, op=_mpi().SUM, root=0)
            return {}
        if variant == "transfer_only":  # the World transport alone: prepacked bytes, no pack/unpack/fold
            if world.is_server:
                t0 = time.perf_counter()
                for client in range(self.clients):
                    self.transfer_buffer = world.recv_bytes(self.owner[client], TAG, into=self.transfer_buffer)
                return {"exchange": time.perf_counter() - t0}
            t0 = time.perf_counter()
            world.wait_all([r for _ in self.mine for r in world.isend_bytes(self.packed, dest=0, tag=TAG)[1:]])
            return {"wait": time.perf_counter() - t0}
        with Blocking(variant.endswith("busy_wait")):
            if world.is_server:  # Runner._aggregate with the stream exchange
                recv = fold = 0.0
                algorithm = self.algorithm
                algorithm.server_begin(1)
                received = self.exchange.receive(list(range(self.clients)))
                for client in range(self.clients):
                    t0 = time.perf_counter()
                    _, data = next(received)
                    t1 = time.perf_counter()
                    payload = Payload.unpack(data)
                    if payload.meta.get("client") != client or payload.meta.get("round") != 1:
                        raise RuntimeError(f"client {client}: payload says {payload.meta}")
                    algorithm.server_accumulate(client, payload, 1.0)
                    fold += time.perf_counter() - t1
                    recv += t1 - t0
                t0 = time.perf_counter()
                self.result[variant] = algorithm.server_finish()
                return {"exchange": recv, "fold": fold + time.perf_counter() - t0}
            send = 0.0  # Runner._work: exchange.send per client in id order; end_of_round flushes
            for client in self.mine:
                t0 = time.perf_counter()
                self.exchange.send(client, self.payload(client))
                send += time.perf_counter() - t0
            t0 = time.perf_counter()
            self.exchange.end_of_round()
            return {"send": send, "wait": time.perf_counter() - t0}

def _mpi():
    from mpi4py import MPI

    return MPI


# ---------------------------------------------------------------------------------------------


def measure(case, reps: int, comm, rank: int) -> dict:
    variants = case.variants()
    times = {v: [] for v in variants}
    parts = {v: [] for v in variants}
    worker_parts = {v: [] for v in variants}
    for variant in variants:  # warm-up
        comm.Barrier()
        case.run(variant)
    for rep in range(reps):
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            comm.Barrier()
            t0 = time.perf_counter()
            detail = case.run(variant)
            elapsed = time.perf_counter() - t0
            gathered = comm.gather(detail, root=0)
            if rank == 0:
                times[variant].append(elapsed)
                parts[variant].append(detail)
                worker_parts[variant].append(gathered[1:])
    if rank != 0:
        return {}
    med = {v: statistics.median(t) for v, t in times.items()}

    def part_median(variant: str, key: str, workers: bool = False) -> float | None:
        source = worker_parts[variant] if workers else [[p] for p in parts[variant]]
        values = [max(d.get(key, 0.0) for d in rep) for rep in source if any(key in d for d in rep)]
        return statistics.median(values) if values else None

    breakdown = {v: {k: part_median(v, k) for k in ("exchange", "unpack", "fold")} for v in variants}
    for v in variants:
        breakdown[v].update({f"worker_{k}": part_median(v, k, True) for k in ("send", "wait", "exchange")})
    return {"case": case.name, "clients": case.clients, "payload_bytes": case.payload_bytes,
            "bytes_per_exchange": case.payload_bytes * case.clients, "reps": reps,
            "seconds_median": med, "seconds_all": times, "breakdown_median": breakdown}


def under_mpi(args) -> int:
    from mpi4py import MPI

    from osfed_hpc.comm import World, install_abort_hook

    comm = MPI.COMM_WORLD
    world = World.from_mpi(comm)
    install_abort_hook(world)  # an exception on one rank ends the job instead of leaving the others waiting
    rank = world.rank
    if world.size < 2:
        print("bench_exchange needs at least 2 ranks", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    info = machine_info(mpi="library") if rank == 0 else None
    checks: dict = {}
    started = time.perf_counter()
    fedavg_clients = args.fedavg_clients or (10 if args.quick else 60)
    reps = args.reps or (3 if args.quick else 5)
    snapshot_reps = args.snapshot_reps or (15 if args.quick else 40)
    results = []
    for resolution in (224, 448):
        case = SnapshotCase(world, comm, args.clients, resolution)
        if rank == 0:
            print(f"  {case.name}: {args.clients} clients x {case.payload_bytes / 2**20:.2f} MiB ...", flush=True)
        checks.update(case.check())
        results.append(measure(case, snapshot_reps, comm, rank))
        del case
    case = FedAvgCase(world, comm, fedavg_clients)
    if rank == 0:
        print(f"  {case.name}: {fedavg_clients} clients x {case.payload_bytes / 2**20:.1f} MiB ...", flush=True)
    checks.update(case.check())
    results.append(measure(case, reps, comm, rank))
    del case
    if rank != 0:
        return 0
    rows, figures = [], {}
    for r in results:
        med = r["seconds_median"]
        bare = "bare_gatherv" if "bare_gatherv" in med else "bare_send_recv"
        ratio = med["runner"] / med[bare]
        key = r["case"].replace(" ", "_")
        figures[key] = {"ratio_runner_vs_bare": ratio,
                        **{f"ratio_{v}_vs_bare": med[v] / med[bare] for v in med if v not in ("runner", bare)},
                        "runner_seconds": med["runner"], "bare_seconds": med[bare],
                        "runner_GBps": r["bytes_per_exchange"] / med["runner"] / 1e9,
                        "bare_GBps": r["bytes_per_exchange"] / med[bare] / 1e9}
        rows.append([r["case"], r["clients"], f"{r['bytes_per_exchange'] / 2**20:.0f} MiB", med["runner"], med[bare],
                     ratio, f"{figures[key]['runner_GBps']:.2f} / {figures[key]['bare_GBps']:.2f}"])
    print(f"\nexchange vs raw MPI, mpirun -n {world.size}, median of {snapshot_reps} (snapshots) / {reps} (FedAvg) "
          f"repetitions ({info['cpu']}, {info['cores']} cores, "
          f"load {' '.join(info.get('loadavg_start', []))})")
    print(table(["case", "clients", "bytes", "runner s", "bare s", "runner/bare", "GB/s runner / bare"], rows))
    print()
    brows = []
    for r in results:
        med = r["seconds_median"]
        bare = "bare_gatherv" if "bare_gatherv" in med else "bare_send_recv"
        for v, b in r["breakdown_median"].items():
            brows.append([r["case"], v, med[v], med[v] / med[bare]] + [("-" if b.get(k) is None else b[k]) for k in
                                                                     ("worker_send", "worker_exchange", "exchange", "unpack", "fold")])
    print(table(["case", "variant", "s", "/ bare", "worker send s", "worker gather s", "rank-0 wait/recv s", "rank-0 unpack s",
                 "rank-0 fold s"], brows))
    worst = max(f["ratio_runner_vs_bare"] for f in figures.values())
    print(f"aim <= {AIM}: {'within' if worst <= AIM else 'ABOVE'} (worst runner/bare {worst:.3f})")
    print("checks: " + ", ".join(f"{k} {v}" for k, v in checks.items()))
    result = {"benchmark": "exchange", "quick": args.quick, "machine": info, "np": world.size, "checks": checks,
              "figures": figures, "aim": AIM, "within_aim": worst <= AIM, "cases": results,
              "wall_seconds": time.perf_counter() - started}
    print(f"wrote {write_result('exchange', result, args.out)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="FedAvg with 10 clients, fewer repetitions")
    parser.add_argument("--np", type=int, default=3, help="ranks when re-launching under mpirun")
    parser.add_argument("--clients", type=int, default=60, help="snapshot clients (all workers together)")
    parser.add_argument("--fedavg-clients", type=int, default=None, help="FedAvg clients (default 10 quick, 60 full)")
    parser.add_argument("--reps", type=int, default=None, help="FedAvg repetitions (default 3 quick, 5 full)")
    parser.add_argument("--snapshot-reps", type=int, default=None,
                        help="snapshot repetitions (default 15 quick, 40 full)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if any(os.environ.get(k) for k in UNDER_MPI_ENV):
        return under_mpi(args)
    env = dict(os.environ, OSFED_BENCH_UNDER_MPI="1", OMP_NUM_THREADS="1")
    command = [MPIRUN, "-n", str(args.np), sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
