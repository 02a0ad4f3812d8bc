"""Merge finished runs into tables and plots: the side-by-side comparison the demo prints, the
Table-10 layout of the OS-Fed paper, CSV for sheets, and PNG curves.

Reads only ``summary.json``, ``metrics.jsonl`` and (for the ablations) ``config.yaml`` of each run directory (a sweep folder stands for
its rows), so a report can be made anywhere the run directories are readable, without MPI or torch.

Table 10 (ImageNet-1K, Dirichlet 0.01) has one row per resolution, one column per client count with
``FedAvg / OS-Fed`` top-1 accuracy, and OS-Fed's per-client memory and wall time. Those two come from
the per-client records of every round (``client_stats``): memory is the largest peak over clients,
rounds and client counts, because a GPU must hold the worst case; time is the mean over clients and
rounds of one client's update, because that is what a client pays per round on average. Table 10 is
only printed when some run has a resolution of at least 64 px (``TABLE10_MIN_RESOLUTION``): the table is
about ImageNet-scale inputs, and an MNIST or digits comparison would get a meaningless block of 28² rows.

The OS-Fed appendix ablations (Fig. 10, Tables 8 and 9, D.5, 3SFC vs OS-Fed) are laid out by
``osfed_hpc.ablations`` from each run's ``config.yaml``, with mean ± sample std over seeds.

Bytes to target answers "what does it cost to get good enough": the target accuracy is 90 % of the best
FedAvg run's final accuracy among the reported runs (or ``--target``), and for every run the report gives
the first evaluated round that reaches it and the cumulative uplink (and uplink + downlink) bytes spent
by then. Rounds without ``test_accuracy`` are skipped, so runs evaluated every k rounds, or one-shot
methods evaluated once, are compared on what was measured; a run whose records lack the downlink fields
(older runs) gets no uplink + downlink figures instead of an error.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import ablations
from .errors import RunError

COLUMNS = ("run", "algorithm", "model", "clients", "resolution", "rounds", "final_accuracy",
           "uplink_bytes_per_client_round", "uplink_bytes", "uplink_ratio_vs_fedavg", "gap_to_fedavg_points",
           "wall_seconds", "server_phase_seconds", "world_size")
#: the per-run CSV: the comparison columns plus the per-client cost from metrics.jsonl
RUN_COLUMNS = COLUMNS + ("client_seconds_mean", "client_peak_memory_bytes", "server_phase_peak_memory_bytes", "run_dir")
TABLE10_COLUMNS = ("resolution", "clients", "fedavg_top1", "osfed_top1", "osfed_client_seconds_mean",
                   "osfed_client_peak_memory_bytes", "fedavg_run", "osfed_run")
#: algorithm names of the two Table-10 columns
FEDAVG, OSFED = "fedavg", "osfed"
#: Table 10 is about ImageNet-scale inputs; below this side (px) no run belongs in it
TABLE10_MIN_RESOLUTION = 64
BYTES_TO_TARGET_COLUMNS = ("run", "algorithm", "reached", "rounds_to_target", "accuracy_at_target",
                           "uplink_bytes_at_target", "total_bytes_at_target", "final_accuracy", "uplink_bytes",
                           "total_bytes", "target_accuracy", "run_dir")
#: the default target is this fraction of the best FedAvg final accuracy
DEFAULT_TARGET_FRACTION = 0.9
#: accuracies are ratios of counts, targets products of floats: 0.9 * 0.8 is 0.7200000000000001, and
#: an accuracy of exactly 0.72 must count as reaching it; 1e-9 is far below one test sample
_ACCURACY_TOLERANCE = 1e-9


# ---------------------------------------------------------------------------------------------
# loading


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: no summary.json (the run has not finished)")
    summary = json.loads(path.read_text())
    summary["run"] = Path(run_dir).name
    return summary


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The round records of ``metrics.jsonl`` (empty when the file is missing); a torn last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "phase_epoch" not in record:  # server-phase lines are summarised in the round's own line
            records.append(record)
    return records


def client_cost(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean seconds of one client's update and the largest peak memory, over clients and rounds."""
    seconds: list[float] = []
    peaks: list[float] = []
    for record in records:
        stats = record.get("client_stats") or {}
        seconds += [float(s) for s in stats.get("seconds", []) if _finite(s)]
        peaks += [float(p) for p in stats.get("peak_memory_bytes", []) if _finite(p)]
    return {"client_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
            "client_peak_memory_bytes": max(peaks) if peaks else None}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def expand_run_dirs(paths: list[str | Path], warn=None) -> list[Path]:
    """Run directories as given; a sweep folder (with ``rows.json``) stands for its finished rows."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    runs: list[Path] = []
    for path in map(Path, paths):
        index = path / "rows.json"
        if index.is_file() and not (path / "summary.json").is_file():
            rows = json.loads(index.read_text())["rows"]
            finished = [Path(r["out"]) for r in rows if (Path(r["out"]) / "summary.json").is_file()]
            if len(finished) < len(rows):
                warn(f"[report] {path}: {len(rows) - len(finished)} of {len(rows)} rows have not finished; "
                     f"reporting {len(finished)}")
            runs += finished
        else:
            runs.append(path)
    return runs


def load_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Summaries with ``run_dir``, the round records (``_records``) and the client cost added."""
    runs = []
    for run_dir in run_dirs:
        summary = load_summary(run_dir)
        records = load_metrics(run_dir)
        summary["run_dir"] = str(run_dir)
        summary["_records"] = records
        summary.update(client_cost(records))
        runs.append(summary)
    names = [r["run"] for r in runs]
    for r in runs:  # sweep rows of two sweeps may share names: label them by their parent too
        if names.count(r["run"]) > 1:
            r["run"] = f"{Path(r['run_dir']).parent.name}/{r['run']}"
    return runs


# ---------------------------------------------------------------------------------------------
# the comparison table (one row per run)


def compare(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the uplink ratio and accuracy gap to the FedAvg run with the same clients/resolution."""
    baselines = {(s.get("num_clients"), s.get("resolution")): s for s in summaries if s["algorithm"] == "fedavg"}
    rows = []
    for s in summaries:
        base = baselines.get((s.get("num_clients"), s.get("resolution")))
        row = {key: s.get(key) for key in RUN_COLUMNS}
        row["clients"] = s.get("num_clients")
        if base and s.get("uplink_bytes_per_client_round"):
            row["uplink_ratio_vs_fedavg"] = base["uplink_bytes_per_client_round"] / s["uplink_bytes_per_client_round"]
            if s.get("final_accuracy") is not None and base.get("final_accuracy") is not None:
                row["gap_to_fedavg_points"] = 100 * (base["final_accuracy"] - s["final_accuracy"])
        rows.append(row)
    return rows


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "final_accuracy":
        return f"{100 * value:.2f}%"
    if key in ("uplink_bytes_per_client_round", "uplink_bytes", "uplink_bytes_at_target", "total_bytes_at_target",
               "total_bytes"):
        return f"{value:,.0f}"
    if key in ("accuracy_at_target", "target_accuracy"):
        return f"{100 * value:.2f}%"
    if key == "uplink_ratio_vs_fedavg":
        return f"{value:.1f}x"
    if key in ("gap_to_fedavg_points", "wall_seconds", "client_seconds_mean", "server_phase_seconds"):
        return f"{value:.2f}"
    if key in ("client_peak_memory_bytes", "server_phase_peak_memory_bytes"):
        return f"{value / 1e9:.2f} GB"
    return str(value)


def markdown(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(k, row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Table 10: rows = resolution, columns = clients, cells = FedAvg / OS-Fed


def wants_table10(runs: list[dict[str, Any]]) -> bool:
    """Whether Table 10 belongs in this report: some run has a resolution >= ``TABLE10_MIN_RESOLUTION``.

    The summary records the resolution but not a dataset family, so the resolution is the honest signal:
    ImageNet-layout runs are 64 px and up, MNIST / digits runs are 8-28 px and get no Table 10.
    """
    return any(isinstance(r.get("resolution"), (int, float)) and r["resolution"] >= TABLE10_MIN_RESOLUTION
               for r in runs)


def table10_cells(runs: list[dict[str, Any]], warn=None) -> list[dict[str, Any]]:
    """One record per (resolution, clients) that has a FedAvg or an OS-Fed run.

    When the same cell has several runs of a method, the one given last wins (and a warning says so).
    """
    warn = warn or (lambda text: print(text, file=sys.stderr))
    by_cell: dict[tuple[int, int], dict[str, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        if run.get("algorithm") not in (FEDAVG, OSFED):
            continue
        key = (run.get("resolution"), run.get("num_clients"))
        if run["algorithm"] in by_cell[key]:
            warn(f"[report] two {run['algorithm']} runs at {key[0]} px, {key[1]} clients: "
                 f"using {run['run']}, not {by_cell[key][run['algorithm']]['run']}")
        by_cell[key][run["algorithm"]] = run
    cells = []
    for (resolution, clients), methods in sorted(by_cell.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0)):
        fedavg, osfed = methods.get(FEDAVG), methods.get(OSFED)
        cells.append({
            "resolution": resolution, "clients": clients,
            "fedavg_top1": _percent(fedavg), "osfed_top1": _percent(osfed),
            "osfed_client_seconds_mean": osfed.get("client_seconds_mean") if osfed else None,
            "osfed_client_peak_memory_bytes": osfed.get("client_peak_memory_bytes") if osfed else None,
            "fedavg_run": fedavg["run"] if fedavg else None, "osfed_run": osfed["run"] if osfed else None,
            "_osfed_records": osfed.get("_records", []) if osfed else [],
        })
    return cells


def _percent(run: dict[str, Any] | None) -> float | None:
    if run is None or run.get("final_accuracy") is None:
        return None
    return 100.0 * run["final_accuracy"]


def table10_markdown(cells: list[dict[str, Any]]) -> str:
    """Rows: resolution; columns: clients (``FedAvg / OS-Fed`` top-1 %), OS-Fed memory, OS-Fed seconds.

    Memory and time are per resolution, pooled over the client counts of that row: the largest peak
    and the mean over every OS-Fed client update at that resolution.
    """
    clients = sorted({c["clients"] for c in cells if c["clients"] is not None})
    resolutions = sorted({c["resolution"] for c in cells if c["resolution"] is not None})
    lookup = {(c["resolution"], c["clients"]): c for c in cells}
    header = ["resolution", *[f"{n} clients" for n in clients], "OS-Fed memory / client", "OS-Fed time / client"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for res in resolutions:
        row_cells = [lookup.get((res, n)) for n in clients]
        pairs = [f"{_pct(c and c['fedavg_top1'])} / {_pct(c and c['osfed_top1'])}" for c in row_cells]
        cost = client_cost([r for c in row_cells if c for r in c["_osfed_records"]])
        memory = cost["client_peak_memory_bytes"]
        seconds = cost["client_seconds_mean"]
        lines.append("| " + " | ".join([f"{res}²", *pairs, "-" if memory is None else f"{memory / 1e9:.2f} GB",
                                        "-" if seconds is None else f"{seconds:.2f} s"]) + " |")
    lines.append("")
    lines.append("Top-1 accuracy (%) after the last round, FedAvg / OS-Fed; memory: largest per-client peak "
                 "(GPU: torch max allocated; CPU: process peak RSS); time: mean seconds of one client update.")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ---------------------------------------------------------------------------------------------
# bytes to target: the first evaluated round that reaches a target accuracy, and the bytes spent by then


def parse_target(value: str | float) -> float:
    """A target accuracy as a fraction in (0, 1].

    Values up to 1 are fractions (0.85), larger ones percentages (85 means 0.85), so both ways people
    write accuracies work; 1 therefore means 100 %. A trailing ``%`` always means a percentage
    (``0.5%`` is 0.005). Zero, negative, above 100 % and non-numbers are refused: no run can reach
    them, and a silent empty column would look like a result.
    """
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = float(text[:-1] if percent else text)
    except ValueError:
        raise RunError(f"--target {value!r}: not a number (give 0.85 or 85 for 85 %)") from None
    if not math.isfinite(number) or number <= 0 or number > 100:
        raise RunError(f"--target {value!r}: must be above 0 and at most 100 (a fraction up to 1, or a percentage)")
    return number / 100 if percent or number > 1 else number


def best_fedavg(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The FedAvg run with the highest final accuracy (the first given wins a tie); None without one."""
    fedavg = [r for r in runs if r.get("algorithm") == FEDAVG and _finite(r.get("final_accuracy"))]
    return max(fedavg, key=lambda r: r["final_accuracy"], default=None)


def choose_target(runs: list[dict[str, Any]], override: str | float | None = None) -> tuple[float | None, str]:
    """The target accuracy and one sentence saying where it comes from (or why there is none).

    The default is relative to FedAvg because "as good as FedAvg, nearly" is the bar a compressed or
    one-shot method has to clear, and an absolute number would mean something different per dataset.
    """
    if override is not None:
        target = parse_target(override)
        return target, f"Bytes to target {100 * target:.2f}% test accuracy (--target)."
    base = best_fedavg(runs)
    if base is None:
        return None, ("Bytes to target: skipped, no FedAvg run with a final accuracy to take "
                      f"{100 * DEFAULT_TARGET_FRACTION:.0f}% of; give --target.")
    target = DEFAULT_TARGET_FRACTION * base["final_accuracy"]
    return target, (f"Bytes to target {100 * target:.2f}% test accuracy = {100 * DEFAULT_TARGET_FRACTION:.0f}% of "
                    f"the best FedAvg final accuracy ({100 * base['final_accuracy']:.2f}%, {base['run']}).")


def cumulative_bytes(records: list[dict[str, Any]], direction: str) -> list[float | None]:
    """Cumulative ``direction`` ("uplink" / "downlink") bytes after each record, None where unknown.

    The runner writes ``<direction>_bytes_total``; where a record lacks it the running sum of the
    per-round ``<direction>_bytes`` is used, and where both are missing (older runs had no downlink
    fields) the value is None from there on rather than a guess.
    """
    series: list[float | None] = []
    running: float | None = 0
    for record in records:
        total, per_round = record.get(f"{direction}_bytes_total"), record.get(f"{direction}_bytes")
        if _finite(total):
            running = total  # ints stay ints: byte counts are exact in the CSV
        elif running is not None and _finite(per_round):
            running += per_round
        else:
            running = None
        series.append(running)
    return series


def _sum_or_none(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)


def first_reaching(records: list[dict[str, Any]], target: float) -> int | None:
    """Index of the first record whose ``test_accuracy`` reaches ``target``; rounds without one are skipped.

    The records are taken in file order: a resumed run's metrics.jsonl has been cut back to its
    checkpoint, so every round appears once and in order.
    """
    for index, record in enumerate(records):
        accuracy = record.get("test_accuracy")
        if _finite(accuracy) and accuracy >= target - _ACCURACY_TOLERANCE:
            return index
    return None


def _run_total(run: dict[str, Any], direction: str, series: list[float | None]) -> float | None:
    """Total bytes of the run: the summary's figure, else the last cumulative value of the records."""
    value = run.get(f"{direction}_bytes")
    if _finite(value):
        return value
    return series[-1] if series else None


def bytes_to_target_row(run: dict[str, Any], target: float) -> dict[str, Any]:
    """One run's round and bytes at the target, and its final accuracy and total bytes."""
    records = run.get("_records", [])
    uplink, downlink = cumulative_bytes(records, "uplink"), cumulative_bytes(records, "downlink")
    index = first_reaching(records, target)
    reached = index is not None
    uplink_total = _run_total(run, "uplink", uplink)
    return {
        "run": run["run"], "algorithm": run.get("algorithm"), "reached": reached,
        "rounds_to_target": records[index].get("round") if reached else None,
        "accuracy_at_target": records[index]["test_accuracy"] if reached else None,
        "uplink_bytes_at_target": uplink[index] if reached else None,
        "total_bytes_at_target": _sum_or_none(uplink[index], downlink[index]) if reached else None,
        "final_accuracy": run.get("final_accuracy"), "uplink_bytes": uplink_total,
        "total_bytes": _sum_or_none(uplink_total, _run_total(run, "downlink", downlink)),
        "target_accuracy": target, "run_dir": run.get("run_dir"),
    }


def bytes_to_target(runs: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """Rows sorted by uplink bytes at the target, cheapest first; runs that reached it without byte
    records follow, then the runs that never reached it (each group in the order given)."""
    def order(row: dict[str, Any]) -> tuple[int, float]:
        if not row["reached"]:
            return (2, 0.0)
        if row["uplink_bytes_at_target"] is None:
            return (1, 0.0)
        return (0, row["uplink_bytes_at_target"])

    return sorted((bytes_to_target_row(run, target) for run in runs), key=order)


def bytes_to_target_markdown(rows: list[dict[str, Any]], note: str) -> str:
    """``note`` (where the target comes from), the table, and a line saying what the byte columns are."""
    columns = ("run", "algorithm", "rounds_to_target", "uplink_bytes_at_target", "total_bytes_at_target",
               "final_accuracy", "uplink_bytes", "total_bytes")
    lines = [note, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["not reached" if k == "rounds_to_target" and not row["reached"] else _fmt(k, row.get(k))
                 for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Bytes are cumulative at the first evaluated round reaching the target (total = uplink + "
                  "downlink); '-': not recorded by the run."]
    return "\n".join(lines)


def curve_labels(runs: list[dict[str, Any]]) -> list[str]:
    """Legend labels: the algorithm, plus the run's label when several runs share that algorithm."""
    algorithms = [str(r.get("algorithm")) for r in runs]
    return [a if algorithms.count(a) == 1 else f"{a} ({r['run']})" for a, r in zip(algorithms, runs)]


def accuracy_points(records: list[dict[str, Any]], directions: tuple[str, ...]) -> list[tuple[float, float]]:
    """(cumulative bytes summed over ``directions``, accuracy %) of the evaluated records.

    Points without a byte count, or with zero bytes (a log axis cannot show them), are left out.
    """
    series = [cumulative_bytes(records, d) for d in directions]
    points = []
    for index, record in enumerate(records):
        x = _sum_or_none(*(s[index] for s in series))
        if _finite(record.get("test_accuracy")) and x is not None and x > 0:
            points.append((x, 100.0 * record["test_accuracy"]))
    return points


def plot_bytes_curves(runs: list[dict[str, Any]], target: float | None, out: Path) -> list[Path]:
    """accuracy_vs_bytes.png (uplink) and accuracy_vs_total_bytes.png (uplink + downlink), log x axis.

    One solid line per run (the dashed style is taken by the target line, drawn when there is a
    target); uplink alone is what compression methods save, the total is what the network carries.
    """
    plt = _pyplot()
    labels = curve_labels(runs)
    written = []
    for name, xlabel, directions in (
        ("accuracy_vs_bytes.png", "cumulative uplink bytes", ("uplink",)),
        ("accuracy_vs_total_bytes.png", "cumulative uplink + downlink bytes", ("uplink", "downlink")),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
        colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
        drawn = 0
        for i, (run, label) in enumerate(zip(runs, labels)):
            points = accuracy_points(run.get("_records", []), directions)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "-", marker="o", markersize=3, linewidth=1.2, color=colours(i % colours.N),
                        label=label)
                drawn += 1
        if target is not None:
            ax.axhline(100.0 * target, color="black", linestyle="--", linewidth=1.0,
                       label=f"target {100.0 * target:.1f}%")
        if drawn:
            ax.set_xscale("log")  # FedAvg and snapshot methods differ by orders of magnitude
        ax.set_xlabel(xlabel + (" (log scale)" if drawn else ""))
        ax.set_ylabel("test top-1 accuracy (%)")
        written.append(_save(plt, fig, ax, out / name, drawn, legend=bool(drawn) or target is not None))
    return written


# ---------------------------------------------------------------------------------------------
# plots


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or a clear error naming the extra that brings it."""
    try:
        import matplotlib
    except ImportError:
        raise RunError("report --out draws plots with matplotlib, which is not installed: "
                       "pip install 'osfed-hpc[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_uplink.png, one line per run (matplotlib, Agg)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    written = []
    for name, xlabel, xkey, scale in (
        ("accuracy_vs_round.png", "round", "round", 1.0),
        ("accuracy_vs_uplink.png", "cumulative uplink (MB, 10^6 bytes)", "uplink_bytes_total", 1e-6),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
        colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
        drawn = 0
        for i, run in enumerate(runs):
            points = [(r[xkey] * scale, 100.0 * r["test_accuracy"]) for r in run.get("_records", [])
                      if r.get("test_accuracy") is not None and r.get(xkey) is not None]
            if points:
                xs, ys = zip(*points)
                style = "-" if run.get("algorithm") == FEDAVG else "--"  # the baseline stands out
                ax.plot(xs, ys, style, marker="o", markersize=3, linewidth=1.2, color=colours(i % colours.N),
                        label=run["run"])
                drawn += 1
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 accuracy (%)")
        if xkey == "uplink_bytes_total" and drawn:
            ax.set_xscale("log")  # FedAvg and snapshot methods differ by orders of magnitude
        if xkey == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        written.append(_save(plt, fig, ax, out / name, drawn, legend=bool(drawn)))
    return written


def _save(plt, fig, ax, path: Path, lines: int, legend: bool) -> Path:
    """Grid, the legend outside the axes (with 18 runs a legend inside hides the curves), PNG."""
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2 if lines > 12 else 1)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the snapshot gallery (runtime.save_snapshots)

#: where a run keeps its snapshot pictures (``osfed_hpc.snapshot_pictures.SNAPSHOT_FOLDER``; not imported
#: from there, because that module needs torch and a report must not)
GALLERY_SOURCE = "snapshots"


def _picture_order(path: Path) -> tuple[float, str]:
    """``round-000010.png`` sorts by its round, anything else after them by name."""
    stem = path.stem
    number = stem[len("round-"):] if stem.startswith("round-") else ""
    return (int(number) if number.isdigit() else math.inf, path.name)


def _safe_part(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text).strip(".") or "run"


def write_gallery(folder: Path, runs: list[dict[str, Any]], include_snapshots: bool = False) -> Path | None:
    """``gallery.md`` in ``folder``: for each run with ``RUN/snapshots/*.png``, its pictures by round.

    Why the pixels are not copied by default: a snapshot is optimised so that its gradient matches a
    client's update, so it is derived from client data (gradients leak training samples); the report
    folder is what people share. Without ``include_snapshots`` the page lists each picture by its path
    relative to the run directory (with a link for local viewing, no pixels in ``folder``); with it the
    PNGs are copied to ``folder/snapshots/<run>/`` and shown inline. Returns None (and writes nothing)
    when no run has pictures.
    """
    import os
    import shutil

    found = []
    for run in runs:
        run_dir = Path(run.get("run_dir") or "")
        pictures = sorted((run_dir / GALLERY_SOURCE).glob("*.png"), key=_picture_order) if run.get("run_dir") else []
        if pictures:
            found.append((run, run_dir, pictures))
    if not found:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Snapshot gallery", "",
             "What the snapshot clients sent (`runtime.save_snapshots`): each picture shows a round's snapshots "
             "(de-normalised, multi-grid cells outlined) and the decoded cells with their top label classes.", ""]
    if include_snapshots:
        lines.append("The pictures were copied here because `--include-snapshots` was given: they are derived from "
                     "client data, so share this folder with the same care as the runs.")
    else:
        lines.append("Snapshots are derived from client data, so the pictures stay in their run directories and are "
                     "listed by path relative to them; `osfed-hpc report --include-snapshots` copies them here.")
    used: set[str] = set()
    copied = 0
    for run, run_dir, pictures in found:
        lines += ["", f"## {run['run']} ({run.get('algorithm', '?')})", "", f"run directory: `{run_dir}`", ""]
        if include_snapshots:
            name = "/".join(_safe_part(part) for part in str(run["run"]).split("/"))
            base, n = name, 2
            while name in used:  # two runs of one name (from different sweeps or folders)
                name, n = f"{base}-{n}", n + 1
            used.add(name)
            target = folder / GALLERY_SOURCE / name
            target.mkdir(parents=True, exist_ok=True)
        for picture in pictures:
            relative = f"{GALLERY_SOURCE}/{picture.name}"
            if include_snapshots:
                shutil.copyfile(picture, target / picture.name)
                copied += 1
                lines += [f"### {picture.stem}", "", f"![{run['run']} {picture.stem}](<{GALLERY_SOURCE}/{name}/{picture.name}>)", ""]
            else:
                link = Path(os.path.relpath(picture.resolve(), folder.resolve())).as_posix()
                lines.append(f"- {picture.stem}: [`{relative}`](<{link}>)")
    path = folder / "gallery.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    count = sum(len(p) for _, _, p in found)
    how = f"{copied} pictures copied" if include_snapshots else f"{count} pictures listed, not copied"
    print(f"wrote gallery.md in {folder} ({len(found)} run(s), {how})")
    return path


# ---------------------------------------------------------------------------------------------
# the command


def run_report(run_dirs: list[str], out: str | None = None, target: str | float | None = None,
               include_snapshots: bool = False) -> int:
    """Print the comparison, Table 10 (only when some run has a resolution >= 64 px, see
    ``wants_table10``), the bytes-to-target table and the OS-Fed ablation tables (only those whose
    runs exist, see ``osfed_hpc.ablations``); with ``out``, write report.csv, report.md, table10.csv
    (with Table 10), bytes_to_target.csv (when there is a target), ablations.md and ablations.csv
    (with ablation tables) and the PNG plots there.

    ``target`` (a fraction, or a percentage above 1) replaces the default of 90 % of the best FedAvg
    final accuracy; it is checked before any run is read, so a typo fails at once. With ``out``, runs
    with snapshot pictures also get ``gallery.md`` (see ``write_gallery``; ``include_snapshots`` copies
    the PNGs).
    """
    override = None if target is None else parse_target(target)
    if include_snapshots and not out:
        raise RunError("--include-snapshots copies snapshot pictures into the --out folder; give --out DIR")
    runs = load_runs(expand_run_dirs(run_dirs))
    if not runs:
        raise RunError("no finished runs to report")
    rows = compare(runs)
    cells = table10_cells(runs) if wants_table10(runs) else []
    text = markdown(rows)
    if cells:
        text += "\n\n" + table10_markdown(cells)
    goal, note = choose_target(runs, override)
    targets = bytes_to_target(runs, goal) if goal is not None else []
    text += "\n\n" + (bytes_to_target_markdown(targets, note) if goal is not None else note)
    contexts = ablations.build_contexts(runs)
    ablation_text = ablations.ablation_markdown(contexts)
    if ablation_text:
        text += "\n\n" + ablation_text
    print(text)
    if out:
        _write_outputs(Path(out), runs, rows, cells, targets, goal, text)
        if ablation_text:
            folder = Path(out)
            (folder / "ablations.md").write_text(ablation_text + "\n")
            (folder / "ablations.csv").write_text(ablations.ablation_csv(ablations.ablation_rows(contexts)))
            print(f"wrote ablations.md, ablations.csv in {folder}")
        write_gallery(Path(out), runs, include_snapshots)
    return 0


def _write_outputs(folder: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]],
                   cells: list[dict[str, Any]], targets: list[dict[str, Any]], goal: float | None, text: str) -> None:
    """The files of ``--out``; a table that was not printed gets no CSV, so no file pretends to a result."""
    folder.mkdir(parents=True, exist_ok=True)
    written = ["report.csv", "report.md"]
    (folder / "report.csv").write_text(to_csv(rows, RUN_COLUMNS))
    (folder / "report.md").write_text(text + "\n")
    if cells:
        (folder / "table10.csv").write_text(to_csv(cells, TABLE10_COLUMNS))
        written.append("table10.csv")
    if goal is not None:
        (folder / "bytes_to_target.csv").write_text(to_csv(targets, BYTES_TO_TARGET_COLUMNS))
        written.append("bytes_to_target.csv")
    written += [p.name for p in plot_curves(runs, folder) + plot_bytes_curves(runs, goal, folder)]
    print(f"wrote {', '.join(written)} in {folder}")
