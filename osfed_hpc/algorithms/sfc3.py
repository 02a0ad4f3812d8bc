"""3SFC (Zhou et al., ICCV 2023): OS-Fed without the multi-grid, i.e. the snapshot itself is the batch."""
from __future__ import annotations

from dataclasses import dataclass

from .osfed import OSFed


class SFC3(OSFed):
    """3SFC (Zhou et al., ICCV 2023): OS-Fed with factor 1, i.e. the snapshot itself is the batch."""

    name = "sfc3"

    @dataclass
    class Options(OSFed.Options):
        #: fixed: 3SFC has no multi-grid function
        factor: int = 1

        def validate(self) -> None:
            if self.factor != 1 or self.multigrid != "uniform":
                raise ValueError(
                    f"algorithm.factor: sfc3 is OS-Fed without multi-grid (factor 1, uniform), got "
                    f"factor {self.factor!r}, multigrid {self.multigrid!r}; use algorithm.name=osfed instead"
                )
            super().validate()
