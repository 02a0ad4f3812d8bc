"""Bad input ends as ONE line ``osfed-hpc run: error: ...`` naming the key or file and what was expected,
exit code 2, before any training; and nothing a run already wrote is lost (malformed or tampered
checkpoints are refused, a full disk keeps the previous checkpoint usable).

Also: honest device selection (``runtime.device: auto`` inside a GPU allocation), the
``runtime.deterministic`` setting, and checkpoint files hashed by the rank that writes them.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from osfed_hpc import atomic, devices
from osfed_hpc import checkpoint as ckpt
from osfed_hpc.client_state import load_arrays
from osfed_hpc.config import Config, ConfigError, load_config
from osfed_hpc.errors import CheckpointError, RunError
from tests.conftest import small_run_overrides
from tests.test_run_e2e import osfed

ERROR = "osfed-hpc run: error: "


def one_error_line(result) -> str:
    """The CLI stopped on bad input: exit 2, no round trained, stderr exactly one error line."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "round    1 |" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def cli(monkeypatch, capsys):
    """``osfed-hpc run ARGS`` in this process for input the config checks must refuse: reaching MPI
    (the input was accepted and a run would start) fails the test instead of training."""
    from osfed_hpc import cli as cli_module
    from osfed_hpc.comm import World

    def accepted(cls, comm=None):
        raise AssertionError("the bad input was accepted: the run went on to start MPI")

    monkeypatch.setattr(World, "from_mpi", classmethod(accepted))

    def run(*args: str) -> str:
        code = cli_module.main(["run", *args])
        err = capsys.readouterr().err
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(ERROR), err
        return lines[0]

    return run


@pytest.fixture
def process_state():
    """In-process Runners install signal handlers and set torch's global numerics: put them back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    flags = _torch_flags()
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    _set_torch_flags(flags)


def _torch_flags() -> tuple:
    b = torch.backends
    return (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled())


def _set_torch_flags(flags: tuple) -> None:
    b = torch.backends
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic = flags[:4]
    torch.use_deterministic_algorithms(flags[4], warn_only=True)


STRICT = (False, False, False, True, True)
RELAXED = (True, True, True, False, False)


def run_in_process(config: Config, out: Path, resume: bool = False) -> str:
    """A one-rank run (server and worker) in this process, no MPI."""
    from osfed_hpc.comm import World
    from osfed_hpc.runner import Runner

    return Runner(config, World(comm=None, rank=0, size=1), out, resume=resume).run()


# ---------------------------------------------------------------------------------------------
# run directory, config file, config values


def test_out_naming_an_existing_file(digits_dir, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    line = one_error_line(osfed("run", *small_run_overrides(digits_dir, target)))
    assert line == (f"{ERROR}out={str(target)!r} is an existing file, expected a run directory (a new or empty "
                    f"one); choose another out=")
    assert target.read_text() == "precious"


def test_config_file_that_is_not_utf8(cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xff\xfe")
    line = cli(str(config))
    assert line == (f"{ERROR}config file {str(config)!r} is not UTF-8 text (byte 0xff at offset 0: invalid start "
                    f"byte); save it as UTF-8")


@pytest.mark.parametrize("override, key", [
    (f"seed={2**70}", "seed"), ("seed=-1", "seed"), (f"seed={2**64}", "seed"),
    ("data.partition_seed=-1", "data.partition_seed"), (f"data.partition_seed={2**64}", "data.partition_seed"),
])
def test_seed_outside_64_bits(cli, override, key):
    line = cli(override)
    assert line.startswith(f"{ERROR}config key {key!r}: got ")
    assert line.endswith("expected an integer in [0, 2**64 - 1] (seeds feed numpy SeedSequence and torch.manual_seed)")


def test_largest_seed_is_accepted():
    assert load_config(None, [f"seed={2**64 - 1}"]).seed == 2**64 - 1


@pytest.mark.parametrize("override, key", [
    ("train.weight_decay=.inf", "train.weight_decay"), ("train.weight_decay=.nan", "train.weight_decay"),
    ("train.lr=.nan", "train.lr"), ("train.grad_clip=.inf", "train.grad_clip"), ("server.lr=.nan", "server.lr"),
    ("data.alpha=.inf", "data.alpha"),
])
def test_non_finite_float_options(cli, override, key):
    line = cli("data.path=/nonexistent", override)
    assert line.startswith(f"{ERROR}config key {key!r}: got ")


def _float_keys() -> list[str]:
    """Every float option of the config sections and of every algorithm's options."""
    from osfed_hpc.algorithms import algorithm_names, get_algorithm

    def floats(cls) -> list[str]:
        hints = typing.get_type_hints(cls)
        return [f.name for f in dataclasses.fields(cls)
                if hints[f.name] is float or float in typing.get_args(hints[f.name])]

    keys = []
    for section in ("data", "train", "server", "eval", "runtime"):
        cls = typing.get_type_hints(Config)[section]
        keys += [f"{section}.{name}" for name in floats(cls)]
    for name in algorithm_names():
        keys += [f"algorithm.name={name} algorithm.{option}" for option in floats(get_algorithm(name).Options)]
    return keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_option_must_be_finite(key, value):
    *setup, key = key.split()
    with pytest.raises(ConfigError) as info:
        load_config(None, [*setup, f"{key}={value}"])
    assert key in str(info.value)


def test_more_clients_than_training_samples(digits_dir, tmp_path):
    line = one_error_line(osfed("run", *small_run_overrides(digits_dir, tmp_path / "r"), "data.clients=1000000000"))
    assert line == (f"{ERROR}config key 'data.clients': got 1000000000, expected at most 1438 (the training "
                    f"samples of {digits_dir}: every client needs at least one)")
    assert not list((digits_dir / "partitions").glob("*n1000000000*"))
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# checkpoints: malformed manifests, digests, non-finite models


@pytest.fixture(scope="module")
def finished_run(digits_dir, tmp_path_factory) -> Path:
    """A one-round run with its checkpoint (server.npz and the 6 clients' state)."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    result = osfed("run", *small_run_overrides(digits_dir, out, rounds=1))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def _config_of(run: Path) -> dict:
    return load_config(run / "config.yaml").to_dict()


def _manifest(run: Path) -> Path:
    return ckpt.latest_checkpoint(run) / "manifest.json"


def _drop(key):
    return lambda m: m.pop(key)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _server_entry(change):
    return lambda m: change(m["files"]["server.npz"])


MALFORMED = {
    "not JSON": b'{"round": 1, "files":',
    "not UTF-8": b"\xff\xfe{}",
    "a list": b"[]",
    "a string": b'"round-1"',
    "no round": _drop("round"),
    "no files": _drop("files"),
    "no config_digest": _drop("config_digest"),
    "round a string": _set("round", "1"),
    "round a float": _set("round", 1.5),
    "round a bool": _set("round", True),
    "round negative": _set("round", -1),
    "config_digest a number": _set("config_digest", 7),
    "files a list": _set("files", []),
    "entry without bytes": _server_entry(lambda e: e.pop("bytes")),
    "entry without sha256": _server_entry(lambda e: e.pop("sha256")),
    "bytes a string": _server_entry(lambda e: e.__setitem__("bytes", "12")),
    "sha256 a number": _server_entry(lambda e: e.__setitem__("sha256", 12)),
    "entry not an object": lambda m: m["files"].__setitem__("server.npz", 3),
    "config a list": _set("config", []),
    "totals a list": _set("totals", [1]),
    "wall_seconds a string": _set("wall_seconds", "1 h"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_is_a_checkpoint_error_naming_it(run_copy, case):
    path = _manifest(run_copy)
    change = MALFORMED[case]
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        checkpoint = ckpt.Checkpoint(path.parent, _config_of(run_copy))
        checkpoint.server()
        for client in range(6):
            checkpoint.client_state(client)
    message = str(info.value)
    assert message.startswith(f"checkpoint manifest {path}: ") and "\n" not in message


def test_malformed_manifest_stops_a_resume_with_one_line(run_copy):
    path = _manifest(run_copy)
    manifest = json.loads(path.read_text())
    manifest["round"] = "1"
    path.write_text(json.dumps(manifest))
    metrics = (run_copy / "metrics.jsonl").read_text()
    line = one_error_line(osfed("run", "--resume", str(run_copy), "rounds=2"))
    assert line == f"{ERROR}checkpoint manifest {path}: 'round' is '1', expected an integer >= 0"
    assert (run_copy / "metrics.jsonl").read_text() == metrics


def test_digest_change_without_a_differing_key_says_so(run_copy):
    path = _manifest(run_copy)
    manifest = json.loads(path.read_text())
    manifest["config_digest"] = "0" * 64  # as if another version computed it another way
    path.write_text(json.dumps(manifest))
    config = _config_of(run_copy)
    with pytest.raises(CheckpointError) as info:
        ckpt.Checkpoint(path.parent, config)
    assert str(info.value) == (
        f"checkpoint {path.parent}: its config digest {'0' * 64} differs from this config's "
        f"{ckpt.config_digest(config)}, though no model-defining key differs: it was probably written by another "
        f"osfed-hpc version (another digest recipe); resume it with that version, or start a new run")


def test_digest_names_a_key_that_differs_only_in_its_json_type(run_copy):
    """1.0 == 1 in Python, but not in the digest: the message used to say 'differing keys: ?'."""
    path = _manifest(run_copy)
    manifest = json.loads(path.read_text())
    manifest["config"]["seed"] = float(manifest["config"]["seed"])
    manifest["config"]["algorithm"]["extra"] = [1, 2]
    manifest["config_digest"] = ckpt.config_digest(manifest["config"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        ckpt.Checkpoint(path.parent, _config_of(run_copy))
    assert str(info.value) == (f"checkpoint {path.parent} was written by a different config; differing keys: "
                               f"algorithm.extra (checkpoint: [1, 2], now: absent); seed (checkpoint: 1.0, now: 1)")


def test_changed_value_is_named_with_both_values(run_copy):
    result = osfed("run", "--resume", str(run_copy), "rounds=2", "train.lr=0.5")
    line = one_error_line(result)
    assert line == (f"{ERROR}checkpoint {ckpt.latest_checkpoint(run_copy)} was written by a different config; "
                    f"differing keys: train.lr (checkpoint: 0.05, now: 0.5)")


def test_model_with_non_finite_values_is_refused_even_with_matching_hashes(run_copy):
    directory = ckpt.latest_checkpoint(run_copy)
    server = directory / "server.npz"
    arrays = load_arrays(server)
    arrays["vector"][[0, 5, 9]] = [np.nan, np.inf, -np.inf]
    with open(server, "wb") as handle:
        np.savez(handle, **arrays)
    data = server.read_bytes()
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["server.npz"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    metrics = (run_copy / "metrics.jsonl").read_text()
    line = one_error_line(osfed("run", "--resume", str(run_copy), "rounds=2"))
    size = arrays["vector"].size
    assert line == (f"{ERROR}checkpoint {directory}: the model in server.npz holds 3 non-finite values (NaN or Inf) "
                    f"of {size}; it cannot be resumed from")
    assert (run_copy / "metrics.jsonl").read_text() == metrics


# ---------------------------------------------------------------------------------------------
# a full disk while writing a checkpoint or results


def _full_disk_at(monkeypatch, suffix: str, code: int = errno.ENOSPC) -> None:
    real = atomic.write_bytes_atomic

    def write(path, data):
        if str(path).endswith(suffix):
            raise OSError(code, os.strerror(code))
        return real(path, data)

    monkeypatch.setattr(atomic, "write_bytes_atomic", write)


@pytest.mark.parametrize("relative, intact, code", [
    ("checkpoints/round-000002/clients/client-00003.npz", 1, errno.ENOSPC),
    ("checkpoints/round-000002/server.npz", 1, errno.ENOSPC),
    ("checkpoints/round-000002/manifest.json", 1, errno.ENOSPC),
    ("checkpoints/latest.json", 1, errno.EDQUOT),  # round 1 is complete: its manifest was written
    ("summary.json", 3, errno.ENOSPC),
])
def test_full_disk_is_one_error_and_the_previous_checkpoint_stays_usable(
        digits_dir, tmp_path, monkeypatch, process_state, relative, intact, code):
    out = tmp_path / "run"
    config = load_config(None, small_run_overrides(digits_dir, out, rounds=3) + ["runtime.checkpoint_every=1"])
    _full_disk_at(monkeypatch, relative, code)
    with pytest.raises(RunError) as info:
        run_in_process(config, out)
    written = out / relative
    reason = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
    assert str(info.value) == (f"{reason} while writing {written}; the previous checkpoint round-{intact:06d} is "
                               f"intact (free space, then resume with 'osfed-hpc run --resume {out}')")
    latest = ckpt.latest_checkpoint(out)
    assert latest.name == f"round-{intact:06d}"
    checkpoint = ckpt.Checkpoint(latest, config.to_dict())
    vector, _ = checkpoint.server()
    assert all(checkpoint.client_state(c) for c in range(6)) and np.isfinite(vector).all()
    assert not list(out.rglob(f"*{atomic.TMP_MARK}*"))  # no half-written temporaries left behind


def test_after_a_full_disk_the_run_resumes_to_the_same_model(digits_dir, tmp_path, monkeypatch, process_state):
    full, out = tmp_path / "full", tmp_path / "run"
    args = ["runtime.checkpoint_every=1"]
    assert run_in_process(load_config(None, small_run_overrides(digits_dir, full, rounds=3) + args), full) == "finished"
    with monkeypatch.context() as patch:
        _full_disk_at(patch, "round-000002/clients/client-00004.npz")
        with pytest.raises(RunError, match=r"client-00004\.npz; the previous checkpoint round-000001 is intact"):
            run_in_process(load_config(None, small_run_overrides(digits_dir, out, rounds=3) + args), out)
    resumed = load_config(out / "config.yaml", [f"out={out}"])
    assert run_in_process(resumed, out, resume=True) == "finished"
    summary = lambda run: json.loads((run / "summary.json").read_text())  # noqa: E731
    assert summary(out)["model_sha256"] == summary(full)["model_sha256"]
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_full_disk_while_logging_a_round(digits_dir, tmp_path, monkeypatch, process_state):
    from osfed_hpc.metrics import MetricsLog

    out = tmp_path / "run"
    real = MetricsLog.append

    def append(self, record):
        if record["round"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record)

    monkeypatch.setattr(MetricsLog, "append", append)
    config = load_config(None, small_run_overrides(digits_dir, out, rounds=3) + ["runtime.checkpoint_every=1"])
    with pytest.raises(RunError) as info:
        run_in_process(config, out)
    assert str(info.value).startswith(f"no space left on device while writing {out / 'metrics.jsonl'}; the previous "
                                      f"checkpoint round-000001 is intact")


def test_other_os_errors_are_not_disguised(tmp_path):
    with pytest.raises(PermissionError):
        with ckpt.disk_full_guard(tmp_path / "x", tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")


# ---------------------------------------------------------------------------------------------
# checkpoint files hashed by their writers


def test_write_client_states_returns_what_it_wrote(tmp_path):
    directory = ckpt.checkpoint_dir(tmp_path, 4)
    ckpt.begin_checkpoint(directory)
    states = {7: {"r": np.arange(5, dtype=np.float32)}, 3: {}, 2: {"n": np.ones(2)}}
    records = ckpt.write_client_states(directory, states)
    assert list(records) == ["clients/client-00002.npz", "clients/client-00007.npz"]
    for relative, record in records.items():
        data = (directory / relative).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert load_arrays(directory / "clients/client-00007.npz")["r"].tolist() == [0, 1, 2, 3, 4]
    # rank 0 gets every rank's records as bytes (rank 0 itself may host none)
    parts = [ckpt.encode_file_records({}), ckpt.encode_file_records(records), ckpt.encode_file_records({"x": {}})]
    counts = np.array([p.size for p in parts])
    assert ckpt.decode_file_records(np.concatenate(parts), counts) == {**records, "x": {}}


def test_rank0_never_reads_client_files_back(digits_dir, tmp_path, monkeypatch, process_state):
    real = ckpt._sha256

    def hash_file(path):
        assert "clients" not in Path(path).parts, f"rank 0 read {path} back to hash it"
        return real(path)

    monkeypatch.setattr(ckpt, "_sha256", hash_file)
    out = tmp_path / "run"
    config = load_config(None, small_run_overrides(digits_dir, out, rounds=2) + ["runtime.checkpoint_every=1"])
    assert run_in_process(config, out) == "finished"
    for directory in sorted(out.glob("checkpoints/round-*")):
        manifest = json.loads((directory / "manifest.json").read_text())
        on_disk = sorted(str(p.relative_to(directory)) for p in directory.rglob("*.npz"))
        expected = sorted(["server.npz", *(f"clients/client-{c:05d}.npz" for c in range(6))])
        assert sorted(manifest["files"]) == on_disk == expected
        for relative, record in manifest["files"].items():
            data = (directory / relative).read_bytes()
            assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_leftovers_of_an_interrupted_checkpoint_are_not_in_the_manifest(tmp_path):
    directory = ckpt.checkpoint_dir(tmp_path, 2)
    (directory / "clients").mkdir(parents=True)
    np.savez(directory / "clients" / "client-00099.npz", stale=np.zeros(1))
    ckpt.begin_checkpoint(directory)
    records = ckpt.write_client_states(directory, {1: {"r": np.ones(3, np.float32)}})
    ckpt.write_server_part(directory, 2, np.zeros(4, np.float32), {}, {"seed": 0}, "0" * 64, {}, client_files=records)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["clients/client-00001.npz", "server.npz"]
    assert not (directory / "clients" / "client-00099.npz").exists()
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text()) == {"round": 2, "dir": directory.name}


# ---------------------------------------------------------------------------------------------
# devices: auto never hides a broken CUDA inside a GPU allocation


GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS",
                 "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def no_cuda(monkeypatch):
    for name in GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("variable, value", [
    ("SLURM_GPUS_ON_NODE", "4"), ("SLURM_GPUS", "a100:2"), ("SLURM_GPUS_PER_TASK", "1"),
    ("SLURM_STEP_GPUS", "0,1"), ("SLURM_JOB_GPUS", "0"), ("CUDA_VISIBLE_DEVICES", "0"),
    ("CUDA_VISIBLE_DEVICES", "GPU-5e1c0b7a"),
])
def test_auto_refuses_the_cpu_inside_a_gpu_allocation(no_cuda, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(RunError) as info:
        devices.select_device("auto")
    assert str(info.value) == (
        f"runtime.device is 'auto' and this job holds GPUs ({variable}={value}), but CUDA is not usable: "
        f"{devices.cuda_status()[1]}; fix the CUDA setup (driver, modules, --gpus), or set runtime.device: cpu to "
        f"run on CPU anyway")
    assert devices.select_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("variable, value", [
    ("CUDA_VISIBLE_DEVICES", ""), ("CUDA_VISIBLE_DEVICES", "-1"), ("CUDA_VISIBLE_DEVICES", "NoDevFiles"),
    ("SLURM_GPUS_ON_NODE", "0"), ("SLURM_GPUS", "a100:0"), (None, None),
])
def test_auto_uses_the_cpu_without_a_gpu_allocation(no_cuda, monkeypatch, variable, value):
    if variable:
        monkeypatch.setenv(variable, value)
    assert devices.gpu_allocation() is None
    assert devices.select_device("auto") == torch.device("cpu")


def test_cuda_initialisation_errors_are_reported(no_cuda, monkeypatch, capsys):
    if not torch.backends.cuda.is_built():
        pytest.skip("this PyTorch has no CUDA: is_available is never asked")

    def old_driver():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).",
                      stacklevel=2)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    with pytest.raises(RunError, match=r"^runtime.device is 'cuda' but CUDA is not usable on this rank: CUDA "
                                       r"initialization: The NVIDIA driver on your system is too old"):
        devices.select_device("cuda")
    assert devices.select_device("auto") == torch.device("cpu")  # no allocation: CPU, but not silently
    assert "CUDA is not usable (CUDA initialization: The NVIDIA driver" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    with pytest.raises(RunError, match=r"\(SLURM_JOB_GPUS=3\), but CUDA is not usable: CUDA initialization: The "
                                       r"NVIDIA driver on your system is too old"):
        devices.select_device("auto")

    def broken_count():
        raise RuntimeError("CUDA error: initialization error\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", broken_count)
    with pytest.raises(RunError) as info:
        devices.select_device("auto")
    assert ("torch.cuda.device_count() failed: RuntimeError: CUDA error: initialization error CUDA kernel errors "
            "might be asynchronously reported; fix the CUDA setup") in str(info.value)


def test_gpu_allocation_without_cuda_stops_the_cli_before_training(digits_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA works on this machine")
    env = {"SLURM_GPUS_ON_NODE": "1"}
    line = one_error_line(osfed("run", *small_run_overrides(digits_dir, tmp_path / "r", rounds=1), env=env))
    assert line.startswith(f"{ERROR}runtime.device is 'auto' and this job holds GPUs (SLURM_GPUS_ON_NODE=1)")
    assert line.endswith("or set runtime.device: cpu to run on CPU anyway")
    ok = osfed("run", *small_run_overrides(digits_dir, tmp_path / "cpu", rounds=1), "runtime.device=cpu", env=env)
    assert ok.returncode == 0, ok.stderr


def test_imagenet_config_asks_for_cuda():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "imagenet1k.yaml")
    assert config.runtime.device == "cuda" and config.runtime.deterministic == "auto"


# ---------------------------------------------------------------------------------------------
# runtime.deterministic


def test_make_deterministic_applies_and_relaxes_and_exact_numerics_stays_exact(process_state):
    from osfed_hpc.snapshot import exact_numerics

    devices.make_deterministic(True)
    assert _torch_flags() == STRICT
    devices.make_deterministic(False)
    assert _torch_flags() == RELAXED
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"]  # set either way: exact_numerics needs it
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    with exact_numerics(net):
        assert _torch_flags() == STRICT and not net.training
    assert _torch_flags() == RELAXED and net.training


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", True), ("auto", "cuda", False), ("on", "cpu", True), ("on", "cuda", True),
    ("off", "cpu", False), ("off", "cuda", False),
])
def test_deterministic_setting_per_device(setting, device, expected):
    assert devices.deterministic_numerics(setting, torch.device(device)) is expected


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("on", "on"), ("off", "off"), ("true", "on"),
                                             ("false", "off")])
def test_deterministic_config_values(value, expected):
    assert load_config(None, [f"runtime.deterministic={value}"]).runtime.deterministic == expected


def test_deterministic_config_rejects_other_values_and_is_part_of_the_digest(cli):
    assert cli("runtime.deterministic=maybe") == (f"{ERROR}config key 'runtime.deterministic': got 'maybe', "
                                                  f"expected auto, on or off")
    digests = {ckpt.config_digest(load_config(None, [f"runtime.deterministic={v}"]).to_dict())
               for v in ("auto", "on", "off")}
    assert len(digests) == 3  # it changes numerics: a resume must not switch it


@pytest.mark.parametrize("setting, flags", [("auto", STRICT), ("on", STRICT), ("off", RELAXED)])
def test_runner_applies_the_setting_for_its_device(digits_dir, tmp_path, process_state, setting, flags):
    from osfed_hpc.comm import World
    from osfed_hpc.runner import Runner

    _set_torch_flags(RELAXED if flags == STRICT else STRICT)
    out = tmp_path / "run"
    config = load_config(None, small_run_overrides(digits_dir, out, rounds=1) + [f"runtime.deterministic={setting}",
                                                                               "runtime.device=cpu"])
    Runner(config, World(comm=None, rank=0, size=1), out)
    assert _torch_flags() == flags
