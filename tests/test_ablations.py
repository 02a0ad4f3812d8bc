"""The OS-Fed ablation sweep (configs/sweeps/osfed_ablations.yaml, its --quick subset) and the report's
ablation tables (osfed_hpc.ablations), on synthetic run folders and on a real quick sweep."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from osfed_hpc import ablations as ab
from osfed_hpc import sweep as sw
from osfed_hpc.cli import main
from osfed_hpc.config import ConfigError
from tests.fake_slurm import ROOT

ABLATIONS = ROOT / "configs" / "sweeps" / "osfed_ablations.yaml"
HEADINGS = ("### Fig. 10", "### Table 8", "### Table 9", "### D.5", "### 3SFC vs OS-Fed")

#: the paper's formulation, as the sweep sets it
BASE = {"name": "osfed", "factor": 4, "num_snapshots": 1, "multigrid": "uniform", "multiscale_leaves": None,
        "upsampler": "bilinear", "codec": "none", "jpeg_quality": 90, "scales": "global", "weighting": "samples",
        "outer_steps": 10, "fsrcnn_mode": "server", "fsrcnn_server_steps": 800}
SETTINGS = {
    "f4-m1": {}, "f4-m2": {"num_snapshots": 2}, "f4-m4": {"num_snapshots": 4}, "f4-m8": {"num_snapshots": 8},
    "ms8-m1": {"multigrid": "multiscale", "factor": 8},
    "ms8-m8": {"multigrid": "multiscale", "factor": 8, "num_snapshots": 8},
    "f8-m1": {"factor": 8}, "fsrcnn-f4": {"upsampler": "fsrcnn"}, "fsrcnn-f8": {"upsampler": "fsrcnn", "factor": 8},
    "png-m4": {"codec": "png", "num_snapshots": 4}, "jpeg-m4": {"codec": "jpeg", "num_snapshots": 4},
    "sfc3": {"name": "sfc3", "factor": 1},
}


def fake_run(folder: Path, name: str, seed: int, algorithm: dict, accuracy: float, uplink: float,
             rounds: int = 10, resolution: int = 32) -> Path:
    """A finished run as the report reads it: summary.json, metrics.jsonl and config.yaml."""
    run = folder / name
    run.mkdir(parents=True)
    config = {"name": name, "seed": seed, "rounds": rounds, "out": str(run),
              "data": {"path": "data/mnist5k", "clients": 10, "scheme": "dirichlet", "alpha": 0.5,
                       "resolution": resolution},
              "model": {"name": "cnn"}, "algorithm": algorithm,
              "train": {"lr": 0.1, "momentum": 0.0}, "server": {"lr": 1.0, "momentum": 0.0},
              "eval": {"every": 1}, "runtime": {"device": "cpu"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"name": name, "algorithm": algorithm["name"], "model": "cnn", "rounds": rounds,
               "final_accuracy": accuracy, "uplink_bytes_per_client_round": uplink, "num_clients": 10,
               "resolution": resolution, "uplink_bytes": uplink * 10 * rounds}
    (run / "summary.json").write_text(json.dumps(summary))
    record = {"round": rounds, "test_accuracy": accuracy, "uplink_bytes": uplink * 10,
              "uplink_bytes_total": uplink * 10 * rounds}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return run


def accuracy_of(setting: str, seed: int) -> float:
    """Distinct per setting; seeds 0/1/2 add -1/0/+1 points, so every cell is mean ± 1.00 (n=3)."""
    index = list(SETTINGS).index(setting) if setting in SETTINGS else 20
    return (70.0 + index + (seed - 1)) / 100.0


def uplink_of(setting: str) -> float:
    return 1000.0 * (1 + list(SETTINGS).index(setting)) if setting in SETTINGS else 1_627_800.0


@pytest.fixture
def sweep_runs(tmp_path) -> list[Path]:
    runs = []
    for seed in (0, 1, 2):
        for setting, change in SETTINGS.items():
            runs.append(fake_run(tmp_path / "runs", f"s{seed}-{setting}", seed, {**BASE, **change},
                                 accuracy_of(setting, seed), uplink_of(setting)))
        runs.append(fake_run(tmp_path / "runs", f"s{seed}-fedavg", seed, {"name": "fedavg"},
                             accuracy_of("fedavg", seed), uplink_of("fedavg")))
    return runs


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading`` (header row included)."""
    block = text.split(heading, 1)[1]
    table = [part for part in block.split("\n\n") if part.startswith("| ")][0]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]


# ---------------------------------------------------------------------------------------------
# arithmetic


def test_spread_is_mean_and_sample_standard_deviation():
    stat = ab.spread([90.0, 92.0, 97.0])
    assert stat.mean == pytest.approx(93.0) and stat.n == 3 and (stat.low, stat.high) == (90.0, 97.0)
    assert stat.std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))  # divisor n - 1
    one = ab.spread([91.5])
    assert one.std is None and ab.fmt_stat(one) == "91.50 (n=1)"
    assert ab.spread([]) is None and ab.fmt_stat(None) == "-"
    assert ab.fmt_stat(ab.spread([90.0, 92.0, 94.0])) == "92.00 ± 2.00 (n=3)"


def test_variant_names_what_each_ablation_varies():
    assert ab.variant_of(BASE) == ab.Variant("osfed", 4, 1, "uniform", "bilinear", "fp32")
    assert ab.variant_of({**BASE, "name": "sfc3", "factor": 1}).method == "3sfc"
    assert ab.variant_of({**BASE, "factor": 1}).method == "3sfc"  # OS-Fed at factor 1 is 3SFC
    assert ab.variant_of({**BASE, "upsampler": "fsrcnn", "fsrcnn_mode": "client"}).upsampler == "fsrcnn (client)"
    assert ab.variant_of({**BASE, "codec": "jpeg", "jpeg_quality": 75}).codec == "jpeg q75"
    assert ab.variant_of({**BASE, "multigrid": "multiscale", "multiscale_leaves": [[0, 0, 1]]}).multigrid == \
        "multiscale (custom)"
    assert ab.variant_of({"name": "fedavg"}) is None


# ---------------------------------------------------------------------------------------------
# the tables on a synthetic sweep


def test_report_prints_every_ablation_in_the_paper_layout(sweep_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, sweep_runs), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for heading in HEADINGS:
        assert text.count(heading) == 1
    assert "mean ± sample standard deviation (n - 1)" in text
    assert "FedAvg reference (same data, model, training, rounds): 90.00 ± 1.00 (n=3) at 1,627,800 B" in text
    assert "Setting: cnn, 32 px, 10 clients (dirichlet, alpha 0.5), 10 rounds" in text

    fig10 = _table_rows(text, "### Fig. 10")
    assert fig10[0] == ["snapshots per client", "factor 4: accuracy (%)", "factor 4: uplink B/client-round"]
    assert fig10[1:] == [["1", "70.00 ± 1.00 (n=3)", "1,000"], ["2", "71.00 ± 1.00 (n=3)", "2,000"],
                         ["4", "72.00 ± 1.00 (n=3)", "3,000"], ["8", "73.00 ± 1.00 (n=3)", "4,000"]]
    table8 = _table_rows(text, "### Table 8")
    assert table8 == [["#snapshots", "Uniform (factor 4)", "Multi-scale (finest factor 8)"],
                      ["1 snapshot", "70.00 ± 1.00 (n=3) · 1,000 B", "74.00 ± 1.00 (n=3) · 5,000 B"],
                      ["8 snapshots", "73.00 ± 1.00 (n=3) · 4,000 B", "75.00 ± 1.00 (n=3) · 6,000 B"]]
    table9 = _table_rows(text, "### Table 9")
    assert table9 == [["model", "Factor 4 Upsample", "Factor 4 FSRCNN (server)", "Factor 8 Upsample",
                       "Factor 8 FSRCNN (server)"],
                      ["cnn, 32 px", "70.00 ± 1.00 (n=3) · 1,000 B", "77.00 ± 1.00 (n=3) · 8,000 B",
                       "76.00 ± 1.00 (n=3) · 7,000 B", "78.00 ± 1.00 (n=3) · 9,000 B"]]
    d5 = _table_rows(text, "### D.5")
    assert [row[:3] for row in d5[1:]] == [["fp32", "1", "4"], ["fp32", "2", "4"], ["fp32", "4", "4"],
                                           ["fp32", "8", "4"], ["PNG (8-bit)", "4", "4"], ["JPEG (8-bit) q90", "4", "4"]]
    assert d5[5][3:] == ["79.00 ± 1.00 (n=3)", "10,000", "10.00"]  # sorted by bytes, ratio to 1 fp32 snapshot
    sfc = _table_rows(text, "### 3SFC vs OS-Fed")
    assert sfc[1:] == [["3SFC", "1", "1", "81.00 ± 1.00 (n=3)", "12,000"],
                       ["OS-Fed", "4", "16", "70.00 ± 1.00 (n=3)", "1,000"],
                       ["OS-Fed", "8", "64", "76.00 ± 1.00 (n=3)", "7,000"]]

    written = (out / "ablations.md").read_text()
    assert all(h in written for h in HEADINGS) and "## OS-Fed ablations" in (out / "report.md").read_text()
    rows = list(csv.DictReader(io.StringIO((out / "ablations.csv").read_text())))
    assert len(rows) == len(SETTINGS) + 1  # one per setting, and FedAvg
    png = next(r for r in rows if r["codec"] == "png")
    assert (png["n"], png["seeds"], png["snapshots"]) == ("3", "0 1 2", "4")
    assert float(png["accuracy_mean"]) == pytest.approx(79.0) and float(png["accuracy_std"]) == pytest.approx(1.0)
    assert (float(png["accuracy_min"]), float(png["accuracy_max"])) == pytest.approx((78.0, 80.0))


def test_missing_seeds_show_their_n_and_missing_cells_a_dash(tmp_path, capsys):
    runs = [fake_run(tmp_path, "a", 0, BASE, 0.90, 1000.0),
            fake_run(tmp_path, "b", 1, BASE, 0.94, 1000.0),
            fake_run(tmp_path, "c", 0, {**BASE, "multigrid": "multiscale", "factor": 8}, 0.91, 2000.0)]
    assert main(["report", *map(str, runs)]) == 0
    text = capsys.readouterr().out
    assert _table_rows(text, "### Table 8")[1] == ["1 snapshot", f"92.00 ± {math.sqrt(8):.2f} (n=2) · 1,000 B",
                                                  "91.00 (n=1) · 2,000 B"]
    for absent in ("### Fig. 10", "### Table 9", "### D.5", "### 3SFC"):  # their distinguishing runs are missing
        assert absent not in text
    assert "FedAvg reference: no FedAvg run of the same setting." in text


def test_runs_of_other_settings_get_their_own_section(tmp_path, capsys):
    runs = []
    for rounds in (10, 30):
        runs += [fake_run(tmp_path, f"r{rounds}-os", 0, BASE, 0.90, 1000.0, rounds=rounds),
                 fake_run(tmp_path, f"r{rounds}-sfc3", 0, {**BASE, "name": "sfc3", "factor": 1}, 0.80, 900.0,
                          rounds=rounds)]
    runs.append(fake_run(tmp_path, "fedavg30", 0, {"name": "fedavg"}, 0.96, 1e6, rounds=30))
    assert main(["report", *map(str, runs)]) == 0
    text = capsys.readouterr().out
    assert text.count("### 3SFC vs OS-Fed") == 2
    assert "10 rounds, data data/mnist5k; rounds=10" in text and "30 rounds, data data/mnist5k; rounds=30" in text
    first, second = text.split("Setting: ")[1:]
    assert "no FedAvg run" in first and "96.00 (n=1)" in second  # FedAvg joins only its own setting


def test_a_repeated_seed_is_counted_once_with_a_warning(tmp_path, capsys):
    runs = [fake_run(tmp_path, "a", 0, BASE, 0.50, 1000.0), fake_run(tmp_path, "b", 0, BASE, 0.90, 1000.0),
            fake_run(tmp_path, "c", 0, {**BASE, "name": "sfc3", "factor": 1}, 0.80, 900.0)]
    assert main(["report", *map(str, runs)]) == 0
    captured = capsys.readouterr()
    assert "a and b are the same setting and seed 0; using b" in captured.err
    assert _table_rows(captured.out, "### 3SFC")[2] == ["OS-Fed", "4", "16", "90.00 (n=1)", "1,000"]


def test_no_ablation_section_without_ablation_runs(tmp_path, capsys):
    """A method comparison (one OS-Fed setting, no 3SFC) prints no ablation tables."""
    runs = [fake_run(tmp_path, "os", 0, BASE, 0.9, 1000.0), fake_run(tmp_path, "fa", 0, {"name": "fedavg"}, 0.96, 1e6)]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert "OS-Fed ablations" not in capsys.readouterr().out
    assert not (out / "ablations.md").exists() and not (out / "ablations.csv").exists()


def test_runs_without_config_are_left_out_of_the_ablations(tmp_path, capsys):
    runs = [fake_run(tmp_path, "os", 0, BASE, 0.9, 1000.0),
            fake_run(tmp_path, "sfc", 0, {**BASE, "name": "sfc3", "factor": 1}, 0.8, 900.0)]
    (runs[1] / "config.yaml").unlink()  # an older run directory
    assert main(["report", *map(str, runs)]) == 0
    assert "OS-Fed ablations" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the sweep file and its quick subset


def test_ablation_sweep_expands_to_every_setting_and_seed(tmp_path):
    rows = sw.expand(sw.load_sweep(ABLATIONS, tmp_path / "full"))
    names = [r.name for r in rows]
    assert len(rows) == 3 * 13 and names[:2] == ["s0-fedavg", "s0-f4-m1"] and names[-1] == "s2-sfc3"
    variants = {}
    for row in rows:
        config = row.config
        assert config["data"]["resolution"] == 32 and config["train"]["momentum"] == 0.0
        assert (config["server"]["lr"], config["server"]["momentum"]) == (1.0, 0.0)
        algorithm = config["algorithm"]
        if algorithm["name"] == "fedavg":
            assert "factor" not in algorithm  # the axis replaced the whole section
            continue
        assert (algorithm["scales"], algorithm["weighting"]) == ("global", "samples")
        variants.setdefault(ab.variant_of(algorithm), set()).add(config["seed"])
    assert len(variants) == 12 and all(seeds == {0, 1, 2} for seeds in variants.values())
    wanted = {ab.Variant("osfed", 4, m, "uniform", "bilinear", "fp32") for m in (1, 2, 4, 8)}  # Fig. 10
    wanted |= {ab.Variant("osfed", 8, m, "multiscale", "bilinear", "fp32") for m in (1, 8)}  # Table 8
    wanted |= {ab.Variant("osfed", f, 1, "uniform", u, "fp32") for f in (4, 8)
               for u in ("bilinear", "fsrcnn (server)")}  # Table 9
    wanted |= {ab.Variant("osfed", 4, 4, "uniform", "bilinear", c) for c in ("png", "jpeg q90")}  # D.5
    wanted |= {ab.Variant("3sfc", 1, 1, "uniform", "bilinear", "fp32")}
    assert set(variants) == wanted


def test_quick_subset_keeps_named_labels_and_goes_to_its_own_folder(tmp_path):
    full = sw.load_sweep(ABLATIONS)
    quick = sw.load_sweep(ABLATIONS, quick=True)
    assert quick.name == "osfed-ablations-quick" and quick.out == Path(f"{full.out}-quick")
    rows = sw.expand(quick)
    assert all(r.labels["seed"] == "s0" for r in rows) and len(rows) < len(sw.expand(full)) / 3
    for row in rows:
        assert row.config["rounds"] == 1
        if row.config["algorithm"]["name"] == "fedavg":
            assert "outer_steps" not in row.config["algorithm"]  # quick synthesis settings did not leak into FedAvg
    assert sw.load_sweep(ABLATIONS, tmp_path / "q", quick=True).out == (tmp_path / "q").resolve()


@pytest.mark.parametrize("quick, message", [
    (None, r"--quick needs a 'quick' section"),
    ({"axes": {"a": ["z"]}}, r"quick.axes.a: labels \['z'\] are not labels"),
    ({"axes": {"b": ["x"]}}, r"quick.axes names no axis \['b'\]"),
    ({"colour": 1}, r"quick: unknown keys \['colour'\]"),
])
def test_bad_quick_sections_name_the_problem(tmp_path, quick, message):
    text = {"axes": [{"name": "a", "values": {"x": {"rounds": 1}, "y": {"rounds": 2}}}]}
    if quick is not None:
        text["quick"] = quick
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=message):
        sw.load_sweep(path, tmp_path / "out", quick=True)


def test_quick_accepts_values_of_prefixed_axes(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"axes": [{"name": "seed", "key": "seed", "values": [0, 1], "prefix": "s"}],
                                    "quick": {"axes": {"seed": [1]}, "set": {"rounds": 1}}}))
    rows = sw.expand(sw.load_sweep(path, tmp_path / "out", quick=True))
    assert [r.name for r in rows] == ["s1"] and rows[0].config["seed"] == 1 and rows[0].config["rounds"] == 1


def test_quick_sweep_runs_and_the_report_prints_every_table(tmp_path, capsys):
    """The CI subset end to end: expand it as ``sweep --quick`` does, run each row (1 round, short synthesis)
    on one rank in this process (``sweep --local`` itself is tested in test_sweep_report; an mpirun per row
    would spend most of the time importing torch), then the report lays out all five tables."""
    from osfed_hpc.comm import World
    from osfed_hpc.config import load_config
    from osfed_hpc.runner import Runner

    folder = tmp_path / "quick"
    assert main(["sweep", str(ABLATIONS), "--quick", "--out", str(folder)]) == 0
    for row in sw.read_rows(folder):
        assert Runner(load_config(row["config"]), World(comm=None, rank=0, size=1), Path(row["out"])).run() \
            == "finished"
    capsys.readouterr()
    assert main(["report", str(folder)]) == 0
    text = capsys.readouterr().out
    for heading in HEADINGS:
        assert heading in text, heading
    assert "FedAvg reference (same data, model, training, rounds): " in text
    assert "(n=1)" in text and "n=0" not in text
