"""A learnable multi-grid function for OS-Fed: FSRCNN upsamples the cells instead of bilinear resizing.

OS-Fed D.2 / Table 9 replaces the bilinear upsampler of the multi-grid function F with a "lightweight
FSRCNN" and reports gains at factor 8. The paper does not say who holds the FSRCNN's weights; the
decoder must be bit-identical on client and server, so both must use the very same weights. Three
ownership modes (``algorithm.fsrcnn_mode``, see ``osfed_hpc.algorithms.osfed``):

* ``fixed``: weights drawn from the run's seed (``shared_init``); every party builds the same network
  and nothing is sent. "Learnable" only in name: a fixed random non-linear upsampler.
* ``client``: each client optimises the weights jointly with its snapshot and labels and sends them
  with the snapshot (the server decodes with the sent weights).
* ``server``: the server trains the FSRCNN once, without client data, to super-resolve a public
  natural image (``train_server_fsrcnn``), and broadcasts the weights; clients cache them.

Architecture (Dong et al., ECCV 2016, as in yjn870/FSRCNN-pytorch): conv 5x5 C->d + PReLU(d); conv 1x1
d->s + PReLU(s); m x (conv 3x3 s->s + PReLU(s)); conv 1x1 s->d + PReLU(d); transposed conv 9x9 d->C,
stride f, padding 4, output padding f-1, so the output is exactly f times the input. With the paper's
d=56, s=12, m=4: 12,809 parameters for C=1 (51,236 B float32), 24,683 for C=3 (98,732 B).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .rng import torch_stream

#: the rng purposes: the shared initial weights and the server's training stream
INIT_PURPOSE = "fsrcnn-init"
TRAIN_PURPOSE = "fsrcnn-server-train"


@dataclass(frozen=True)
class FSRCNNShape:
    """What fixes the network's layout (and so its flat weight vector): channels, factor, d, s, m."""

    channels: int
    factor: int
    d: int = 56
    s: int = 12
    m: int = 4

    @property
    def num_parameters(self) -> int:
        """Weights and biases of every layer plus one PReLU slope per channel (factor-independent)."""
        c, d, s, m = self.channels, self.d, self.s, self.m
        first = c * d * 25 + d + d
        shrink = d * s + s + s
        maps = m * (s * s * 9 + s + s)
        expand = s * d + d + d
        deconv = d * c * 81 + c
        return first + shrink + maps + expand + deconv


class FSRCNN(nn.Module):
    """FSRCNN(factor): [N, C, h, w] -> [N, C, f*h, f*w]."""

    def __init__(self, shape: FSRCNNShape) -> None:
        super().__init__()
        c, d, s, m, f = shape.channels, shape.d, shape.s, shape.m, shape.factor
        self.shape = shape
        self.first_part = nn.Sequential(nn.Conv2d(c, d, 5, padding=2), nn.PReLU(d))
        layers: list[nn.Module] = [nn.Conv2d(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
        layers += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
        self.mid_part = nn.Sequential(*layers)
        self.last_part = nn.ConvTranspose2d(d, c, 9, stride=f, padding=4, output_padding=f - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_part(self.mid_part(self.first_part(x)))

    # the flat weight vector: what goes on the wire and into client state -------------------------
    def vector(self) -> np.ndarray:
        """All parameters, float32, in ``parameters()`` order (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()]).to("cpu", torch.float32).numpy().copy()

    @torch.no_grad()
    def load_vector(self, values: np.ndarray) -> FSRCNN:
        """Copy a flat float32 vector into the parameters; raise ``ValueError`` on a wrong size."""
        values = np.asarray(values)
        if values.shape != (self.shape.num_parameters,) or not np.isfinite(values).all():
            raise ValueError(f"FSRCNN weights must be {self.shape.num_parameters} finite values, got shape "
                             f"{list(values.shape)}")
        flat = torch.from_numpy(np.array(values, dtype=np.float32))
        offset = 0
        for p in self.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return self


def reference_init(net: FSRCNN, generator: torch.Generator) -> FSRCNN:
    """yjn870's initialisation, drawn from ``generator`` (CPU) so every party gets the same numbers:
    convs N(0, sqrt(2 / (out * k^2))), the deconvolution N(0, 0.001), zero biases, PReLU slopes 0.25."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                std = math.sqrt(2.0 / (module.out_channels * module.weight[0, 0].numel()))
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                module.bias.zero_()
            elif isinstance(module, nn.ConvTranspose2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.001)
                module.bias.zero_()
            elif isinstance(module, nn.PReLU):
                module.weight.fill_(0.25)
    return net


def shared_init(shape: FSRCNNShape, seed: int, init: str = "unit") -> FSRCNN:
    """The FSRCNN every party can build from the run's seed alone (CPU, float32).

    ``init="reference"``: yjn870's initialisation as is. Its N(0, 0.001) deconvolution makes the
    output ~1e-3 of the input (std 0.0013 for N(0, 1) cells at d=56), right for training from
    scratch but a poor upsampler to use untrained (``fixed``) or as the first round's start
    (``client``): every decoded sample would be nearly zero. ``init="unit"`` (ours, the default)
    then multiplies the deconvolution weights by the power of two that brings the output std of
    a N(0, 1) probe batch (drawn from the same stream) closest to 1, the scale of a bilinear
    decoding. A power of two is exact in float32 and robust to the last-bit differences a probe
    forward may have on different thread counts, so every party still gets the same weights.
    """
    if init not in ("unit", "reference"):
        raise ValueError(f"algorithm.fsrcnn_init must be 'unit' or 'reference', got {init!r}")
    generator = torch_stream(seed, INIT_PURPOSE, shape.factor)
    net = reference_init(FSRCNN(shape), generator)
    if init == "unit":
        probe = torch.randn((16, shape.channels, 8, 8), generator=generator)
        with torch.no_grad():
            std = float(net(probe).std())
            if std > 0 and math.isfinite(std):
                net.last_part.weight.mul_(2.0 ** round(-math.log2(std)))
    return net


class FSRCNNGrid:
    """The multi-grid function F with an FSRCNN upsampler: [M, C, H, W] -> [M*f*f, C, H, W].

    The same f x f split and order as ``snapshot.multigrid_uniform`` (snapshot-major, cells
    row-major); every (H/f) x (W/f) cell goes through ``net``, whose output is exactly H x W.
    Unlike bilinear resizing it is not linear in S (PReLU), but it is deterministic and, given the
    weights, identical on client and server.
    """

    def __init__(self, net: FSRCNN) -> None:
        self.net = net
        self.factor = net.shape.factor
        self.leaves = None

    @property
    def samples_per_snapshot(self) -> int:
        return self.factor * self.factor

    def check_resolution(self, height: int, width: int) -> None:
        if self.factor < 2 or height % self.factor or width % self.factor:
            raise ValueError(f"multi-grid factor {self.factor} does not divide the snapshot resolution {height}x{width} "
                             f"(the FSRCNN upsampler needs a factor >= 2 that divides both sides)")

    def __call__(self, snapshots: torch.Tensor) -> torch.Tensor:
        m, c, h, w = snapshots.shape
        self.check_resolution(h, w)
        f = self.factor
        ch, cw = h // f, w // f
        cells = snapshots.reshape(m, c, f, ch, f, cw).permute(0, 2, 4, 1, 3, 5).reshape(m * f * f, c, ch, cw)
        return self.net(cells)


def grid_from_vector(shape: FSRCNNShape, values: np.ndarray, device: torch.device, learnable: bool = False) -> FSRCNNGrid:
    """A fresh FSRCNN holding ``values`` on ``device``. Client and server both build the decoder this
    way from the wire vector, so they run the same module layout on the same numbers."""
    net = FSRCNN(shape).load_vector(values).to(device)
    net.requires_grad_(learnable)
    return FSRCNNGrid(net)


# --------------------------------------------------------------------------------------------
# the server's training data: a public natural image, never client data


def public_image(channels: int) -> np.ndarray:
    """scikit-learn's bundled ``china.jpg`` (427 x 640, RGB) as float32 [C, H, W] in [0, 1].

    Why this image: it ships inside scikit-learn (no download, no client data), it is a natural
    photograph with edges and texture at many scales, and the same bytes exist on every machine.
    One channel: ITU-R 601-2 luma (PIL's ``convert("L")``), the usual grey-scale conversion.
    """
    try:
        from PIL import Image
        from sklearn.datasets import load_sample_image
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "algorithm.fsrcnn_mode=server trains on scikit-learn's sample image: pip install 'osfed-hpc[demo]'"
        ) from exc
    rgb = load_sample_image("china.jpg")
    if channels == 1:
        pixels = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)[None]
    elif channels == 3:
        pixels = rgb.astype(np.float32).transpose(2, 0, 1)
    else:
        raise ValueError(f"algorithm.fsrcnn_mode=server needs 1 or 3 input channels, the model has {channels}")
    return np.ascontiguousarray(pixels / 255.0)


def sr_batch(image: torch.Tensor, size: tuple[int, int], factor: int, batch: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high): ``batch`` random crops of ``image`` ([C, H, W]), each of a random side between
    the target size and the whole short side, area-resized to ``size`` (high) and bicubic-downsampled
    by ``factor`` (low), the standard super-resolution degradation. Random crop sizes show the network
    the photograph at many scales, so a 28-px target still sees edges rather than flat sky."""
    _, height, width = image.shape
    th, tw = size
    highs = []
    short = min(height, width)
    for _ in range(batch):
        side = int(torch.randint(min(th, tw), short + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        crop = image[None, :, top : top + side, left : left + side]
        highs.append(F.interpolate(crop, size=(th, tw), mode="area"))
    high = torch.cat(highs)
    low = F.interpolate(high, size=(th // factor, tw // factor), mode="bicubic", align_corners=False, antialias=True)
    return low, high


def train_server_fsrcnn(
    shape: FSRCNNShape,
    resolution: tuple[int, int],
    pixel_mean_std: tuple[tuple[float, ...], tuple[float, ...]],
    seed: int,
    steps: int,
    batch: int = 32,
    lr: float = 3e-3,
    init: str = "reference",
) -> tuple[FSRCNN, dict[str, float]]:
    """Train the shared-seed FSRCNN to super-resolve the public image (MSE, Adam), on CPU, in the
    dataset's normalised input space (snapshots live there). Deterministic given (seed, shape,
    resolution, steps): every draw comes from ``torch_stream(seed, TRAIN_PURPOSE, factor)``.

    Starts from the reference init (near-zero output, as FSRCNN training does): the "unit" init
    amplifies the image's non-zero mean and starts 10-40x worse. Measured at 28 px, factor 4, one
    channel (held-out crops of the same image): bilinear MSE 0.072, bicubic 0.064, this FSRCNN
    0.067 / 0.060 / 0.056 after 500 / 800 / 1200 steps of batch 32 at lr 3e-3 (~40 ms a step on
    one core).
    Returns the network and {"loss_start", "loss", "bilinear_loss"} (MSE of the first and last
    batch, and of bilinear upsampling on the last batch, for reference)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in pixel_mean_std)
    image = (torch.from_numpy(public_image(shape.channels)) - mean) / std
    net = shared_init(shape, seed, init)
    generator = torch_stream(seed, TRAIN_PURPOSE, shape.factor)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    first = last = bilinear = math.nan
    with torch.enable_grad():
        for step in range(steps):
            low, high = sr_batch(image, resolution, shape.factor, batch, generator)
            loss = F.mse_loss(net(low), high)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = float(loss.detach())
            first = last if step == 0 else first
            if step == steps - 1:
                with torch.no_grad():
                    up = F.interpolate(low, size=resolution, mode="bilinear", align_corners=False)
                    bilinear = float(F.mse_loss(up, high))
    net.requires_grad_(False)
    return net, {"loss_start": first, "loss": last, "bilinear_loss": bilinear}
