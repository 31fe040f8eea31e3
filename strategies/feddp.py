"""FedDP: adaptive dynamic pruning for heterogeneous FL (Yu, Nguyen, Anwar, Jannesari; CCGrid 2023,
arXiv 2106.06921), on the base strategy.

The pruning itself lives in the model: a gated model (fedprune/gated.py, pruning/gates.py) keeps,
per sample and per convolution, the ``k = max(1, round(r * C_out))`` output channels of highest
saliency (``feddp.keep_ratio`` = r) and zeroes the rest, so only the salient channels' filters get
gradients. The gates are parameters like any other: trained locally, averaged by the base (weighted
by examples, every parameter dense on the wire). Inference skips the zeroed channels
(pruning/skipping.py; the client evaluation routine runs it). What the server adds:

* ``k`` travels in the state dict (the ``*.keep`` buffers), so the server's central evaluation and
  every client run the same function. The server sets it from ``feddp.keep_ratio`` before round 1
  and pins it: a reply with other keep counts is rejected.
* The paper's "adaptive gradient" is not specified in what we could read (reference/seeds.md 2.1);
  ``feddp.correction`` chooses the local rule. ``scaffold`` (default, our choice; the authors' first
  code runs SCAFFOLD, and their group's SPATL uses gradient control): the server holds a control
  variate ``c`` (float32, one per trainable parameter, 0 at the start), sends it in every training
  message (record ``control``), and gets back each client's ``delta c_i`` (same names and shapes,
  finite, checked like the weights, or the whole reply is rejected); after the round
  ``c += sum(delta c_i) / N`` with N the federation's number of partitions (Karimireddy et al.
  2020, global step size 1). The authors' code corrects every state-dict entry, BatchNorm's
  running statistics and counters included; we correct parameters only. ``fedprox`` and ``none``
  are client-side only (client_app/feddp.py).
* ``feddp.threshold`` (the authors' second code version, "FedDP" in fedlib): clients zero
  convolution weights with ``|w| <= tau`` after every local epoch; the codec sends the zeros as
  positions, so the upload shrinks (measured by the ledger, ``bytes_up_train``). Round records add
  ``feddp_conv_zero_share_up`` (share of exactly-zero convolution weights in the accepted replies)
  and ``feddp_conv_zero_share_down`` (in the global model that goes down).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log

from fedprune import protocol
from fedprune.experiment import Experiment
from fedprune.feddp import CONTROL, conv_weights, feddp_model
from pruning.gates import keep_counts
from strategies.base import FedPruneStrategy
from strategies.validation import InvalidReply


class FedDP(FedPruneStrategy):
    """Gated models with pinned keep counts, and SCAFFOLD's control variates when chosen."""

    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.cfg = experiment.feddp
        model = feddp_model(experiment)
        self.keep = keep_counts(model)
        self.convs = list(conv_weights(model))
        self.params = {name: tuple(p.shape) for name, p in model.named_parameters()}
        self.control: dict[str, np.ndarray] | None = None
        self._control_record: ArrayRecord | None = None
        self._deltas: list[dict[str, np.ndarray]] = []
        self._zero_shares: list[float] = []

    def prepare(self, grid) -> None:
        for key, k in self.keep.items():
            self.global_arrays[key] = np.asarray(k, dtype=np.int64)
        if self.cfg.correction == "scaffold":
            self.control = {k: np.zeros(s, np.float32) for k, s in self.params.items()}

    # ------------------------------------------------------------------ messages

    def model_message(self, server_round: int, node: int, config: ConfigRecord, message_type: str) -> Message:
        msg = super().model_message(server_round, node, config, message_type)
        if self.control is not None and message_type == MessageType.TRAIN:
            if self._control_record is None:
                self._control_record = protocol.pack(self.control)
            msg.content[CONTROL] = self._control_record
        return msg

    def check_train_reply(self, msg: Message) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int, dict]:
        """The base's checks; the keep counts must be the run's, and under SCAFFOLD the reply must
        carry a finite ``delta c_i`` for every trainable parameter."""
        arrays, coverage, n, metrics = super().check_train_reply(msg)
        for key, k in self.keep.items():
            if int(arrays[key]) != k:
                raise InvalidReply(f"{key}: keeps {int(arrays[key])} channels per sample, the run keeps {k}")
        if self.control is not None:
            delta = protocol.unpack(self.record_of(msg, CONTROL), protocol.expected_of(self.control))
            self.check_finite(delta)
            self._deltas.append(delta)
        self._zero_shares.append(self.conv_zero_share(arrays))
        return arrays, coverage, n, metrics

    def conv_zero_share(self, arrays: dict[str, np.ndarray]) -> float:
        """Share of exactly-zero convolution weights in ``arrays``."""
        total = sum(arrays[k].size for k in self.convs)
        return sum(int((arrays[k] == 0).sum()) for k in self.convs) / total if total else 0.0

    # ------------------------------------------------------------------ aggregation

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._deltas, self._zero_shares = [], []
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.control is not None and metrics is not None:
            if len(self._deltas) == int(metrics["num-nodes"]):
                self.update_control(self._deltas)
            else:
                log(WARNING, "Round %d: a checked reply was dropped from the average; the control variates "
                    "stay as they were", server_round)
        return arrays, metrics

    def update_control(self, deltas: list[dict[str, np.ndarray]]) -> None:
        """``c += sum_i delta c_i / N`` (N: the federation's partitions), accumulated in float64."""
        n = max(info.num_partitions for info in self.nodes.values())
        for name, c in self.control.items():
            total = c.astype(np.float64) + sum(d[name].astype(np.float64) for d in deltas) / n
            if not np.isfinite(total).all():
                log(WARNING, "The control variate of %s would not be finite; it stays as it was", name)
                continue
            self.control[name] = total.astype(np.float32)
        self._control_record = None

    def extra_round_record(self) -> dict:
        record = {"feddp_conv_zero_share_down": self.conv_zero_share(self.global_arrays)}
        if self._zero_shares:
            record["feddp_conv_zero_share_up"] = float(np.mean(self._zero_shares))
            self._zero_shares = []
        return record

    # ------------------------------------------------------------------ checkpoints

    def method_state(self) -> dict:
        return {"control": None if self.control is None else
                {k: torch.from_numpy(v.copy()) for k, v in self.control.items()}}

    def load_method_state(self, state: dict) -> None:
        control = state.get("control")
        self.control = None if control is None else {k: v.numpy() for k, v in control.items()}
        self._control_record = None
