"""Our own small LoRA layers (Hu et al., 2021) for federated fine-tuning.

Why not ``peft``: the runner moves the *trainable* parameters as one flat vector and the server's
LoRA-FAIR correction works on slices of that vector, so we need to know exactly which tensors are
trainable, in which order, with which shapes, and their initial values must follow from a given
``torch.Generator`` alone (every rank builds the same adapters without communicating).

Conventions:

* Every adapter stores its factors as **2-D matrices**: ``lora_A`` is ``r x fan_in`` (``fan_in`` is
  ``in_features`` or ``in_channels * kh * kw``) and ``lora_B`` is ``out x r``. Convolutional
  adapters only *view* them as 4-D kernels inside ``forward``. Because the parameters are 2-D,
  ``FlatModel(channels_last=True)`` never permutes them, so a slice of the flat trainable vector
  reshaped to ``lora_A.shape`` is the matrix ``A`` row-major, whatever the memory format.
* ``delta = (alpha / r) * B @ A`` has the shape of the base weight flattened to 2-D; for a conv it
  is exactly the merged kernel (``B`` is a 1x1 conv, so ``B(A(x)) == conv(x, B @ A)``).
* Parameter order inside an adapter is ``base.weight, base.bias, lora_A, lora_B``; only the last
  two require gradients. Adapters appear in ``net.modules()`` order.

Limitations (documented rather than hidden):

* Children of ``nn.MultiheadAttention`` (its ``out_proj``) are never wrapped: the attention
  forward reads ``in_proj_weight`` and ``out_proj.weight`` directly and never calls
  ``out_proj.forward``, so an adapter there would be silently ignored. They stay frozen; in a
  torchvision ViT only the MLP blocks, the patch embedding and the head adapt.
* Convolutions with ``groups != 1`` or a ``padding_mode`` other than ``"zeros"`` get no adapter
  and stay frozen (a low-rank ``B @ A`` does not factor a grouped kernel, and we do not re-implement
  non-zero padding modes).
* Load pretrained weights *before* ``apply_lora``: wrapping renames ``x.weight`` to
  ``x.base.weight``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive finite number, got {alpha!r}")


def _kaiming_uniform_cpu(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` drawn on the CPU from ``generator``.

    This is the bound ``nn.Linear`` gets from ``kaiming_uniform_(a=sqrt(5))``, the init the
    reference LoRA implementation uses for ``A``. Drawing on the CPU in float32 makes the values
    independent of the device and dtype the model later lives on.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"LoRA init needs a CPU torch.Generator, got one on {generator.device}")
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class LoRALayer(nn.Module):
    """Shared part of the adapters: a frozen ``base`` plus trainable ``lora_A`` / ``lora_B``.

    ``A`` is random and ``B`` zero, so at initialisation the adapted layer computes exactly what the
    base layer computes (the added term is an exact zero).
    """

    base: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base: nn.Module, fan_in: int, out: int, rank: int, alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.base = base
        _freeze(base)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        weight = base.weight
        a = _kaiming_uniform_cpu((rank, fan_in), fan_in, generator)
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, device=weight.device, dtype=weight.dtype))

    def a_matrix(self) -> torch.Tensor:
        """``A`` as ``r x fan_in`` (the parameter itself, not a copy)."""
        return self.lora_A

    def b_matrix(self) -> torch.Tensor:
        """``B`` as ``out x r`` (the parameter itself, not a copy)."""
        return self.lora_B

    def delta(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """``(alpha/r) * B @ A`` as ``out x fan_in``; pass ``a``/``b`` to use other factors.

        The optional factors let the server evaluate the update of an *aggregated* or corrected
        ``A``/``B`` (e.g. slices of a flat vector, reshaped) with this layer's scaling.
        """
        a = self.lora_A if a is None else a.reshape(self.lora_A.shape)
        b = self.lora_B if b is None else b.reshape(self.lora_B.shape)
        return self.scaling * (b @ a)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class LoRALinear(LoRALayer):
    """``base(x) + (alpha/r) * (x @ A^T) @ B^T`` with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__(base, base.in_features, base.out_features, rank, alpha, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def conv_supports_lora(conv: nn.Conv2d) -> bool:
    """Whether ``LoRAConv2d`` can wrap ``conv`` (ungrouped, zero padding)."""
    return conv.groups == 1 and conv.padding_mode == "zeros"


class LoRAConv2d(LoRALayer):
    """``base(x) + (alpha/r) * B(A(x))``: ``A`` is a conv in->r with the base's kernel size, stride,
    padding and dilation, ``B`` a 1x1 conv r->out, neither with a bias. Both are stored 2-D (see
    the module docstring) and viewed as kernels here."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator) -> None:
        if not conv_supports_lora(base):
            raise ValueError(
                f"LoRAConv2d needs groups=1 and padding_mode='zeros', got groups={base.groups}, "
                f"padding_mode={base.padding_mode!r}"
            )
        kh, kw = base.kernel_size
        super().__init__(base, base.in_channels * kh * kw, base.out_channels, rank, alpha, generator)
        self.kernel_size = (kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base
        a = self.lora_A.view(self.rank, conv.in_channels, *self.kernel_size)
        b = self.lora_B.view(conv.out_channels, self.rank, 1, 1)
        h = F.conv2d(x, a, None, conv.stride, conv.padding, conv.dilation)
        return conv(x) + self.scaling * F.conv2d(h, b)


def find_head(net: nn.Module, num_classes: int) -> nn.Linear:
    """The classification head: the last ``nn.Linear`` in ``net.modules()`` order with
    ``out_features == num_classes``. It stays fully trainable because a new task's classes have
    no pretrained head to adapt."""
    heads = [m for m in net.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        raise ValueError(f"LoRA: no nn.Linear with out_features={num_classes} (the classification head) in the model")
    return heads[-1]


def _wrap_children(module: nn.Module, head: nn.Module, rank: int, alpha: float,
                   generator: torch.Generator, done: dict[int, nn.Module]) -> None:
    """Replace wrappable children in place, depth first in ``modules()`` order, so the generator
    is consumed in the same order on every rank. ``done`` maps ``id(original)`` to its wrapper so a
    module shared between two parents gets one adapter, not two."""
    if isinstance(module, nn.MultiheadAttention):
        return  # its projections are used as raw weights; an adapter would be bypassed
    for name, child in list(module.named_children()):
        if id(child) in done:
            setattr(module, name, done[id(child)])
            continue
        wrapper: nn.Module | None = None
        if child is head or isinstance(child, LoRALayer):
            pass
        elif isinstance(child, nn.Linear):
            wrapper = LoRALinear(child, rank, alpha, generator)
        elif isinstance(child, nn.Conv2d) and conv_supports_lora(child):
            wrapper = LoRAConv2d(child, rank, alpha, generator)
        else:
            _wrap_children(child, head, rank, alpha, generator, done)
        if wrapper is not None:
            done[id(child)] = wrapper
            setattr(module, name, wrapper)


def apply_lora(net: nn.Module, rank: int, alpha: float, generator: torch.Generator,
               num_classes: int) -> nn.Module:
    """Turn ``net`` (in place) into a LoRA model and return it.

    Every parameter is frozen, then every ``nn.Linear`` / ``nn.Conv2d`` except the head (see
    ``find_head``) is replaced by its adapter, recursively in ``net.modules()`` order; the head's
    weight and bias are made trainable. ``A`` factors are drawn from ``generator`` (a CPU generator)
    in that order, so the same generator state gives the same adapters on any device.
    Children of ``nn.MultiheadAttention`` and grouped convolutions stay frozen without adapter.
    """
    _check_rank_alpha(rank, alpha)
    head = find_head(net, num_classes)
    _freeze(net)
    _wrap_children(net, head, rank, alpha, generator, {})
    for p in head.parameters():
        p.requires_grad_(True)
    return net


def lora_layers(net: nn.Module) -> list[tuple[str, LoRALayer]]:
    """All adapters with their qualified names, in ``net.named_modules()`` order (fixed for a
    given architecture, hence the same on every rank)."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, LoRALayer)]


def lora_A_matrix(layer: LoRALayer) -> torch.Tensor:
    """``A`` of ``layer`` as an ``r x (in * kh * kw)`` matrix."""
    return layer.a_matrix()


def lora_B_matrix(layer: LoRALayer) -> torch.Tensor:
    """``B`` of ``layer`` as an ``out x r`` matrix."""
    return layer.b_matrix()


def lora_delta(layer: LoRALayer, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's effective weight update ``(alpha/r) * B @ A`` as an ``out x (in*kh*kw)``
    matrix, optionally for other factors ``a``/``b`` (any tensors with ``A``'s/``B``'s numel)."""
    return layer.delta(a, b)


class LoRASlices(NamedTuple):
    """Where one adapter's factors sit in the flat vector of trainable parameters."""

    name: str
    layer: LoRALayer
    a: slice
    b: slice


def trainable_parameters(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` that require gradients, in order: the layout of the flat trainable
    vector (``FlatModel`` over trainable parameters only)."""
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


def lora_slices(net: nn.Module) -> list[LoRASlices]:
    """For each adapter (``lora_layers`` order), the slices of ``lora_A`` and ``lora_B`` in the
    concatenation of ``trainable_parameters(net)``; ``vec[s.a].view(s.layer.lora_A.shape)`` is
    ``A``. Lets the server correct factors on flat vectors without rebuilding the model."""
    offsets: dict[int, slice] = {}
    offset = 0
    for _, p in trainable_parameters(net):
        offsets[id(p)] = slice(offset, offset + p.numel())
        offset += p.numel()
    out = []
    for name, layer in lora_layers(net):
        if id(layer.lora_A) not in offsets or id(layer.lora_B) not in offsets:
            raise ValueError(f"LoRA layer {name!r} has frozen factors; cannot locate it in the trainable vector")
        out.append(LoRASlices(name, layer, offsets[id(layer.lora_A)], offsets[id(layer.lora_B)]))
    return out
