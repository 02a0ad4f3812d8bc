"""Config loading: typed values, overrides, and errors that name the key."""
import pytest

from osfed_hpc.config import ConfigError, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    config = load_config(_write(tmp_path, "name: x\nrounds: 5\n"), ["rounds=3", "train.lr=0.1", "seed=1", "out=R"])
    assert (config.rounds, config.train.lr, config.seed, config.out) == (3, 0.1, 1, "R")
    assert config.algorithm == {"name": "fedavg", "weighting": "samples"}  # defaults filled in


def test_unknown_key_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'.*valid keys here: .*lr"):
        load_config(_write(tmp_path, "train:\n  learning_rate: 0.1\n"))
    with pytest.raises(ConfigError, match=r"'roundz' \(did you mean 'rounds'\?\)"):
        load_config(None, ["roundz=3"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=0", "train.lr"), ("train.lr=-1", "train.lr"), ("data.clients=0", "data.clients"),
        ("data.alpha=0", "data.alpha"), ("server.sample_fraction=0", "server.sample_fraction"),
        ("server.sample_fraction=1.5", "server.sample_fraction"), ("rounds=0", "rounds"),
        ("model.name=vgg99", "model.name"), ("train.batch_size=abc", "train.batch_size"),
        ("runtime.amp=fp8", "runtime.amp"), ("runtime.host_memory=never", "runtime.host_memory"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_algorithm_and_algorithm_option():
    with pytest.raises(ConfigError, match=r"algorithm.name: unknown algorithm 'fedprox'"):
        load_config(None, ["algorithm.name=fedprox"])
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm.factr'"):
        load_config(None, ["algorithm.factr=2"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: [unclosed\n"))


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)
