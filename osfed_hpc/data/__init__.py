"""The data layer: convert once to HDF5 shards, partition among clients, load per client.

Names are imported lazily (PEP 562) so that ``import osfed_hpc.data`` stays cheap and pulls in
neither torch (conversion workers and the ``prepare`` command do not need it) nor h5py until used.

* ``prepare_dataset`` -- source (mnist5k, digits, imagefolder) -> directory of shards
* ``DatasetReader`` / ``verify_dataset`` -- open (validated) / check thoroughly a prepared dataset
* ``make_partition`` / ``load_partition`` / ``Partition`` -- client -> sample indices
* ``build_train_data`` / ``build_eval_data`` -- per-rank data whose ``client(...)`` gives batches
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataError": "errors",
    "prepare_dataset": "prepare",
    "DatasetReader": "hdf5",
    "verify_dataset": "verify",
    "Partition": "partition",
    "make_partition": "partition",
    "load_partition": "partition",
    "dirichlet_partition": "partition",
    "iid_partition": "partition",
    "ClientData": "loader",
    "InMemoryImages": "loader",
    "EncodedImages": "loader",
    "build_train_data": "loader",
    "build_eval_data": "loader",
    "load_samples": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers only: at run time ``__getattr__`` imports these on first use
    from .errors import DataError  # noqa: F401
    from .hdf5 import DatasetReader  # noqa: F401
    from .loader import ClientData, EncodedImages, InMemoryImages, build_eval_data, build_train_data  # noqa: F401
    from .partition import (  # noqa: F401
        Partition,
        dirichlet_partition,
        iid_partition,
        load_partition,
        make_partition,
    )
    from .prepare import prepare_dataset  # noqa: F401
    from .verify import verify_dataset  # noqa: F401
