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
MODELS = ("cnn", "cnn-bn", "resnet20", "resnet32", "vgg11-bn", "fedlp-cnn",
          "gated-cnn", "gated-resnet20", "gated-resnet32", "gated-vgg11")
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
    describe_all_up_to: int = _opt(100, lo=0)
    """Federations of at most this many connected nodes describe every node before the first
    sample; larger ones describe only the nodes they sample (strategies/base.py: Flower's in-memory
    simulation scans every pending message for every node, so describing 10,000 nodes at once is
    some 10^8 checks; it did not get through round 1 in minutes here)."""


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
class AutoFlipConfig:
    """AutoFLIP, exploration-guided pruning (Internò et al. 2024; strategies/autoflip.py). Defaults
    are the paper's commands where they give one; configs/autoflip.yaml explores shorter."""

    quantile: float = _opt(0.3, lo=0.0, hi=0.99, lo_open=True)
    """q: positions whose normalized guidance is at or below the global q quantile are pruned."""
    structured_quantile: float = _opt(0.2, lo=0.0, hi=0.9)
    """q_s: every hidden Conv/Linear layer also loses this share of its units (filters, neurons),
    those of lowest mean guidance, physically (our rule for the paper's hybrid pruning); 0 =
    unstructured only, as the v1 paper and the authors' code. Needs a chain model (cnn, cnn-bn,
    vgg11-bn) and every parameter of a unit maskable (pruning.include_bias; include_norm with
    BatchNorm)."""
    unit_multiple: int = _opt(8, lo=1, hi=1024)
    """With structured_quantile > 0, a hidden layer keeps a multiple of this many units (rounded
    down; ours): CPU convolution kernels run markedly faster at widths that are multiples of 8."""
    explore_fraction: float = _opt(1.0, lo=0.0, hi=1.0, lo_open=True)
    """rho: share of the clients that explore (paper: 1.0)."""
    explore_epochs: int = _opt(150, lo=1, hi=10_000)
    """E_x: most exploration epochs after the base epoch (paper: 150)."""
    patience: int = _opt(40, lo=1)
    """P: exploration stops after this many epochs without a lower validation loss (paper: 40)."""
    normalization: str = _opt("minmax", choices=("minmax", "robust"))
    """Per-tensor guidance normalization: min-max (paper) or (g - median) / IQR."""
    server_momentum: float = _opt(0.9, lo=0.0, hi=0.999)
    """beta of the authors' server update v <- beta v + (1 - beta)(theta - avg), theta <- theta - v
    (0: plain FedAvg)."""
    warm_start: bool = _opt(True)
    """Training starts from the example-weighted mean of the explored models (false: the initial model)."""
    prune: bool = _opt(True)
    """false: no mask, the control (dense FedAvg with the same warm start and server momentum;
    with warm_start false too, nothing is explored)."""
    mask: str = _opt("guided", choices=("guided", "random"))
    """random: the control with the guided mask's shape (units removed per layer, kept positions
    per tensor) at random positions."""
    refresh: bool = _opt(False)
    """Choose the mask again after every round from the participants' deviations (each explores one
    base and one exploration epoch, dense, from the round's model; the authors' "dynamic" variant)."""


@dataclass(frozen=True)
class FedTinyConfig:
    """FedTiny, adaptive BatchNorm selection + progressive pruning (Huang et al., ICDCS 2023;
    strategies/fedtiny.py). Defaults are the authors' code where it gives one; configs/fedtiny.yaml
    shortens the schedule to its run."""

    server_shots: int = _opt(5, lo=1, hi=10_000)
    """Labelled TRAIN images per class the server holds out for its warm-up (drawn from
    partition.seed; no client trains or validates on them)."""
    warmup_epochs: int = _opt(3, lo=0, hi=1000)
    """Epochs of dense training on the server's images before the candidates are cut (the clients'
    optimizer and batch size); 0 = none."""
    num_candidates: int = _opt(5, lo=1, hi=100)
    """N: candidate masks in the pool."""
    density_noise: float = _opt(0.5, lo=0.0, hi=0.99)
    """A candidate's density of layer l is d * (1 + U(-noise, noise)), redrawn until the global
    density is within 2% of pruning.density."""
    baseline: str = _opt("none", choices=("none", "magnitude", "snip"))
    """none: FedTiny's candidate pool and selection. magnitude / snip: the authors' baselines under
    the same constraint (their ``--baseline Mag`` / ``SNIP``): no client trains the dense model; the
    server prunes its warmed-up model itself, per layer at pruning.density (their ``scope="local"``),
    by ``|w|`` or by SNIP ``|g * w|`` on its held-out images (one shot), with no pool, no selection
    phases and the warmed-up BatchNorm statistics; the mask then trains as FedTiny's (adjust_rate 0
    keeps it static, as theirs)."""
    selection: str = _opt("abns", choices=("abns", "no-recalibration", "random"))
    """abns: clients recalibrate each candidate's BatchNorm statistics, the server averages them and
    keeps the candidate of lowest federated validation loss; no-recalibration: the same choice
    with the warmed-up dense model's statistics (the paper's ablation); random: a candidate drawn
    from the run seed (with its recalibrated statistics)."""
    adjust_rate: float = _opt(0.1, lo=0.0, hi=1.0)
    """alpha: share of a layer's kept weights pruned and regrown per adjustment, cosine-decayed to 0
    at t_end; 0 = the static coarse mask."""
    delta: int = _opt(10, lo=1)
    """Rounds between adjustments (granularity entire and block)."""
    t_end: int = _opt(100, lo=1)
    """Last round after which the mask may adjust."""
    granularity: str = _opt("entire", choices=("entire", "block", "layer"))
    """Which layers one adjustment covers: all masked ones, one block (cycled deepest first), or one
    layer (every round, deepest first)."""
    memory_budget: int | None = _opt(None, lo=1, nullable=True)
    """Bytes a client's measured training step may take (pruning.accounting.training_step_memory
    of its sparse training state); null = no budget. Checked on the server before round 1, by the
    clients before they train and on every training reply."""


@dataclass(frozen=True)
class NtkZoConfig:
    """Foresight pruning meets zeroth-order training (Zhang et al. 2024; strategies/ntk_zo.py):
    a federated NTK-SAP mask before round 1 (``ntk-zo``), then backprop-free training from seeds
    and scalars (``ntk-zo``, and ``zo-dense`` without a mask)."""

    saliency: str = _opt("data-free", choices=("data-free", "local-data", "snip"))
    """ntk-zo: how clients score the mask: ``data-free`` (NTK-SAP on Gaussian inputs), ``local-data``
    (NTK-SAP on local batches) or ``snip`` (the SNIP phase, per pruning.snip_scoring)."""
    prune_iterations: int = _opt(5, lo=1, hi=1000)
    """ntk-zo: scoring rounds, on the exponential schedule density ** (j / n) (1 = one shot)."""
    draws: int = _opt(1, lo=1, hi=1000)
    """ntk-zo: NTK-SAP draws (inputs, weight perturbation, weights) per client and scoring round."""
    score_batch_size: int = _opt(64, lo=1)
    """ntk-zo: inputs per NTK-SAP draw."""
    epsilon: float = _opt(0.01, lo=0.0, lo_open=True)
    """ntk-zo: scale of NTK-SAP's weight perturbation (the authors' default)."""
    resample_weights: bool = _opt(True)
    """ntk-zo: NTK-SAP's multi-sampling: every draw scores fresh weights from the model's own
    initialization; false scores the global initial weights."""
    num_perturbations: int = _opt(20, lo=1, hi=10_000)
    """K: perturbation directions per ZO step; a client uploads K scalars per step."""
    sigma: float = _opt(1e-3, lo=0.0, lo_open=True)
    """Smoothing (finite-difference step) of the ZO estimate."""
    difference: str = _opt("forward", choices=("forward", "central"))
    """forward: K + 1 forward passes per step; central: 2K."""
    local_steps: int = _opt(1, lo=1, hi=1000)
    """ZO steps per client and round, each with its own seed and K scalars."""
    lr: float = _opt(0.001, lo=0.0, lo_open=True, hi=10.0)
    """ZO step size (server and clients apply the same plain SGD step); the first step's under a schedule."""
    lr_schedule: str = _opt("constant", choices=("constant", "cosine"))
    """constant: every step takes ``lr``. cosine: global step t (0-based, counted over the rounds and
    their local steps) takes ``lr_min + (lr - lr_min) (1 + cos(pi t / lr_decay_steps)) / 2``, then
    ``lr_min`` from ``lr_decay_steps`` on. The horizon is a number of steps, not the run's rounds,
    so that a resumed run with more rounds gives its past steps the sizes they had."""
    lr_decay_steps: int = _opt(0, lo=0)
    """cosine: the steps over which the step size falls from ``lr`` to ``lr_min`` (>= 1)."""
    lr_min: float = _opt(0.0, lo=0.0)
    """cosine: the step size from ``lr_decay_steps`` on."""
    forward_chunk: int = _opt(0, lo=0)
    """Examples per forward micro-batch of a ZO loss (0: the whole batch); less activation memory."""
    sparse_weights: bool = _opt(True)
    """A masked client runs its ZO steps on a copy whose masked Linear / Conv2d weights are held as
    their kept values only (pruning.zo.sparse_copy): the same step, with memory that falls with the
    density. false: on the dense model with the mask applied."""
    max_scalar: float = _opt(1e4, lo=0.0, lo_open=True)
    """A reply with a scalar of larger magnitude is rejected."""
    clip: float = _opt(0.0, lo=0.0)
    """Each client's scalars are clipped to [-clip, clip] before they are averaged (and a client's
    own local steps clip the same way): bounds one client's influence and stops a diverging run
    from running away; 0 = no clipping."""
    max_replay_rounds: int = _opt(50, lo=0)
    """A node at most this many model versions behind gets the missed seeds and scalars; further
    behind (or without the model) it gets the model."""

    def step_lr(self, step: int) -> float:
        """The step size of global ZO step ``step`` (0-based; see ``lr_schedule``)."""
        if self.lr_schedule == "constant":
            return self.lr
        if step >= self.lr_decay_steps:
            return self.lr_min
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * step / self.lr_decay_steps)) / 2

    def version_lrs(self, first: int, last: int) -> list[float]:
        """The step sizes of the steps that make model versions ``first + 1 .. last`` (``local_steps``
        each, in order): the one indexing of steps that the server and every node share."""
        return [self.step_lr(t) for t in range(first * self.local_steps, last * self.local_steps)]


@dataclass(frozen=True)
class FedDPConfig:
    """FedDP, adaptive dynamic pruning (Yu et al., CCGrid 2023; strategies/feddp.py): gated models
    keep each sample's top-r channels per convolution; a local correction rule; optionally the
    magnitude threshold of the authors' second code version."""

    keep_ratio: float = _opt(0.7, lo=0.0, hi=1.0, lo_open=True)
    """r: each gated convolution keeps max(1, round(r * C_out)) output channels per sample (the
    authors' gated code: 0.7); below 1 it needs a gated model (model.name gated-*)."""
    correction: str = _opt("scaffold", choices=("none", "fedprox", "scaffold"))
    """The local update rule, our reading of the paper's "adaptive gradient": ``scaffold`` (control
    variates, Karimireddy et al. 2020, as the authors' first code runs it, on parameters only),
    ``fedprox`` (proximal term feddp.mu) or ``none`` (plain FedAvg)."""
    mu: float = _opt(0.01, lo=0.0)
    """fedprox: the proximal coefficient (the authors' code: 0.01)."""
    threshold: float = _opt(0.0, lo=0.0)
    """tau of the authors' second code version: after every local epoch, convolution weights with
    |w| <= tau are set to 0, so uploads go sparse (their default 1e-3); 0 = off."""


@dataclass(frozen=True)
class TransportConfig:
    value_dtype: str = _opt("float32", choices=("float32", "float16"))
    """Precision of weights on the wire (both directions); float16 is lossy."""


@dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int = _opt(256, lo=1)
    """Examples per forward pass when evaluating (and FedTiny's BN recalibration). 256 keeps the
    small models' activations under glibc's largest mmap threshold (fedprune/allocator.py), where
    larger batches are mapped and faulted in again at every batch."""


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
    feddp: FedDPConfig = field(default_factory=FedDPConfig)
    ntk_zo: NtkZoConfig = field(default_factory=NtkZoConfig)
    fedtiny: FedTinyConfig = field(default_factory=FedTinyConfig)
    autoflip: AutoFlipConfig = field(default_factory=AutoFlipConfig)
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
    return experiment_from_mapping(data)


def experiment_from_mapping(data: Mapping[str, Any]) -> Experiment:
    """Validate a mapping of keys (as an experiment file or a run's config.yaml holds them); a key
    it leaves out takes its default."""
    experiment = _build(Experiment, data, "")
    _check_across_keys(experiment)
    return experiment


def _check_across_keys(experiment: Experiment) -> None:
    p, rounds = experiment.pruning, experiment.num_server_rounds
    if experiment.method == "feddp" and experiment.feddp.keep_ratio < 1 and \
            not experiment.model.name.startswith("gated-"):
        raise ExperimentError(f"feddp.keep_ratio: got {experiment.feddp.keep_ratio} with model.name "
                              f"{experiment.model.name!r}; a keep ratio below 1 needs a gated model (gated-cnn, "
                              "gated-resnet20, gated-resnet32, gated-vgg11), or keep_ratio 1.0")
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
    if experiment.method == "autoflip" and not experiment.autoflip.prune and (
            experiment.autoflip.refresh or experiment.autoflip.mask != "guided"):
        raise ExperimentError("autoflip.prune: got false with autoflip.refresh or autoflip.mask: random; allowed: "
                              "true (refresh and the random mask choose masks)")
    if experiment.method == "autoflip" and experiment.autoflip.refresh and experiment.autoflip.mask != "guided":
        raise ExperimentError("autoflip.refresh: got true with autoflip.mask: random; allowed: false (refresh "
                              "chooses guided masks)")
    if experiment.method == "fedtiny":
        t = experiment.fedtiny
        if experiment.model.name == "cnn":
            raise ExperimentError("model.name: got 'cnn' with method fedtiny; allowed: a model with BatchNorm "
                                  "(cnn-bn, resnet20, resnet32, vgg11-bn, fedlp-cnn)")
        if experiment.partition.val_fraction == 0:
            raise ExperimentError("partition.val_fraction: got 0.0 with method fedtiny; allowed: > 0 (clients "
                                  "recalibrate and evaluate the candidates on their validation split)")
        if t.baseline != "none" and t.selection != "abns":
            raise ExperimentError(f"fedtiny.selection: got {t.selection!r} with fedtiny.baseline {t.baseline!r}; "
                                  "allowed: 'abns' (a baseline has no candidates to select from)")
        if t.adjust_rate > 0 and t.granularity != "layer" and t.delta > min(t.t_end, experiment.num_server_rounds):
            raise ExperimentError(f"fedtiny.delta: got {t.delta} with t_end {t.t_end} and num_server_rounds "
                                  f"{experiment.num_server_rounds}; allowed: <= both (else the mask never adjusts; "
                                  "fedtiny.adjust_rate: 0 is the static mask)")
    zo = experiment.ntk_zo
    if zo.lr_schedule == "cosine" and zo.lr_decay_steps < 1:
        raise ExperimentError("ntk_zo.lr_decay_steps: got 0 with ntk_zo.lr_schedule: cosine; allowed: >= 1 (the "
                              "steps over which lr decays, e.g. num_server_rounds * ntk_zo.local_steps)")
    if zo.lr_schedule == "cosine" and zo.lr_min > zo.lr:
        raise ExperimentError(f"ntk_zo.lr_min: got {zo.lr_min:g} with ntk_zo.lr {zo.lr:g}; allowed: <= lr")
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
