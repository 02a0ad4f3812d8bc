"""FedAF: aggregation-free federated learning (Wang, Fu, Kanagavelu, Wei, Liu, Goh; CVPR 2024).

Clients do not send models. Each client condenses its data into a few synthetic images per class,
the server trains the global model on the union of what the clients sent, and the model itself is
never averaged. Spec: methods.md section 8; no official code exists, the third-party code
(tejarshaarigila/FedAF) was read for the order of a round and its defaults.

Round t, one client k (``client_update``):

1. **Model re-sampling.** The embedding net is w_emb = gamma * W_t + (1 - gamma) * w_rand, with
   w_rand a *fresh initialisation* of the same architecture drawn from a stream keyed by (seed,
   round) (every ``reset_parameters`` of the model, run on a CPU copy under that seed: the same
   numbers on every rank and device, and for ``cnn``/``mlp`` exactly ``build_model(seed=key)``).
   Parameters no module re-initialises (a ViT's class token and position embedding) keep W_t.
   Float buffers (BatchNorm statistics) keep W_t's. The net is frozen and in eval mode.
2. **Knowledge the client shares.** With w_emb, over all local data: class-wise mean logits
   v_{k,c} and soft labels R_{k,c} = mean softmax(f(x)/T), for every present class c.
3. **Condensation.** S_k = ``ipc`` images per present class, initialised from random real images
   of the class (drawn from ``ctx.generator``; a class with fewer than ``ipc`` images repeats
   some), optimised for ``iterations`` steps of SGD(``lr_img``, momentum 0.5) on

       sum_c || mean psi(real batch_c) - mean psi(S_c) ||^2  +  lambda_loc * SWD(logits(S_c), V_c)

   psi = the input of the model's final ``nn.Linear`` classifier (penultimate features), a real
   batch of at most ``real_batch_size`` images per class drawn afresh every iteration, V_c the
   global class logits the client *received*. SWD: ``swd_directions`` random unit directions
   (from ``ctx.generator``, new every iteration), sorted 1-D projections matched quantile by
   quantile (linear interpolation to equal counts), mean squared difference. It is written in
   torch and differentiable; the third-party numpy version has no gradient (a bug not copied).
4. **Uplink**: S_k, its classes (hard labels: S_k is sorted by class, ``ipc`` images each), v_k
   and R_k (one row per present class).

Server: the fold copies every S_k and sums v and R per class; ``server_finish`` returns W_t
unchanged (aggregation-free). V_c = mean of v_{k,c} over the clients having class c goes down
in the *next* round's message; R_c (same mean) is used now. The server phase then trains the
global model on the union of this round's S_k (the spec and the third-party code keep the
synthetic data of the round only; nothing accumulates across rounds) for ``server_epochs``
epochs of SGD(``server_lr``, ``server_momentum``), batch ``server_batch_size``, loss
CE + lambda_glob * LGKM with LGKM = 1/2 [KL(R_c || Q_c) + KL(Q_c || R_c)] averaged over the
classes of the batch, Q_c = the batch's class-wise mean softmax(f(s)/T) of the global model (a
per-batch estimate, so LGKM has gradients; the third-party code recomputes Q once per epoch
without gradient). A fresh optimizer per round, as in the third-party code.

Our departures, documented:

- **One-round lag of V.** The third-party order exchanges twice per round (v up, V down, then S
  and R up). The runner's contract has one uplink per round, so the client uploads v_{k,c} of
  round t together with S_k, and the aggregated V reaches the clients in round t+1's message
  (``ServerMessage.common``). Round 1 has no V: the CDC term is off.
- v and R are computed with the re-sampled model (as the third-party code does); R from the
  client's real data (methods.md), not from its synthetic data (the third-party code).
- The real features of a class are computed once per round and the "fresh real batch" of every
  iteration is drawn from them: the net is frozen, so this is the same loss without re-running
  the net on real images each iteration.

Wire bytes, one client, c present classes, images C x H x W, K classes, H_j the JSON header:
``align8(12 + H_j) + align8(4 c ipc C H W) + align8(4 c) + align8(4 c K) + 4 c K``
(images float32, classes int32, v and R float32). Downlink: the model (4 bytes per trainable value)
plus, from round 2, ``align8(12 + H_j) + align8(4 K^2) + K`` (V float32 and a uint8 class mask).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..flat import FlatModel
from ..payload import Payload, require, require_meta
from ..rng import torch_stream
from .base import Algorithm, ClientContext, ClientResult, ReceivedMessage, ServerMessage
from .local_training import autocast
from .options import require_fraction, require_int, require_positive

#: the largest magnitude a payload value may have (images are normalised pixels, logits are logits)
MAX_ABS_VALUE = 1e6
#: the momentum of the image optimizer (the spec's fixed value, as in dataset condensation)
IMAGE_MOMENTUM = 0.5
#: the server-state keys of this method
_STATE = "fedaf."
_PROB_EPS = 1e-8


# building blocks ---------------------------------------------------------------------------------
def random_directions(dim: int, count: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` random unit vectors in R^dim (rows), drawn on the CPU from ``generator``."""
    directions = torch.randn(count, dim, generator=generator, dtype=torch.float32)
    directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return directions.to(device)


def _quantiles(sorted_rows: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` quantiles (levels (i + 0.5) / count) of each row of sorted samples, by linear
    interpolation between order statistics; the samples themselves when there are ``count``."""
    n = sorted_rows.shape[1]
    if n == count:
        return sorted_rows
    levels = (torch.arange(count, dtype=torch.float64) + 0.5) * n / count - 0.5
    levels = levels.clamp(0, n - 1)
    low = levels.floor().long()
    high = (low + 1).clamp(max=n - 1)
    frac = (levels - low).to(sorted_rows.dtype).to(sorted_rows.device)
    low, high = low.to(sorted_rows.device), high.to(sorted_rows.device)
    return sorted_rows[:, low] * (1 - frac) + sorted_rows[:, high] * frac


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Squared sliced Wasserstein-2 distance between point sets ``x`` (n, d) and ``y`` (m, d).

    Both sets are projected on every direction (rows of ``directions``, unit vectors); the
    sorted projections are matched quantile by quantile (interpolated to max(n, m) levels when the
    counts differ) and the squared differences averaged over quantiles and directions. Zero for
    equal sets, symmetric, invariant to the order of points, differentiable in ``x`` and ``y``.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or x.shape[1] != directions.shape[1]:
        raise ValueError(f"sliced_wasserstein: shapes {list(x.shape)}, {list(y.shape)}, directions "
                         f"{list(directions.shape)} do not fit")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("sliced_wasserstein: an empty point set has no distribution")
    count = max(x.shape[0], y.shape[0])
    px = _quantiles(torch.sort(directions @ x.T, dim=1).values, count)
    py = _quantiles(torch.sort(directions @ y.T, dim=1).values, count)
    return ((px - py) ** 2).mean()


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1/2 [KL(p || q) + KL(q || p)] per row of two (.., K) probability tables.

    Both are smoothed to (p + eps) / (1 + K eps) first: still distributions (so the value is >= 0),
    and no log 0 for a class a model gives probability 0."""
    k = p.shape[-1]
    p = (p + _PROB_EPS) / (1 + k * _PROB_EPS)
    q = (q + _PROB_EPS) / (1 + k * _PROB_EPS)
    log_p, log_q = p.log(), q.log()
    return 0.5 * ((p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1))


def class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class means of the rows of ``values`` (K, D), per-class counts (K,)); classes without
    rows have mean 0. Differentiable in ``values``."""
    onehot = F.one_hot(labels, num_classes).to(values.dtype)
    counts = onehot.sum(0)
    return (onehot.T @ values) / counts.clamp_min(1).unsqueeze(1), counts


def lgkm_loss(logits: torch.Tensor, labels: torch.Tensor, soft_labels: torch.Tensor, present: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """LGKM on one batch: mean over the classes in the batch that have client soft labels R_c of
    symmetric_kl(R_c, Q_c), Q_c = mean softmax(logits / T) of the batch's samples of class c."""
    q, counts = class_means(F.softmax(logits.float() / temperature, dim=1), labels, soft_labels.shape[0])
    use = (counts > 0) & present
    if not bool(use.any()):
        return logits.sum() * 0.0
    return symmetric_kl(soft_labels[use], q[use]).mean()


def find_classifier(net: nn.Module, num_classes: int) -> nn.Linear:
    """The model's final classifier: the last ``nn.Linear`` with ``num_classes`` outputs. Its input is
    FedAF's feature map psi (cnn, mlp, resnet18/resnet18_gn, regnet, ViTs all end in one)."""
    found = None
    for module in net.modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = module
    if found is None:
        raise ValueError(f"algorithm.name=fedaf needs a model whose last layer is an nn.Linear classifier with "
                         f"{num_classes} outputs (its input is the feature map psi); {type(net).__name__} has none")
    return found


class FeatureNet:
    """A frozen copy of the model in eval mode whose forward returns (penultimate features, logits)."""

    def __init__(self, model: FlatModel, num_classes: int) -> None:
        self.flat = FlatModel(copy.deepcopy(model.model), channels_last=model.channels_last)
        for param in self.flat.params:
            param.requires_grad_(False)
        self.flat.model.eval()
        self._features: torch.Tensor | None = None
        find_classifier(self.flat.model, num_classes).register_forward_pre_hook(self._keep_input)

    def _keep_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._features = inputs[0]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._features = None
        logits = self.flat.model(self.flat.to_input_format(x))
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("the classifier of the embedding net was not called in its forward")
        return features.flatten(1), logits


class Resampler:
    """Fresh initialisations of the model, keyed by (seed, round): the w_rand of model re-sampling.

    Runs every module's ``reset_parameters`` on a CPU copy under a seed from the keyed stream, so
    every rank and device draws the same numbers. ``covered`` marks the trainable values some module
    re-initialises; the others (e.g. a ViT's class token) are left to W_t by ``embedding_state``."""

    def __init__(self, model: FlatModel) -> None:
        self.fresh = FlatModel(copy.deepcopy(model.model).to("cpu"), channels_last=model.channels_last)
        self._modules = [m for m in self.fresh.model.modules() if callable(getattr(m, "reset_parameters", None))
                         or callable(getattr(m, "_reset_parameters", None))]
        reset = {id(p) for m in self._modules for p in m.parameters(recurse=False)}
        self.covered = torch.cat([torch.full((p.numel(),), id(p) in reset, dtype=torch.bool) for p in self.fresh.params])

    @staticmethod
    def key(seed: int, round: int) -> int:
        """The torch seed of round ``round``'s fresh initialisation."""
        return int(torch_stream(seed, "fedaf-resample", round).initial_seed())

    def random_params(self, seed: int, round: int) -> torch.Tensor:
        """The trainable values of a fresh initialisation (CPU, float32, vector layout)."""
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.key(seed, round))
            for module in self._modules:
                reset = getattr(module, "reset_parameters", None) or module._reset_parameters
                reset()
        return self.fresh.vector[: self.fresh.param_numel].clone()

    def embedding_state(self, state: torch.Tensor, gamma: float, seed: int, round: int) -> torch.Tensor:
        """gamma * W + (1 - gamma) * w_rand on the re-initialised parameters; W elsewhere (the
        parameters no module re-initialises, and the float buffers)."""
        n = self.fresh.param_numel
        rand = self.random_params(seed, round).to(state.device)
        out = state.clone()
        mixed = gamma * state[:n] + (1 - gamma) * rand
        out[:n] = torch.where(self.covered.to(state.device), mixed, state[:n])
        return out


# the method --------------------------------------------------------------------------------------
class FedAF(Algorithm):
    name = "fedaf"
    keeps_client_state = False  # ctx.state: never read or written (any worker may take any client)
    client_stat_names = ("train_loss", "dm_loss_first", "dm_loss_last", "cdc_loss_last", "classes_present")

    @dataclass
    class Options:
        #: synthetic images per present class (third-party default 50)
        ipc: int = 50
        #: condensation iterations per client and round (third-party default 500)
        iterations: int = 500
        #: learning rate of the synthetic images (SGD, momentum 0.5)
        lr_img: float = 1.0
        #: weight of the CDC (sliced Wasserstein) term on the client
        lambda_loc: float = 0.8
        #: weight of the LGKM (symmetric KL) term on the server
        lambda_glob: float = 0.8
        #: softmax temperature of the soft labels R and of Q
        temperature: float = 2.0
        #: model re-sampling: w_emb = gamma * W_t + (1 - gamma) * fresh init, in [0, 1]
        gamma: float = 0.9
        #: random directions of the sliced Wasserstein distance
        swd_directions: int = 100
        #: real images per class of the DM term's batch, drawn afresh every iteration
        real_batch_size: int = 256
        #: server epochs on the round's synthetic data (third-party default 500)
        server_epochs: int = 500
        #: server SGD learning rate and momentum (third-party: 1e-3, 0.9)
        server_lr: float = 0.001
        server_momentum: float = 0.9
        server_batch_size: int = 256

        def validate(self) -> None:
            require_int("ipc", self.ipc, 1)
            require_int("iterations", self.iterations, 0)
            require_positive("lr_img", self.lr_img)
            for key in ("lambda_loc", "lambda_glob"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"algorithm.{key} must be a number >= 0, got {value!r}")
            require_positive("temperature", self.temperature)
            require_fraction("gamma", self.gamma, open_low=False)
            require_int("swd_directions", self.swd_directions, 1)
            require_int("real_batch_size", self.real_batch_size, 1)
            require_int("server_epochs", self.server_epochs, 1)
            require_positive("server_lr", self.server_lr)
            require_fraction("server_momentum", self.server_momentum, open_low=False, closed_high=False)
            require_int("server_batch_size", self.server_batch_size, 1)

    def __init__(self, options: FedAF.Options, env) -> None:
        super().__init__(options, env)
        find_classifier(env.model.model, env.num_classes)  # a clear error now rather than in round 1
        self.image_shape = tuple(int(s) for s in env.input_shape)
        # worker side, built on first use (rank 0 alone never condenses)
        self._resampler: Resampler | None = None
        self._embed: FeatureNet | None = None
        self._embed_round: int | None = None
        # server side: V for the next message (kept across rounds), the round's fold and phase data
        self._v: torch.Tensor | None = None  # (K, K) float32
        self._v_present: torch.Tensor | None = None  # (K,) bool
        self._clear_phase()

    def _clear_phase(self) -> None:
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._r: torch.Tensor | None = None
        self._r_present: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None
        self._steps = 0

    # wire format ---------------------------------------------------------------------------------
    def header(self, round: int, client_id: int) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client_id, "ipc": self.options.ipc}

    def make_payload(self, round: int, client_id: int, images: np.ndarray, classes: np.ndarray,
                     logits: np.ndarray, soft_labels: np.ndarray) -> Payload:
        return Payload(meta=self.header(round, client_id),
                       arrays={"images": images, "classes": classes, "v": logits, "r": soft_labels})

    def packed_size(self, round: int, client_id: int, present: int) -> int:
        """The exact wire size of a payload with ``present`` classes."""
        k = self.env.num_classes
        return self.make_payload(round, client_id, np.empty((present * self.options.ipc, *self.image_shape), np.float32),
                                 np.empty(present, np.int32), np.empty((present, k), np.float32),
                                 np.empty((present, k), np.float32)).packed_size()

    def payload_size_hint(self) -> int:
        """The largest payload: every class present (header with long ids)."""
        return self.packed_size(10**8 - 1, max(0, self.env.num_clients - 1), self.env.num_classes)

    # server to clients ---------------------------------------------------------------------------
    def server_message(self, round: int) -> ServerMessage:
        """The model, and from round 2 the global class logits V of the previous round's uploads."""
        if self._v is None:
            return ServerMessage(model=True)
        common = Payload(meta={"algorithm": self.name, "round": round},
                         arrays={"v": self._v.cpu().numpy(), "present": self._v_present.cpu().numpy().astype(np.uint8)})
        return ServerMessage(model=True, common=common)

    def received_logits(self, message: ReceivedMessage | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(V (K, K), present (K,) bool) on the device from a round's message, or None (round 1)."""
        if message is None or message.common is None:
            return None
        k = self.env.num_classes
        require(message.common, {"v": ("float32", (k, k)), "present": ("uint8", (k,))}, f"round {message.round} message")
        v = torch.from_numpy(np.array(message.common.arrays["v"], copy=True)).to(self.env.device)
        present = torch.from_numpy(message.common.arrays["present"] != 0).to(self.env.device)
        return v, present

    # worker side ---------------------------------------------------------------------------------
    def embedding(self, round: int, seed: int) -> FeatureNet:
        """The round's re-sampled, frozen embedding net (built from W_t = ``env.model``, once per round)."""
        if self._embed is None:
            self._resampler = Resampler(self.env.model)
            self._embed = FeatureNet(self.env.model, self.env.num_classes)
        if self._embed_round != round:
            state = self._resampler.embedding_state(self.env.model.vector, float(self.options.gamma), seed, round)
            self._embed.flat.load_(state)
            self._embed_round = round
        return self._embed

    @torch.no_grad()
    def _real_statistics(self, net: FeatureNet, x: torch.Tensor, y: torch.Tensor,
                         chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features of every real image, class-mean logits (K, K), class-mean soft labels (K, K))."""
        features, logits = [], []
        for start in range(0, len(y), chunk):
            f, z = net(x[start : start + chunk])
            features.append(f.float())
            logits.append(z.float())
        features_all, logits_all = torch.cat(features), torch.cat(logits)
        k = self.env.num_classes
        v, _ = class_means(logits_all, y, k)
        r, _ = class_means(F.softmax(logits_all / self.options.temperature, dim=1), y, k)
        return features_all, v, r

    def _initial_images(self, x: torch.Tensor, members: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """ipc random real images per present class (with repeats when a class has fewer)."""
        ipc, picks = self.options.ipc, []
        for rows in members:
            n = len(rows)
            order = torch.randperm(n, generator=generator)[:ipc]
            if n < ipc:
                order = torch.cat([order, torch.randint(0, n, (ipc - n,), generator=generator)])
            picks.append(rows[order.to(rows.device)])
        return x[torch.cat(picks)].detach().clone().float().contiguous()

    def condense(self, net: FeatureNet, x: torch.Tensor, y: torch.Tensor, classes: list[int],
                 received: tuple[torch.Tensor, torch.Tensor] | None,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """(S (c ipc, C, H, W), v (c, K), R (c, K), stats): steps 2-3 of the module docstring."""
        o = self.options
        device = x.device
        features, v_all, r_all = self._real_statistics(net, x, y)
        members = [torch.nonzero(y == c).squeeze(1) for c in classes]
        full_means = [features[rows].mean(0) for rows in members]
        images = self._initial_images(x, members, generator).requires_grad_(True)
        optimizer = torch.optim.SGD([images], lr=o.lr_img, momentum=IMAGE_MOMENTUM)
        cdc_classes = [j for j, c in enumerate(classes) if received is not None and bool(received[1][c])]
        v_global = received[0] if received is not None else None
        k = self.env.num_classes
        stats = {"dm_loss_first": float("nan"), "dm_loss_last": float("nan"), "cdc_loss_last": 0.0,
                 "train_loss": float("nan")}
        for it in range(o.iterations):
            targets = []
            for rows, mean in zip(members, full_means):
                if len(rows) <= o.real_batch_size:
                    targets.append(mean)
                else:
                    pick = torch.randperm(len(rows), generator=generator)[: o.real_batch_size].to(device)
                    targets.append(features[rows[pick]].mean(0))
            directions = random_directions(k, o.swd_directions, generator, device) if cdc_classes else None
            syn_features, syn_logits = net(images)
            syn_means = syn_features.float().reshape(len(classes), o.ipc, -1).mean(1)
            dm = ((torch.stack(targets) - syn_means) ** 2).sum()
            cdc = torch.zeros((), device=device)
            for j in cdc_classes:
                block = syn_logits[j * o.ipc : (j + 1) * o.ipc].float()
                cdc = cdc + sliced_wasserstein(block, v_global[classes[j]].unsqueeze(0), directions)
            loss = dm + o.lambda_loc * cdc
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if it == 0:
                stats["dm_loss_first"] = float(dm.detach())
            if it == o.iterations - 1:
                stats.update(dm_loss_last=float(dm.detach()), cdc_loss_last=float(cdc.detach()), train_loss=float(loss.detach()))
        index = torch.tensor(classes, device=device)
        return images.detach(), v_all[index], r_all[index], stats

    def client_update(self, ctx: ClientContext) -> ClientResult:
        net = self.embedding(ctx.round, ctx.seed)
        received = self.received_logits(ctx.message)
        x, y = ctx.data.full_batch()
        classes = [int(c) for c in torch.unique(y).cpu().tolist()]
        images, v, r, stats = self.condense(net, x.float(), y, classes, received, ctx.generator)
        payload = self.make_payload(ctx.round, ctx.client_id, images.cpu().numpy(), np.asarray(classes, np.int32),
                                    v.cpu().numpy(), r.cpu().numpy())
        return ClientResult(payload, {**stats, "classes_present": float(len(classes))})

    # server side ---------------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        k, device = self.env.num_classes, self.env.device
        self._round = round
        self._clear_phase()
        self._parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._v_sum = torch.zeros(k, k, dtype=torch.float64, device=device)
        self._r_sum = torch.zeros(k, k, dtype=torch.float64, device=device)
        self._class_clients = torch.zeros(k, dtype=torch.float64, device=device)

    def decode(self, client_id: int, payload: Payload) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Check one payload against this round and config; return (images, classes, v, r) views."""
        context = f"client {client_id}, round {self._round}"
        require_meta(payload.meta, self.header(self._round, client_id), context)
        classes = payload.arrays.get("classes")
        if classes is None or classes.ndim != 1:
            raise ValueError(f"{context}: payload needs a 1-D 'classes' array")
        c, k = classes.shape[0], self.env.num_classes
        if not 1 <= c <= k:
            raise ValueError(f"{context}: {c} classes, expected 1 to {k}")
        require(payload, {"images": ("float32", (c * self.options.ipc, *self.image_shape)), "classes": ("int32", (c,)),
                          "v": ("float32", (c, k)), "r": ("float32", (c, k))}, context)
        if int(classes.min()) < 0 or int(classes.max()) >= k or not (np.diff(classes) > 0).all():
            raise ValueError(f"{context}: classes must be sorted, distinct and in [0, {k})")
        for name in ("images", "v", "r"):
            array = payload.arrays[name]
            if not np.isfinite(array).all():
                raise ValueError(f"{context}: {name} holds NaN or Inf")
            if array.size and float(np.abs(array).max()) > MAX_ABS_VALUE:
                raise ValueError(f"{context}: {name} holds values beyond {MAX_ABS_VALUE:g}")
        r = payload.arrays["r"]
        if (r < 0).any() or (r > 1).any() or not np.allclose(r.sum(1, dtype=np.float64), 1.0, atol=1e-3):
            raise ValueError(f"{context}: soft labels r are not probability rows")
        return payload.arrays["images"], classes, payload.arrays["v"], r

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        images, classes, v, r = self.decode(client_id, payload)
        device = self.env.device
        # copies: the payload's arrays are views of a buffer the runner reuses
        images_t = torch.from_numpy(np.array(images, copy=True)).to(device)
        classes_t = torch.from_numpy(classes.astype(np.int64)).to(device)
        self._parts.append((images_t, classes_t.repeat_interleave(self.options.ipc)))
        self._v_sum[classes_t] += torch.from_numpy(v.astype(np.float64)).to(device)
        self._r_sum[classes_t] += torch.from_numpy(r.astype(np.float64)).to(device)
        self._class_clients[classes_t] += 1
        return {"synthetic_images": float(len(images))}

    def server_finish(self) -> torch.Tensor:
        """Aggregation-free: W_t unchanged. Keeps this round's synthetic data and R for the phase and
        V for the next round's message."""
        present = self._class_clients > 0
        if bool(present.any()):
            counts = self._class_clients.clamp_min(1).unsqueeze(1)
            self._v = (self._v_sum / counts).float()
            self._v_present = present
            self._r = (self._r_sum / counts).float()
            self._r_present = present
        if self._parts:
            self._images = torch.cat([p[0] for p in self._parts])
            self._labels = torch.cat([p[1] for p in self._parts])
        self._parts = []
        return self.env.model.vector.clone()

    def server_phase_epochs(self, round: int) -> int:
        return self.options.server_epochs

    def server_phase_epoch(self, round: int, epoch: int) -> dict[str, float]:
        """One epoch of CE + lambda_glob * LGKM on this round's synthetic data (SGD with momentum,
        written out on the flat vector so its state is one array: the same steps as torch's SGD)."""
        if self._images is None or len(self._images) == 0:
            return {"steps": 0.0, "stop_early": 1.0}
        o, model = self.options, self.env.model
        net, device, n = model.model, self.env.device, model.param_numel
        if self._velocity is None:
            self._velocity = torch.zeros(n, dtype=torch.float32, device=device)
        net.train()
        order = torch.randperm(len(self._labels), generator=self.server_generator(round, f"phase-{epoch}"))
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        steps = 0
        for start in range(0, len(order), o.server_batch_size):
            index = order[start : start + o.server_batch_size].to(device)
            x, y = self._images[index], self._labels[index]
            with autocast(device, self.env.autocast_dtype):
                logits = net(model.to_input_format(x))
            ce = F.cross_entropy(logits.float(), y)
            lgkm = lgkm_loss(logits, y, self._r, self._r_present, o.temperature)
            loss = ce + o.lambda_glob * lgkm
            grads = torch.autograd.grad(loss, model.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, model.params)]
            with torch.no_grad():
                self._velocity.mul_(o.server_momentum).add_(torch.cat(model.flatten(grads)))
                model.vector[:n].add_(self._velocity, alpha=-o.server_lr)
            totals += torch.stack([loss.detach(), ce.detach(), lgkm.detach()]).double()
            steps += 1
        self._steps += steps
        loss, ce, lgkm = (totals / steps).tolist()
        return {"loss": loss, "ce": ce, "lgkm": lgkm, "steps": float(steps)}

    def server_phase_end(self, round: int) -> None:
        self._clear_phase()

    # checkpointing -------------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        """V (always, once there is one); inside a phase also the round's synthetic data, R and the
        server optimizer's velocity, so a resume between two epochs continues bit for bit."""
        state: dict[str, np.ndarray] = {}
        if self._v is not None:
            state[_STATE + "v"] = self._v.cpu().numpy()
            state[_STATE + "v_present"] = self._v_present.cpu().numpy().astype(np.uint8)
        if self._images is not None:
            state[_STATE + "images"] = self._images.cpu().numpy()
            state[_STATE + "labels"] = self._labels.cpu().numpy()
            state[_STATE + "r"] = self._r.cpu().numpy()
            state[_STATE + "r_present"] = self._r_present.cpu().numpy().astype(np.uint8)
            state[_STATE + "steps"] = np.array([self._steps], dtype=np.int64)
            if self._velocity is not None:
                state[_STATE + "velocity"] = self._velocity.cpu().numpy()
        return state

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        known = {"v", "v_present", "images", "labels", "r", "r_present", "steps", "velocity"}
        ours = {key[len(_STATE):]: value for key, value in state.items() if key.startswith(_STATE)}
        unknown = sorted(set(state) - {_STATE + key for key in ours} | {_STATE + key for key in set(ours) - known})
        if unknown:
            raise ValueError(f"{self.name}: unexpected server state {unknown}")
        device, k = self.env.device, self.env.num_classes

        def tensor(key: str, dtype: str, shape: tuple[int, ...] | None) -> torch.Tensor:
            value = ours[key]
            if value.dtype.name != dtype or (shape is not None and value.shape != shape):
                raise ValueError(f"{self.name}: server state {key} is {value.dtype.name}{list(value.shape)}, "
                                 f"expected {dtype}{list(shape) if shape is not None else ''}")
            return torch.from_numpy(np.array(value, copy=True)).to(device)

        self._clear_phase()
        self._v = self._v_present = None
        if "v" in ours:
            self._v = tensor("v", "float32", (k, k))
            self._v_present = tensor("v_present", "uint8", (k,)) != 0
        if "images" in ours:
            self._images = tensor("images", "float32", None)
            self._labels = tensor("labels", "int64", (len(self._images),))
            self._r = tensor("r", "float32", (k, k))
            self._r_present = tensor("r_present", "uint8", (k,)) != 0
            self._steps = int(ours["steps"][0])
            if "velocity" in ours:
                self._velocity = tensor("velocity", "float32", (self.env.model.param_numel,))
