"""Pruning baselines: fixed masks from random, magnitude, SNIP and SynFlow scores, and gradual
magnitude pruning. Each adds only where and how its mask is chosen to the base strategy.

* ``random``: random scores from the run seed, cut before round 1.
* ``magnitude``: ``pruning.warmup_rounds`` dense rounds, then |w| of the global model, one cut
  (at the first round at or after the warm-up, also after a round without accepted replies).
* ``snip`` (Lee et al. 2019): a scoring phase before round 1 (``query.snip``, client routine in
  client_app/baselines.py) on the initial model. ``pruning.snip_scoring: union`` (default): the
  clients send their signed mean loss gradients over ``pruning.score_batches`` batches, the server
  averages them (weighted by examples) and scores ``|g * w|``, SNIP on the union of the clients'
  batches; ``client-mean``: the clients send their own ``|g * w|``, the server averages those.
* ``synflow`` (Tanaka et al. 2020): data-free, on the server, iterative: ``pruning.synflow_iterations``
  (100, as the paper) rescorings on the exponential density schedule ``density ** (j / n)``;
  ``synflow_iterations: 1`` is single-shot SynFlow.
* ``gradual-magnitude`` (Zhu & Gupta 2017): after rounds ``start_round, start_round + prune_every,
  ... end_round`` the global model is cut by |w| to the cubic schedule's density ``s_t``, reaching
  ``pruning.density`` at ``end_round``; per layer as the paper (configs/gradual-magnitude.yaml sets
  ``allocation: uniform``; ``global`` is the option). A step that is due is taken at the first
  round at or after it, also after a round without accepted replies.

The cut is one global top-k, or per layer (uniform or ERK densities), by ``pruning.allocation``.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprune import protocol
from fedprune.data import SPECS
from fedprune.experiment import Experiment
from fedprune.seeding import torch_generator
from fedprune.task import maskable_names, new_model
from pruning.schedules import gradual_cubic
from pruning.scores import random_scores, snip_from_gradients, synflow_iterative_masks
from pruning.selection import erk_densities, global_topk, layerwise_topk
from strategies.base import FedPruneStrategy, RunFailed
from strategies.validation import InvalidReply, check_num_examples


def selector(allocation: str):
    """``select(scores, density) -> masks`` of an allocation rule (global, uniform or erk)."""
    if allocation == "global":
        return global_topk
    if allocation == "uniform":
        return layerwise_topk
    if allocation == "erk":
        return lambda scores, d: layerwise_topk(scores, erk_densities({k: v.shape for k, v in scores.items()}, d))
    raise ValueError(f"pruning.allocation: got {allocation!r}; allowed: global, uniform, erk")


class PruningStrategy(FedPruneStrategy):
    """The base strategy plus what every pruning baseline needs: the model and its maskable names."""

    def __init__(self, experiment: Experiment) -> None:
        model = new_model(experiment)
        super().__init__(experiment, maskable=maskable_names(experiment, model))
        spec = SPECS[experiment.dataset.name]
        self.input_shape = (spec.channels, spec.size, spec.size)
        self.names = maskable_names(experiment, model)
        self.select = selector(experiment.pruning.allocation)

    def global_model(self) -> torch.nn.Module:
        model = new_model(self.experiment)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.global_arrays.items()})
        return model

    def cut(self, scores: dict[str, torch.Tensor], density: float) -> None:
        self.install({k: v.cpu().numpy() for k, v in self.select(scores, density).items()})

    def install(self, masks: dict[str, np.ndarray]) -> None:
        self.set_masks(masks)
        log(INFO, "%s: mask version %d at density %.4f", self.experiment.method, self.mask_version, self.density())

    def magnitudes(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.abs(self.global_arrays[k])) for k in self.names}


class RandomMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        scores = random_scores(self.global_model(), self.names, torch_generator(self.seed, "random-mask"))
        self.cut(scores, self.experiment.pruning.density)


class SynFlowMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        p = self.experiment.pruning
        masks = synflow_iterative_masks(self.global_model(), self.input_shape, self.names, p.density,
                                        p.synflow_iterations, self.select)
        self.install({k: v.numpy() for k, v in masks.items()})


class MagnitudeMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        if self.experiment.pruning.warmup_rounds == 0:
            self.cut(self.magnitudes(), self.experiment.pruning.density)

    def after_round(self, server_round: int) -> None:
        if self.masks is None and server_round >= self.experiment.pruning.warmup_rounds and self.trained_rounds:
            self.cut(self.magnitudes(), self.experiment.pruning.density)


class GradualMagnitude(PruningStrategy):
    """Zhu & Gupta's schedule; ``self.steps_taken`` pruning steps are done (kept in checkpoints)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.steps_taken = 0

    def steps_due(self, server_round: int) -> int:
        """How many pruning steps are due after ``server_round``: steps fall after rounds
        ``start_round + j * prune_every`` (j = 0..n-1, within ``end_round``)."""
        p = self.experiment.pruning
        if server_round < p.start_round:
            return 0
        return min((server_round - p.start_round) // p.prune_every + 1, self.num_steps())

    def num_steps(self) -> int:
        p = self.experiment.pruning
        return (p.end_round - p.start_round) // p.prune_every + 1

    def density_after(self, steps: int) -> float:
        """The cubic schedule after ``steps`` of n steps: the first already prunes, the last reaches the target."""
        p = self.experiment.pruning
        return gradual_cubic(p.start_round + (steps - 1) * p.prune_every, p.start_round - p.prune_every,
                             self.num_steps(), p.prune_every, 1.0, p.density)

    def after_round(self, server_round: int) -> None:
        due = self.steps_due(server_round)
        if due > self.steps_taken and self.trained_rounds:
            self.cut(self.magnitudes(), self.density_after(due))
            self.steps_taken = due

    def method_state(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_method_state(self, state: dict) -> None:
        self.steps_taken = int(state["steps_taken"])


class SnipMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        p = self.experiment.pruning
        nodes = self.sample(grid, 0, self.fraction_train, self.min_train_nodes, "sample-snip")
        expected = {k: (self.global_arrays[k].shape, np.dtype(np.float32)) for k in self.names}

        def content(node: int) -> RecordDict:
            return RecordDict({protocol.ARRAYS: protocol.pack(self.global_arrays),
                               protocol.CONFIG: self.node_config(0, node, ConfigRecord())})

        def check(msg: Message) -> tuple[dict[str, np.ndarray], int]:
            n = check_num_examples(msg, self.num_examples_bound(msg))
            values = protocol.unpack(self.record_of(msg), expected)
            self.check_finite(values)
            if p.snip_scoring == "client-mean" and any((v < 0).any() for v in values.values()):
                raise InvalidReply("negative saliency scores")
            return values, n

        accepted = self.run_phase(grid, protocol.SNIP, nodes, content, check)
        if not accepted:
            raise RunFailed("snip: no client returned valid scores, so no mask can be chosen "
                            "(the log names each failed or rejected reply)")
        total = float(sum(n for _, (_, n) in accepted))
        mean = {k: torch.from_numpy(sum(v[k].astype(np.float64) * n for _, (v, n) in accepted) / total)
                for k in self.names}
        if p.snip_scoring == "union":
            mean = snip_from_gradients({k: torch.from_numpy(self.global_arrays[k].astype(np.float64))
                                        for k in self.names}, mean)
        self.cut(mean, p.density)
