"""``osfed-hpc sweep`` (expansion, partitions, submission, local runs) and ``osfed-hpc report``
(Table-10 cells, CSV, PNG) on run directories written here or produced by short real runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from osfed_hpc import report as rp
from osfed_hpc import sweep as sw
from osfed_hpc.cli import main
from osfed_hpc.config import ConfigError, load_config
from osfed_hpc.data import Partition
from tests.fake_slurm import JOBS, ROOT

TABLE10 = ROOT / "configs" / "sweeps" / "imagenet1k_table10.yaml"
PYTHON = sys.executable


# ---------------------------------------------------------------------------------------------
# expansion


def test_table10_sweep_expands_to_18_valid_rows(tmp_path, capsys):
    folder = tmp_path / "t10"
    assert main(["sweep", str(TABLE10), "--out", str(folder)]) == 0
    printed = capsys.readouterr().out
    index = json.loads((folder / "rows.json").read_text())["rows"]
    assert len(index) == 18 and [r["index"] for r in index] == list(range(18))
    assert len({r["out"] for r in index}) == 18 and len({r["name"] for r in index}) == 18
    cells = set()
    for row in index:
        config = load_config(row["config"])  # every written row is a valid config
        assert config.out == row["out"] == str(folder / "runs" / row["name"])
        assert config.data.path == "/data/imagenet-h5" and config.data.alpha == 0.01 and config.data.partition is None
        assert config.model.name == "resnet18_gn" and config.rounds == 100
        if config.algorithm["name"] == "osfed":
            assert config.algorithm_options().factor == 4
        cells.add((config.data.resolution, config.data.clients, config.algorithm["name"]))
    assert cells == {(r, c, m) for r in (224, 336, 448) for c in (20, 40, 60) for m in ("fedavg", "osfed")}
    # the first axis varies slowest: the row index is predictable from the sweep file
    assert [index[i]["name"] for i in (0, 1, 2, 17)] == ["r224-c20-fedavg", "r224-c20-osfed", "r224-c40-fedavg",
                                                          "r448-c60-osfed"]
    tsv = (folder / "rows.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["index", "name", "out", "config", "res", "clients", "method"]
    assert tsv[18].split("\t")[:3] == ["17", "r448-c60-osfed", str(folder / "runs" / "r448-c60-osfed")]
    assert f"sbatch --array=0-17 --job-name=imagenet1k-table10 --output={folder}/logs/%A_%a.out" in printed
    assert printed.rstrip().endswith("(not submitted: add --submit, or --local to run the rows here)")


def test_dry_run_validates_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "dry"
    assert main(["sweep", str(TABLE10), "--out", str(folder), "--dry-run", "--max-parallel", "4"]) == 0
    out = capsys.readouterr().out
    assert "18 rows valid" in out and "sbatch --array=0-17%4 " in out
    assert not folder.exists()


@pytest.mark.parametrize("text, message", [
    ("axes: [{name: a, key: data.resolution, values: [2]}]", r"row 0 \(2\).*data.resolution"),
    ("axes: [{name: a, key: out, values: [x]}]", r"'out' is set by the sweep"),
    ("axes: [{name: a, values: {x: {rounds: 1}, y: {rounds: 2}}, colour: red}]", r"unknown keys \['colour'\]"),
    ("axes: [{name: a, key: rounds, values: [1, 1]}]", r"labels repeat"),
    ("axes: [{name: a, key: rounds, values: [1]}]\nbase: nope.yaml", r"base config .* does not exist"),
    ("axes: [{name: a, key: trian.lr, values: [0.1]}]", r"unknown config key 'trian'"),
    ("axes: []", r"'axes' must be a non-empty list"),
])
def test_bad_sweeps_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        sw.expand(sw.load_sweep(path, tmp_path / "out"))


def _huge_sweep(path: Path, axes: int = 7, values: int = 10) -> Path:
    """``axes`` axes of ``values`` rounds each: values ** axes rows (10**7 by default)."""
    lines = ["axes:"]
    for k in range(axes):
        lines.append(f"  - {{name: a{k}, key: rounds, values: {list(range(1, values + 1))}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_sweep_of_ten_million_rows_is_refused_before_expanding(tmp_path, capsys):
    """10**7 rows used to hang while memory grew; now the count is refused from the axis lengths."""
    path = _huge_sweep(tmp_path / "huge.yaml")
    message = (rf"^sweep {path}: 10,000,000 rows \(a0 10 x a1 10 x a2 10 x a3 10 x a4 10 x a5 10 x a6 10\) "
               rf"is more than the limit of 10,000 rows per sweep")
    with pytest.raises(ConfigError, match=message):
        sw.load_sweep(path, tmp_path / "out")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huge.yaml: 10,000,000 rows" in err and "MaxArraySize" in err
    assert not (tmp_path / "out").exists()


def test_row_limit_is_inclusive_and_expand_checks_it_too(tmp_path):
    assert sw.MAX_ROWS == 10_000
    at_limit = sw.load_sweep(_huge_sweep(tmp_path / "ok.yaml", axes=4, values=10), tmp_path / "out")
    assert sw.check_row_count(at_limit.source, [(a.name, len(a.labels)) for a in at_limit.axes]) == 10_000
    at_limit.axes.append(sw.Axis("extra", ["x", "y"], [{}, {}]))  # a Sweep built or changed in code
    with pytest.raises(ConfigError, match=r"ok\.yaml: 20,000 rows .* x extra 2\)"):
        sw.expand(at_limit)


def test_a_shorter_reexpansion_leaves_no_stale_rows(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("axes: [{name: r, key: rounds, values: [1, 2, 3]}]\n")
    sweep = sw.load_sweep(path, tmp_path / "out")
    sw.write_rows(sweep, sw.expand(sweep))
    path.write_text("axes: [{name: r, key: rounds, values: [1]}]\n")
    sweep = sw.load_sweep(path, tmp_path / "out")
    sw.write_rows(sweep, sw.expand(sweep))
    assert sorted(p.name for p in (tmp_path / "out" / "rows").iterdir()) == ["0.yaml"]


# ---------------------------------------------------------------------------------------------
# submission: an argument list, no shell


RECORDING_SBATCH = """#!{python}
import json, os, sys
with open(os.environ["SBATCH_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "osfed_root": os.environ.get("OSFED_ROOT")}}) + "\\n")
print("Submitted batch job 9")
sys.exit(int(os.environ.get("SBATCH_EXIT", "0")))
"""


def test_submit_runs_sbatch_with_an_argument_list(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(RECORDING_SBATCH.format(python=PYTHON))
    (bin_dir / "sbatch").chmod(0o755)
    record = tmp_path / "sbatch.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(record))
    monkeypatch.delenv("OSFED_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # no jobs/ here: the script and OSFED_ROOT come from the checkout
    folder = tmp_path / "a sweep; $(touch PWNED) `touch PWNED2`"
    code = main(["sweep", str(TABLE10), "--out", str(folder), "--submit", "--max-parallel", "6",
                 "--sbatch-arg=--partition=gpu", "--sbatch-arg", "--account=x y"])
    assert code == 0
    [entry] = [json.loads(line) for line in record.read_text().splitlines()]
    assert entry["argv"] == ["--array=0-17%6", "--job-name=imagenet1k-table10", f"--output={folder}/logs/%A_%a.out",
                             "--partition=gpu", "--account=x y", str(JOBS / "sweep.slurm"), str(folder)]
    assert entry["osfed_root"] == str(ROOT)
    assert not list(tmp_path.rglob("PWNED*")) and not (ROOT / "PWNED").exists()
    assert (folder / "logs").is_dir()  # sbatch refuses an --output folder that does not exist
    monkeypatch.setenv("SBATCH_EXIT", "1")
    assert main(["sweep", str(TABLE10), "--out", str(folder), "--submit"]) == 1


# ---------------------------------------------------------------------------------------------
# partitions once per client count, local runs, and a report of real runs


def _digits_sweep(tmp_path: Path, data: Path, methods: bool = False) -> Path:
    method_axis = """
  - name: method
    values:
      fedavg: {algorithm: {name: fedavg}}
      osfed: {algorithm: {name: osfed, factor: 2, outer_steps: 1, lbfgs_max_iter: 2}}""" if methods else ""
    path = tmp_path / "digits_sweep.yaml"
    path.write_text(f"""
name: digits
set:
  data.path: {data}
  data.source: digits
  data.alpha: 1.0
  model.name: cnn
  rounds: 1
  runtime.threads: 1
  train.local_steps: 2
axes:
  - name: clients
    key: data.clients
    values: [2, 3]
    prefix: c{method_axis}
""")
    return path


def test_partitions_are_made_once_per_client_count(tmp_path):
    data = tmp_path / "digits"
    sweep = sw.load_sweep(_digits_sweep(tmp_path, data, methods=True), tmp_path / "sweep")
    rows = sw.expand(sweep)
    assert len(rows) == 4
    lines: list[str] = []
    made = sw.ensure_data(rows, log=lines.append)
    expected = [Partition.default_path(data, "dirichlet", n, 1.0, 0) for n in (2, 3)]
    assert made == expected and all(p.is_file() for p in expected)
    assert sum("preparing digits" in line for line in lines) == 1
    assert sum("wrote partition" in line for line in lines) == 2
    lines.clear()
    sw.ensure_data(rows, log=lines.append)
    assert sum("exists (reused)" in line for line in lines) == 2


FAKE_MPIRUN = """#!{python}
import json, os, sys, time
import yaml
args = sys.argv[1:]  # -n N python -m osfed_hpc run ROW.yaml [--resume OUT]
out = yaml.safe_load(open(args[args.index("run") + 1]))["out"]
events = os.environ["FAKE_EVENTS"]
with open(events, "a") as handle:
    handle.write(json.dumps(["start", out, time.monotonic()]) + "\\n")
print("row output of", out, flush=True)
time.sleep(0.8)
with open(events, "a") as handle:
    handle.write(json.dumps(["end", out, time.monotonic()]) + "\\n")
if os.environ.get("FAKE_FAIL") and out.endswith(os.environ["FAKE_FAIL"]):
    sys.exit(3)
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "summary.json"), "w").write("{{}}")
"""


def test_local_sweep_runs_rows_in_parallel_with_a_log_each(tmp_path, monkeypatch):
    """--parallel 2: never more than two rows at once, at some point two, every row's output in its own
    log; a failing row does not stop the others and makes the sweep fail; a rerun does only that row."""
    folder = tmp_path / "sweep"
    plan = sw.load_sweep(_digits_sweep(tmp_path, tmp_path / "digits", methods=True), folder)
    rows = sw.expand(plan)
    sw.write_rows(plan, rows)
    fake = tmp_path / "fake-mpirun"
    fake.write_text(FAKE_MPIRUN.format(python=sys.executable))
    fake.chmod(0o755)
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("FAKE_EVENTS", str(events))
    monkeypatch.setenv("FAKE_FAIL", rows[1].name)
    lines: list[str] = []
    assert sw.run_local(folder, 2, str(fake), log=lines.append, parallel=2) == 1
    log = [json.loads(line) for line in events.read_text().splitlines()]
    running, most = 0, 0
    for kind, _, _ in sorted(log, key=lambda event: event[2]):
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert most == 2
    assert sum(kind == "start" for kind, _, _ in log) == 4
    for row in rows:
        assert (Path(row.out) / "summary.json").is_file() == (row.name != rows[1].name)
        text = (folder / "logs" / f"local-{row.index}-{row.name}.log").read_text()
        assert f"row output of {row.out}" in text
    assert lines[-1] == f"[sweep] 1 row(s) failed: {rows[1].name}"
    monkeypatch.delenv("FAKE_FAIL")
    lines.clear()
    assert sw.run_local(folder, 2, str(fake), log=lines.append, parallel=2) == 0
    assert sum("finished already" in line for line in lines) == 3 and (Path(rows[1].out) / "summary.json").is_file()


@pytest.mark.slow
def test_local_sweep_then_report(tmp_path, capsys):
    data = tmp_path / "digits"
    folder = tmp_path / "sweep"
    path = _digits_sweep(tmp_path, data)
    assert main(["sweep", str(path), "--out", str(folder), "--local", "--np", "2"]) == 0
    for name in ("c2", "c3"):
        assert json.loads((folder / "runs" / name / "summary.json").read_text())["world_size"] == 2
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", str(folder), "--local", "--np", "2"]) == 0
    assert capsys.readouterr().out.count("finished already") == 2
    report_dir = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(report_dir)]) == 0  # a sweep folder stands for its rows
    csv_lines = (report_dir / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("run,algorithm,model,clients")
    assert (report_dir / "accuracy_vs_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sweep_array_runs_each_row_through_sweep_slurm(jpeg_data, fake_slurm, tmp_path):  # noqa: F811
    """osfed-hpc sweep --submit -> sbatch --array (stub, --wait) -> jobs/sweep.slurm row i -> its own out."""
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(f"""
base: {ROOT / 'configs' / 'imagenet1k.yaml'}
name: tiny
set:
  data.path: {jpeg_data}
  data.alpha: 1.0
  data.num_workers: 0
  runtime.threads: 1
  runtime.device: cpu
  model.name: cnn
  rounds: 2
  train.local_steps: 2
axes:
  - name: res
    key: data.resolution
    values: [32]
    prefix: r
  - name: clients
    key: data.clients
    values: [2, 3]
    prefix: c
""")
    folder = tmp_path / "sweep"
    result = subprocess.run([PYTHON, "-m", "osfed_hpc", "sweep", str(sweep), "--out", str(folder), "--submit",
                             "--sbatch-arg=--wait"], cwd=ROOT, env=dict(fake_slurm, FAKE_NTASKS="2", FAKE_JOB_ID="77"),
                            capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted((folder / "logs").glob("*.out")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    argv = json.loads((Path(fake_slurm["FAKE_SLURM_DIR"]) / "sbatch.jsonl").read_text().splitlines()[0])
    assert argv[0] == "--array=0-1" and argv[-2:] == ["jobs/sweep.slurm", str(folder)]
    assert sorted(p.name for p in (folder / "logs").glob("*.out")) == ["77_0.out", "77_1.out"]
    for name, clients in (("r32-c2", 2), ("r32-c3", 3)):
        summary = json.loads((folder / "runs" / name / "summary.json").read_text())
        assert summary["num_clients"] == clients and summary["rounds"] == 2 and summary["world_size"] == 2
    for clients in (2, 3):  # made once by 'osfed-hpc sweep', before the array started
        assert Partition.default_path(jpeg_data, "dirichlet", clients, 1.0, 0).is_file()
    assert "wrote partition" in result.stdout


# ---------------------------------------------------------------------------------------------
# report on synthetic run directories: the numbers of the paper's Table 10

PAPER = {  # (resolution, clients) -> (FedAvg, OS-Fed) top-1 %
    (224, 20): (37.3, 37.0), (224, 40): (36.5, 36.6), (224, 60): (35.8, 35.1),
    (336, 20): (38.5, 38.7), (336, 40): (38.1, 37.7), (336, 60): (37.7, 38.0),
    (448, 20): (41.3, 41.5), (448, 40): (40.6, 40.6), (448, 60): (39.1, 38.7),
}
MEMORY_GB = {224: 4.55, 336: 8.8, 448: 14.9}
SECONDS = {224: 3.6, 336: 5.3, 448: 7.5}


def _write_run(folder: Path, algorithm: str, resolution: int, clients: int, accuracy: float) -> Path:
    """summary.json + metrics.jsonl as the runner writes them (3 rounds, evaluated in rounds 2 and 3).

    Per-client seconds average to SECONDS[resolution] over clients and rounds (spread +-0.5 s), and the
    largest peak memory, reached once, is MEMORY_GB[resolution] at 60 clients (less at 20 and 40).
    """
    folder.mkdir(parents=True)
    payload = 666_116 if algorithm == "osfed" else 46_758_048
    records, total = [], 0
    for round_ in (1, 2, 3):
        total += payload * clients
        seconds = [SECONDS[resolution] + (0.5 if i % 2 else -0.5) for i in range(clients)]
        peak_gb = MEMORY_GB[resolution] * (clients / 60)
        memory = [peak_gb * 1e9 * (1.0 if (i == 0 and round_ == 2) else 0.9) for i in range(clients)]
        record = {"round": round_, "clients": list(range(clients)), "train_loss": 1.0,
                  "uplink_bytes": payload * clients, "uplink_bytes_total": total,
                  "downlink_bytes": 1, "downlink_bytes_total": round_, "mpi_bytes": 1, "rejected": 0,
                  "seconds": {"round": 10.0},
                  "client_stats": {"seconds": seconds, "peak_memory_bytes": memory,
                                   "payload_bytes": [payload] * clients, "num_samples": [100] * clients}}
        if round_ > 1:
            record.update(test_accuracy=accuracy / 100 - (0.01 if round_ == 2 else 0.0), test_loss=2.0)
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"name": folder.name, "algorithm": algorithm, "model": "resnet18_gn", "rounds": 3,
               "final_accuracy": accuracy / 100, "uplink_bytes": total, "downlink_bytes": 3,
               "uplink_bytes_per_client_round": payload, "wall_seconds": 30.0, "world_size": 8,
               "num_clients": clients, "resolution": resolution, "model_sha256": "0" * 64}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture()
def paper_runs(tmp_path) -> list[Path]:
    runs = []
    for (res, clients), (fedavg, osfed) in PAPER.items():
        runs.append(_write_run(tmp_path / "runs" / f"r{res}-c{clients}-fedavg", "fedavg", res, clients, fedavg))
        runs.append(_write_run(tmp_path / "runs" / f"r{res}-c{clients}-osfed", "osfed", res, clients, osfed))
    return runs


def test_report_lays_out_table10(paper_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, paper_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "| resolution | 20 clients | 40 clients | 60 clients | OS-Fed memory / client | OS-Fed time / client |" in md
    assert "| 224² | 37.3 / 37.0 | 36.5 / 36.6 | 35.8 / 35.1 | 4.55 GB | 3.60 s |" in md
    assert "| 336² | 38.5 / 38.7 | 38.1 / 37.7 | 37.7 / 38.0 | 8.80 GB | 5.30 s |" in md
    assert "| 448² | 41.3 / 41.5 | 40.6 / 40.6 | 39.1 / 38.7 | 14.90 GB | 7.50 s |" in md
    assert "| 224² | 37.3 / 37.0 |" in printed
    # the side-by-side comparison is still there, with the ratio to FedAvg
    assert md.startswith("| " + " | ".join(rp.COLUMNS) + " |")
    assert "| r224-c20-osfed | osfed | resnet18_gn | 20 | 224 | 3 | 37.00% | 666,116 |" in md
    assert "70.2x" in md  # 46,758,048 / 666,116
    cells = (out / "table10.csv").read_text().splitlines()
    assert cells[0] == ",".join(rp.TABLE10_COLUMNS) and len(cells) == 10
    first = dict(zip(rp.TABLE10_COLUMNS, cells[1].split(",")))
    assert (first["resolution"], first["clients"], first["fedavg_run"], first["osfed_run"]) == (
        "224", "20", "r224-c20-fedavg", "r224-c20-osfed")
    assert float(first["osfed_top1"]) == pytest.approx(37.0)
    assert float(first["osfed_client_seconds_mean"]) == pytest.approx(3.6)
    assert float(first["osfed_client_peak_memory_bytes"]) == pytest.approx(4.55e9 / 3)
    per_run = (out / "report.csv").read_text().splitlines()
    assert per_run[0].split(",") == list(rp.RUN_COLUMNS) and len(per_run) == 19
    for name in ("accuracy_vs_round.png", "accuracy_vs_uplink.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_of_a_sweep_folder_and_missing_cells(paper_runs, tmp_path, capsys):
    """A sweep folder stands for its finished rows; an unfinished row is named, missing cells are '-'."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    rows = [{"index": i, "name": p.name, "out": str(p)} for i, p in enumerate(paper_runs)
            if p.name.startswith("r224") and p.name != "r224-c60-osfed"]
    rows.append({"index": 99, "name": "unfinished", "out": str(tmp_path / "nowhere")})
    (folder / "rows.json").write_text(json.dumps({"rows": rows}))
    assert rp.run_report([str(folder)]) == 0
    captured = capsys.readouterr()
    assert "1 of 6 rows have not finished; reporting 5" in captured.err
    assert "| 224² | 37.3 / 37.0 | 36.5 / 36.6 | 35.8 / - | 3.03 GB | 3.60 s |" in captured.out


def test_existing_report_api_still_works(paper_runs):
    summaries = [rp.load_summary(p) for p in paper_runs[:2]]
    rows = rp.compare(summaries)
    assert rows[1]["uplink_ratio_vs_fedavg"] == pytest.approx(46_758_048 / 666_116)
    assert rp.markdown(rows).splitlines()[0] == "| " + " | ".join(rp.COLUMNS) + " |"
    assert rp.to_csv(rows).splitlines()[0] == ",".join(rp.COLUMNS)
    with pytest.raises(Exception, match="no summary.json"):
        rp.load_summary(paper_runs[0].parent)
