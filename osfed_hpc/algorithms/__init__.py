"""Registry of federated methods: ``algorithm.name`` in a config selects one of these classes.

Each method lives in its own module; adding one is a module with an ``Algorithm`` subclass plus
its name in ``_MODULES`` (see the README's "How to add a method").
"""
from __future__ import annotations

import importlib
import os

from .base import Algorithm, ClientContext, ClientResult, Environment, ReceivedMessage, ServerMessage

#: algorithm name -> "module:Class", imported on first use
_MODULES: dict[str, str] = {
    "fedavg": "fedavg:FedAvg",
    "osfed": "osfed:OSFed",
    "sfc3": "sfc3:SFC3",
    "e3sfc": "e3sfc:E3SFC",
    "topk": "topk:TopK",
    "randtopk": "topk:RandTopK",
    "quant": "quant:Quant",
    "fedmpq_lite": "fedmpq:FedMPQLite",
    "lora": "lorafair:LoRA",
    "lorafair": "lorafair:LoRAFair",
    "feddf": "feddf:FedDF",
    "singleimage": "singleimage:SingleImage",
    "fedaf": "fedaf:FedAF",
    "fedsd2c": "fedsd2c:FedSD2C",
    "oscar": "oscar:OSCAR",
}


def register(name: str, target: str) -> None:
    """Make ``algorithm.name: NAME`` load ``target``: "module:Class" inside this package, or
    "package.module:Class" anywhere on the path (a method kept outside the package, or a test's)."""
    _MODULES[name] = target


def _register_from_environment() -> None:
    """``OSFED_EXTRA_ALGORITHMS="name=package.module:Class,..."``: methods kept outside the package,
    registered on every rank (set it in the job's environment; mpirun and srun pass it on)."""
    for item in filter(None, os.environ.get("OSFED_EXTRA_ALGORITHMS", "").split(",")):
        name, _, target = item.partition("=")
        if not name or ":" not in target:
            raise ValueError(f"OSFED_EXTRA_ALGORITHMS: {item!r} must look like name=package.module:Class")
        register(name.strip(), target.strip())


_register_from_environment()


def algorithm_names() -> list[str]:
    return sorted(_MODULES)


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in _MODULES:
        raise ValueError(f"algorithm.name: unknown algorithm {name!r}; choose one of {algorithm_names()}")
    module, cls = _MODULES[name].split(":")
    return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), cls)


__all__ = ["Algorithm", "ClientContext", "ClientResult", "Environment", "ReceivedMessage", "ServerMessage",
           "algorithm_names", "get_algorithm", "register"]
