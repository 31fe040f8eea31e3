"""Checks a client reply must pass before the server uses it.

A reply that fails is dropped and logged with the node id and the reason; it never raises and
never touches the global model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Message

MAX_NUM_EXAMPLES = 10**9


class InvalidReply(ValueError):
    """Why a reply was rejected."""


def check_num_examples(msg: Message, upper: int | None = None) -> int:
    """The reply's ``metrics["num-examples"]``: an integer in 1..upper."""
    metrics = msg.content.metric_records.get("metrics")
    if metrics is None or "num-examples" not in metrics:
        raise InvalidReply("no metrics['num-examples']")
    n = metrics["num-examples"]
    limit = upper if upper is not None else MAX_NUM_EXAMPLES
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise InvalidReply(f"num-examples {n!r} is not an integer in 1..{limit}")
    return n


def check_arrays(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 partial: bool = False) -> dict[str, np.ndarray]:
    """Decoded arrays with the reference's keys (a subset when ``partial``), shapes and dtypes,
    all finite."""
    missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
    if (missing and not partial) or extra:
        raise InvalidReply(f"keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    out = {}
    for name, arr in arrays.items():
        ref = reference[name]
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise InvalidReply(f"{name}: {arr.dtype}{list(arr.shape)}, expected {ref.dtype}{list(ref.shape)}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise InvalidReply(f"{name}: non-finite values")
        out[name] = arr
    return out
