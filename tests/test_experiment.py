"""Experiments: every shipped file loads; every kind of mistake stops the run with a clear message."""

from pathlib import Path

import pytest

from fedprune.experiment import (
    APP_ROOT, Experiment, ExperimentError, experiment_from_run_config, load_experiment, parse_overrides,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((APP_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_is_valid(path):
    assert isinstance(load_experiment(path), Experiment)


def test_defaults_fill_missing_keys(tmp_path):
    exp = load_experiment(write(tmp_path, "seed: 3\nclient:\n  lr: 0.1\n"))
    assert exp.seed == 3 and exp.client.lr == 0.1 and exp.client.batch_size == 32


@pytest.mark.parametrize("text, names", [
    ("colour: red\n", ["colour", "unknown key", "allowed"]),
    ("client:\n  learning_rate: 0.1\n", ["client.learning_rate", "unknown key", "lr"]),
    ("seed: forty\n", ["seed", "'forty'", "an integer"]),
    ("seed: 1.5\n", ["seed", "1.5", "an integer"]),
    ("seed: true\n", ["seed", "True", "an integer"]),
    ("client:\n  lr: fast\n", ["client.lr", "'fast'", "a number"]),
    ("client:\n  lr: 0\n", ["client.lr", "0", "> 0"]),
    ("num_server_rounds: 0\n", ["num_server_rounds", "0", ">= 1"]),
    ("sampling:\n  fraction_train: 1.5\n", ["sampling.fraction_train", "1.5", "<= 1.0"]),
    ("partition:\n  alpha: -1\n", ["partition.alpha", "-1", "> 0"]),
    ("dataset:\n  name: imagenet\n", ["dataset.name", "imagenet", "fashion-mnist, mnist, cifar10"]),
    ("model:\n  name: resnet18\n", ["model.name", "resnet18", "resnet20"]),
    ("method: magic\n", ["method", "magic", "fedavg"]),
    ("client: 3\n", ["client", "expected a mapping"]),
    ("model:\n  name: null\n", ["model.name", "null"]),
    ("partition:\n  val_fraction: 0.0\n", ["partition.val_fraction", "fraction_evaluate"]),
])
def test_config_error_names_key_value_and_what_is_allowed(tmp_path, text, names):
    with pytest.raises(ExperimentError) as info:
        load_experiment(write(tmp_path, text))
    for name in names:
        assert name in str(info.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(write(tmp_path, "seed: [1,\n"))
    with pytest.raises(ExperimentError, match="no file.*available: .*configs/fedavg.yaml"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ExperimentError, match="must hold a mapping"):
        load_experiment(write(tmp_path, "- 1\n- 2\n"))


def test_run_config_overrides_rounds_seed_and_dotted_keys():
    exp = experiment_from_run_config({
        "experiment": "configs/fedavg.yaml", "num-server-rounds": 5, "seed": 0,
        "overrides": "client.lr=0.01 partition.alpha=0.1 partition.scheme=iid",
    })
    assert (exp.num_server_rounds, exp.seed, exp.client.lr) == (5, 0, 0.01)
    assert exp.partition.alpha == 0.1 and exp.partition.scheme == "iid"


def test_run_config_sentinels_keep_the_experiment_values():
    exp = experiment_from_run_config({"experiment": "configs/fedavg.yaml", "num-server-rounds": 0, "seed": -1})
    assert exp == load_experiment("configs/fedavg.yaml")


def test_overrides_are_validated_like_the_file():
    with pytest.raises(ExperimentError, match="client.lr"):
        experiment_from_run_config({"experiment": "configs/fedavg.yaml", "overrides": "client.lr=-3"})
    with pytest.raises(ExperimentError, match="not key=value"):
        parse_overrides("client.lr")
    with pytest.raises(ExperimentError, match="seed.x: seed is not a section"):
        experiment_from_run_config({"experiment": "configs/fedavg.yaml", "overrides": "seed=3 seed.x=1"})


def test_zo_step_size_is_constant_or_a_cosine_over_a_fixed_number_of_steps():
    def zo(overrides):
        return experiment_from_run_config({"experiment": "configs/ntk-zo.yaml", "overrides": overrides}).ntk_zo

    constant = zo("ntk_zo.lr=0.04")
    assert [constant.step_lr(t) for t in (0, 10, 10_000)] == [0.04] * 3
    cosine = zo("ntk_zo.lr=0.04 ntk_zo.lr_schedule=cosine ntk_zo.lr_decay_steps=100 ntk_zo.lr_min=0.01")
    assert cosine.step_lr(0) == 0.04 and cosine.step_lr(50) == pytest.approx(0.025)
    assert cosine.step_lr(99) > 0.01 and cosine.step_lr(100) == cosine.step_lr(5_000) == 0.01
    with pytest.raises(ExperimentError, match="ntk_zo.lr_decay_steps: got 0 with ntk_zo.lr_schedule: cosine"):
        zo("ntk_zo.lr_schedule=cosine")
    with pytest.raises(ExperimentError, match="ntk_zo.lr_min"):
        zo("ntk_zo.lr=0.01 ntk_zo.lr_schedule=cosine ntk_zo.lr_decay_steps=10 ntk_zo.lr_min=0.1")
