"""The base strategy: Flower's FedAvg made sparse-aware, reproducible, accountable and hard to break.

What it adds to :class:`flwr.serverapp.strategy.FedAvg`:

* a global mask (``None`` while dense): masked tensors travel as kept values only, and the mask
  (its own ``mask`` record) goes to exactly the nodes that lack its current version; a node that
  lost it (a restart) says so (``STATE_LOST``) and gets it again in the same round;
* mask-aware averaging in float64 (strategies/aggregation.py): every coordinate over the clients
  that kept it; then the method's server-side hook (:meth:`after_round`), called every round, also
  after a round without an accepted reply, so a cut that is due is never skipped;
* protocol phases (:meth:`run_phase`): a query of a named type to chosen nodes with per-node
  content, every reply validated by a given checker, accepted results in partition order, the
  traffic booked under the phase's name; :meth:`prepare` runs phases before round 1;
* node discovery: a node is asked (phase ``describe``) for its partition before it is first
  sampled, so sampling and aggregation order depend on partitions, not on Flower's random node
  ids. A node whose describe fails, that claims a partition another connected node holds, or
  another number of partitions is refused with the reason, and counted. A small federation
  (``sampling.describe_all_up_to``) describes every node at once; a larger one only the nodes
  of the partitions it draws (:meth:`_sample_partitions`), so a round's messages follow the
  sample, not the federation;
* sampling from ``numpy_rng(seed, "sample-<purpose>", round)``; a round waits at most
  ``sampling.node_wait_seconds`` for enough usable nodes, then the run stops with an error
  (:class:`RunFailed`) that says why; so does a run in which no training reply was accepted;
* validation of every reply before it is used (fedprune/protocol.py for tensors,
  strategies/validation.py for metrics): a bad one is dropped and logged with the node id and the
  reason, counted in the round's ``rejected_replies``, and never touches the model;
* its own round loop (:meth:`start`), which meters the bytes of every message by purpose
  (strategies/ledger.py), hands one record per round to ``on_round`` and the strategy's whole
  state to ``on_checkpoint``; a run resumes from such a state (``resume=``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedprune import protocol
from fedprune.experiment import Experiment
from fedprune.seeding import numpy_rng
from pruning.codec import CodecError
from strategies.aggregation import masked_average
from strategies.ledger import MeteredGrid
from strategies.validation import (EVALUATE_METRICS, TRAIN_METRICS, InvalidReply, aggregate_metrics,
                                   check_int, check_metrics, check_num_examples, metrics_of)

NODE_POLL_SECONDS = 1.0


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


@dataclass(frozen=True)
class NodeInfo:
    """What a node said about itself when it joined."""

    partition_id: int
    num_partitions: int
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
    what the method adds: :meth:`prepare` before round 1, :meth:`after_round` after each
    aggregation, :meth:`node_config` for per-node knobs, :meth:`method_state` /
    :meth:`load_method_state` for what a checkpoint must keep.
    """

    def __init__(self, experiment: Experiment, *, maskable: Iterable[str] = (), weighted: bool = True) -> None:
        s = experiment.sampling
        super().__init__(fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
                         min_train_nodes=s.min_train_nodes, min_evaluate_nodes=s.min_evaluate_nodes,
                         min_available_nodes=s.min_available_nodes)
        self.experiment = experiment
        self.seed = experiment.seed
        self.node_wait_seconds = s.node_wait_seconds
        self.reply_timeout = 3600.0
        self.maskable = frozenset(maskable)
        self.value_dtype = experiment.transport.value_dtype
        self.weighted = weighted
        self.nodes: dict[int, NodeInfo] = {}
        self.refused: dict[int, str] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.round_stats: dict[str, float] = {}
        self.masks: dict[str, np.ndarray] | None = None
        self.mask_version = 0
        self.node_mask_version: dict[int, int] = {}
        self._registered: dict[int, str] = {}
        self.trained_rounds = 0
        self._payloads: dict[str, ArrayRecord] = {}

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

    def holds_mask(self, node_id: int) -> bool:
        return self.masks is None or self.node_mask_version.get(node_id) == self.mask_version

    def payload(self, node_id: int) -> RecordDict:
        """The node's share of a message: the encoded global weights, and the mask if it lacks it."""
        if "arrays" not in self._payloads:
            self._payloads["arrays"] = protocol.pack(self.global_arrays, self.masks, value_dtype=self.value_dtype)
        content = {protocol.ARRAYS: self._payloads["arrays"]}
        if not self.holds_mask(node_id):
            if "mask" not in self._payloads:
                self._payloads["mask"] = protocol.pack_masks(self.masks)
            content[protocol.MASK] = self._payloads["mask"]
        return RecordDict(content)

    # ------------------------------------------------------------------ discovery and sampling

    def _connected(self, grid: Grid) -> list[int]:
        """The connected nodes; what was known of the nodes that left is forgotten."""
        connected = list(grid.get_node_ids())
        present = set(connected)
        for gone in set(self.nodes) - present:
            del self.nodes[gone]
            self.node_mask_version.pop(gone, None)
        self.refused = {n: why for n, why in self.refused.items() if n in present}
        return connected

    def _describe(self, grid: Grid, nodes: list[int]) -> None:
        """Ask ``nodes`` for their partition; members join ``self.nodes``, the others are refused."""
        outcome = self.run_phase(grid, protocol.DESCRIBE, nodes, lambda n: RecordDict({}), self._check_describe,
                                 refuse=True)
        # the federation's number of partitions: the members', else the most common (then smallest) claim
        claims = [i.num_partitions for i in self.nodes.values()] or [i.num_partitions for _, i in outcome]
        num = min(set(claims), key=lambda c: (-claims.count(c), c)) if claims else None
        for node, info in outcome:
            taken = {i.partition_id: n for n, i in self.nodes.items()}
            if info.partition_id in taken:
                why = f"partition-id {info.partition_id} is already held by node {taken[info.partition_id]}"
            elif info.num_partitions != num:
                why = f"num-partitions {info.num_partitions} differs from the federation's {num}"
            else:
                self.nodes[node] = info
                continue
            self.refuse(node, why)

    def _discover(self, grid: Grid, connected: list[int]) -> list[int]:
        """Describe every new connected node; the usable ones (connected, described), by partition."""
        new = sorted(set(connected) - set(self.nodes) - set(self.refused))
        if new:
            self._describe(grid, new)
        return sorted((n for n in connected if n in self.nodes), key=lambda n: self.nodes[n].partition_id)

    def refuse(self, node: int, why: str) -> None:
        self.refused[node] = why
        log(WARNING, "Node %d is refused and will not be sampled: %s", node, why)

    def _check_describe(self, msg: Message) -> NodeInfo:
        num = check_int(msg, protocol.NUM_PARTITIONS, 1, 10**9)
        return NodeInfo(check_int(msg, protocol.PARTITION_ID, 0, num - 1), num,
                        check_int(msg, protocol.NUM_TRAIN, 1, 10**9), check_int(msg, protocol.NUM_VAL, 0, 10**9))

    def _fail(self, server_round: int, usable: int, minimum: int, connected: int) -> None:
        reasons = "; ".join(f"node {n}: {why}" for n, why in sorted(self.refused.items())[:5])
        raise RunFailed(
            f"round {server_round}: {usable} usable nodes, {minimum} required "
            f"({connected} connected, {len(self.refused)} refused{': ' + reasons if reasons else ''}"
            f"{'' if connected >= minimum else f'; waited {self.node_wait_seconds:.0f} s'}). "
            "Fix the refused nodes, start more nodes, or lower sampling.min_available_nodes / "
            "min_train_nodes / min_evaluate_nodes (sampling.node_wait_seconds sets the wait).")

    def _wait_for_usable(self, grid: Grid, minimum: int, server_round: int,
                         usable: Callable[[list[int]], list[int]],
                         connected: list[int] | None = None) -> tuple[list[int], list[int]]:
        """(the connected nodes, ``usable(connected)``) once the latter holds at least ``minimum``.

        Waits while fewer than ``minimum`` nodes are connected, at most ``node_wait_seconds``; stops
        the run at once when enough are connected but too many were refused.
        """
        deadline = time.monotonic() + self.node_wait_seconds
        while True:
            connected = self._connected(grid) if connected is None else connected
            nodes = usable(connected)
            if len(nodes) >= minimum:
                return connected, nodes
            if len(connected) >= minimum or time.monotonic() >= deadline:
                self._fail(server_round, len(nodes), minimum, len(connected))
            log(INFO, "Waiting for nodes: %d usable, %d required", len(nodes), minimum)
            time.sleep(NODE_POLL_SECONDS)
            connected = None

    def sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int, purpose: str,
               *, validation: bool = False, ahead: tuple[tuple[str, float, int, bool], ...] = ()) -> list[int]:
        """Nodes for this round, drawn from the run seed; ordered by partition id.

        Up to ``sampling.describe_all_up_to`` connected nodes, every node is described and the draw
        is over the usable ones; in a larger federation only the drawn partitions' nodes are
        (:meth:`_sample_partitions`), together with those of the draws ``ahead`` (``(purpose,
        fraction, min_nodes, validation)`` of draws later in the round, e.g. the evaluation's).
        ``validation``: only nodes with a validation split (with many small partitions, some have none).
        """
        if fraction == 0.0:
            return []
        minimum = max(self.min_available_nodes, min_nodes)
        connected = self._connected(grid)
        if len(connected) > self.experiment.sampling.describe_all_up_to:
            draws = [(purpose, fraction, min_nodes, validation), *(d for d in ahead if d[1] > 0)]
            return self._sample_partitions(grid, server_round, draws, minimum, connected)[0]
        _, available = self._wait_for_usable(grid, minimum, server_round, lambda c: self._discover(grid, c),
                                             connected)
        if validation:
            available = [n for n in available if self.nodes[n].num_val > 0]
        k = min(max(int(len(available) * fraction), min_nodes), len(available))
        chosen = numpy_rng(self.seed, purpose, server_round).choice(len(available), size=k, replace=False)
        return [available[i] for i in sorted(chosen)]

    def _by_registration(self, grid: Grid, connected: list[int]) -> list[int]:
        """The connected nodes in the order they registered with the SuperLink: Flower's simulation
        registers the node of partition i i-th, so position i is the guess for partition i."""
        if hasattr(grid, "get_nodes") and not self._registered.keys() >= set(connected):
            self._registered.update({info.node_id: info.registered_at for info in grid.get_nodes()})
        return sorted(connected, key=lambda n: self._registered.get(n, ""))

    def _walk(self, order: np.ndarray, k: int, validation: bool, passed: set[int]) -> tuple[list[int], list[int]]:
        """The usable nodes among the first partitions of ``order`` and the partitions whose node is
        not known yet, until they make ``k``."""
        holder = {info.partition_id: n for n, info in self.nodes.items()}
        taken, unknown = [], []
        for p in order.tolist():
            if len(taken) + len(unknown) >= k:
                break
            node = holder.get(p)
            if node is None and p not in passed:
                unknown.append(p)
            elif node is not None and (not validation or self.nodes[node].num_val > 0):
                taken.append(node)
        return taken, unknown

    def _sample_partitions(self, grid: Grid, server_round: int, draws: list[tuple[str, float, int, bool]],
                           minimum: int, connected: list[int]) -> list[list[int]]:
        """Samples of a large federation, its nodes described as they are drawn.

        Each draw walks the partitions in an order drawn from ``numpy_rng(seed, purpose, round)``
        and takes the first k whose node is usable (k from the connected nodes not refused when the
        draw starts, as for a small federation). A partition's node is found by describing the node
        registered at its position (:meth:`_by_registration`), the draws' unknown partitions in one
        phase; a partition whose guessed node is refused is passed over; a guess that proves wrong
        makes the round describe every node, as a small federation does. The samples depend on the
        seed, the round and which partitions are usable, never on node ids; a node is described
        once per run.
        """
        connected, _ = self._wait_for_usable(grid, minimum, server_round,
                                             lambda c: [n for n in c if n not in self.refused], connected)
        guess = self._by_registration(grid, connected)
        num = next(iter(self.nodes.values())).num_partitions if self.nodes else len(connected)
        orders = [numpy_rng(self.seed, purpose, server_round).permutation(num) for purpose, *_ in draws]
        size = len(connected) - len(self.refused)
        sizes = [min(max(int(size * fraction), min_nodes), size) for _, fraction, min_nodes, _ in draws]
        passed: set[int] = set()  # partitions without a usable node
        everyone = False  # every connected node described
        while True:
            walks = [self._walk(order, k, validation, passed)
                     for order, k, (*_, validation) in zip(orders, sizes, draws)]
            unknown = sorted({p for _, missing in walks for p in missing})
            if not unknown:
                break
            ask = {p: guess[p] for p in unknown if p < len(guess) and guess[p] not in self.nodes}
            if new := sorted({n for n in ask.values() if n not in self.refused}):
                self._describe(grid, new)
            if not self.nodes and len(self.refused) >= minimum:
                self._fail(server_round, 0, minimum, len(connected))
            if self.nodes and next(iter(self.nodes.values())).num_partitions != num:
                return self._sample_partitions(grid, server_round, draws, minimum, connected)  # num was a guess
            holder = {info.partition_id for info in self.nodes.values()}
            passed |= {p for p, n in ask.items() if p not in holder and n in self.refused}
            if not everyone and any(p not in holder and p not in passed for p in unknown):
                log(WARNING, "Round %d: the registration order does not match the partitions; describing "
                    "every node", server_round)
                self._discover(grid, connected)
                everyone = True
            if everyone:
                holder = {info.partition_id for info in self.nodes.values()}
                passed |= {p for p in unknown if p not in holder}
        taken = walks[0][0]
        if len(taken) < draws[0][2]:
            self._fail(server_round, len(taken), draws[0][2], len(connected))
        return [sorted(t, key=lambda n: self.nodes[n].partition_id) for t, _ in walks]

    # ------------------------------------------------------------------ messages and phases

    def node_config(self, server_round: int, node_id: int, config: ConfigRecord) -> ConfigRecord:
        """The config one node gets; methods add their knobs here."""
        return ConfigRecord({**dict(config), protocol.SERVER_ROUND: server_round,
                             protocol.MASK_VERSION: self.mask_version, protocol.VALUE_DTYPE: self.value_dtype})

    def model_message(self, server_round: int, node: int, config: ConfigRecord, message_type: str) -> Message:
        """A message with the node's payload (weights, + mask when it lacks it) and its config."""
        content = self.payload(node)
        content[protocol.CONFIG] = self.node_config(server_round, node, config)
        return Message(content, dst_node_id=node, message_type=message_type)

    def instructions(self, server_round: int, nodes: list[int], config: ConfigRecord,
                     message_type: str) -> list[Message]:
        return [self.model_message(server_round, n, config, message_type) for n in nodes]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes, "sample-train",
                            ahead=(("sample-evaluate", self.fraction_evaluate, self.min_evaluate_nodes, True),))
        return self.instructions(server_round, nodes, config, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        nodes = self.sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes,
                            "sample-evaluate", validation=True)
        return self.instructions(server_round, nodes, config, MessageType.EVALUATE)

    def exchange(self, grid: Grid, messages: list[Message], server_round: int, config: ConfigRecord) -> list[Message]:
        """Send and receive; a node that lost its mask (``STATE_LOST``) gets it again, once."""
        replies = list(grid.send_and_receive(messages, timeout=self.reply_timeout))
        lost = {r.metadata.src_node_id for r in replies if r.has_error() and r.error.code == protocol.STATE_LOST}
        if not lost:
            return replies
        kind = {m.metadata.dst_node_id: m.metadata.message_type for m in messages}
        for node in sorted(lost):
            log(WARNING, "Node %d lost its state; sending it the mask again", node)
            self.node_mask_version.pop(node, None)
        retry = [self.model_message(server_round, n, config, kind[n]) for n in sorted(lost)]
        return [r for r in replies if r.metadata.src_node_id not in lost] + list(
            grid.send_and_receive(retry, timeout=self.reply_timeout))

    def run_phase(self, grid: Grid, phase: str, nodes: list[int], content: Callable[[int], RecordDict],
                  check: Callable[[Message], object], *, refuse: bool = False) -> list[tuple[int, object]]:
        """One protocol phase: a ``query.<phase>`` message with ``content(node)`` to each node;
        returns ``(node, check(reply))`` for the accepted replies, in partition order.

        Failed and rejected replies are counted and logged as for training (``refuse``: the node is
        also refused, as discovery does). The traffic is booked under the phase's name.
        """
        msgs = [Message(content(n), dst_node_id=n, message_type=protocol.query(phase)) for n in nodes]
        replies = grid.send_and_receive(msgs, timeout=self.reply_timeout)
        return [(m.metadata.src_node_id, result)
                for m, result in self.accept(replies, check, on_refused=self.refuse if refuse else None)]

    def accept(self, replies: Iterable[Message], check: Callable[[Message], object],
               on_refused: Callable[[int, str], None] | None = None) -> list[tuple[Message, object]]:
        """Replies that pass ``check`` (with its result), sorted by partition id; the rest are logged."""
        good, failed, rejected = [], 0, 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                why = f"replied with an error: {msg.error.reason}"
            else:
                try:
                    good.append((msg, check(msg)))
                    continue
                except (InvalidReply, CodecError, protocol.ProtocolError) as exc:
                    rejected += 1
                    why = f"rejected reply: {exc}"
            if on_refused is not None:
                on_refused(node, why)
            else:
                log(WARNING, "Node %d %s", node, why)
        self.round_stats["failed_replies"] = self.round_stats.get("failed_replies", 0) + failed
        self.round_stats["rejected_replies"] = self.round_stats.get("rejected_replies", 0) + rejected
        order = {n: info.partition_id for n, info in self.nodes.items()}
        return sorted(good, key=lambda pair: order.get(pair[0].metadata.src_node_id, 1 << 62))

    def num_examples_bound(self, msg: Message) -> int:
        info = self.nodes.get(msg.metadata.src_node_id)
        if info is None:
            raise InvalidReply("reply from a node that is not a described member of the federation")
        return max(info.num_train, 1)

    # ------------------------------------------------------------------ aggregation

    def check_mask_version(self, msg: Message) -> None:
        """A reply must come from work under the current mask (a missing version means 0: dense)."""
        has_version = protocol.MASK_VERSION in metrics_of(msg)
        version = check_int(msg, protocol.MASK_VERSION, 0, 1 << 62) if has_version else 0
        if version != self.mask_version:
            raise InvalidReply(f"trained under mask version {version}, current is {self.mask_version}")

    def record_of(self, msg: Message, key: str = protocol.ARRAYS) -> ArrayRecord:
        record = msg.content.array_records.get(key)
        if record is None:
            raise InvalidReply(f"no ArrayRecord '{key}'")
        return record

    def check_train_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int, dict]:
        """(arrays, coverage masks, num-examples, metrics) of a valid reply; raises otherwise.

        Masked tensors must be exactly the mask's kept values (decoded under the global mask, so
        pruned weights stay pruned); everything is checked before it is decoded.
        """
        n = check_num_examples(msg, self.num_examples_bound(msg))
        self.check_mask_version(msg)
        metrics = check_metrics(msg, TRAIN_METRICS)
        arrays = protocol.unpack(self.record_of(msg), protocol.expected_of(self.global_arrays), self.masks)
        self.check_finite(arrays)
        return arrays, dict(self.masks or {}), n, metrics

    @staticmethod
    def check_finite(arrays: dict[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise InvalidReply(f"{name}: non-finite values")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept(replies, self.check_train_reply)
        while accepted:
            weights = [n if self.weighted else 1 for _, (_, _, n, _) in accepted]
            average = masked_average([a for _, (a, _, _, _) in accepted], [c for _, (_, c, _, _) in accepted],
                                     weights, self.global_arrays)
            bad = [k for k, v in average.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
            if not bad:
                break
            worst = max(range(len(accepted)), key=lambda i: float(np.abs(accepted[i][1][0].get(bad[0], 0)).max()))
            msg = accepted.pop(worst)[0]
            log(WARNING, "Rejected the reply of node %d: the average of %s is not finite with it",
                msg.metadata.src_node_id, bad[0])
            self.round_stats["rejected_replies"] = self.round_stats.get("rejected_replies", 0) + 1
        if not accepted:
            return None, None
        for msg, _ in accepted:
            self.node_mask_version[msg.metadata.src_node_id] = self.mask_version
        self.global_arrays = average
        self._payloads.clear()
        self.trained_rounds += 1
        metrics = aggregate_metrics([m for _, (_, _, _, m) in accepted], [n for _, (_, _, n, _) in accepted],
                                    TRAIN_METRICS)
        return numpy_to_arrays(self.global_arrays), MetricRecord(metrics)

    def after_round(self, server_round: int) -> None:
        """Server-side pruning / regrowth on ``self.global_arrays`` after every round's aggregation,
        also after a round without an accepted reply (none for dense FedAvg)."""

    def check_evaluate_reply(self, msg: Message) -> tuple[int, dict]:
        self.check_mask_version(msg)
        return check_num_examples(msg, None), check_metrics(msg, EVALUATE_METRICS)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted = self.accept(replies, self.check_evaluate_reply)
        if not accepted:
            return None
        for msg, _ in accepted:
            self.node_mask_version[msg.metadata.src_node_id] = self.mask_version
        return MetricRecord(aggregate_metrics([m for _, (_, m) in accepted], [n for _, (n, _) in accepted],
                                              EVALUATE_METRICS))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, server_round: int) -> dict:
        """Everything a resumed run needs: the round, the global arrays, the mask and its version,
        and the method's own state. What each node holds is not kept: a resumed run is a new Flower
        run whose nodes start empty, so they get the mask again."""
        def tensors(arrays):
            return None if arrays is None else {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        return {"round": server_round, "trained_rounds": self.trained_rounds, "arrays": tensors(self.global_arrays),
                "masks": tensors(self.masks), "mask_version": self.mask_version, "method": self.method_state()}

    def load_state_dict(self, state: dict) -> None:
        self.global_arrays = {k: v.numpy() for k, v in state["arrays"].items()}
        self.masks = None if state["masks"] is None else {k: v.numpy() for k, v in state["masks"].items()}
        self.mask_version = int(state["mask_version"])
        self.trained_rounds = int(state["trained_rounds"])
        self.node_mask_version.clear()
        self._payloads.clear()
        self.load_method_state(state["method"])

    def method_state(self) -> dict:
        """The method's own state for a checkpoint (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_method_state(self, state: dict) -> None:
        """Restore what :meth:`method_state` returned."""

    # ------------------------------------------------------------------ the loop

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              on_round: Callable[[dict], None] | None = None,
              on_checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None) -> Result:
        """Run rounds up to ``num_rounds``; after each, ``on_round`` gets the round's record and
        ``on_checkpoint`` the strategy's state (:meth:`state_dict`). With ``resume`` (such a state)
        the run continues after the state's round instead of starting from ``initial_arrays``.

        The record holds the central evaluation (``evaluate_fn``), the aggregated client metrics,
        the bytes of the round's messages per direction and purpose, rejected and failed replies,
        and wall seconds: the round's, the run's so far, and the round's three phases (training
        exchange and aggregation, federated evaluation, central evaluation). Raises
        :class:`RunFailed` when too few nodes are usable or, at the end, when no training reply was
        accepted in the whole run.
        """
        metered = MeteredGrid(grid)
        self.reply_timeout = timeout
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result, t0 = Result(), time.monotonic()
        if resume is None:
            self.global_arrays = arrays_to_numpy(initial_arrays)
            self.prepare(metered)
            first = 1
        else:
            self.load_state_dict(resume)
            first = int(resume["round"]) + 1
        arrays = numpy_to_arrays(self.global_arrays)

        def finish(server_round: int, train_m, eval_m, t_round: float, phases: dict) -> None:
            t_central = time.monotonic()
            central = evaluate_fn(server_round, arrays) if evaluate_fn else None
            phases["central_evaluation_seconds"] = time.monotonic() - t_central
            if central is not None:
                result.evaluate_metrics_serverapp[server_round] = central
            record = {"round": server_round, **{k: v for k, v in (central or {}).items()}}
            record.update({f"train_{k.replace('-', '_')}": v for k, v in (train_m or {}).items()})
            record.update({f"val_{k.replace('-', '_')}": v for k, v in (eval_m or {}).items()})
            record.update(metered.take())
            record.update(rejected_replies=int(self.round_stats.get("rejected_replies", 0)),
                          failed_replies=int(self.round_stats.get("failed_replies", 0)),
                          round_seconds=time.monotonic() - t_round, wall_seconds=time.monotonic() - t0, **phases,
                          density=self.density(), mask_version=self.mask_version,
                          mask_changed=int(self.round_stats.get("mask_changed", 0)))
            record.update(self.extra_round_record())
            self.round_stats = {}
            if on_round is not None:
                on_round(record)
            if on_checkpoint is not None:
                on_checkpoint(self.state_dict(server_round))

        if resume is None:
            finish(0, None, None, time.monotonic(), {})
        for server_round in range(first, num_rounds + 1):
            t_round = time.monotonic()
            msgs = list(self.configure_train(server_round, arrays, train_config, metered))
            new_arrays, train_m = self.aggregate_train(
                server_round, self.exchange(metered, msgs, server_round, train_config))
            if train_m is None:
                log(WARNING, "Round %d: no training reply was accepted; the model is unchanged", server_round)
            else:
                result.train_metrics_clientapp[server_round] = train_m
            self.after_round(server_round)
            arrays = numpy_to_arrays(self.global_arrays) if new_arrays is not None or \
                self.round_stats.get("mask_changed") else arrays
            t_evaluate = time.monotonic()
            msgs = list(self.configure_evaluate(server_round, arrays, evaluate_config, metered))
            eval_m = self.aggregate_evaluate(server_round, self.exchange(metered, msgs, server_round, evaluate_config))
            if eval_m is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_m
            finish(server_round, train_m, eval_m, t_round, {"train_phase_seconds": t_evaluate - t_round,
                                                            "evaluate_phase_seconds": time.monotonic() - t_evaluate})
        if self.trained_rounds == 0:
            raise RunFailed(f"no training reply was accepted in {num_rounds} rounds: the model was not trained "
                            "(the log names each failed or rejected reply)")
        result.arrays = arrays
        return result

    def prepare(self, grid: Grid) -> None:
        """Work before round 1 on ``self.global_arrays`` (a scoring phase, a data-free mask...);
        its traffic is recorded in round 0."""

    def extra_round_record(self) -> dict:
        """Method-specific fields of a round's record; none for dense FedAvg."""
        return {}
