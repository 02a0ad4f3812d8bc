"""Model name -> randomly initialised ``nn.Module`` (no downloaded weights, ever).

Snapshot methods need the server to reproduce a client's gradient exactly, which BatchNorm's
batch statistics make awkward; hence GroupNorm variants (``resnet18_gn``, the small ``cnn`` has no
normalisation at all) next to the torchvision originals.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class SmallCNN(nn.Module):
    """The 3SFC "MnistNet": conv(1->16,3) ReLU conv(16->32,3) ReLU maxpool2, fc 64, fc classes.

    300,426 parameters at 28x28 and 10 classes. The flatten size follows the input size, so the
    same net serves 8x8 digits.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        if image_size < 6:
            raise ValueError(f"model.name=cnn needs images of at least 6x6 pixels, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2)
        )
        side = (image_size - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """784-200-200-10 style MLP (3SFC's other small model); cheap for tests."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, hidden: int = 200) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(32, channels), channels)


def _resnet18(in_channels: int, image_size: int, num_classes: int, norm: Callable | None = None) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes, **({"norm_layer": norm} if norm else {}))
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _regnet(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    from torchvision.models import regnet_x_400mf

    model = regnet_x_400mf(weights=None, num_classes=num_classes)
    if in_channels != 3:
        old = model.stem[0]
        model.stem[0] = nn.Conv2d(in_channels, old.out_channels, 3, stride=2, padding=1, bias=False)
    return model


def _vit(arch: str) -> Callable[[int, int, int], nn.Module]:
    def build(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        if image_size % 32:
            raise ValueError(f"model.name={arch} needs a resolution divisible by 32, got {image_size}")
        model = getattr(tvm, arch)(weights=None, num_classes=num_classes, image_size=image_size)
        if in_channels != 3:
            old = model.conv_proj
            model.conv_proj = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride)
        return model

    return build


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "cnn": SmallCNN,
    "mlp": MLP,
    "resnet18": _resnet18,
    "resnet18_gn": lambda c, s, k: _resnet18(c, s, k, norm=_group_norm),
    "regnet_x_400mf": _regnet,
    "vit_b_32": _vit("vit_b_32"),
    "vit_l_32": _vit("vit_l_32"),
}


def build_model(name: str, in_channels: int, image_size: int, num_classes: int, seed: int = 0) -> nn.Module:
    """Build ``name`` with weights drawn from ``seed`` (the same on every rank)."""
    if name not in MODELS:
        raise ValueError(f"model.name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](in_channels, image_size, num_classes)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
