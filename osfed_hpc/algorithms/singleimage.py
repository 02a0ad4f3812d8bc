"""Federated Learning with a Single Shared Image (Soni, Saeed, Asano; CVPR'24 LIMIT workshop, arXiv
2406.12658; reference code sunnysoni97/single_image_fl; methods.md section 10).

FedDF-style distillation whose only shared data is ONE image: every party cuts the same bank of
augmented patches from it once (``osfed_hpc.patch_bank``), and each round the server picks the
patches worth distilling on.

Round t:

1. Server (``server_message``): the current global model runs over all N patches -> penultimate
   embeddings, predicted class, confidence (max softmax). KMeans (scikit-learn, ``n_init=1``, a
   random_state keyed by (seed, round), one BLAS/OpenMP thread so it is the same on any machine) on
   the embeddings gives each patch the distance to its centroid. **Class-balanced KMeans selection**
   (reference ``prune_clusters``): per predicted class floor(quota / classes present * balance) patches,
   "easy" = closest to their centroid, "hard" = farthest, "mixed" = ``easy_fraction`` easy and the rest
   hard; the remainder up to the quota is filled from all unselected patches by the same heuristic.
   **Confidence pruning** (reference ``prune_confident_crops``, strategy "top"): per predicted class
   drop the floor(threshold * size) most confident patches ("bottom": the least confident). With both
   on, the KMeans quota is inflated to floor(num_select / (1 - threshold)) so that about
   ``num_select`` survive. The selected indices (int32, ascending) go down with the model; the pixels
   never do (every party holds the bank).
2. Clients: local training from W_t (``train.*``: SGD by default; ``client_optimizer: adam`` with
   ``client_lr: 0.01`` is the example script's), then logits (eval mode) on the selected patches,
   **logit clipping** (below), upload update + logits (n_sel x K float32).
3. Server fold: the FedAvg mean of the updates through the server optimizer ("warm start": the
   student starts from the average; ``warm_start: false`` keeps W_t), and the sample-weighted mean of
   the clients' logits (float64 sums in client-id order).
4. Server phase: ``server_steps`` Adam steps (lr ``server_lr``, batch ``server_batch_size`` of the
   selected patches, student in train mode) on KL(softmax(teacher / T) || softmax(clip(student) / T))
   (``distillation.kl_distillation_loss``: batch mean, times T^2, which is 1 at the paper's T = 1),
   split evenly over ``server_epochs`` epochs. Adam is new every round (as in the reference); its
   moments, step counts, the selection and the averaged logits are in ``server_state`` during the
   phase, so a run resumed between epochs reaches the same model bit for bit.

Logit clipping (reference ``clip_logits``, ``clip_rule: reference``): a logit vector whose L2 norm is
>= 1/c is rescaled to norm c (c = ``clip_factor``; with c = 2.5 almost every vector is normalised to
norm 2.5). ``clip_rule: norm`` (ours) is ordinary clipping: norm > c -> norm c. Clients clip what
they upload; the server clips the student's logits inside the loss. ``clip_factor: null`` or 0: off.

Heterogeneous clients (``families: [cnn, mlp]``; reference ``feddf_hetero``): ``adapt_model`` wraps the
run's model and one more network per extra family into a ``FamilyModels`` module (its forward is
family 0, the run's model, which the runner evaluates). Client k trains family k mod F, receives and
uploads only that family's slice of the flat vector (``client_model_bytes``); the server averages
each family among its own clients and distils every family on the same averaged logits. The last
phase epoch reports ``family<i>_accuracy`` (test split) of every extra family.

Defaults: the paper's example script ``local_simulate.sh`` (methods.md 10.0) where it differs from
``arg_handler.py``: 1,000 patches (arg_handler: 100,000), 500 selected (2,250), k = 1,000 (10), heuristic
hard (mixed), balance 1.0 (0.5), confidence threshold 0.9 (0.1), clipping factor 2.5 (1.0), 100
server steps (500), distillation batch 256 (128); server lr 0.005 and T = 1 in both. With k = N the
KMeans distances are all 0 and only the confidence pruning selects (as in the example run).

Departures, documented: (1) the reference keeps the best-validation student (validate every 50
steps) and can stop early; there is no labeled server validation set here (the test split must not
serve as one), so every round keeps the last student after its full step budget; (2) the adaptive
(cosine-with-restarts) step schedule and adaptive confidence threshold are not implemented; (3) the
reference "easy" heuristic actually takes 50 % easy + 50 % hard (a bug); here "easy" is 100 % easy;
(4) counts use the options as the decimals they are written as (floor(0.9 * 10) = 9), not binary
float products; ties in distance/confidence go to the lower patch index; (5) in the heterogeneous
variant the selection uses family 0's model (the reference: the family with the best test accuracy);
(6) patches are kept as 8-bit pixels, not JPEG files.

Wire bytes per client per round (``Payload`` layout, H = JSON header length, d_f = the client's family's
trainable values, n = selected patches, K = classes): uplink = align8(12 + H) + align8(4 d_f) + 4 n K;
downlink = 4 d_f + align8(12 + H') + 4 n (the indices). The bank's SHA-256 travels as an uncounted
diagnostic so that a client refuses to work with a bank that differs from the server's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn

from ..flat import FlatModel
from ..models import MODELS, SmallCNN, build_model
from ..patch_bank import build_patch_bank, fingerprint, normalise, normaliser
from ..payload import Payload, require, require_meta, to_tensor
from ..rng import numpy_stream
from .base import Algorithm, ClientContext, ClientResult, Environment, ReceivedMessage, ServerMessage, client_weight
from .distillation import kl_distillation_loss
from .local_training import autocast, client_lr, count_participation
from .options import is_int, require_bool, require_choice, require_fraction, require_int, require_positive

#: payload_size_hint assumes round ids below this (only the header's length depends on the ids)
_HINT_ROUND = 10**8 - 1
#: torch.optim.Adam's defaults (the reference uses torch's Adam)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: uploaded logits beyond this magnitude are refused when clipping is off (softmax is saturated long before)
MAX_LOGIT = 1e6
#: patches per forward pass when the server scores the bank or a client labels the selection
SCORE_BATCH = 512
#: server-state keys (present only during a server phase)
PHASE_ROUND, PHASE_INDICES, PHASE_TEACHER = "phase_round", "phase_indices", "phase_teacher"
ADAM_M, ADAM_V, ADAM_STEP = "adam{}_m", "adam{}_v", "adam{}_step"
HEURISTICS = ("easy", "hard", "mixed")


# logit clipping --------------------------------------------------------------------------------------
def clip_logits(logits: torch.Tensor, factor: float | None, rule: str = "reference") -> torch.Tensor:
    """Rescale rows of ``logits`` (n x K) to L2 norm ``factor``: rows with norm >= 1/factor
    (``reference``, the paper's code) or norm > factor (``norm``); ``factor`` None or 0: unchanged."""
    if not factor:
        return logits
    norms = torch.linalg.vector_norm(logits, dim=1, keepdim=True)
    clip = norms >= 1.0 / factor if rule == "reference" else norms > factor
    return torch.where(clip, logits / norms.clamp_min(torch.finfo(logits.dtype).tiny) * factor, logits)


# patch selection -------------------------------------------------------------------------------------
def _decimal(value: float) -> Fraction:
    return Fraction(repr(float(value)))


def kmeans_quota(num_select: int, threshold: float, pruning: bool) -> int:
    """Patches the KMeans step keeps: num_select, inflated to floor(num_select / (1 - threshold)) when
    confidence pruning follows (so that about num_select survive it)."""
    if pruning and threshold > 0:
        return math.floor(Fraction(num_select) / (1 - _decimal(threshold)))
    return int(num_select)


def heuristic_counts(count: int, heuristic: str, easy_fraction: float = 0.5) -> tuple[int, int]:
    """(easy, hard) of ``count`` picks: easy = floor(p_easy count), hard = floor(p_hard count), and the
    rounding remainder goes to easy (the reference's rule)."""
    p_easy = {"easy": Fraction(1), "hard": Fraction(0), "mixed": _decimal(easy_fraction)}[heuristic]
    easy, hard = math.floor(p_easy * count), math.floor((1 - p_easy) * count)
    return easy + count - (easy + hard), hard


def _pick(candidates: np.ndarray, distance: np.ndarray, easy: int, hard: int) -> np.ndarray:
    """Of ``candidates`` (indices), the ``easy`` closest and the ``hard`` farthest (a union: fewer when
    they overlap); ties go to the lower index."""
    values = distance[candidates]
    closest = candidates[np.lexsort((candidates, values))]
    farthest = candidates[np.lexsort((candidates, -values))]
    return np.union1d(closest[:easy], farthest[:hard])


def kmeans_select(predicted: np.ndarray, distance: np.ndarray, quota: int, heuristic: str, balance: float,
                  easy_fraction: float = 0.5) -> np.ndarray:
    """Boolean mask of the class-balanced KMeans selection: per predicted class present,
    floor(quota / classes * balance) patches by the heuristic, then the remainder up to ``quota`` from
    all unselected patches by the same heuristic. Everything when quota >= N."""
    n = len(predicted)
    mask = np.zeros(n, dtype=bool)
    if quota >= n:
        mask[:] = True
        return mask
    classes = np.unique(predicted)
    per_class = math.floor(Fraction(quota, len(classes)) * _decimal(balance))
    easy, hard = heuristic_counts(per_class, heuristic, easy_fraction)
    for c in classes:
        mask[_pick(np.flatnonzero(predicted == c), distance, easy, hard)] = True
    rest = quota - int(mask.sum())
    if rest > 0:
        easy, hard = heuristic_counts(rest, heuristic, easy_fraction)
        mask[_pick(np.flatnonzero(~mask), distance, easy, hard)] = True
    return mask


def confidence_prune(mask: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, threshold: float,
                     strategy: str = "top") -> np.ndarray:
    """``mask`` minus, per predicted class among the masked patches, the floor(threshold * size) most
    (``top``) or least (``bottom``) confident ones; ties go to the lower index."""
    keep = mask.copy()
    fraction = _decimal(threshold)
    for c in np.unique(predicted[mask]):
        members = np.flatnonzero(mask & (predicted == c))
        drop = math.floor(fraction * len(members))
        if drop == 0:
            continue
        values = confidence[members]
        order = members[np.lexsort((members, -values if strategy == "top" else values))]
        keep[order[:drop]] = False
    return keep


# heterogeneous families ------------------------------------------------------------------------------
class FamilyModels(nn.Module):
    """One network per model family; ``forward`` is family 0 (the run's model, which the runner evaluates)."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.families = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.families[0](x)


def infer_input_shape(net: nn.Module) -> tuple[int, int]:
    """(channels, side) the model was built for, read from its layers: needed to build the other
    families in ``adapt_model``, which the runner calls without the input shape. Known: the small CNN,
    the MLP and torchvision ViTs; other models need the shape passed in."""
    from torchvision.models import VisionTransformer

    if isinstance(net, VisionTransformer):
        return int(net.conv_proj.in_channels), int(net.image_size)
    if isinstance(net, SmallCNN):
        side = math.isqrt(net.classifier[1].in_features // 32)
        return int(net.features[0].in_channels), 2 * side + 4
    first = next((m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):  # an MLP on flattened pixels: 1 channel if square, else 3
        for channels in (1, 3):
            side = math.isqrt(first.in_features // channels)
            if first.in_features % channels == 0 and side * side * channels == first.in_features:
                return channels, side
    raise ValueError(f"algorithm.families: cannot tell the input size of a {type(net).__name__} to build the other "
                     f"families; use cnn, mlp or a ViT as the run's model.name (family 0)")


def classifier_layer(net: nn.Module) -> nn.Module | None:
    """The layer whose INPUT is the penultimate embedding: the last ``nn.Linear`` in module order
    (small CNN: ``classifier[3]``, 64-d; MLP: ``net[5]``, 200-d; torchvision ResNet/RegNet: ``fc``; ViT:
    ``heads.head``). None if the model has no linear layer (the logits then serve as embeddings)."""
    last = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last


class SingleImage(Algorithm):
    name = "singleimage"
    client_stat_names = ("train_loss", "local_steps", "family")

    @dataclass
    class Options:
        #: the one shared image: null = scikit-learn's bundled photo china.jpg, or a path to an image file
        image: str | None = None
        #: patches in the bank (example script 1,000; arg_handler 100,000)
        num_patches: int = 1000
        #: patches to distil on per round, n_crops (example 500; arg_handler 2,250)
        num_select: int = 500
        #: class-balanced KMeans selection (reference use_kmeans)
        kmeans: bool = True
        #: KMeans k, capped at num_patches (example 1,000; arg_handler 10)
        kmeans_clusters: int = 1000
        #: "easy" (closest to the centroid), "hard" (farthest) or "mixed" (example hard; arg_handler mixed)
        heuristic: str = "hard"
        #: the easy share of "mixed" (reference kmeans_mixed_factor "50-50")
        easy_fraction: float = 0.5
        #: per-class share of the KMeans quota (example 1.0; arg_handler 0.5)
        balance: float = 1.0
        #: confidence pruning: drop this fraction per predicted class, in [0, 1); 0 = off (example 0.9; arg_handler 0.1)
        confidence_threshold: float = 0.9
        #: "top" drops the most confident (reference default), "bottom" the least
        confidence_strategy: str = "top"
        #: logit clipping factor c; null or 0 = off (example 2.5; arg_handler 1.0)
        clip_factor: float | None = 2.5
        #: "reference": norm >= 1/c -> c (the paper's code); "norm" (ours): norm > c -> c
        clip_rule: str = "reference"
        #: client optimizer: "sgd" (train.lr, momentum, weight_decay) or "adam" (the paper's; train.weight_decay)
        client_optimizer: str = "sgd"
        #: client learning rate instead of train.lr (the example script: adam with 0.01); null = train.lr
        client_lr: float | None = None
        #: Adam steps of server distillation per round (example 100; arg_handler 500); 0 = no distillation
        server_steps: int = 100
        #: server phase epochs per round, the steps split evenly over them (checkpoints can fall between)
        server_epochs: int = 1
        #: server Adam learning rate (both scripts 0.005)
        server_lr: float = 0.005
        #: distillation batch size (example 256; arg_handler 128)
        server_batch_size: int = 256
        #: distillation temperature T (reference 1)
        temperature: float = 1.0
        #: student starts from the FedAvg average (reference warm_start, on every round); false = from W_t
        warm_start: bool = True
        #: "samples" weights updates and logits by sample count (the reference), "uniform" by 1
        weighting: str = "samples"
        #: model families for heterogeneous clients, family 0 = the run's model.name; null = homogeneous
        families: list[str] | None = None

        def validate(self) -> None:
            if self.image is not None and (not isinstance(self.image, str) or not self.image):
                raise ValueError(f"algorithm.image must be null (scikit-learn's china.jpg) or a path to an image, "
                                 f"got {self.image!r}")
            require_int("num_patches", self.num_patches, 1)
            require_int("num_select", self.num_select, 1)
            require_bool("kmeans", self.kmeans)
            require_int("kmeans_clusters", self.kmeans_clusters, 1)
            require_choice("heuristic", self.heuristic, HEURISTICS)
            require_fraction("easy_fraction", self.easy_fraction, open_low=False)
            require_fraction("balance", self.balance, open_low=False)
            require_fraction("confidence_threshold", self.confidence_threshold, open_low=False, closed_high=False)
            require_choice("confidence_strategy", self.confidence_strategy, ("top", "bottom"))
            if self.clip_factor is not None and (isinstance(self.clip_factor, bool) or not isinstance(
                    self.clip_factor, (int, float)) or not (math.isfinite(self.clip_factor) and self.clip_factor >= 0)):
                raise ValueError(f"algorithm.clip_factor must be null or a number >= 0 (0: off), got {self.clip_factor!r}")
            require_choice("clip_rule", self.clip_rule, ("reference", "norm"))
            require_choice("client_optimizer", self.client_optimizer, ("sgd", "adam"))
            if self.client_lr is not None:
                require_positive("client_lr", self.client_lr)
            require_int("server_steps", self.server_steps, 0)
            require_int("server_epochs", self.server_epochs, 1, max(1, self.server_steps))
            require_positive("server_lr", self.server_lr)
            require_int("server_batch_size", self.server_batch_size, 1)
            require_positive("temperature", self.temperature)
            require_bool("warm_start", self.warm_start)
            require_choice("weighting", self.weighting, ("samples", "uniform"))
            if self.families is not None:
                if not isinstance(self.families, list) or not self.families or not all(
                        isinstance(f, str) and f in MODELS for f in self.families):
                    raise ValueError(f"algorithm.families must be null or a non-empty list of model names from "
                                     f"{sorted(MODELS)}, got {self.families!r}")

    # the model ---------------------------------------------------------------------------------
    @classmethod
    def adapt_model(cls, net: nn.Module, options: SingleImage.Options, num_classes: int, seed: int,
                    input_shape: tuple[int, ...] | None = None) -> nn.Module:
        """With two or more ``families``: ``FamilyModels([net, build(families[1]), ...])``, the extra
        families built with ``build_model(name, C, H, classes, seed)`` (deterministic on every rank).
        ``families[0]`` must be the run's model (same parameter names and shapes)."""
        families = options.families
        if not families or len(families) == 1:
            return net
        channels, side = (int(input_shape[0]), int(input_shape[1])) if input_shape else infer_input_shape(net)
        reference = build_model(families[0], channels, side, num_classes, seed)
        shapes = [(n, tuple(p.shape)) for n, p in reference.named_parameters()]
        if shapes != [(n, tuple(p.shape)) for n, p in net.named_parameters()]:
            raise ValueError(f"algorithm.families[0]={families[0]!r} must be the run's model.name (family 0 is the "
                             f"model the runner builds and evaluates)")
        return FamilyModels([net, *[build_model(name, channels, side, num_classes, seed) for name in families[1:]]])

    def __init__(self, options: SingleImage.Options, env: Environment) -> None:
        super().__init__(options, env)
        model = env.model
        net = model.model
        self.nets: list[nn.Module] = list(net.families) if isinstance(net, FamilyModels) else [net]
        wanted = len(options.families) if options.families else 1
        if len(self.nets) != wanted:
            raise ValueError(f"algorithm.families lists {wanted} families but the model holds {len(self.nets)} "
                             f"(build it through SingleImage.adapt_model)")
        self.ranges, self.param_ranges = self._family_ranges(model, len(self.nets))
        self.family_numel = [sum(b - a for a, b in r) for r in self.ranges]
        channels, height, width = env.input_shape
        if height != width:
            raise ValueError(f"algorithm.name=singleimage needs square inputs, got {height}x{width}")
        if options.kmeans:
            _require_sklearn()
        self.bank = build_patch_bank(options.image, options.num_patches, channels, height, env.seed)
        self.bank_sha256 = fingerprint(self.bank)
        self._bank_device = self.bank.to(env.device)
        self._scale, self._shift = normaliser(env.pixel_mean_std, channels, env.device)
        self._selection: np.ndarray | None = None
        self._selection_round: int | None = None
        self._round = 0
        self._means: list | None = None
        self._logit_sum: torch.Tensor | None = None
        self._logit_weight = 0.0
        self._clear_phase()

    @staticmethod
    def _family_ranges(model: FlatModel, families: int) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
        """Per family: the (start, end) ranges of its tensors in the flat vector (its parameters, then its
        float buffers, if any), and the one range of its parameters."""
        if families == 1:
            return [[(0, model.numel)]], [(0, model.param_numel)]
        net = model.model
        names = list(model.param_names) + [n for n, b in net.named_buffers() if b.is_floating_point()]
        if len(names) != len(model.tensor_sizes):
            raise RuntimeError("singleimage: the flat model's tensors do not match the module's names")
        params: list[list[tuple[int, int]]] = [[] for _ in range(families)]
        buffers: list[list[tuple[int, int]]] = [[] for _ in range(families)]
        offset = 0
        for i, (name, size) in enumerate(zip(names, model.tensor_sizes)):
            spans = (params if i < len(model.param_names) else buffers)[int(name.split(".")[1])]
            if spans and spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], offset + size)
            else:
                spans.append((offset, offset + size))
            offset += size
        for f in range(families):
            if len(params[f]) != 1 or len(buffers[f]) > 1:
                raise RuntimeError(f"singleimage: family {f}'s tensors are not contiguous in the flat vector")
        return [params[f] + buffers[f] for f in range(families)], [params[f][0] for f in range(families)]

    def family_of(self, client: int) -> int:
        return client % len(self.nets)

    def family_values(self, vector: torch.Tensor, family: int) -> torch.Tensor:
        """The family's part of a flat vector (a copy)."""
        spans = self.ranges[family]
        return torch.cat([vector[a:b] for a, b in spans]) if len(spans) > 1 else vector[spans[0][0] : spans[0][1]].clone()

    def set_family_values(self, vector: torch.Tensor, family: int, values: torch.Tensor) -> None:
        """Write the family's part of a flat vector in place."""
        offset = 0
        for a, b in self.ranges[family]:
            vector[a:b] = values[offset : offset + b - a]
            offset += b - a

    def client_model_bytes(self, client: int, model_bytes: int) -> int:
        """Only the client's family goes down (4 bytes per value); the whole model when homogeneous."""
        return model_bytes if len(self.nets) == 1 else 4 * self.family_numel[self.family_of(client)]

    # the bank ----------------------------------------------------------------------------------
    def patches(self, indices: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Normalised model inputs of the bank (or of ``indices`` of it) on ``env.device``."""
        bank = self._bank_device
        if indices is not None:
            bank = bank[torch.as_tensor(np.asarray(indices, dtype=np.int64), device=bank.device)]
        return normalise(bank, self._scale, self._shift)

    @torch.no_grad()
    def score(self, net: nn.Module, inputs: torch.Tensor, embeddings: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits float32, penultimate embeddings float32 or None) of ``net`` in eval mode, by batches."""
        layer = classifier_layer(net) if embeddings else None
        captured: list[torch.Tensor] = []
        handle = None
        if layer is not None:
            handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(1).float()))
        was_training = net.training
        net.eval()
        logits = []
        try:
            for start in range(0, len(inputs), SCORE_BATCH):
                with autocast(inputs.device, self.env.autocast_dtype):
                    logits.append(net(self.env.model.to_input_format(inputs[start : start + SCORE_BATCH])).float())
        finally:
            net.train(was_training)
            if handle is not None:
                handle.remove()
        out = torch.cat(logits)
        if not embeddings:
            return out, None
        return out, (torch.cat(captured) if captured else out.clone())

    # server to clients -------------------------------------------------------------------------
    def select(self, round: int) -> tuple[np.ndarray, dict[str, float]]:
        """The round's patch indices (int32, ascending) from the current global model (family 0)."""
        options = self.options
        pruning = options.confidence_threshold > 0
        quota = kmeans_quota(options.num_select, options.confidence_threshold, pruning)
        clustering = options.kmeans and quota < options.num_patches  # a quota of the whole bank keeps everything
        logits, embeddings = self.score(self.nets[0], self.patches(), embeddings=clustering)
        probs = torch.softmax(logits.double(), dim=1)
        confidence, predicted = probs.max(dim=1)
        predicted, confidence = predicted.cpu().numpy(), confidence.cpu().numpy()
        stats: dict[str, float] = {}
        if clustering:
            distance = self._kmeans_distance(embeddings.cpu().numpy(), round)
            mask = kmeans_select(predicted, distance, quota, options.heuristic, options.balance, options.easy_fraction)
        else:
            mask = np.ones(len(predicted), dtype=bool)
        if pruning:
            mask = confidence_prune(mask, predicted, confidence, options.confidence_threshold, options.confidence_strategy)
        indices = np.flatnonzero(mask).astype(np.int32)
        stats["selected"] = float(len(indices))
        stats["selected_classes"] = float(len(np.unique(predicted[indices])))
        return indices, stats

    def _kmeans_distance(self, embeddings: np.ndarray, round: int) -> np.ndarray:
        """Each patch's distance to its KMeans centroid (k capped at N, n_init 1, one thread, keyed seed)."""
        import warnings

        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        k = min(int(self.options.kmeans_clusters), len(embeddings))
        state = int(numpy_stream(self.env.seed, "singleimage-kmeans", round).integers(2**31 - 1))
        with threadpool_limits(limits=1), warnings.catch_warnings():
            # identical embeddings (dead ReLUs, flat patches) give fewer distinct clusters than k: harmless
            warnings.simplefilter("ignore", ConvergenceWarning)
            kmeans = KMeans(n_clusters=k, n_init=1, random_state=state)
            distances = kmeans.fit_transform(embeddings.astype(np.float32))
        return distances[np.arange(len(embeddings)), kmeans.labels_].astype(np.float64)

    def server_message(self, round: int) -> ServerMessage:
        indices, _ = self.select(round)
        self._selection, self._selection_round = indices, round
        common = Payload(meta={"algorithm": self.name, "round": round}, arrays={"indices": indices})
        return ServerMessage(model=True, common=common,
                             diagnostics=Payload(meta={"bank_sha256": self.bank_sha256}))

    def client_begin_round(self, message: ReceivedMessage) -> None:
        theirs = None if message.diagnostics is None else message.diagnostics.meta.get("bank_sha256")
        if theirs is not None and theirs != self.bank_sha256:
            raise RuntimeError(f"singleimage: this rank's patch bank (sha256 {self.bank_sha256[:12]}...) differs from the "
                               f"server's ({str(theirs)[:12]}...): algorithm.image must be the same file on every node")

    # worker side -------------------------------------------------------------------------------
    def header(self, round: int, client_id: int) -> dict[str, Any]:
        return {"algorithm": self.name, "round": round, "client": client_id, "family": self.family_of(client_id)}

    def packed_size(self, round: int, client_id: int, selected: int) -> int:
        """The exact wire size of one client's payload: align8(12 + H) + align8(4 d_f) + 4 n K."""
        family = self.family_of(client_id)
        return Payload(meta=self.header(round, client_id),
                       arrays={"update": np.empty(self.family_numel[family], np.float32),
                               "logits": np.empty((selected, self.env.num_classes), np.float32)}).packed_size()

    def payload_size_hint(self) -> int:
        options = self.options
        most = options.num_patches
        if options.kmeans:
            most = min(most, kmeans_quota(options.num_select, options.confidence_threshold,
                                          options.confidence_threshold > 0))
        clients = max(1, self.env.num_clients)  # the last F client ids cover every family, with the longest ids
        return max(self.packed_size(_HINT_ROUND, c, most) for c in range(max(0, clients - len(self.nets)), clients))

    def _received_indices(self, message: ReceivedMessage | None) -> np.ndarray:
        common = None if message is None else message.common
        if common is None or "indices" not in common.arrays:
            raise ValueError("singleimage: the round's message carries no patch indices")
        indices = common.arrays["indices"]
        if indices.dtype != np.int32 or indices.ndim != 1 or (len(indices) and (
                int(indices.min()) < 0 or int(indices.max()) >= self.options.num_patches)):
            raise ValueError(f"singleimage: patch indices must be int32 in [0, {self.options.num_patches})")
        return indices

    def client_update(self, ctx: ClientContext) -> ClientResult:
        indices = self._received_indices(ctx.message)
        family = self.family_of(ctx.client_id)
        net = self.nets[family]
        model = self.env.model
        start = self.family_values(model.vector, family)
        loss, steps = self._train(net, ctx)
        update = self.family_values(model.vector, family) - start
        logits, _ = self.score(net, self.patches(indices), embeddings=False)
        logits = clip_logits(logits, self.options.clip_factor, self.options.clip_rule)
        payload = Payload(meta=self.header(ctx.round, ctx.client_id),
                          arrays={"update": update.cpu().numpy(), "logits": logits.cpu().numpy().astype(np.float32)})
        return ClientResult(payload, {"train_loss": loss, "local_steps": float(steps), "family": float(family)})

    def _train(self, net: nn.Module, ctx: ClientContext) -> tuple[float, int]:
        """Local training of one family from W_t: ``train.*`` batches/epochs, SGD or Adam; returns
        (mean batch loss, steps). A new optimizer every round, as FedAvg and the reference do."""
        import torch.nn.functional as F

        train = self.env.train
        lr = client_lr(train, ctx.state)
        if self.options.client_lr is not None:
            lr *= float(self.options.client_lr) / float(train.lr)
        params = [p for p in net.parameters() if p.requires_grad]
        if self.options.client_optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=lr, weight_decay=train.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay,
                                        foreach=True)
        device = self.env.model.vector.device
        net.train()
        total = torch.zeros((), device=device)
        steps = 0
        for x, y in ctx.data.batches(ctx.generator, train.batch_size, epochs=train.local_epochs, steps=train.local_steps):
            with autocast(device, self.env.autocast_dtype):
                loss = F.cross_entropy(net(self.env.model.to_input_format(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip, foreach=True)
            optimizer.step()
            total += loss.detach().float()
            steps += 1
        optimizer.zero_grad(set_to_none=True)
        count_participation(ctx.state)
        return (float(total) / steps if steps else float("nan")), steps

    # server side: the fold ---------------------------------------------------------------------
    def server_begin(self, round: int) -> None:
        self._clear_phase()
        self._round = round
        if self._selection is None or self._selection_round != round:
            raise RuntimeError(f"singleimage: server_begin({round}) without this round's server_message")
        device = self.env.model.vector.device
        self._means = [self.new_mean(torch.zeros(n, device=device), round) for n in self.family_numel]
        self._logit_sum = torch.zeros((len(self._selection), self.env.num_classes), dtype=torch.float64)
        self._logit_weight = 0.0

    def server_accumulate(self, client_id: int, payload: Payload, weight: float) -> dict[str, float]:
        context = f"client {client_id}, round {self._round}"
        family = self.family_of(client_id)
        require_meta(payload.meta, self.header(self._round, client_id), context)
        require(payload, {"update": ("float32", (self.family_numel[family],)),
                          "logits": ("float32", (len(self._selection), self.env.num_classes))}, context)
        logits = payload.arrays["logits"]
        if not np.isfinite(logits).all():
            raise ValueError(f"{context}: logits hold NaN or Inf")
        factor = self.options.clip_factor
        if factor:
            bound = max(float(factor), 1.0 / float(factor)) * (1 + 1e-4)
            norms = np.linalg.norm(logits.astype(np.float64), axis=1)
            if len(norms) and float(norms.max()) > bound:
                raise ValueError(f"{context}: a logit vector has norm {float(norms.max()):.4g}, above the clipping "
                                 f"bound {bound:.4g}")
        elif len(logits) and float(np.abs(logits).max()) > MAX_LOGIT:
            raise ValueError(f"{context}: logits reach {float(np.abs(logits).max()):.4g}, beyond {MAX_LOGIT:g}")
        w = client_weight(self.options.weighting, weight)
        update = to_tensor(payload.arrays["update"], self._means[family].sum.device)
        # the update guard may refuse the update (ValueError): then its logits do not count either
        self._means[family].add(update, w, client_id)
        self._logit_sum.add_(torch.from_numpy(logits.astype(np.float64)), alpha=w)  # a copy: the buffer is reused
        self._logit_weight += w
        return {"selected_patches": float(len(self._selection))}

    def server_finish(self) -> torch.Tensor:
        """Warm start: the FedAvg mean of each family among its clients, through the server optimizer
        (families without clients keep W_t). Keeps the averaged logits for the server phase."""
        model = self.env.model
        means = [m.mean() for m in self._means]
        if not self.options.warm_start or all(m is None for m in means):
            state = model.vector.clone()
        else:
            update = torch.zeros_like(model.vector)
            for family, mean in enumerate(means):
                if mean is not None:
                    self.set_family_values(update, family, mean)
            state = self.apply_update(update)
        if self._logit_weight > 0 and self.options.server_steps > 0 and len(self._selection):
            self._phase_round = self._round
            self._indices = self._selection.copy()
            self._teacher = (self._logit_sum / self._logit_weight).float().to(model.vector.device)
        self._means, self._logit_sum, self._logit_weight = None, None, 0.0
        return state

    # server side: distillation -----------------------------------------------------------------
    def server_phase_epochs(self, round: int) -> int:
        return int(self.options.server_epochs) if self.options.server_steps > 0 else 0

    def epoch_steps(self, epoch: int) -> int:
        """Steps of phase epoch ``epoch`` (1-based): server_steps split as evenly as integers allow."""
        steps, epochs = int(self.options.server_steps), int(self.options.server_epochs)
        return epoch * steps // epochs - (epoch - 1) * steps // epochs

    def server_phase_epoch(self, round: int, epoch: int) -> dict[str, float]:
        if self._teacher is None or self._phase_round != round:  # no client was accepted: nothing to distil
            return {"loss": float("nan"), "steps": 0.0, "stop_early": 1.0}
        model = self.env.model
        if self._adam is None:
            if epoch != 1:
                raise RuntimeError(f"{self.name}: server phase epoch {epoch} of round {round} has no optimizer state "
                                   f"(it is neither the first epoch nor restored from a checkpoint)")
            self._adam = [(torch.zeros(b - a, device=model.vector.device), torch.zeros(b - a, device=model.vector.device), 0)
                          for a, b in self.param_ranges]
        inputs = self.patches(self._indices)
        teacher = self._teacher
        n = len(inputs)
        batch = min(int(self.options.server_batch_size), n)
        steps = self.epoch_steps(epoch)
        generator = self.server_generator(round, f"phase-{epoch}")
        stats: dict[str, float] = {"steps": float(steps), "selected": float(n)}
        for family, net in enumerate(self.nets):
            passes = math.ceil(steps * batch / n)
            order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)] or
                              [torch.empty(0, dtype=torch.int64)]).to(inputs.device)
            loss = self._distil(family, net, inputs, teacher, order, batch, steps)
            stats["loss" if family == 0 else f"family{family}_loss"] = loss
        if epoch == self.options.server_epochs and len(self.nets) > 1 and self.env.evaluate is not None:
            for family in range(1, len(self.nets)):
                stats[f"family{family}_accuracy"] = float(self.env.evaluate(self.nets[family])[0])
        return stats

    def _distil(self, family: int, net: nn.Module, inputs: torch.Tensor, teacher: torch.Tensor, order: torch.Tensor,
                batch: int, steps: int) -> float:
        """``steps`` Adam steps of one family on KL(teacher || clip(student)); returns the mean loss."""
        model = self.env.model
        start, end = self.param_ranges[family]
        params = model.params_vector[start:end]
        temperature = float(self.options.temperature)
        total = torch.zeros((), device=params.device)
        was_training = net.training
        net.train()  # the reference distils in train mode
        try:
            for j in range(steps):
                index = order[j * batch : (j + 1) * batch]
                with autocast(params.device, self.env.autocast_dtype):
                    logits = net(model.to_input_format(inputs[index]))
                logits = clip_logits(logits.float(), self.options.clip_factor, self.options.clip_rule)
                loss = kl_distillation_loss(logits, teacher[index], temperature)
                for p in model.params:
                    p.grad = None
                loss.backward()
                self._adam_step(family, params, model.flat_grad()[start:end])
                total += loss.detach()
        finally:
            for p in model.params:
                p.grad = None
            net.train(was_training)
        return float(total) / steps if steps else float("nan")

    @torch.no_grad()
    def _adam_step(self, family: int, params: torch.Tensor, grad: torch.Tensor) -> None:
        """One step of torch.optim.Adam's default algorithm (no weight decay) on a flat slice, in place."""
        m, v, step = self._adam[family]
        beta1, beta2 = ADAM_BETAS
        step += 1
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = (v.sqrt() / math.sqrt(bias2)).add_(ADAM_EPS)
        params.addcdiv_(m, denom, value=-float(self.options.server_lr) / bias1)
        self._adam[family] = (m, v, step)

    def server_phase_end(self, round: int) -> None:
        self._clear_phase()

    def _clear_phase(self) -> None:
        self._phase_round: int | None = None
        self._indices: np.ndarray | None = None
        self._teacher: torch.Tensor | None = None
        self._adam: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None

    # checkpointing -----------------------------------------------------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        """Empty outside a phase; during one: the round, the selection, the averaged logits and each
        family's Adam moments and step count."""
        if self._teacher is None:
            return {}
        state = {PHASE_ROUND: np.array([self._phase_round], dtype=np.int64),
                 PHASE_INDICES: self._indices.copy(),
                 PHASE_TEACHER: self._teacher.cpu().numpy().copy()}
        for family, (m, v, step) in enumerate(self._adam or []):
            state[ADAM_M.format(family)] = m.cpu().numpy().copy()
            state[ADAM_V.format(family)] = v.cpu().numpy().copy()
            state[ADAM_STEP.format(family)] = np.array([step], dtype=np.int64)
        return state

    def load_server_state(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        self._clear_phase()
        if not state:
            return
        round_, indices, teacher = state.pop(PHASE_ROUND, None), state.pop(PHASE_INDICES, None), state.pop(PHASE_TEACHER, None)
        if round_ is None or round_.shape != (1,) or round_.dtype != np.int64:
            raise ValueError(f"{self.name}: server state {PHASE_ROUND!r} must be int64[1]")
        if indices is None or indices.dtype != np.int32 or indices.ndim != 1 or not len(indices) or (
                int(indices.min()) < 0 or int(indices.max()) >= self.options.num_patches):
            raise ValueError(f"{self.name}: server state {PHASE_INDICES!r} must be int32 patch indices")
        shape = (len(indices), self.env.num_classes)
        if teacher is None or teacher.dtype != np.float32 or teacher.shape != shape or not np.isfinite(teacher).all():
            raise ValueError(f"{self.name}: server state {PHASE_TEACHER!r} must be finite float32{list(shape)}")
        adam = []
        for family, (a, b) in enumerate(self.param_ranges):
            keys = (ADAM_M.format(family), ADAM_V.format(family), ADAM_STEP.format(family))
            m, v, step = (state.pop(key, None) for key in keys)
            if m is None and v is None and step is None:
                continue
            for key, value in zip(keys[:2], (m, v)):
                if value is None or value.dtype != np.float32 or value.shape != (b - a,) or not np.isfinite(value).all():
                    raise ValueError(f"{self.name}: server state {key!r} must be finite float32[{b - a}]")
            if step is None or step.shape != (1,) or step.dtype != np.int64 or not is_int(int(step[0])) or step[0] < 0:
                raise ValueError(f"{self.name}: server state {keys[2]!r} must be int64[1] >= 0")
            device = self.env.model.vector.device
            adam.append((torch.from_numpy(m.copy()).to(device), torch.from_numpy(v.copy()).to(device), int(step[0])))
        if state:
            raise ValueError(f"{self.name}: unexpected server state {sorted(state)}")
        if adam and len(adam) != len(self.param_ranges):
            raise ValueError(f"{self.name}: server state holds Adam moments for {len(adam)} of {len(self.param_ranges)} "
                             f"families")
        self._phase_round = int(round_[0])
        self._indices = indices.copy()
        self._teacher = torch.from_numpy(teacher.copy()).to(self.env.model.vector.device)
        self._adam = adam or None


def _require_sklearn() -> None:
    try:
        import sklearn.cluster  # noqa: F401
    except ImportError as exc:
        raise ImportError("algorithm.kmeans needs scikit-learn: pip install 'osfed-hpc[demo]' "
                          "(or set algorithm.kmeans: false)") from exc
