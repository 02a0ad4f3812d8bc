"""Model name -> randomly initialised ``nn.Module`` (no downloaded weights, ever).

Snapshot methods need the server to reproduce a client's gradient exactly, which BatchNorm's
batch statistics make awkward; hence GroupNorm variants (``resnet18_gn``, the small ``cnn`` has no
normalisation at all) next to the torchvision originals.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

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
        _set_vit_in_channels(model, in_channels)
        return model

    return build


def _set_vit_in_channels(model: nn.Module, in_channels: int) -> None:
    """torchvision ViTs hard-code 3 input channels; swap the patch embedding for other inputs."""
    if in_channels != 3:
        old = model.conv_proj
        model.conv_proj = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride)


def _vit_tiny(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A 4-layer, 4-head, 64-wide ViT for small images (MNIST-sized), with a 4x4 patch grid.

    Small enough to train from scratch on a CPU in tests, yet it has the attention/MLP structure
    LoRA experiments care about. Note torchvision zero-initialises the head, so the untrained
    model outputs zeros.
    """
    from torchvision.models import VisionTransformer

    if image_size < 4 or image_size % 4:
        raise ValueError(
            f"model.name=vit_tiny needs an image size divisible by 4 (a 4x4 grid of patches), got {image_size}"
        )
    model = VisionTransformer(
        image_size=image_size, patch_size=image_size // 4, num_layers=4, num_heads=4,
        hidden_dim=64, mlp_dim=128, num_classes=num_classes,
    )
    _set_vit_in_channels(model, in_channels)
    return model


MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "cnn": SmallCNN,
    "mlp": MLP,
    "resnet18": _resnet18,
    "resnet18_gn": lambda c, s, k: _resnet18(c, s, k, norm=_group_norm),
    "regnet_x_400mf": _regnet,
    "vit_b_32": _vit("vit_b_32"),
    "vit_l_32": _vit("vit_l_32"),
    "vit_tiny": _vit_tiny,
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


def _name_some(keys: list[str], limit: int = 5) -> str:
    """At most ``limit`` keys, then how many more: errors stay readable for big models."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors in ``path``, or a ValueError saying why the file is not a usable state_dict.

    ``weights_only=True`` so that a checkpoint file cannot run code when loaded.
    """
    prefix = f"model.pretrained {path!r}:"
    if not os.path.isfile(path):
        raise ValueError(f"{prefix} no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for bad files
        raise ValueError(f"{prefix} cannot be read as a torch state_dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise ValueError(f"{prefix} expected a mapping of parameter names to tensors, got {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{prefix} not a mapping of names to tensors; bad entries: {_name_some(bad)}")
    return dict(state)


def _state_dict_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys, each kind named (truncated) once."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} (file {tuple(given[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items() if k in given and given[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_some(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_name_some(shapes)}")
    return problems


def load_pretrained(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state_dict file into ``net`` strictly (every key, every shape).

    Local files only, never a hub: runs happen on compute nodes without network, and a silent
    partial load would make a "pretrained" run quietly train from random weights. Call it before
    ``lora.apply_lora`` (wrapping renames the keys). Errors are ``ValueError``s that start with
    ``model.pretrained '<path>':`` and name the offending keys.
    """
    path = os.fspath(path)
    state = _read_state_dict(path)
    problems = _state_dict_problems(net.state_dict(), state)
    if problems:
        raise ValueError(f"model.pretrained {path!r}: " + "; ".join(problems))
    net.load_state_dict(state, strict=True)
