"""Parameter sweeps: one YAML of axes -> one resolved, validated config per row.

A sweep file names a base config, overrides for every row, and axes whose cartesian product are
the rows (first axis slowest)::

    base: ../imagenet1k.yaml          # relative to the sweep file
    name: imagenet1k-table10
    out: runs/sweeps/imagenet1k-table10
    set: {rounds: 100}                # every row
    axes:
      - name: res                     # scalar axis: one dotted key, a list of values
        key: data.resolution
        values: [224, 336, 448]
        prefix: r                     # row names carry "r224"
      - name: method                  # labelled axis: label -> {dotted.key: value}
        values:
          fedavg: {algorithm: {name: fedavg}}
          osfed: {algorithm: {name: osfed, factor: 4}}

Keys are dotted paths and a value replaces the node it names, as ``key=value`` does on the
``osfed-hpc run`` command line (so ``algorithm: {...}`` swaps the whole algorithm section: an
algorithm's options belong to its name and must not leak into another's).

A union of small studies (the OS-Fed ablations: Fig. 10, Tables 8 and 9, ...) is one labelled axis
whose labels are the distinct settings, crossed with a seed axis, rather than a new "studies" format:
a setting that several studies share (the paper's default) then runs once, and ``osfed-hpc report``
places each run in every table it belongs to from its config, so no row has to say which study it
serves. See ``configs/sweeps/osfed_ablations.yaml``.

An optional ``quick`` section names a subset for CI and smoke tests (``osfed-hpc sweep --quick``)::

    quick:
      set: {rounds: 1, algorithm.outer_steps: 1}   # applied after ``set``, before the axes
      axes: {seed: [s0], setting: [f4-m1, sfc3]}   # labels kept per axis (others: all kept)

The quick subset is named ``<name>-quick`` and written to ``<out>-quick`` (unless ``--out`` is
given), so its finished 1-round rows are never mistaken for rows of the full sweep. Its ``set``
goes under the axes because an axis value such as ``algorithm: {name: fedavg}`` must still replace
the whole section (a quick ``algorithm.outer_steps`` must not leak into FedAvg).

Why rows are written out as full configs instead of being recomputed by each array task: the job
reads exactly the file that was validated before submission, the sweep folder documents what ran,
and a changed sweep file cannot silently change half of a running array (checkpoints would refuse it).

Layout of an expanded sweep folder::

    SWEEP/sweep.yaml        the sweep file as given
    SWEEP/rows/<i>.yaml     resolved config of row i (its ``out`` is SWEEP/runs/<row name>)
    SWEEP/rows.tsv          index, name, out, config, one column per axis (read by jobs/sweep.slurm)
    SWEEP/rows.json         the same, for tools (``osfed-hpc report SWEEP`` reads it)
    SWEEP/logs/             SLURM output of the array tasks

A sweep has at most ``MAX_ROWS`` (10,000) rows, counted from the axis lengths before anything is
expanded: every row is a validated config, a file and an array task, so 10^7 rows (seven axes of
ten values) would fill memory for hours before failing, and SLURM's MaxArraySize is usually
1001-40000 anyway. Split a larger study into several sweep files.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, config_from_dict, load_config, read_yaml_mapping

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
_SWEEP_KEYS = {"base", "name", "out", "set", "axes", "quick"}
_QUICK_KEYS = {"set", "axes"}
_AXIS_KEYS = {"name", "key", "values", "prefix"}
MAX_ROWS = 10_000  # rows per sweep; SLURM's MaxArraySize is usually 1001-40000


@dataclass
class Axis:
    """One dimension of the sweep: labels, each with the overrides it applies."""

    name: str
    labels: list[str]
    overrides: list[dict[str, Any]]


@dataclass
class Sweep:
    name: str
    base: Path | None
    out: Path
    common: dict[str, Any]
    axes: list[Axis]
    source: Path


@dataclass
class Row:
    index: int
    name: str
    labels: dict[str, str]
    overrides: dict[str, Any]
    config: dict[str, Any] = field(repr=False)

    @property
    def out(self) -> Path:
        return Path(self.config["out"])


# ---------------------------------------------------------------------------------------------
# reading and expanding


def _check_name(text: str, what: str) -> str:
    if not _NAME.match(text):
        raise ConfigError(f"{what} {text!r}: use letters, digits and . _ + = - only (it becomes a file name)")
    return text


def _label(value: Any) -> str:
    return "null" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))


def _parse_axis(raw: Any, position: int, source: Path) -> Axis:
    where = f"sweep {source}: axes[{position}]"
    if not isinstance(raw, dict) or "name" not in raw or "values" not in raw:
        raise ConfigError(f"{where} must be a mapping with 'name' and 'values'")
    unknown = set(raw) - _AXIS_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(_AXIS_KEYS)}")
    name = _check_name(str(raw["name"]), f"{where}: name")
    prefix = str(raw.get("prefix", ""))
    values = raw["values"]
    if "key" in raw:
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where} ({name}): with 'key', 'values' must be a non-empty list")
        labels = [prefix + _label(v) for v in values]
        overrides = [{str(raw["key"]): v} for v in values]
    else:
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{where} ({name}): without 'key', 'values' must map labels to {{dotted.key: value}}")
        labels, overrides = [], []
        for label, mapping in values.items():
            if not isinstance(mapping, dict):
                raise ConfigError(f"{where} ({name}): value of label {label!r} must be a mapping of dotted keys")
            labels.append(prefix + _label(label))
            overrides.append(dict(mapping))
    for label in labels:
        _check_name(label, f"{where} ({name}): label")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where} ({name}): labels repeat: {labels}")
    return Axis(name, labels, overrides)


def check_row_count(source: Path, lengths: list[tuple[str, int]]) -> int:
    """The number of rows (product of the axis lengths), or ``ConfigError`` above ``MAX_ROWS``.

    Counted, never enumerated, so an absurd sweep fails in microseconds with the numbers that
    explain it instead of growing memory while it expands.
    """
    count = math.prod(n for _, n in lengths)
    if count > MAX_ROWS:
        axes = " x ".join(f"{name} {n:,}" for name, n in lengths)
        raise ConfigError(
            f"sweep {source}: {count:,} rows ({axes}) is more than the limit of {MAX_ROWS:,} rows per sweep "
            "(SLURM's MaxArraySize is usually 1001-40000); split it into several sweep files or use fewer values"
        )
    return count


def _raw_axis_length(raw: Any, position: int) -> tuple[str, int]:
    """(name, number of values) of an unparsed axis; malformed axes count 1 and fail in parsing."""
    if not isinstance(raw, dict):
        return f"axes[{position}]", 1
    values = raw.get("values")
    return str(raw.get("name", f"axes[{position}]")), len(values) if isinstance(values, (list, dict)) else 1


def load_sweep(path: str | Path, out: str | Path | None = None, quick: bool = False) -> Sweep:
    """Parse and check a sweep file (rows are validated later, by :func:`expand`); ``quick``: its
    ``quick`` subset instead of the full sweep (see the module docstring)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file")
    unknown = set(raw) - _SWEEP_KEYS
    if unknown:
        raise ConfigError(f"sweep {path}: unknown keys {sorted(unknown)}; valid: {sorted(_SWEEP_KEYS)}")
    if quick:
        raw = _apply_quick(raw, path)
    name = _check_name(str(raw.get("name", path.stem)), f"sweep {path}: name")
    base = (path.parent / raw["base"]).resolve() if raw.get("base") else None
    if base is not None and not base.is_file():
        raise ConfigError(f"sweep {path}: base config {str(base)!r} does not exist")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"sweep {path}: 'set' must map dotted keys to values")
    axes_raw = raw.get("axes") or []
    if not isinstance(axes_raw, list) or not axes_raw:
        raise ConfigError(f"sweep {path}: 'axes' must be a non-empty list")
    check_row_count(path, [_raw_axis_length(a, i) for i, a in enumerate(axes_raw)])
    axes = [_parse_axis(a, i, path) for i, a in enumerate(axes_raw)]
    if len({a.name for a in axes}) != len(axes):
        raise ConfigError(f"sweep {path}: axis names repeat")
    folder = Path(out) if out is not None else Path(raw.get("out") or Path("runs") / "sweeps" / name)
    return Sweep(name, base, folder.resolve(), dict(common), axes, path)


def _apply_quick(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The sweep file's mapping with its ``quick`` subset applied: axes filtered, ``set`` extended,
    ``name`` and ``out`` suffixed with ``-quick``."""
    quick = raw.get("quick")
    if quick is None:
        raise ConfigError(f"sweep {path}: --quick needs a 'quick' section in the sweep file (it has none)")
    if not isinstance(quick, dict):
        raise ConfigError(f"sweep {path}: 'quick' must be a mapping with 'set' and/or 'axes'")
    unknown = set(quick) - _QUICK_KEYS
    if unknown:
        raise ConfigError(f"sweep {path}: quick: unknown keys {sorted(unknown)}; valid: {sorted(_QUICK_KEYS)}")
    extra, keep = quick.get("set") or {}, quick.get("axes") or {}
    if not isinstance(extra, dict) or not isinstance(keep, dict):
        raise ConfigError(f"sweep {path}: quick.set must map dotted keys to values, quick.axes axis names to labels")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"sweep {path}: 'set' must map dotted keys to values")
    axes = []
    for position, axis in enumerate(raw.get("axes") or []):
        name = axis.get("name") if isinstance(axis, dict) else None
        if name not in keep:
            axes.append(axis)
            continue
        parsed = _parse_axis(axis, position, path)
        prefix = str(axis.get("prefix", ""))
        wanted = keep[name] if isinstance(keep[name], list) else [keep[name]]
        # a label as printed (s0) or, on a prefixed axis, its value (0)
        wanted = [_label(w) if _label(w) in parsed.labels else prefix + _label(w) for w in wanted]
        missing = [w for w in wanted if w not in parsed.labels]
        if missing or not wanted:
            raise ConfigError(f"sweep {path}: quick.axes.{name}: labels {missing or wanted} are not labels of "
                              f"axis {name!r} ({parsed.labels})")
        values = {label: parsed.overrides[parsed.labels.index(label)] for label in wanted}
        axes.append({"name": parsed.name, "values": values})  # labels already carry the prefix
    stray = set(keep) - {a.get("name") for a in raw.get("axes") or [] if isinstance(a, dict)}
    if stray:
        raise ConfigError(f"sweep {path}: quick.axes names no axis {sorted(stray)}")
    name = str(raw.get("name", path.stem))
    out = raw.get("out") or Path("runs") / "sweeps" / name
    return {**raw, "name": f"{name}-quick", "out": f"{out}-quick", "set": {**common, **extra}, "axes": axes}


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = str(key).split(".")
    if not all(parts):
        raise ConfigError(f"sweep key {key!r} has an empty part")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"sweep key {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def expand(sweep: Sweep) -> list[Row]:
    """All rows, each a validated config dict with its own ``out`` and ``name``."""
    check_row_count(sweep.source, [(a.name, len(a.labels)) for a in sweep.axes])
    base: dict[str, Any] = {}
    if sweep.base is not None:
        base = read_yaml_mapping(sweep.base, "sweep base config")
    rows = []
    for index, choice in enumerate(itertools.product(*[range(len(a.labels)) for a in sweep.axes])):
        labels = {axis.name: axis.labels[i] for axis, i in zip(sweep.axes, choice)}
        overrides = dict(sweep.common)
        for axis, i in zip(sweep.axes, choice):
            overrides.update(axis.overrides[i])
        for reserved in ("out", "name"):
            if reserved in overrides:
                raise ConfigError(f"sweep {sweep.source}: {reserved!r} is set by the sweep for every row")
        row_name = "-".join(labels.values())
        raw = copy.deepcopy(base)
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        raw["name"] = f"{sweep.name}-{row_name}"
        raw["out"] = str(sweep.out / "runs" / row_name)
        if isinstance(raw.get("algorithm"), str):
            raw["algorithm"] = {"name": raw["algorithm"]}
        try:
            config = config_from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"sweep {sweep.source}, row {index} ({row_name}): {exc}") from None
        rows.append(Row(index, row_name, labels, overrides, config.to_dict()))
    return rows


# ---------------------------------------------------------------------------------------------
# writing


def write_rows(sweep: Sweep, rows: list[Row]) -> Path:
    """Write SWEEP/rows/<i>.yaml, rows.tsv and rows.json; re-read every config with load_config."""
    folder = sweep.out
    rows_dir = folder / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    for stale in rows_dir.glob("*.yaml"):  # a shorter re-expansion must not leave old rows behind
        stale.unlink()
    shutil.copyfile(sweep.source, folder / "sweep.yaml")
    index = []
    for row in rows:
        path = rows_dir / f"{row.index}.yaml"
        header = f"# row {row.index} of sweep {sweep.name} ({sweep.source}): {row.name}\n"
        path.write_text(header + yaml.safe_dump(row.config, sort_keys=False))
        load_config(path)  # what the job will read is what was validated
        index.append({"index": row.index, "name": row.name, "out": str(row.out), "config": str(path),
                      "labels": row.labels, "overrides": row.overrides})
    axes = [a.name for a in sweep.axes]
    lines = ["\t".join(["index", "name", "out", "config", *axes])]
    for entry in index:
        fields = [str(entry["index"]), entry["name"], entry["out"], entry["config"], *entry["labels"].values()]
        if any("\t" in f or "\n" in f for f in fields):
            raise ConfigError(f"sweep row {entry['name']}: tabs or newlines in paths are not supported")
        lines.append("\t".join(fields))
    (folder / "rows.tsv").write_text("\n".join(lines) + "\n")
    (folder / "rows.json").write_text(json.dumps({"sweep": sweep.name, "source": str(sweep.source),
                                                  "axes": axes, "rows": index}, indent=1, default=str) + "\n")
    return folder


def read_rows(folder: str | Path) -> list[dict[str, Any]]:
    """The row index of an expanded sweep folder (``rows.json``)."""
    return json.loads((Path(folder) / "rows.json").read_text())["rows"]


# ---------------------------------------------------------------------------------------------
# data: built-in sources and partitions, made once for all rows


def ensure_data(rows: list[Row], log=print) -> list[Path]:
    """Prepare built-in datasets and compute each distinct partition once, before any row runs.

    Rows share ``data.path``; the partition file name depends only on scheme/clients/alpha/seed, so
    18 rows over 3 client counts need 3 files. Making them here (instead of in the first array task
    that needs one) surfaces a bad alpha/min_samples before 18 jobs queue, and keeps array tasks
    from racing to create the same file. A dataset that is not reachable from here (prepared on
    another file system later) is left to the runs, which create a missing partition themselves.
    """
    from .data import DatasetReader, Partition, make_partition, prepare_dataset

    made: list[Path] = []
    done: set[tuple] = set()
    for row in rows:
        data = row.config["data"]
        path = Path(data["path"])
        if not (path / "dataset.json").exists():
            if data.get("source") and path not in done:
                log(f"preparing {data['source']} into {path}")
                prepare_dataset(data["source"], path, progress=False)
                done.add(path)
            elif not data.get("source"):
                if path not in done:
                    log(f"note: {path} holds no prepared dataset (yet); the runs will make their partitions")
                    done.add(path)
                continue
        if data.get("partition"):
            continue
        key = (str(path), data["scheme"], data["clients"], data["alpha"], data["partition_seed"], data["min_samples"])
        if key in done:
            continue
        done.add(key)
        target = Partition.default_path(path, data["scheme"], data["clients"], data["alpha"], data["partition_seed"])
        if target.exists():
            log(f"partition {target} exists (reused)")
        else:
            partition = make_partition(DatasetReader(path), data["clients"], data["scheme"], alpha=data["alpha"],
                                       seed=data["partition_seed"], min_samples=data["min_samples"])
            partition.save(target)
            log(f"wrote partition {target}")
        made.append(target)
    return made


# ---------------------------------------------------------------------------------------------
# running


def default_job_script() -> Path:
    """``jobs/sweep.slurm`` of the working directory if present, else of this source checkout."""
    local = Path("jobs") / "sweep.slurm"
    return local if local.is_file() else Path(__file__).resolve().parents[1] / "jobs" / "sweep.slurm"


def sbatch_command(name: str, folder: Path, count: int, script: Path, max_parallel: int | None = None,
                   extra: list[str] = ()) -> list[str]:
    """The array submission, as an argument list (values are never pasted into a shell string)."""
    array = f"0-{count - 1}" + (f"%{max_parallel}" if max_parallel else "")
    return ["sbatch", f"--array={array}", f"--job-name={name}", f"--output={folder / 'logs'}/%A_%a.out",
            *extra, str(script), str(folder)]


def job_environment(script: Path) -> dict[str, str]:
    """The array tasks source ``jobs/common.sh`` from OSFED_ROOT (default: the submit directory)."""
    env = dict(os.environ)
    root = script.resolve().parent.parent
    if not (Path.cwd() / "jobs" / "common.sh").is_file() and "OSFED_ROOT" not in env:
        env["OSFED_ROOT"] = str(root)
    return env


def submit(command: list[str], env: dict[str, str]) -> int:
    result = subprocess.run(command, env=env)
    return result.returncode


def find_mpirun() -> str:
    """mpirun next to this interpreter (a venv with the mpich wheel), else the one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if not found:
        raise ConfigError("--local needs mpirun (or mpiexec) on PATH or next to the Python interpreter")
    return found


def row_state(out: Path) -> str:
    """'finished' (summary.json), 'checkpoint' (resumable), or 'new'."""
    from .checkpoint import latest_checkpoint

    if (out / "summary.json").is_file():
        return "finished"
    return "checkpoint" if latest_checkpoint(out) else "new"


def local_command(row_config: Path, out: Path, np_: int, mpirun: str) -> list[str]:
    command = [mpirun, "-n", str(np_), sys.executable, "-m", "osfed_hpc", "run", str(row_config)]
    if row_state(out) == "checkpoint":
        command += ["--resume", str(out)]
    return command


def run_local(folder: Path, np_: int, mpirun: str | None = None, log=print, parallel: int = 1) -> int:
    """Run the rows on this machine, up to ``parallel`` at once (each its own ``mpirun -n np_``);
    finished rows are skipped, stopped ones resumed.

    Why several at once: a method with per-client state (OS-Fed's residuals) keeps each client on
    the rank that hosts it, so a round waits for the busier worker; on the ablation sweep the
    workers of ``--np 3`` were busy 70 % of the time. ``--np 2 --parallel 2`` (one worker per row, two
    rows at a time) keeps both cores busy instead, and gives the same results, because a run's
    results do not depend on its rank count. With ``parallel > 1`` a row's output goes to
    ``SWEEP/logs/local-<index>-<name>.log`` (appended on a rerun) and only its start and end are
    printed here. Ctrl-C stops the rows that are running.
    """
    mpirun = mpirun or find_mpirun()
    pending = []
    for entry in read_rows(folder):
        if row_state(Path(entry["out"])) == "finished":
            log(f"[sweep] row {entry['index']} {entry['name']}: finished already")
        else:
            pending.append(entry)
    running: list[tuple[dict, subprocess.Popen, Any]] = []
    failed = []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                entry = pending.pop(0)
                command = local_command(Path(entry["config"]), Path(entry["out"]), np_, mpirun)
                log(f"[sweep] row {entry['index']} {entry['name']}: {shlex.join(command)}")
                handle = None
                if parallel > 1:
                    path = folder / "logs" / f"local-{entry['index']}-{entry['name']}.log"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handle = open(path, "ab")  # noqa: SIM115 - closed when the row ends
                    log(f"[sweep] row {entry['index']} {entry['name']}: output in {path}")
                running.append((entry, subprocess.Popen(command, stdout=handle, stderr=handle), handle))
            done = _wait_any([process for _, process, _ in running])
            entry, process, handle = running.pop(done)
            if handle is not None:
                handle.close()
            if process.returncode != 0:
                log(f"[sweep] row {entry['index']} {entry['name']}: exit {process.returncode}")
                failed.append(entry["name"])
            elif parallel > 1:
                log(f"[sweep] row {entry['index']} {entry['name']}: finished")
    finally:
        for _, process, handle in running:  # only after an exception (Ctrl-C): stop what still runs
            process.terminate()
            process.wait()
            if handle is not None:
                handle.close()
    if failed:
        log(f"[sweep] {len(failed)} row(s) failed: {', '.join(failed)}")
        return 1
    return 0


def _wait_any(processes: list[subprocess.Popen], interval: float = 0.5) -> int:
    """Index of the first of ``processes`` to end (rows take minutes, so polling twice a second is free)."""
    while True:
        for index, process in enumerate(processes):
            if process.poll() is not None:
                return index
        time.sleep(interval)
