"""Foresight pruning meets zeroth-order training (Zhang et al. 2024, arXiv 2405.04765; no public
code, so every choice below is ours): a federated NTK-SAP mask before round 1, then backprop-free
training in which a client sends K numbers per step.

* ``zo-dense`` (:class:`ZeroOrder`) is the training protocol alone, on the dense model (the
  "vanilla BP-free" reference, BAFFLE-style); ``ntk-zo`` (:class:`NtkZo`) adds the mask.
* **Mask** (``ntk_zo.saliency: data-free``, the default): ``ntk_zo.prune_iterations`` scoring
  rounds (``query.ntk``) on the exponential schedule ``density ** (j / n)``. In round j every
  available node (a one-off phase; training samples ``sampling.fraction_train``) gets the current
  mask and computes NTK-SAP scores (pruning/ntk.py) over ``ntk_zo.draws`` draws of
  ``score_batch_size`` Gaussian inputs, perturbed and (NTK-SAP's multi-sampling) re-drawn
  weights, from ``(seed, "ntk", j, partition id)``; it uploads its scores, the kept entries only.
  The server averages them (equal weights: every node scored the same number of noise inputs),
  keeps the top ``density ** (j / n)`` by ``pruning.allocation`` and, after the last round,
  installs the mask. The data-driven variants: ``local-data`` (the same scores on local batches,
  averaged by examples) and ``snip`` (the SNIP phase of the baselines, on the nodes sampled
  with ``sampling.fraction_train``, per ``pruning.snip_scoring``).
* **Training**: every sampled node gets this round's step seeds ``derive_seed(seed, "zo", round,
  t)``, t = 0..local_steps-1, the same for all nodes (so their scalars can be averaged, as in
  BAFFLE and DeComFL), and returns K scalars per step (pruning/zo.py: forward passes only, the
  perturbations restricted to the mask). The server checks them (count, finite, at most
  ``ntk_zo.max_scalar`` in magnitude), clips each node's scalars to ``ntk_zo.clip`` (a stabilizer
  in the spirit of BAFFLE's and FedKSeed's, which also bounds one node's influence), averages each
  (step, k) entry over the nodes weighted by examples, and replays the steps in order: ``theta <- theta - lr / K * sum_k c_k z_k``, z
  regenerated from the seeds; lr is ``ntk_zo.step_lr`` of the step's index in the run (version x
  local_steps + t; constant unless ``ntk_zo.lr_schedule: cosine``), the same on the server and on
  every node. With several local steps a node evaluates step t + 1 at its own
  locally updated weights, but keeps, and next time replays from, the model it received: its
  local updates are replaced by the averaged ones (DeComFL's scheme).
* **What travels down**: a node that does not hold the model (or holds it more than
  ``ntk_zo.max_replay_rounds`` versions behind, or lacks the mask) gets the masked model (kept
  values only, the mask with it when it lacks it), as in masked FedAvg; a node that holds version v
  of the model (in its ``context.state``) gets only the seeds and averaged scalars of versions
  v+1.. (``zo-replay``), and replays them bit-identically to the server. Evaluation messages
  bring nodes up to date the same way. A node's version is known from its last accepted reply; a
  node that does not hold what the server assumed says so (``STATE_LOST``) and gets the model.
* **What travels up**: the ``zo-scalars`` array (local_steps x K float32) and the metrics.

The model version is the number of ZO steps applied by rounds (one per training round that
accepted a reply); the history of seeds and scalars is kept in checkpoints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedprune import protocol
from fedprune.experiment import Experiment
from fedprune.seeding import derive_seed
from fedprune.task import new_model
from pruning.ntk import iterative_masks
from pruning.zo import clip, replay_
from strategies.base import RunFailed, numpy_to_arrays
from strategies.baselines import PruningStrategy, SnipMask
from strategies.validation import (TRAIN_METRICS, InvalidReply, aggregate_metrics, check_int, check_metrics,
                                   check_num_examples)


class ZeroOrder(PruningStrategy):
    """Backprop-free federated training from seeds and scalars (dense unless a mask is installed)."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.cfg = experiment.ntk_zo
        self.params = [name for name, _ in new_model(experiment).named_parameters()]
        self.history: list[tuple[np.ndarray, np.ndarray]] = []
        """Per model version v >= 1: (the step seeds, the averaged scalars) that made it from v - 1."""
        self.node_version: dict[int, int] = {}
        self._sent: Counter[str] = Counter()

    @property
    def version(self) -> int:
        return len(self.history)

    def seeds(self, server_round: int) -> list[int]:
        return [derive_seed(self.seed, "zo", server_round, t) for t in range(self.cfg.local_steps)]

    # ------------------------------------------------------------------ what a node is sent

    def replay_from(self, node_id: int) -> int | None:
        """The version the node's replay starts from, or None when it must get the model."""
        held = self.node_version.get(node_id)
        if held is None or self.node_mask_version.get(node_id) != self.mask_version \
                or self.version - held > self.cfg.max_replay_rounds:
            return None
        return held

    def payload(self, node_id: int) -> RecordDict:
        start = self.replay_from(node_id)
        if start is None:
            self._sent["zo_models_sent"] += 1
            return super().payload(node_id)
        self._sent["zo_replays_sent"] += 1
        if start == self.version:
            return RecordDict({})
        missed = self.history[start:]
        return RecordDict({protocol.ZO_REPLAY: protocol.pack({
            "seeds": np.stack([s for s, _ in missed]), "scalars": np.stack([c for _, c in missed])})})

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        cfg = super().node_config(server_round, node_id, config)
        start = self.replay_from(node_id)
        cfg[protocol.ZO_VERSION] = self.version
        cfg[protocol.ZO_FROM] = -1 if start is None else start
        return cfg

    def model_message(self, server_round: int, node: int, config: ConfigRecord, message_type: str) -> Message:
        msg = super().model_message(server_round, node, config, message_type)
        if message_type == MessageType.TRAIN:
            msg.content[protocol.CONFIG][protocol.ZO_SEEDS] = self.seeds(server_round)
        return msg

    # ------------------------------------------------------------------ replies and the step

    def check_train_reply(self, msg: Message) -> tuple[np.ndarray, int, dict]:
        """(scalars, num-examples, metrics) of a valid reply: exactly local_steps x K finite float32
        scalars of magnitude at most ``ntk_zo.max_scalar``, from the current model version and mask."""
        n = check_num_examples(msg, self.num_examples_bound(msg))
        self.check_mask_version(msg)
        check_int(msg, protocol.ZO_VERSION, self.version, self.version)
        metrics = check_metrics(msg, TRAIN_METRICS)
        shape = (self.cfg.local_steps, self.cfg.num_perturbations)
        scalars = protocol.unpack(self.record_of(msg), {protocol.ZO_SCALARS: (shape, np.dtype(np.float32))})
        scalars = scalars[protocol.ZO_SCALARS]
        if not np.isfinite(scalars).all():
            raise InvalidReply("non-finite scalars")
        if np.abs(scalars).max() > self.cfg.max_scalar:
            raise InvalidReply(f"a scalar of magnitude {float(np.abs(scalars).max()):.4g} exceeds "
                               f"ntk_zo.max_scalar {self.cfg.max_scalar:g}")
        return scalars, n, metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept(replies, self.check_train_reply)
        if not accepted:
            return None, None
        weights = [float(n) if self.weighted else 1.0 for _, (_, n, _) in accepted]
        mean = sum(w * clip(c, self.cfg.clip).astype(np.float64)
                   for w, (_, (c, _, _)) in zip(weights, accepted)) / sum(weights)
        for msg, _ in accepted:
            self.node_version[msg.metadata.src_node_id] = self.version
            self.node_mask_version[msg.metadata.src_node_id] = self.mask_version
        self.step(np.array(self.seeds(server_round), dtype=np.int64), mean.astype(np.float32))
        self.trained_rounds += 1
        metrics = aggregate_metrics([m for _, (_, _, m) in accepted], [n for _, (_, n, _) in accepted],
                                    TRAIN_METRICS)
        return numpy_to_arrays(self.global_arrays), MetricRecord(metrics)

    def step(self, seeds: np.ndarray, scalars: np.ndarray) -> None:
        """Apply one round's steps to the global model (pruning.zo.replay_, as every node does)."""
        arrays = {k: np.array(v) for k, v in self.global_arrays.items()}  # writable copies
        masks = None if self.masks is None else {k: torch.from_numpy(v) for k, v in self.masks.items()}
        replay_({k: torch.from_numpy(arrays[k]) for k in self.params}, masks, seeds, scalars,
                self.cfg.version_lrs(self.version, self.version + 1))
        self.global_arrays = arrays
        self.history.append((seeds, scalars))
        self._payloads.clear()

    def check_evaluate_reply(self, msg: Message) -> tuple[int, dict]:
        """The base's checks, and the node must have evaluated the current version (it holds it now)."""
        out = super().check_evaluate_reply(msg)
        check_int(msg, protocol.ZO_VERSION, self.version, self.version)
        self.node_version[msg.metadata.src_node_id] = self.version
        return out

    def extra_round_record(self) -> dict:
        record = {"zo_version": self.version, "zo_models_sent": 0, "zo_replays_sent": 0, **self._sent}
        self._sent.clear()
        return record

    # ------------------------------------------------------------------ checkpoints

    def method_state(self) -> dict:
        steps, k = self.cfg.local_steps, self.cfg.num_perturbations
        return {"seeds": torch.from_numpy(np.array([s for s, _ in self.history], dtype=np.int64).reshape(-1, steps)),
                "scalars": torch.from_numpy(np.array([c for _, c in self.history], dtype=np.float32)
                                            .reshape(-1, steps, k))}

    def load_method_state(self, state: dict) -> None:
        self.history = [(s.numpy(), c.numpy()) for s, c in zip(state["seeds"], state["scalars"])]
        self.node_version.clear()


class NtkZo(ZeroOrder, SnipMask):
    """:class:`ZeroOrder` on a mask chosen before round 1 by federated NTK-SAP scores (or SNIP)."""

    def prepare(self, grid: Grid) -> None:
        if self.cfg.saliency == "snip":
            SnipMask.prepare(self, grid)
            return
        nodes = self.sample(grid, 0, 1.0, self.min_train_nodes, "sample-ntk")  # a one-off phase: every node
        masks = iterative_masks({k: self.global_arrays[k].shape for k in self.names}, self.experiment.pruning.density,
                                self.cfg.prune_iterations, lambda m, j: self.federated_scores(grid, nodes, m, j),
                                self.select)
        self.install({k: v.numpy() for k, v in masks.items()})

    def federated_scores(self, grid: Grid, nodes: list[int], masks: dict[str, torch.Tensor],
                         iteration: int) -> dict[str, torch.Tensor]:
        """One scoring round: the nodes' NTK-SAP scores under ``masks``, averaged."""
        current = {k: v.numpy() for k, v in masks.items()}
        mask_record = protocol.pack_masks(current)
        model = None if self.cfg.resample_weights else protocol.pack(self.global_arrays, current)
        expected = {k: (self.global_arrays[k].shape, np.dtype(np.float32)) for k in self.names}
        data_free = self.cfg.saliency == "data-free"
        inputs = self.cfg.draws * self.cfg.score_batch_size

        def content(node: int) -> RecordDict:
            records = {protocol.MASK: mask_record, protocol.CONFIG: self.node_config(
                0, node, ConfigRecord({protocol.NTK_ITERATION: iteration}))}
            if model is not None:
                records[protocol.ARRAYS] = model
            return RecordDict(records)

        def check(msg: Message) -> tuple[dict[str, np.ndarray], float]:
            if data_free:
                check_int(msg, protocol.NUM_EXAMPLES, inputs, inputs)
                weight = 1.0
            else:
                weight = float(check_num_examples(msg, self.num_examples_bound(msg)))
            scores = protocol.unpack(self.record_of(msg), expected, current)
            self.check_finite(scores)
            if any((v < 0).any() for v in scores.values()):
                raise InvalidReply("negative NTK-SAP scores")
            return scores, weight

        accepted = self.run_phase(grid, protocol.NTK, nodes, content, check)
        if not accepted:
            raise RunFailed(f"ntk: no client returned valid scores in pruning iteration {iteration}, so no mask "
                            "can be chosen (the log names each failed or rejected reply)")
        total = sum(w for _, (_, w) in accepted)
        return {k: torch.from_numpy(sum(s[k].astype(np.float64) * w for _, (s, w) in accepted) / total)
                for k in self.names}
