"""AutoFLIP (Internò et al. 2024, arXiv 2405.10271): federated loss exploration, then masked FedAvg
with server momentum under the mask the exploration chose.

1. Exploration (``query.explore``, before round 1; client_app/autoflip.py): a share
   ``autoflip.explore_fraction`` (rho) of the clients, drawn from the run seed, each trains its own
   copy of the initial model and sends the squared deviations of the maskable parameters from its
   base epoch and, with ``autoflip.warm_start``, its explored model. A reply must hold exactly the
   expected entries (shapes, dtypes), finite, deviations >= 0, and valid metrics; a bad one is
   rejected and counted. (The authors' code trains one shared model object client after client;
   here every explorer has its own copy.)
2. The mask (pruning/guidance.py, pruning/slim.py): the guidance is the example-weighted mean of the
   deviations, normalized per tensor (``autoflip.normalization``); every hidden layer loses the
   ``autoflip.structured_quantile`` share of its units of lowest mean guidance, and a few more so
   that it keeps a multiple of ``autoflip.unit_multiple`` units (our rule: the paper prunes whole
   units without saying how), and everything is cut at one global quantile ``autoflip.quantile``. With ``warm_start`` training starts from the example-weighted mean of
   the explored models (the authors start from their sequentially explored model), masked.
3. Training: the base's masked FedAvg (clients enforce the mask after every step, and train the
   physically smaller model when the mask removes whole units), then the authors' server update
   (``FedavgOptimizer``, beta = ``autoflip.server_momentum``) on the parameters::

       delta = theta - avg;   v <- beta * v + (1 - beta) * delta;   theta <- theta - v

   without bias correction or server learning rate; buffers (BatchNorm statistics) take the plain
   average, as in the authors' code. The mask is applied to theta and v after every round; v is
   checkpointed.
4. ``autoflip.refresh`` (the code's "dynamic" variant): every participant also explores from the
   round's model (one base and one exploration epoch, dense) and sends that deviation with its
   weights; after aggregation the mask is chosen again, by the same rules, from the deviations of
   the round's validated replies alone, as the code recomputes its guidance from the round's scouts.
   Single weights that grow back start at zero; a removed unit never comes back (its weights and
   bias are zero, so its output and, through ReLU, its gradients are zero: it does not move in
   exploration), so each refresh can only remove more units.

Controls: ``autoflip.prune: false`` is dense FedAvg with the same exploration warm start and server
momentum; with ``warm_start: false`` as well, nothing is explored (the authors' FedAvg baseline:
server momentum); ``autoflip.mask: random`` draws the mask at random with the guided mask's shape
(as many units removed per layer, as many kept positions per tensor).
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprune import protocol
from fedprune.experiment import Experiment, ExperimentError
from fedprune.seeding import torch_generator
from fedprune.task import new_model
from pruning.accounting import count_flops
from pruning.guidance import hybrid_masks, mean_deviation, normalize, random_like, select_units, shuffled_units
from pruning.slim import chain_of
from strategies.aggregation import masked_average
from strategies.base import RunFailed, numpy_to_arrays
from strategies.baselines import PruningStrategy
from strategies.validation import TRAIN_METRICS, InvalidReply, check_int, check_metrics, check_num_examples


class AutoFlip(PruningStrategy):
    """AutoFLIP on the base strategy: exploration, guided hybrid mask, server momentum (module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.cfg = experiment.autoflip
        model = new_model(experiment)
        self.parameter_names = [name for name, _ in model.named_parameters()]
        example = torch.randn(1, *self.input_shape, generator=torch_generator(self.seed, "autoflip-chain"))
        self.chain = chain_of(model, example)
        self.structured: list[str] = []
        if self.cfg.prune and self.cfg.structured_quantile > 0:
            if self.chain is None:
                raise ExperimentError(f"autoflip.structured_quantile: got {self.cfg.structured_quantile} with model "
                                      f"{experiment.model.name!r}, which is not a chain of layers; allowed: 0 for "
                                      "this model (or model cnn, cnn-bn, vgg11-bn)")
            self.structured = [layer.weight for layer in self.chain.removable(self.names)]
            if not self.structured:
                raise ExperimentError(f"autoflip.structured_quantile: got {self.cfg.structured_quantile}, but no "
                                      "hidden layer has all its unit parameters maskable; allowed: 0, or set "
                                      "pruning.include_bias (and include_norm with BatchNorm) true")
        self.velocity: dict[str, np.ndarray] = {}
        self.deviations: list[tuple[dict[str, np.ndarray], int]] = []
        self._record: dict = {}

    # ------------------------------------------------------------------ exploration

    def prepare(self, grid: Grid) -> None:
        if not (self.cfg.prune or self.cfg.warm_start):
            return
        explored = self.explore(grid)
        weights = [n for _, _, n in explored]
        if self.cfg.warm_start:
            self.global_arrays = masked_average([m for _, m, _ in explored], [{}] * len(explored), weights,
                                                self.global_arrays)
        if self.cfg.prune:
            self.install(self.choose([d for d, _, _ in explored], weights))

    def explore(self, grid: Grid) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, int]]:
        """The exploration phase: (deviation, explored model or None, num-examples) per accepted reply."""
        nodes = self.sample(grid, 0, self.cfg.explore_fraction, self.min_train_nodes, "sample-explore")
        payload = protocol.pack(self.global_arrays, value_dtype=self.value_dtype)
        costs: list[tuple[int, dict]] = []

        def content(node: int) -> RecordDict:
            return RecordDict({protocol.ARRAYS: payload, protocol.CONFIG: self.node_config(0, node, ConfigRecord())})

        def check(msg: Message):
            n = check_num_examples(msg, self.num_examples_bound(msg))
            epochs = check_int(msg, protocol.EXPLORE_EPOCHS, 1, self.cfg.explore_epochs)
            metrics = check_metrics(msg, TRAIN_METRICS)
            deviation = self.check_deviation(msg)
            model = None
            if self.cfg.warm_start:
                model = protocol.unpack(self.record_of(msg), protocol.expected_of(self.global_arrays))
                self.check_finite(model)
            costs.append((epochs, metrics))
            return deviation, model, n

        accepted = self.run_phase(grid, protocol.EXPLORE, nodes, content, check)
        if not accepted:
            raise RunFailed("autoflip: no client returned a valid exploration, so there is no guidance "
                            "(the log names each failed or rejected reply)")
        self._record.update(
            autoflip_explorers=len(accepted), autoflip_explore_epochs=float(np.mean([e for e, _ in costs])),
            **{f"autoflip_explore_{k.replace('-', '_')}": sum(m.get(k, 0.0) for _, m in costs)
               for k in (protocol.FLOPS, protocol.COMPUTE_SECONDS)})
        return [result for _, result in accepted]

    def check_deviation(self, msg: Message) -> dict[str, np.ndarray]:
        """A reply's squared deviations: every maskable parameter, float32, finite, >= 0."""
        expected = {k: (self.global_arrays[k].shape, np.dtype(np.float32)) for k in self.names}
        deviation = protocol.unpack(self.record_of(msg, protocol.DEVIATION), expected)
        self.check_finite(deviation)
        negative = [k for k, v in deviation.items() if (v < 0).any()]
        if negative:
            raise InvalidReply(f"{negative[0]}: negative squared deviations")
        return deviation

    # ------------------------------------------------------------------ the mask

    def choose(self, deviations: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
        """The hybrid mask from the clients' deviations (module docstring, step 2)."""
        mean = mean_deviation([{k: torch.from_numpy(v) for k, v in d.items()} for d in deviations], weights)
        guidance = normalize(mean, self.cfg.normalization)
        shapes = {k: self.global_arrays[k].shape for k in self.names}
        units = select_units(guidance, self.structured, self.cfg.structured_quantile,
                             self.cfg.unit_multiple) if self.structured else {}
        masks = hybrid_masks(guidance, self.cfg.quantile, self.chain.unit_positions(units, shapes) if units else {})
        if self.cfg.mask == "random":
            generator = torch_generator(self.seed, "autoflip-random-mask")
            shuffled = self.chain.unit_positions(shuffled_units(units, generator), shapes) if units else {}
            masks = random_like(masks, shuffled, generator)
        return {k: v.numpy() for k, v in masks.items()}

    def install(self, masks: dict[str, np.ndarray]) -> None:
        """Install the mask; the round's record gets the units it keeps per layer and the training
        FLOPs per example of the model the clients run, against the dense model's: with dense
        kernels (the smaller model, what a CPU executes) and counted at the mask's density."""
        super().install(masks)
        if self.chain is None:
            return
        masks = {k: torch.from_numpy(v) for k, v in self.masks.items()}
        kept = self.chain.kept_units(masks)
        model, example = self.global_model(), torch.zeros(1, *self.input_shape)
        slim = self.chain.slim(model, kept)
        dense = count_flops(model, example, training=True).dense
        small = count_flops(slim.model, example, slim.masks(masks), training=True)
        self._record.update(autoflip_units_kept=[int(k.sum()) for k in kept],
                            autoflip_units=[layer.units for layer in self.chain.layers],
                            autoflip_executed_flops_ratio=small.dense / dense,
                            autoflip_counted_flops_ratio=small.effective / dense)
        log(INFO, "autoflip: units kept per layer %s of %s; training FLOPs %.3f of dense executed, %.3f counted",
            self._record["autoflip_units_kept"], self._record["autoflip_units"], small.dense / dense,
            small.effective / dense)

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        super().set_masks(masks)
        for name, mask in self.masks.items():
            if name in self.velocity:
                self.velocity[name] = np.where(mask, self.velocity[name], 0).astype(np.float32)

    # ------------------------------------------------------------------ training

    def check_train_reply(self, msg: Message):
        result = super().check_train_reply(msg)
        if self.cfg.refresh:
            self.deviations.append((self.check_deviation(msg), result[2]))
        return result

    def aggregate_train(self, server_round: int, replies) -> tuple[object, MetricRecord | None]:
        before = dict(self.global_arrays)
        self.deviations = []
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.cfg.server_momentum == 0:
            return arrays, metrics
        self.global_arrays = {**self.global_arrays, **self.momentum_step(before)}
        self._payloads.clear()
        return numpy_to_arrays(self.global_arrays), metrics

    def momentum_step(self, before: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The authors' server update of every parameter from ``before`` towards the new average
        (module docstring, step 3), in float64; v and theta stay zero where the mask prunes."""
        beta, out = self.cfg.server_momentum, {}
        for name in self.parameter_names:
            theta = before[name].astype(np.float64)
            v = beta * self.velocity.get(name, np.zeros_like(theta)).astype(np.float64) + (1 - beta) * (
                theta - self.global_arrays[name].astype(np.float64))
            if self.masks is not None and name in self.masks:
                v = np.where(self.masks[name], v, 0.0)
            self.velocity[name] = v.astype(np.float32)
            out[name] = (theta - v).astype(before[name].dtype)
        return out

    def after_round(self, server_round: int) -> None:
        if self.deviations:
            masks = self.choose([d for d, _ in self.deviations], [n for _, n in self.deviations])
            if any(not np.array_equal(masks[k], self.masks[k]) for k in masks):
                self.install(masks)
        self.deviations = []

    # ------------------------------------------------------------------ records and checkpoints

    def extra_round_record(self) -> dict:
        record, self._record = self._record, {}
        return record

    def method_state(self) -> dict:
        return {"velocity": {k: torch.from_numpy(v.copy()) for k, v in self.velocity.items()}}

    def load_method_state(self, state: dict) -> None:
        self.velocity = {k: v.numpy() for k, v in state["velocity"].items()}
