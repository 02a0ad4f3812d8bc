"""The snapshot search: our LBFGS against torch's, batched against one-at-a-time, the early stop and the label guard."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.snapshot import MultiGrid, exact_numerics, synthetic_gradient
from osfed_hpc.snapshot_search import (
    BatchEvaluator,
    Layout,
    SingleEvaluator,
    SynthesisConfig,
    synthesize,
    synthesize_batch,
)


def _model(name: str = "cnn", size: int = 16) -> FlatModel:
    return FlatModel(build_model(name, 1, size, 10, seed=0))


def _update(model: FlatModel, size: int, seed: int) -> torch.Tensor:
    """-lr * gradient of a random labelled batch: shaped like a real local update."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 1, size, size, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    grads = torch.autograd.grad(F.cross_entropy(model.model(x), y), list(model.model.parameters()))
    return -0.05 * torch.cat([g.reshape(-1) for g in grads])


def _torch_lbfgs(model, target, size, factor, config, seed):
    """3SFC's loop with torch.optim.LBFGS: outer steps, re-evaluation, best finite point."""
    gen = torch.Generator().manual_seed(seed)
    grid = MultiGrid(factor)
    s = torch.randn(1, 1, size, size, generator=gen).requires_grad_()
    y = torch.randn(grid.samples_per_snapshot, 10, generator=gen).requires_grad_()
    layout = Layout((1, 1, size, size), (grid.samples_per_snapshot, 10))
    single = SingleEvaluator(model, grid, layout, target, config)
    optimizer = torch.optim.LBFGS([s, y], lr=config.lbfgs_lr, max_iter=config.lbfgs_max_iter,
                                  history_size=config.lbfgs_history)
    points = []

    def closure():
        loss = single.loss(s, y, True)
        s.grad, y.grad = torch.autograd.grad(loss, [s, y])
        return loss.detach()

    best = (math.inf, None, None)
    with exact_numerics(model.model):
        value = float(single.loss(s.detach(), y.detach(), False))
        best = (value, s.detach().clone(), y.detach().clone())
        for _ in range(config.outer_steps):
            optimizer.step(closure)
            value = float(single.loss(s.detach(), y.detach(), False))
            points.append((s.detach().clone(), y.detach().clone()))
            if value < best[0]:
                best = (value, s.detach().clone(), y.detach().clone())
    return best, points


@pytest.mark.parametrize("per_tensor", [False, True])
def test_lbfgs_takes_torch_lbfgs_steps_bit_for_bit(per_tensor):
    model = _model()
    target = _update(model, 16, 0)
    config = SynthesisConfig(outer_steps=3, lbfgs_max_iter=6, per_tensor_scales=per_tensor)
    (loss, s_ref, y_ref), _ = _torch_lbfgs(model, target, 16, 2, config, seed=5)
    s, y, info = synthesize(model, target, (1, 16, 16), 1, 2, 10, config, torch.Generator().manual_seed(5))
    assert torch.equal(s, s_ref) and torch.equal(y, y_ref)
    assert info["cos"] == pytest.approx(1 - loss, abs=1e-6)
    assert info["outer_steps"] == 3 and info["stopped_early"] == 0


def test_batched_evaluation_matches_single_evaluations():
    model = _model()
    grid = MultiGrid(2)
    layout = Layout((1, 1, 16, 16), (4, 10))
    targets = torch.stack([_update(model, 16, seed) for seed in range(3)])
    config = SynthesisConfig()
    xs = torch.randn(3, layout.snapshot_numel + layout.labels_numel, generator=torch.Generator().manual_seed(0))
    with exact_numerics(model.model):
        losses, grads = BatchEvaluator(model, grid, layout, targets, config)(xs, [0, 1, 2])
        for client in range(3):
            loss, grad = SingleEvaluator(model, grid, layout, targets[client], config)(xs[client].clone())
            assert losses[client] == pytest.approx(loss, rel=1e-5)
            torch.testing.assert_close(grads[client], grad, rtol=1e-4, atol=1e-6)
        # a subset of the clients: rows are looked up by client index
        losses_sub, _ = BatchEvaluator(model, grid, layout, targets, config)(xs[[2, 0]], [2, 0])
        assert losses_sub[0] == pytest.approx(losses[2], rel=1e-5) and losses_sub[1] == pytest.approx(losses[0], rel=1e-5)


def test_batched_synthesis_reaches_the_sequential_cosines():
    model = _model()
    targets = [_update(model, 16, seed) for seed in range(4)]
    config = SynthesisConfig(outer_steps=3, lbfgs_max_iter=10)
    sequential = [synthesize(model, t, (1, 16, 16), 1, 2, 10, config, torch.Generator().manual_seed(10 + i))
                  for i, t in enumerate(targets)]
    batched = synthesize_batch(model, targets, (1, 16, 16), 1, 2, 10, config,
                               [torch.Generator().manual_seed(10 + i) for i in range(4)])
    again = synthesize_batch(model, targets, (1, 16, 16), 1, 2, 10, config,
                             [torch.Generator().manual_seed(10 + i) for i in range(4)])
    for (s, y, info), (s2, y2, _), (_, _, seq), target in zip(batched, again, sequential, targets):
        assert torch.equal(s, s2) and torch.equal(y, y2)  # deterministic for the same batch
        assert info["cos"] > info["cos_init"] + 0.2
        assert abs(info["cos"] - seq["cos"]) < 0.1  # LBFGS paths part by rounding; the cosines do not
        g = synthetic_gradient(model, s, y, 2)  # the reported cosine is that of the returned point
        assert abs(float(torch.dot(g, target) / (g.norm() * target.norm()))) == pytest.approx(info["cos"], abs=1e-4)


def test_batched_synthesis_refuses_learnable_tensors():
    model = _model()
    extra = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="cannot learn extra tensors"):
        synthesize_batch(model, [_update(model, 16, 0)] * 2, (1, 16, 16), 1, 2, 10, SynthesisConfig(),
                         [torch.Generator(), torch.Generator()], learnable=[extra])


def test_stop_tolerance_ends_the_search_after_a_step_without_gain():
    model = _model()
    target = _update(model, 16, 1)
    full = synthesize(model, target, (1, 16, 16), 1, 2, 10, SynthesisConfig(outer_steps=4, lbfgs_max_iter=5),
                      torch.Generator().manual_seed(2))[2]
    assert full["outer_steps"] == 4 and full["stopped_early"] == 0
    # a tolerance no step can meet: the search stops after its first outer step
    stopped = synthesize(model, target, (1, 16, 16), 1, 2, 10,
                         SynthesisConfig(outer_steps=4, lbfgs_max_iter=5, stop_tolerance=1.0),
                         torch.Generator().manual_seed(2))[2]
    assert stopped["outer_steps"] == 1 and stopped["stopped_early"] == 1
    assert stopped["iterations"] < full["iterations"]


def test_label_guard_bounds_labels_without_changing_the_direction():
    model = _model()
    target = _update(model, 16, 2)
    plain = synthesize(model, target, (1, 16, 16), 1, 2, 10, SynthesisConfig(outer_steps=4, lbfgs_max_iter=10),
                       torch.Generator().manual_seed(4))
    rms = float(plain[1].square().mean().sqrt())
    assert rms > 1.5, "this target is expected to lengthen Y; pick another seed if the model changed"
    guarded = synthesize(model, target, (1, 16, 16), 1, 2, 10,
                         SynthesisConfig(outer_steps=4, lbfgs_max_iter=10, label_guard=1.5),
                         torch.Generator().manual_seed(4))
    s, y, info = guarded
    generator = torch.Generator().manual_seed(4)
    torch.randn(1, 1, 16, 16, generator=generator)  # the start draws S, then Y
    initial_rms = float(torch.randn(4, 10, generator=generator).square().mean().sqrt())
    assert float(y.square().mean().sqrt()) <= 1.5 * initial_rms + 1e-6
    assert info["label_rescales"] >= 1 and torch.isfinite(s).all()
    # g(S, cY) = c g(S, Y): rescaling labels keeps the decoded direction
    g1 = synthetic_gradient(model, plain[0], plain[1], 2)
    g2 = synthetic_gradient(model, plain[0], plain[1] / rms, 2)
    assert float(torch.dot(g1, g2) / (g1.norm() * g2.norm())) == pytest.approx(1.0, abs=1e-5)


def test_adam_matches_torch_adam():
    model = _model()
    target = _update(model, 16, 3)
    config = SynthesisConfig(optimizer="adam", adam_steps=5, adam_lr=0.05)
    s, y, info = synthesize(model, target, (1, 16, 16), 1, 2, 10, config, torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(6)
    s_ref = torch.randn(1, 1, 16, 16, generator=gen).requires_grad_()
    y_ref = torch.randn(4, 10, generator=gen).requires_grad_()
    single = SingleEvaluator(model, MultiGrid(2), Layout((1, 1, 16, 16), (4, 10)), target, config)
    optimizer = torch.optim.Adam([s_ref, y_ref], lr=0.05)
    best = (math.inf, None)
    with exact_numerics(model.model):
        for _ in range(5):
            loss = single.loss(s_ref, y_ref, True)
            if float(loss.detach()) < best[0]:
                best = (float(loss.detach()), s_ref.detach().clone())
            s_ref.grad, y_ref.grad = torch.autograd.grad(loss, [s_ref, y_ref])
            optimizer.step()
        final = float(single.loss(s_ref.detach(), y_ref.detach(), False))
        if final < best[0]:
            best = (final, s_ref.detach().clone())
    assert info["cos"] == pytest.approx(1 - best[0], abs=1e-5)
    torch.testing.assert_close(s, best[1], rtol=1e-5, atol=1e-6)
