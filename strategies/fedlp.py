"""FedLP: layer-wise pruning (Zhu et al., ICC 2023), Homo and Hetero, on the base strategy.

* ``fedlp-homo``: every node downloads the full model, trains it, and uploads each unit (a
  state-dict entry, or a module, ``fedlp.unit``) with probability ``fedlp.p``. The keep decisions
  come from ``numpy_rng(seed, "fedlp-keep", round, partition_id)`` (fedprune/fedlp.py), so the
  server recomputes each node's draw and rejects a reply whose key set differs from it. The base's
  :func:`~strategies.aggregation.masked_average` averages each entry over the nodes that sent it;
  an entry nobody sent keeps its value.
* ``fedlp-hetero``: node k has a depth level ``c_k`` in 1..5 for the whole run, drawn from
  ``numpy_rng(seed, "fedlp-level", partition_id)`` under the preference distribution
  (``fedlp.preferred_level``, ``fedlp.preference_weight``). It receives and returns only the
  shared entries of its level (the first ``c_k + 1`` conv layers and their BatchNorm, or the whole
  model at level 5); its private head never leaves the node, and restarts every round from its
  initial value as in the authors' code unless ``fedlp.keep_head`` (client_app/fedlp.py). Each
  global entry is averaged over the nodes that hold it. The server evaluates the level-5 global
  model; client-side evaluation uses each node's own sub-model.

Averaging is weighted by examples unless ``fedlp.weighted`` is false (the authors' plain mean).
Round records add FedLP's ledger: Homo the uploaded share of elements and the entries nobody sent;
Hetero the trained nodes, training FLOPs per example and peak memory per level, and the
validation accuracy per level.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedprune import protocol
from fedprune.data import SPECS
from fedprune.experiment import Experiment
from fedprune.fedlp import draw_level, kept_keys, preference_probs, shared_keys
from fedprune.models import FEDLP_LEVELS, FedLPCNN
from fedprune.task import new_model
from strategies.base import FedPruneStrategy
from strategies.validation import TRAIN_METRICS, InvalidReply, check_metrics, check_num_examples


class FedLPStrategy(FedPruneStrategy):
    """What both FedLP schemes share: partition lookup, the expected key set of a reply, and
    decoding of partial replies."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment, weighted=experiment.fedlp.weighted)
        self.cfg = experiment.fedlp
        self.keys = list(new_model(experiment).state_dict())
        self.server_round = 0
        self._record: dict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.server_round = server_round
        self._record = {}
        return super().configure_train(server_round, arrays, config, grid)

    def partition_of(self, msg: Message) -> int:
        info = self.nodes.get(msg.metadata.src_node_id)
        if info is None:
            raise InvalidReply("reply from a node that never described itself")
        return info.partition_id

    def expected_keys(self, msg: Message) -> list[str]:
        """The entries this node must send in this round."""
        raise NotImplementedError

    def check_train_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int, dict]:
        """A valid reply carries exactly the entries its node's draw (Homo) or level (Hetero) says,
        each with the global entry's shape and dtype and finite; the rest as in the base."""
        n = check_num_examples(msg, self.num_examples_bound(msg))
        self.check_mask_version(msg)
        metrics = check_metrics(msg, TRAIN_METRICS)
        expected = self.expected_keys(msg)
        record = self.record_of(msg)
        if set(record.keys()) != set(expected):
            sent = set(record.keys())
            raise InvalidReply(
                f"sent {len(sent)} entries, its {self.what_decides()} says {len(expected)}: missing "
                f"{sorted(set(expected) - sent)[:3]}, unexpected {sorted(sent - set(expected))[:3]}")
        arrays = protocol.unpack(record, protocol.expected_of({k: self.global_arrays[k] for k in expected}))
        self.check_finite(arrays)
        self.note_reply(msg, arrays, n, metrics)
        return arrays, {}, n, metrics

    def what_decides(self) -> str:
        return "draw"

    def note_reply(self, msg: Message, arrays: dict[str, np.ndarray], n: int, metrics: dict) -> None:
        """Per-round ledger of an accepted reply (``metrics``: its checked metrics)."""

    def extra_round_record(self) -> dict:
        record, self._record = self._record, {}
        return record


class FedLPHomo(FedLPStrategy):
    """FedLP-Homo: full model down, each unit up with probability ``p``."""

    def expected_keys(self, msg: Message) -> list[str]:
        return kept_keys(self.seed, self.server_round, self.partition_of(msg), self.keys, self.cfg.p,
                         self.cfg.unit)

    def what_decides(self) -> str:
        return f"keep draw for round {self.server_round}"

    def note_reply(self, msg: Message, arrays: dict[str, np.ndarray], n: int, metrics: dict) -> None:
        total = sum(v.size for v in self.global_arrays.values())
        self._record.setdefault("fedlp_uploaded_share", []).append(sum(v.size for v in arrays.values()) / total)
        self._record.setdefault("_sent", set()).update(arrays)

    def extra_round_record(self) -> dict:
        record = super().extra_round_record()
        if "fedlp_uploaded_share" in record:
            shares = record["fedlp_uploaded_share"]
            record["fedlp_uploaded_share"] = float(np.mean(shares))
            record["fedlp_entries_unsent"] = len(set(self.keys) - record.pop("_sent"))
        return record


class FedLPHetero(FedLPStrategy):
    """FedLP-Hetero: each node exchanges the shared entries of its fixed depth level."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        spec = SPECS[experiment.dataset.name]
        self.probs = preference_probs(self.cfg.preferred_level, self.cfg.preference_weight)
        self.level_keys = {c: shared_keys(FedLPCNN(spec.channels, spec.num_classes, spec.size, c))
                           for c in FEDLP_LEVELS}
        self._level_payloads: dict[int, ArrayRecord] = {}

    def level(self, partition_id: int) -> int:
        return draw_level(self.seed, partition_id, self.probs)

    def node_level(self, node_id: int) -> int:
        return self.level(self.nodes[node_id].partition_id)

    def payload(self, node_id: int) -> RecordDict:
        """The shared entries of the node's level (no mask: FedLP prunes whole layers)."""
        c = self.node_level(node_id)
        if c not in self._level_payloads:
            self._level_payloads[c] = protocol.pack({k: self.global_arrays[k] for k in self.level_keys[c]},
                                                    value_dtype=self.value_dtype)
        return RecordDict({protocol.ARRAYS: self._level_payloads[c]})

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        cfg = super().node_config(server_round, node_id, config)
        cfg["fedlp-level"] = self.node_level(node_id)
        return cfg

    def expected_keys(self, msg: Message) -> list[str]:
        return self.level_keys[self.level(self.partition_of(msg))]

    def what_decides(self) -> str:
        return "level"

    def note_reply(self, msg: Message, arrays: dict[str, np.ndarray], n: int, metrics: dict) -> None:
        c = self.level(self.partition_of(msg))
        self._record.setdefault("_levels", []).append(
            (c, metrics.get(protocol.FLOPS, 0.0), n, metrics.get(protocol.PEAK_MEMORY, 0.0)))

    def after_round(self, server_round: int) -> None:
        self._level_payloads.clear()

    def check_evaluate_reply(self, msg: Message) -> tuple[int, dict]:
        """The base's checks; the node's level's accuracy is noted for the round's record."""
        n, metrics = super().check_evaluate_reply(msg)
        self._by_level[self.level(self.partition_of(msg))].append((metrics[protocol.ACCURACY], n))
        return n, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The base's example-weighted mean, plus each level's validation accuracy."""
        self._by_level: dict[int, list[tuple[float, int]]] = defaultdict(list)
        out = super().aggregate_evaluate(server_round, replies)
        by_level = self._by_level
        if by_level:
            self._record["fedlp_val_accuracy_by_level"] = {
                str(c): sum(a * n for a, n in v) / sum(n for _, n in v) for c, v in sorted(by_level.items())}
        return out

    def extra_round_record(self) -> dict:
        record = super().extra_round_record()
        rows = record.pop("_levels", [])
        if rows:
            levels = sorted({c for c, *_ in rows})
            record["fedlp_nodes_by_level"] = {str(c): sum(1 for r in rows if r[0] == c) for c in levels}
            record["fedlp_train_flops_per_example_by_level"] = {
                str(c): sum(r[1] for r in rows if r[0] == c) / sum(r[2] for r in rows if r[0] == c) for c in levels}
            record["fedlp_peak_memory_by_level"] = {str(c): max(r[3] for r in rows if r[0] == c) for c in levels}
        return record
