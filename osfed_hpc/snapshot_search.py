"""Snapshot search: the optimisers that find (S, Y) for one client, or for a batch of clients at once.

The objective (``osfed_hpc.snapshot``) is ``1 - |cos(g(S, Y), tau)|`` at W_t. 3SFC optimises it with
``torch.optim.LBFGS`` (lr 1, 20 iterations, history 100, no line search) for 10 outer steps,
re-evaluating and keeping the best point after each. ``torch.optim.LBFGS`` owns its loop (it calls a
closure), so several clients cannot share one evaluation. Here each client's optimiser is a
generator that yields the point it wants evaluated and receives ``(loss, gradient)``; a driver
evaluates the pending points of all clients of a batch together (``torch.func.vmap`` over the
clients, which share W_t) or one client at a time. The LBFGS update is ``torch.optim.LBFGS``'s
without line search, operation for operation (``tests/test_snapshot_search.py`` checks the iterates
against torch's), with two differences of bookkeeping, not of method:

- the evaluation after an outer step (3SFC's re-evaluation) is also the first closure call of the
  next step: one double-backward evaluation instead of a first-order one plus a double-backward one
  at the same point;
- ``stop_tolerance`` (ours, 0 = off): a client stops after an outer step that improved its best
  cosine by less than the tolerance, because a step that gained nothing rarely precedes one that
  does (measured in the README) and every further step costs ``lbfgs_max_iter`` double backwards.

The label guard (``label_guard``, ours, 0 = off): g(S, Y) is linear in Y (soft-label cross
entropy), so the cosine does not depend on |Y|, the gradient w.r.t. Y is orthogonal to Y, and every
LBFGS step lengthens Y. Left alone, |Y| grows to ~1e5 and the gradients shrink as 1/|Y| until
LBFGS's tolerances end the search early. When the RMS of Y exceeds ``label_guard`` times its initial
RMS, the guard rescales Y back to its initial RMS (the objective is unchanged up to rounding) and
restarts the LBFGS memory, whose curvature pairs belong to the old scale.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flat import FlatModel
from .snapshot import COS_EPS, Grid, as_grid, exact_numerics, parameter_gradients

#: torch.optim.LBFGS's default tolerances (3SFC keeps them)
TOLERANCE_GRAD = 1e-7
TOLERANCE_CHANGE = 1e-9

#: what an optimiser yields (the flat point to evaluate) and receives (loss, flat gradient)
Program = Generator[torch.Tensor, tuple[float, torch.Tensor], None]


@dataclass
class SynthesisConfig:
    """Optimizer for (S, Y). LBFGS defaults are 3SFC's (lr 1, 20 inner iterations, history 100,
    10 outer steps); Adam is the cheaper choice for large models and resolutions."""

    optimizer: str = "lbfgs"
    lbfgs_lr: float = 1.0
    lbfgs_max_iter: int = 20
    lbfgs_history: int = 100
    outer_steps: int = 10
    adam_lr: float = 0.1
    adam_steps: int = 100
    #: True: the server applies one least-squares scale per parameter tensor, so the objective is
    #: the energy of the target each tensor's direction can explain (see ``cosine_loss``)
    per_tensor_scales: bool = False
    #: LBFGS: stop after an outer step that raised the best |cos| by less than this (0: never, 3SFC)
    stop_tolerance: float = 0.0
    #: LBFGS: rescale Y when its RMS exceeds this multiple of the initial RMS (0: never, 3SFC)
    label_guard: float = 0.0


def cosine_loss(grads: Sequence[torch.Tensor], pieces: Sequence[torch.Tensor], target_norm: torch.Tensor,
                per_tensor_scales: bool) -> torch.Tensor:
    """``1 - |cos(g, tau)|`` from per-tensor pieces of g and tau (no concatenated g: that copy costs
    ~10% at ResNet scale). With per-tensor least-squares scales, |tau - s*g|^2 = |tau|^2 -
    sum_l <g_l,tau_l>^2/|g_l|^2, so ``1 - sqrt(explained fraction)`` is the cosine loss of s*g."""
    dots = torch.stack([torch.dot(g, t) for g, t in zip(grads, pieces)])
    squares = torch.stack([torch.dot(g, g) for g in grads])
    if per_tensor_scales:
        explained = (dots.square() / (squares + COS_EPS)).sum() / (target_norm.square() + COS_EPS)
        return 1.0 - explained.clamp_min(1e-30).sqrt()
    return 1.0 - (dots.sum() / (squares.sum().sqrt() * target_norm + COS_EPS)).abs()


# --------------------------------------------------------------------------------------------
# evaluating the objective: one client through autograd, a batch through torch.func.vmap


@dataclass(frozen=True)
class Layout:
    """Where S, Y and any extra learnable tensors sit in a client's flat point x."""

    snapshot_shape: tuple[int, ...]
    labels_shape: tuple[int, ...]

    @property
    def snapshot_numel(self) -> int:
        return math.prod(self.snapshot_shape)

    @property
    def labels_numel(self) -> int:
        return math.prod(self.labels_shape)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ns, ny = self.snapshot_numel, self.labels_numel
        return x[..., :ns].unflatten(-1, self.snapshot_shape), x[..., ns : ns + ny].unflatten(-1, self.labels_shape)

    def labels_slice(self) -> slice:
        return slice(self.snapshot_numel, self.snapshot_numel + self.labels_numel)


class SingleEvaluator:
    """Loss and gradient of one client's objective through plain autograd (double backward w.r.t.
    (S, Y) and the extra tensors only, never into the model's parameters)."""

    def __init__(self, model: FlatModel, grid: Grid, layout: Layout, target: torch.Tensor,
                 config: SynthesisConfig, extras: Sequence[torch.Tensor] = ()) -> None:
        self.model, self.grid, self.layout, self.config = model, grid, layout, config
        self.pieces = target.split(model.param_sizes)
        self.target_norm = target.norm()
        self.extras = list(extras)

    def loss(self, s: torch.Tensor, y: torch.Tensor, create_graph: bool) -> torch.Tensor:
        grads = self.model.flatten(parameter_gradients(self.model, s, y, self.grid, create_graph))
        return cosine_loss(grads, self.pieces, self.target_norm, self.config.per_tensor_scales)

    def set_extras(self, x: torch.Tensor) -> None:
        offset = self.layout.snapshot_numel + self.layout.labels_numel
        with torch.no_grad():
            for tensor in self.extras:
                tensor.copy_(x[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def __call__(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        s, y = (part.detach().requires_grad_() for part in self.layout.split(x))
        self.set_extras(x)
        leaves = [s, y, *self.extras]
        loss = self.loss(s, y, True)
        grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


class BatchEvaluator:
    """Loss and gradient of B clients' objectives in one call: ``vmap`` over the clients of the
    double-backward objective written with ``torch.func.grad`` and ``functional_call`` at the shared
    W_t. Each client's values equal its ``SingleEvaluator`` values up to float rounding (the batched
    kernels sum in another order); no extra learnable tensors."""

    def __init__(self, model: FlatModel, grid: Grid, layout: Layout, targets: torch.Tensor,
                 config: SynthesisConfig) -> None:
        from torch.func import functional_call, grad, grad_and_value, vmap

        net = model.model
        names = {id(p): name for name, p in net.named_parameters()}
        self.names = [names[id(p)] for p in model.params]
        trainable = [p.requires_grad for p in model.params]
        params = {name: p.detach() for name, p in zip(self.names, model.params)}
        buffers = dict(net.named_buffers())
        sizes = model.param_sizes
        self.layout, self.targets = layout, targets

        def cross_entropy(p: dict[str, torch.Tensor], s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = functional_call(net, (p, buffers), (model.to_input_format(grid(s)),))
            return F.cross_entropy(logits, y)

        def loss(s: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            g = grad(cross_entropy)(params, s, y)
            grads = [g[name].reshape(-1) if used else torch.zeros(size, dtype=target.dtype, device=target.device)
                     for name, used, size in zip(self.names, trainable, sizes)]
            return cosine_loss(grads, target.split(sizes), target.norm(), config.per_tensor_scales)

        self._outer = vmap(grad_and_value(loss, argnums=(0, 1)))

    def __call__(self, xs: torch.Tensor, clients: list[int]) -> tuple[list[float], torch.Tensor]:
        s, y = self.layout.split(xs)
        # all clients still searching (the usual case): the stacked targets as they are, no per-call copy
        targets = self.targets if len(clients) == len(self.targets) else self.targets[clients]
        (gs, gy), losses = self._outer(s, y, targets)
        return losses.tolist(), torch.cat([gs.flatten(1), gy.flatten(1)], dim=1)


# --------------------------------------------------------------------------------------------
# the optimisers, one generator per client


class Best:
    """The best finite point seen so far, by loss (LBFGS can wander off to NaN)."""

    def __init__(self) -> None:
        self.loss = math.inf
        self.x: torch.Tensor | None = None

    def offer(self, loss: float, x: torch.Tensor) -> None:
        if math.isfinite(loss) and loss < self.loss:
            self.loss = loss
            self.x = x.detach().clone()


@dataclass
class SearchInfo:
    """What one client's search did (``stats`` gives the ``synthesize`` info keys)."""

    initial: float = math.nan
    evaluations: int = 0
    outer_steps: int = 0
    stopped_early: bool = False
    label_rescales: int = 0


def lbfgs_program(x: torch.Tensor, config: SynthesisConfig, best: Best, info: SearchInfo,
                  labels: slice | None) -> Program:
    """One client's LBFGS, ``torch.optim.LBFGS.step`` without line search, ``outer_steps`` times.

    ``x`` is updated in place. ``labels`` is Y's slice of x, for the label guard.
    """
    lr, max_iter, history = config.lbfgs_lr, config.lbfgs_max_iter, config.lbfgs_history
    max_eval = max_iter * 5 // 4
    loss, flat_grad = yield x
    info.initial = loss
    best.offer(loss, x)
    if not math.isfinite(loss):  # e.g. a NaN target: every point is NaN, keep the initial one
        return
    label_rms = float(x[labels].square().mean().sqrt()) if labels is not None else 0.0
    n_total = 0  # torch's state["n_iter"]
    d = t = prev_flat_grad = prev_loss = None
    old_dirs: list[torch.Tensor] = []
    old_stps: list[torch.Tensor] = []
    ro: list[torch.Tensor] = []
    h_diag: torch.Tensor | float = 1
    for _ in range(config.outer_steps):
        # ---- torch.optim.LBFGS.step, its first closure value being (loss, flat_grad) at x ----
        info.outer_steps += 1
        if flat_grad.abs().max() > TOLERANCE_GRAD:
            current_evals, n_iter = 1, 0
            while n_iter < max_iter:
                n_iter += 1
                n_total += 1
                if n_total == 1:
                    d = flat_grad.neg()
                    old_dirs, old_stps, ro, h_diag = [], [], [], 1
                else:
                    y = flat_grad.sub(prev_flat_grad)
                    s = d.mul(t)
                    ys = y.dot(s)
                    if ys > 1e-10:
                        if len(old_dirs) == history:
                            old_dirs.pop(0)
                            old_stps.pop(0)
                            ro.pop(0)
                        old_dirs.append(y)
                        old_stps.append(s)
                        ro.append(1.0 / ys)
                        h_diag = ys / y.dot(y)
                    al: list[torch.Tensor | None] = [None] * len(old_dirs)
                    q = flat_grad.neg()
                    for i in range(len(old_dirs) - 1, -1, -1):
                        al[i] = old_stps[i].dot(q) * ro[i]
                        q.add_(old_dirs[i], alpha=-al[i])
                    d = r = torch.mul(q, h_diag)
                    for i in range(len(old_dirs)):
                        be_i = old_dirs[i].dot(r) * ro[i]
                        r.add_(old_stps[i], alpha=al[i] - be_i)
                if prev_flat_grad is None:
                    prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
                else:
                    prev_flat_grad.copy_(flat_grad)
                prev_loss = loss
                t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if n_total == 1 else lr
                gtd = flat_grad.dot(d)
                if gtd > -TOLERANCE_CHANGE:
                    break
                x.add_(d, alpha=t)
                evals = 0
                if n_iter != max_iter:
                    loss, flat_grad = yield x
                    evals = 1
                current_evals += evals
                if n_iter == max_iter or current_evals >= max_eval:
                    break
                if flat_grad.abs().max() <= TOLERANCE_GRAD:
                    break
                if d.mul(t).abs().max() <= TOLERANCE_CHANGE:
                    break
                if abs(loss - prev_loss) < TOLERANCE_CHANGE:
                    break
        # ---- 3SFC's re-evaluation after the step (also the next step's first closure value) ----
        before = best.loss
        loss, flat_grad = yield x
        if not math.isfinite(loss):  # a NaN point only ever leads to more NaN
            return
        best.offer(loss, x)
        if config.stop_tolerance > 0 and before - best.loss < config.stop_tolerance:
            info.stopped_early = True
            return
        if labels is not None and config.label_guard > 0:
            if float(x[labels].square().mean().sqrt()) > config.label_guard * label_rms:
                _bound_labels(x, labels, label_rms, config.label_guard)
                info.label_rescales += 1
                n_total, prev_flat_grad = 0, None  # a fresh LBFGS memory at the rescaled point
                loss, flat_grad = yield x


def adam_program(x: torch.Tensor, config: SynthesisConfig, best: Best, info: SearchInfo) -> Program:
    """Adam on x with torch's defaults (betas 0.9/0.999, eps 1e-8); each step's loss is that of the
    point before the step, so it is offered first; the final point is evaluated too."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for step in range(1, config.adam_steps + 1):
        loss, grad = yield x
        if step == 1:
            info.initial = loss
        if not math.isfinite(loss):
            return
        best.offer(loss, x)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        x.addcdiv_(m, denom, value=-config.adam_lr / (1 - beta1**step))
    loss, _ = yield x
    best.offer(loss, x)


# --------------------------------------------------------------------------------------------
# drivers


def _bound_labels(x: torch.Tensor, labels: slice, initial_rms: float, guard: float) -> None:
    """Rescale Y in place to its initial RMS when it grew past ``guard`` times that: the objective
    and the decoded update (whose least-squares scale absorbs the factor) are unchanged, and the
    wire values stay small (float16 labels overflow at 65,504)."""
    rms = float(x[labels].square().mean().sqrt())
    if rms > guard * initial_rms:
        with torch.no_grad():
            x[labels] *= initial_rms / rms


def _drive(programs: list[Program], evaluate_batch: Callable[[list[int], list[torch.Tensor]], tuple[list[float], list[torch.Tensor]]],
           infos: list[SearchInfo]) -> None:
    """Advance every client's program until all have returned, evaluating all pending points together."""
    pending: dict[int, torch.Tensor] = {}
    for index, program in enumerate(programs):
        pending[index] = next(program)
    while pending:
        clients = sorted(pending)
        losses, grads = evaluate_batch(clients, [pending[c] for c in clients])
        for client, loss, grad in zip(clients, losses, grads):
            infos[client].evaluations += 1
            try:
                pending[client] = programs[client].send((loss, grad))
            except StopIteration:
                del pending[client]


def synthesize_batch(
    model: FlatModel,
    targets: Sequence[torch.Tensor],
    input_shape: tuple[int, int, int],
    num_snapshots: int,
    grid: int | Grid,
    num_classes: int,
    config: SynthesisConfig,
    generators: Sequence[torch.Generator],
    learnable: Sequence[torch.Tensor] = (),
) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, float]]]:
    """``synthesize`` for several clients at the same W_t: one (S, Y, info) per target, in order.

    With more than one target every evaluation is one batched call (``BatchEvaluator``); with one,
    plain autograd (``SingleEvaluator``), which is also the only path that takes ``learnable``.
    Each client's start is drawn from its own generator, exactly as ``synthesize`` draws it.
    ``info["seconds"]`` is the batch's wall time divided by the number of clients.
    """
    if learnable and len(targets) > 1:
        raise ValueError("a batched synthesis cannot learn extra tensors (e.g. a client-mode FSRCNN)")
    for target in targets:
        if target.numel() != model.param_numel:
            raise ValueError(f"synthesis target has {target.numel()} values, the model has {model.param_numel} parameters")
    grid = as_grid(grid)
    device = model.vector.device
    started = time.perf_counter()
    layout = Layout((num_snapshots, *input_shape), (num_snapshots * grid.samples_per_snapshot, num_classes))
    points = []
    for generator in generators:
        s = torch.randn(layout.snapshot_shape, generator=generator, device=generator.device)
        y = torch.randn(layout.labels_shape, generator=generator, device=generator.device)
        parts = [s.reshape(-1), y.reshape(-1), *(t.detach().reshape(-1).to(generator.device) for t in learnable)]
        points.append(torch.cat(parts).to(device))
    labels = None if learnable else layout.labels_slice()
    initial_label_rms = [float(x[labels].square().mean().sqrt()) if labels is not None else 0.0 for x in points]
    targets = [t.detach().to(device, torch.float32) for t in targets]
    bests = [Best() for _ in targets]
    infos = [SearchInfo() for _ in targets]
    if config.optimizer == "lbfgs":
        programs = [lbfgs_program(x, config, b, i, labels) for x, b, i in zip(points, bests, infos)]
    else:
        programs = [adam_program(x, config, b, i) for x, b, i in zip(points, bests, infos)]
    with exact_numerics(model.model):
        if len(targets) == 1:
            single = SingleEvaluator(model, grid, layout, targets[0], config, learnable)

            def evaluate_batch(clients, xs):
                loss, grad = single(xs[0])
                return [loss], [grad]
        else:
            batch = BatchEvaluator(model, grid, layout, torch.stack(targets), config)

            def evaluate_batch(clients, xs):
                losses, grads = batch(torch.stack(xs), clients)
                return losses, list(grads)
        _drive(programs, evaluate_batch, infos)
        if learnable and bests[0].x is not None:  # leave the extras at the best point
            single.set_extras(bests[0].x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / len(targets)
    results = []
    for x, best, info in zip(points, bests, infos):
        chosen = best.x if best.x is not None else x.detach()
        if labels is not None and config.label_guard > 0:
            _bound_labels(chosen, labels, initial_label_rms[len(results)], config.label_guard)
        s, y = layout.split(chosen)
        results.append((s.clone(), y.clone(), {
            "cos": 1.0 - best.loss if math.isfinite(best.loss) else float("nan"),
            "cos_init": 1.0 - info.initial,
            "iterations": float(info.evaluations if math.isfinite(info.initial) else 0),
            "outer_steps": float(info.outer_steps),
            "stopped_early": float(info.stopped_early),
            "label_rescales": float(info.label_rescales),
            "seconds": seconds,
        }))
    return results


def synthesize(
    model: FlatModel,
    target: torch.Tensor,
    input_shape: tuple[int, int, int],
    num_snapshots: int,
    grid: int | Grid,
    num_classes: int,
    config: SynthesisConfig,
    generator: torch.Generator,
    learnable: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Find (S, Y) minimising ``1 - |cos(g(S, Y), target)|`` at the model's current weights
    (with ``config.per_tensor_scales``: ``1 - cos(s * g, target)`` for the best scale per tensor).

    ``learnable``: further leaf tensors the objective depends on through ``grid`` (e.g. the weights
    of an FSRCNN upsampler), optimised jointly with (S, Y); on return they hold their values at the
    best point. S is [M, C, H, W], Y is [M * samples_per_snapshot, K], both drawn from N(0, 1) with
    ``generator``. The outer gradient is taken w.r.t. (S, Y) only, not ``.backward()``: that skips the
    second-order gradients into every model parameter, which the reference code computes and throws
    away. Returns the best finite point (the initial point counts) and ``info``: ``cos`` and
    ``cos_init`` (|cos| at the best and initial point), ``iterations`` (double-backward
    evaluations), ``outer_steps``, ``stopped_early``, ``label_rescales`` and ``seconds``.
    """
    return synthesize_batch(model, [target], input_shape, num_snapshots, grid, num_classes, config,
                            [generator], learnable)[0]
