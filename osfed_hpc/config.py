"""YAML experiment -> typed, validated dataclasses.

Why so strict: a mistyped key in a 60-client ImageNet job must fail in the first second with the
key's name and the valid alternatives, not after hours of training with a default silently used.
Overrides from the command line (``rounds=3 train.lr=0.1``) go through the same checks.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .host_memory import HOST_MEMORY_SETTINGS


class ConfigError(UserError):
    """A config problem, always naming the offending key."""


#: seeds go into numpy's SeedSequence (non-negative) and torch.manual_seed (64 bits)
SEED_MAX = 2**64 - 1
SEED_RANGE = "an integer in [0, 2**64 - 1] (seeds feed numpy SeedSequence and torch.manual_seed)"


@dataclass
class DataConfig:
    #: prepared dataset directory (``osfed-hpc prepare`` output)
    path: str = "data/mnist5k"
    #: built-in source to prepare into ``path`` when it holds no dataset yet (mnist5k, digits)
    source: str | None = None
    #: partition file; null -> ``<path>/partitions/<scheme>-n<clients>-a<alpha>-s<partition_seed>.npz``,
    #: created on first use
    partition: str | None = None
    clients: int = 10
    scheme: str = "dirichlet"
    alpha: float = 0.5
    partition_seed: int = 0
    min_samples: int = 1
    #: side length fed to the model; null = the stored size (raw datasets)
    resolution: int | None = None
    #: DataLoader worker processes per rank for JPEG datasets (0 = load in the rank itself)
    num_workers: int = 0
    # -- loader options (JPEG datasets only) --
    #: decode at 1/2, 1/4 or 1/8 DCT scale when the crop allows it: faster, slightly different pixels
    jpeg_draft: bool = False
    #: where JPEGs are decoded: cpu (PIL, in the DataLoader workers) or cuda (nvjpeg on the training GPU)
    decode_device: str = "cpu"

    def validate(self) -> None:
        _require(self.clients >= 1, "data.clients", self.clients, "an integer >= 1")
        _require(self.scheme in ("dirichlet", "iid"), "data.scheme", self.scheme, "'dirichlet' or 'iid'")
        _require(self.alpha > 0 and math.isfinite(self.alpha), "data.alpha", self.alpha, "a number > 0")
        _require(self.min_samples >= 0, "data.min_samples", self.min_samples, "an integer >= 0")
        _require(0 <= self.partition_seed <= SEED_MAX, "data.partition_seed", self.partition_seed, SEED_RANGE)
        _require(self.resolution is None or self.resolution >= 4, "data.resolution", self.resolution, "null or >= 4")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        _require(self.source in (None, "mnist5k", "digits"), "data.source", self.source, "null, 'mnist5k' or 'digits'")
        _require(self.decode_device in ("cpu", "cuda"), "data.decode_device", self.decode_device, "'cpu' or 'cuda'")


@dataclass
class ModelConfig:
    name: str = "cnn"
    #: a local state_dict file (e.g. an earlier run's model.pt) loaded into the model before the
    #: method adapts it (LoRA freezes it as the backbone); read with weights_only=True, never a hub
    pretrained: str | None = None

    def validate(self) -> None:
        from .models import MODELS

        _require(self.name in MODELS, "model.name", self.name, f"one of {sorted(MODELS)}")
        if self.pretrained is not None:
            _require(Path(self.pretrained).is_file(), "model.pretrained", self.pretrained, "an existing state_dict file")


@dataclass
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = 1
    #: if set, exactly this many local steps instead of ``local_epochs``
    local_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: multiply the client lr by this at each participation (3SFC uses 0.99)
    lr_decay: float = 1.0
    grad_clip: float | None = None

    def validate(self) -> None:
        _require(self.local_epochs >= 1, "train.local_epochs", self.local_epochs, "an integer >= 1")
        _require(self.local_steps is None or self.local_steps >= 1, "train.local_steps", self.local_steps, "null or >= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "a number > 0")
        _require(0 <= self.momentum < 1, "train.momentum", self.momentum, "in [0, 1)")
        _require(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "train.weight_decay",
                 self.weight_decay, "a finite number >= 0")
        _require(0 < self.lr_decay <= 1, "train.lr_decay", self.lr_decay, "in (0, 1]")
        _require(self.grad_clip is None or (self.grad_clip > 0 and math.isfinite(self.grad_clip)), "train.grad_clip",
                 self.grad_clip, "null or a finite number > 0")


@dataclass
class ServerConfig:
    #: fraction of clients selected each round, in (0, 1]
    sample_fraction: float = 1.0
    #: server learning rate applied to the aggregated update
    lr: float = 1.0
    #: server momentum (FedAvgM) on the aggregated update, in [0, 1); 0 = plain averaging
    momentum: float = 0.0
    #: reject a client's update whose norm exceeds this many times the median accepted update norm
    #: of the previous round (the model's norm in the first round); 0 = only reject NaN/Inf
    max_update_ratio: float = 100.0

    def validate(self) -> None:
        _require(0 < self.sample_fraction <= 1, "server.sample_fraction", self.sample_fraction, "in (0, 1]")
        _require(self.lr > 0 and math.isfinite(self.lr), "server.lr", self.lr, "a number > 0")
        _require(0 <= self.momentum < 1, "server.momentum", self.momentum, "in [0, 1)")
        _require(self.max_update_ratio >= 0 and math.isfinite(self.max_update_ratio), "server.max_update_ratio",
                 self.max_update_ratio, "a number >= 0")


@dataclass
class EvalConfig:
    #: evaluate on the test split every this many rounds (and always after the last round)
    every: int = 1
    batch_size: int = 500
    #: during a server phase (one-shot and distillation methods), also evaluate every this many phase
    #: epochs (0: only when the phase ends)
    phase_every: int = 0

    def validate(self) -> None:
        _require(self.every >= 1, "eval.every", self.every, "an integer >= 1")
        _require(self.phase_every >= 0, "eval.phase_every", self.phase_every, "an integer >= 0")
        _require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")


@dataclass
class RuntimeConfig:
    #: auto (CUDA if present, one GPU per rank by node-local rank), cpu or cuda
    device: str = "auto"
    #: torch threads per rank; 0 = SLURM_CPUS_PER_TASK, else the node's cores / ranks on the node
    threads: int = 0
    #: none or bf16 autocast for local training (synthesis and decoding always run in fp32)
    amp: str = "none"
    #: channels-last (NHWC) conv weights and inputs; the flat model vector follows that layout
    channels_last: bool = False
    #: checkpoint every N rounds (0 = only at the end and on SIGUSR1/SIGTERM)
    checkpoint_every: int = 0
    #: where per-client state (residuals) lives: memory, or disk (files under state_dir)
    client_state: str = "memory"
    state_dir: str | None = None
    #: extra diagnostics (e.g. server-side cosine to the true mean update) that cost time
    debug: bool = False
    #: payloads of a round are gathered in one collective while they fit in this many MiB on
    #: rank 0 together, else streamed one at a time (see osfed_hpc.exchange)
    gather_limit_mb: int = 256
    #: deterministic kernels and no TF32 for local training: auto (on for CPU, off for CUDA), on or
    #: off (see devices.make_deterministic for what each keeps bitwise); snapshot synthesis and
    #: decoding always run with exact numerics. YAML's bare on/off (booleans) are accepted too.
    deterministic: str | bool = "auto"
    #: also write TensorBoard event files (rank 0, in the run directory); needs the tensorboard package
    tensorboard: bool = False
    #: every this many rounds, snapshot methods write a PNG of what the selected clients sent into
    #: RUN/snapshots/ (rank 0; derived from client data, so off by default). 0: never
    save_snapshots: int = 0
    #: keep: large freed host blocks stay in the process for reuse (ours: 1.04-1.51x per CPU synthesis
    #: evaluation in isolation, up to 1.14x inside runs; bitwise the same results; resident size stays
    #: near its peak);
    #: system: the C allocator's defaults (see osfed_hpc.host_memory)
    host_memory: str = "keep"

    def validate(self) -> None:
        _require(self.host_memory in HOST_MEMORY_SETTINGS, "runtime.host_memory", self.host_memory,
                 " or ".join(HOST_MEMORY_SETTINGS))
        _require(self.save_snapshots >= 0, "runtime.save_snapshots", self.save_snapshots, "an integer >= 0")
        _require(self.device in ("auto", "cpu", "cuda"), "runtime.device", self.device, "auto, cpu or cuda")
        _require(self.threads >= 0, "runtime.threads", self.threads, "an integer >= 0")
        _require(self.amp in ("none", "bf16"), "runtime.amp", self.amp, "none or bf16")
        _require(self.checkpoint_every >= 0, "runtime.checkpoint_every", self.checkpoint_every, ">= 0")
        _require(self.client_state in ("memory", "disk"), "runtime.client_state", self.client_state, "memory or disk")
        _require(self.gather_limit_mb >= 0, "runtime.gather_limit_mb", self.gather_limit_mb, "an integer >= 0")
        if isinstance(self.deterministic, bool):  # YAML 1.1 reads a bare on/off as true/false
            self.deterministic = "on" if self.deterministic else "off"
        _require(self.deterministic in ("auto", "on", "off"), "runtime.deterministic", self.deterministic,
                 "auto, on or off")
        if self.tensorboard:
            from .tensorboard import require_tensorboard

            require_tensorboard()


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    rounds: int = 30
    #: run directory; null -> runs/<name>-<timestamp>
    out: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    #: ``name`` plus the chosen algorithm's own options (README "Methods"; recorded with defaults filled in)
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        _require(self.rounds >= 1, "rounds", self.rounds, "an integer >= 1")
        _require(0 <= self.seed <= SEED_MAX, "seed", self.seed, SEED_RANGE)
        _require(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        for section in (self.data, self.model, self.train, self.server, self.eval, self.runtime):
            section.validate()
        # validate the algorithm section and record every option with its default filled in, so
        # config.yaml and the checkpoint digest say exactly what ran
        self.algorithm = {"name": self.algorithm["name"], **dataclasses.asdict(self.algorithm_options())}

    def algorithm_options(self):
        """The typed options of the selected algorithm (unknown keys are errors)."""
        from .algorithms import get_algorithm

        name = self.algorithm.get("name")
        try:
            cls = get_algorithm(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        values = {k: v for k, v in self.algorithm.items() if k != "name"}
        options = _build(cls.Options, values, "algorithm")
        if hasattr(options, "validate"):
            try:
                options.validate()
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: got {value!r}, expected {expected}")


def _unknown_key(key: str, prefix: str, valid: list[str]) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    hint = difflib.get_close_matches(key, valid, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"unknown config key {full!r}{did_you_mean}; valid keys here: {', '.join(sorted(valid))}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type, naming ``key`` on failure."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: invalid value {value!r}")
    if annotation is Any or origin is dict:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: got {value!r}, expected true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: got {value!r}, expected an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key {key!r}: got {value!r}, expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: got {value!r}, expected a string")
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    return value


def _build(cls: type, values: Any, prefix: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(str(key), prefix, list(fields))
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.1`` -> (["train", "lr"], 0.1); the value is parsed as YAML (null, true, 3, 1e-2)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        if path == ["algorithm"] and isinstance(value, str):
            value = {"name": value}  # switch method; its options may follow as algorithm.key=value
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file -> {}); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}: {exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None), apply overrides, validate."""
    raw = read_yaml_mapping(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a raw mapping (``algorithm`` may be a bare name)."""
    raw = dict(raw)
    algorithm = raw.get("algorithm", {"name": "fedavg"})
    if isinstance(algorithm, str):
        algorithm = {"name": algorithm}
    if not isinstance(algorithm, dict):
        raise ConfigError("config key 'algorithm' must be a mapping with a 'name'")
    raw["algorithm"] = {"name": "fedavg", **algorithm}
    config = _build(Config, raw, "")
    config.validate()
    return config
