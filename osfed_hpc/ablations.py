"""The OS-Fed appendix ablations as tables, in the paper's layouts, from finished runs.

``osfed-hpc report`` prints these after its comparison (``configs/sweeps/osfed_ablations.yaml`` makes
the runs). Each run is placed by its ``config.yaml``, not by sweep labels, so one run of the paper's
default (factor 4, one fp32 snapshot, bilinear) serves every table it belongs to, and runs of other
sweeps or made by hand land in the right cell too. A table appears when its distinguishing runs exist:

* Fig. 10 (D.4): accuracy vs number of snapshots M, uniform bilinear fp32, one column pair per factor
  that has at least two values of M (a curve needs two points);
* Table 8 (D.1): rows M, columns "Uniform (factor 4)" and one "Multi-scale" per finest factor; factor 4
  is the paper's default ("Uniform (default)") and the coarse cells of the default multi-scale layout;
  printed when a multi-scale run exists;
* Table 9 (D.2): one row, columns "Factor F Upsample | Factor F FSRCNN" for each factor F with an
  FSRCNN run (M = 1, fp32);
* D.5: snapshot formats (fp32 / PNG / JPEG) at the factors that have a PNG or JPEG run, every M,
  sorted by uplink bytes so equal budgets sit next to each other; printed when a PNG/JPEG run exists;
* 3SFC vs OS-Fed: one fp32 snapshot each (the same snapshot bytes), factor 1 (3SFC) and every OS-Fed
  factor; printed when a 3SFC run exists.

Runs are first grouped into *contexts*: everything in the config except the seed, name, out, runtime,
eval and the ablation knobs (``KNOBS``, ``KNOB_PREFIXES``) must agree, so runs that differ in rounds,
clients, resolution or learning rate never share a table (one section per context, headed by what
differs). Within a context a cell holds the runs of one variant, one per seed (a repeated seed: the
run given last wins, with a warning). Cells show the mean ± the *sample* standard deviation (n - 1) of
the final test accuracy over seeds and n; the CSV adds min and max. Nothing here needs torch or MPI.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: algorithms the ablations are about (3SFC is OS-Fed at factor 1)
SNAPSHOT_METHODS = ("osfed", "sfc3")
#: algorithm options that make the variant (each ablation varies some of them)
KNOBS = ("name", "factor", "num_snapshots", "multigrid", "multiscale_leaves", "upsampler", "codec", "jpeg_quality")
#: option families that only matter with one knob value (FSRCNN sizes and training, ...): they name
#: the variant's upsampler, so they do not split contexts
KNOB_PREFIXES = ("fsrcnn_",)
#: top-level config sections that do not change what a run measures (or that the seed axis varies)
IGNORED = ("seed", "name", "out", "runtime", "eval")
#: Table 8's "Uniform (default)" column: the paper's default factor
UNIFORM_FACTOR = 4
CSV_COLUMNS = ("context", "method", "factor", "snapshots", "multigrid", "upsampler", "codec", "n", "seeds",
               "accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max", "uplink_bytes_per_client_round",
               "runs")
SPREAD_NOTE = ("Cells: final test accuracy (%), mean ± sample standard deviation (n - 1) over seeds, n = seeds; "
               "bytes: mean uplink bytes per client and round.")


@dataclass(frozen=True, order=True)
class Variant:
    """What an ablation varies; the rest of the config is the context."""

    method: str  # "osfed" or "3sfc"
    factor: int
    snapshots: int
    multigrid: str  # "uniform", "multiscale" or "multiscale (custom)"
    upsampler: str  # "bilinear" or "fsrcnn (<mode>)"
    codec: str  # "fp32", "png" or "jpeg q<quality>"

    @property
    def baseline(self) -> bool:
        """Uniform, bilinear and fp32: the paper's default decoder and format."""
        return self.multigrid == "uniform" and self.upsampler == "bilinear" and self.codec == "fp32"


@dataclass
class Stat:
    """Mean, sample standard deviation (None below two values), n, min and max."""

    mean: float
    std: float | None
    n: int
    low: float
    high: float


@dataclass
class Cell:
    runs: dict[Any, dict[str, Any]] = field(default_factory=dict)  # seed -> run

    def accuracy(self) -> Stat | None:
        return spread([100.0 * r["final_accuracy"] for r in self.runs.values() if _finite(r.get("final_accuracy"))])

    def uplink(self) -> float | None:
        values = [r["uplink_bytes_per_client_round"] for r in self.runs.values()
                  if _finite(r.get("uplink_bytes_per_client_round"))]
        return sum(values) / len(values) if values else None


@dataclass
class Context:
    key: str
    flat: dict[str, Any]  # the context's config, flattened (dotted keys)
    summary: dict[str, Any]  # one run's summary, for the heading
    cells: dict[Variant, Cell] = field(default_factory=dict)
    fedavg: Cell | None = None


def spread(values: list[float]) -> Stat | None:
    """Mean and sample standard deviation (divisor n - 1; None for one value), None for no values."""
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n, min(values), max(values))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# placing runs


def run_config(run: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved config a run wrote (``RUN/config.yaml``), or None without one."""
    path = Path(run.get("run_dir") or "") / "config.yaml"
    if not run.get("run_dir") or not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def variant_of(algorithm: dict[str, Any]) -> Variant | None:
    """The ablation variant of a snapshot method's algorithm section; None for other methods."""
    name = algorithm.get("name")
    if name not in SNAPSHOT_METHODS:
        return None
    factor = int(algorithm.get("factor") or 1)
    multigrid = str(algorithm.get("multigrid", "uniform"))
    if multigrid == "multiscale" and algorithm.get("multiscale_leaves") is not None:
        multigrid = "multiscale (custom)"
    upsampler = str(algorithm.get("upsampler", "bilinear"))
    if upsampler == "fsrcnn":
        upsampler = f"fsrcnn ({algorithm.get('fsrcnn_mode', 'server')})"
    codec = str(algorithm.get("codec", "none"))
    codec = {"none": "fp32"}.get(codec, f"jpeg q{algorithm.get('jpeg_quality', 90)}" if codec == "jpeg" else codec)
    method = "3sfc" if name == "sfc3" or factor == 1 else "osfed"
    return Variant(method, factor, int(algorithm.get("num_snapshots", 1)), multigrid, upsampler, codec)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def context_of(config: dict[str, Any]) -> dict[str, Any]:
    """The config without what the seeds and the ablations vary (flattened, dotted keys)."""
    kept = {k: v for k, v in config.items() if k not in IGNORED and k != "algorithm"}
    algorithm = {k: v for k, v in (config.get("algorithm") or {}).items()
                 if k not in KNOBS and not k.startswith(KNOB_PREFIXES)}
    if (config.get("algorithm") or {}).get("name") in SNAPSHOT_METHODS:
        kept["algorithm"] = algorithm  # FedAvg's context is the data, model and training alone
    return _flatten(kept)


def build_contexts(runs: list[dict[str, Any]], warn: Callable[[str], None] | None = None) -> list[Context]:
    """The snapshot runs grouped by context and variant, with each context's FedAvg runs.

    FedAvg runs join the contexts whose non-algorithm part they share (a FedAvg run has no snapshot
    options), so one set of FedAvg seeds is the reference of every context of the same setting.
    """
    warn = warn or (lambda text: print(text, file=sys.stderr))
    contexts: dict[str, Context] = {}
    fedavg: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for run in runs:
        config = run_config(run)
        if config is None:
            continue
        algorithm = config.get("algorithm") or {}
        if algorithm.get("name") == "fedavg":
            fedavg.append((run, config))
            continue
        variant = variant_of(algorithm)
        if variant is None:
            continue
        flat = context_of(config)
        key = json.dumps(flat, sort_keys=True, default=str)
        context = contexts.setdefault(key, Context(key, flat, run))
        _add(context.cells.setdefault(variant, Cell()), run, config, warn)
    for run, config in fedavg:
        data = context_of(config)
        for context in contexts.values():
            if {k: v for k, v in context.flat.items() if not k.startswith("algorithm.")} == data:
                context.fedavg = context.fedavg or Cell()
                _add(context.fedavg, run, config, warn)
    return list(contexts.values())


def _add(cell: Cell, run: dict[str, Any], config: dict[str, Any], warn: Callable[[str], None]) -> None:
    seed = config.get("seed")
    if seed in cell.runs:
        warn(f"[report] ablations: {cell.runs[seed]['run']} and {run['run']} are the same setting and seed "
             f"{seed}; using {run['run']}")
    cell.runs[seed] = run


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_stat(stat: Stat | None) -> str:
    """``93.12 ± 0.41 (n=3)``; one seed: ``93.12 (n=1)``; no run: ``-``."""
    if stat is None:
        return "-"
    spread_text = "" if stat.std is None else f" ± {stat.std:.2f}"
    return f"{stat.mean:.2f}{spread_text} (n={stat.n})"


def fmt_bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _cell_text(cell: Cell | None) -> str:
    """Accuracy and bytes in one cell, for the two-dimensional layouts (Tables 8 and 9)."""
    if cell is None:
        return "-"
    return f"{fmt_stat(cell.accuracy())} · {fmt_bytes(cell.uplink())} B"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _snapshots(m: int) -> str:
    return f"{m} snapshot" + ("" if m == 1 else "s")


def _format_name(variant: Variant) -> str:
    return {"fp32": "fp32", "png": "PNG (8-bit)"}.get(variant.codec, variant.codec.replace("jpeg", "JPEG (8-bit)"))


# ---------------------------------------------------------------------------------------------
# the tables (each returns None when its distinguishing runs are missing)


def fig10(context: Context) -> str | None:
    by_factor: dict[int, dict[int, Cell]] = {}
    for v, cell in context.cells.items():
        if v.method == "osfed" and v.baseline:
            by_factor.setdefault(v.factor, {})[v.snapshots] = cell
    factors = sorted(f for f, cells in by_factor.items() if len(cells) >= 2)
    if not factors:
        return None
    counts = sorted({m for f in factors for m in by_factor[f]})
    header = ["snapshots per client"]
    for f in factors:
        header += [f"factor {f}: accuracy (%)", f"factor {f}: uplink B/client-round"]
    rows = []
    for m in counts:
        row = [str(m)]
        for f in factors:
            cell = by_factor[f].get(m)
            row += [fmt_stat(cell.accuracy() if cell else None), fmt_bytes(cell.uplink() if cell else None)]
        rows.append(row)
    return ("### Fig. 10 (D.4): accuracy vs number of snapshots per client\n\n"
            "Uniform multi-grid, bilinear, fp32 snapshots; the paper: accuracy rises steadily from 1 to 8.\n\n"
            + _table(header, rows))


def table8(context: Context) -> str | None:
    multiscale = {v: c for v, c in context.cells.items()
                  if v.method == "osfed" and v.multigrid.startswith("multiscale") and v.upsampler == "bilinear"
                  and v.codec == "fp32"}
    if not multiscale:
        return None
    columns = sorted({(v.multigrid, v.factor) for v in multiscale})
    counts = sorted({v.snapshots for v in multiscale})
    header = ["#snapshots", f"Uniform (factor {UNIFORM_FACTOR})",
              *[f"Multi-scale{' (custom)' if g.endswith('(custom)') else ''} (finest factor {f})" for g, f in columns]]
    rows = []
    for m in counts:
        uniform = context.cells.get(Variant("osfed", UNIFORM_FACTOR, m, "uniform", "bilinear", "fp32"))
        rows.append([_snapshots(m), _cell_text(uniform),
                     *[_cell_text(multiscale.get(Variant("osfed", f, m, g, "bilinear", "fp32"))) for g, f in columns]])
    return ("### Table 8 (D.1): uniform vs multi-scale multi-grid\n\n"
            "Bilinear, fp32; cells: accuracy · uplink bytes per client-round. The paper: multi-scale wins with "
            "1 snapshot (+1.7 / +1.3), loses slightly with 8 (-0.7 / -0.7).\n\n" + _table(header, rows))


def table9(context: Context) -> str | None:
    learned = {v: c for v, c in context.cells.items()
               if v.method == "osfed" and v.upsampler.startswith("fsrcnn") and v.multigrid == "uniform"
               and v.codec == "fp32" and v.snapshots == 1}
    if not learned:
        return None
    columns: list[tuple[str, Variant]] = []
    for factor in sorted({v.factor for v in learned}):
        columns.append((f"Factor {factor} Upsample", Variant("osfed", factor, 1, "uniform", "bilinear", "fp32")))
        for v in sorted(v for v in learned if v.factor == factor):
            mode = v.upsampler[len("fsrcnn"):].strip()
            columns.append((f"Factor {factor} FSRCNN {mode}".rstrip(), v))
    summary = context.summary
    label = f"{summary.get('model', '?')}, {summary.get('resolution', '?')} px"
    row = [label, *[_cell_text(context.cells.get(v)) for _, v in columns]]
    return ("### Table 9 (D.2): bilinear vs learnable (FSRCNN) multi-grid\n\n"
            "One fp32 snapshot, uniform multi-grid; cells: accuracy · uplink bytes per client-round (FSRCNN "
            "weights included when the clients send them). The paper: little gain at factor 4, a large one at 8.\n\n"
            + _table(["model", *[name for name, _ in columns]], [row]))


def d5(context: Context) -> str | None:
    coded = [v for v in context.cells if v.method == "osfed" and v.codec != "fp32"]
    if not coded:
        return None
    factors = {v.factor for v in coded}
    chosen = [(v, c) for v, c in context.cells.items()
              if v.method == "osfed" and v.factor in factors and v.multigrid == "uniform" and v.upsampler == "bilinear"]
    chosen.sort(key=lambda vc: (vc[0].factor, vc[1].uplink() if vc[1].uplink() is not None else math.inf, vc[0]))
    rows = []
    for v, cell in chosen:
        reference = context.cells.get(Variant("osfed", v.factor, 1, "uniform", "bilinear", "fp32"))
        ratio = cell.uplink() / reference.uplink() if reference and reference.uplink() and cell.uplink() else None
        rows.append([_format_name(v), str(v.snapshots), str(v.factor), fmt_stat(cell.accuracy()),
                     fmt_bytes(cell.uplink()), "-" if ratio is None else f"{ratio:.2f}"])
    return ("### D.5: fp32 vs PNG vs JPEG snapshots at equal uplink bytes\n\n"
            "Uniform multi-grid, bilinear, sorted by bytes; an 8-bit snapshot is a quarter of an fp32 one, "
            "so 4 PNG snapshots cost about one fp32 snapshot plus 3 more sets of labels. The paper: 4 PNG "
            "snapshots beat 1 fp32 snapshot at that budget.\n\n"
            + _table(["snapshot format", "snapshots", "factor", "accuracy (%)", "uplink B/client-round",
                      "bytes / (1 fp32 snapshot)"], rows))


def sfc3_vs_osfed(context: Context) -> str | None:
    if not any(v.method == "3sfc" for v in context.cells):
        return None
    chosen = sorted((v, c) for v, c in context.cells.items() if v.baseline and v.snapshots == 1)
    rows = [["3SFC" if v.method == "3sfc" else "OS-Fed", str(v.factor), str(v.factor ** 2),
             fmt_stat(c.accuracy()), fmt_bytes(c.uplink())] for v, c in chosen]
    return ("### 3SFC vs OS-Fed at equal bytes\n\n"
            "One fp32 snapshot per client and round (the same snapshot bytes; OS-Fed sends one label vector per "
            "decoded sample). 3SFC is OS-Fed without the multi-grid (factor 1).\n\n"
            + _table(["method", "factor", "decoded samples / snapshot", "accuracy (%)", "uplink B/client-round"],
                     rows))


TABLES = (fig10, table8, table9, d5, sfc3_vs_osfed)


# ---------------------------------------------------------------------------------------------
# the section


def describe(context: Context, others: list[Context]) -> str:
    """One line: model, resolution, clients, rounds; plus every config key that differs between contexts."""
    s, flat = context.summary, context.flat
    text = (f"{s.get('model', '?')}, {s.get('resolution', '?')} px, {s.get('num_clients', '?')} clients "
            f"({flat.get('data.scheme', '?')}, alpha {flat.get('data.alpha', '?')}), {s.get('rounds', '?')} rounds, "
            f"data {flat.get('data.path', '?')}")
    if len(others) > 1:
        keys = sorted({k for c in others for k in c.flat})
        differs = [k for k in keys if len({json.dumps(c.flat.get(k), default=str) for c in others}) > 1]
        if differs:
            text += "; " + ", ".join(f"{k}={flat.get(k)}" for k in differs)
    return text


def ablation_markdown(contexts: list[Context]) -> str:
    """The ablation tables of every context that has one; empty text when none has."""
    sections = []
    for context in contexts:
        tables = [t for t in (table(context) for table in TABLES) if t]
        if not tables:
            continue
        reference = context.fedavg
        line = ("FedAvg reference: no FedAvg run of the same setting." if reference is None else
                f"FedAvg reference (same data, model, training, rounds): {fmt_stat(reference.accuracy())} "
                f"at {fmt_bytes(reference.uplink())} B/client-round.")
        sections.append("\n\n".join([f"Setting: {describe(context, contexts)}.", line, *tables]))
    if not sections:
        return ""
    return "\n\n".join(["## OS-Fed ablations", SPREAD_NOTE, *sections])


def ablation_rows(contexts: list[Context]) -> list[dict[str, Any]]:
    """One CSV record per cell (every variant of every context, FedAvg included)."""
    rows = []
    for index, context in enumerate(contexts):
        cells = sorted(context.cells.items())
        if context.fedavg is not None:
            cells.append((None, context.fedavg))
        for variant, cell in cells:
            stat = cell.accuracy()
            rows.append({
                "context": index, "method": variant.method if variant else "fedavg",
                "factor": variant.factor if variant else None, "snapshots": variant.snapshots if variant else None,
                "multigrid": variant.multigrid if variant else None, "upsampler": variant.upsampler if variant else None,
                "codec": variant.codec if variant else None, "n": stat.n if stat else 0,
                "seeds": " ".join(str(s) for s in cell.runs), "accuracy_mean": stat.mean if stat else None,
                "accuracy_std": stat.std if stat else None, "accuracy_min": stat.low if stat else None,
                "accuracy_max": stat.high if stat else None, "uplink_bytes_per_client_round": cell.uplink(),
                "runs": " ".join(r["run"] for r in cell.runs.values()),
            })
    return rows


def ablation_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
