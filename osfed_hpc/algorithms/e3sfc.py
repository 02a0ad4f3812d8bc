"""E-3SFC (TNNLS 2025): 3SFC with double-way compression — the downlink is a snapshot too.

Uplink: exactly 3SFC (OS-Fed with factor 1 by default; ``algorithm.factor`` may be raised for a
multi-grid variant): each client sends (S, Y, s) encoding tau = Delta + e_k.

Server, round t: decodes and averages the client snapshots at W_t as OS-Fed does, passes the mean
through the server optimizer (Delta_g'), then compresses its own update the same way a client
does: tau_g = Delta_g' + e_g, one server snapshot (x_g, y_g, s_g) synthesised at W_t (random start
from ``server_generator(t, "e3sfc")``), e_g <- tau_g - s_g g_g and W_{t+1} = W_t + s_g g_g. Nothing
else changes W: the server's model is exactly what the clients can rebuild from the snapshot.

Downlink: round t+1 sends the round-t server snapshot (``model=False``) instead of the weights;
every worker decodes it at its replica of W_t with the very function the server used and steps to
W_{t+1}. Round 1, rounds after a failed server synthesis and every ``resync_every`` rounds send the
full model instead (a resync, counted as downlink).

Drift: client and server compute the same gradient at the same weights, so on CPU the replicas
stay bitwise equal to the server's model. On GPUs some backward kernels have no deterministic
version (see ``snapshot.exact_numerics``) and the replicas may drift by rounding; every
``drift_every`` rounds the server sends its true weights as a diagnostic (never counted as
downlink) and each client reports ``drift = max |W_worker - W_server|``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..payload import Payload, require, require_meta
from .base import ClientContext, ClientResult, ReceivedMessage, ServerMessage
from .error_feedback import ErrorFeedback
from .options import require_bool, require_int
from .osfed import OSFed

#: the "client" field of the server snapshot's header (client ids are >= 0)
SERVER = -1
#: server-state keys (checkpointed as plain arrays)
RESIDUAL_KEY = "e3sfc.server_residual"
PENDING_ROUND_KEY = "e3sfc.pending.round"
PENDING_PREFIX = "e3sfc.pending.array."


class E3SFC(OSFed):
    name = "e3sfc"
    client_stat_names = (*OSFed.client_stat_names, "drift")

    @dataclass
    class Options(OSFed.Options):
        #: 3SFC has no multi-grid; raise it (with ``multigrid``) for a multi-grid E-3SFC variant
        factor: int = 1
        #: send the full model every this many rounds (0 = only in round 1 and after a failed
        #: server synthesis): bounds the replicas' drift on GPUs, at the cost of a model's downlink
        resync_every: int = 0
        #: every this many rounds (0 = never) the server also sends its weights as an uncounted
        #: diagnostic and clients report ``drift``; costs one model broadcast in those rounds
        drift_every: int = 10
        #: the server's own error feedback e_g (the paper's double-way compression keeps it)
        server_error_feedback: bool = True

        def validate(self) -> None:
            super().validate()
            require_int("resync_every", self.resync_every, 0)
            require_int("drift_every", self.drift_every, 0)
            require_bool("server_error_feedback", self.server_error_feedback)

    def __init__(self, options: E3SFC.Options, env) -> None:
        super().__init__(options, env)
        # server side
        self.server_feedback = ErrorFeedback(options.server_error_feedback, env.model.param_numel, RESIDUAL_KEY)
        self._feedback_state: dict[str, np.ndarray] = {}
        self.pending: Payload | None = None  # the server snapshot the next round sends
        self.server_stats: dict[str, float] = {}  # the last server synthesis (the runner logs fold stats only)
        # worker side
        self._replica_round: int | None = None  # the round whose start state this worker's replica holds
        self._drift: tuple[int, float] | None = None  # (round, drift) measured in client_begin_round

    # server to clients -------------------------------------------------------------------------
    def server_message(self, round: int) -> ServerMessage:
        """The pending server snapshot, or the full model in a resync round; plus the server's
        weights as an uncounted diagnostic in drift rounds."""
        every = self.options.resync_every
        resync = self.pending is None or (every > 0 and round % every == 0)
        common = None if resync else self.pending
        return ServerMessage(model=resync, common=common, diagnostics=self._drift_probe(round))

    def _drift_probe(self, round: int) -> Payload | None:
        every = self.options.drift_every
        if not every or round % every:
            return None
        weights = self.env.model.vector.detach().to("cpu", torch.float32).numpy().copy()
        return Payload(meta={"algorithm": self.name, "round": round}, arrays={"model": weights})

    def client_begin_round(self, message: ReceivedMessage) -> None:
        """Step this worker's replica from W_{t-1} to W_t with the server snapshot (unless the model
        itself came down), then measure drift if the server sent its weights. Everything is
        checked before the replica changes.

        A replica that cannot be brought to W_t is an error, not a warning: every later round would
        build on a wrong state. A worker instance that has not seen a round yet and gets no model
        holds a replica restored from a checkpoint, i.e. the server's state *after* the pending
        snapshot (the runner restores workers from the server's vector); it checks the snapshot
        and does not apply it a second time.
        """
        server = None if message.diagnostics is None else self._server_weights(message.diagnostics, message.round)
        if not message.model:
            self._continue_from_snapshot(message)
        self._replica_round = message.round
        self._drift = None
        if server is not None:
            self._drift = (message.round, float((self.env.model.vector - server).abs().max()))

    def _continue_from_snapshot(self, message: ReceivedMessage) -> None:
        round = message.round
        if message.common is None:
            raise ValueError(f"round {round}: the server sent neither the model nor a server snapshot")
        previous = round - 1
        if self._replica_round is not None and self._replica_round != previous:
            raise ValueError(f"round {round}: this worker's replica holds the start of round {self._replica_round}, "
                             f"but the server snapshot continues from round {previous}")
        if self._replica_round is None:  # restored replica: already W_t (see client_begin_round)
            self.check_server_snapshot(message.common, previous)
            return
        scale, direction = self.decode_server_snapshot(message.common, previous)
        self.env.model.load_(self._advanced(self.env.model.vector, scale, direction))

    def _server_weights(self, diagnostics: Payload, round: int) -> torch.Tensor:
        """The server's W_t from the drift diagnostics, checked before the replica is touched."""
        context = f"round {round}: drift diagnostics"
        if diagnostics.meta.get("round") != round:
            raise ValueError(f"{context} are of round {diagnostics.meta.get('round')!r}")
        require(diagnostics, {"model": ("float32", (self.env.model.numel,))}, context)
        return torch.from_numpy(np.array(diagnostics.arrays["model"])).to(self.env.model.vector.device)

    # worker side -------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        """3SFC's client, plus this worker's drift of the round (NaN when not measured)."""
        result = super().client_update(ctx)
        drift = self._drift[1] if self._drift is not None and self._drift[0] == ctx.round else math.nan
        result.stats["drift"] = drift
        return result

    # the server snapshot (both sides) ----------------------------------------------------------
    def check_server_snapshot(self, payload: Payload, round: int) -> None:
        """Raise ValueError unless ``payload`` is this config's server snapshot of ``round``."""
        context = f"server snapshot of round {round}"
        require_meta(payload.meta, self.header(round, SERVER), context)
        require(payload, self._expected_arrays(), context)
        if not np.isfinite(np.asarray(payload.arrays["scale"], dtype=np.float32)).all():
            raise ValueError(f"{context}: scale holds NaN or Inf")

    def decode_server_snapshot(self, payload: Payload, round: int) -> tuple[float | torch.Tensor, torch.Tensor]:
        """(s_g, g_g) at the model's current weights: the same decoder the clients' payloads go through."""
        self.check_server_snapshot(payload, round)
        scales = np.array(payload.arrays["scale"], dtype=np.float32)
        scale = torch.from_numpy(scales) if self.options.scales == "tensor" else float(scales[0])
        try:
            snapshots, labels = self._decode_arrays(payload.arrays)
        except ValueError as exc:
            raise ValueError(f"server snapshot of round {round}: {exc}") from None
        if not (torch.isfinite(snapshots).all() and torch.isfinite(labels).all()):
            raise ValueError(f"server snapshot of round {round}: snapshot or labels hold NaN or Inf")
        return scale, self._direction(snapshots, labels)

    def _advanced(self, vector: torch.Tensor, scale: float | torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """W + s g on the parameters (buffers unchanged): one code path, so server and workers
        round identically."""
        state = vector.clone()
        state[: self.env.model.param_numel].add_(self._scaled(scale, direction))
        return state

    # server side -------------------------------------------------------------------------------
    def server_finish(self) -> torch.Tensor:
        """Compress the round's aggregated step into one server snapshot and return W_t + s_g g_g.

        If synthesis fails (non-finite target or snapshot, zero gradient) the model stays at W_t,
        nothing is pending and the next round resyncs the full model.
        """
        model = self.env.model
        mean = self._mean.mean()
        step = torch.zeros_like(model.params_vector) if mean is None else self.env.server_optimizer.step(mean)
        target = self.server_feedback.target(self._feedback_state, step)
        ctx = ClientContext(client_id=SERVER, round=self._round, data=None, state={},
                            generator=self.server_generator(self._round, "e3sfc"), seed=self.env.seed)
        encoding = self.compress(target, ctx)
        self.server_stats = {"server_" + key: value for key, value in encoding.stats.items()}
        self.pending = None
        new = model.vector.clone()
        if encoding.direction is not None:
            candidate = self._advanced(model.vector, encoding.scale, encoding.direction)
            if bool(torch.isfinite(candidate).all()):
                new, self.pending = candidate, encoding.payload
            else:
                encoding.residual = target
        self.server_feedback.keep(self._feedback_state, encoding.residual)
        return new

    # checkpointing -----------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        state = {key: value.copy() for key, value in self._feedback_state.items()}
        if self.pending is not None:
            state[PENDING_ROUND_KEY] = np.array([self.pending.meta["round"]], dtype=np.int64)
            state.update({PENDING_PREFIX + name: np.array(array) for name, array in self.pending.arrays.items()})
        return state

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore e_g and the pending server snapshot (checked as a worker would check it)."""
        state = dict(state)
        feedback = {RESIDUAL_KEY: state.pop(RESIDUAL_KEY)} if RESIDUAL_KEY in state else {}
        self.server_feedback.residual(feedback, self.env.model.vector.device)  # raises on a wrong shape
        pending_round = state.pop(PENDING_ROUND_KEY, None)
        arrays = {key[len(PENDING_PREFIX):]: state.pop(key) for key in list(state) if key.startswith(PENDING_PREFIX)}
        if state:
            raise ValueError(f"{self.name}: unexpected server state {sorted(state)}")
        pending = None
        if pending_round is not None:
            if pending_round.shape != (1,) or pending_round.dtype != np.int64:
                raise ValueError(f"{self.name}: server state {PENDING_ROUND_KEY!r} must be int64[1]")
            round = int(pending_round[0])
            pending = Payload(meta=self.header(round, SERVER), arrays=arrays)
            self.check_server_snapshot(pending, round)
        elif arrays:
            raise ValueError(f"{self.name}: server state has a pending snapshot without its round")
        self._feedback_state = feedback
        self.pending = pending
