"""Multi-grid functions, the synthetic gradient, synthesis, and 8-bit snapshot coding."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.snapshot import (
    MultiGrid,
    check_leaves,
    default_multiscale_leaves,
    exact_numerics,
    multigrid_multiscale,
    multigrid_uniform,
    synthetic_gradient,
)
from osfed_hpc.snapshot_coding import decode_snapshots, dequantize, encode_snapshots
from osfed_hpc.snapshot_search import SynthesisConfig, synthesize


def _cell_snapshots(m: int, c: int, size: int, factor: int) -> torch.Tensor:
    """Snapshots whose f x f cells are constant, with value 100*m + 10*i + j + channel/10."""
    cell = size // factor
    s = torch.empty(m, c, size, size)
    for a in range(m):
        for i in range(factor):
            for j in range(factor):
                for ch in range(c):
                    s[a, ch, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = 100 * a + 10 * i + j + ch / 10
    return s


# multi-grid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_uniform_shape(factor):
    s = torch.randn(3, 2, 16, 16)
    assert multigrid_uniform(s, factor).shape == (3 * factor * factor, 2, 16, 16)


def test_uniform_factor_one_is_identity():
    s = torch.randn(2, 3, 12, 12)
    assert torch.equal(multigrid_uniform(s, 1), s)


def test_uniform_rejects_indivisible_resolution():
    with pytest.raises(ValueError, match=r"factor 3 .*28x28"):
        multigrid_uniform(torch.zeros(1, 1, 28, 28), 3)


def test_uniform_is_linear():
    a, b = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    left = multigrid_uniform(2.5 * a - 0.5 * b, 4)
    right = 2.5 * multigrid_uniform(a, 4) - 0.5 * multigrid_uniform(b, 4)
    torch.testing.assert_close(left, right)


def test_uniform_cell_order_and_values():
    factor = 4
    s = _cell_snapshots(2, 2, 16, factor)
    out = multigrid_uniform(s, factor)
    for a in range(2):
        for i in range(factor):
            for j in range(factor):
                sample = out[a * factor * factor + i * factor + j]
                for ch in range(2):  # a constant cell resizes to a constant image
                    torch.testing.assert_close(sample[ch], torch.full((16, 16), 100 * a + 10 * i + j + ch / 10))


def test_uniform_matches_bilinear_resize_of_a_cell():
    s = torch.randn(1, 3, 16, 16)
    out = multigrid_uniform(s, 2)
    cell = s[:, :, 8:, :8]  # row 1, col 0 -> sample 2
    expected = F.interpolate(cell, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(out[2:3], expected)


def test_default_multiscale_layout():
    leaves = default_multiscale_leaves(8)
    assert len(leaves) == 40
    check_leaves(leaves, 8)
    assert sorted({size for _, _, size in leaves}) == [1, 2]
    # at grid 4 (28-32 px snapshots) the layout must still mix two cell sizes, not fall back to uniform 4x4
    small = default_multiscale_leaves(4)
    check_leaves(small, 4)
    assert small == ((0, 0, 2), (0, 2, 1), (0, 3, 1), (1, 2, 1), (1, 3, 1),
                     (2, 0, 1), (2, 1, 1), (3, 0, 1), (3, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        default_multiscale_leaves(6)


@pytest.mark.parametrize(
    "leaves, message",
    [
        (((0, 0, 2), (0, 2, 2), (2, 0, 2)), "cover"),
        (((0, 0, 4), (0, 0, 1)), "overlaps"),
        (((0, 0, 2), (0, 2, 2), (2, 0, 2), (2, 2, 3)), "outside"),
    ],
)
def test_multiscale_leaves_must_tile(leaves, message):
    with pytest.raises(ValueError, match=message):
        check_leaves(leaves, 4)


def test_multiscale_order_and_values():
    s = _cell_snapshots(2, 1, 16, 4)  # unit cells of 4 px, value 100a + 10i + j
    leaves = ((0, 2, 1), (0, 0, 2), (3, 3, 1), (2, 0, 2), (0, 3, 1), (1, 2, 1), (1, 3, 1), (2, 2, 1), (2, 3, 1),
              (3, 2, 1))
    check_leaves(leaves, 4)
    out = multigrid_multiscale(s, 4, leaves)
    assert out.shape == (20, 1, 16, 16)
    for a in range(2):
        for k, (r, c, size) in enumerate(leaves):
            sample = out[a * len(leaves) + k, 0]
            expected = F.interpolate(s[a : a + 1, :, r * 4 : (r + size) * 4, c * 4 : (c + size) * 4], size=(16, 16),
                                     mode="bilinear", align_corners=False)[0, 0]
            assert torch.equal(sample, expected)
    assert out[2].eq(33).all() and out[12].eq(133).all()  # leaf (3, 3, 1) of each snapshot
    assert out[1, 0, 0, 0] != out[1, 0, 15, 15]  # leaf (0, 0, 2) spans four different unit cells


def test_multigrid_spec_dispatch():
    s = torch.randn(1, 1, 16, 16)
    assert torch.equal(MultiGrid(2)(s), multigrid_uniform(s, 2))
    whole = MultiGrid(4, ((0, 0, 4),))
    assert whole.samples_per_snapshot == 1 and torch.equal(whole(s), s)


# synthetic gradient -------------------------------------------------------------------------


class _PartlyUsed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(16, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x.flatten(1))


def test_synthetic_gradient_matches_backward_and_leaves_no_grad():
    model = FlatModel(build_model("cnn", 1, 12, 5, seed=0))
    s, y = torch.randn(1, 1, 12, 12), torch.randn(4, 5)
    g = synthetic_gradient(model, s, y, 2)
    assert g.shape == (model.param_numel,)
    assert all(p.grad is None for p in model.model.parameters())
    ref = copy.deepcopy(model.model)
    F.cross_entropy(ref(multigrid_uniform(s, 2)), y).backward()
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in ref.parameters()]))


def test_synthetic_gradient_zero_for_unused_and_frozen_parameters():
    model = FlatModel(_PartlyUsed())
    model.model.used.bias.requires_grad_(False)  # frozen after flattening: still in the vector, gets 0
    g = synthetic_gradient(model, torch.randn(1, 1, 4, 4), torch.randn(1, 3), 1)
    sizes = [p.numel() for p in model.model.parameters()]
    weight, bias, unused = g[: sizes[0]], g[sizes[0] : sizes[0] + 3], g[sizes[0] + 3 :]
    assert weight.abs().sum() > 0 and not bias.any() and not unused.any()


def test_parameters_frozen_before_flattening_are_not_in_the_vector():
    net = _PartlyUsed()
    net.used.bias.requires_grad_(False)
    model = FlatModel(net)
    assert model.param_numel == sum(p.numel() for p in net.parameters()) - 3
    g = synthetic_gradient(model, torch.randn(1, 1, 4, 4), torch.randn(1, 3), 1)
    assert g.numel() == model.param_numel
    bias = net.used.bias.detach().clone()
    model.vector.zero_()
    assert torch.equal(net.used.bias, bias)  # the frozen tensor keeps its own storage


def test_exact_numerics_restores_settings_and_modes():
    net = build_model("mlp", 1, 4, 2)
    net.train()
    net.net[1].eval()
    before = (torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled())
    with exact_numerics(net):
        assert not net.training and torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled()) == before
    assert net.training and not net.net[1].training


# synthesis ----------------------------------------------------------------------------------


def _real_update(model: FlatModel, size: int, seed: int = 0) -> torch.Tensor:
    """-lr * gradient of a random labelled batch: a realistic synthesis target."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 1, size, size, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    grads = torch.autograd.grad(F.cross_entropy(model.model(x), y), list(model.model.parameters()))
    return -0.05 * torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_synthesis_raises_cosine(optimizer):
    model = FlatModel(build_model("cnn", 1, 28, 10, seed=0))
    target = _real_update(model, 28)
    config = SynthesisConfig(optimizer=optimizer, outer_steps=2, lbfgs_max_iter=10, adam_steps=30)
    s, y, info = synthesize(model, target, (1, 28, 28), 1, 2, 10, config, torch.Generator().manual_seed(3))
    assert s.shape == (1, 1, 28, 28) and y.shape == (4, 10)
    g = synthetic_gradient(model, s, y, 2)
    cos = abs(float(torch.dot(g, target) / (g.norm() * target.norm())))
    assert cos == pytest.approx(info["cos"], abs=1e-4)
    assert info["cos"] > info["cos_init"] + 0.2 and info["cos"] > 0.4
    assert info["iterations"] > 0 and info["seconds"] > 0


def test_synthesis_is_deterministic_and_uses_only_the_generator():
    model = FlatModel(build_model("mlp", 1, 8, 10, seed=0))
    target = _real_update(model, 8)
    config = SynthesisConfig(outer_steps=1, lbfgs_max_iter=5)
    torch.manual_seed(1)
    a = synthesize(model, target, (1, 8, 8), 2, 2, 10, config, torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    b = synthesize(model, target, (1, 8, 8), 2, 2, 10, config, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (8, 10)


def test_synthesis_with_nan_target_returns_finite_initial_point():
    model = FlatModel(build_model("mlp", 1, 8, 10, seed=0))
    target = torch.full((model.param_numel,), float("nan"))
    s, y, info = synthesize(model, target, (1, 8, 8), 1, 1, 10, SynthesisConfig(outer_steps=1, lbfgs_max_iter=3),
                            torch.Generator().manual_seed(0))
    assert torch.isfinite(s).all() and torch.isfinite(y).all() and np.isnan(info["cos"])
    assert info["iterations"] == 0


# 8-bit coding -------------------------------------------------------------------------------


def _on_grid(codes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Float snapshots that lie exactly on the 8-bit grid of [lo, hi]."""
    ranges = np.tile(np.array([[lo, hi]], dtype=np.float32), (codes.shape[0], 1))
    return dequantize(codes, ranges)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_png_round_trip_is_lossless_and_counts_bytes(channels):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (2, channels, 12, 12), dtype=np.uint8)
    codes[:, 0, 0, 0], codes[:, 0, 0, 1] = 0, 255  # the range is exactly [lo, hi]
    snapshots = _on_grid(codes, -1.5, 2.25)
    arrays = encode_snapshots(torch.from_numpy(snapshots), "png")
    decoded = decode_snapshots(arrays, snapshots.shape, "png")
    assert decoded.dtype == torch.float32 and torch.equal(decoded, torch.from_numpy(snapshots))
    sizes = []
    for plane in codes:
        buffer = io.BytesIO()
        image = Image.fromarray(plane.transpose(1, 2, 0)) if channels == 3 else Image.fromarray(
            plane.reshape(-1, 12))
        image.save(buffer, format="PNG")
        sizes.append(len(buffer.getvalue()))
    assert arrays["snapshot_lengths"].tolist() == sizes
    assert arrays["snapshot_bytes"].size == sum(sizes)
    assert arrays["snapshot_range"].dtype == np.float32 and arrays["snapshot_range"].shape == (2, 2)


def test_png_quantisation_error_is_half_a_step():
    snapshots = torch.randn(1, 3, 8, 8)
    arrays = encode_snapshots(snapshots, "png")
    lo, hi = arrays["snapshot_range"][0]
    error = (decode_snapshots(arrays, (1, 3, 8, 8), "png") - snapshots).abs().max()
    assert error <= (hi - lo) / 255 * 0.5 + 1e-6


def test_constant_snapshot_round_trips():
    snapshots = torch.full((1, 1, 8, 8), 0.75)
    assert torch.equal(decode_snapshots(encode_snapshots(snapshots, "png"), (1, 1, 8, 8), "png"), snapshots)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_error_is_bounded(channels):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy) for k in range(channels)])[None]
    arrays = encode_snapshots(smooth, "jpeg", quality=90)
    decoded = decode_snapshots(arrays, smooth.shape, "jpeg")
    span = float(smooth.max() - smooth.min())
    assert (decoded - smooth).abs().max() < 0.05 * span
    assert (decoded - smooth).abs().mean() < 0.01 * span
    noisy = torch.randn(1, channels, 32, 32)
    error = (decode_snapshots(encode_snapshots(noisy, "jpeg", 90), noisy.shape, "jpeg") - noisy).abs().mean()
    assert error < 0.05 * float(noisy.max() - noisy.min())


def _damaged(arrays: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    return {**arrays, **changes}


def test_damaged_coded_snapshots_raise_value_error():
    snapshots = torch.randn(2, 1, 8, 8)
    arrays = encode_snapshots(snapshots, "png")
    data, lengths = arrays["snapshot_bytes"], arrays["snapshot_lengths"]
    garbage = data.copy()
    garbage[8:40] = 7  # inside the first image's header/data chunks
    swapped = np.concatenate([data[lengths[0] :], data[: lengths[0]]])  # lengths no longer match images
    bad_cases = [
        _damaged(arrays, snapshot_bytes=data[:-5]),
        _damaged(arrays, snapshot_bytes=garbage),
        _damaged(arrays, snapshot_bytes=swapped) if lengths[0] != lengths[1] else None,
        _damaged(arrays, snapshot_lengths=np.array([lengths[0] - 3, lengths[1] + 3], dtype=np.int32)),
        _damaged(arrays, snapshot_lengths=np.array([0, lengths.sum()], dtype=np.int32)),
        _damaged(arrays, snapshot_lengths=lengths[:1]),
        _damaged(arrays, snapshot_range=np.array([[0, np.nan], [0, 1]], dtype=np.float32)),
        _damaged(arrays, snapshot_range=np.array([[1, 0], [0, 1]], dtype=np.float32)),
    ]
    for case in filter(None, bad_cases):
        with pytest.raises(ValueError):
            decode_snapshots(case, (2, 1, 8, 8), "png")
    with pytest.raises(ValueError, match="expected L"):
        decode_snapshots(arrays, (2, 1, 4, 16), "png")  # right byte count, wrong image size
    with pytest.raises(ValueError):
        decode_snapshots(arrays, (2, 1, 8, 8), "jpeg")  # a PNG is not a JPEG


def test_quantising_non_finite_snapshot_raises():
    with pytest.raises(ValueError, match="NaN"):
        encode_snapshots(torch.tensor([[[[float("nan")]]]]), "png")


def test_vit_synthesis_runs_on_the_math_attention_backend():
    from torchvision.models.vision_transformer import VisionTransformer

    net = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=5)
    model = FlatModel(net)
    s, y = torch.randn(1, 3, 16, 16, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    net.eval()
    with pytest.raises(RuntimeError, match="not implemented"):  # fused attention has no double backward
        torch.autograd.grad(synthetic_gradient(model, s, y, 2, create_graph=True).sum(), [s])
    target = torch.randn(model.param_numel, generator=torch.Generator().manual_seed(0))
    s, y, info = synthesize(model, target, (3, 16, 16), 1, 2, 5, SynthesisConfig(outer_steps=1, lbfgs_max_iter=3),
                            torch.Generator().manual_seed(0))
    # 3 evaluations in the step + the re-evaluation after it
    assert info["iterations"] == 4 and torch.isfinite(s).all() and info["cos"] >= info["cos_init"]
