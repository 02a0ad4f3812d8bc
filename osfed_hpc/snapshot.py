"""Snapshots: a few synthetic images plus free labels whose loss gradient encodes a model update.

Shared by OS-Fed and 3SFC (OS-Fed with ``factor = 1``). The client *encodes* an update tau by
searching for a snapshot S and labels Y such that the gradient of the cross-entropy of the model
at W_t on the decoded batch ``F(S)`` points along tau (``synthesize``); the server *decodes* by
computing that same gradient at the same W_t (``synthetic_gradient``); the search itself lives in
``osfed_hpc.snapshot_search``. The error-feedback residual assumes the two gradients are identical,
so both sides call the very same function under the same numerical settings (``exact_numerics``).

``F`` is the multi-grid function: it splits each snapshot into cells and resizes every cell back
to full resolution, so one H x W image yields several training samples ("decouples conflicting
gradient directions", OS-Fed). ``F`` is linear in S and deterministic. Any object with
``samples_per_snapshot``, ``check_resolution`` and ``__call__`` can serve as ``F`` (``Grid``): the
learnable FSRCNN upsampler of ``osfed_hpc.multigrid_fsrcnn`` is one, and ``synthesize`` can then
optimise its weights together with (S, Y) (``learnable``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .flat import FlatModel

#: epsilon in the cosine denominator, as in the 3SFC reference code
COS_EPS = 1e-12

Leaf = tuple[int, int, int]  # (row, col, size) in unit cells of the finest grid


# --------------------------------------------------------------------------------------------
# multi-grid functions


def _check_divisible(height: int, width: int, factor: int) -> None:
    if factor < 1 or height % factor or width % factor:
        raise ValueError(
            f"multi-grid factor {factor} does not divide the snapshot resolution {height}x{width}; "
            f"choose a factor that divides both sides"
        )


def _resize(cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear, ``align_corners=False``, no antialias: IDC's ``decode_zoom`` upsampler."""
    return F.interpolate(cells, size=(height, width), mode="bilinear", align_corners=False, antialias=False)


def multigrid_uniform(snapshots: torch.Tensor, factor: int) -> torch.Tensor:
    """[M, C, H, W] -> [M*f*f, C, H, W]: f x f equal cells of each snapshot, each resized to H x W.

    Order: snapshot-major, then cells row-major (cell (i, j) of snapshot m is sample
    ``m*f*f + i*f + j``). ``factor = 1`` returns the input itself (3SFC).
    """
    m, c, h, w = snapshots.shape
    _check_divisible(h, w, factor)
    if factor == 1:
        return snapshots
    ch, cw = h // factor, w // factor
    cells = snapshots.reshape(m, c, factor, ch, factor, cw).permute(0, 2, 4, 1, 3, 5)
    return _resize(cells.reshape(m * factor * factor, c, ch, cw), h, w)


def default_multiscale_leaves(grid: int) -> tuple[Leaf, ...]:
    """The default quadtree on a ``grid`` x ``grid`` lattice of unit cells (``grid % 4 == 0``).

    OS-Fed D.1: "a 2x2 grid can have some cells further subdivided, creating a mix of cells that
    require different upsampling factors". The top-right and bottom-left quadrants go down to single
    unit cells; the top-left and bottom-right ones are split 2 x 2 when that still leaves cells
    coarser than a unit cell (grid >= 8), and stay whole otherwise. At 224 px with grid 8 that is
    4+16+16+4 = 40 samples: eight 56-px cells (4x upsampling) and thirty-two 28-px cells (8x), the mix
    described in D.1; at 28 px with grid 4 it is 1+4+4+1 = 10 samples: two 14-px cells (2x) and
    eight 7-px cells (4x), so the layout stays a genuine mix at small resolutions. Order: quadrants
    TL, TR, BL, BR; row-major inside each quadrant.
    """
    if grid < 4 or grid % 4:
        raise ValueError(f"the default multi-scale layout needs a factor divisible by 4, got {grid}")
    half = grid // 2
    coarse = half // 2 if half // 2 > 1 else half
    leaves: list[Leaf] = []
    for qr, qc, size in ((0, 0, coarse), (0, half, 1), (half, 0, 1), (half, half, coarse)):
        for r in range(qr, qr + half, size):
            for c in range(qc, qc + half, size):
                leaves.append((r, c, size))
    return tuple(leaves)


def check_leaves(leaves: tuple[Leaf, ...], grid: int) -> None:
    """Raise ``ValueError`` unless ``leaves`` are square cells that tile the grid exactly once.

    A tiling (rather than any set of cells) keeps every pixel of the snapshot in use and makes
    the layout a genuine quadtree-style partition, the same on client and server.
    """
    covered = [[False] * grid for _ in range(grid)]
    for leaf in leaves:
        if len(leaf) != 3 or not all(isinstance(v, int) for v in leaf):
            raise ValueError(f"multi-scale leaf {leaf!r} must be (row, col, size) integers")
        r, c, s = leaf
        if s < 1 or r < 0 or c < 0 or r + s > grid or c + s > grid:
            raise ValueError(f"multi-scale leaf {leaf!r} lies outside the {grid}x{grid} grid")
        for i in range(r, r + s):
            for j in range(c, c + s):
                if covered[i][j]:
                    raise ValueError(f"multi-scale leaf {leaf!r} overlaps another leaf at unit cell ({i}, {j})")
                covered[i][j] = True
    if not all(all(row) for row in covered):
        raise ValueError(f"multi-scale leaves do not cover the whole {grid}x{grid} grid")


def multigrid_multiscale(snapshots: torch.Tensor, grid: int, leaves: tuple[Leaf, ...]) -> torch.Tensor:
    """[M, C, H, W] -> [M*L, C, H, W]: each leaf cell (in units of H/grid px) resized to H x W.

    Order: snapshot-major, then ``leaves`` order. Leaves of one size are resized in one call.
    """
    m, c, h, w = snapshots.shape
    _check_divisible(h, w, grid)
    uh, uw = h // grid, w // grid
    groups: dict[int, list[int]] = {}
    for index, (_, _, size) in enumerate(leaves):
        groups.setdefault(size, []).append(index)
    parts, order = [], []
    for size, indices in groups.items():
        crops = [snapshots[:, :, r * uh : (r + s) * uh, col * uw : (col + s) * uw]
                 for r, col, s in (leaves[i] for i in indices)]
        stacked = torch.stack(crops, dim=1).reshape(m * len(indices), c, size * uh, size * uw)
        parts.append(_resize(stacked, h, w).reshape(m, len(indices), c, h, w))
        order.extend(indices)
    decoded = torch.cat(parts, dim=1)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return decoded.index_select(1, inverse.to(decoded.device)).reshape(m * len(leaves), c, h, w)


@dataclass(frozen=True)
class MultiGrid:
    """Which multi-grid function to apply: uniform ``factor`` (``leaves is None``) or a multi-scale layout.

    For multi-scale, ``factor`` is the finest grid (unit cell = H/factor px) and ``leaves`` tile it.
    """

    factor: int
    leaves: tuple[Leaf, ...] | None = None

    def __post_init__(self) -> None:
        if self.leaves is not None:
            check_leaves(self.leaves, self.factor)

    @property
    def samples_per_snapshot(self) -> int:
        return self.factor * self.factor if self.leaves is None else len(self.leaves)

    def check_resolution(self, height: int, width: int) -> None:
        _check_divisible(height, width, self.factor)

    def __call__(self, snapshots: torch.Tensor) -> torch.Tensor:
        if self.leaves is None:
            return multigrid_uniform(snapshots, self.factor)
        return multigrid_multiscale(snapshots, self.factor, self.leaves)


@runtime_checkable
class Grid(Protocol):
    """What the synthesis and the decoder need of a multi-grid function F."""

    factor: int

    @property
    def samples_per_snapshot(self) -> int: ...

    def check_resolution(self, height: int, width: int) -> None: ...

    def __call__(self, snapshots: torch.Tensor) -> torch.Tensor: ...


def as_grid(grid: int | Grid) -> Grid:
    """An int means the uniform multi-grid with that factor; a ``Grid`` (``MultiGrid``, an FSRCNN
    grid) is used as it is."""
    return grid if isinstance(grid, Grid) else MultiGrid(int(grid))


# --------------------------------------------------------------------------------------------
# the synthetic gradient (encoder objective and decoder)


def parameter_gradients(
    model: FlatModel,
    snapshots: torch.Tensor,
    labels: torch.Tensor,
    grid: int | Grid,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """Per-parameter gradients of mean ``cross_entropy(f(F(S)), Y)`` (soft targets), for the
    trainable parameters in the flat vector's order (``model.params``); unused ones get zeros.

    Uses ``autograd.grad`` on the parameter tensors, so no ``.grad`` is written and the model is
    not copied. ``create_graph=True`` keeps the graph for the outer (double-backward) optimisation.
    """
    net = model.model
    params = model.params
    trainable = [p for p in params if p.requires_grad]  # all of them, unless frozen after flattening
    with torch.enable_grad():
        logits = net(model.to_input_format(as_grid(grid)(snapshots)))
        loss = F.cross_entropy(logits, labels)
        grads = iter(torch.autograd.grad(loss, trainable, create_graph=create_graph, materialize_grads=True))
    return [next(grads) if p.requires_grad else torch.zeros_like(p) for p in params]


def synthetic_gradient(
    model: FlatModel,
    snapshots: torch.Tensor,
    labels: torch.Tensor,
    grid: int | Grid,
    create_graph: bool = False,
) -> torch.Tensor:
    """The decoder: the flat parameter gradient g(S, Y), laid out like ``model.params_vector``.

    Client and server call exactly this function, so on the same device class the decoded
    gradient is bitwise the client's.
    """
    return torch.cat(model.flatten(parameter_gradients(model, snapshots, labels, grid, create_graph)))


@contextlib.contextmanager
def exact_numerics(net: nn.Module) -> Iterator[None]:
    """Eval mode, fp32 without TF32, deterministic kernels and the math attention backend.

    Why: the error-feedback residual is exact only if the server's gradient equals the client's.
    TF32 convolutions/matmuls (cuDNN's default) and nondeterministic kernels break that; eval
    mode removes dropout; flash/memory-efficient attention has no double backward, so ViTs need
    the math SDPA backend for synthesis (and use it for decoding too, to match). Determinism is
    ``warn_only``: some CUDA backward kernels (bilinear upsampling, used only by synthesis; max
    and adaptive pooling, also on the decoder path) have no deterministic version, and a warning
    is better than refusing to run. Bitwise client/server agreement is therefore guaranteed on
    CPU and only expected on CUDA. Everything is restored on exit.
    """
    backends = torch.backends
    saved = (
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.deterministic,
        backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    modes = [(module, module.training) for module in net.modules()]
    try:
        backends.cuda.matmul.allow_tf32 = False
        backends.cudnn.allow_tf32 = False
        backends.cudnn.deterministic = True
        backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        net.eval()
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.deterministic,
         backends.cudnn.benchmark) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
        for module, training in modes:
            module.training = training


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> / (|a| |b| + 1e-12), the 3SFC cosine."""
    return torch.dot(a, b) / (a.norm() * b.norm() + COS_EPS)
