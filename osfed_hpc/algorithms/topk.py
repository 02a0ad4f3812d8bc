"""Top-k sparsification with error feedback, and RandTopk (Zheng et al., IJCAI 2023).

Client, per round: local SGD from W_t gives Delta; with error feedback the target is tau = Delta + e,
over the whole trainable vector (parameters, then float buffers). Per tensor l of d_l entries it
keeps k_l = max(1, floor(rate * d_l)) of them and sends their values (float32) and their global
indices into the trainable vector (int32, sorted ascending); e = tau - sent.

- ``topk``: the k_l entries of largest |tau|. Ties at the k-th magnitude go to the lowest indices,
  a rule computed from value comparisons only, so every rank and device picks the same set.
- ``randtopk``: with T the top-k_l set of the tensor, each i in T has probability (1 - alpha)/k_l
  and each i outside T alpha/(d_l - k_l); k_l indices are drawn *without replacement* from that
  categorical distribution by the Gumbel-top-k trick (the k largest keys log p_i + G_i, G_i =
  -log(-log U_i), are exactly such a draw), with U drawn on the CPU from the client's generator.
  Unlike ``torch.multinomial`` this has no 2^24-category limit. Values are sent unscaled.

Server: checks every payload (arrays, K, per-tensor counts, indices sorted/unique/in range, finite
values), scatter-adds ``weight * values`` into a running sum over the trainable vector and applies
the weighted mean through the server optimizer.

Wire bytes (``Payload`` layout): with K = sum_l k_l and H the length of the JSON header,
``align8(12 + H) + align8(4 K) + 4 K``; the arrays alone are 8 K bytes (``array_bytes``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from ..payload import Payload, require, require_meta, to_tensor
from .base import Algorithm, ClientContext, ClientResult, client_weight
from .error_feedback import ErrorFeedback
from .local_training import local_update
from .options import require_bool, require_choice, require_fraction

#: int32 indices address at most this many entries
MAX_NUMEL = 2**31 - 1
#: payload_size_hint assumes round and client ids below these (only the header's length depends on them)
_HINT_ROUND = 10**8 - 1


def keep_count(rate: float, size: int) -> int:
    """k = max(1, floor(rate * size)), with ``rate`` taken as the decimal it is written as
    (0.29 * 100 = 29, not the 28 the binary float product would floor to). Pure Python: every
    rank, client and server computes the same k."""
    return max(1, min(size, math.floor(Fraction(repr(float(rate))) * size)))


def top_indices(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted ascending, int64, on ``magnitude``'s device) of the ``k`` largest entries of
    a 1-D tensor without NaN; ties at the k-th largest value go to the lowest indices.

    ``torch.topk`` gives the k largest *values* on every device but not which of several equal
    entries it returns; the set here depends on the values alone."""
    size = magnitude.numel()
    if k >= size:
        return torch.arange(size, device=magnitude.device)
    kth = torch.topk(magnitude, k, sorted=False).values.min()
    above = torch.nonzero(magnitude > kth).squeeze(1)
    ties = torch.nonzero(magnitude == kth).squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def gumbel_top_k(log_probs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k indices drawn without replacement from the categorical distribution exp(log_probs)
    (float64, CPU), sorted ascending: the k largest of log p_i - log(-log U_i), U_i ~ U(0, 1).

    Categories of probability 0 (log p = -inf) are never drawn while others remain."""
    uniform = torch.rand(log_probs.numel(), generator=generator, dtype=torch.float64)
    uniform.clamp_(min=torch.finfo(torch.float64).tiny)
    keys = log_probs - torch.log(-torch.log(uniform))
    return top_indices(keys, k)


class TopK(Algorithm):
    name = "topk"
    client_stat_names = ("train_loss", "local_steps", "kept_fraction", "residual_norm")

    @dataclass
    class Options:
        #: fraction of each tensor's entries sent: k_l = max(1, floor(rate * d_l)), in (0, 1]
        rate: float = 0.01
        #: keep e = tau - sent per client and add it to the next round's target
        error_feedback: bool = True
        #: "samples" weights each client by its sample count (like FedAvg); "uniform" by 1
        weighting: str = "samples"

        def validate(self) -> None:
            require_fraction("rate", self.rate)
            require_bool("error_feedback", self.error_feedback)
            require_choice("weighting", self.weighting, ("samples", "uniform"))

    def __init__(self, options: TopK.Options, env) -> None:
        super().__init__(options, env)
        model = env.model
        if model.numel > MAX_NUMEL:
            raise ValueError(f"algorithm.name={self.name}: int32 indices cannot address a trainable vector of "
                             f"{model.numel} values (at most {MAX_NUMEL})")
        self.tensor_sizes = list(model.tensor_sizes)
        #: k_l per tensor and where each tensor starts in the trainable vector
        self.keep_counts = [keep_count(options.rate, size) for size in self.tensor_sizes]
        self.offsets = [0, *np.cumsum(self.tensor_sizes).tolist()]
        #: K: the number of values (and indices) every payload carries
        self.num_kept = sum(self.keep_counts)
        self.error_feedback = ErrorFeedback(options.error_feedback, model.numel)

    # wire format -------------------------------------------------------------------------------
    def header(self, round: int, client_id: int) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client_id, "rate": self.options.rate}

    @property
    def array_bytes(self) -> int:
        """Bytes of the arrays alone: K float32 values + K int32 indices = 8 K."""
        return 8 * self.num_kept

    def packed_size(self, round: int, client_id: int) -> int:
        """The exact wire size of this round's payload of ``client_id``: align8(12 + header) +
        align8(4 K) + 4 K. Only the header's length depends on the ids (their digit counts)."""
        return self._payload(self.header(round, client_id), np.empty(self.num_kept, np.float32),
                             np.empty(self.num_kept, np.int32)).packed_size()

    def payload_size_hint(self) -> int:
        """The exact packed size for the longest header a run of this size can produce (round ids
        below 10^8): the arrays are exact, the header at most a few bytes shorter in practice."""
        return self.packed_size(_HINT_ROUND, max(0, self.env.num_clients - 1))

    @staticmethod
    def _payload(meta: dict[str, Any], values: np.ndarray, indices: np.ndarray) -> Payload:
        return Payload(meta=meta, arrays={"values": values, "indices": indices})

    # selection ---------------------------------------------------------------------------------
    def select(self, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Global indices (int64, sorted ascending, on ``target``'s device) of the entries sent."""
        pieces = zip(self.offsets, self.keep_counts, target.split(self.tensor_sizes))
        return torch.cat([self.select_tensor(piece, k, generator) + offset for offset, k, piece in pieces])

    def select_tensor(self, piece: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """Local indices (sorted) of the k entries of one tensor to send."""
        return top_indices(piece.abs(), k)

    # worker side -------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        local = local_update(self.env, ctx)
        target = self.error_feedback.target(ctx.state, local.update)
        payload, residual, stats = self.compress(target, ctx)
        self.error_feedback.keep(ctx.state, residual)
        return ClientResult(payload, {**local.stats, **stats})

    def compress(self, target: torch.Tensor,
                 ctx: ClientContext) -> tuple[Payload, torch.Tensor | None, dict[str, float]]:
        """(payload, residual tau - sent or None when it must stay as it was, stats) for ``target``."""
        meta = self.header(ctx.round, ctx.client_id)
        if not bool(torch.isfinite(target).all()):
            # a payload the server refuses, so the round's bookkeeping sees this client; the old
            # residual stays (storing NaN would poison every later round of this client)
            meta["rejected"] = "update holds NaN or Inf (local training diverged)"
            empty = np.empty(0, np.float32)
            payload = self._payload(meta, empty, np.empty(0, np.int32))
            return payload, None, {"kept_fraction": float("nan"), "residual_norm": float("nan")}
        indices = self.select(target, ctx.generator)
        values = target[indices]
        residual = target.clone()
        residual[indices] = 0.0  # tau - sent, exactly: the sent values are tau's own entries
        tau_sq = float(torch.dot(target, target))
        sent_sq = float(torch.dot(values, values))
        stats = {"kept_fraction": sent_sq / tau_sq if tau_sq > 0 else 1.0, "residual_norm": float(residual.norm())}
        payload = self._payload(meta, values.detach().to("cpu", torch.float32).numpy(),
                                indices.to("cpu", torch.int32).numpy())
        return payload, residual, stats

    # server side -------------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        self._round = round
        self._mean = self.new_mean(self.env.model.vector, round)

    def decode(self, client_id: int, payload: Payload) -> tuple[np.ndarray, np.ndarray]:
        """Check a payload against this round and config; return (values, indices) as numpy views."""
        context = f"client {client_id}, round {self._round}"
        require_meta(payload.meta, self.header(self._round, client_id), context)
        require(payload, {"values": ("float32", (self.num_kept,)), "indices": ("int32", (self.num_kept,))}, context)
        values, indices = payload.arrays["values"], payload.arrays["indices"]
        if not np.isfinite(values).all():
            raise ValueError(f"{context}: values hold NaN or Inf")
        numel = self.env.model.numel
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= numel:
            raise ValueError(f"{context}: indices span [{low}, {high}], outside [0, {numel})")
        if not (np.diff(indices) > 0).all():
            raise ValueError(f"{context}: indices are not sorted ascending without duplicates")
        counts = np.diff(np.searchsorted(indices, self.offsets))
        if counts.tolist() != self.keep_counts:
            bad = int(np.flatnonzero(counts != np.asarray(self.keep_counts))[0])
            raise ValueError(f"{context}: tensor {bad} has {int(counts[bad])} indices, "
                             f"expected {self.keep_counts[bad]}")
        return values, indices

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        values, indices = self.decode(client_id, payload)
        device = self._mean.sum.device
        self._mean.add_sparse(torch.from_numpy(indices.astype(np.int64)).to(device), to_tensor(values, device),
                              client_weight(self.options.weighting, weight), client_id)
        return {}

    def server_finish(self) -> torch.Tensor:
        return self.apply_mean(self._mean)


class RandTopK(TopK):
    """RandTopk: the top-k set is drawn with probability 1 - alpha in total, the rest with alpha."""

    name = "randtopk"

    @dataclass
    class Options(TopK.Options):
        #: total probability mass of the non-top-k entries ("random_portion"), in [0, 1]; 0 is topk
        alpha: float = 0.1

        def validate(self) -> None:
            super().validate()
            require_fraction("alpha", self.alpha, open_low=False)

    def select_tensor(self, piece: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        size = piece.numel()
        top = top_indices(piece.abs(), k).cpu()
        if k >= size:
            return top.to(piece.device)
        alpha = float(self.options.alpha)
        # log p: (1 - alpha)/k inside T, alpha/(d - k) outside (log 0 = -inf: never drawn)
        outside = math.log(alpha / (size - k)) if alpha > 0 else -math.inf
        inside = math.log((1 - alpha) / k) if alpha < 1 else -math.inf
        log_probs = torch.full((size,), outside, dtype=torch.float64)
        log_probs[top] = inside
        return gumbel_top_k(log_probs, k, generator).to(piece.device)
