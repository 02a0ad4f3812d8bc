"""One contiguous float32 buffer behind every parameter and float buffer of a model.

Why: the runner moves the model as one flat buffer (``Bcast``), hashes it, averages it and
checkpoints it. If each parameter were a separate tensor, every round would pay a gather
copy on the sender and a scatter copy on every receiver. Re-pointing ``param.data`` at views
of one storage makes "load the global model" a single ``copy_`` (or, on CPU, an MPI receive
straight into the model's memory) and "read the model" free.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


class FlatModel:
    """A model whose trainable parameters (then its floating-point buffers) are views of ``self.vector``.

    The order is ``named_parameters()`` with ``requires_grad`` then floating ``named_buffers()``
    (BatchNorm running statistics), which is the same on every rank because the model is built
    from the same config. Frozen parameters (a LoRA run's backbone) stay outside: every rank builds
    or loads them identically, so they never cross the wire, are never averaged and are not
    checkpointed (the config that rebuilds them is). Integer buffers (``num_batches_tracked``) stay
    outside too: they carry no learned state the federation needs.

    ``channels_last=True`` lays every 4-D tensor (conv weights) out as N, H, W, C inside the flat
    vector and gives the parameter channels-last strides, which convolutions run faster with on
    GPUs (and CPUs). The flat vector is then in that physical order, so anything that flattens a
    per-parameter tensor (a gradient) must go through ``flatten`` to line up with it.
    """

    def __init__(self, model: nn.Module, channels_last: bool = False) -> None:
        self.model = model
        self.channels_last = channels_last
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        if not params:
            raise ValueError("the model has no trainable parameters")
        device = params[0][1].device
        #: the trainable parameters, in vector order (what gradients and updates refer to)
        self.params = [p for _, p in params]
        self.param_names = [n for n, _ in params]
        #: element counts of every tensor in the vector (parameters, then buffers), in order
        self.tensor_sizes = [t.numel() for _, t in params + buffers]
        self.param_numel = sum(p.numel() for _, p in params)
        self.buffer_numel = sum(b.numel() for _, b in buffers)
        self.vector = torch.empty(self.param_numel + self.buffer_numel, dtype=torch.float32, device=device)
        offset = 0
        self._nhwc = [self._is_nhwc(p) for _, p in params]
        for _, tensor in params + buffers:
            chunk = self.vector[offset : offset + tensor.numel()]
            if self._is_nhwc(tensor):
                n, c, h, w = tensor.shape
                view = chunk.view(n, h, w, c).permute(0, 3, 1, 2)
            else:
                view = chunk.view_as(tensor)
            view.copy_(tensor.data)
            tensor.data = view
            offset += tensor.numel()

    def _is_nhwc(self, tensor: torch.Tensor) -> bool:
        return self.channels_last and tensor.dim() == 4

    @property
    def param_sizes(self) -> list[int]:
        """Element counts of the trainable parameters, in vector order."""
        return self.tensor_sizes[: len(self.params)]

    def flatten(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-parameter tensors (e.g. gradients, in ``self.params`` order) as 1-D pieces in the
        flat vector's layout: concatenated, they line up with ``params_vector``."""
        return [t.permute(0, 2, 3, 1).reshape(-1) if nhwc else t.reshape(-1) for t, nhwc in zip(tensors, self._nhwc)]

    def to_input_format(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs in the memory format the model's convolutions expect."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @property
    def numel(self) -> int:
        return self.vector.numel()

    @property
    def params_vector(self) -> torch.Tensor:
        """The parameter part of the flat state (what gradients and snapshot updates live in)."""
        return self.vector[: self.param_numel]

    def load_(self, vector: torch.Tensor) -> None:
        """Set the whole state from another flat vector (one copy, any device)."""
        if vector.numel() != self.numel:
            raise ValueError(f"flat state has {vector.numel()} values, the model expects {self.numel}")
        self.vector.copy_(vector)

    def flat_grad(self) -> torch.Tensor:
        """Concatenate ``.grad`` of the trainable parameters (zeros where a parameter got none)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return torch.cat(self.flatten(grads))

    def sha256(self) -> str:
        return state_sha256(self.vector)


def state_sha256(vector: torch.Tensor) -> str:
    """SHA-256 of a flat float32 state, the fingerprint reported as ``model_sha256``."""
    array = vector.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()
