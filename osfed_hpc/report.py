"""Merge finished runs into tables and plots: the side-by-side comparison the demo prints, the
Table-10 layout of the OS-Fed paper, CSV for sheets, and PNG curves.

Reads only ``summary.json`` and ``metrics.jsonl`` of each run directory (a sweep folder stands for
its rows), so a report can be made anywhere the run directories are readable, without MPI or torch.

Table 10 (ImageNet-1K, Dirichlet 0.01) has one row per resolution, one column per client count with
``FedAvg / OS-Fed`` top-1 accuracy, and OS-Fed's per-client memory and wall time. Those two come from
the per-client records of every round (``client_stats``): memory is the largest peak over clients,
rounds and client counts, because a GPU must hold the worst case; time is the mean over clients and
rounds of one client's update, because that is what a client pays per round on average.
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

from .errors import RunError

COLUMNS = ("run", "algorithm", "model", "clients", "resolution", "rounds", "final_accuracy",
           "uplink_bytes_per_client_round", "uplink_bytes", "uplink_ratio_vs_fedavg", "gap_to_fedavg_points",
           "wall_seconds", "world_size")
#: the per-run CSV: the comparison columns plus the per-client cost from metrics.jsonl
RUN_COLUMNS = COLUMNS + ("client_seconds_mean", "client_peak_memory_bytes", "run_dir")
TABLE10_COLUMNS = ("resolution", "clients", "fedavg_top1", "osfed_top1", "osfed_client_seconds_mean",
                   "osfed_client_peak_memory_bytes", "fedavg_run", "osfed_run")
#: algorithm names of the two Table-10 columns
FEDAVG, OSFED = "fedavg", "osfed"


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
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
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
    if key in ("uplink_bytes_per_client_round", "uplink_bytes"):
        return f"{value:,.0f}"
    if key == "uplink_ratio_vs_fedavg":
        return f"{value:.1f}x"
    if key in ("gap_to_fedavg_points", "wall_seconds", "client_seconds_mean"):
        return f"{value:.2f}"
    if key == "client_peak_memory_bytes":
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
# plots


def plot_curves(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_uplink.png, one line per run (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
        ax.grid(True, alpha=0.3)
        if drawn:  # outside the axes: with 18 runs a legend inside hides the curves
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2 if drawn > 12 else 1)
        path = out / name
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# the command


def run_report(run_dirs: list[str], out: str | None = None) -> int:
    """Print the comparison (and Table 10 when FedAvg/OS-Fed runs are present); with ``out``, write
    report.csv, report.md, table10.csv and the PNG plots there."""
    runs = load_runs(expand_run_dirs(run_dirs))
    if not runs:
        raise RunError("no finished runs to report")
    rows = compare(runs)
    cells = table10_cells(runs)
    text = markdown(rows)
    if cells:
        text += "\n\n" + table10_markdown(cells)
    print(text)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.csv").write_text(to_csv(rows, RUN_COLUMNS))
        (folder / "report.md").write_text(text + "\n")
        (folder / "table10.csv").write_text(to_csv(cells, TABLE10_COLUMNS))
        plots = plot_curves(runs, folder)
        print(f"wrote {out}/report.csv, report.md, table10.csv and {', '.join(p.name for p in plots)}")
    return 0
