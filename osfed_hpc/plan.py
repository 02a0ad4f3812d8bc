"""Plan a run without running it: ``osfed-hpc run --dry-run`` and the config-key table of ``--help``.

``--dry-run`` works on a login node: it never imports mpi4py (so MPI is never initialised) and
writes nothing. It validates the config exactly like a run's setup does, resolves the data set and
the partition (a partition that does not exist yet is computed in memory, not written; a built-in
data set that is not prepared yet is prepared into a temporary directory that is deleted again),
builds the model on CPU, and prints the resolved config, the client placement for ``--ranks N``
and per-rank estimates of client-state memory, checkpoint size and bytes moved per round, plus
the median seconds per round of earlier finished runs of the same model and resolution.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: methods whose clients keep an error-feedback residual when their ``error_feedback`` option is on
ERROR_FEEDBACK_METHODS = ("osfed", "sfc3", "e3sfc", "topk", "randtopk", "quant", "fedmpq_lite")


# ---------------------------------------------------------------------------------------------
# osfed-hpc run --help: the config keys with their defaults


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None")


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_keys() -> list[tuple[str, str, str]]:
    """(key, type, default) of every config key, from the dataclasses in ``osfed_hpc.config``."""
    from .config import Config

    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            annotation = hints[f.name]
            if dataclasses.is_dataclass(annotation):
                walk(annotation, f"{key}.")
            elif key == "algorithm":
                rows.append(("algorithm.name", "str", _yaml_value(getattr(instance, f.name).get("name"))))
                rows.append(("algorithm.<option>", "", "(the method's options; see the README)"))
            else:
                rows.append((key, _type_name(annotation), _yaml_value(getattr(instance, f.name))))

    walk(Config, "")
    return rows


def config_keys_table() -> str:
    """The ``osfed-hpc run --help`` epilog: one line per config key."""
    rows = config_keys()
    width = max(len(k) for k, _, _ in rows)
    type_width = max(len(t) for _, t, _ in rows)
    lines = ["config keys (override any as key.sub=value; values are parsed as YAML):",
             f"  {'key':<{width}}  {'type':<{type_width}}  default"]
    lines += [f"  {k:<{width}}  {t:<{type_width}}  {d}".rstrip() for k, t, d in rows]
    # (no list of algorithm names here: that would import torch for every osfed-hpc command)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the plan


def format_bytes(n: float) -> str:
    """Decimal units, like the progress line (1 MB = 10^6 bytes)."""
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


#: the smallest MPI_TAG_UB the MPI standard allows; a dry run never asks MPI for the real one
MPI_MIN_TAG_UB = 32767


def _format_clients(clients: list[int], limit: int = 12) -> str:
    if not clients:
        return "-"
    shown = ",".join(str(c) for c in clients[:limit])
    return shown + (f",... ({len(clients)})" if len(clients) > limit else "")


@dataclass
class RankPlan:
    rank: int
    role: str
    clients: list[int]
    samples: int
    selected_per_round: float  # mean over the run's rounds
    client_state_bytes: int  # memory for the client states this rank hosts
    checkpoint_bytes: int  # what this rank writes per checkpoint
    downlink_bytes: float  # per round: model bytes x selected clients (rank 0: all of them)
    uplink_bytes: float  # per round: payload estimate x selected clients (rank 0: all of them)


@dataclass
class Plan:
    config: Any
    ranks: int
    data_note: str
    partition_path: Path
    partition_note: str
    num_train: int
    num_classes: int
    input_shape: tuple[int, int, int]
    num_clients: int
    model_numel: int  # the flat vector (trainable parameters, then float buffers)
    param_numel: int
    payload_hint: int
    client_state_bytes: int  # per client
    server_state_bytes: int
    rank_plans: list[RankPlan] = field(default_factory=list)
    start_round: int = 1
    timing: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    #: "dealt" or "fixed: <why>", as the run decides it (comm.placement_mode)
    placement: str = "fixed"


def _resolve_partition(config, reader, data_dir_for_paths: Path):
    """(partition, path, note) without writing: the configured file, the default file if it
    exists, else the partition a real run would create, computed in memory."""
    from .data import Partition, load_partition, make_partition
    from .errors import RunError

    data = config.data
    if data.partition:
        path = Path(data.partition)
        if not path.exists():
            raise RunError(f"data.partition {str(path)!r} does not exist")
        return load_partition(path, reader), path, "existing file"
    path = Partition.default_path(data_dir_for_paths, data.scheme, data.clients, data.alpha, data.partition_seed)
    if path.exists():
        partition = load_partition(path, reader)
        note = "existing file"
    else:
        partition = make_partition(reader, data.clients, data.scheme, data.alpha, data.partition_seed,
                                   min_samples=data.min_samples)
        note = "computed in memory; a real run writes this file"
    if partition.num_clients != data.clients:
        raise RunError(f"partition {path} has {partition.num_clients} clients, data.clients is {data.clients}")
    return partition, path, note


def _state_sizes(algorithm, config, flat) -> tuple[int, int]:
    """(bytes of one client's state, bytes of the server's state besides the model vector)."""
    from .algorithms.error_feedback import RESIDUAL, ErrorFeedback

    client, server, found = 0, 0, False
    for value in vars(algorithm).values():
        if isinstance(value, ErrorFeedback):
            found = True
            if value.enabled:
                if value.key == RESIDUAL:
                    client += 4 * value.size
                else:
                    server += 4 * value.size
    if not found and config.algorithm["name"] in ERROR_FEEDBACK_METHODS and config.algorithm.get("error_feedback"):
        client = 4 * flat.param_numel
    if config.server.momentum > 0:
        server += 4 * flat.param_numel  # the FedAvgM velocity
    return client, server


def _build_model_and_algorithm(config, num_classes: int, input_shape: tuple[int, int, int]):
    import torch

    from .algorithms import Environment, get_algorithm
    from .config import ConfigError
    from .flat import FlatModel
    from .models import build_model, load_pretrained

    cls = get_algorithm(config.algorithm["name"])
    try:
        cls.check_rounds(config.rounds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = config.algorithm_options()
    c, h, _ = input_shape
    net = build_model(config.model.name, c, h, num_classes, seed=config.seed)
    if config.model.pretrained:
        try:
            load_pretrained(net, config.model.pretrained)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    net = cls.adapt_model(net, options, num_classes, config.seed, tuple(input_shape))
    flat = FlatModel(net, channels_last=config.runtime.channels_last)
    env = Environment(model=flat, train=config.train, num_classes=num_classes, input_shape=input_shape,
                      device=torch.device("cpu"), seed=config.seed, num_clients=config.data.clients)
    try:
        algorithm = cls(options, env)
    except ValueError as exc:  # the same check a run does: options that do not fit this model or data
        raise ConfigError(str(exc)) from None
    return flat, algorithm


def median_round_seconds(runs_dir: Path, model: str, resolution: int, algorithm: str | None = None,
                         exclude: Path | None = None) -> dict[str, Any] | None:
    """Median ``seconds.round`` over the metrics of earlier finished runs (summary.json and
    metrics.jsonl) of the same model and resolution under ``runs_dir``. Runs of the same algorithm
    are used when there are any, else every matching run."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    matches: list[tuple[Path, str, int, list[float]]] = []
    for summary_path in sorted(runs_dir.rglob("summary.json")):
        run = summary_path.parent
        if exclude is not None and run.resolve() == Path(exclude).resolve():
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(summary, dict) or summary.get("model") != model or summary.get("resolution") != resolution:
            continue
        seconds = []
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
                if "phase_epoch" in record:  # a server-phase line; its round's line has the round's time
                    continue
                value = record.get("seconds", {}).get("round")
            except (json.JSONDecodeError, AttributeError):
                break
            if isinstance(value, (int, float)) and math.isfinite(value):
                seconds.append(float(value))
        if seconds:
            matches.append((run, str(summary.get("algorithm")), int(summary.get("world_size") or 0), seconds))
    if not matches:
        return None
    same = [m for m in matches if m[1] == algorithm]
    used = same or matches
    pooled = [s for m in used for s in m[3]]
    return {"median_seconds": statistics.median(pooled), "rounds": len(pooled), "runs": [str(m[0]) for m in used],
            "same_algorithm": bool(same), "algorithms": sorted({m[1] for m in used}),
            "world_sizes": sorted({m[2] for m in used})}


def make_plan(config, ranks: int = 3, runs_dir: Path | str = "runs", resume_dir: Path | None = None,
              say: Callable[[str], None] = lambda text: None) -> Plan:
    """Validate and resolve ``config`` as a run's setup would, for a world of ``ranks`` ranks, and
    estimate what each rank holds, writes and moves. Writes nothing."""
    from . import checkpoint as ckpt
    from .comm import assign_clients, placement_mode
    from .data import DatasetReader, prepare_dataset
    from .errors import RunError
    from .exchange import CLIENT_TAG_BASE
    from .rng import select_clients

    if ranks < 1:
        raise RunError(f"--ranks must be >= 1, got {ranks}")
    notes: list[str] = []
    start_round = 1
    if resume_dir is not None:
        latest = ckpt.latest_checkpoint(resume_dir)
        if latest is None:
            raise RunError(f"cannot resume: {str(resume_dir)!r} has no complete checkpoint")
        done = int(json.loads((latest / "manifest.json").read_text())["round"])
        if done > config.rounds:
            raise RunError(f"cannot resume {str(resume_dir)!r} with rounds={config.rounds}: it has already "
                           f"done {done} rounds (give rounds >= {done})")
        start_round = done + 1
    elif config.out and Path(config.out).exists() and any(Path(config.out).iterdir()):
        raise RunError(f"run directory {config.out!r} exists and is not empty; use "
                       f"'osfed-hpc run --resume {config.out}' or another out=")

    data_dir = Path(config.data.path)
    with tempfile.TemporaryDirectory(prefix="osfed-plan-") as scratch:
        if (data_dir / "dataset.json").exists():
            reader_dir, data_note = data_dir, "prepared"
        elif config.data.source is None:
            raise RunError(f"data.path {str(data_dir)!r} holds no prepared dataset (no dataset.json); run "
                           f"'osfed-hpc prepare' first or set data.source")
        else:
            say(f"[osfed-hpc] dry run: {data_dir} holds no data set yet; preparing {config.data.source} "
                f"in a temporary directory to plan with (a real run prepares it into {data_dir})")
            reader_dir = Path(scratch) / "data"
            prepare_dataset(config.data.source, reader_dir, progress=False)
            data_note = f"not prepared yet: a real run prepares {config.data.source} there"
        reader = DatasetReader(reader_dir)
        try:
            partition, part_path, part_note = _resolve_partition(config, reader, data_dir)
            resolution = config.data.resolution or (reader.image_shape[1] if reader.image_shape else None)
            if resolution is None:
                raise RunError(f"data.resolution must be set for {reader.encoding} dataset {config.data.path}")
            num_classes, num_train = reader.num_classes, reader.count("train")
            encoding = reader.encoding
            input_shape = (reader.channels, resolution, resolution)
        finally:
            reader.close()
    num_clients = partition.num_clients
    worker_ranks = [0] if ranks == 1 else list(range(1, ranks))
    if len(worker_ranks) > num_clients:
        raise RunError(f"{len(worker_ranks)} worker ranks for {num_clients} clients: ranks would idle; "
                       f"start at most {num_clients + 1} ranks")
    config.data.partition = str(part_path)

    flat, algorithm = _build_model_and_algorithm(config, num_classes, input_shape)
    payload_hint = int(algorithm.payload_size_hint())
    client_state, server_state = _state_sizes(algorithm, config, flat)
    model_bytes = 4 * flat.numel

    sizes = [int(s) for s in partition.sizes]
    raw_bytes = 4 * math.prod(input_shape) * sum(sizes) if encoding == "raw" else None
    # the run asks its MPI for the tag bound; the plan assumes the standard's minimum
    placement_note = placement_mode(algorithm, ranks, CLIENT_TAG_BASE + num_clients <= MPI_MIN_TAG_UB, raw_bytes)
    dealt = placement_note == "dealt"
    if "MPI tags" in placement_note:
        notes.append(f"placement: fixed because {num_clients} clients need more tags than the MPI standard's "
                     f"minimum ({MPI_MIN_TAG_UB}); a site MPI with a larger MPI_TAG_UB deals them")
    placement = assign_clients(sizes, worker_ranks, block=max(1, int(algorithm.client_batch_size())))
    rounds = list(range(start_round, config.rounds + 1))
    selected_count = {rank: 0 for rank in range(ranks)}
    owner = {c: rank for rank, clients in placement.items() for c in clients}
    for round_ in rounds:
        for client in select_clients(config.seed, round_, num_clients, config.server.sample_fraction):
            selected_count[owner[client]] += 1
    per_round = {rank: selected_count[rank] / max(len(rounds), 1) for rank in range(ranks)}
    total_selected = sum(per_round.values())

    rank_plans = []
    for rank in range(ranks):
        hosted = placement.get(rank, [])
        role = "server+worker" if ranks == 1 else ("server" if rank == 0 else "worker")
        selected = total_selected if rank == 0 else per_round[rank]
        samples = sum(sizes[c] for c in hosted)
        if dealt and rank > 0:  # no fixed clients: each worker takes its share of every round on average
            hosted, selected, samples = [], total_selected / len(worker_ranks), sum(sizes) // len(worker_ranks)
        checkpoint = client_state * len(hosted) + (model_bytes + server_state if rank == 0 else 0)
        rank_plans.append(RankPlan(
            rank=rank, role=role, clients=hosted, samples=samples,
            selected_per_round=selected, client_state_bytes=client_state * len(hosted),
            checkpoint_bytes=checkpoint, downlink_bytes=model_bytes * selected, uplink_bytes=payload_hint * selected,
        ))
    timing = median_round_seconds(Path(runs_dir), config.model.name, resolution, config.algorithm["name"])
    if config.server.sample_fraction < 1:
        notes.append("selected/round: mean number of this rank's clients selected per round over the rounds to run")
    return Plan(config=config, ranks=ranks, data_note=data_note, partition_path=part_path, partition_note=part_note,
                num_train=num_train, num_classes=num_classes, input_shape=input_shape, num_clients=num_clients,
                model_numel=flat.numel, param_numel=flat.param_numel, payload_hint=payload_hint,
                client_state_bytes=client_state, server_state_bytes=server_state, rank_plans=rank_plans,
                start_round=start_round, timing=timing, notes=notes, placement=placement_note)


def render_plan(plan: Plan) -> str:
    config = plan.config
    c, h, w = plan.input_shape
    rounds_left = config.rounds - plan.start_round + 1
    lines = ["# resolved config", yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(), "",
             "# plan (dry run: nothing was trained, nothing was written)"]
    lines.append(f"data:       {config.data.path} ({plan.data_note}): {plan.num_train} train samples, "
                 f"{plan.num_classes} classes, input {c}x{h}x{w}")
    lines.append(f"partition:  {plan.partition_path} ({plan.partition_note}): {plan.num_clients} clients")
    lines.append(f"model:      {config.model.name}, {plan.param_numel:,} trainable values, flat vector "
                 f"{plan.model_numel:,} values = {format_bytes(4 * plan.model_numel)}")
    feedback = (f"{format_bytes(plan.client_state_bytes)} per client (error-feedback residual)"
                if plan.client_state_bytes else "~0 per client")
    lines.append(f"algorithm:  {config.algorithm['name']}, payload <= {format_bytes(plan.payload_hint)} per client "
                 f"(payload_size_hint), client state {feedback}")
    lines.append(f"rounds:     {plan.start_round}..{config.rounds} ({rounds_left} to run), server.sample_fraction "
                 f"{config.server.sample_fraction}")
    lines.append("")
    if plan.placement == "dealt":
        how = ("dealt: each worker takes the next unclaimed selected client as it finishes (the method keeps "
               "no client state); a worker's samples and selected/round are its even share")
    else:
        how = plan.placement
    lines.append(f"placement:  {how}")
    lines.append(f"placement and estimates for --ranks {plan.ranks} (per round: logical bytes, as metrics.jsonl "
                 f"counts them; rank 0 folds every client's payload):")
    header = (f"{'rank':>4}  {'role':<13}  {'clients':<24}  {'samples':>8}  {'sel/round':>9}  {'client state':>12}  "
              f"{'checkpoint':>10}  {'down/round':>10}  {'up/round':>10}")
    lines.append(header)
    for p in plan.rank_plans:
        clients = "dealt" if plan.placement == "dealt" and p.rank > 0 else _format_clients(p.clients)
        lines.append(f"{p.rank:>4}  {p.role:<13}  {clients:<24}  {p.samples:>8}  "
                     f"{p.selected_per_round:>9.2f}  {format_bytes(p.client_state_bytes):>12}  "
                     f"{format_bytes(p.checkpoint_bytes):>10}  {format_bytes(p.downlink_bytes):>10}  "
                     f"{format_bytes(p.uplink_bytes):>10}")
    checkpoint_total = sum(p.checkpoint_bytes for p in plan.rank_plans)
    every = config.runtime.checkpoint_every
    when = f"every {every} rounds and at the end" if every else "at the end (and on SIGUSR1/SIGTERM)"
    lines.append(f"checkpoint: {format_bytes(checkpoint_total)} each, written {when}; the last 2 are kept")
    first = plan.rank_plans[0]
    lines.append(f"per round:  downlink {format_bytes(first.downlink_bytes)}, uplink <= "
                 f"{format_bytes(first.uplink_bytes)}; whole run: downlink "
                 f"{format_bytes(first.downlink_bytes * rounds_left)}, uplink <= "
                 f"{format_bytes(first.uplink_bytes * rounds_left)}")
    if plan.timing:
        from .metrics import format_duration

        t = plan.timing
        which = (f"{config.algorithm['name']}" if t["same_algorithm"] else
                 f"other algorithms: {', '.join(t['algorithms'])}")
        sizes = ", ".join(str(s) for s in t["world_sizes"])
        total = format_duration(t["median_seconds"] * rounds_left)
        lines.append(f"time:       median {t['median_seconds']:.2f} s per round over {t['rounds']} rounds of "
                     f"{len(t['runs'])} earlier run(s) of {config.model.name} at {h} px ({which}; world sizes "
                     f"{sizes}) -> ~{total} for {rounds_left} rounds")
    else:
        lines.append(f"time:       no earlier finished run of {config.model.name} at {h} px to estimate from")
    lines += [f"note:       {note}" for note in plan.notes]
    return "\n".join(lines)


def dry_run(config_path: str | None, overrides: list[str], ranks: int = 3, runs_dir: str = "runs",
            resume_dir: str | None = None) -> int:
    """``osfed-hpc run --dry-run``: print the resolved config and the plan; 0, or a UserError."""
    from .config import load_config

    config = load_config(config_path, overrides)
    plan = make_plan(config, ranks, runs_dir, Path(resume_dir) if resume_dir else None,
                     say=lambda text: print(text, file=sys.stderr, flush=True))
    print(render_plan(plan), flush=True)
    return 0
