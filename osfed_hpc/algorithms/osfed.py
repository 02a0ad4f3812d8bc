"""OS-Fed (Qian et al., CVPR 2026) and 3SFC (ICCV 2023): send a snapshot instead of an update.

Client, per round: local SGD from W_t (the trajectory segment) gives Delta; with error feedback the
target is tau = Delta + e. At W_t it synthesises a snapshot S (M images) and free labels Y whose
loss gradient g(S, Y), taken on the multi-grid decoding F(S), is as parallel to tau as possible,
then sends (S, Y, s) with the least-squares scale s = <g*, tau> / |g*|^2 and keeps e = tau - s g*.
Server: recomputes g* from (S, Y) at W_t (the same function, so bitwise the same on the same
device class) and applies W_{t+1} = W_t + server_lr * mean_k s_k g*_k.

3SFC is the special case F = identity (factor 1). What the OS-Fed paper leaves open and the
defaults chosen here are listed in ``OSFed.Options``; see also docs of ``osfed_hpc.snapshot``.

Learnable multi-grid (D.2, Table 9; ``upsampler: fsrcnn``): an FSRCNN upsamples the cells instead of
bilinear resizing. Who holds its weights is ours (``fsrcnn_mode``, see ``osfed_hpc.multigrid_fsrcnn``):
``fixed`` (shared seed, nothing sent), ``client`` (optimised with the snapshot, kept per client across
rounds, sent in every payload) or ``server`` (trained by the server on a public image, sent down in
the first round each server process runs and cached by the workers). In every mode both sides build
the decoder from the same float32 vector, so decoding stays bitwise the client's computation.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models import has_batchnorm
from ..multigrid_fsrcnn import FSRCNNShape, grid_from_vector, shared_init, train_server_fsrcnn
from ..payload import Payload, require, require_meta
from ..snapshot import Grid, MultiGrid, cosine, default_multiscale_leaves, exact_numerics, synthetic_gradient
from ..snapshot_coding import CODECS, array_spec, decode_snapshots, encode_snapshots
from ..snapshot_pictures import RoundPictures
from ..snapshot_search import SynthesisConfig, synthesize, synthesize_batch
from .base import Algorithm, ClientContext, ClientResult, ReceivedMessage, ServerMessage, client_weight
from .error_feedback import ErrorFeedback
from .local_training import local_update, with_local_steps
from .options import is_int, require_bool, require_choice, require_int, require_nonnegative, require_positive

#: encode and decode run in eval mode (no dropout; BatchNorm models are refused outright)
MODE = "eval"
#: client state key of a client's FSRCNN weights (``fsrcnn_mode: client``, persistent)
FSRCNN_STATE_KEY = "fsrcnn"
#: server state key of the server-trained FSRCNN weights (``fsrcnn_mode: server``)
FSRCNN_SERVER_KEY = "osfed.fsrcnn"
#: the name of the FSRCNN weight vector in payloads and in the server message
FSRCNN_ARRAY = "fsrcnn"


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
        "synth_seconds", "synth_iters", "synth_outer_steps", "synth_stopped_early", "label_rescales", "label_rms",
        "scale",
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
        #: LBFGS: a client stops after an outer step that raised its best |cos| by less than this
        #: (ours; 0 = never, the paper's fixed 10 x 20 iterations)
        stop_tolerance: float = 0.0
        #: LBFGS: rescale Y back to its initial RMS (and restart the LBFGS memory) when its RMS grows
        #: past this multiple of it (ours; 0 = never). The objective does not depend on |Y|
        label_guard: float = 0.0
        #: clients of one worker whose syntheses run as one batched computation (ours; 1 = one at a
        #: time). The runner places clients in blocks of this many consecutive ids so a batch is the
        #: same whatever the rank count; not with fsrcnn_mode=client (each client learns its own FSRCNN)
        synthesis_batch: int = 1
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
        #: the multi-grid upsampler: "bilinear" (the paper's default, IDC's decode_zoom) or "fsrcnn"
        #: (D.2 / Table 9: a learnable FSRCNN per cell; uniform multi-grid with factor >= 2 only)
        upsampler: str = "bilinear"
        #: who holds the FSRCNN weights (ours; the paper leaves it open): "fixed" (drawn from the run's
        #: seed, never trained, nothing sent), "client" (optimised jointly with (S, Y), sent with every
        #: snapshot: + 4 B per FSRCNN parameter per client-round) or "server" (trained once by the
        #: server on scikit-learn's public china.jpg, sent down once: + 4 B per parameter per client,
        #: counted in the first round the client is selected)
        fsrcnn_mode: str = "server"
        #: FSRCNN sizes (Dong et al. 2016; the paper's "lightweight FSRCNN" does not give them):
        #: feature width d, shrunk width s, m mapping layers; 12,809 parameters for 1 channel
        fsrcnn_d: int = 56
        fsrcnn_s: int = 12
        fsrcnn_m: int = 4
        #: initial weights of fixed and client mode: "unit" (reference init with the deconvolution
        #: rescaled by a power of two so a N(0,1) cell comes out with std ~1, ours) or "reference"
        #: (yjn870's, output ~1e-3 of the input); server mode always trains from "reference"
        fsrcnn_init: str = "unit"
        #: client mode: "persistent" (each client continues from its weights of its previous round,
        #: kept in its state; methods.md 1.4.4 (b)) or "reset" (every round starts from the shared init)
        fsrcnn_client_weights: str = "persistent"
        #: server mode: Adam steps (batch fsrcnn_server_batch, learning rate fsrcnn_server_lr) of
        #: super-resolution training on the public image, from the reference init, on rank 0's CPU
        #: before round 1 (~30 s at 28 px; 800 steps beat bicubic, see multigrid_fsrcnn)
        fsrcnn_server_steps: int = 800
        fsrcnn_server_batch: int = 32
        fsrcnn_server_lr: float = 3e-3

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
            require_nonnegative("stop_tolerance", self.stop_tolerance)
            require_nonnegative("label_guard", self.label_guard)
            if self.label_guard and self.label_guard < 1:
                raise ValueError(f"algorithm.label_guard must be 0 (off) or >= 1 (a multiple of the initial "
                                 f"label RMS), got {self.label_guard!r}")
            require_int("synthesis_batch", self.synthesis_batch, 1)
            require_choice("codec", self.codec, ("none", *CODECS))
            require_int("jpeg_quality", self.jpeg_quality, 1, 100)
            require_bool("error_feedback", self.error_feedback)
            require_choice("weighting", self.weighting, ("uniform", "samples"))
            if self.segment_steps is not None:
                require_int("segment_steps", self.segment_steps, 1)
            require_choice("label_dtype", self.label_dtype, ("float32", "float16"))
            require_choice("upsampler", self.upsampler, ("bilinear", "fsrcnn"))
            require_choice("fsrcnn_mode", self.fsrcnn_mode, ("fixed", "client", "server"))
            require_int("fsrcnn_d", self.fsrcnn_d, 1)
            require_int("fsrcnn_s", self.fsrcnn_s, 1)
            require_int("fsrcnn_m", self.fsrcnn_m, 0)
            require_choice("fsrcnn_init", self.fsrcnn_init, ("unit", "reference"))
            require_choice("fsrcnn_client_weights", self.fsrcnn_client_weights, ("persistent", "reset"))
            require_int("fsrcnn_server_steps", self.fsrcnn_server_steps, 0)
            require_int("fsrcnn_server_batch", self.fsrcnn_server_batch, 1)
            require_positive("fsrcnn_server_lr", self.fsrcnn_server_lr)
            if self.upsampler == "fsrcnn":
                if self.multigrid != "uniform":
                    raise ValueError("algorithm.upsampler: fsrcnn needs algorithm.multigrid = 'uniform' "
                                     f"(one upsampling factor), got {self.multigrid!r}")
                if is_int(self.factor) and self.factor < 2:
                    raise ValueError(f"algorithm.upsampler: fsrcnn needs algorithm.factor >= 2 (there is "
                                     f"nothing to upsample at factor {self.factor})")
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
                stop_tolerance=self.stop_tolerance, label_guard=self.label_guard,
            )

    @classmethod
    def config_warnings(cls, options: OSFed.Options, train: Any) -> list[str]:
        if train.momentum:
            return [f"train.momentum={train.momentum} with {cls.name}: the paper (and 3SFC's code) encodes a plain-SGD "
                    f"local trajectory; with local momentum 0.9 OS-Fed's accuracy swung widely between early rounds "
                    f"on MNIST-5k (issue 11). Set train.momentum=0 unless you mean it"]
        return []

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
        self._init_fsrcnn(options, channels)
        self.pictures = RoundPictures.from_env(env)  # runtime.save_snapshots: rank 0 writes RUN/snapshots/round-NNNNNN.png

    # the FSRCNN upsampler (upsampler: fsrcnn) ----------------------------------------------------
    def _init_fsrcnn(self, options: OSFed.Options, channels: int) -> None:
        self.fsrcnn: FSRCNNShape | None = None
        self.fsrcnn_mode: str | None = None
        if options.upsampler != "fsrcnn":
            return
        if self.name != "osfed":
            raise ValueError(f"algorithm.upsampler: fsrcnn is implemented for osfed only, not {self.name}")
        self.fsrcnn = FSRCNNShape(channels, options.factor, options.fsrcnn_d, options.fsrcnn_s, options.fsrcnn_m)
        self.fsrcnn_mode = options.fsrcnn_mode
        self._shared_weights: np.ndarray | None = None  # the shared-seed init (lazily)
        self._fixed_grid: Grid | None = None  # fixed mode; server mode: the server's or the received weights
        # server mode, rank 0: the trained weights (checkpointed) and whether this process sent them yet
        self._server_weights: np.ndarray | None = None
        self._server_grid: Grid | None = None
        self._fsrcnn_broadcast = False
        self.fsrcnn_training: dict[str, float] = {}
        # server mode, workers: the weights received from the server (cached across rounds)
        self._received_weights: np.ndarray | None = None
        self._received_grid: Grid | None = None
        if self.fsrcnn_mode == "fixed":
            self._fixed_grid = self._grid(self.shared_fsrcnn_weights())

    @property
    def fsrcnn_tag(self) -> str:
        """The upsampler in payload headers: a config mismatch between parties is an error."""
        shape = self.fsrcnn
        return f"fsrcnn-{self.fsrcnn_mode}-d{shape.d}-s{shape.s}-m{shape.m}"

    def shared_fsrcnn_weights(self) -> np.ndarray:
        """The shared-seed initial FSRCNN weights (float32 vector, ``fsrcnn_init``): fixed mode's
        upsampler and the start of every client in client mode."""
        if self._shared_weights is None:
            self._shared_weights = shared_init(self.fsrcnn, self.env.seed, self.options.fsrcnn_init).vector()
        return self._shared_weights

    def _grid(self, weights: np.ndarray, learnable: bool = False) -> Grid:
        return grid_from_vector(self.fsrcnn, weights, self.env.model.vector.device, learnable)

    def server_fsrcnn_weights(self) -> np.ndarray:
        """Server mode, rank 0: the trained FSRCNN (trained on first use, or restored from a checkpoint).

        Trained on CPU from the run's seed, so it does not depend on the device; it is still
        checkpointed (``server_state``) because CPU kernels may round differently on another thread
        count, and the weights a resumed server decodes with must be the ones its clients hold.
        """
        if self._server_weights is None:
            _, height, width = self.env.input_shape
            o = self.options
            started = time.perf_counter()
            net, self.fsrcnn_training = train_server_fsrcnn(
                self.fsrcnn, (height, width), self.env.pixel_mean_std, self.env.seed, o.fsrcnn_server_steps,
                batch=o.fsrcnn_server_batch, lr=o.fsrcnn_server_lr,
            )
            self._server_weights = net.vector()
            info = self.fsrcnn_training
            print(f"[osfed-hpc] {self.name}: trained the server FSRCNN on the public image in "
                  f"{time.perf_counter() - started:.1f} s ({o.fsrcnn_server_steps} steps; last batch MSE "
                  f"{info['loss']:.4f}, bilinear {info['bilinear_loss']:.4f})", flush=True)
        return self._server_weights

    def _server_side_grid(self) -> Grid:
        if self._server_grid is None:
            self._server_grid = self._grid(self.server_fsrcnn_weights())
        return self._server_grid

    def _client_side_grid(self) -> Grid:
        if self._received_grid is None:
            raise ValueError("fsrcnn_mode=server: this worker has not received the server's FSRCNN weights "
                             "(they come with the first round a server process runs)")
        return self._received_grid

    def _wire_grid(self, arrays: dict[str, np.ndarray], server_side: bool) -> Grid:
        """The multi-grid function a payload was encoded with: bilinear, the fixed FSRCNN, the one
        whose weights the payload carries (client mode) or the server's broadcast one (server mode)."""
        if self.fsrcnn is None:
            return self.grid
        if self.fsrcnn_mode == "fixed":
            return self._fixed_grid
        if self.fsrcnn_mode == "client":
            return self._grid(np.asarray(arrays[FSRCNN_ARRAY]))
        return self._server_side_grid() if server_side else self._client_side_grid()

    def payload_size_hint(self) -> int:
        """Exact for float32 snapshots; 8-bit codecs are smaller."""
        return Payload(meta={**self.header(0, 0), "rejected": "x" * 64}, arrays={
            name: np.empty(shape, dtype) for name, (dtype, shape) in self._expected_arrays(raw=True).items()
        }).packed_size()

    # wire format -------------------------------------------------------------------------------
    def header(self, round: int, client_id: int) -> dict[str, Any]:
        """Meta every payload carries and the server checks: a config mismatch is an error, not noise."""
        o = self.options
        header = {"algorithm": self.name, "round": round, "client": client_id, "factor": o.factor,
                  "num_snapshots": o.num_snapshots, "multigrid": o.multigrid, "codec": o.codec, "mode": MODE}
        if self.fsrcnn is not None:  # bilinear payloads keep the paper's header
            header["upsampler"] = self.fsrcnn_tag
        return header

    def _expected_arrays(self, raw: bool = False) -> dict[str, tuple[str, tuple[int, ...] | None]]:
        spec: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        if self.options.codec == "none" or raw:
            spec["snapshot"] = ("float32", self.snapshot_shape)
        else:
            spec.update(array_spec(self.options.num_snapshots))
        spec["labels"] = (self.options.label_dtype, self.labels_shape)
        if self.fsrcnn_mode == "client":
            spec[FSRCNN_ARRAY] = ("float32", (self.fsrcnn.num_parameters,))
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

    def _direction(self, snapshots: torch.Tensor, labels: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
        """g(S, Y) at W_t through ``grid`` (default: the bilinear multi-grid); both sides call this."""
        model = self.env.model
        with exact_numerics(model.model):
            return synthetic_gradient(model, snapshots, labels, self.grid if grid is None else grid, create_graph=False)

    # server to clients (server-mode FSRCNN) ----------------------------------------------------
    def server_message(self, round: int) -> ServerMessage:
        """The model; in server mode also the FSRCNN weights in the first round this server process
        runs (round 1, or the first round after a resume, when workers may be new processes). They
        are data a client keeps: the runner counts them once per client, the first round it is
        selected (``kept_downlink_bytes``), not each time a process restart re-sends them."""
        if self.fsrcnn_mode != "server" or self._fsrcnn_broadcast:
            return ServerMessage(model=True)
        self._fsrcnn_broadcast = True
        return ServerMessage(model=True, common=self._fsrcnn_payload(self.server_fsrcnn_weights()), common_kept=True)

    def kept_downlink_bytes(self) -> int:
        """Server mode: the FSRCNN message (weights and header), which a client receives once."""
        if self.fsrcnn_mode != "server":
            return 0
        return self._fsrcnn_payload(np.zeros(self.fsrcnn.num_parameters, dtype=np.float32)).packed_size()

    def _fsrcnn_payload(self, weights: np.ndarray) -> Payload:
        return Payload(meta={"algorithm": self.name, "upsampler": self.fsrcnn_tag}, arrays={FSRCNN_ARRAY: weights})

    def client_begin_round(self, message: ReceivedMessage) -> None:
        """Server mode: cache the FSRCNN weights when the message carries them (checked first)."""
        if self.fsrcnn_mode != "server" or message.common is None:
            return
        context = f"round {message.round}: server FSRCNN weights"
        require_meta(message.common.meta, {"algorithm": self.name, "upsampler": self.fsrcnn_tag}, context)
        require(message.common, {FSRCNN_ARRAY: ("float32", (self.fsrcnn.num_parameters,))}, context)
        weights = np.array(message.common.arrays[FSRCNN_ARRAY], dtype=np.float32)  # a copy: the buffer is reused
        if not np.isfinite(weights).all():
            raise ValueError(f"{context} hold NaN or Inf")
        self._received_weights = weights
        self._received_grid = self._grid(weights)

    # worker side -------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        return self.client_updates([ctx], lambda: None)[0]

    def client_batch_size(self) -> int:
        return 1 if self.fsrcnn_mode == "client" else self.options.synthesis_batch

    def client_updates(self, contexts: list[ClientContext], load_start: Callable[[], None]) -> list[ClientResult]:
        """Local training of each client from W_t, then one synthesis for all of them at W_t.

        Each client's generator is drawn from in the same order as one at a time (its local
        training, then its synthesis start), so a batch changes only the rounding of the search.
        """
        model = self.env.model
        train = with_local_steps(self.env.train, self.options.segment_steps)
        locals_, targets, seconds = [], [], []
        for ctx in contexts:
            load_start()
            started = time.perf_counter()
            local = local_update(self.env, ctx, train)
            targets.append(self.error_feedback.target(ctx.state, local.update[: model.param_numel]))
            locals_.append(local)
            seconds.append(time.perf_counter() - started)
        model.load_(locals_[0].start)
        started = time.perf_counter()
        encodings = self.compress_many(targets, contexts)
        share = (time.perf_counter() - started) / len(contexts)
        results = []
        for ctx, local, encoding, own in zip(contexts, locals_, encodings, seconds):
            self.error_feedback.keep(ctx.state, encoding.residual)
            results.append(ClientResult(encoding.payload, {**local.stats, **encoding.stats}, seconds=own + share))
        return results

    def compress(self, target: torch.Tensor, ctx: ClientContext) -> ClientEncoding:
        """Encode ``target`` (flat, parameters only) at the model's current weights W_t."""
        return self.compress_many([target], [ctx])[0]

    def compress_many(self, targets: list[torch.Tensor], contexts: list[ClientContext]) -> list[ClientEncoding]:
        """Encode each client's target at W_t; the searches of all finite targets run as one batch.

        The scale and residual are computed from the *decoded* wire arrays, so quantisation error
        stays in the residual instead of being silently counted as sent.
        """
        encodings: list[ClientEncoding | None] = [None] * len(targets)
        searched = []
        for index, (target, ctx) in enumerate(zip(targets, contexts)):
            tau_norm = float(target.norm())
            if math.isfinite(tau_norm):
                searched.append(index)
            else:
                encodings[index] = self._rejection(self.header(ctx.round, ctx.client_id),
                                                   "update holds NaN or Inf (local training diverged)", tau_norm, None, {})
        if len(searched) == 1:
            index = searched[0]
            grid, learnable = self._synthesis_grid(contexts[index])
            found = [synthesize(
                self.env.model, targets[index], self.env.input_shape, self.options.num_snapshots, grid,
                self.env.num_classes, self.options.synthesis(), contexts[index].generator, learnable=learnable,
            )]
        elif searched:
            grid, learnable = self._synthesis_grid(contexts[searched[0]])  # the same for all: not client mode
            found = synthesize_batch(
                self.env.model, [targets[i] for i in searched], self.env.input_shape, self.options.num_snapshots,
                grid, self.env.num_classes, self.options.synthesis(), [contexts[i].generator for i in searched],
            )
        for index, (snapshots, labels, info) in zip(searched, found if searched else []):
            encodings[index] = self._encoding(targets[index], contexts[index], snapshots, labels, info, grid, learnable)
        return encodings

    def _encoding(self, target: torch.Tensor, ctx: ClientContext, snapshots: torch.Tensor, labels: torch.Tensor,
                  info: dict[str, float], grid: Grid, learnable: list[torch.Tensor]) -> ClientEncoding:
        """A found (S, Y) as it goes on the wire, its decoded direction, scale and residual."""
        meta = self.header(ctx.round, ctx.client_id)
        tau_norm = float(target.norm())
        if not (torch.isfinite(snapshots).all() and torch.isfinite(labels).all()):
            return self._rejection(meta, "snapshot holds NaN or Inf", tau_norm, target, info)
        arrays = self._wire_arrays(snapshots, labels)
        if learnable:  # client mode: the FSRCNN at the best iterate goes with the snapshot
            weights = grid.net.vector()
            if not np.isfinite(weights).all():
                return self._rejection(meta, "FSRCNN weights hold NaN or Inf", tau_norm, target, info)
            arrays[FSRCNN_ARRAY] = weights
        direction = self._direction(*self._decode_arrays(arrays), self._wire_grid(arrays, server_side=False))
        if self.options.scales == "tensor":
            scale = least_squares_scales(direction, target, self.tensor_sizes)
        else:
            scale = least_squares_scale(direction, target)
        if scale is None:
            return self._rejection(meta, "synthetic gradient is zero or not finite", tau_norm, target, info)
        update = self._scaled(scale, direction)
        residual = target - update
        arrays["scale"] = (scale.cpu().numpy() if torch.is_tensor(scale) else np.array([scale])).astype(np.float32)
        if learnable and self.options.fsrcnn_client_weights == "persistent":
            ctx.state[FSRCNN_STATE_KEY] = arrays[FSRCNN_ARRAY].copy()
        stats = {
            "cos": abs(float(cosine(update, target))), "cos_init": info["cos_init"], "tau_norm": tau_norm,
            "residual_norm": float(residual.norm()), **self._search_stats(info),
            "label_rms": float(labels.square().mean().sqrt()),
            "scale": float(scale.abs().mean()) if torch.is_tensor(scale) else scale,
        }
        return ClientEncoding(Payload(meta=meta, arrays=arrays), direction, scale, residual, stats)

    @staticmethod
    def _search_stats(info: dict[str, float]) -> dict[str, float]:
        return {"synth_seconds": info.get("seconds", 0.0), "synth_iters": info.get("iterations", 0.0),
                "synth_outer_steps": info.get("outer_steps", 0.0),
                "synth_stopped_early": info.get("stopped_early", 0.0),
                "label_rescales": info.get("label_rescales", 0.0)}

    def _synthesis_grid(self, ctx: ClientContext) -> tuple[Grid, list[torch.Tensor]]:
        """The multi-grid function the synthesis runs through, and the tensors it learns besides (S, Y).

        Client mode: a fresh FSRCNN from this client's weights of its previous round (``persistent``;
        the shared init in its first round) or from the shared init (``reset``), all of it learnable.
        """
        if self.fsrcnn_mode != "client":
            return self._wire_grid({}, server_side=False), []
        start = self.shared_fsrcnn_weights()
        if self.options.fsrcnn_client_weights == "persistent" and FSRCNN_STATE_KEY in ctx.state:
            start = ctx.state[FSRCNN_STATE_KEY]
            if start.shape != (self.fsrcnn.num_parameters,) or start.dtype != np.float32:
                raise ValueError(f"state {FSRCNN_STATE_KEY!r} is {start.dtype}{list(start.shape)}, expected "
                                 f"float32[{self.fsrcnn.num_parameters}] (algorithm.fsrcnn_* changed on resume?)")
        grid = self._grid(start, learnable=True)
        return grid, list(grid.net.parameters())

    def _rejection(self, meta, reason: str, tau_norm: float, residual, info: dict[str, float]) -> ClientEncoding:
        """A payload the server will refuse, sent so the round's bookkeeping sees this client.

        The residual keeps all of tau (nothing was transmitted) when tau is finite; a non-finite
        tau leaves the previous residual untouched, because storing NaN would poison every later
        round of this client.
        """
        stats = {
            "cos": float("nan"), "cos_init": info.get("cos_init", float("nan")), "tau_norm": tau_norm,
            "residual_norm": float(residual.norm()) if residual is not None else float("nan"),
            **self._search_stats(info), "scale": 0.0,
        }
        payload = Payload(meta={**meta, "rejected": reason}, arrays={"scale": np.zeros(self.num_scales, dtype=np.float32)})
        return ClientEncoding(payload, None, None, residual, stats)

    # server side -------------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        self._round = round
        self._mean = self.new_mean(self.env.model.params_vector, round)
        self.pictures.begin(round)

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
            grid = self._wire_grid(payload.arrays, server_side=True)
        except ValueError as exc:
            raise ValueError(f"{context}: {exc}") from None
        if not (torch.isfinite(snapshots).all() and torch.isfinite(labels).all()):
            raise ValueError(f"{context}: snapshot or labels hold NaN or Inf")
        self._decoded = (snapshots, labels, grid)  # for the round's picture, if one is due
        return scale, self._direction(snapshots, labels, grid)

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        scale, direction = self.decode(client_id, payload)
        update = self._scaled(scale, direction)
        self._mean.add(update, client_weight(self.options.weighting, weight), client_id)
        if self.pictures.active:  # a picture round (rank 0): what this accepted client sent
            self.pictures.add(client_id, *self._decoded)
        return {"decoded_norm": float(update.norm())}

    def server_finish(self) -> torch.Tensor:
        """W_t + the server optimizer's step on the mean decoded update (parameters); float buffers
        (GroupNorm models have none) are carried over unchanged: a snapshot says nothing about them."""
        self.pictures.finish()
        return self.apply_mean(self._mean)

    # checkpointing -----------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        """Server mode: the trained FSRCNN (51 KB for 1 channel), so a resumed server decodes with the
        very weights its clients were sent."""
        if self.fsrcnn_mode == "server" and self._server_weights is not None:
            return {FSRCNN_SERVER_KEY: self._server_weights.copy()}
        return {}

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        weights = state.pop(FSRCNN_SERVER_KEY, None)
        if weights is not None:
            if self.fsrcnn_mode != "server":
                raise ValueError(f"{self.name}: the checkpoint holds server FSRCNN weights, but "
                                 f"algorithm.upsampler/fsrcnn_mode is not fsrcnn/server")
            if weights.shape != (self.fsrcnn.num_parameters,) or weights.dtype != np.float32:
                raise ValueError(f"{self.name}: server state {FSRCNN_SERVER_KEY!r} is {weights.dtype}"
                                 f"{list(weights.shape)}, expected float32[{self.fsrcnn.num_parameters}]")
            self._server_weights = np.array(weights)
            self._server_grid = None
        super().load_server_state(state)
