"""Checks a client reply must pass before the server uses it.

A reply that fails is dropped and logged with the node id and the reason; it never raises out of
a strategy and never touches the global model. Tensors are checked by the wire protocol before
they are decoded (fedprune/protocol.py); metrics here, against the rules of what a strategy reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import Message

from fedprune import protocol

MAX_NUM_EXAMPLES = 10**9
MAX_METRIC = 1e30
"""Upper bound of any metric (a loss, a FLOP count, bytes): far above every real value, and small
enough that sums and means over any number of replies stay finite."""


class InvalidReply(ValueError):
    """Why a reply was rejected."""


@dataclass(frozen=True)
class Metric:
    """What a strategy accepts of one reply metric, and how it aggregates it over replies."""

    lo: float = 0.0
    hi: float = MAX_METRIC
    required: bool = False
    how: str = "mean"
    """``mean`` (weighted by examples), ``sum`` (a cost over clients) or ``max`` (a peak)."""


TRAIN_METRICS = {
    protocol.LOSS: Metric(),
    protocol.FLOPS: Metric(how="sum"),
    protocol.PEAK_MEMORY: Metric(how="max"),
    protocol.COMPUTE_SECONDS: Metric(how="sum"),
}
EVALUATE_METRICS = {
    protocol.LOSS: Metric(),
    protocol.ACCURACY: Metric(hi=1.0, required=True),
}


def metrics_of(msg: Message):
    metrics = msg.content.metric_records.get(protocol.METRICS) if msg.has_content() else None
    if metrics is None:
        raise InvalidReply(f"no MetricRecord '{protocol.METRICS}'")
    return metrics


def check_int(msg: Message, key: str, lo: int, hi: int) -> int:
    """The reply's integer metric ``key`` in lo..hi."""
    metrics = metrics_of(msg)
    if key not in metrics:
        raise InvalidReply(f"no metrics['{key}']")
    n = metrics[key]
    if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi:
        raise InvalidReply(f"{key} {n!r} is not an integer in {lo}..{hi}")
    return n


def check_num_examples(msg: Message, upper: int | None = None) -> int:
    """The reply's ``metrics["num-examples"]``: an integer in 1..upper."""
    return check_int(msg, protocol.NUM_EXAMPLES, 1, upper if upper is not None else MAX_NUM_EXAMPLES)


def check_metrics(msg: Message, rules: Mapping[str, Metric]) -> dict[str, float]:
    """The reply's metrics named in ``rules``, each a finite number in its range; a required one
    must be there. Other metrics are ignored."""
    metrics = metrics_of(msg)
    out = {}
    for key, rule in rules.items():
        if key not in metrics:
            if rule.required:
                raise InvalidReply(f"no metrics['{key}']")
            continue
        v = metrics[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not rule.lo <= v <= rule.hi:
            raise InvalidReply(f"metrics['{key}'] = {v!r}; allowed: a number in [{rule.lo}, {rule.hi}]")
        out[key] = float(v)
    return out


def aggregate_metrics(values: list[dict[str, float]], weights: list[int],
                      rules: Mapping[str, Metric]) -> dict[str, float | int]:
    """Checked metrics of accepted replies, aggregated by their rules (a metric only when every
    reply has it), plus ``num-examples`` and ``num-nodes``."""
    total = float(sum(weights))
    out: dict[str, float | int] = {}
    for key, rule in rules.items():
        if not values or not all(key in v for v in values):
            continue
        xs = [v[key] for v in values]
        out[key] = (sum(xs) if rule.how == "sum" else max(xs) if rule.how == "max"
                    else sum(x * (w / total) for x, w in zip(xs, weights)))
    out[protocol.NUM_EXAMPLES] = int(total)
    out["num-nodes"] = len(values)
    return out
