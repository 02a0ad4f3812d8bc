"""OSCAR: one-shot federated learning with a classifier-free diffusion model (Zaland, Jin, Pokorny,
Bhuyan; ICME 2025, arXiv 2502.08488; code obaidullahzaland/oscar). Run it with ``rounds: 1``.

Client (once): caption every image with a frozen image-to-text model (transformers BLIP here; the
code uses BLIP-2 FlanT5-XL through LAVIS, nucleus sampling, one caption), encode each caption with
a frozen text encoder and average the encodings per class present in the client's data. Upload the
per-class means with their class ids. Nothing is trained on the client; no model goes down.

Which encoding: the paper says "CLIP text features", 512 values per class (the pooled, projected
CLIP vector). A pooled vector cannot condition Stable Diffusion's cross-attention, and the public
code conditions on the mean of stored SD text-encoder *hidden states* (77 x 768, fp16). We implement
the code's form, which is what the diffusion model consumes: ``mean over the class's captions of
text_encoder(tokens padded to 77).last_hidden_state``, (seq_len, hidden) per class, sent as float32
(``encoding_dtype: float16`` is the code's storage). The paper's 512-d variant is not implemented.

Server: the fold keeps every (client, class) encoding. At the first epoch of the server phase it
generates ``images_per_class`` images per (client, class) with the text-conditioned latent
diffusion model: DDIM (eta 0) over ``steps`` steps, classifier-free guidance
eps_u + s (eps_c - eps_u), s = ``guidance`` (7.5, the code's form; the paper's Eq. 5 writes the same
with s - 1), eps_u conditioned on the text encoder's encoding of the empty caption; the initial
noise of (client c, class k) is drawn from ``server_generator(round, "oscar-noise-c-k")``. The images
are made the run's input (RGB -> luma for 1-channel data, bilinear resize to the run's resolution,
8-bit pixels as the code's saved PNGs, then the dataset's normalisation) and the classifier
(``env.model``, from its initial weights) is trained on them: SGD with momentum, cross-entropy, one
pass per phase epoch in an order drawn from ``server_generator(round, "phase-<epoch>")``, the
learning rate multiplied by ``lr_gamma`` every ``lr_step`` epochs (the code's StepLR(7, 0.1);
its call ``scheduler.step(epoch_loss)`` is a bug we do not copy). The code's defaults: lr 5e-4,
momentum 0.9, 20 epochs, batch 256, for an ImageNet-pretrained backbone.

Checkpoints: between two phase epochs ``server_state`` holds the generated images (uint8), their
labels and the momentum buffers, so a resumed run reaches the same model bit for bit; before the
first epoch it holds the received encodings. ``server_phase_end`` drops all of it.

Bytes (uplink, per client): the packed payload, i.e. a small header + align8(4 K) for the K int32
class ids + K * seq_len * hidden * itemsize for the encodings, K = classes present at the client.
Tiny models (77 x 32, float32): 9,856 bytes per class. SD v1-4's encoder (77 x 768): 236,544 bytes
per class in float32, 118,272 in float16 (the code's), against the paper's 2,048 (512 floats).
Downlink: none during the round (the final model once, outside the protocol).

``tiny: true`` (tests, CPU demo) replaces the three foundation models by tiny random ones
(``osfed_hpc.generative``). Then captions are random words, the "generated images" are noise and
the classifier's accuracy is meaningless (about chance): the pipeline and its bookkeeping are what
such a run checks, not the method's accuracy.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import generative
from ..payload import Payload, require, require_meta
from ..snapshot_pictures import picture_path, wants_picture
from .base import Algorithm, ClientContext, ClientResult, ServerMessage
from .local_training import autocast
from .options import require_bool, require_choice, require_fraction, require_int, require_positive

PREFIX = "oscar."
ENCODING_DTYPES = ("float32", "float16")
#: ITU-R 601 luma, what PIL's convert("L") uses: RGB generations -> 1-channel data
LUMA = (0.299, 0.587, 0.114)


# pixels ----------------------------------------------------------------------------------------------
def _stats(mean_std: tuple[tuple[float, ...], tuple[float, ...]], channels: int, device: torch.device) -> tuple:
    mean = torch.tensor(mean_std[0], dtype=torch.float32, device=device)
    std = torch.tensor(mean_std[1], dtype=torch.float32, device=device)
    return mean.expand(channels).view(1, -1, 1, 1), std.expand(channels).view(1, -1, 1, 1)


def unit_rgb(x: torch.Tensor, mean_std: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    """Normalised model inputs (N, C, H, W) -> RGB pixels in [0, 1] (gray repeated to 3 channels):
    what a captioner looks at."""
    mean, std = _stats(mean_std, x.shape[1], x.device)
    pixels = (x.float() * std + mean).clamp_(0.0, 1.0)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if pixels.shape[1] != 3:
        raise ValueError(f"OSCAR captions RGB or gray images; these have {pixels.shape[1]} channels")
    return pixels


def to_run_pixels(images: torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Generated RGB images in [0, 1] (N, 3, h, w) -> uint8 (N, C, H, W) of the run's input shape:
    luma for C = 1, bilinear (antialiased) resize to H x W, rounded to 8 bits."""
    channels, height, width = input_shape
    x = images.float()
    if channels == 1:
        x = (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels != 3:
        raise ValueError(f"OSCAR makes RGB or gray images; the run's input has {channels} channels")
    if x.shape[-2:] != (height, width) and x.shape[0]:
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    # NaN (a diverged generation) becomes black: casting NaN to uint8 is undefined
    return (torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)


def normalise(pixels: torch.Tensor, mean_std: tuple[tuple[float, ...], tuple[float, ...]],
              device: torch.device) -> torch.Tensor:
    """uint8 pixels -> model input (pixel / 255 - mean) / std, as the data loader makes it."""
    x = pixels.to(device).float().div_(255.0)
    mean, std = _stats(mean_std, x.shape[1], device)
    return (x - mean) / std


def class_means(encodings: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes present, sorted int32; mean encoding per class, float64 (K, seq, d)) from chunks of
    encodings and their labels. Summed in float64 on the CPU in the given order: the same numbers
    on every device and rank."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for chunk, y in zip(encodings, labels):
        chunk = chunk.detach().to("cpu", torch.float64)
        y = y.detach().cpu()
        for c in torch.unique(y).tolist():
            if not 0 <= c < num_classes:
                raise ValueError(f"label {c} outside [0, {num_classes})")
            part = chunk[y == c].sum(0)
            sums[c] = sums[c] + part if c in sums else part
            counts[c] = counts.get(c, 0) + int((y == c).sum())
    classes = np.array(sorted(sums), dtype=np.int32)
    if not len(classes):
        shape = encodings[0].shape[1:] if encodings else (0, 0)
        return classes, np.zeros((0, *shape), dtype=np.float64)
    return classes, np.stack([(sums[c] / counts[c]).numpy() for c in classes.tolist()])


def write_generated_picture(path: Path, round: int, images: torch.Tensor, rows: list[tuple[int, int]],
                            per_row: int, max_rows: int = 24, max_columns: int = 10) -> Path:
    """PNG of the synthetic set: one row per (client, class), its first ``max_columns`` images,
    small images upscaled (nearest). Derived from what clients sent, so it stays in the run
    directory like the snapshot pictures (``osfed-hpc report`` copies it only when asked)."""
    from PIL import Image, ImageDraw, ImageFont

    from ..atomic import atomic_path

    shown, columns = rows[:max_rows], min(per_row, max_columns)
    _, height, width = images.shape[1:]
    scale = max(1, -(-56 // max(height, width)))
    cell_h, cell_w, text_w, gap = height * scale, width * scale, 120, 4
    picture = Image.new("RGB", (text_w + columns * (cell_w + gap), 20 + len(shown) * (cell_h + gap)), (255, 255, 255))
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    title = f"round {round}: generated images, {len(shown)} of {len(rows)} (client, class) rows"
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    for r, (client, label) in enumerate(shown):
        y = 20 + r * (cell_h + gap)
        draw.text((4, y + cell_h // 2 - 6), f"client {client}, class {label}", fill=(0, 0, 0), font=font)
        for j in range(columns):
            pixels = images[r * per_row + j].permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")
            picture.paste(tile.convert("RGB").resize((cell_w, cell_h), Image.NEAREST), (text_w + j * (cell_w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        picture.save(temp, format="PNG")
    return path


class OSCAR(Algorithm):
    name = "oscar"
    one_shot = True
    client_stat_names = ("images", "classes_present", "caption_words")

    @dataclass
    class Options:
        #: tiny random captioner / text encoder / diffusion model (tests, CPU demo; accuracy meaningless)
        tiny: bool = False
        #: local directory of a transformers BLIP captioner (never a hub id: local_files_only)
        captioner_path: str | None = None
        #: local directory of a CLIP text encoder + tokenizer (a Stable Diffusion directory works too)
        text_encoder_path: str | None = None
        #: local diffusers Stable Diffusion directory (unet/, vae/, scheduler/)
        diffusion_path: str | None = None
        #: dtype the foundation models run in (float16 halves GPU memory; the classifier stays float32)
        model_dtype: str = "float32"
        #: nucleus sampling of captions (the code's LAVIS setting); false: greedy decoding
        caption_sampling: bool = True
        caption_top_p: float = 0.9
        caption_max_tokens: int = 30
        caption_batch_size: int = 64
        #: dtype of the uploaded per-class encodings: float32, or float16 as the code stores them
        encoding_dtype: str = "float32"
        #: images generated per (client, class): 10 in the paper (plateau at ~30)
        images_per_class: int = 10
        #: classifier-free guidance scale s in eps_u + s (eps_c - eps_u) (7.5 in the code)
        guidance: float = 7.5
        #: DDIM denoising steps T (50 in the paper)
        steps: int = 50
        #: latent side length of the generations; 0: the UNet's sample_size (64 -> 512 px for SD v1-4)
        latent_size: int = 0
        generate_batch_size: int = 16
        #: server phase: classifier epochs on the generated set (the code: 20)
        server_epochs: int = 20
        server_lr: float = 5e-4
        server_momentum: float = 0.9
        server_batch_size: int = 256
        #: the learning rate is multiplied by lr_gamma every lr_step epochs (the code's StepLR(7, 0.1))
        lr_step: int = 7
        lr_gamma: float = 0.1

        def validate(self) -> None:
            require_choice("model_dtype", self.model_dtype, tuple(generative.DTYPES))
            require_bool("caption_sampling", self.caption_sampling)
            require_fraction("caption_top_p", self.caption_top_p)
            require_int("caption_max_tokens", self.caption_max_tokens, 1)
            require_int("caption_batch_size", self.caption_batch_size, 1)
            require_choice("encoding_dtype", self.encoding_dtype, ENCODING_DTYPES)
            require_int("images_per_class", self.images_per_class, 1)
            if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) \
                    or not (math.isfinite(self.guidance) and self.guidance >= 0):
                raise ValueError(f"algorithm.guidance must be a number >= 0, got {self.guidance!r}")
            require_int("steps", self.steps, 1)
            require_int("latent_size", self.latent_size, 0)
            require_int("generate_batch_size", self.generate_batch_size, 1)
            require_int("server_epochs", self.server_epochs, 1)
            require_positive("server_lr", self.server_lr)
            require_fraction("server_momentum", self.server_momentum, open_low=False, closed_high=False)
            require_int("server_batch_size", self.server_batch_size, 1)
            require_int("lr_step", self.lr_step, 1)
            require_fraction("lr_gamma", self.lr_gamma)
            require_bool("tiny", self.tiny)
            for key in ("captioner_path", "text_encoder_path", "diffusion_path"):  # last: the values come first
                value = getattr(self, key)
                if value is not None and not (isinstance(value, str) and value):
                    raise ValueError(f"algorithm.{key} must be a directory path, got {value!r}")
                if not self.tiny and value is None:
                    raise ValueError(generative.missing_path_message(key))

    def __init__(self, options: OSCAR.Options, env) -> None:
        super().__init__(options, env)
        if env.input_shape[0] not in (1, 3):
            raise ValueError(f"algorithm.name=oscar: the run's input has {env.input_shape[0]} channels; "
                             f"OSCAR captions and generates gray or RGB images")
        self._model_dtype = generative.DTYPES[options.model_dtype]
        self._shape: tuple[int, int] | None = None
        self._clear_phase()

    # the foundation models (built on first use, once per process) ------------------------------------
    def _get(self, kind: str, extra: Any = None) -> Any:
        path = getattr(self.options, f"{kind}_path")
        return generative.cached(kind, path, self.options.tiny, self.env.device, self._model_dtype, extra)

    def encoding_shape(self) -> tuple[int, int]:
        """(seq_len, hidden) of one class's encoding, from the text encoder's config."""
        if self._shape is None:
            self._shape = generative.text_encoder_shape(self.options.text_encoder_path, self.options.tiny)
        return self._shape

    @property
    def itemsize(self) -> int:
        return np.dtype(self.options.encoding_dtype).itemsize

    def header(self, round: int, client_id: int) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client_id}

    def payload_size_hint(self) -> int:
        seq, hidden = self.encoding_shape()
        classes = self.env.num_classes
        return classes * seq * hidden * self.itemsize + 4 * classes + 4096

    # server to clients ---------------------------------------------------------------------------
    def server_message(self, round: int) -> ServerMessage:
        """Nothing goes down: clients caption their own data with frozen models."""
        return ServerMessage(model=False)

    # client ----------------------------------------------------------------------------------------
    def client_update(self, ctx: ClientContext) -> ClientResult:
        opts = self.options
        captioner = self._get("captioner")
        encoder = self._get("text_encoder")
        x, y = ctx.data.full_batch()
        generator = ctx.generator if opts.caption_sampling else None
        encodings, labels, words = [], [], 0
        for start in range(0, int(y.shape[0]), opts.caption_batch_size):
            chunk = slice(start, start + opts.caption_batch_size)
            captions = captioner.caption(unit_rgb(x[chunk], self.env.pixel_mean_std), generator,
                                         opts.caption_top_p, opts.caption_max_tokens)
            words += sum(len(c.split()) for c in captions)
            encodings.append(encoder.encode(captions))
            labels.append(y[chunk])
        classes, means = class_means(encodings, labels, self.env.num_classes)
        seq, hidden = self.encoding_shape()
        if len(classes) and means.shape[1:] != (seq, hidden):
            raise RuntimeError(f"text encoder gave {list(means.shape[1:])} per caption, config says {[seq, hidden]}")
        means = means.reshape(len(classes), seq, hidden).astype(opts.encoding_dtype)
        payload = Payload(meta=self.header(ctx.round, ctx.client_id), arrays={"classes": classes, "encodings": means})
        n = int(y.shape[0])
        stats = {"images": float(n), "classes_present": float(len(classes)),
                 "caption_words": words / n if n else float("nan")}
        return ClientResult(payload, stats)

    # server fold -----------------------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        self._round = round
        self._received: list[tuple[int, np.ndarray, np.ndarray]] = []

    def decode(self, client_id: int, payload: Payload) -> tuple[np.ndarray, np.ndarray]:
        """Check one upload; (classes int32 (K,), encodings (K, seq, d)) as views."""
        context = f"client {client_id}, round {self._round}"
        require_meta(payload.meta, self.header(self._round, client_id), context)
        require(payload, {"classes": ("int32", None), "encodings": (self.options.encoding_dtype, None)}, context)
        classes, encodings = payload.arrays["classes"], payload.arrays["encodings"]
        seq, hidden = self.encoding_shape()
        k = classes.shape[0] if classes.ndim == 1 else -1
        if classes.ndim != 1 or encodings.shape != (k, seq, hidden):
            raise ValueError(f"{context}: classes {list(classes.shape)} and encodings {list(encodings.shape)} do not "
                             f"match [K] and [K, {seq}, {hidden}]")
        if k and (int(classes.min()) < 0 or int(classes.max()) >= self.env.num_classes):
            raise ValueError(f"{context}: class ids outside [0, {self.env.num_classes})")
        if not (np.diff(classes) > 0).all():
            raise ValueError(f"{context}: class ids are not sorted ascending without duplicates")
        if not np.isfinite(encodings).all():
            raise ValueError(f"{context}: encodings hold NaN or Inf")
        return classes, encodings

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        classes, encodings = self.decode(client_id, payload)
        # the arrays are views into a reused buffer: keep copies
        self._received.append((client_id, classes.copy(), encodings.copy()))
        return {}

    def server_finish(self) -> torch.Tensor:
        """The model is not averaged (nothing was trained on clients): W_t goes on to the phase."""
        seq, hidden = self.encoding_shape()
        rows = [(c, int(k)) for c, classes, _ in self._received for k in classes]
        self._phase_round = self._round
        self._clients = np.array([c for c, _ in rows], dtype=np.int32)
        self._classes = np.array([k for _, k in rows], dtype=np.int32)
        self._encodings = (np.concatenate([e for _, _, e in self._received]) if rows else
                           np.zeros((0, seq, hidden), dtype=self.options.encoding_dtype))
        self._received = []
        return self.env.model.vector.clone()

    # server phase ------------------------------------------------------------------------------------
    def server_phase_epochs(self, round: int) -> int:
        return self.options.server_epochs

    def unconditional(self) -> torch.Tensor:
        """The encoding of the empty caption (seq, d): the unconditional branch of the guidance."""
        return self._get("text_encoder").encode([""])[0]

    def generate(self, round: int, client: int, label: int, condition: np.ndarray,
                 uncond: torch.Tensor | None = None) -> torch.Tensor:
        """``images_per_class`` images (uint8, the run's input shape, CPU) for one (client, class)."""
        opts = self.options
        encoder = self._get("text_encoder")
        diffusion = self._get("diffusion", encoder.hidden)
        if diffusion.cross_attention_dim != encoder.hidden:
            raise ValueError(f"algorithm.diffusion_path: the UNet cross-attends to {diffusion.cross_attention_dim}-d "
                             f"text, the text encoder gives {encoder.hidden}-d")
        generator = self.server_generator(round, f"oscar-noise-{client}-{label}")
        noise = torch.randn((opts.images_per_class, *diffusion.latent_shape(opts.latent_size)), generator=generator)
        cond = torch.from_numpy(np.asarray(condition, dtype=np.float32))
        uncond = self.unconditional() if uncond is None else uncond
        images = diffusion.generate(cond, uncond, noise, opts.guidance, opts.steps,
                                    opts.generate_batch_size)
        return to_run_pixels(images, self.env.input_shape)

    def _generate_all(self, round: int) -> float:
        """Make the synthetic set from the kept encodings (in client, class order); seconds taken.
        With ``runtime.save_snapshots`` due this round, a picture of it goes to RUN/snapshots/."""
        start = time.perf_counter()
        rows = list(zip(self._clients.tolist(), self._classes.tolist()))
        images, labels = [], []
        uncond = self.unconditional() if len(self._classes) else None
        for client, label, condition in zip(self._clients.tolist(), self._classes.tolist(), self._encodings):
            images.append(self.generate(round, client, label, condition, uncond))
            labels.append(torch.full((self.options.images_per_class,), label, dtype=torch.int64))
        c, h, w = self.env.input_shape
        self._images = torch.cat(images) if images else torch.zeros((0, c, h, w), dtype=torch.uint8)
        self._labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        self._clients = self._classes = self._encodings = None  # the images replace them
        seconds = time.perf_counter() - start
        if self.env.run_dir is not None and rows and wants_picture(self.env.save_snapshots, round):
            write_generated_picture(picture_path(self.env.run_dir, round), round, self._images, rows,
                                    self.options.images_per_class)
        return seconds

    def lr(self, epoch: int) -> float:
        opts = self.options
        return opts.server_lr * opts.lr_gamma ** ((epoch - 1) // opts.lr_step)

    def _new_optimizer(self, momentum: np.ndarray | None = None) -> torch.optim.SGD:
        params = self.env.model.params
        optimizer = torch.optim.SGD(params, lr=self.options.server_lr, momentum=self.options.server_momentum)
        if momentum is not None:
            sizes = [p.numel() for p in params]
            if momentum.shape != (sum(sizes),):
                raise ValueError(f"{self.name}: server state momentum has {momentum.size} values, "
                                 f"the model {sum(sizes)}")
            flat = torch.from_numpy(np.array(momentum, dtype=np.float32))
            for p, piece in zip(params, flat.split(sizes)):
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(piece.view(p.shape))
        return optimizer

    def server_phase_epoch(self, round: int, epoch: int) -> dict[str, float]:
        opts = self.options
        stats: dict[str, float] = {}
        if self._images is None:
            if self._encodings is None:
                raise RuntimeError(f"{self.name}: server phase of round {round} without received encodings")
            stats["generate_seconds"] = self._generate_all(round)
        if self._optimizer is None:
            self._optimizer = self._new_optimizer()
        lr = self.lr(epoch)
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        model, env = self.env.model, self.env
        net = model.model
        net.train()
        count = int(self._labels.shape[0])
        order = torch.randperm(count, generator=self.server_generator(round, f"phase-{epoch}"))
        total = torch.zeros((), device=env.device)
        steps = 0
        for start in range(0, count, opts.server_batch_size):
            index = order[start : start + opts.server_batch_size]
            x = model.to_input_format(normalise(self._images[index], env.pixel_mean_std, env.device))
            y = self._labels[index].to(env.device)
            with autocast(env.device, env.autocast_dtype):
                loss = F.cross_entropy(net(x), y)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
            total += loss.detach().float()
            steps += 1
        self._optimizer.zero_grad(set_to_none=True)
        stats.update({"loss": float(total) / steps if steps else float("nan"), "steps": float(steps),
                      "images": float(count), "lr": lr})
        return stats

    def server_phase_end(self, round: int) -> None:
        self._clear_phase()

    def _clear_phase(self) -> None:
        self._phase_round: int | None = None
        self._clients: np.ndarray | None = None
        self._classes: np.ndarray | None = None
        self._encodings: np.ndarray | None = None
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._optimizer: torch.optim.SGD | None = None

    # checkpointing -----------------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        """Empty outside a phase; inside it what the next epoch needs (see the module docstring)."""
        if self._phase_round is None:
            return {}
        state = {PREFIX + "round": np.array([self._phase_round], dtype=np.int64)}
        if self._images is None:
            state.update({PREFIX + "clients": self._clients.copy(), PREFIX + "classes": self._classes.copy(),
                          PREFIX + "encodings": self._encodings.copy()})
            return state
        state.update({PREFIX + "images": self._images.numpy().copy(), PREFIX + "labels": self._labels.numpy().copy()})
        if self._optimizer is not None:
            buffers = [self._optimizer.state.get(p, {}).get("momentum_buffer") for p in self.env.model.params]
            if all(b is not None for b in buffers):
                state[PREFIX + "momentum"] = torch.cat([b.reshape(-1) for b in buffers]).cpu().numpy()
        return state

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        self._clear_phase()
        mine = self.prefixed_state(state, PREFIX)
        if not mine:
            return
        if "round" not in mine:
            raise ValueError(f"{self.name}: server state without its round ({sorted(mine)})")
        self._phase_round = int(mine.pop("round")[0])
        if "images" in mine:
            images, labels = mine.pop("images"), mine.pop("labels", None)
            if labels is None or images.dtype != np.uint8 or images.shape[1:] != tuple(self.env.input_shape) \
                    or labels.shape != (images.shape[0],):
                raise ValueError(f"{self.name}: server state images {images.dtype}{list(images.shape)} / labels "
                                 f"do not fit the run's input {list(self.env.input_shape)}")
            self._images = torch.from_numpy(np.array(images))
            self._labels = torch.from_numpy(np.array(labels, dtype=np.int64))
            momentum = mine.pop("momentum", None)
            if momentum is not None:
                self._optimizer = self._new_optimizer(momentum)
        else:
            try:
                self._clients = np.array(mine.pop("clients"), dtype=np.int32)
                self._classes = np.array(mine.pop("classes"), dtype=np.int32)
                self._encodings = np.array(mine.pop("encodings"))
            except KeyError as exc:
                raise ValueError(f"{self.name}: server state lacks {exc}") from None
            if self._encodings.shape != (self._classes.shape[0], *self.encoding_shape()):
                raise ValueError(f"{self.name}: server state encodings {list(self._encodings.shape)} do not match "
                                 f"[{self._classes.shape[0]}, {', '.join(map(str, self.encoding_shape()))}]")
        if mine:
            raise ValueError(f"{self.name}: unexpected server state {sorted(PREFIX + k for k in mine)}")


__all__ = ["OSCAR", "class_means", "normalise", "to_run_pixels", "unit_rgb"]
