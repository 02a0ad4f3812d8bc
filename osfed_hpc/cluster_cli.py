"""The cluster-facing command ``osfed-hpc sweep``, registered by ``cli.build_parser``.

Kept apart from ``cli.py`` so the core CLI does not depend on it. Nothing here imports mpi4py or
torch: a sweep is expanded and submitted on a login node.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep as sw
    from .config import ConfigError

    if args.np < 1:
        raise ConfigError(f"--np must be >= 1, got {args.np}")
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    plan = sw.load_sweep(args.sweep, args.out, quick=args.quick)
    rows = sw.expand(plan)
    width = max(len(r.name) for r in rows)
    for row in rows:
        print(f"{row.index:3d}  {row.name:<{width}}  {row.out}")
    script = Path(args.script) if args.script else sw.default_job_script()
    command = sw.sbatch_command(plan.name, plan.out, len(rows), script, args.max_parallel, args.sbatch_arg or [])
    env = sw.job_environment(script)
    prefix = f"OSFED_ROOT={shlex.quote(env['OSFED_ROOT'])} " if "OSFED_ROOT" in env else ""
    if args.dry_run:
        print(f"{len(rows)} rows valid (dry run: nothing written, prepared or started)")
        print(prefix + shlex.join(command))
        return 0
    folder = sw.write_rows(plan, rows)
    print(f"wrote {len(rows)} row configs, {folder / 'rows.tsv'} and {folder / 'rows.json'}")
    sw.ensure_data(rows)
    if args.local:
        return sw.run_local(folder, args.np, args.mpirun, parallel=args.parallel)
    print(prefix + shlex.join(command))
    if args.submit:
        return sw.submit(command, env)
    print("(not submitted: add --submit, or --local to run the rows here)")
    return 0


def add_commands(sub) -> None:
    """Register the cluster commands on the ``osfed-hpc`` subparsers."""
    p = sub.add_parser("sweep", help="expand a sweep file into one config per row; submit it as a job array")
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("--out", help="sweep folder (default: the sweep file's 'out', else runs/sweeps/<name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--submit", action="store_true", help="run the printed sbatch command")
    mode.add_argument("--local", action="store_true", help="run the rows here, with mpirun (one after another unless --parallel)")
    p.add_argument("--np", type=int, default=3, help="--local: MPI ranks per row (default 3)")
    p.add_argument("--parallel", type=int, default=1,
                   help="--local: run up to this many rows at once, each with its own mpirun (default 1; output "
                        "in SWEEP/logs/). --np 2 --parallel 2 keeps 2 cores busy where a fixed client placement "
                        "leaves workers idle")
    p.add_argument("--mpirun", help="--local: the mpirun to use (default: next to python, else on PATH)")
    p.add_argument("--dry-run", action="store_true", help="validate and print; write, prepare and start nothing")
    p.add_argument("--quick", action="store_true",
                   help="only the sweep file's 'quick' subset (few rows, short runs; for CI and smoke tests), "
                        "named <name>-quick and written to <out>-quick unless --out is given")
    p.add_argument("--script", help="job array script (default: jobs/sweep.slurm)")
    p.add_argument("--max-parallel", type=int, help="at most this many array tasks at once (--array=0-N%%K)")
    p.add_argument("--sbatch-arg", action="append", metavar="ARG",
                   help="extra sbatch argument, repeatable (e.g. --sbatch-arg=--partition=gpu)")
    p.set_defaults(func=cmd_sweep)
