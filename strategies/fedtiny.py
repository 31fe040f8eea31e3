"""FedTiny (Huang et al., ICDCS 2023): adaptive BatchNorm selection over a pool of candidate masks,
then progressive prune-and-grow from the clients' top-K gradients, under a client memory budget.

Before round 1 (:meth:`FedTiny.prepare`; its traffic is round 0's):

1. Warm-up: the server trains the dense model for ``fedtiny.warmup_epochs`` on
   ``fedtiny.server_shots`` labelled images per class held out from the TRAIN split
   (fedprune/fedtiny.py; the clients' splits exclude them), with the clients' optimizer.
2. Pool: ``fedtiny.num_candidates`` masks by ``|w|`` of the warmed-up model at noisy per-layer
   densities whose global density is within 2% of ``pruning.density`` (pruning/candidates.py).
3. Phase ``bn_stats``: the sampled nodes get the dense weights and every candidate mask, run each
   candidate over their validation split in train mode without gradients (one pass,
   ``torch.optim.swa_utils.update_bn``) and send its BatchNorm ``running_mean`` / ``running_var``.
   Per candidate the server takes the example-weighted mean of each buffer (float64).
4. Phase ``candidate_loss``: the same nodes evaluate every candidate with its aggregated statistics
   on their validation split; the server keeps the candidate of lowest example-weighted loss (ties:
   the lower index). The global model becomes the warmed-up weights under that mask with its
   aggregated statistics. ``fedtiny.selection: no-recalibration`` skips phase 3 and evaluates the
   candidates with the warmed-up model's statistics (the paper's ablation); ``random`` keeps a
   candidate drawn from the run seed.
   ``fedtiny.baseline: magnitude`` or ``snip`` replaces steps 2-4 by the authors' baselines: the
   server prunes the warmed-up model per layer by ``|w|`` or by SNIP on its own images.
5. Memory budget: the server measures a client's training step under the chosen mask (the sparse
   training state of pruning/sparse_training.py, one batch of ``client.batch_size``) and stops the
   run with the figures when it exceeds ``fedtiny.memory_budget``.

Rounds: the nodes train under the mask with sparse state (client_app/fedtiny.py). A training
reply whose measured ``peak-memory`` exceeds the budget (or lacks it under a budget) is rejected.
After a round listed by :func:`~pruning.prune_grow.layers_to_adjust` (every ``fedtiny.delta``
rounds up to ``fedtiny.t_end``, the layers of ``fedtiny.granularity``) the server asks the nodes
whose training reply it accepted for their top-K gradients (phase ``topk_grads``): for each
adjusted layer the ``n_l = ceil(alpha_t * nnz_l)`` largest-``|g|`` entries at pruned positions of
their last training batch, ``alpha_t = cosine_decay(t, fedtiny.adjust_rate, t_end)``. A reply
must hold, per layer, at most ``n_l`` unique, increasing positions that the current mask prunes,
and finite gradients. The server averages them (weighted by examples, a missing entry counts 0),
prunes the ``n_l`` smallest kept weights and grows the ``n_l`` largest averaged gradients (at 0).

Where the paper is silent or its code is wrong, we chose: BatchNorm statistics are averaged
correctly (the authors' code keeps only the last client's, scaled down) and are running statistics,
not the affine weights a later re-implementation uploads; ``running_var`` is averaged like the mean
(the paper's rule; the variance of the union would add the spread of the clients' means); recalibration is one pass with a
cumulative average instead of ten passes of an exponential one; the warm-up images come from the
train split, not the test split; the top-K lists travel in their own phase after the training
replies (so the ledger books them as ``topk_grads``); gradients are averaged weighted by examples
(the authors divide by the number of clients); a layer grows only positions whose averaged
gradient is non-zero and prunes as many as it grows, so its density never changes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from fedprune import fedtiny, protocol
from fedprune.experiment import Experiment
from fedprune.seeding import numpy_rng, torch_generator
from fedprune.task import new_model
from fedprune.training import train
from pruning.candidates import candidate_masks
from pruning.prune_grow import adjust_counts, layers_to_adjust, mean_sparse, prune_and_grow
from pruning.schedules import cosine_decay
from pruning.scores import snip_scores
from pruning.selection import layerwise_topk
from pruning.sparse_training import sparsify
from strategies.baselines import PruningStrategy
from strategies.base import RunFailed
from strategies.validation import InvalidReply, check_int, check_num_examples, metrics_of


class FedTiny(PruningStrategy):
    """FedTiny on the base strategy; ``chosen`` (the candidate) and ``adjustments`` (prune-and-grow
    steps taken) are kept in checkpoints."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.cfg = experiment.fedtiny
        self.bn_names = [f"{path}.{buf}" for path, m in new_model(experiment).named_modules()
                         if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                         for buf in ("running_mean", "running_var")]
        self.chosen: int | None = None
        self.candidate_losses: list[float] = []
        self.adjustments = 0
        self._grid: Grid | None = None
        self._adjust: dict[str, int] = {}
        self._trained: set[int] = set()
        self._record: dict = {}

    # ------------------------------------------------------------------ before round 1

    def prepare(self, grid: Grid) -> None:
        self.warm_up()
        if self.cfg.baseline != "none":
            self.install(self.server_pruned())
            self.check_budget()
            return
        p, n = self.experiment.pruning, self.cfg.num_candidates
        pool = [{k: v.numpy() for k, v in m.items()} for m in candidate_masks(
            self.magnitudes(), p.density, n, numpy_rng(self.seed, "fedtiny-candidates"), self.cfg.density_noise)]
        nodes = self.sample(grid, 0, self.fraction_train, self.min_train_nodes, "sample-fedtiny")
        stats = None if self.cfg.selection == "no-recalibration" else self.recalibrate(grid, nodes, pool)
        self.candidate_losses = self.evaluate_candidates(grid, nodes, pool, stats)
        self.chosen = (int(numpy_rng(self.seed, "fedtiny-random-candidate").integers(n))
                       if self.cfg.selection == "random" else int(np.argmin(self.candidate_losses)))
        if stats is not None:
            self.global_arrays.update(stats[self.chosen])
        self.install(pool[self.chosen])
        self._record.update(fedtiny_candidate_losses=self.candidate_losses, fedtiny_chosen=self.chosen,
                            fedtiny_candidate_densities=[float(sum(m.sum() for m in c.values()) /
                                                               sum(m.size for m in c.values())) for c in pool])
        self.check_budget()

    def warm_up(self) -> None:
        """Dense training on the server's held-out images (the clients' optimizer and batch size)."""
        if self.cfg.warmup_epochs == 0:
            return
        x, y = fedtiny.server_shots(self.experiment.dataset, self.experiment.partition, self.cfg.server_shots)
        model = self.global_model()
        train(model, x, y, dataclasses.replace(self.experiment.client, local_epochs=self.cfg.warmup_epochs),
              torch_generator(self.seed, "fedtiny-warmup"))
        self.global_arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def server_pruned(self) -> dict[str, np.ndarray]:
        """fedtiny.baseline: the warmed-up model pruned per layer by ``|w|`` or by SNIP on the
        server's images."""
        if self.cfg.baseline == "magnitude":
            scores = self.magnitudes()
        else:
            x, y = fedtiny.server_shots(self.experiment.dataset, self.experiment.partition, self.cfg.server_shots)
            scores = snip_scores(self.global_model().eval(), torch.nn.functional.cross_entropy, [(x, y)], self.names)
        return {k: m.numpy() for k, m in layerwise_topk(scores, self.experiment.pruning.density).items()}

    def val_bound(self, msg: Message) -> int:
        """num-examples of a phase on validation data: 1 .. the node's validation split."""
        self.num_examples_bound(msg)  # a described member of the federation
        return check_int(msg, protocol.NUM_EXAMPLES, 1, max(self.nodes[msg.metadata.src_node_id].num_val, 1))

    def phase_content(self, node: int, records: dict) -> RecordDict:
        config = ConfigRecord({fedtiny.NUM_CANDIDATES: self.cfg.num_candidates})
        return RecordDict({**records, protocol.CONFIG: self.node_config(0, node, config)})

    def model_records(self, pool: list[dict[str, np.ndarray]]) -> dict:
        """The dense weights and every candidate mask."""
        return {protocol.ARRAYS: protocol.pack(self.global_arrays),
                **{fedtiny.CANDIDATE.format(i): protocol.pack_masks(m) for i, m in enumerate(pool)}}

    def recalibrate(self, grid: Grid, nodes: list[int], pool: list[dict]) -> list[dict[str, np.ndarray]]:
        """Phase bn_stats: per candidate, the example-weighted mean of the nodes' statistics."""
        expected = {k: (self.global_arrays[k].shape, np.dtype(np.float32)) for k in self.bn_names}
        records = self.model_records(pool)

        def check(msg: Message) -> tuple[list[dict[str, np.ndarray]], int]:
            n = self.val_bound(msg)
            stats = [protocol.unpack(self.record_of(msg, fedtiny.BN.format(i)), expected) for i in range(len(pool))]
            for s in stats:
                self.check_finite(s)
                if any((s[k] < 0).any() for k in self.bn_names if k.endswith("running_var")):
                    raise InvalidReply("negative running_var")
            return stats, n

        accepted = self.run_phase(grid, protocol.BN_STATS, nodes, lambda node: self.phase_content(node, records), check)
        if not accepted:
            raise RunFailed("fedtiny: no client returned valid BatchNorm statistics, so no candidate can be chosen "
                            "(the log names each failed or rejected reply)")
        total = float(sum(n for _, (_, n) in accepted))
        return [{k: (sum(s[i][k].astype(np.float64) * n for _, (s, n) in accepted) / total).astype(np.float32)
                 for k in self.bn_names} for i in range(len(pool))]

    def evaluate_candidates(self, grid: Grid, nodes: list[int], pool: list[dict],
                            stats: list[dict[str, np.ndarray]] | None) -> list[float]:
        """Phase candidate_loss: each candidate's example-weighted validation loss over the nodes."""
        if stats is None:  # no-recalibration: the nodes get the weights and masks here
            records = self.model_records(pool)
        else:
            records = {fedtiny.BN.format(i): protocol.pack(s) for i, s in enumerate(stats)}

        def check(msg: Message) -> tuple[list[float], int]:
            n = self.val_bound(msg)
            losses = metrics_of(msg).get(fedtiny.CANDIDATE_LOSSES)
            if not isinstance(losses, list) or len(losses) != len(pool) or not all(
                    isinstance(v, float) and np.isfinite(v) and v >= 0 for v in losses):
                raise InvalidReply(f"metrics['{fedtiny.CANDIDATE_LOSSES}'] must be {len(pool)} finite losses >= 0")
            return losses, n

        accepted = self.run_phase(grid, protocol.CANDIDATE_LOSS, nodes,
                                  lambda node: self.phase_content(node, records), check)
        if not accepted:
            raise RunFailed("fedtiny: no client returned valid candidate losses, so no candidate can be chosen "
                            "(the log names each failed or rejected reply)")
        total = float(sum(n for _, (_, n) in accepted))
        return [sum(losses[i] * n for _, (losses, n) in accepted) / total for i in range(len(pool))]

    def check_budget(self) -> None:
        """Stop before round 1 when a client's training step under the mask exceeds the budget."""
        budget, c = self.cfg.memory_budget, self.experiment.client
        if budget is None:
            return
        model = sparsify(self.global_model(), {k: torch.from_numpy(m) for k, m in self.masks.items()})
        x = torch.zeros((c.batch_size, *self.input_shape))
        peak = fedtiny.step_memory(model, x, torch.zeros(c.batch_size, dtype=torch.int64), c).peak
        if peak > budget:
            raise RunFailed(f"fedtiny.memory_budget: a client's training step at density {self.density():.4f} takes "
                            f"{peak} bytes (measured: sparse weights, gradients, optimizer state and the activations "
                            f"of a batch of {c.batch_size}); the budget is {budget} bytes. Raise "
                            "fedtiny.memory_budget, or lower pruning.density or client.batch_size.")
        self._record["fedtiny_server_measured_peak"] = peak

    # ------------------------------------------------------------------ rounds

    def configure_train(self, server_round, arrays, config, grid):
        self._grid, self._trained = grid, set()
        layers = layers_to_adjust(server_round, self.names, self.cfg.granularity, self.cfg.delta, self.cfg.t_end) \
            if self.cfg.adjust_rate > 0 else []
        rate = cosine_decay(server_round, self.cfg.adjust_rate, self.cfg.t_end)
        counts = adjust_counts({k: int(self.masks[k].sum()) for k in layers}, rate)
        self._adjust = {k: n for k, n in counts.items() if n > 0}
        return super().configure_train(server_round, arrays, config, grid)

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        config = super().node_config(server_round, node_id, config)
        if self._adjust:  # only training messages of an adjustment round (cleared before evaluation)
            config[fedtiny.TOPK_LAYERS] = list(self._adjust)
            config[fedtiny.TOPK_COUNTS] = list(self._adjust.values())
        return config

    def check_train_reply(self, msg: Message):
        result = super().check_train_reply(msg)
        budget = self.cfg.memory_budget
        if budget is not None:
            peak = result[3].get(protocol.PEAK_MEMORY)
            if peak is None:
                raise InvalidReply(f"no metrics['{protocol.PEAK_MEMORY}'] under a memory budget")
            if peak > budget:
                raise InvalidReply(f"peak-memory {peak:.0f} exceeds the memory budget of {budget} bytes")
        self._trained.add(msg.metadata.src_node_id)
        return result

    def after_round(self, server_round: int) -> None:
        adjust, self._adjust = self._adjust, {}
        if not adjust or not self._trained:
            return
        accepted = self.collect_topk(server_round, adjust)
        if not accepted:
            return
        masks, moved = dict(self.masks), 0
        for layer, n in adjust.items():
            index, mean = mean_sparse([(grads[layer][0], grads[layer][1], w) for _, (grads, w) in accepted])
            masks[layer] = prune_and_grow(self.global_arrays[layer], self.masks[layer], index, mean, n)
            moved += int((masks[layer] & ~self.masks[layer]).sum())
        self.adjustments += 1
        self._record.update(fedtiny_adjusted_layers=list(adjust), fedtiny_grown=moved, fedtiny_topk_nodes=len(accepted))
        if moved:
            self.install(masks)

    def collect_topk(self, server_round: int, adjust: dict[str, int]) -> list[tuple[int, tuple[dict, int]]]:
        """Phase topk_grads: every adjusted layer's top-K list from the nodes trained this round."""
        dense = protocol.pack({k: np.ones(self.masks[k].shape, np.float32) for k in adjust})
        dense_bytes = []

        def check(msg: Message) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
            n = check_num_examples(msg, self.num_examples_bound(msg))
            record = self.record_of(msg)
            expected = {}
            for layer, limit in adjust.items():  # the declared lengths, checked before anything is decoded
                name = fedtiny.INDEX.format(layer)
                shape = tuple(record[name].shape) if name in record else ()
                if len(shape) != 1 or shape[0] > limit:
                    raise InvalidReply(f"{layer}: top-K lists must be 1-D of at most {limit} entries, got {shape}")
                expected[fedtiny.INDEX.format(layer)] = (shape, np.dtype(np.int32))
                expected[fedtiny.GRAD.format(layer)] = (shape, np.dtype(np.float32))
            arrays = protocol.unpack(record, expected)
            self.check_finite(arrays)
            grads = {}
            for layer in adjust:
                index = arrays[fedtiny.INDEX.format(layer)].astype(np.int64)
                mask = self.masks[layer].reshape(-1)
                if index.size and (index[0] < 0 or index[-1] >= mask.size or (np.diff(index) <= 0).any()):
                    raise InvalidReply(f"{layer}: positions must be increasing, unique and in 0..{mask.size - 1}")
                if mask[index].any():
                    raise InvalidReply(f"{layer}: gradients at positions the mask keeps")
                grads[layer] = (index, arrays[fedtiny.GRAD.format(layer)])
            dense_bytes.append(recorddict_to_proto(RecordDict(
                {protocol.ARRAYS: dense, protocol.METRICS: msg.content[protocol.METRICS]})).ByteSize())
            return grads, n

        def content(node: int) -> RecordDict:
            return RecordDict({protocol.CONFIG: self.node_config(server_round, node, ConfigRecord())})

        accepted = self.run_phase(self._grid, protocol.TOPK_GRADS, sorted(self._trained), content, check)
        self._record["fedtiny_dense_gradient_bytes"] = sum(dense_bytes)
        return accepted

    def extra_round_record(self) -> dict:
        record, self._record = self._record, {}
        if self.cfg.memory_budget is not None:
            record["memory_budget"] = self.cfg.memory_budget
        return record

    # ------------------------------------------------------------------ checkpoints

    def method_state(self) -> dict:
        return {"chosen": self.chosen, "candidate_losses": list(self.candidate_losses), "adjustments": self.adjustments}

    def load_method_state(self, state: dict) -> None:
        self.chosen = state["chosen"]
        self.candidate_losses = list(state["candidate_losses"])
        self.adjustments = int(state["adjustments"])

