"""``osfed-hpc``: prepare | partition | verify | run (and the cluster commands).

A thin layer: parse arguments, call the package, turn bad input into one clear line and exit 2.
mpi4py is imported only by ``run``, so data preparation works on a login node without MPI.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

USER_ERROR_EXIT = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import UserError

    return (UserError,)



def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare_dataset

    path = prepare_dataset(args.source, args.out, root=args.root, test_fraction=args.test_fraction, seed=args.seed,
                           max_side=args.max_side, quality=args.quality, shard_size=args.shard_size,
                           workers=args.workers, progress=not args.quiet)
    print(f"prepared {args.source} in {path}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from .data import DatasetReader, Partition, make_partition
    from .data.partition import check_partition_args

    check_partition_args(args.clients, args.scheme, args.alpha, args.min_samples)  # before opening any file
    reader = DatasetReader(args.data)
    partition = make_partition(reader, args.clients, args.scheme, alpha=args.alpha, seed=args.seed,
                               min_samples=args.min_samples, allow_small=args.allow_small)
    path = Path(args.out) if args.out else Partition.default_path(args.data, args.scheme, args.clients,
                                                                   args.alpha, args.seed)
    partition.save(path)
    print(partition.summary_table(reader))
    print(f"wrote {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from .data import verify_dataset

    report = verify_dataset(args.data, sample=args.sample)
    print(json.dumps(report, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import run_report

    return run_report(args.runs, args.out, target=args.target, include_snapshots=args.include_snapshots)


def _split_run_args(items: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise SystemExit(f"osfed-hpc run: more than one config file given ({config!r}, {item!r})")
    return config, overrides


def requeue_if_slurm() -> None:
    """Ask SLURM to requeue this job (the array task, for arrays); argument list, no shell."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    print(f"[osfed-hpc] scontrol requeue {job}: exit {result.returncode} {result.stderr.strip()}", flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from .checkpoint import latest_checkpoint
    from .comm import World, install_abort_hook
    from .config import load_config
    from .errors import AgreedStop
    from .runner import Runner, resolve_run_dir

    config_path, overrides = _split_run_args(args.items)
    resume = args.resume is not None
    if resume:
        if config_path is None:
            config_path = str(Path(args.resume) / "config.yaml")
        overrides.append(f"out={args.resume}")
    if args.dry_run:  # no MPI: mpi4py is never imported on this path
        from .plan import dry_run

        return dry_run(config_path, overrides, ranks=args.ranks, runs_dir=args.runs_dir, resume_dir=args.resume)
    config = load_config(config_path, overrides)
    world = World.from_mpi()
    install_abort_hook(world)
    # rank 0 names the run directory (a timestamp when out is null) and every rank uses that one
    run_dir = Path(world.bcast_text(str(resolve_run_dir(config, resume)) if world.is_server else ""))
    if not resume and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and latest_checkpoint(run_dir):
        resume = True  # SLURM requeued us: continue where the previous allocation stopped
    config.out = str(run_dir)
    try:
        status = Runner(config, world, run_dir, resume=resume).run()
    except AgreedStop:
        raise  # every rank raised it together: a clean exit 2 on all of them
    except _user_errors() as exc:
        if world.size == 1:
            raise
        # bad input seen by one rank only: the others would wait for it forever
        print(f"[rank {world.rank}/{world.size}] osfed-hpc run: error: {exc}", file=sys.stderr, flush=True)
        time.sleep(1.0)  # let the launcher forward the message before Abort tears its pipes down
        world.abort(USER_ERROR_EXIT)
    if status == "stopped" and world.is_server:
        print(f"[osfed-hpc] stopped after a checkpoint; resume with: osfed-hpc run --resume {run_dir}", flush=True)
        requeue_if_slurm()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .plan import config_keys_table

    parser = argparse.ArgumentParser(prog="osfed-hpc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"osfed-hpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert a dataset to HDF5 shards")
    p.add_argument("--source", required=True, choices=["mnist5k", "digits", "imagefolder"])
    p.add_argument("--out", required=True)
    p.add_argument("--root", help="imagefolder: the folder with train/ and val/ (or class folders)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=512, help="imagefolder: longest side kept (px)")
    p.add_argument("--quality", type=int, default=90, help="imagefolder: JPEG quality")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--workers", type=int, default=None, help="conversion processes (default: all cores)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("partition", help="split a prepared dataset among clients")
    p.add_argument("--data", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--scheme", choices=["dirichlet", "iid"], default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-samples", type=int, default=1)
    p.add_argument("--allow-small", action="store_true", help="allow clients below --min-samples")
    p.add_argument("--out", help="partition file (default: DATA/partitions/<scheme>-n<N>-a<alpha>-s<seed>.npz)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("verify", help="check a prepared dataset (counts, labels, decodable images)")
    p.add_argument("data")
    p.add_argument("--sample", type=int, default=64)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("run", help="train (under mpirun/srun: rank 0 server, others workers)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_keys_table())
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key.sub=value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and resolve the config, print it with the client placement and per-rank "
                        "memory/checkpoint/bytes estimates, and exit; no MPI, nothing written")
    p.add_argument("--ranks", type=int, default=3, metavar="N",
                   help="--dry-run: plan for N MPI ranks (rank 0 the server; N=1: one process does all); default 3")
    p.add_argument("--runs-dir", default="runs", metavar="DIR",
                   help="--dry-run: earlier runs to take the seconds per round from (default: runs)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="compare finished runs (accuracy, uplink bytes, ratio to FedAvg)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="also write report.csv, report.md, bytes_to_target.csv and PNG plots into this folder "
                                  "(and gallery.md when runs saved snapshot pictures)")
    p.add_argument("--target", metavar="ACC",
                   help="accuracy for the bytes-to-target table: a fraction (0.85) or a percentage (85, or 0.5%%); "
                        "default: 90%% of the best FedAvg run's final accuracy")
    p.add_argument("--include-snapshots", action="store_true",
                   help="with --out: copy the runs' snapshot pictures (RUN/snapshots/*.png) into the folder and show "
                        "them in gallery.md; off by default because snapshots are derived from client data (without "
                        "it the gallery only lists their paths)")
    p.set_defaults(func=cmd_report)

    _add_cluster_commands(sub)
    return parser


def _add_cluster_commands(sub) -> None:
    from . import cluster_cli

    cluster_cli.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
        if rank == "0" or args.command != "run":
            print(f"osfed-hpc {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
