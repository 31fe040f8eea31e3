"""The base strategy: Flower's FedAvg made sparse-aware, reproducible and accountable.

What it adds to :class:`flwr.serverapp.strategy.FedAvg`:

* a global mask (``None`` while dense): weights travel through the pruning codec
  (strategies/transport.py) as kept values only to nodes that hold the current mask, with the
  mask to those that do not; per-node payloads;
* mask-aware averaging: every coordinate over the clients that kept it; coordinates nobody sent
  keep their value; then the method's server-side hook (:meth:`after_aggregate`);
* a preparation phase before round 1 (:meth:`prepare`, e.g. SNIP's scoring round);

* node discovery: before a node is first sampled it is asked (message ``query.describe``) for its
  ``partition-id`` and data sizes, so sampling and aggregation order depend on partitions, not on
  Flower's random node ids, and a run repeats exactly under the same seed;
* sampling from ``numpy_rng(seed, "sample-train", round)``; a node that left is not waited for;
* validation of every reply (strategies/validation.py): a bad one is dropped and logged with the
  node id and the reason, counted in the round's ``rejected_replies``, and never touches the model;
* a weighted average that keeps dtypes, over replies sorted by partition id;
* its own round loop (:meth:`start`), which meters the bytes of every message (strategies/ledger.py)
  and hands one record per round to ``on_round``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedprune.experiment import SamplingConfig
from fedprune.seeding import numpy_rng
from pruning.codec import CodecError
from strategies.aggregation import masked_average
from strategies.ledger import MeteredGrid
from strategies.transport import pack, unpack
from strategies.validation import InvalidReply, check_arrays, check_num_examples

DESCRIBE = "query.describe"
NODE_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class NodeInfo:
    """What a node said about itself when it joined."""

    partition_id: int
    num_train: int
    num_val: int


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make BatchNorm's
    # num_batches_tracked shape (1,))
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in arrays.items()})


class FedPruneStrategy(FedAvg):
    """FedAvg with a global mask, deterministic sampling, validated replies and a byte ledger.

    Without a mask (``self.masks is None``) it is dense FedAvg. Methods subclass it and add only
    what the method adds: :meth:`prepare` before round 1, :meth:`after_aggregate` after each
    aggregation, :meth:`node_config` for per-node knobs.
    """

    def __init__(self, *, seed: int, sampling: SamplingConfig, maskable: Iterable[str] = (),
                 value_dtype: str = "float32", weighted: bool = True,
                 describe_timeout: float = 600.0) -> None:
        super().__init__(
            fraction_train=sampling.fraction_train,
            fraction_evaluate=sampling.fraction_evaluate,
            min_train_nodes=sampling.min_train_nodes,
            min_evaluate_nodes=sampling.min_evaluate_nodes,
            min_available_nodes=sampling.min_available_nodes,
        )
        self.seed = seed
        self.describe_timeout = describe_timeout
        self.maskable = frozenset(maskable)
        self.value_dtype = value_dtype
        self.weighted = weighted
        self.nodes: dict[int, NodeInfo] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.round_stats: dict[str, float] = {}
        self.masks: dict[str, np.ndarray] | None = None
        self.mask_version = 0
        self.node_mask_version: dict[int, int] = {}
        self._payloads: dict[bool, ArrayRecord] = {}

    # ------------------------------------------------------------------ the mask

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        """Install a new global mask (bool arrays over maskable names) and zero the pruned weights."""
        unknown = set(masks) - self.maskable
        if unknown:
            raise ValueError(f"masks for parameters that are not maskable: {sorted(unknown)[:3]}")
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
        self.mask_version += 1
        self._payloads.clear()
        for name, mask in self.masks.items():
            self.global_arrays[name] = np.where(mask, self.global_arrays[name], 0).astype(
                self.global_arrays[name].dtype)
        self.round_stats["mask_changed"] = 1

    def density(self) -> float:
        """Kept share of the maskable parameters (1.0 while dense)."""
        if not self.masks:
            return 1.0
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.size for m in self.masks.values())

    def payload(self, node_id: int) -> tuple[ArrayRecord, bool]:
        """The encoded global weights for a node, and whether they carry the mask."""
        has_mask = self.masks is not None and self.node_mask_version.get(node_id) == self.mask_version
        if has_mask not in self._payloads:
            self._payloads[has_mask] = pack(self.global_arrays, self.masks, receiver_has_mask=has_mask,
                                            value_dtype=self.value_dtype)
        return self._payloads[has_mask], self.masks is not None and not has_mask

    # ------------------------------------------------------------------ discovery and sampling

    def _available(self, grid: Grid, minimum: int) -> list[int]:
        """Connected nodes, once at least ``minimum`` are there; described nodes only."""
        while len(ids := sorted(grid.get_node_ids())) < minimum:
            log(INFO, "Waiting for nodes: %d connected, %d required", len(ids), minimum)
            time.sleep(NODE_WAIT_SECONDS)
        self._describe(grid, [n for n in ids if n not in self.nodes])
        return sorted((n for n in ids if n in self.nodes), key=lambda n: self.nodes[n].partition_id)

    def _describe(self, grid: Grid, node_ids: list[int]) -> None:
        if not node_ids:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=DESCRIBE)
                for n in node_ids]
        for reply in grid.send_and_receive(msgs, timeout=self.describe_timeout):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise InvalidReply(reply.error.reason)
                m = reply.content["metrics"]
                info = NodeInfo(int(m["partition-id"]), int(m["num-train"]), int(m["num-val"]))
            except (InvalidReply, KeyError, TypeError, ValueError) as exc:
                log(WARNING, "Node %d did not describe itself (%s); it will not be sampled", node, exc)
                continue
            self.nodes[node] = info

    def sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int, purpose: str) -> list[int]:
        """Nodes for this round, drawn from the run seed; ordered by partition id."""
        if fraction == 0.0:
            return []
        available = self._available(grid, self.min_available_nodes)
        k = min(max(int(len(available) * fraction), min_nodes), len(available))
        chosen = numpy_rng(self.seed, purpose, server_round).choice(len(available), size=k, replace=False)
        return [available[i] for i in sorted(chosen)]

    # ------------------------------------------------------------------ messages

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """The config one node gets; methods add their knobs here."""
        return ConfigRecord({**dict(config), "server-round": server_round, "mask-version": self.mask_version,
                             "value-dtype": self.value_dtype})

    def instructions(self, server_round: int, nodes: list[int], config: ConfigRecord,
                     message_type: str) -> list[Message]:
        """One message per node: its encoded weights (+ mask when it lacks it) and its config."""
        msgs = []
        for node in nodes:
            arrays, mask_sent = self.payload(node)
            cfg = self.node_config(server_round, node, config)
            cfg["mask-sent"] = mask_sent
            msgs.append(Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=node,
                                message_type=message_type))
        return msgs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes, "sample-train")
        return self.instructions(server_round, nodes, config, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        nodes = self.sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes,
                            "sample-evaluate")
        return self.instructions(server_round, nodes, config, MessageType.EVALUATE)

    def accept(self, replies: Iterable[Message], check: Callable[[Message], object]) -> list[tuple[Message, object]]:
        """Replies that pass ``check`` (with its result), sorted by partition id; the rest are logged."""
        good, failed, rejected = [], 0, 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                log(WARNING, "Node %d replied with an error: %s", node, msg.error.reason)
                continue
            try:
                good.append((msg, check(msg)))
            except (InvalidReply, CodecError) as exc:
                rejected += 1
                log(WARNING, "Rejected the reply of node %d: %s", node, exc)
        self.round_stats["failed_replies"] = self.round_stats.get("failed_replies", 0) + failed
        self.round_stats["rejected_replies"] = self.round_stats.get("rejected_replies", 0) + rejected
        order = {n: info.partition_id for n, info in self.nodes.items()}
        return sorted(good, key=lambda pair: order.get(pair[0].metadata.src_node_id, 1 << 62))

    def num_examples_bound(self, msg: Message) -> int | None:
        info = self.nodes.get(msg.metadata.src_node_id)
        return None if info is None else max(info.num_train, 1)

    # ------------------------------------------------------------------ aggregation

    def check_mask_version(self, msg: Message) -> None:
        """A reply must come from training under the current mask (a missing version means 0: dense)."""
        metrics = msg.content.metric_records.get("metrics")
        version = metrics.get("mask-version", 0) if metrics is not None else None
        if version != self.mask_version:
            raise InvalidReply(f"trained under mask version {version!r}, current is {self.mask_version}")

    def check_train_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
        """(arrays, coverage masks, num-examples) of a valid reply; raises InvalidReply otherwise.

        Values-only blobs decode under the global mask; a blob that carries its own mask must
        carry exactly the global one (the codec checks), so pruned weights stay pruned.
        """
        n = check_num_examples(msg, self.num_examples_bound(msg))
        self.check_mask_version(msg)
        record = msg.content.array_records.get("arrays")
        if record is None:
            raise InvalidReply("no ArrayRecord 'arrays'")
        decoded, _ = unpack(record, self.masks, {k: v.shape for k, v in self.global_arrays.items()
                                                 if k in record})
        arrays = check_arrays(decoded, self.global_arrays)
        return arrays, dict(self.masks or {}), n

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept(replies, self.check_train_reply)
        if not accepted:
            return None, None
        for msg, _ in accepted:
            self.node_mask_version[msg.metadata.src_node_id] = self.mask_version
        weights = [n if self.weighted else 1 for _, (_, _, n) in accepted]
        self.global_arrays = masked_average([a for _, (a, _, _) in accepted], [c for _, (_, c, _) in accepted],
                                            weights, self.global_arrays)
        self.after_aggregate(server_round)
        self._payloads.clear()
        metrics = self.mean_metrics([m for m, _ in accepted], [n for _, (_, _, n) in accepted])
        return numpy_to_arrays(self.global_arrays), metrics

    def after_aggregate(self, server_round: int) -> None:
        """Server-side pruning / regrowth on ``self.global_arrays`` (none for dense FedAvg)."""

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        def check(msg: Message) -> int:
            self.check_mask_version(msg)
            return check_num_examples(msg, None)

        accepted = self.accept(replies, check)
        if not accepted:
            return None
        for msg, _ in accepted:
            self.node_mask_version[msg.metadata.src_node_id] = self.mask_version
        return self.mean_metrics([m for m, _ in accepted], [n for _, n in accepted])

    SUMMED_METRICS = ("flops",)
    MAXED_METRICS = ("peak-memory",)
    SKIPPED_METRICS = ("num-examples", "partition-id", "mask-version")

    @classmethod
    def mean_metrics(cls, replies: list[Message], weights: list[int]) -> MetricRecord:
        """Example-weighted mean of the scalar metrics the replies share; costs summed (``flops``)
        or maxed (``peak-memory``) over clients; plus ``num-examples`` and ``num-nodes``."""
        records = [m.content["metrics"] for m in replies]
        keys = set.intersection(*(set(r) for r in records)) - set(cls.SKIPPED_METRICS)
        total = float(sum(weights))
        out = {}
        for k in sorted(keys):
            values = [r[k] for r in records]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            if k in cls.SUMMED_METRICS:
                out[k] = float(sum(values))
            elif k in cls.MAXED_METRICS:
                out[k] = float(max(values))
            else:
                out[k] = sum(float(v) * w for v, w in zip(values, weights)) / total
        out["num-examples"] = int(total)
        out["num-nodes"] = len(records)
        return MetricRecord(out)

    # ------------------------------------------------------------------ the loop

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              on_round: Callable[[dict], None] | None = None) -> Result:
        """Run ``num_rounds`` rounds; after each, ``on_round`` gets the round's record.

        The record holds the central evaluation (``evaluate_fn``), the aggregated client metrics,
        the bytes of the round's messages per direction (training and evaluation apart), rejected
        and failed replies, and wall seconds.
        """
        metered = MeteredGrid(grid)
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result, t0 = Result(), time.monotonic()
        self.global_arrays = arrays_to_numpy(initial_arrays)
        self.prepare(metered)
        arrays = numpy_to_arrays(self.global_arrays)

        def finish(server_round: int, train_m, eval_m, t_round: float) -> None:
            central = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if central is not None:
                result.evaluate_metrics_serverapp[server_round] = central
            record = {"round": server_round, **{k: v for k, v in (central or {}).items()}}
            record.update({f"train_{k.replace('-', '_')}": v for k, v in (train_m or {}).items()})
            record.update({f"val_{k.replace('-', '_')}": v for k, v in (eval_m or {}).items()})
            traffic = metered.take()
            record.update(bytes_down=traffic["train_bytes_down"], bytes_up=traffic["train_bytes_up"],
                          eval_bytes_down=traffic["eval_bytes_down"], eval_bytes_up=traffic["eval_bytes_up"],
                          rejected_replies=int(self.round_stats.get("rejected_replies", 0)),
                          failed_replies=int(self.round_stats.get("failed_replies", 0)),
                          round_seconds=time.monotonic() - t_round, wall_seconds=time.monotonic() - t0,
                          density=self.density(), mask_version=self.mask_version,
                          mask_changed=int(self.round_stats.get("mask_changed", 0)))
            record.update(self.extra_round_record())
            self.round_stats = {}
            if on_round is not None:
                on_round(record)

        finish(0, None, None, time.monotonic())
        for server_round in range(1, num_rounds + 1):
            t_round = time.monotonic()
            replies = metered.send_and_receive(
                self.configure_train(server_round, arrays, train_config, metered), timeout=timeout)
            new_arrays, train_m = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            if train_m is not None:
                result.train_metrics_clientapp[server_round] = train_m
            eval_replies = metered.send_and_receive(
                self.configure_evaluate(server_round, arrays, evaluate_config, metered), timeout=timeout)
            eval_m = self.aggregate_evaluate(server_round, eval_replies)
            if eval_m is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_m
            finish(server_round, train_m, eval_m, t_round)
        result.arrays = arrays
        return result

    def prepare(self, grid: Grid) -> None:
        """Work before round 1 on ``self.global_arrays`` (a scoring round, a data-free mask...);
        its traffic is recorded in round 0."""

    def extra_round_record(self) -> dict:
        """Method-specific fields of a round's record (e.g. density); none for dense FedAvg."""
        return {}
