"""``osfed-hpc report``: bytes to a target accuracy (table, CSV, plots) and when Table 10 is shown.

The run directories are written here with known numbers, so every expected figure below can be
checked by hand from ``RUNS``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from osfed_hpc import report as rp
from osfed_hpc.cli import main
from osfed_hpc.errors import RunError

PNG = b"\x89PNG\r\n\x1a\n"

#: name -> (algorithm, rounds, {round: test accuracy}, uplink bytes per round, downlink bytes per round)
#: fedavg-best ends at 0.80, so the default target is 0.9 * 0.80 = 0.7200000000000001 in floating point;
#: its 0.72 at round 2 must still count. old-fedprox is an older run: no downlink fields at all, and only
#: the per-round uplink (no running total). osfed is evaluated on rounds 3 and 6 only; oneshot has one round.
RUNS = {
    "fedavg-best": ("fedavg", 4, {1: 0.5, 2: 0.72, 3: 0.78, 4: 0.8}, 1000, 3000),
    "fedavg-weak": ("fedavg", 3, {1: 0.4, 2: 0.6, 3: 0.7}, 1000, 3000),
    "osfed": ("osfed", 6, {3: 0.65, 6: 0.75}, 10, 3000),
    "old-fedprox": ("fedprox", 3, {1: 0.5, 2: 0.73, 3: 0.74}, 500, None),
    "oneshot": ("oneshot", 1, {1: 0.76}, 50_000, 3000),
}


def write_run(folder: Path, algorithm: str, rounds: int, accuracy: dict[int, float], uplink: int,
              downlink: int | None, resolution: int = 28) -> Path:
    """summary.json and metrics.jsonl with the fields the runner writes (fewer for an old run)."""
    folder.mkdir(parents=True)
    records = []
    for round_ in range(1, rounds + 1):
        record = {"round": round_, "clients": [0, 1], "uplink_bytes": uplink}
        if downlink is not None:  # an old run without downlink also lacks the uplink running total
            record.update(uplink_bytes_total=uplink * round_, downlink_bytes=downlink,
                          downlink_bytes_total=downlink * round_)
        if round_ in accuracy:
            record.update(test_accuracy=accuracy[round_], test_loss=1.0)
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"name": folder.name, "algorithm": algorithm, "model": "cnn", "rounds": rounds,
               "final_accuracy": accuracy[max(accuracy)], "uplink_bytes": uplink * rounds,
               "uplink_bytes_per_client_round": uplink / 2, "wall_seconds": 1.0, "world_size": 2,
               "num_clients": 2, "resolution": resolution}
    if downlink is not None:
        summary["downlink_bytes"] = downlink * rounds
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture()
def runs(tmp_path) -> dict[str, Path]:
    return {name: write_run(tmp_path / "runs" / name, *spec) for name, spec in RUNS.items()}


def loaded(paths) -> list[dict]:
    return rp.load_runs(list(paths))


# ---------------------------------------------------------------------------------------------
# the target


@pytest.mark.parametrize("text, expected", [
    ("0.85", 0.85), (0.85, 0.85), ("85", 0.85), ("85.5", 0.855), ("1", 1.0), ("100", 1.0), (" 85% ", 0.85),
    ("0.5%", 0.005), ("1.5", 0.015),
])
def test_parse_target_takes_fractions_and_percentages(text, expected):
    assert rp.parse_target(text) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("text, message", [
    ("0", "above 0"), ("-5", "above 0"), ("100.5", "at most 100"), ("150%", "at most 100"), ("nan", "above 0"),
    ("abc", "not a number"), ("", "not a number"),
])
def test_parse_target_refuses_unreachable_targets(text, message):
    with pytest.raises(RunError, match=message):
        rp.parse_target(text)


def test_default_target_is_90_percent_of_the_best_fedavg(runs):
    target, note = rp.choose_target(loaded(runs.values()))
    assert target == 0.9 * 0.8
    assert note == ("Bytes to target 72.00% test accuracy = 90% of the best FedAvg final accuracy "
                    "(80.00%, fedavg-best).")
    assert rp.best_fedavg(loaded(runs.values()))["run"] == "fedavg-best"


def test_target_override_wins_and_no_fedavg_means_no_default(runs):
    assert rp.choose_target(loaded(runs.values()), "75")[0] == 0.75
    target, note = rp.choose_target(loaded([runs["osfed"], runs["oneshot"]]))
    assert target is None and "skipped" in note and "--target" in note


# ---------------------------------------------------------------------------------------------
# rounds and bytes to the target


def test_cumulative_bytes_uses_totals_sums_per_round_and_admits_missing_fields():
    records = [{"uplink_bytes": 5, "uplink_bytes_total": 5}, {"uplink_bytes": 7}, {"uplink_bytes_total": 40},
               {"round": 4}, {"uplink_bytes": 1}]
    assert rp.cumulative_bytes(records, "uplink") == [5, 12, 40, None, None]
    assert rp.cumulative_bytes(records, "downlink") == [None] * 5
    assert rp.cumulative_bytes([], "uplink") == []


def test_first_reaching_skips_unevaluated_rounds():
    records = [{"round": 1}, {"round": 2, "test_accuracy": 0.5}, {"round": 3}, {"round": 4, "test_accuracy": 0.9}]
    assert rp.first_reaching(records, 0.5) == 1
    assert rp.first_reaching(records, 0.6) == 3
    assert rp.first_reaching(records, 0.95) is None
    assert rp.first_reaching([{"round": 1, "test_accuracy": 0.72}], 0.9 * 0.8) == 0  # 0.7200000000000001


def test_bytes_to_target_rows_and_order(runs):
    rows = rp.bytes_to_target(loaded(runs.values()), 0.9 * 0.8)
    got = [(r["run"], r["reached"], r["rounds_to_target"], r["accuracy_at_target"], r["uplink_bytes_at_target"],
            r["total_bytes_at_target"], r["final_accuracy"], r["uplink_bytes"], r["total_bytes"]) for r in rows]
    assert got == [
        ("osfed", True, 6, 0.75, 60, 60 + 18_000, 0.75, 60, 18_060),
        ("old-fedprox", True, 2, 0.73, 1000, None, 0.74, 1500, None),  # per-round uplink summed, no downlink
        ("fedavg-best", True, 2, 0.72, 2000, 2000 + 6000, 0.8, 4000, 16_000),
        ("oneshot", True, 1, 0.76, 50_000, 53_000, 0.76, 50_000, 53_000),
        ("fedavg-weak", False, None, None, None, None, 0.7, 3000, 12_000),  # not reached: last
    ]


def test_reached_without_byte_records_sorts_before_unreached(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_accuracy": 0.9}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"algorithm": "x", "final_accuracy": 0.9}))
    weak = write_run(tmp_path / "weak", "fedavg", 1, {1: 0.1}, 10, 10)
    cheap = write_run(tmp_path / "cheap", "fedavg", 1, {1: 0.95}, 10, 10)
    rows = rp.bytes_to_target(loaded([weak, folder, cheap]), 0.5)
    assert [(r["run"], r["uplink_bytes_at_target"], r["total_bytes"]) for r in rows] == [
        ("cheap", 10, 20), ("bare", None, None), ("weak", None, 20)]


# ---------------------------------------------------------------------------------------------
# the command: table, CSV, plots


def test_report_prints_the_table_and_writes_csv_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs.values()), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("Bytes to target 72.00%"):printed.index("wrote report.csv")]
    assert ("| run | algorithm | rounds_to_target | uplink_bytes_at_target | total_bytes_at_target | "
            "final_accuracy | uplink_bytes | total_bytes |") in table
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert lines == [
        "| osfed | osfed | 6 | 60 | 18,060 | 75.00% | 60 | 18,060 |",
        "| old-fedprox | fedprox | 2 | 1,000 | - | 74.00% | 1,500 | - |",
        "| fedavg-best | fedavg | 2 | 2,000 | 8,000 | 80.00% | 4,000 | 16,000 |",
        "| oneshot | oneshot | 1 | 50,000 | 53,000 | 76.00% | 50,000 | 53,000 |",
        "| fedavg-weak | fedavg | not reached | - | - | 70.00% | 3,000 | 12,000 |",
    ]
    assert printed.index("| run | algorithm | model |") < printed.index("Bytes to target")  # after the old table
    assert table in (out / "report.md").read_text()
    with open(out / "bytes_to_target.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(rp.BYTES_TO_TARGET_COLUMNS)
    assert [r["run"] for r in rows] == ["osfed", "old-fedprox", "fedavg-best", "oneshot", "fedavg-weak"]
    assert {k: rows[0][k] for k in rp.BYTES_TO_TARGET_COLUMNS[:-1]} == {
        "run": "osfed", "algorithm": "osfed", "reached": "True", "rounds_to_target": "6", "accuracy_at_target": "0.75",
        "uplink_bytes_at_target": "60", "total_bytes_at_target": "18060", "final_accuracy": "0.75",
        "uplink_bytes": "60", "total_bytes": "18060", "target_accuracy": repr(0.9 * 0.8)}
    assert rows[0]["run_dir"] == str(runs["osfed"])
    assert (rows[1]["total_bytes_at_target"], rows[1]["total_bytes"]) == ("", "")
    assert (rows[4]["reached"], rows[4]["rounds_to_target"], rows[4]["uplink_bytes_at_target"]) == ("False", "", "")
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_total_bytes.png", "accuracy_vs_round.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5_000


@pytest.mark.parametrize("target", ["0.75", "75", "75%"])
def test_cli_target_override(runs, tmp_path, capsys, target):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs.values()), "--target", target, "--out", str(out)]) == 0
    assert "Bytes to target 75.00% test accuracy (--target)." in capsys.readouterr().out
    with open(out / "bytes_to_target.csv", newline="") as f:
        got = [(r["run"], r["rounds_to_target"], r["uplink_bytes_at_target"], r["total_bytes_at_target"])
               for r in csv.DictReader(f)]
    # osfed's 0.75 equals the target; fedavg-best first reaches it with 0.78 at round 3
    assert got == [("osfed", "6", "60", "18060"), ("fedavg-best", "3", "3000", "12000"),
                   ("oneshot", "1", "50000", "53000"), ("fedavg-weak", "", "", ""), ("old-fedprox", "", "", "")]


@pytest.mark.parametrize("target, message", [("0", "must be above 0"), ("101", "at most 100"),
                                             ("-1", "must be above 0"), ("high", "not a number")])
def test_cli_rejects_a_bad_target_with_one_line(runs, tmp_path, capsys, target, message):
    assert main(["report", str(runs["osfed"]), "--target", target]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("osfed-hpc report: error: --target") and message in captured.err
    assert captured.out == ""  # refused before any run is read or a table printed


def test_without_fedavg_or_target_the_table_is_skipped(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert rp.run_report([str(runs["osfed"]), str(runs["oneshot"])], str(out)) == 0
    printed = capsys.readouterr().out
    assert "Bytes to target: skipped, no FedAvg run with a final accuracy to take 90% of; give --target." in printed
    assert "rounds_to_target" not in printed and not (out / "bytes_to_target.csv").exists()
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_total_bytes.png"):  # curves without a target line
        assert (out / name).read_bytes()[:8] == PNG


def test_curve_labels_name_the_run_only_when_algorithms_repeat(runs):
    labels = rp.curve_labels(loaded(runs.values()))
    assert labels == ["fedavg (fedavg-best)", "fedavg (fedavg-weak)", "osfed", "fedprox", "oneshot"]


def test_plot_points_are_log_safe_and_skip_unknown_totals(runs):
    by_name = {r["run"]: r for r in loaded(runs.values())}
    assert rp.accuracy_points(by_name["osfed"]["_records"], ("uplink",)) == [(30, 65.0), (60, 75.0)]
    assert rp.accuracy_points(by_name["osfed"]["_records"], ("uplink", "downlink")) == [(9030, 65.0), (18060, 75.0)]
    assert rp.accuracy_points(by_name["old-fedprox"]["_records"], ("uplink", "downlink")) == []
    zero = [{"uplink_bytes_total": 0, "test_accuracy": 0.1}, {"uplink_bytes_total": 4, "test_accuracy": 0.2}]
    assert rp.accuracy_points(zero, ("uplink",)) == [(4, 20.0)]


# ---------------------------------------------------------------------------------------------
# Table 10 only for ImageNet-scale runs


def test_table10_is_left_out_for_small_images(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert rp.run_report([str(p) for p in runs.values()], str(out)) == 0
    printed = capsys.readouterr().out
    assert "\n| resolution |" not in printed and "OS-Fed memory" not in printed
    assert not (out / "table10.csv").exists()
    assert not rp.wants_table10(loaded(runs.values()))


def test_table10_is_printed_when_a_run_is_64px_or_more(runs, tmp_path, capsys):
    big = write_run(tmp_path / "r64-osfed", "osfed", 1, {1: 0.3}, 10, 10, resolution=64)
    assert rp.wants_table10(loaded([runs["osfed"], big]))
    out = tmp_path / "report"
    assert rp.run_report([str(runs["fedavg-best"]), str(big)], str(out)) == 0
    printed = capsys.readouterr().out
    assert "| 64² | 80.0 / - |" not in printed  # different cells: 28 px fedavg and 64 px osfed
    assert "| 28² | 80.0 / - | - | - |" in printed and "| 64² | - / 30.0 | - | - |" in printed
    assert (out / "table10.csv").read_text().splitlines()[0] == ",".join(rp.TABLE10_COLUMNS)
    assert not rp.wants_table10([{"resolution": 63}, {"resolution": None}, {}])
