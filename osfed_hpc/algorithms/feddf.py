"""FedDF: ensemble distillation for model fusion (Lin, Kong, Stich, Jaggi, NeurIPS 2020).

Round t, as FedDF's reference code does it (``noise_knowledge_transfer.py``):

- Clients: local SGD from W_t (as FedAvg) and upload the update Delta_k.
- Server: the student starts from the sample-weighted FedAvg mean (``use_fedavg_as_start``), through
  the run's server optimizer and update guard like FedAvg; then it is distilled from the ensemble of
  the round's client models (the teachers) on unlabeled inputs: loss = mean over teachers of
  KL(softmax(teacher/T) || softmax(student/T)) (``avg_losses``; ``avg_logits`` distils from the mean
  logits), T = 1, Adam lr 1e-3 with cosine annealing over the round's step budget, batch 128,
  gradient norm clipped to 5, student in train mode, teachers in eval mode. The student goes down.

Where the teachers run (ours, by the issue's design): FedDF's server holds every client model and
computes their logits itself. Here each client runs its own trained model (eval mode) over the
distillation inputs once and uploads the logits (n_distill x K) with its update, so rank 0 never
holds more than one client model. The logits of a fixed input are the same wherever they are
computed, so distilling against uploaded logits is FedDF's loss on a fixed set of inputs; the cost
is n_distill x K x 4 bytes of uplink per client (``logits_dtype: float16`` halves it).

The teachers fold one payload at a time: for ``avg_losses``, mean_i KL(p_i || q) = mean_i sum p_i log p_i
- sum (mean_i p_i) log q, so the server keeps the mean teacher distribution and the mean of
sum p log p (n x K + n floats, not one n x K array per client); the loss and its gradient are
FedDF's exactly (up to float rounding). ``distillation.TeacherFold`` does it.

Distillation inputs (``distill_data``), built once per rank from the seed, identical everywhere:

- ``noise`` (default; FedDF's ``random_data`` scheme, which needs no public data): standard normal
  draws of the input's shape, min-max scaled to [0, 1] as pixels, then normalised like the run's
  images (FedDF feeds the [0, 1] noise, or [-1, 1] with ``pn_normalize``, to models trained on
  equally normalised data). FedDF draws fresh noise for every batch; here a fixed set of
  ``distill_samples`` inputs is drawn once (the clients must label the same inputs), and the
  min-max is over that whole set (FedDF: over each batch of 128).
- ``train_unlabeled`` (ours): a keyed random subset of the training split used WITHOUT labels. It
  simulates an unlabeled public set; its images are also some clients' data, which a real public
  set would not be.

Not implemented: FedDF's validation-based model selection and early stopping (validate every 100
batches, stop after 2,000 batches without improvement, keep the best) need a labeled server
validation set; the test split must not serve as one, and there is no other here. Every round
therefore runs its full step budget and keeps the last student. Teacher weighting/dropping by
validation accuracy (``server_teaching_scheme``) is left out for the same reason: teachers count 1 each.

Wire bytes per client per round (``Payload`` layout, H = JSON header length, d = trainable values,
n = ``distill_samples``, K = classes, b = 4 or 2 by ``logits_dtype``):
uplink = align8(12 + H) + align8(4 d) + n K b; downlink = 4 d (the student).

Server phase: ``server_epochs`` epochs of ``steps_per_epoch`` Adam steps each per round (FedDF's
budget is 10,000 batches: the defaults 10 x 1,000). Adam moments, the step counter and the folded
teacher targets are in ``server_state`` during a phase, so a run resumed between two epochs reaches
the same model bit for bit; ``server_phase_end`` drops them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..payload import Payload, require, require_meta, to_tensor
from ..rng import numpy_stream, torch_stream
from .base import Algorithm, ClientContext, ClientResult, Environment, client_weight
from .distillation import TeacherFold, kl_to_targets
from .local_training import autocast, local_update
from .options import is_int, require_bool, require_choice, require_int, require_positive

#: payload_size_hint assumes round ids below this (only the header's length depends on the ids)
_HINT_ROUND = 10**8 - 1
#: the stream the distillation inputs are drawn from (server and clients alike)
DISTILL_STREAM = "feddf-distill"
#: torch.optim.Adam's defaults, which FedDF uses
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: server-state keys (present only during a server phase)
TARGETS, NEG_ENTROPY, ADAM_M, ADAM_V, STEP = ("feddf_targets", "feddf_target_neg_entropy", "feddf_adam_m",
                                              "feddf_adam_v", "feddf_step")
_LOGIT_DTYPES = {"float32": np.float32, "float16": np.float16}


class FedDF(Algorithm):
    name = "feddf"
    keeps_client_state = False  # ctx.state: only local_update's participation count (any worker may take any client)

    @dataclass
    class Options:
        #: unlabeled distillation inputs: "noise" (FedDF's random-noise scheme) or "train_unlabeled"
        #: (ours: a keyed subset of the training split without labels; those images are also clients' data)
        distill_data: str = "noise"
        #: inputs in the distillation set; every client uploads its logits on all of them. Every rank keeps
        #: the set on its device: n x C x H x W float32 (1,000 at 3 x 224 x 224: 602 MB)
        distill_samples: int = 1000
        #: dtype of the uploaded logits: "float32" or "float16" (ours: half the logit bytes)
        logits_dtype: str = "float32"
        #: "avg_losses" (FedDF's default: mean over teachers of KL) or "avg_logits" (KL to the mean logits)
        update_student_scheme: str = "avg_losses"
        #: server-phase epochs per round (0: FedAvg with logits uploads and no distillation)
        server_epochs: int = 10
        #: Adam steps per epoch; FedDF's budget is server_epochs x steps_per_epoch = 10,000 batches
        steps_per_epoch: int = 1000
        #: distillation batch size (FedDF: 128)
        distill_batch_size: int = 128
        #: the student's Adam learning rate (FedDF: 1e-3)
        distill_lr: float = 1e-3
        #: cosine annealing of distill_lr to 0 over the round's steps (FedDF's use_server_model_scheduler)
        cosine: bool = True
        #: distillation temperature T (FedDF: 1); the loss is scaled by T^2 (Hinton et al.; 1 at T = 1)
        temperature: float = 1.0
        #: clip the student's gradient norm to this before each Adam step (FedDF: 5); 0 turns it off
        grad_clip: float = 5.0
        #: the FedAvg start: "samples" weights clients by sample count (McMahan et al.), "uniform" by 1
        weighting: str = "samples"

        def validate(self) -> None:
            require_choice("distill_data", self.distill_data, ("noise", "train_unlabeled"))
            require_int("distill_samples", self.distill_samples, 1)
            require_choice("logits_dtype", self.logits_dtype, tuple(_LOGIT_DTYPES))
            require_choice("update_student_scheme", self.update_student_scheme, TeacherFold.SCHEMES)
            require_int("server_epochs", self.server_epochs, 0)
            require_int("steps_per_epoch", self.steps_per_epoch, 1)
            require_int("distill_batch_size", self.distill_batch_size, 1)
            require_positive("distill_lr", self.distill_lr)
            require_bool("cosine", self.cosine)
            require_positive("temperature", self.temperature)
            if isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (int, float)) or not (
                    math.isfinite(self.grad_clip) and self.grad_clip >= 0):
                raise ValueError(f"algorithm.grad_clip must be a number >= 0 (0: no clipping), got {self.grad_clip!r}")
            require_choice("weighting", self.weighting, ("samples", "uniform"))

    def __init__(self, options: FedDF.Options, env: Environment) -> None:
        super().__init__(options, env)
        if options.distill_data == "train_unlabeled":
            size = env.split_sizes.get("train")
            if size is not None and options.distill_samples > size:
                raise ValueError(f"algorithm.distill_samples={options.distill_samples} exceeds the {size} samples of "
                                 f"the training split (algorithm.distill_data=train_unlabeled)")
        self.logits_shape = (int(options.distill_samples), int(env.num_classes))
        self._inputs: torch.Tensor | None = None  # the distillation set, built on first use
        self._clear_phase()

    # the distillation set ----------------------------------------------------------------------
    def distillation_inputs(self) -> torch.Tensor:
        """The n unlabeled inputs (normalised, on ``env.device``), the same on every rank; cached."""
        if self._inputs is None:
            build = self._noise_inputs if self.options.distill_data == "noise" else self._train_inputs
            self._inputs = build().to(self.env.device, torch.float32)
        return self._inputs

    def _noise_inputs(self) -> torch.Tensor:
        """FedDF's random data: N(0, 1) draws min-max scaled to [0, 1] pixels, normalised as images are."""
        channels = self.env.input_shape[0]
        noise = torch.randn((self.logits_shape[0], *self.env.input_shape),
                            generator=torch_stream(self.env.seed, DISTILL_STREAM))
        low, high = noise.min(), noise.max()
        pixels = (noise - low) / (high - low)
        mean, std = (torch.tensor(v, dtype=torch.float32) for v in self.env.pixel_mean_std)
        if mean.numel() not in (1, channels) or std.numel() not in (1, channels):
            raise ValueError(f"{self.name}: pixel mean/std of {mean.numel()}/{std.numel()} channels for "
                             f"{channels}-channel inputs")
        return (pixels - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)

    def _train_inputs(self) -> torch.Tensor:
        """``distill_samples`` training images drawn without replacement from a keyed stream; labels dropped."""
        size = self.env.split_sizes.get("train")
        if self.env.load_images is None or size is None:
            raise ValueError("algorithm.distill_data=train_unlabeled needs the run's dataset (the environment "
                             "gives no load_images or no training-split size)")
        if self.logits_shape[0] > size:
            raise ValueError(f"algorithm.distill_samples={self.logits_shape[0]} exceeds the {size} samples of "
                             f"the training split (algorithm.distill_data=train_unlabeled)")
        indices = np.sort(numpy_stream(self.env.seed, DISTILL_STREAM).choice(size, self.logits_shape[0], replace=False))
        images, _ = self.env.load_images("train", indices)
        return images

    # wire format -------------------------------------------------------------------------------
    def header(self, round: int, client_id: int) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client_id}

    def _payload(self, meta: dict[str, Any], update: np.ndarray, logits: np.ndarray) -> Payload:
        return Payload(meta=meta, arrays={"update": update, "logits": logits})

    def packed_size(self, round: int, client_id: int) -> int:
        """The exact wire size of one client's payload: align8(12 + H) + align8(4 d) + n K b."""
        dtype = _LOGIT_DTYPES[self.options.logits_dtype]
        return self._payload(self.header(round, client_id), np.empty(self.env.model.numel, np.float32),
                             np.empty(self.logits_shape, dtype)).packed_size()

    def payload_size_hint(self) -> int:
        return self.packed_size(_HINT_ROUND, max(0, self.env.num_clients - 1))

    # worker side -------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_logits(self) -> torch.Tensor:
        """``env.model`` (a client's trained model) in eval mode over the distillation set: n x K float32."""
        model = self.env.model
        net = model.model
        inputs = self.distillation_inputs()
        batch = self.options.distill_batch_size
        was_training = net.training
        net.eval()
        try:
            logits = [net(model.to_input_format(inputs[i : i + batch])).float() for i in range(0, len(inputs), batch)]
        finally:
            net.train(was_training)
        return torch.cat(logits)

    def client_update(self, ctx: ClientContext) -> ClientResult:
        local = local_update(self.env, ctx)
        logits = self.teacher_logits().cpu()
        if self.options.logits_dtype == "float16":
            finite = torch.finfo(torch.float16).max
            logits = logits.clamp(-finite, finite)  # a huge but finite logit stays finite (NaN stays NaN)
        payload = self._payload(self.header(ctx.round, ctx.client_id), local.update.cpu().numpy(),
                                logits.numpy().astype(_LOGIT_DTYPES[self.options.logits_dtype]))
        return ClientResult(payload, local.stats)

    # server side: the fold ---------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        self._clear_phase()
        self._round = round
        self._mean = self.new_mean(self.env.model.vector, round)
        self._fold = TeacherFold(self.options.update_student_scheme, self.logits_shape, self.options.temperature)

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        context = f"client {client_id}, round {self._round}"
        require_meta(payload.meta, self.header(self._round, client_id), context)
        require(payload, {"update": ("float32", (self.env.model.numel,)),
                          "logits": (self.options.logits_dtype, self.logits_shape)}, context)
        logits = payload.arrays["logits"]
        if not np.isfinite(logits).all():
            raise ValueError(f"{context}: logits hold NaN or Inf")
        update = to_tensor(payload.arrays["update"], self._mean.sum.device)
        # the update guard may refuse the update (ValueError): then this client teaches nothing either
        self._mean.add(update, client_weight(self.options.weighting, weight), client_id)
        self._fold.add(torch.from_numpy(logits.astype(np.float64)))  # a copy: the payload buffer is reused
        return {}

    def server_finish(self) -> torch.Tensor:
        """The FedAvg mean through the server optimizer: the student's start. Keeps the teachers' targets
        for the server phase (none when ``server_epochs`` is 0: no phase would drop them)."""
        state = self.apply_mean(self._mean)
        targets = self._fold.targets() if self.options.server_epochs > 0 else None
        if targets is not None:
            device = self.env.model.vector.device
            self._targets = (targets[0].to(device), targets[1].to(device))
        self._mean = self._fold = None
        return state

    # server side: distillation -----------------------------------------------------------------
    def server_phase_epochs(self, round: int) -> int:
        return int(self.options.server_epochs)

    def learning_rate(self, step: int) -> float:
        """The Adam learning rate of the round's step ``step`` (0-based): cosine from distill_lr to 0
        over server_epochs x steps_per_epoch steps (torch's CosineAnnealingLR, closed form)."""
        lr = float(self.options.distill_lr)
        if not self.options.cosine:
            return lr
        total = self.options.server_epochs * self.options.steps_per_epoch
        return lr * (1 + math.cos(math.pi * step / total)) / 2

    def server_phase_epoch(self, round: int, epoch: int) -> dict[str, float]:
        if self._targets is None:  # no client was accepted: nothing to distil from
            return {"loss": float("nan"), "steps": 0.0, "stop_early": 1.0}
        model = self.env.model
        net = model.model
        params = model.params_vector
        if self._adam_m is None:
            if epoch != 1:
                raise RuntimeError(f"{self.name}: server phase epoch {epoch} of round {round} has no optimizer state "
                                   f"(it is neither the first epoch nor restored from a checkpoint)")
            self._adam_m, self._adam_v, self._step = torch.zeros_like(params), torch.zeros_like(params), 0
        inputs = self.distillation_inputs()
        probs, neg_entropy = self._targets
        n = len(inputs)
        batch = min(self.options.distill_batch_size, n)
        steps = self.options.steps_per_epoch
        generator = self.server_generator(round, f"phase-{epoch}")
        passes = math.ceil(steps * batch / n)
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)]).to(inputs.device)
        temperature = float(self.options.temperature)
        total = torch.zeros((), device=params.device)
        was_training = net.training
        net.train()  # FedDF trains the student in train mode
        lr = self.learning_rate(self._step)
        try:
            for j in range(steps):
                index = order[j * batch : (j + 1) * batch]
                lr = self.learning_rate(self._step)
                with autocast(params.device, self.env.autocast_dtype):
                    logits = net(model.to_input_format(inputs[index]))
                loss = kl_to_targets(logits, probs[index], neg_entropy[index], temperature)
                for p in model.params:
                    p.grad = None
                loss.backward()
                self._adam_step(params, model.flat_grad(), lr)
                total += loss.detach()
        finally:
            for p in model.params:
                p.grad = None
            net.train(was_training)
        return {"loss": float(total) / steps, "steps": float(steps), "lr": lr}

    @torch.no_grad()
    def _adam_step(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Gradient-norm clipping (torch's clip_grad_norm_) then one step of torch.optim.Adam's
        default algorithm, on the flat parameter vector in place."""
        clip = float(self.options.grad_clip)
        if clip > 0:
            norm = torch.linalg.vector_norm(grad)
            grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))
        beta1, beta2 = ADAM_BETAS
        self._step += 1
        self._adam_m.mul_(beta1).add_(grad, alpha=1 - beta1)
        self._adam_v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**self._step
        bias2 = 1 - beta2**self._step
        denom = (self._adam_v.sqrt() / math.sqrt(bias2)).add_(ADAM_EPS)
        params.addcdiv_(self._adam_m, denom, value=-lr / bias1)

    def server_phase_end(self, round: int) -> None:
        self._clear_phase()

    def _clear_phase(self) -> None:
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None
        self._adam_m: torch.Tensor | None = None
        self._adam_v: torch.Tensor | None = None
        self._step = 0

    # checkpointing -----------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        """Empty outside a phase; during one: the teachers' targets, Adam's moments and step count."""
        state: dict[str, np.ndarray] = {}
        if self._targets is not None:
            state[TARGETS] = self._targets[0].cpu().numpy().copy()
            state[NEG_ENTROPY] = self._targets[1].cpu().numpy().copy()
        if self._adam_m is not None:
            state[ADAM_M] = self._adam_m.cpu().numpy().copy()
            state[ADAM_V] = self._adam_v.cpu().numpy().copy()
            state[STEP] = np.array([self._step], dtype=np.int64)
        return state

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        targets, neg_entropy = state.pop(TARGETS, None), state.pop(NEG_ENTROPY, None)
        adam_m, adam_v, step = state.pop(ADAM_M, None), state.pop(ADAM_V, None), state.pop(STEP, None)
        if state:
            raise ValueError(f"{self.name}: unexpected server state {sorted(state)}")
        self._clear_phase()
        if targets is None and neg_entropy is None and adam_m is None and adam_v is None and step is None:
            return
        n, k = self.logits_shape
        d = self.env.model.param_numel
        expected = {TARGETS: (targets, (n, k)), NEG_ENTROPY: (neg_entropy, (n,))}
        if adam_m is not None or adam_v is not None or step is not None:
            expected.update({ADAM_M: (adam_m, (d,)), ADAM_V: (adam_v, (d,))})
        for key, (value, shape) in expected.items():
            if value is None or value.dtype != np.float32 or value.shape != shape or not np.isfinite(value).all():
                found = "missing" if value is None else f"{value.dtype}{list(value.shape)}"
                raise ValueError(f"{self.name}: server state {key!r} is {found}, expected finite float32{list(shape)}")
        device = self.env.model.vector.device
        self._targets = (torch.from_numpy(targets.copy()).to(device), torch.from_numpy(neg_entropy.copy()).to(device))
        if adam_m is not None:
            if step is None or step.shape != (1,) or step.dtype != np.int64 or not is_int(int(step[0])) or step[0] < 0:
                raise ValueError(f"{self.name}: server state {STEP!r} must be int64[1] >= 0")
            self._adam_m = torch.from_numpy(adam_m.copy()).to(device)
            self._adam_v = torch.from_numpy(adam_v.copy()).to(device)
            self._step = int(step[0])
