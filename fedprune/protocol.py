"""The wire protocol both apps speak: message types, record and config keys, and tensors as codec
blobs in Flower Arrays.

Messages. The server sends ``train`` and ``evaluate`` messages and ``query.<phase>`` messages for
the protocol phases of a method (``query.describe`` for every method, ``query.snip`` for SNIP's
scoring round, ...). Content: ``arrays`` (model tensors), ``mask`` (the global mask, only to a node
that lacks its current version), ``config`` (the keys below) and, in replies, ``metrics``.

Tensors. Each tensor is one blob of the pruning codec (pruning/codec.py) in an
``Array(dtype, shape, stype=STYPE, data=blob)``: a masked tensor travels as its kept values only
(both sides hold the mask), an unmasked one in the codec's cheapest encoding. A mask travels in its
own record as positions only (the smaller of a bitmask and Rice-coded gaps), so the byte ledger
books it as mask traffic whichever message carries it. On the way in every Array is checked
against what the receiver expects (key set, declared dtype and shape, the blob's header and
length) before anything is decoded or allocated, so a reply cannot make the receiver allocate more
than the expected tensors' size. Plain numpy Arrays are accepted under the same checks.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from pruning.codec import CodecError, decode, decode_mask, encode, encode_mask, inspect

STYPE = "fedprune.codec/1"

# message types and phases
TRAIN, EVALUATE = "train", "evaluate"
DESCRIBE = "describe"
SNIP = "snip"
NTK, NTK_ITERATION = "ntk", "ntk-iteration"
"""ntk-zo: one federated NTK-SAP scoring round per pruning iteration (config: the iteration, 1..n)."""
ZO_SCALARS, ZO_REPLAY = "zo-scalars", "zo-replay"
"""ntk-zo / zo-dense: a node's K scalars per local step (its reply's only array); the record of
the model updates a node missed (``seeds``, ``scalars``), sent instead of the model."""
ZO_SEEDS, ZO_VERSION, ZO_FROM = "zo-seeds", "zo-version", "zo-from"
"""ntk-zo / zo-dense config: this round's step seeds; the model version the node ends at (also a
reply metric); the version a replay starts from (-1: the message carries the model)."""
BN_STATS = "bn_stats"
"""FedTiny: clients recalibrate every candidate's BatchNorm statistics and upload them."""
CANDIDATE_LOSS = "candidate_loss"
"""FedTiny: clients evaluate every candidate with the aggregated statistics."""
TOPK_GRADS = "topk_grads"
"""FedTiny: clients upload their top-K gradients at pruned positions from their last training batch.
(Flower registers a query phase under its name, so phase names are Python identifiers.)"""
EXPLORE = "explore"
"""AutoFLIP's loss exploration before round 1."""
DEVIATION = "deviation"
"""Record of squared parameter deviations (AutoFLIP exploration replies)."""
EXPLORE_EPOCHS = "explore-epochs"
"""Metric: exploration epochs a node ran after its base epoch."""


def query(phase: str) -> str:
    """The message type of a query phase (``"query.snip"``)."""
    return f"query.{phase}"


def purpose(message_type: str) -> str:
    """What a message is for, as the ledger books it: ``train``, ``evaluate`` or the phase name."""
    category, _, phase = message_type.partition(".")
    return phase if category == "query" and phase else category


# record keys
ARRAYS, MASK, CONFIG, METRICS = "arrays", "mask", "config", "metrics"

# config keys (server -> node)
SERVER_ROUND = "server-round"
MASK_VERSION = "mask-version"
VALUE_DTYPE = "value-dtype"

# metric keys (node -> server)
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NUM_TRAIN, NUM_VAL = "num-train", "num-val"
LOSS, ACCURACY = "loss", "accuracy"
FLOPS, PEAK_MEMORY, COMPUTE_SECONDS = "flops", "peak-memory", "compute-seconds"

STATE_LOST = 4701
"""Error code of a reply from a node that does not hold the mask version the server assumed (it
restarted and lost its ``context.state``); the server sends it the mask again."""


class ProtocolError(ValueError):
    """A record that does not hold what the receiver expects; names the entry and the reason."""


Expected = Mapping[str, tuple[tuple[int, ...], np.dtype]]
"""What a receiver expects of a record: name -> (shape, numpy dtype)."""


def expected_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in arrays.items()}


def _tensor(x) -> torch.Tensor:
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes num_batches_tracked shape (1,))
    return torch.from_numpy(np.require(x, requirements="C")) if isinstance(x, np.ndarray) else x.detach().cpu()


def _array(t: torch.Tensor, blob: bytes) -> Array:
    return Array(dtype=str(t.numpy().dtype), shape=tuple(t.shape), stype=STYPE, data=blob)


def pack(tensors: Mapping[str, object], masks: Mapping[str, object] | None = None, *,
         value_dtype: str = "float32") -> ArrayRecord:
    """Encode ``tensors`` into an ArrayRecord; a tensor with a mask travels as its kept values
    (the receiver holds the mask, see :func:`pack_masks`)."""
    masks = masks or {}
    record = {}
    for name, value in tensors.items():
        t = _tensor(value)
        mask = masks.get(name)
        blob = (encode(t, value_dtype=value_dtype) if mask is None
                else encode(t, _tensor(mask), value_dtype=value_dtype, encoding="values"))
        record[name] = _array(t, blob)
    return ArrayRecord(record)


def pack_masks(masks: Mapping[str, object]) -> ArrayRecord:
    """Masks as positions only (the smaller of a bitmask and Rice-coded gaps per tensor)."""
    return ArrayRecord({name: Array(dtype="bool", shape=tuple(_tensor(m).shape), stype=STYPE,
                                    data=encode_mask(_tensor(m))) for name, m in masks.items()})


def _check_keys(record: ArrayRecord, expected: Expected, partial: bool) -> None:
    sent, want = set(record.keys()), set(expected)
    missing, extra = want - sent, sent - want
    if extra or (missing and not partial):
        raise ProtocolError(f"entries differ from the expected ones: missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]}")


def _check_declared(name: str, arr: Array, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != str(dtype):
        raise ProtocolError(f"{name}: declared {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}")


def _plain_numpy(name: str, arr: Array, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A plain numpy Array, its .npy header checked before numpy allocates from it."""
    if arr.stype != "numpy.ndarray":
        raise ProtocolError(f"{name}: unknown array type {arr.stype!r}; allowed: {STYPE}, numpy.ndarray")
    buf = io.BytesIO(arr.data)
    try:
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(buf)]
        head_shape, fortran, head_dtype = read(buf)
    except Exception as exc:  # noqa: BLE001 - any malformed header
        raise ProtocolError(f"{name}: not a .npy array ({exc})") from None
    if tuple(head_shape) != tuple(shape) or head_dtype != dtype or fortran:
        raise ProtocolError(f"{name}: holds {head_dtype}{list(head_shape)}, expected {dtype}{list(shape)}")
    if len(arr.data) - buf.tell() != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ProtocolError(f"{name}: {len(arr.data) - buf.tell()} data bytes for {dtype}{list(shape)}")
    return np.frombuffer(arr.data, dtype=dtype, offset=buf.tell()).reshape(shape).copy()


def unpack(record: ArrayRecord, expected: Expected, masks: Mapping[str, np.ndarray] | None = None, *,
           partial: bool = False) -> dict[str, np.ndarray]:
    """Decode a record holding exactly the ``expected`` entries (a subset when ``partial``).

    Every entry is checked before it is decoded: declared and encoded dtype and shape, the blob's
    header and length, and for a name in ``masks`` that it carries exactly the mask's kept values.
    Raises :class:`ProtocolError` or :class:`~pruning.codec.CodecError` naming the entry.
    """
    _check_keys(record, expected, partial)
    masks = masks or {}
    out = {}
    for name, arr in record.items():
        shape, dtype = expected[name]
        _check_declared(name, arr, shape, dtype)
        if arr.stype != STYPE:
            if name in masks:
                raise ProtocolError(f"{name}: a masked tensor must travel as a {STYPE} blob of its kept values")
            out[name] = _plain_numpy(name, arr, shape, np.dtype(dtype))
            continue
        try:
            info = inspect(arr.data)
            if info.shape != tuple(shape) or str(info.dtype).removeprefix("torch.") != str(dtype):
                raise CodecError(f"blob holds {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}")
            mask = masks.get(name)
            out[name] = decode(arr.data, None if mask is None else torch.from_numpy(mask), shape=shape).numpy()
        except CodecError as exc:
            raise CodecError(f"{name}: {exc}") from None
    return out


def unpack_masks(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]], *,
                 partial: bool = False) -> dict[str, np.ndarray]:
    """Decode masks sent with :func:`pack_masks`, checked against the expected names and shapes."""
    expected = {k: (tuple(s), np.dtype(bool)) for k, s in shapes.items()}
    _check_keys(record, expected, partial)
    out = {}
    for name, arr in record.items():
        _check_declared(name, arr, *expected[name])
        if arr.stype != STYPE:
            raise ProtocolError(f"{name}: a mask must be a {STYPE} blob, got {arr.stype!r}")
        try:
            out[name] = decode_mask(arr.data, shape=expected[name][0]).numpy()
        except CodecError as exc:
            raise CodecError(f"{name}: {exc}") from None
    return out
