"""Pruning baselines: fixed masks from random, magnitude, SNIP and SynFlow scores, and gradual
magnitude pruning. Each adds only where and how its mask is chosen to the base strategy.

* ``random``: random scores from the run seed, cut before round 1.
* ``magnitude``: ``pruning.warmup_rounds`` dense rounds, then |w| of the global model, one cut.
* ``snip``: a scoring round before round 1 (message ``query.snip``): the sampled clients score
  |g * w| (Lee et al. 2019) on ``pruning.score_batches`` local batches of the initial model; the
  server averages the scores, weighted by examples, and cuts once.
* ``synflow``: SynFlow scores (Tanaka et al. 2020) on the server, data-free, one shot; we use the
  single-shot form (the paper iterates 100 times; one shot is the usual federated baseline).
* ``gradual-magnitude``: Zhu & Gupta (2017): after rounds ``start_round, start_round + prune_every,
  ... end_round`` the global model is cut by |w| to the cubic schedule's density, reaching
  ``pruning.density`` at ``end_round``.

The cut is one global top-k, or per layer (uniform or ERK densities), by ``pruning.allocation``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from logging import INFO

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedprune.experiment import Experiment
from fedprune.seeding import torch_generator
from pruning.schedules import gradual_cubic
from pruning.scores import random_scores, synflow_scores
from pruning.selection import erk_densities, global_topk, layerwise_topk
from strategies.base import FedPruneStrategy
from strategies.transport import pack, unpack
from strategies.validation import InvalidReply, check_arrays, check_num_examples


def select(scores: dict[str, torch.Tensor], density: float, allocation: str) -> dict[str, np.ndarray]:
    """Masks keeping the top ``density`` of ``scores`` under the allocation rule."""
    if allocation == "global":
        masks = global_topk(scores, density)
    elif allocation == "uniform":
        masks = layerwise_topk(scores, density)
    elif allocation == "erk":
        masks = layerwise_topk(scores, erk_densities({k: v.shape for k, v in scores.items()}, density))
    else:
        raise ValueError(f"pruning.allocation: got {allocation!r}; allowed: global, uniform, erk")
    return {k: v.cpu().numpy() for k, v in masks.items()}


class PruningStrategy(FedPruneStrategy):
    """The base strategy plus what every pruning baseline needs: the experiment and a model."""

    def __init__(self, experiment: Experiment, model_fn: Callable[[], torch.nn.Module],
                 maskable: list[str], input_shape: tuple[int, ...]) -> None:
        super().__init__(seed=experiment.seed, sampling=experiment.sampling, maskable=maskable,
                         value_dtype=experiment.transport.value_dtype)
        self.experiment = experiment
        self.model_fn = model_fn
        self.input_shape = input_shape
        self.names = list(maskable)

    def global_model(self) -> torch.nn.Module:
        model = self.model_fn()
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.global_arrays.items()})
        return model

    def cut(self, scores: dict[str, torch.Tensor], density: float) -> None:
        self.set_masks(select(scores, density, self.experiment.pruning.allocation))
        log(INFO, "%s: mask version %d at density %.4f", self.experiment.method, self.mask_version, self.density())

    def magnitudes(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.abs(self.global_arrays[k])) for k in self.names}


class RandomMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        scores = random_scores(self.global_model(), self.names, torch_generator(self.seed, "random-mask"))
        self.cut(scores, self.experiment.pruning.density)


class SynFlowMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        self.cut(synflow_scores(self.global_model(), self.input_shape, self.names), self.experiment.pruning.density)


class MagnitudeMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        if self.experiment.pruning.warmup_rounds == 0:
            self.cut(self.magnitudes(), self.experiment.pruning.density)

    def after_aggregate(self, server_round: int) -> None:
        if server_round == self.experiment.pruning.warmup_rounds:
            self.cut(self.magnitudes(), self.experiment.pruning.density)


class GradualMagnitude(PruningStrategy):
    def schedule(self, server_round: int) -> float | None:
        """The density to cut to after ``server_round``, or None when this round does not prune.

        Cuts at ``start_round + j * prune_every`` (j = 0..n-1, within ``end_round``); cut j+1 of n
        follows the cubic schedule, so the first cut already prunes and the last reaches the target.
        """
        p = self.experiment.pruning
        if not p.start_round <= server_round <= p.end_round or (server_round - p.start_round) % p.prune_every:
            return None
        n = (p.end_round - p.start_round) // p.prune_every + 1
        return gradual_cubic(server_round, p.start_round - p.prune_every, n, p.prune_every, 1.0, p.density)

    def after_aggregate(self, server_round: int) -> None:
        density = self.schedule(server_round)
        if density is not None:
            self.cut(self.magnitudes(), density)


class SnipMask(PruningStrategy):
    def prepare(self, grid: Grid) -> None:
        nodes = self.sample(grid, 0, self.fraction_train, self.min_train_nodes, "sample-snip")
        arrays = pack(self.global_arrays, value_dtype="float32")
        msgs = []
        for node in nodes:
            cfg = ConfigRecord({"server-round": 0, "mask-version": 0, "mask-sent": False})
            msgs.append(Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=node,
                                message_type=f"{MessageType.QUERY}.snip"))
        shapes = {k: self.global_arrays[k].shape for k in self.names}
        reference = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}

        def check(msg):
            n = check_num_examples(msg, self.num_examples_bound(msg))
            record = msg.content.array_records.get("scores")
            if record is None:
                raise InvalidReply("no ArrayRecord 'scores'")
            scores = check_arrays(unpack(record, None, shapes)[0], reference)
            if any((s < 0).any() for s in scores.values()):
                raise InvalidReply("negative saliency scores")
            return scores, n

        accepted = self.accept(grid.send_and_receive(msgs, timeout=self.describe_timeout), check)
        if not accepted:
            raise RuntimeError("SNIP: no client returned valid scores; cannot choose a mask")
        total = float(sum(n for _, (_, n) in accepted))
        scores = {k: torch.from_numpy(sum(s[k].astype(np.float64) * n for _, (s, n) in accepted) / total)
                  for k in self.names}
        self.cut(scores, self.experiment.pruning.density)


METHODS = {"random": RandomMask, "magnitude": MagnitudeMask, "snip": SnipMask, "synflow": SynFlowMask,
           "gradual-magnitude": GradualMagnitude}
