"""Rank-count invariance, inside one ``mpirun -n 3``: the same config gives the same model on
sub-worlds of 1, 2 and 3 ranks (run with ``mpirun -n 3 python -m pytest --with-mpi -m mpi``)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from tests.conftest import small_run_overrides

pytestmark = pytest.mark.mpi


def _shared_tmp(comm) -> Path:
    path = tempfile.mkdtemp(prefix="osfed-mpi-") if comm.rank == 0 else None
    return Path(comm.bcast(path))  # test scaffolding: a path string, not a payload


def _run_on_subworlds(algorithm: str, rounds: int) -> dict[int, str]:
    from mpi4py import MPI

    from osfed_hpc.comm import World
    from osfed_hpc.config import load_config
    from osfed_hpc.data import prepare_dataset
    from osfed_hpc.runner import Runner

    comm = MPI.COMM_WORLD
    assert comm.size >= 3, "run under mpirun -n 3"
    tmp = _shared_tmp(comm)
    if comm.rank == 0:
        prepare_dataset("digits", tmp / "digits", progress=False)
    comm.Barrier()
    for n in (1, 2, 3):
        sub = comm.Split(0 if comm.rank < n else MPI.UNDEFINED, comm.rank)
        if sub != MPI.COMM_NULL:
            out = tmp / f"{algorithm}-n{n}"
            config = load_config(None, small_run_overrides(tmp / "digits", out, algorithm, rounds))
            Runner(config, World.from_mpi(sub), out).run()
            sub.Free()
        comm.Barrier()
    shas = {}
    if comm.rank == 0:
        for n in (1, 2, 3):
            summary = json.loads((tmp / f"{algorithm}-n{n}" / "summary.json").read_text())
            assert summary["world_size"] == n
            shas[n] = summary["model_sha256"]
    return comm.bcast(shas)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("algorithm", ["fedavg", "osfed"])
def test_same_model_sha_on_1_2_3_ranks(algorithm):
    shas = _run_on_subworlds(algorithm, rounds=2)
    assert len(set(shas.values())) == 1, shas
