"""OS-Fed (Qian et al., CVPR 2026) and 3SFC (ICCV 2023): send a snapshot instead of an update.

Client, per round: local SGD from W_t (the trajectory segment) gives Delta; with error feedback the
target is tau = Delta + e. At W_t it synthesises a snapshot S (M images) and free labels Y whose
loss gradient g(S, Y), taken on the multi-grid decoding F(S), is as parallel to tau as possible,
then sends (S, Y, s) with the least-squares scale s = <g*, tau> / |g*|^2 and keeps e = tau - s g*.
Server: recomputes g* from (S, Y) at W_t (the same function, so bitwise the same on the same
device class) and applies W_{t+1} = W_t + server_lr * mean_k s_k g*_k.

3SFC is the special case F = identity (factor 1). What the OS-Fed paper leaves open and the
defaults chosen here are listed in ``OSFed.Options``; see also docs of ``osfed_hpc.snapshot``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models import has_batchnorm
from ..payload import Payload, require, require_meta
from ..snapshot import (
    MultiGrid,
    SynthesisConfig,
    cosine,
    default_multiscale_leaves,
    exact_numerics,
    synthesize,
    synthetic_gradient,
)
from ..snapshot_coding import CODECS, array_spec, decode_snapshots, encode_snapshots
from .base import Algorithm, ClientContext, ClientResult, client_weight
from .error_feedback import ErrorFeedback
from .local_training import local_update, with_local_steps
from .options import require_bool, require_choice, require_int, require_positive

#: encode and decode run in eval mode (no dropout; BatchNorm models are refused outright)
MODE = "eval"


def least_squares_scales(direction: torch.Tensor, target: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
    """One s_l = <g_l, tau_l> / |g_l|^2 per parameter tensor, as float32 (what goes on the wire);
    a tensor whose synthetic gradient is zero gets 0. None if any scale is not finite."""
    dots = torch.stack([torch.dot(g, t) for g, t in zip(direction.split(sizes), target.split(sizes))])
    squares = torch.stack([torch.dot(g, g) for g in direction.split(sizes)])
    scales = torch.where(squares > 0, dots / squares.clamp_min(1e-30), torch.zeros_like(dots)).float()
    return scales if bool(torch.isfinite(scales).all()) else None


def least_squares_scale(direction: torch.Tensor, target: torch.Tensor) -> float | None:
    """s = <g, tau> / |g|^2 as a float32 value (what goes on the wire), or None if not finite.

    Returning the float32-rounded value matters: the client's residual ``tau - s g`` must use the
    very scale the server multiplies by.
    """
    value = float(torch.dot(direction, target) / torch.dot(direction, direction))
    return value if math.isfinite(value) else None


@dataclass
class ClientEncoding:
    """What ``OSFed.compress`` produced: the payload, the transmitted direction g* (as the server
    will decode it), the scale (None when the payload is a rejection), the new error-feedback
    residual (None when it must stay as it was) and diagnostics."""

    payload: Payload
    direction: torch.Tensor | None
    scale: float | None
    residual: torch.Tensor | None
    stats: dict[str, float]


class OSFed(Algorithm):
    name = "osfed"
    client_stat_names = (
        "train_loss", "local_steps", "cos", "cos_init", "tau_norm", "residual_norm",
        "synth_seconds", "synth_iters", "scale",
    )

    @dataclass
    class Options:
        #: multi-grid factor f: f x f cells per snapshot -> f^2 decoded samples (paper: 4 at 224 px;
        #: 2 here because the small test/MNIST settings use 28 px). For "multiscale", the finest grid.
        factor: int = 2
        #: snapshots M per client per round, optimised jointly with one scale (paper D.4: 1..8)
        num_snapshots: int = 1
        #: "uniform" (paper default) or "multiscale" (D.1; quadtree leaves, see multiscale_leaves)
        multigrid: str = "uniform"
        #: multiscale layout: [[row, col, size], ...] in unit cells of the factor x factor grid,
        #: tiling it; None = snapshot.default_multiscale_leaves(factor)
        multiscale_leaves: list[list[int]] | None = None
        #: "lbfgs" (3SFC settings below) or "adam"
        optimizer: str = "lbfgs"
        lbfgs_lr: float = 1.0
        lbfgs_max_iter: int = 20
        lbfgs_history: int = 100
        #: LBFGS steps; after each the loss is re-evaluated and the best finite point kept
        outer_steps: int = 10
        adam_lr: float = 0.1
        adam_steps: int = 100
        #: "none" (float32 snapshot), "png" (8-bit, lossless on the codes) or "jpeg" (8-bit, lossy)
        codec: str = "none"
        jpeg_quality: int = 90
        #: keep e = tau - s g* per client and add it to the next target (the paper's "error compensation")
        error_feedback: bool = True
        #: "global": one least-squares scale s for the whole update (the paper); "tensor": one per
        #: parameter tensor (our extension: +4 B per tensor, e.g. 32 B for the small CNN; the synthesis
        #: then maximises the energy each tensor's direction explains, and no layer gets a step its
        #: own update does not call for)
        scales: str = "global"
        #: "uniform" mean over clients (3SFC) or "samples" (weighted by sample count)
        weighting: str = "uniform"
        #: local SGD steps in the trajectory segment; None = the local training configured in train
        segment_steps: int | None = None
        #: wire dtype of the labels, "float32" or "float16" (the client decodes its own rounding)
        label_dtype: str = "float32"

        def validate(self) -> None:
            require_int("factor", self.factor, 1)
            require_int("num_snapshots", self.num_snapshots, 1)
            require_choice("multigrid", self.multigrid, ("uniform", "multiscale"))
            require_choice("optimizer", self.optimizer, ("lbfgs", "adam"))
            require_choice("scales", self.scales, ("global", "tensor"))
            require_positive("lbfgs_lr", self.lbfgs_lr)
            require_int("lbfgs_max_iter", self.lbfgs_max_iter, 1)
            require_int("lbfgs_history", self.lbfgs_history, 1)
            require_int("outer_steps", self.outer_steps, 1)
            require_positive("adam_lr", self.adam_lr)
            require_int("adam_steps", self.adam_steps, 1)
            require_choice("codec", self.codec, ("none", *CODECS))
            require_int("jpeg_quality", self.jpeg_quality, 1, 100)
            require_bool("error_feedback", self.error_feedback)
            require_choice("weighting", self.weighting, ("uniform", "samples"))
            if self.segment_steps is not None:
                require_int("segment_steps", self.segment_steps, 1)
            require_choice("label_dtype", self.label_dtype, ("float32", "float16"))
            if self.multiscale_leaves is not None and self.multigrid != "multiscale":
                raise ValueError("algorithm.multiscale_leaves is only used with algorithm.multigrid = 'multiscale'")
            try:
                self.grid()
            except (ValueError, TypeError) as exc:
                key = "multiscale_leaves" if self.multiscale_leaves is not None else "factor"
                raise ValueError(f"algorithm.{key}: {exc}") from None

        def grid(self) -> MultiGrid:
            if self.multigrid == "uniform":
                return MultiGrid(self.factor)
            if self.multiscale_leaves is None:
                return MultiGrid(self.factor, default_multiscale_leaves(self.factor))
            return MultiGrid(self.factor, tuple(tuple(leaf) for leaf in self.multiscale_leaves))

        def synthesis(self) -> SynthesisConfig:
            return SynthesisConfig(
                optimizer=self.optimizer, lbfgs_lr=self.lbfgs_lr, lbfgs_max_iter=self.lbfgs_max_iter,
                lbfgs_history=self.lbfgs_history, outer_steps=self.outer_steps, adam_lr=self.adam_lr,
                adam_steps=self.adam_steps, per_tensor_scales=self.scales == "tensor",
            )

    def __init__(self, options: OSFed.Options, env) -> None:
        super().__init__(options, env)
        if has_batchnorm(env.model.model):
            raise ValueError(
                f"algorithm.name={self.name} cannot use a BatchNorm model: running statistics cannot be "
                f"reconstructed from a snapshot, and batch statistics would differ between client and "
                f"server; use a GroupNorm or norm-free model such as model.name=resnet18_gn, cnn or mlp"
            )
        self.grid = options.grid()
        channels, height, width = env.input_shape
        try:
            self.grid.check_resolution(height, width)
        except ValueError as exc:
            raise ValueError(f"algorithm.factor: {exc}") from None
        self.snapshot_shape = (options.num_snapshots, channels, height, width)
        self.labels_shape = (options.num_snapshots * self.grid.samples_per_snapshot, env.num_classes)
        self.tensor_sizes = env.model.param_sizes
        self.num_scales = len(self.tensor_sizes) if options.scales == "tensor" else 1
        self.error_feedback = ErrorFeedback(options.error_feedback, env.model.param_numel)

    def payload_size_hint(self) -> int:
        """Exact for float32 snapshots; 8-bit codecs are smaller."""
        return Payload(meta={**self.header(0, 0), "rejected": "x" * 64}, arrays={
            name: np.empty(shape, dtype) for name, (dtype, shape) in self._expected_arrays(raw=True).items()
        }).packed_size()

    # wire format -------------------------------------------------------------------------------
    def header(self, round: int, client_id: int) -> dict[str, Any]:
        """Meta every payload carries and the server checks: a config mismatch is an error, not noise."""
        o = self.options
        return {"algorithm": self.name, "round": round, "client": client_id, "factor": o.factor,
                "num_snapshots": o.num_snapshots, "multigrid": o.multigrid, "codec": o.codec, "mode": MODE}

    def _expected_arrays(self, raw: bool = False) -> dict[str, tuple[str, tuple[int, ...] | None]]:
        spec: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        if self.options.codec == "none" or raw:
            spec["snapshot"] = ("float32", self.snapshot_shape)
        else:
            spec.update(array_spec(self.options.num_snapshots))
        spec["labels"] = (self.options.label_dtype, self.labels_shape)
        spec["scale"] = ("float32", (self.num_scales,))
        return spec

    def _wire_arrays(self, snapshots: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
        """Snapshot (raw float32 or image-coded) and labels as they go on the wire (no scale yet)."""
        snapshots = snapshots.detach().to("cpu", torch.float32).numpy()
        if self.options.codec == "none":
            arrays = {"snapshot": snapshots}
        else:
            arrays = encode_snapshots(snapshots, self.options.codec, self.options.jpeg_quality)
        arrays["labels"] = labels.detach().to("cpu", torch.float32).numpy().astype(self.options.label_dtype)
        return arrays

    def _decode_arrays(self, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Wire arrays -> (S, Y) float32 on the model's device; client and server both use this."""
        if self.options.codec == "none":
            snapshots = torch.from_numpy(np.array(arrays["snapshot"], dtype=np.float32))
        else:
            snapshots = decode_snapshots(arrays, self.snapshot_shape, self.options.codec)
        labels = torch.from_numpy(np.asarray(arrays["labels"]).astype(np.float32))
        device = self.env.model.vector.device
        return snapshots.to(device), labels.to(device)

    def _direction(self, snapshots: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = self.env.model
        with exact_numerics(model.model):
            return synthetic_gradient(model, snapshots, labels, self.grid, create_graph=False)

    # worker side -------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        model = self.env.model
        local = local_update(self.env, ctx, with_local_steps(self.env.train, self.options.segment_steps))
        target = self.error_feedback.target(ctx.state, local.update[: model.param_numel])
        model.load_(local.start)
        encoding = self.compress(target, ctx)
        self.error_feedback.keep(ctx.state, encoding.residual)
        return ClientResult(encoding.payload, {**local.stats, **encoding.stats})

    def compress(self, target: torch.Tensor, ctx: ClientContext) -> ClientEncoding:
        """Encode ``target`` (flat, parameters only) at the model's current weights W_t.

        The scale and residual are computed from the *decoded* wire arrays, so quantisation error
        stays in the residual instead of being silently counted as sent.
        """
        meta = self.header(ctx.round, ctx.client_id)
        tau_norm = float(target.norm())
        if not math.isfinite(tau_norm):
            return self._rejection(meta, "update holds NaN or Inf (local training diverged)", tau_norm, None, {})
        snapshots, labels, info = synthesize(
            self.env.model, target, self.env.input_shape, self.options.num_snapshots, self.grid,
            self.env.num_classes, self.options.synthesis(), ctx.generator,
        )
        if not (torch.isfinite(snapshots).all() and torch.isfinite(labels).all()):
            return self._rejection(meta, "snapshot holds NaN or Inf", tau_norm, target, info)
        arrays = self._wire_arrays(snapshots, labels)
        direction = self._direction(*self._decode_arrays(arrays))
        if self.options.scales == "tensor":
            scale = least_squares_scales(direction, target, self.tensor_sizes)
        else:
            scale = least_squares_scale(direction, target)
        if scale is None:
            return self._rejection(meta, "synthetic gradient is zero or not finite", tau_norm, target, info)
        update = self._scaled(scale, direction)
        residual = target - update
        arrays["scale"] = (scale.cpu().numpy() if torch.is_tensor(scale) else np.array([scale])).astype(np.float32)
        stats = {
            "cos": abs(float(cosine(update, target))), "cos_init": info["cos_init"], "tau_norm": tau_norm,
            "residual_norm": float(residual.norm()), "synth_seconds": info["seconds"],
            "synth_iters": info["iterations"], "scale": float(scale.abs().mean()) if torch.is_tensor(scale) else scale,
        }
        return ClientEncoding(Payload(meta=meta, arrays=arrays), direction, scale, residual, stats)

    def _rejection(self, meta, reason: str, tau_norm: float, residual, info: dict[str, float]) -> ClientEncoding:
        """A payload the server will refuse, sent so the round's bookkeeping sees this client.

        The residual keeps all of tau (nothing was transmitted) when tau is finite; a non-finite
        tau leaves the previous residual untouched, because storing NaN would poison every later
        round of this client.
        """
        stats = {
            "cos": float("nan"), "cos_init": info.get("cos_init", float("nan")), "tau_norm": tau_norm,
            "residual_norm": float(residual.norm()) if residual is not None else float("nan"),
            "synth_seconds": info.get("seconds", 0.0), "synth_iters": info.get("iterations", 0.0), "scale": 0.0,
        }
        payload = Payload(meta={**meta, "rejected": reason}, arrays={"scale": np.zeros(self.num_scales, dtype=np.float32)})
        return ClientEncoding(payload, None, None, residual, stats)

    # server side -------------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        self._round = round
        self._mean = self.new_mean(self.env.model.params_vector, round)

    def _scaled(self, scale: float | torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """s * g*, with one scale per parameter tensor when ``scale`` is a tensor of them."""
        if not torch.is_tensor(scale):
            return scale * direction
        sizes = torch.tensor(self.tensor_sizes, device=direction.device)
        return torch.repeat_interleave(scale.to(direction.device), sizes) * direction

    def decode(self, client_id: int, payload: Payload) -> tuple[float | torch.Tensor, torch.Tensor]:
        """Validate a payload against this round and config, return (s, g*) at the current W_t."""
        context = f"client {client_id}, round {self._round}"
        require_meta(payload.meta, self.header(self._round, client_id), context)
        require(payload, self._expected_arrays(), context)
        scales = np.asarray(payload.arrays["scale"], dtype=np.float32)
        if not np.isfinite(scales).all():
            raise ValueError(f"{context}: scale holds NaN or Inf")
        scale = torch.from_numpy(scales.copy()) if self.options.scales == "tensor" else float(scales[0])
        try:
            snapshots, labels = self._decode_arrays(payload.arrays)
        except ValueError as exc:
            raise ValueError(f"{context}: {exc}") from None
        if not (torch.isfinite(snapshots).all() and torch.isfinite(labels).all()):
            raise ValueError(f"{context}: snapshot or labels hold NaN or Inf")
        return scale, self._direction(snapshots, labels)

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        scale, direction = self.decode(client_id, payload)
        update = self._scaled(scale, direction)
        self._mean.add(update, client_weight(self.options.weighting, weight), client_id)
        return {"decoded_norm": float(update.norm())}

    def server_finish(self) -> torch.Tensor:
        """W_t + the server optimizer's step on the mean decoded update (parameters); float buffers
        (GroupNorm models have none) are carried over unchanged: a snapshot says nothing about them."""
        return self.apply_mean(self._mean)
