"""Federated LoRA fine-tuning of a frozen backbone: plain averaging (``lora``) and LoRA-FAIR
(``lorafair``, Bian et al., ICCV 2025).

Both turn the model into a LoRA model in ``adapt_model`` (``osfed_hpc.lora.apply_lora``: every
ungrouped Linear/Conv2d except the head gets ``W0 + (alpha/r) B A``, the backbone is frozen, the
head stays fully trainable). The flat trainable vector then holds only the adapters and the head,
so that is all that is broadcast, sent, averaged and checkpointed; the backbone is rebuilt on every
rank from the config (``model.pretrained`` plus the seed) and never travels.

``lora`` is FedAvg on that vector. Its server sets A = mean A_k and B = mean B_k, whose product
B_bar A_bar is not the mean of the clients' products sum p_k B_k A_k: the aggregation bias
LoRA-FAIR corrects. ``lorafair``'s server keeps A_bar and replaces B_bar by B_bar + dB, with dB the
ridge solution of min |dW* - (B_bar + dB) A_bar|^2 + lambda |dB|^2, i.e.

    dB = (dW* - B_bar A_bar) A_bar^T (A_bar A_bar^T + lambda I)^{-1}.

The paper minimises a similarity-based distance with no public code; the closed-form ridge
version is ours (see ``shared/reference/methods.md`` section 6). The clients start the next round
from the refined (A_bar, B_bar') because the server broadcasts the model: no extra bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..lora import LoRASlices, apply_lora, lora_slices, trainable_parameters
from ..payload import Payload, to_tensor
from ..rng import torch_stream
from .base import Environment, client_weight
from .fedavg import FedAvg
from .options import require_int, require_positive


class LoRA(FedAvg):
    """FedAvg over the LoRA adapters and the head (the frozen backbone never moves)."""

    name = "lora"

    @dataclass
    class Options(FedAvg.Options):
        #: r: the rank of every adapter (A is r x fan_in, B is out x r)
        rank: int = 4
        #: the adapter's output is scaled by alpha / r (Hu et al.)
        alpha: float = 8.0

        def validate(self) -> None:
            super().validate()
            require_int("rank", self.rank, 1)
            require_positive("alpha", self.alpha)

    def __init__(self, options: LoRA.Options, env: Environment) -> None:
        super().__init__(options, env)
        self.slices = adapter_slices(env.model.model, env.model.param_numel, self.name)

    @classmethod
    def adapt_model(cls, net: nn.Module, options: LoRA.Options, num_classes: int, seed: int,
                    input_shape: tuple[int, int, int] | None = None) -> nn.Module:
        """Freeze ``net`` and add adapters; the A factors come from a stream keyed by the run's
        seed alone, so every rank builds the same adapters without communicating."""
        options.validate()
        generator = torch_stream(seed, "lora")
        return apply_lora(net, options.rank, float(options.alpha), generator, num_classes)


def adapter_slices(net: nn.Module, param_numel: int, name: str) -> list[LoRASlices]:
    """Where each adapter's A and B sit in the flat trainable vector.

    Refuses a model without adapters (``adapt_model`` was not applied) and a flat layout that does
    not match ``trainable_parameters`` (the slices would then point at the wrong values)."""
    slices = lora_slices(net)
    if not slices:
        raise ValueError(f"algorithm {name!r} needs a LoRA model (Algorithm.adapt_model), the model has no adapters")
    trainable = sum(p.numel() for _, p in trainable_parameters(net))
    if trainable != param_numel:
        raise ValueError(
            f"algorithm {name!r}: {trainable} trainable values in the model, {param_numel} in the flat vector"
        )
    return slices


def ridge_correction(dw_star: torch.Tensor, a_bar: torch.Tensor, b_bar: torch.Tensor, ridge: float) -> torch.Tensor:
    """dB = (dW* - B_bar A_bar) A_bar^T (A_bar A_bar^T + ridge I)^{-1}, as float32.

    Computed as (dW* A_bar^T - B_bar G) (G + ridge I)^{-1} with G = A_bar A_bar^T, so no second
    layer-sized matrix is formed, and in float64: G is only r x r but can be badly conditioned
    when the clients' A barely moved. ``ridge = 0`` uses the pseudo-inverse of G (the minimum-norm
    least-squares correction), which also works when A_bar is rank deficient.
    """
    a = a_bar.double()
    gram = a @ a.T
    rhs = dw_star.double() @ a.T - b_bar.double() @ gram  # out x r
    if ridge > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        delta = torch.linalg.solve(gram + ridge * eye, rhs.T).T  # gram is symmetric
    else:
        delta = rhs @ torch.linalg.pinv(gram, hermitian=True)
    return delta.float()


class LoRAFair(LoRA):
    """LoRA-FAIR: averaged factors plus a server-side ridge correction of B (Bian et al., 2025)."""

    name = "lorafair"

    @dataclass
    class Options(LoRA.Options):
        #: lambda of the ridge correction of B; 0 takes the pseudo-inverse (no regularisation)
        ridge: float = 0.01

        def validate(self) -> None:
            super().validate()
            ok = isinstance(self.ridge, (int, float)) and not isinstance(self.ridge, bool)
            if not (ok and math.isfinite(self.ridge) and self.ridge >= 0):
                raise ValueError(f"algorithm.ridge must be a finite number >= 0, got {self.ridge!r}")

    def __init__(self, options: LoRAFair.Options, env: Environment) -> None:
        super().__init__(options, env)
        #: sum over layers of |dB|_F in the last server_finish (a diagnostic; 0 before any round)
        self.last_correction_norm = 0.0

    def server_begin(self, round: int) -> None:
        super().server_begin(round)
        # one layer-sized sum of w_k B_k A_k per adapter: memory does not grow with the clients
        device = self.env.model.vector.device
        self._products = [torch.zeros(s.layer.lora_B.shape[0], s.layer.lora_A.shape[1], device=device)
                          for s in self.slices]

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        """FedAvg's checks and mean, then each client's products B_k A_k, with the client's factors
        rebuilt as W_t slice + update slice (W_t is the server's model during the fold)."""
        stats = super().server_accumulate(client_id, payload, weight)
        update = payload.arrays["update"]  # checked by FedAvg: float32, the right size, finite
        start = self.env.model.vector
        w = client_weight(self.options.weighting, weight)
        for s, product in zip(self.slices, self._products):
            a = start[s.a] + to_tensor(update[s.a], start.device)
            b = start[s.b] + to_tensor(update[s.b], start.device)
            product.addmm_(b.view(s.layer.lora_B.shape), a.view(s.layer.lora_A.shape), alpha=w)
        return stats

    def server_finish(self) -> torch.Tensor:
        mean = self._mean.mean()
        if mean is None:
            return self.env.model.vector.clone()
        target = self.env.model.vector + mean  # the weighted mean of the clients' states
        self.last_correction_norm = 0.0
        for s, product in zip(self.slices, self._products):
            self._correct(target, s, product / self._mean.weight)
        self._products = []  # free the layer-sized sums before the next round
        return self.apply_update(target - self.env.model.vector)

    def _correct(self, target: torch.Tensor, s: LoRASlices, dw_star: torch.Tensor) -> None:
        """B_bar += dB for one adapter, in place in ``target``; A_bar is kept. A non-finite
        correction (overflowing factors) is skipped so it cannot poison the global model."""
        a_bar = target[s.a].view(s.layer.lora_A.shape)
        b_bar = target[s.b].view(s.layer.lora_B.shape)
        delta = ridge_correction(dw_star, a_bar, b_bar, float(self.options.ridge))
        if bool(torch.isfinite(delta).all()):
            b_bar.add_(delta)
            self.last_correction_norm += float(torch.linalg.norm(delta))
