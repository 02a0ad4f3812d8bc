"""Stochastic uniform quantization of the client update at b bits, with error feedback.

Client, per round: local SGD gives Delta; with error feedback the target is tau = Delta + e. Each
tensor of the trainable vector (parameters, then float buffers; ``FlatModel.tensor_sizes``) is
quantized on its own grid: lo = min, hi = max (float32, sent), levels = 2^b - 1 and

    code = clamp(floor((x - lo) / (hi - lo) * levels + U), 0, levels),   U ~ Uniform[0, 1)

(stochastic rounding: E[code] = (x - lo) / (hi - lo) * levels, so the decoded value is unbiased).
A constant tensor (hi == lo) sends code 0 and decodes exactly. All codes go out as ONE bit stream,
b bits per value, most significant bit first, so the uplink is

    codes uint8[ceil(N b / 8)] + lo float32[L] + hi float32[L]      (N values, L tensors)

plus the payload header. The client decodes its own codes with the function the server uses and
keeps e = tau - decoded, so the rounding error is delayed, never lost. Server: validate, decode,
weighted mean, ``apply_update``.

Why per tensor: a bias and a conv kernel differ in range by orders of magnitude; one global grid
would spend every level on the widest tensor. Why CPU for the codes: the random draws come from
the client's CPU generator, and decoding on CPU on both sides makes client and server agree bitwise.

The module-level functions (bit packing, ``quantize``, ``dequantize``) take one bit-width per
tensor, so FedMPQ-lite (``fedmpq.py``) reuses them with mixed precision; ``QuantizedUpdates`` is
the client and server logic both methods share.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..payload import Payload, require, require_meta
from .base import Algorithm, ClientContext, ClientResult, client_weight
from .error_feedback import ErrorFeedback
from .local_training import local_update
from .options import require_bool, require_choice, require_int

MAX_BITS = 8
#: values per chunk when packing or unpacking: bounds the temporary one-byte-per-bit arrays to
#: 8 bytes x CHUNK whatever the model size
CHUNK = 1 << 20
#: the most digits a header's round and client numbers are assumed to have, for size hints
HINT_NUMBER = 10**7 - 1


# bit packing ----------------------------------------------------------------------------------
def _segments(bits: Any, count: int, sizes: Sequence[int] | None) -> list[tuple[int, int]]:
    """(values, bits) runs of the stream: one run at a single width, or one per tensor."""
    if np.ndim(bits) == 0:
        width = int(bits)
        if not 1 <= width <= MAX_BITS:
            raise ValueError(f"bit-width {width} is not in [1, {MAX_BITS}]")
        return [(int(count), width)]
    widths = [int(b) for b in np.asarray(bits).reshape(-1)]
    if sizes is None or len(sizes) != len(widths):
        raise ValueError(f"{len(widths)} bit-widths need as many tensor sizes, got {sizes!r}")
    if sum(int(s) for s in sizes) != count:
        raise ValueError(f"tensor sizes add up to {sum(sizes)} values, expected {count}")
    if any(not 1 <= b <= MAX_BITS for b in widths):
        raise ValueError(f"bit-widths {widths} are not all in [1, {MAX_BITS}]")
    return [(int(n), b) for n, b in zip(sizes, widths)]


def packed_bytes(count: int, bits: Any, sizes: Sequence[int] | None = None) -> int:
    """Bytes of the packed stream: ceil(sum of values x bits / 8)."""
    return (sum(n * b for n, b in _segments(bits, count, sizes)) + 7) // 8


def _chunks(runs: list[tuple[int, int]]):
    """(start value, values, bits) pieces of at most CHUNK values, in stream order."""
    start = 0
    for count, width in runs:
        for offset in range(0, count, CHUNK):
            yield start + offset, min(CHUNK, count - offset), width
        start += count


def pack_codes(codes: np.ndarray, bits: Any, sizes: Sequence[int] | None = None) -> np.ndarray:
    """Codes (integers < 2^bits) -> one bit stream, ``bits`` bits per value, MSB first, the last
    byte zero-padded. ``bits`` is one width, or one per tensor with ``sizes`` (mixed precision)."""
    codes = np.asarray(codes).reshape(-1)
    runs = _segments(bits, codes.size, sizes)
    out = np.zeros(packed_bytes(codes.size, bits, sizes), dtype=np.uint8)
    carry = np.zeros(0, dtype=np.uint8)  # < 8 bits not yet written
    position = 0
    for start, count, width in _chunks(runs):
        chunk = codes[start : start + count]
        if chunk.size and (int(chunk.min()) < 0 or int(chunk.max()) >= 1 << width):
            raise ValueError(f"codes do not fit in {width} bits")
        planes = np.unpackbits(chunk.astype(np.uint8)[:, None], axis=1)[:, 8 - width :].reshape(-1)
        stream = np.concatenate([carry, planes]) if carry.size else planes
        whole = stream.size // 8 * 8
        out[position : position + whole // 8] = np.packbits(stream[:whole])
        position += whole // 8
        carry = stream[whole:]
    if carry.size:
        out[position] = np.packbits(carry)[0]
    return out


def unpack_codes(packed: np.ndarray, bits: Any, count: int, sizes: Sequence[int] | None = None) -> np.ndarray:
    """The inverse of ``pack_codes``: uint8 codes [count]. Raises ``ValueError`` when the stream
    has the wrong length or non-zero padding bits (the stream is not what this layout produces)."""
    packed = np.asarray(packed)
    runs = _segments(bits, count, sizes)
    total_bits = sum(n * b for n, b in runs)
    if packed.dtype != np.uint8 or packed.shape != ((total_bits + 7) // 8,):
        raise ValueError(f"packed codes are {packed.dtype}{list(packed.shape)}, "
                         f"expected uint8[{(total_bits + 7) // 8}]")
    if total_bits % 8 and int(packed[-1]) & ((1 << (8 - total_bits % 8)) - 1):
        raise ValueError("packed codes have non-zero padding bits")
    codes = np.empty(int(count), dtype=np.uint8)
    bit = 0
    for start, n, width in _chunks(runs):
        first, skip = divmod(bit, 8)
        stop = (bit + n * width + 7) // 8
        planes = np.unpackbits(packed[first:stop])[skip : skip + n * width].reshape(n, width)
        padded = np.zeros((n, 8), dtype=np.uint8)
        padded[:, 8 - width :] = planes
        codes[start : start + n] = np.packbits(padded, axis=1).reshape(-1)
        bit += n * width
    return codes


# quantization ---------------------------------------------------------------------------------
@dataclass
class Quantized:
    """Codes (uint8, one per value, not yet packed) and the per-tensor float32 ranges."""

    codes: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _per_value(values: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    return torch.repeat_interleave(values, torch.as_tensor(list(sizes), dtype=torch.int64))


def _levels(bits: Any, sizes: Sequence[int]) -> torch.Tensor:
    """2^b - 1 per tensor, float32."""
    widths = np.broadcast_to(np.asarray(bits, dtype=np.int64), (len(sizes),))
    return torch.from_numpy(((1 << widths) - 1).astype(np.float32))


def quantize(x: torch.Tensor, sizes: Sequence[int], bits: Any, generator: torch.Generator) -> Quantized:
    """Stochastic uniform quantization of each tensor of ``x`` at its bit-width (one width or one
    per tensor). Runs on CPU; ``generator`` (CPU) supplies one uniform draw per value, always N of
    them, so a client's random stream does not depend on the data. ``x`` must be finite with
    finite per-tensor ranges (the caller checks; see ``range_is_finite``)."""
    x = x.detach().to("cpu", torch.float32).reshape(-1)
    pieces = x.split(list(sizes))
    lo = torch.stack([p.min() if p.numel() else torch.zeros(()) for p in pieces])
    hi = torch.stack([p.max() if p.numel() else torch.zeros(()) for p in pieces])
    levels = _levels(bits, sizes)
    span = hi - lo
    constant = span <= 0  # hi == lo: every value is lo, code 0 decodes it exactly
    span = torch.where(constant, torch.ones_like(span), span)
    levels_sent = torch.where(constant, torch.zeros_like(levels), levels)
    position = (x - _per_value(lo, sizes)) / _per_value(span, sizes) * _per_value(levels_sent, sizes)
    noise = torch.rand(x.numel(), generator=generator, dtype=torch.float32)
    codes = torch.floor(position + noise).clamp_(min=0)
    codes = torch.minimum(codes, _per_value(levels, sizes))
    return Quantized(codes.to(torch.uint8).numpy(), lo.numpy(), hi.numpy())


def dequantize(codes: np.ndarray, lo: np.ndarray, hi: np.ndarray, sizes: Sequence[int], bits: Any) -> torch.Tensor:
    """lo + code * (hi - lo) / (2^b - 1) per tensor, float32 on CPU: the one decoding both the
    client (for its residual) and the server use, so they agree bitwise."""
    lo_t = torch.from_numpy(np.array(lo, dtype=np.float32))
    hi_t = torch.from_numpy(np.array(hi, dtype=np.float32))
    step = (hi_t - lo_t) / _levels(bits, sizes)
    codes_t = torch.from_numpy(np.array(codes, dtype=np.uint8)).to(torch.float32)
    return _per_value(lo_t, sizes) + codes_t * _per_value(step, sizes)


def range_is_finite(x: torch.Tensor, sizes: Sequence[int]) -> bool:
    """True when ``x`` is finite and every tensor's hi - lo is finite in float32."""
    x = x.detach().reshape(-1)
    if not bool(torch.isfinite(x).all()):
        return False
    return all(bool(torch.isfinite(p.max() - p.min())) for p in x.split(list(sizes)) if p.numel())


def check_ranges(lo: np.ndarray, hi: np.ndarray, context: str) -> None:
    """Server-side check of received ranges: finite, lo <= hi, hi - lo finite (else decoding makes Inf/NaN)."""
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError(f"{context}: lo/hi hold NaN or Inf")
    if not (lo <= hi).all():
        raise ValueError(f"{context}: lo > hi for tensor {int(np.argmax(lo > hi))}")
    with np.errstate(over="ignore"):
        if not np.isfinite(hi - lo).all():
            raise ValueError(f"{context}: a tensor's range hi - lo overflows float32")


# the method ------------------------------------------------------------------------------------
class QuantizedUpdates(Algorithm):
    """Client and server halves shared by ``Quant`` and FedMPQ-lite: they differ only in where a
    client's per-tensor bit-widths come from (``client_bits``, ``expected_bits``) and the header."""

    client_stat_names = ("train_loss", "local_steps", "quant_error", "residual_norm")

    def __init__(self, options, env) -> None:
        super().__init__(options, env)
        self.sizes = list(env.model.tensor_sizes)
        self.error_feedback = ErrorFeedback(options.error_feedback, env.model.numel)

    # hooks the subclasses fill in ----------------------------------------------------------------
    def client_bits(self, ctx: ClientContext) -> np.ndarray:
        """uint8 bit-width per tensor this client quantizes at."""
        raise NotImplementedError

    def expected_bits(self, client_id: int) -> np.ndarray:
        """The bit-widths the server expects from ``client_id`` this round."""
        raise NotImplementedError

    def header(self, round: int, client_id: int, bits: np.ndarray) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client_id}

    # wire format ---------------------------------------------------------------------------------
    def expected_arrays(self, bits: np.ndarray) -> dict[str, tuple[str, tuple[int, ...]]]:
        n, count = len(self.sizes), self.env.model.numel
        return {"codes": ("uint8", (packed_bytes(count, bits, self.sizes),)),
                "lo": ("float32", (n,)), "hi": ("float32", (n,))}

    def packed_size(self, meta: dict[str, Any], codes_bytes: int) -> int:
        """Exact packed bytes of a payload with this header and ``codes_bytes`` of codes."""
        n = len(self.sizes)
        arrays = {"codes": np.empty(codes_bytes, np.uint8),
                  "lo": np.empty(n, np.float32), "hi": np.empty(n, np.float32)}
        return Payload(meta=meta, arrays=arrays).packed_size()

    # worker side ---------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        bits = self.client_bits(ctx)
        local = local_update(self.env, ctx)
        target = self.error_feedback.target(ctx.state, local.update)
        meta = self.header(ctx.round, ctx.client_id, bits)
        stats = {**local.stats, **self.bit_stats(bits)}
        if not range_is_finite(target, self.sizes):
            # nothing usable to send: the server refuses it, the previous residual stays
            reason = "update holds NaN or Inf (local training diverged)"
            stats.update(quant_error=float("nan"), residual_norm=float("nan"))
            return ClientResult(Payload(meta={**meta, "rejected": reason}), stats)
        q = quantize(target, self.sizes, bits, ctx.generator)
        decoded = dequantize(q.codes, q.lo, q.hi, self.sizes, bits).to(target.device)
        residual = target - decoded
        self.error_feedback.keep(ctx.state, residual)
        tau_norm, residual_norm = float(target.norm()), float(residual.norm())
        stats.update(quant_error=residual_norm / tau_norm if tau_norm > 0 else 0.0, residual_norm=residual_norm)
        arrays = {"codes": pack_codes(q.codes, bits, self.sizes), "lo": q.lo, "hi": q.hi}
        return ClientResult(Payload(meta=meta, arrays=arrays), stats)

    def bit_stats(self, bits: np.ndarray) -> dict[str, float]:
        return {}

    # server side ---------------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        self._round = round
        self._mean = self.new_mean(self.env.model.vector, round)

    def decode(self, client_id: int, payload: Payload) -> torch.Tensor:
        """Validate a payload against the bits expected from this client, return the decoded update (CPU)."""
        context = f"client {client_id}, round {self._round}"
        bits = self.expected_bits(client_id)
        require_meta(payload.meta, self.header(self._round, client_id, bits), context)
        require(payload, self.expected_arrays(bits), context)
        lo, hi = payload.arrays["lo"], payload.arrays["hi"]
        check_ranges(lo, hi, context)
        try:
            codes = unpack_codes(payload.arrays["codes"], bits, self.env.model.numel, self.sizes)
        except ValueError as exc:
            raise ValueError(f"{context}: {exc}") from None
        decoded = dequantize(codes, lo, hi, self.sizes, bits)
        if not bool(torch.isfinite(decoded).all()):
            raise ValueError(f"{context}: decoded update holds NaN or Inf")
        return decoded

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        decoded = self.decode(client_id, payload).to(self._mean.sum.device)
        self._mean.add(decoded, client_weight(self.options.weighting, weight), client_id)
        return {}

    def server_finish(self) -> torch.Tensor:
        return self.apply_mean(self._mean)


class Quant(QuantizedUpdates):
    name = "quant"

    @dataclass
    class Options:
        #: bits per value, 1..8 (levels = 2^bits - 1 per tensor)
        bits: int = 4
        #: keep the rounding error e = tau - decoded and add it to the next round's update
        error_feedback: bool = True
        #: "samples" weights each client by its sample count; "uniform" by 1
        weighting: str = "samples"

        def validate(self) -> None:
            require_int("bits", self.bits, 1, MAX_BITS)
            require_bool("error_feedback", self.error_feedback)
            require_choice("weighting", self.weighting, ("samples", "uniform"))

    def __init__(self, options: Quant.Options, env) -> None:
        super().__init__(options, env)
        self.bits = np.full(len(self.sizes), options.bits, dtype=np.uint8)

    def header(self, round: int, client_id: int, bits: np.ndarray) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client_id, "bits": self.options.bits}

    def client_bits(self, ctx: ClientContext) -> np.ndarray:
        return self.bits

    def expected_bits(self, client_id: int) -> np.ndarray:
        return self.bits

    def payload_size_hint(self) -> int:
        """Exact for round and client numbers of up to 7 digits (an upper bound otherwise)."""
        meta = self.header(HINT_NUMBER, HINT_NUMBER, self.bits)
        return self.packed_size(meta, packed_bytes(self.env.model.numel, self.bits, self.sizes))

