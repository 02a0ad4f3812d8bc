"""Registry of federated methods: ``algorithm.name`` in a config selects one of these classes."""
from __future__ import annotations

from .base import Algorithm, ClientContext, ClientResult, Environment
from .fedavg import FedAvg

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg,)}

try:  # snapshot methods live in their own module
    from .osfed import OSFed, SFC3

    REGISTRY.update({OSFed.name: OSFed, SFC3.name: SFC3})
except ImportError as exc:  # pragma: no cover - only while osfed.py is absent
    if exc.name != f"{__name__}.osfed":
        raise


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"algorithm.name: unknown algorithm {name!r}; choose one of {sorted(REGISTRY)}") from None


__all__ = ["Algorithm", "ClientContext", "ClientResult", "Environment", "REGISTRY", "get_algorithm"]
