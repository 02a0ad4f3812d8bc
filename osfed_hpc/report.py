"""Merge finished runs into tables: the side-by-side comparison the demo prints, CSV for sheets.

Reads only ``summary.json`` and ``metrics.jsonl`` of each run directory.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .errors import RunError

COLUMNS = ("run", "algorithm", "model", "clients", "resolution", "rounds", "final_accuracy",
           "uplink_bytes_per_client_round", "uplink_bytes", "uplink_ratio_vs_fedavg", "gap_to_fedavg_points",
           "wall_seconds", "world_size")


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: no summary.json (the run has not finished)")
    summary = json.loads(path.read_text())
    summary["run"] = Path(run_dir).name
    return summary


def compare(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the uplink ratio and accuracy gap to the FedAvg run with the same clients/resolution."""
    baselines = {(s.get("num_clients"), s.get("resolution")): s for s in summaries if s["algorithm"] == "fedavg"}
    rows = []
    for s in summaries:
        base = baselines.get((s.get("num_clients"), s.get("resolution")))
        row = {key: s.get(key) for key in COLUMNS}
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
    if key in ("gap_to_fedavg_points", "wall_seconds"):
        return f"{value:.2f}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(k, row.get(k)) for k in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def run_report(run_dirs: list[str], out: str | None = None) -> int:
    rows = compare([load_summary(d) for d in run_dirs])
    print(markdown(rows))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.csv").write_text(to_csv(rows))
        (Path(out) / "report.md").write_text(markdown(rows) + "\n")
        print(f"wrote {out}/report.csv and {out}/report.md")
    return 0
