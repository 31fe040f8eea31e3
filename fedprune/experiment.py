"""Experiments: one YAML file under configs/, validated once, shared by the ServerApp and ClientApp.

An experiment file is a mapping of the sections below. Every key is optional (the defaults are the
dataclass defaults); an unknown key, a value of the wrong type or out of range raises
:class:`ExperimentError` naming the key, the value and what is allowed, before round 1.

The Flower run config names the file (``experiment``) and may override keys:
``num-server-rounds`` and ``seed`` directly, anything else through ``overrides``, a string of
``dotted.key=value`` pairs (``"client.lr=0.01 partition.alpha=0.1"``; values are parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedprune.methods import METHODS

APP_ROOT = Path(__file__).resolve().parents[1]
"""The app directory (where pyproject.toml and configs/ live); relative experiment paths start here."""


class ExperimentError(ValueError):
    """An experiment that cannot run: names the key, the value and what is allowed."""


def _opt(default: Any, *, choices: tuple | None = None, lo: float | None = None,
         hi: float | None = None, lo_open: bool = False, nullable: bool = False) -> Any:
    """A dataclass field with its validation rule in the metadata."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "nullable": nullable}
    return field(default=default, metadata=meta)


DATASETS = ("fashion-mnist", "mnist", "cifar10")
MODELS = ("cnn", "cnn-bn", "resnet20", "resnet32", "vgg11-bn", "fedlp-cnn")
SCHEMES = ("iid", "dirichlet", "pathological")
ALLOCATIONS = ("global", "uniform", "erk")


@dataclass(frozen=True)
class DatasetConfig:
    name: str = _opt("fashion-mnist", choices=DATASETS)
    root: str | None = _opt(None, nullable=True)
    """An extra directory to look in first (IDX files, or a torchvision root)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt("cnn", choices=MODELS)


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = _opt("dirichlet", choices=SCHEMES)
    alpha: float = _opt(0.5, lo=0.0, lo_open=True)
    """Dirichlet concentration (scheme dirichlet)."""
    classes_per_partition: int = _opt(2, lo=1)
    """Classes each client holds (scheme pathological)."""
    min_partition_size: int = _opt(10, lo=0)
    """Dirichlet redraws until every client has at least this many samples."""
    val_fraction: float = _opt(0.1, lo=0.0, hi=0.9)
    """Share of each client's data held out as its validation split."""
    seed: int = _opt(0, lo=0, hi=2**63 - 1)
    """Partition seed, separate from the run seed: same clients' data under different run seeds."""


@dataclass(frozen=True)
class SamplingConfig:
    fraction_train: float = _opt(1.0, lo=0.0, hi=1.0, lo_open=True)
    fraction_evaluate: float = _opt(1.0, lo=0.0, hi=1.0)
    """0 turns client-side evaluation off."""
    min_train_nodes: int = _opt(2, lo=1)
    min_evaluate_nodes: int = _opt(2, lo=0)
    min_available_nodes: int = _opt(2, lo=1)
    node_wait_seconds: float = _opt(300.0, lo=0.0)
    """How long a round waits for enough described nodes (min_available_nodes, and the round's
    min_train_nodes / min_evaluate_nodes) before the run stops with an error."""


@dataclass(frozen=True)
class ClientConfig:
    local_epochs: int = _opt(1, lo=1, hi=1000)
    batch_size: int = _opt(32, lo=1)
    optimizer: str = _opt("sgd", choices=("sgd", "adam"))
    lr: float = _opt(0.05, lo=0.0, lo_open=True, hi=10.0)
    momentum: float = _opt(0.9, lo=0.0, hi=0.999)
    weight_decay: float = _opt(0.0, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class PruningConfig:
    """How a pruning method cuts the model (ignored by dense FedAvg)."""

    density: float = _opt(1.0, lo=0.0, hi=1.0, lo_open=True)
    """Target share of prunable weights kept."""
    allocation: str = _opt("global", choices=ALLOCATIONS)
    """global: one top-k over all layers' scores; uniform: every layer at the density; erk:
    Erdos-Renyi-Kernel per-layer densities (Evci et al. 2020)."""
    include_bias: bool = _opt(False)
    include_norm: bool = _opt(False)
    include_first: bool = _opt(True)
    include_last: bool = _opt(True)
    warmup_rounds: int = _opt(2, lo=0)
    """magnitude: dense rounds before the one-shot cut."""
    score_batches: int = _opt(4, lo=1)
    """snip: local batches (of client.batch_size) each client scores on."""
    snip_scoring: str = _opt("union", choices=("union", "client-mean"))
    """snip: ``union`` scores |(mean of the clients' gradients) * w|, SNIP on the union of the
    clients' batches; ``client-mean`` averages each client's own |g * w|."""
    synflow_iterations: int = _opt(100, lo=1, hi=10_000)
    """synflow: pruning iterations on the exponential density schedule (Tanaka et al. 2020 use 100);
    1 is single-shot SynFlow."""
    start_round: int = _opt(1, lo=1)
    """gradual-magnitude: first pruning step (after that round's aggregation)."""
    end_round: int = _opt(5, lo=1)
    """gradual-magnitude: last pruning step, where the target density is reached."""
    prune_every: int = _opt(1, lo=1)
    """gradual-magnitude: rounds between pruning steps."""


@dataclass(frozen=True)
class FedLPConfig:
    """FedLP, layer-wise pruning (Zhu et al., ICC 2023; strategies/fedlp.py)."""

    p: float = _opt(0.5, lo=0.0, hi=1.0, lo_open=True)
    """fedlp-homo: layer-preserving rate, the probability that a client uploads a unit."""
    unit: str = _opt("tensor", choices=("tensor", "module"))
    """fedlp-homo: what one keep/drop decision covers: ``tensor`` (each state-dict entry, incl.
    BatchNorm buffers, as the authors' code) or ``module`` (a layer with all its entries)."""
    preferred_level: int | None = _opt(None, lo=1, hi=5, nullable=True)
    """fedlp-hetero: the level 1..5 clients prefer (the paper's flag); null = uniform over levels."""
    preference_weight: float = _opt(0.6, lo=0.0, hi=1.0)
    """fedlp-hetero: P(level = preferred_level); the other levels share the rest equally."""
    weighted: bool = _opt(True)
    """Average weighted by examples (as our FedAvg); false = the authors' unweighted mean."""
    keep_head: bool = _opt(False)
    """fedlp-hetero: false (the authors' code) = every training round restarts a client's private
    head from its initial value, so a trained head serves only that round's evaluation; true = the
    trained head is kept across rounds (client_app/fedlp.py)."""


@dataclass(frozen=True)
class TransportConfig:
    value_dtype: str = _opt("float32", choices=("float32", "float16"))
    """Precision of weights on the wire (both directions); float16 is lossy."""


@dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int = _opt(1000, lo=1)


@dataclass(frozen=True)
class Experiment:
    name: str = "fedavg"
    method: str = _opt("fedavg", choices=tuple(METHODS))
    seed: int = _opt(42, lo=0, hi=2**63 - 1)
    num_server_rounds: int = _opt(10, lo=1, hi=100_000)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    fedlp: FedLPConfig = field(default_factory=FedLPConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    meta = f.metadata
    tp = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type).split(" |")[0]]
    if value is None:
        if meta.get("nullable"):
            return None
        raise ExperimentError(f"{key}: got null; expected {_type_name(tp)}")
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ExperimentError(f"{key}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")
    if tp is float and not math.isfinite(value):
        raise ExperimentError(f"{key}: got {value!r}; allowed: a finite number")
    if meta.get("choices") and value not in meta["choices"]:
        raise ExperimentError(f"{key}: got {value!r}; allowed: {', '.join(meta['choices'])}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)) or (
        hi is not None and value > hi
    ):
        low = "" if lo is None else f"{'>' if meta.get('lo_open') else '>='} {lo}"
        high = "" if hi is None else f"<= {hi}"
        raise ExperimentError(f"{key}: got {value!r}; allowed: {' and '.join(filter(None, [low, high]))}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the experiment"
    if not isinstance(data, Mapping):
        raise ExperimentError(f"{where}: got {data!r}; expected a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ExperimentError(
            f"{prefix}{unknown[0]}: unknown key; allowed in {where}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kwargs[name] = _build(f.default_factory, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(f"{prefix}{name}", value, f)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"{dotted}: {p} is not a section")
    node[leaf] = value


def parse_overrides(text: str) -> dict[str, Any]:
    """``"client.lr=0.01 seed=3"`` -> ``{"client.lr": 0.01, "seed": 3}`` (values parsed as YAML)."""
    out = {}
    for item in shlex.split(text):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ExperimentError(f"overrides: {item!r} is not key=value (e.g. client.lr=0.01)")
        out[key.replace("-", "_")] = yaml.safe_load(raw) if raw else ""
    return out


def resolve_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else APP_ROOT / p


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read, override and validate an experiment file; the single entry point for both apps."""
    file = resolve_path(path)
    if not file.is_file():
        available = ", ".join(sorted(str(p.relative_to(APP_ROOT)) for p in (APP_ROOT / "configs").glob("*.yaml")))
        raise ExperimentError(f"experiment: no file {str(path)!r} (looked at {file}); available: {available}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ExperimentError(f"experiment: {file} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ExperimentError(f"experiment: {file} must hold a mapping of keys, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    experiment = _build(Experiment, data, "")
    _check_across_keys(experiment)
    return experiment


def _check_across_keys(experiment: Experiment) -> None:
    p, rounds = experiment.pruning, experiment.num_server_rounds
    if experiment.method == "magnitude" and p.warmup_rounds >= rounds:
        raise ExperimentError(f"pruning.warmup_rounds: got {p.warmup_rounds} with num_server_rounds {rounds}; "
                              f"allowed: < {rounds} (the cut follows the warm-up; the pruned model needs a round)")
    if experiment.method == "gradual-magnitude" and p.end_round > rounds:
        raise ExperimentError(f"pruning.end_round: got {p.end_round} with num_server_rounds {rounds}; "
                              f"allowed: <= {rounds}")
    if p.start_round > p.end_round:
        raise ExperimentError(f"pruning.start_round: got {p.start_round}; allowed: <= pruning.end_round "
                              f"({p.end_round})")
    if experiment.method == "fedlp-hetero" and experiment.model.name != "fedlp-cnn":
        raise ExperimentError(f"model.name: got {experiment.model.name!r} with method fedlp-hetero; allowed: "
                              "fedlp-cnn (the model whose depth levels FedLP-Hetero defines)")
    if METHODS[experiment.method].masked and p.density == 1.0:
        raise ExperimentError(f"pruning.density: got 1.0 with method {experiment.method!r}; allowed: "
                              "0 < density < 1 (use method fedavg for a dense model)")
    if experiment.sampling.fraction_evaluate > 0 and experiment.partition.val_fraction == 0:
        raise ExperimentError(
            "partition.val_fraction: got 0.0 while sampling.fraction_evaluate is "
            f"{experiment.sampling.fraction_evaluate}; client-side evaluation needs a validation "
            "split (val_fraction > 0), or turn it off with sampling.fraction_evaluate: 0"
        )


def experiment_from_run_config(run_config: Mapping[str, Any]) -> Experiment:
    """The experiment named by a Flower run config, with its overrides applied."""
    overrides = parse_overrides(str(run_config.get("overrides", "")))
    if int(run_config.get("num-server-rounds", 0)) > 0:
        overrides["num_server_rounds"] = int(run_config["num-server-rounds"])
    if int(run_config.get("seed", -1)) >= 0:
        overrides["seed"] = int(run_config["seed"])
    return load_experiment(str(run_config.get("experiment", "configs/fedavg.yaml")), overrides)
