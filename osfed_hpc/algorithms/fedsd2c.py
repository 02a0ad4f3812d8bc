"""FedSD2C (Zhang et al., NeurIPS 2024, "One-shot Federated Learning via Synthetic Distiller-Distillate
Communication"): one upload per client of synthetic distillates in an autoencoder's latent space; the
server trains the global model on their decodings. Spec: methods.md section 7.

One-shot: run it with ``rounds: 1``. The round's fold only collects; the training is the server
phase that follows it, whose epochs are the server's training epochs (``server_epochs``).

Client (``client_update``), from W_0:

1. **Local training** of its own model: the run's ``train`` section (``lr``, ``momentum``,
   ``weight_decay``, ``batch_size``, ``local_epochs`` or ``local_steps``, ``grad_clip``, ``lr_decay``)
   with a cosine learning rate over the epochs (per step with ``local_steps``) when
   ``local_lr_schedule: cosine`` (the paper's code), and ``drop_last`` as the paper's loader (unless the
   client holds no more than one batch). The paper: SGD lr 0.01, momentum 0.9, wd 1e-4, batch 128,
   100 epochs (Imagenette): put those in ``train:``.
2. **Core set**: per class with more than ``ipc`` samples (``keep_small_classes: true`` keeps smaller
   classes too, ours), up to ``mipc`` images drawn at random; ``num_crop`` random square crops of each
   (torchvision's RandomResizedCrop with ratio 1 and scale [``crop_scale_min``, 1], resized back to the
   image size), scored by the local model's cross-entropy; each image keeps its lowest-loss crop and the
   ``ipc`` lowest-loss images are the core set (the rest are the "rest" images).
3. **Fourier mixing**: the core-set images in a random order are paired with the class's rest images
   of highest loss among those the local model predicts correctly (all rest images when none is),
   cycling when there are fewer; ``|F(x)| = lam |F(x2)| + (1 - lam) |F(x1)|`` with x1's phase (full
   spectrum), in pixel space, clipped to [0, 1]; ``lam = fourier_lambda``. A class without rest images
   (only with ``keep_small_classes``) is not perturbed.
4. **Distillates**: ``z = encode(perturbed)``; ``iterations`` steps of AdamW(``latent_lr``, betas
   (0.5, 0.9), eps 1e-8, weight decay 0.01 as torch's default that the paper's code keeps) with a cosine
   learning rate on ``MSE(f(decode(z)), f(x1)) + r_c CE(model(decode(z)), y)``, where f is the local
   model's penultimate feature: the input of its last ``nn.Linear`` (ResNet: the avgpool output the paper
   hooks). One class is one batch (the code's ``iter_mode: label``). The last iterate is kept.
5. **Upload** ``latents`` (float32), ``labels`` (int32) and, by ``teacher``:

   - ``none`` (the paper's text: distillates only): nothing else; the server trains on hard labels (CE).
   - ``client_logits`` (ours, between the two): the local model's logits on each decoded distillate
     and, when ``flip``, on its horizontal flip: ``teacher_logits`` float32 ``[k, 1 + flip, K]``. The
     server distils from the logits of the view it trains on.
   - ``client_model`` (the paper's public code): the local model itself (``model``, the whole float32
     trainable vector). The server keeps every uploaded model on rank 0 (``clients x 4 x numel``
     bytes, plus one working copy) and, per sample, uses the model of the client that made it.

Server: the fold copies every client's latents/labels/teacher data out of the payload buffers;
``server_finish`` returns W_0 unchanged (nothing is averaged). Each phase epoch is one pass over the
pooled decoded distillates (decoded once, kept on the device) in a random order, batch
``server_batch_size``, SGD(``server_lr``, momentum ``server_momentum``, wd ``server_weight_decay``)
with a cosine (per epoch) or constant learning rate, random horizontal flips (``flip``), loss CE
(``none``) or ``KL(softmax(t/T) || softmax(s/T)) T^2`` (the teachers; T = ``temperature``). The
paper: 100 epochs, batch 128, lr 0.02 (Imagenette), momentum 0.9, wd 1e-4, T 1. Randomness comes
from ``server_generator(round, "phase-<epoch>")``; the momentum buffers and the pooled uploads are in
``server_state`` between epochs, so a resumed phase reaches the same model bit for bit (the decoded
images are recomputed from the latents on resume: deterministic on one device kind; a VAE decoder on a
GPU additionally needs deterministic cuDNN kernels).

Wire bytes per client, with k distillates (at most ``classes x ipc``), latent size L values, K classes,
N the trainable numel and H the JSON header: ``align8(12 + H) + align8(4 k L) + 4 k`` (``none``),
``align8(12 + H) + align8(4 k L) + align8(4 k) + 4 k V K`` (``client_logits``, V = 1 + flip), or
``align8(12 + H) + align8(4 k L) + align8(4 k) + 4 N`` (``client_model``). Nothing but W_0 goes down.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..autoencoders import AUTOENCODERS, Autoencoder, build_autoencoder
from ..flat import FlatModel
from ..payload import Payload, require, require_meta
from .base import Algorithm, ClientContext, ClientResult
from .distillation import kl_distillation_loss
from .local_training import autocast, client_lr, count_participation
from .options import require_bool, require_choice, require_fraction, require_int, require_positive

TEACHERS = ("none", "client_logits", "client_model")
SCHEDULES = ("cosine", "constant")
#: AdamW's default weight decay, which the paper's code keeps for the latent optimiser
LATENT_WEIGHT_DECAY = 0.01
#: images scored per forward pass in the core-set stage (times num_crop crops)
_SCORE_IMAGES = 64
#: images per forward when decoding or computing logits without gradients
_EVAL_BATCH = 256
#: server_state keys
_PREFIX = "fedsd2c."
#: the fold refuses uploaded floats beyond this magnitude: garbage (3e38) that would only blow up the
#: server's training later (real latents, logits and weights are orders of magnitude smaller)
MAX_ABS_VALUE = 1e6


# -- building blocks (module level: tested one by one) ---------------------------------------------
def cosine_lr(base: float, step: int, total: int) -> float:
    """The paper's ``lr_cosine_policy(base, warmup=0, total)`` at ``step`` (0-based): ``base`` at 0,
    half of it midway, towards 0 at the end."""
    return 0.5 * (1 + math.cos(math.pi * step / total)) * base if total > 0 else base


def fourier_mix(x1: torch.Tensor, x2: torch.Tensor, lam: float) -> torch.Tensor:
    """Images with x1's Fourier phase and the amplitude ``lam |F(x2)| + (1 - lam) |F(x1)|`` (over the
    last two dimensions, the full spectrum), not clipped. ``lam = 0`` gives x1 back (up to rounding)."""
    f1 = torch.fft.fft2(x1.double())
    f2 = torch.fft.fft2(x2.double())
    amplitude = lam * f2.abs() + (1 - lam) * f1.abs()
    mixed = torch.polar(amplitude, torch.angle(f1))
    return torch.fft.ifft2(mixed).real.to(x1.dtype)


def crop_boxes(count: int, num_crop: int, height: int, width: int, scale_min: float,
               generator: torch.Generator) -> torch.Tensor:
    """``[count, num_crop, 3]`` int64 (top, left, side) of square random crops as torchvision's
    RandomResizedCrop with ratio (1, 1): area = U(scale_min, 1) x H x W, side = round(sqrt(area))
    (at most min(H, W)), position uniform. Drawn on the CPU from ``generator``."""
    n = count * num_crop
    scale = scale_min + (1 - scale_min) * torch.rand(n, generator=generator, dtype=torch.float64)
    side = torch.round(torch.sqrt(scale * height * width)).clamp(1, min(height, width)).to(torch.int64)
    top = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (height - side + 1)).to(torch.int64)
    left = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (width - side + 1)).to(torch.int64)
    return torch.stack([top, left, side], dim=1).reshape(count, num_crop, 3)


def crop_images(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop ``images[i]`` to ``boxes[i]`` (top, left, side) and resize back to the image size
    (bilinear; a crop is never larger than the image, so upsampling needs no antialiasing), in one
    batched ``grid_sample``. At a crop's edge the bilinear taps read the neighbouring image pixels
    (a resize of the cut-out crop would repeat its edge instead): a sub-pixel difference."""
    b, _, h, w = images.shape
    boxes = boxes.to(torch.float64)
    top, left, side = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = side / w
    theta[:, 0, 2] = (2 * left + side) / w - 1
    theta[:, 1, 1] = side / h
    theta[:, 1, 2] = (2 * top + side) / h - 1
    grid = F.affine_grid(theta.to(images.dtype), [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="border", align_corners=False)


def select_coreset(crop_losses: torch.Tensor, ipc: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``[n, num_crop]`` losses: (each image's lowest-loss crop ``[n]``, the ``min(ipc, n)`` images
    of lowest loss ascending by loss, the other images in index order). Ties go to the lower index."""
    best_loss, best_crop = crop_losses.min(dim=1)  # the first minimum on ties
    order = torch.sort(best_loss, stable=True).indices
    k = min(ipc, crop_losses.shape[0])
    chosen = order[:k]
    rest = torch.sort(order[k:]).values
    return best_crop, chosen, rest


def rest_partners(count: int, rest_losses: torch.Tensor, rest_correct: torch.Tensor) -> torch.Tensor:
    """Indices into the rest images of the partner x2 of each of ``count`` core-set images: the rest
    images the model predicts correctly (all of them when none is), highest loss first, cycled.
    Empty when there are no rest images."""
    if rest_losses.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    pool = torch.nonzero(rest_correct).squeeze(1)
    if pool.numel() == 0:
        pool = torch.arange(rest_losses.numel())
    pool = pool[torch.sort(rest_losses[pool], descending=True, stable=True).indices]
    return pool[torch.arange(count) % pool.numel()]


def last_linear(net: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (its classifier): its input is the penultimate feature."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("algorithm.name=fedsd2c needs a model whose classifier is an nn.Linear (its input is the "
                         "feature the distillates match)")
    return linears[-1]


@contextlib.contextmanager
def penultimate(net: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, every forward of ``net`` appends the (flattened) input of its last Linear."""
    captured: list[torch.Tensor] = []
    handle = last_linear(net).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].flatten(1)))
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


class FedSD2C(Algorithm):
    name = "fedsd2c"
    one_shot = True
    client_stat_names = ("train_loss", "local_steps", "distillates", "synthesis_loss")

    @dataclass
    class Options:
        #: distillates per class (the paper: 50)
        ipc: int = 50
        #: images per class scored in the core-set stage, drawn at random (the paper: 500)
        mipc: int = 500
        #: random crops scored per image (the paper: 10)
        num_crop: int = 10
        #: the smallest crop area as a fraction of the image (torchvision's RandomResizedCrop default 0.08)
        crop_scale_min: float = 0.08
        #: ours: also distil classes with at most ipc samples (all of them, unperturbed when no rest is left)
        keep_small_classes: bool = False
        #: lam of the Fourier amplitude mixing, in [0, 1] (the paper's argument default 0.8)
        fourier_lambda: float = 0.8
        #: the latent space: "vae" (the paper: SDXL's VAE from vae_path), "tiny_vae" (tests), "pool" (ours)
        autoencoder: str = "vae"
        #: a local directory holding a diffusers AutoencoderKL (for autoencoder: vae)
        vae_path: str | None = None
        #: spatial pooling factor of autoencoder: pool
        pool_factor: int = 4
        #: latent optimisation steps per distillate batch (the paper: 100)
        iterations: int = 100
        #: AdamW learning rate of the latents, cosine decayed (the paper: 0.1)
        latent_lr: float = 0.1
        #: weight of the cross-entropy term in the synthesis loss (the paper: 0 Imagenette, 0.01 Tiny-ImageNet)
        r_c: float = 0.0
        #: what the server learns from besides the distillates: "none" (the paper's text), "client_logits",
        #: "client_model" (the paper's code)
        teacher: str = "none"
        #: client learning rate over its local epochs: "cosine" (the paper) or "constant"
        local_lr_schedule: str = "cosine"
        #: server training epochs over the pooled distillates (the paper: 100)
        server_epochs: int = 100
        #: server SGD learning rate (the paper: 0.02 Imagenette, 0.2 Tiny-ImageNet)
        server_lr: float = 0.02
        server_batch_size: int = 128
        server_momentum: float = 0.9
        server_weight_decay: float = 1e-4
        #: server learning rate over its epochs: "cosine" or "constant"
        server_lr_schedule: str = "cosine"
        #: random horizontal flips in server training (the paper: yes); also decides whether
        #: client_logits sends the flipped view's logits
        flip: bool = True
        #: distillation temperature T (the paper: 1)
        temperature: float = 1.0

        def validate(self) -> None:
            require_int("ipc", self.ipc, 1)
            require_int("mipc", self.mipc, 1)
            if self.mipc < self.ipc:
                raise ValueError(f"algorithm.mipc must be >= algorithm.ipc ({self.ipc}), got {self.mipc}")
            require_int("num_crop", self.num_crop, 1)
            require_fraction("crop_scale_min", self.crop_scale_min)
            require_bool("keep_small_classes", self.keep_small_classes)
            require_fraction("fourier_lambda", self.fourier_lambda, open_low=False)
            require_choice("autoencoder", self.autoencoder, AUTOENCODERS)
            if self.vae_path is not None and not isinstance(self.vae_path, str):
                raise ValueError(f"algorithm.vae_path must be a directory path or null, got {self.vae_path!r}")
            require_int("pool_factor", self.pool_factor, 1)
            require_int("iterations", self.iterations, 0)
            require_positive("latent_lr", self.latent_lr)
            if isinstance(self.r_c, bool) or not isinstance(self.r_c, (int, float)) or not (math.isfinite(self.r_c)
                                                                                          and self.r_c >= 0):
                raise ValueError(f"algorithm.r_c must be a finite number >= 0, got {self.r_c!r}")
            require_choice("teacher", self.teacher, TEACHERS)
            require_choice("local_lr_schedule", self.local_lr_schedule, SCHEDULES)
            require_int("server_epochs", self.server_epochs, 0)
            require_positive("server_lr", self.server_lr)
            require_int("server_batch_size", self.server_batch_size, 1)
            require_fraction("server_momentum", self.server_momentum, open_low=False, closed_high=False)
            if isinstance(self.server_weight_decay, bool) or not isinstance(self.server_weight_decay, (int, float)) \
                    or not (math.isfinite(self.server_weight_decay) and self.server_weight_decay >= 0):
                raise ValueError(f"algorithm.server_weight_decay must be a finite number >= 0, got {self.server_weight_decay!r}")
            require_choice("server_lr_schedule", self.server_lr_schedule, SCHEDULES)
            require_bool("flip", self.flip)
            require_positive("temperature", self.temperature)

    def __init__(self, options: FedSD2C.Options, env) -> None:
        super().__init__(options, env)
        last_linear(env.model.model)  # fail before any work for a model without a Linear classifier
        #: built now, on every rank: a missing VAE directory or diffusers is an error before any training
        self.autoencoder: Autoencoder = build_autoencoder(options.autoencoder, tuple(env.input_shape), env.device,
                                                          pool_factor=options.pool_factor, vae_path=options.vae_path)
        mean, std = env.pixel_mean_std
        channels = env.input_shape[0]
        self._mean = torch.tensor(_per_channel(mean, channels), dtype=torch.float32, device=env.device).view(1, -1, 1, 1)
        self._std = torch.tensor(_per_channel(std, channels), dtype=torch.float32, device=env.device).view(1, -1, 1, 1)
        self.views = 2 if options.flip else 1
        self._clear_server()
        self._teacher_net: FlatModel | None = None

    # sizes -------------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.autoencoder.latent_shape)

    def header(self, round: int, client: int) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client, "teacher": self.options.teacher,
                "autoencoder": self.options.autoencoder}

    def arrays_like(self, count: int) -> dict[str, np.ndarray]:
        """Empty arrays of a payload with ``count`` distillates (the wire layout, for sizes and checks)."""
        arrays = {"latents": np.empty((count, *self.latent_shape), np.float32), "labels": np.empty(count, np.int32)}
        if self.options.teacher == "client_logits":
            arrays["teacher_logits"] = np.empty((count, self.views, self.env.num_classes), np.float32)
        elif self.options.teacher == "client_model":
            arrays["model"] = np.empty(self.env.model.numel, np.float32)
        return arrays

    def packed_size(self, round: int, client: int, count: int) -> int:
        """The exact wire size of a payload with ``count`` distillates."""
        return Payload(meta=self.header(round, client), arrays=self.arrays_like(count)).packed_size()

    def payload_size_hint(self) -> int:
        """Every class at ``ipc`` distillates, the longest header of a run of this size."""
        return self.packed_size(10**8 - 1, max(0, self.env.num_clients - 1), self.env.num_classes * self.options.ipc)

    # pixels <-> model inputs ---------------------------------------------------------------------
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._std + self._mean

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._mean) / self._std

    # client --------------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        model = self.env.model
        net = model.model
        was_training = net.training
        train_loss, steps = self._local_train(ctx)
        with eval_mode(net):
            latents, labels, logits, synthesis_loss = self._distil(ctx)
        net.train(was_training)
        arrays = {"latents": latents, "labels": labels}
        if self.options.teacher == "client_logits":
            arrays["teacher_logits"] = logits
        elif self.options.teacher == "client_model":
            arrays["model"] = model.vector.detach().to("cpu", torch.float32).numpy().copy()
        payload = Payload(meta=self.header(ctx.round, ctx.client_id), arrays=arrays)
        stats = {"train_loss": train_loss, "local_steps": float(steps), "distillates": float(len(labels)),
                 "synthesis_loss": synthesis_loss}
        return ClientResult(payload, stats)

    def _local_train(self, ctx: ClientContext) -> tuple[float, int]:
        """SGD on the client's data from W_t with the run's ``train`` settings and the paper's cosine
        learning rate (per epoch; per step with ``train.local_steps``) and drop_last."""
        train, model = self.env.train, self.env.model
        net = model.model
        net.train()
        base = client_lr(train, ctx.state)
        optimizer = torch.optim.SGD(model.params, lr=base, momentum=train.momentum, weight_decay=train.weight_decay,
                                    foreach=True)
        drop_last = ctx.data.num_samples > train.batch_size
        device = model.vector.device
        total = torch.zeros((), device=device)
        steps = 0

        def step(lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
            nonlocal total, steps
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, self.env.autocast_dtype):
                loss = F.cross_entropy(net(model.to_input_format(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.params, train.grad_clip, foreach=True)
            optimizer.step()
            total += loss.detach().float()
            steps += 1

        cosine = self.options.local_lr_schedule == "cosine"
        if train.local_steps is not None:  # the schedule runs per step
            batches = ctx.data.batches(ctx.generator, train.batch_size, steps=train.local_steps, drop_last=drop_last)
            for i, (x, y) in enumerate(batches):
                step(cosine_lr(base, i, train.local_steps) if cosine else base, x, y)
        else:
            for epoch in range(train.local_epochs):
                lr = cosine_lr(base, epoch, train.local_epochs) if cosine else base
                for x, y in ctx.data.batches(ctx.generator, train.batch_size, epochs=1, drop_last=drop_last):
                    step(lr, x, y)
        optimizer.zero_grad(set_to_none=True)
        count_participation(ctx.state)
        return (float(total) / steps if steps else float("nan")), steps

    @torch.no_grad()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        model = self.env.model
        return torch.cat([model.model(model.to_input_format(x[i : i + _EVAL_BATCH])).float()
                          for i in range(0, len(x), _EVAL_BATCH)]) if len(x) else x.new_zeros(0, self.env.num_classes)

    def _distil(self, ctx: ClientContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Core set, Fourier mixing and latent synthesis, class by class (ascending class id)."""
        options = self.options
        x_all, y_all = ctx.data.full_batch()
        latents, labels, logits, losses = [], [], [], []
        for c in range(self.env.num_classes):
            members = torch.nonzero(y_all == c).squeeze(1)
            n = members.numel()
            if n == 0 or (n <= options.ipc and not options.keep_small_classes):
                continue
            pick = torch.randperm(n, generator=ctx.generator)[: options.mipc]
            x1, x2 = self._core_set(x_all[members[pick.to(members.device)]], c, ctx.generator)
            perturbed = fourier_mix(self.to_pixels(x1), self.to_pixels(x2), options.fourier_lambda).clamp_(0, 1)
            target = torch.full((len(x1),), c, dtype=torch.int64, device=x1.device)
            z, loss = self._synthesize(x1, perturbed, target)
            latents.append(z)
            labels.append(target)
            losses.append(loss * len(x1))
            if options.teacher == "client_logits":
                with torch.no_grad():
                    decoded = self.normalize(self.autoencoder.decode(z))
                    views = [self._logits(decoded)] + ([self._logits(decoded.flip(-1))] if options.flip else [])
                logits.append(torch.stack(views, dim=1))
        count = sum(len(t) for t in labels)
        latent_array = (torch.cat(latents).detach().to("cpu", torch.float32).numpy() if count
                        else np.zeros((0, *self.latent_shape), np.float32))
        label_array = torch.cat(labels).to("cpu", torch.int32).numpy() if count else np.zeros(0, np.int32)
        logit_array = (torch.cat(logits).to("cpu", torch.float32).numpy() if logits
                       else np.zeros((0, self.views, self.env.num_classes), np.float32))
        return latent_array, label_array, logit_array, (sum(losses) / count if count else float("nan"))

    @torch.no_grad()
    def _core_set(self, images: torch.Tensor, label: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x1: the core set's best crops in a random order, x2: each one's Fourier partner)."""
        options = self.options
        n, _, h, w = images.shape
        boxes = crop_boxes(n, options.num_crop, h, w, options.crop_scale_min, generator)
        crop_losses = torch.empty(n, options.num_crop, dtype=torch.float32)
        for start in range(0, n, _SCORE_IMAGES):
            chunk = images[start : start + _SCORE_IMAGES]
            b = len(chunk)
            crops = crop_images(chunk.repeat_interleave(options.num_crop, 0), boxes[start : start + b].reshape(-1, 3))
            target = torch.full((len(crops),), label, dtype=torch.int64, device=crops.device)
            loss = F.cross_entropy(self._logits(crops), target, reduction="none")
            crop_losses[start : start + b] = loss.view(b, options.num_crop).cpu()
        best_crop, chosen, rest = select_coreset(crop_losses, options.ipc)
        best = crop_images(images, boxes[torch.arange(n), best_crop])  # each image's lowest-loss crop
        best_loss = crop_losses[torch.arange(n), best_crop]
        order = chosen[torch.randperm(len(chosen), generator=generator)]
        x1 = best[order.to(best.device)]
        if rest.numel() == 0:
            return x1, x1
        rest_images = best[rest.to(best.device)]
        correct = (self._logits(rest_images).argmax(1).cpu() == label)
        partners = rest_partners(len(order), best_loss[rest], correct)
        return x1, rest_images[partners.to(best.device)]

    def _synthesize(self, original: torch.Tensor, perturbed: torch.Tensor,
                    target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Optimise latents initialised at ``encode(perturbed)`` so that the local model's penultimate
        feature of their decodings matches that of ``original`` (+ r_c CE). Returns (z, last loss)."""
        options = self.options
        model = self.env.model
        net = model.model
        with torch.no_grad():
            z = self.autoencoder.encode(perturbed).detach().clone().float()
            with penultimate(net) as captured:
                net(model.to_input_format(original))
            goal = captured[-1].detach().float()
        z.requires_grad_(True)
        optimizer = torch.optim.AdamW([z], lr=options.latent_lr, betas=(0.5, 0.9), eps=1e-8,
                                      weight_decay=LATENT_WEIGHT_DECAY)
        last = float("nan")
        for it in range(options.iterations):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(options.latent_lr, it, options.iterations)
            with penultimate(net) as captured:
                out = net(model.to_input_format(self.normalize(self.autoencoder.decode(z))))
            loss = F.mse_loss(captured[-1].float(), goal)
            if options.r_c > 0:
                loss = loss + options.r_c * F.cross_entropy(out.float(), target)
            (grad,) = torch.autograd.grad(loss, [z])  # the model's weights get no gradient
            z.grad = grad
            optimizer.step()
            last = loss.detach()
        z = z.detach()
        return z, float(last) if options.iterations else float("nan")

    # server: the fold ----------------------------------------------------------------------------
    def _clear_server(self) -> None:
        self._parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._models: dict[int, np.ndarray] = {}
        self._pooled: dict[str, np.ndarray] | None = None
        self._images: torch.Tensor | None = None
        self._momentum: list[torch.Tensor] | None = None

    def server_begin(self, round: int) -> None:
        self._round = round
        self._clear_server()

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        context = f"client {client_id}, round {self._round}"
        require_meta(payload.meta, self.header(self._round, client_id), context)
        labels = payload.arrays.get("labels")
        if labels is None or labels.ndim != 1:
            raise ValueError(f"{context}: payload needs a 1-D 'labels' array")
        count = len(labels)
        expected = {name: (a.dtype.name, a.shape) for name, a in self.arrays_like(count).items()}
        require(payload, expected, context)
        classes, ipc = self.env.num_classes, self.options.ipc
        if count and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(f"{context}: labels outside [0, {classes})")
        if count and int(np.bincount(labels, minlength=classes).max()) > ipc:
            raise ValueError(f"{context}: more than ipc={ipc} distillates of one class")
        for name in expected:
            array = payload.arrays[name]
            if name != "labels" and array.size and not np.abs(array).max() <= MAX_ABS_VALUE:  # NaN compares False
                raise ValueError(f"{context}: {name} hold NaN, Inf or values beyond {MAX_ABS_VALUE:g}")
        # copies: the payload's arrays are views of a buffer the runner reuses
        logits = np.array(payload.arrays["teacher_logits"]) if "teacher_logits" in payload.arrays else None
        self._parts.append((client_id, np.array(payload.arrays["latents"]), labels.astype(np.int64), logits))
        if "model" in payload.arrays:
            self._models[client_id] = np.array(payload.arrays["model"])
        return {"distillates": float(count)}

    def server_finish(self) -> torch.Tensor:
        self._pool()
        return self.env.model.vector.clone()  # nothing to average: W_0 is the server phase's start

    def _pool(self) -> dict[str, np.ndarray]:
        """The uploads of the round as one set, in client-id order (the fold's order)."""
        if self._pooled is None:
            latent = self.latent_shape
            parts = self._parts
            pooled = {
                "latents": np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, *latent), np.float32),
                "labels": np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64),
                "clients": (np.concatenate([np.full(len(p[2]), p[0], np.int64) for p in parts]) if parts
                            else np.zeros(0, np.int64)),
            }
            if self.options.teacher == "client_logits":
                pooled["teacher_logits"] = (np.concatenate([p[3] for p in parts]) if parts
                                            else np.zeros((0, self.views, self.env.num_classes), np.float32))
            self._pooled = pooled
            self._parts = []
        return self._pooled

    # server: the phase ---------------------------------------------------------------------------
    def server_phase_epochs(self, round: int) -> int:
        return self.options.server_epochs

    def _decoded(self) -> torch.Tensor:
        """The pooled distillates decoded (normalised model inputs), once per phase, on the device."""
        if self._images is None:
            latents = torch.from_numpy(self._pool()["latents"]).to(self.env.device)
            with torch.no_grad():
                chunks = [self.normalize(self.autoencoder.decode(latents[i : i + _EVAL_BATCH]))
                          for i in range(0, len(latents), _EVAL_BATCH)]
            self._images = torch.cat(chunks) if chunks else torch.zeros((0, *self.env.input_shape), device=self.env.device)
        return self._images

    def _teacher(self) -> FlatModel:
        if self._teacher_net is None:
            model = self.env.model
            self._teacher_net = FlatModel(copy.deepcopy(model.model), channels_last=model.channels_last)
        return self._teacher_net

    @torch.no_grad()
    def _model_teacher_logits(self, x: torch.Tensor, clients: torch.Tensor) -> torch.Tensor:
        """Each sample's logits from the uploaded model of the client that made it (eval mode)."""
        teacher = self._teacher()
        out = torch.empty(len(x), self.env.num_classes, device=x.device)
        for client in torch.unique(clients).tolist():
            mask = clients == client
            teacher.load_(torch.from_numpy(self._models[int(client)]).to(teacher.vector.device))
            with eval_mode(teacher.model):
                out[mask.to(x.device)] = teacher.model(teacher.to_input_format(x[mask.to(x.device)])).float()
        return out

    def server_phase_epoch(self, round: int, epoch: int) -> dict[str, float]:
        options = self.options
        pooled = self._pool()
        images = self._decoded()
        count = len(images)
        if count == 0:
            return {"loss": float("nan"), "steps": 0.0, "stop_early": 1.0}
        model = self.env.model
        net = model.model
        generator = self.server_generator(round, f"phase-{epoch}")
        order = torch.randperm(count, generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5 if options.flip else torch.zeros(count, dtype=torch.bool)
        labels = torch.from_numpy(pooled["labels"])
        clients = torch.from_numpy(pooled["clients"])
        logits = torch.from_numpy(pooled["teacher_logits"]) if "teacher_logits" in pooled else None
        lr = (cosine_lr(options.server_lr, epoch - 1, options.server_epochs) if options.server_lr_schedule == "cosine"
              else options.server_lr)
        optimizer = torch.optim.SGD(model.params, lr=lr, momentum=options.server_momentum,
                                    weight_decay=options.server_weight_decay, foreach=False)
        if self._momentum is not None:
            for param, buffer in zip(model.params, self._momentum):
                optimizer.state[param]["momentum_buffer"] = buffer.clone()
        was_training = net.training
        net.train()
        device = images.device
        total = torch.zeros((), device=device)
        steps = 0
        for start in range(0, count, options.server_batch_size):
            index = order[start : start + options.server_batch_size]
            flip = flips[index]
            x = images[index.to(device)]
            x = torch.where(flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
            out = net(model.to_input_format(x)).float()
            if options.teacher == "none":
                loss = F.cross_entropy(out, labels[index].to(device))
            else:
                if logits is not None:
                    teacher = logits[index, flip.long() if options.flip else 0].to(device)
                else:
                    teacher = self._model_teacher_logits(x, clients[index])
                loss = kl_distillation_loss(out, teacher, options.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        self._momentum = [optimizer.state[p]["momentum_buffer"].detach().clone() for p in model.params] \
            if options.server_momentum > 0 else None
        optimizer.zero_grad(set_to_none=True)
        net.train(was_training)
        return {"loss": float(total) / steps, "steps": float(steps), "lr": lr}

    def server_phase_end(self, round: int) -> None:
        self._clear_server()
        self._teacher_net = None

    # checkpointing -------------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        if self._pooled is None and not self._parts:
            return {}
        state = {_PREFIX + key: value.copy() for key, value in self._pool().items()}
        if self._models:
            ids = sorted(self._models)
            state[_PREFIX + "model_clients"] = np.array(ids, np.int64)
            state[_PREFIX + "models"] = np.stack([self._models[i] for i in ids])
        if self._momentum is not None:
            state[_PREFIX + "momentum"] = torch.cat([b.detach().reshape(-1) for b in self._momentum]).cpu().numpy()
        return state

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        self._clear_server()
        self._teacher_net = None
        mine = self.prefixed_state(state, _PREFIX)
        if not mine:
            return
        pooled = {key: np.array(mine.pop(key)) for key in ("latents", "labels", "clients", "teacher_logits") if key in mine}
        if {"latents", "labels", "clients"} - set(pooled):
            raise ValueError(f"{self.name}: server state lacks pooled distillates ({sorted(pooled)})")
        count = len(pooled["labels"])
        if pooled["latents"].shape != (count, *self.latent_shape) or pooled["clients"].shape != (count,):
            raise ValueError(f"{self.name}: server state distillates do not fit latents of shape {self.latent_shape}")
        if (self.options.teacher == "client_logits") != ("teacher_logits" in pooled):
            raise ValueError(f"{self.name}: server state teacher logits do not match teacher={self.options.teacher}")
        self._pooled = pooled
        if "models" in mine:
            ids, models = mine.pop("model_clients"), mine.pop("models")
            if models.shape != (len(ids), self.env.model.numel):
                raise ValueError(f"{self.name}: server state client models have shape {models.shape}")
            self._models = {int(i): np.array(m) for i, m in zip(ids, models)}
        if "momentum" in mine:
            flat = torch.from_numpy(np.array(mine.pop("momentum"))).to(self.env.model.vector.device)
            if flat.numel() != self.env.model.param_numel:
                raise ValueError(f"{self.name}: server state momentum has {flat.numel()} values, "
                                 f"expected {self.env.model.param_numel}")
            self._momentum = [piece.view_as(p).clone() for piece, p in
                              zip(flat.split([p.numel() for p in self.env.model.params]), self.env.model.params)]
        if mine:
            raise ValueError(f"{self.name}: unexpected server state {sorted(_PREFIX + k for k in mine)}")


def _per_channel(values: tuple[float, ...] | list[float], channels: int) -> list[float]:
    """The dataset's per-channel mean/std, broadcast when one value is given for all channels."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ValueError(f"pixel mean/std has {len(values)} values for {channels} channels")
