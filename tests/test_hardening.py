"""Issue #8: the server survives anything a client sends, and never reports a run that did nothing
as a success.

* a fuzz of training replies (hypothesis) against real strategies: dense FedAvg, a masked baseline
  (``random``), FedLP-Homo and FedLP-Hetero. Every reply starts from a real one (the ClientApp's)
  and is mutated: codec blobs truncated, extended, bit-flipped or with lying headers, wrong keys,
  wrong declared dtypes and shapes, plain numpy Arrays with lying .npy headers, wrong or missing
  metrics, a ``mask`` record, huge finite values. Nothing may raise; a rejected reply leaves the
  model bit-identical; an accepted one leaves it finite; memory stays bounded by the model's size,
  whatever a header claims;
* float32 extremes in two replies average to a finite model;
* FedLP-Hetero's per-level records survive bad evaluation / training metrics;
* discovery: broken nodes are refused and counted; a federation of broken nodes, or a partition
  plan that cannot be built, stops the run at once with the reason; duplicate partitions and
  another number of partitions are refused; too few nodes stop the run after the wait;
* schedules: a cut that is due is taken at the first round with accepted replies;
* the ledger books the mask on whichever message carries it, and every byte sent;
* a node that lost its state gets the mask again and is not locked out;
* the experiment file refuses non-finite numbers, impossible schedules and unknown methods.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import resource
import time
import tracemalloc
import warnings
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.inprocess import InProcessGrid
from client_app.app import app as client_app
from fedprune import protocol
from fedprune.experiment import ExperimentError, experiment_from_run_config
from fedprune.methods import METHODS
from fedprune.task import new_model
from pruning.codec import encode, encode_mask
from strategies import RunFailed, build_strategy
from strategies.base import FedPruneStrategy
from strategies.ledger import bytes_by_purpose, content_bytes
from tests.conftest import make_context, write_cifar10

FLT_MAX = float(np.finfo(np.float32).max)
MB = 1 << 20
# codec dtype ids (pruning/codec.py, _DTYPES): float32, float16, float64, int64, bool
F32, F16, F64, I64, BOOL = 0, 1, 3, 4, 9
DENSE, BITMASK, RICE, VALUES = 0, 1, 2, 3

PEAK_FACTOR = 16
"""Traced peak of one aggregate_train call <= PEAK_FACTOR * model bytes + 1 MB. A valid dense reply
of the tiny CNN peaks at ~11x the model's float32 bytes: the decoded reply, and per tensor the
float64 accumulation (sum, weight sum, the float64 copy of the values and its product). A header
that could make the server allocate what it claims (50 million float64, 2**32 values) or an
implausible Rice parameter (k=31: 74x) would go far beyond."""
FUZZ_EXAMPLES = 260
"""Per strategy; four strategies: over 1000 generated replies in all."""


# ------------------------------------------------------------------------------ fixtures, helpers

@pytest.fixture(scope="module")
def mnist_rc(tiny_mnist) -> dict:
    return {"experiment": "configs/fedavg.yaml", "num-server-rounds": 2, "seed": 7, "run-name": "", "output-dir": "",
            "overrides": f"dataset.name=mnist dataset.root={tiny_mnist} partition.scheme=iid client.batch_size=16"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar-hardening")
    write_cifar10(root, per_batch=24, n_test=20)
    return root


def config(rc: dict, method: str | None = None, extra: str = "", rounds: int | None = None) -> dict:
    out = {**rc, "overrides": rc["overrides"] + " " + extra}
    if method is not None:
        out["experiment"] = f"configs/{method}.yaml"
    if rounds is not None:
        out["num-server-rounds"] = rounds
    return out


def cifar_rc(cifar, method: str, extra: str = "", rounds: int = 2) -> dict:
    return {"experiment": f"configs/{method}.yaml", "num-server-rounds": rounds, "seed": 5,
            "overrides": f"dataset.name=cifar10 dataset.root={cifar} partition.scheme=iid client.batch_size=20 "
                         f"partition.val_fraction=0.2 {extra}"}


def start(rc: dict, nodes: int = 3, grid=None, on_round=None, **grid_kw):
    """(strategy, records, grid, error): a run through the in-process federation."""
    exp = experiment_from_run_config(rc)
    strategy = build_strategy(exp)
    grid = grid or InProcessGrid(rc, nodes, **grid_kw)
    records = []

    def record(r):
        records.append(r)
        if on_round is not None:
            on_round(r, grid, strategy)

    try:
        strategy.start(grid, ArrayRecord(new_model(exp).state_dict()), exp.num_server_rounds, on_round=record,
                       evaluate_fn=lambda r, a: MetricRecord({"test_accuracy": 0.0}))
        error = None
    except RunFailed as exc:
        error = exc
    return strategy, records, grid, error


def force(record: MetricRecord, key: str, value) -> None:
    """Put a value Flower's type check refuses (str, bool, None) into a record, as a hostile client could."""
    record.__dict__["_data"][key] = value


def with_metrics(reply: Message, ins: Message, **changes) -> Message:
    metrics = MetricRecord(dict(reply.content["metrics"]))
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            metrics.__dict__["_data"].pop(key, None)
        else:
            metrics[key] = value
    content = {k: v for k, v in reply.content.items() if k != "metrics"}
    return Message(RecordDict({**content, "metrics": metrics}), reply_to=ins)


def header(enc: int, k: int, dtype_id: int, wire_id: int, shape, nnz: int) -> bytes:
    """A codec header (pruning/codec.py): magic, encoding | k << 3, dtype | wire << 4, ndim, nnz, shape."""
    fields = [min(int(v), 2**32 - 1) for v in (nnz, *shape)]
    return bytes([0xF1, (enc & 7) | ((k & 31) << 3), (dtype_id & 15) | ((wire_id & 15) << 4), len(shape) & 255]) + \
        np.array(fields, "<u4").tobytes()


def npy(descr: str, shape, fortran: bool, payload: bytes, version: int = 1) -> bytes:
    buf = io.BytesIO()
    head = {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}
    (np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0)(buf, head)
    return buf.getvalue() + payload


# ------------------------------------------------------------------------------ 1. the fuzz

@dataclasses.dataclass
class Target:
    """A strategy with a described node, the node's real training reply and the model before it."""

    strategy: FedPruneStrategy
    node: int
    ins: Message
    arrays: dict[str, Array]
    metrics: dict
    decoded: dict[str, np.ndarray]
    original: dict[str, np.ndarray]
    model_bytes: int

    def reset(self) -> None:
        s = self.strategy
        s.global_arrays = {k: v.copy() for k, v in self.original.items()}
        s._payloads.clear()
        s.trained_rounds = 0
        s.node_mask_version.clear()
        s.round_stats = {}
        if hasattr(s, "_record"):
            s._record = {}


def build_target(rc: dict) -> Target:
    """The strategy after its prepare(), one node described through the ClientApp, and that node's
    real reply to a round-1 training message (accepted once, as a check)."""
    exp = experiment_from_run_config(rc)
    strategy = build_strategy(exp)
    strategy.global_arrays = {k: v.numpy().copy() for k, v in new_model(exp).state_dict().items()}
    strategy.prepare(None)  # random cuts its mask here; the others do nothing before round 1
    node = 4242
    ctx = make_context(rc, 0, 3, node)
    described = client_app(Message(RecordDict({}), dst_node_id=node, message_type=protocol.query(protocol.DESCRIBE)),
                           ctx)
    strategy.nodes[node] = strategy._check_describe(described)
    strategy.server_round = 1  # FedLP: the round whose keep draw the reply follows
    ins = strategy.model_message(1, node, ConfigRecord(), MessageType.TRAIN)
    reply = client_app(ins, ctx)
    assert not reply.has_error(), reply.error
    original = {k: v.copy() for k, v in strategy.global_arrays.items()}
    arrays = dict(reply.content["arrays"].items())
    decoded = protocol.unpack(reply.content["arrays"],
                              protocol.expected_of({k: original[k] for k in arrays}), strategy.masks, partial=True)
    target = Target(strategy, node, ins, arrays, dict(reply.content["metrics"]), decoded, original,
                    sum(v.nbytes for v in original.values()))
    assert strategy.aggregate_train(1, [reply])[0] is not None, "the real reply must be accepted"
    target.reset()
    return target


@dataclasses.dataclass
class Draft:
    """A reply under construction."""

    arrays: dict[str, Array]
    metrics: MetricRecord
    arrays_kind: str = "ok"
    metrics_kind: str = "ok"
    extra: dict = dataclasses.field(default_factory=dict)


def _key(d: Draft, data, t: Target) -> str | None:
    keys = sorted(d.arrays)
    if not keys:
        return None
    # mostly the big tensors (where over-allocation would show), sometimes any
    big = max(keys, key=lambda k: t.original.get(k, np.zeros(0)).size)
    return data.draw(st.one_of(st.just(big), st.sampled_from(keys)), label="key")


def _blob(a: Array, data: bytes) -> Array:
    return Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=data)


def m_truncate(d, data, t):
    if (k := _key(d, data, t)) is not None:
        a = d.arrays[k]
        d.arrays[k] = _blob(a, a.data[:data.draw(st.integers(0, max(len(a.data) - 1, 0)), label="cut")])


def m_extend(d, data, t):
    if (k := _key(d, data, t)) is not None:
        d.arrays[k] = _blob(d.arrays[k], d.arrays[k].data + data.draw(st.binary(min_size=1, max_size=64)))


def m_bitflip(d, data, t):
    if (k := _key(d, data, t)) is not None:
        blob = bytearray(d.arrays[k].data)
        if not blob:
            return
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            bit = data.draw(st.one_of(st.integers(0, 8 * min(len(blob), 24) - 1),  # the header
                                      st.integers(0, 8 * len(blob) - 1)), label="bit")
            blob[bit // 8] ^= 1 << (bit % 8)
        d.arrays[k] = _blob(d.arrays[k], bytes(blob))


HUGE_SHAPES = [(50_000_000,), (2**32 - 1,), (65536, 65536), (2**31, 2), (1 << 20, 1 << 10, 8)]


def m_lying_header(d, data, t):
    """A header that claims something else: huge shapes and nnz, other dtypes and encodings, a Rice
    parameter; over the real payload, an empty one or a little junk."""
    if (k := _key(d, data, t)) is None:
        return
    a = d.arrays[k]
    shape = tuple(t.original[k].shape) if k in t.original else (3,)
    numel = math.prod(shape)
    claim = data.draw(st.sampled_from(HUGE_SHAPES + [shape, (numel,), ()]), label="shape")
    nnz = data.draw(st.sampled_from([0, 1, numel, numel + 1, 50_000_000, 2**32 - 1,
                                     min(math.prod(claim), 2**32 - 1)]), label="nnz")
    enc = data.draw(st.integers(0, 7), label="encoding")
    k_rice = data.draw(st.sampled_from([0, 1, 7, 31]), label="k")
    dt, wire = data.draw(st.sampled_from([(F32, F32), (F64, F64), (F32, F64), (F32, F16), (I64, I64), (BOOL, BOOL),
                                          (15, 15)]), label="dtypes")
    old = 8 + 4 * a.data[3] if len(a.data) >= 4 else len(a.data)
    payload = data.draw(st.sampled_from([a.data[old:], b"", b"\x00" * 8, b"\xff" * 64]), label="payload")
    d.arrays[k] = _blob(a, header(enc, k_rice, dt, wire, claim, nnz) + payload)


def m_rice(d, data, t):
    """A Rice blob that passes the header checks, with a chosen nnz and Rice parameter k (k=31 made
    the decoder's remainder table 64x the blob's bytes): kept positions first (a stream that
    decodes), or random streams."""
    if (k := _key(d, data, t)) is None or k not in t.original or t.original[k].dtype != np.float32:
        return
    shape = t.original[k].shape
    numel = int(np.prod(shape))
    nnz = data.draw(st.one_of(st.sampled_from([numel, numel // 2, numel // 3, 1, 0]), st.integers(0, numel)),
                    label="nnz")
    k_rice = data.draw(st.sampled_from([31, 18, 2, 1, 0, 8]), label="k")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    if data.draw(st.sampled_from(["first", "first", "random"]), label="fill") == "first":
        unary, rem = np.packbits(np.ones(nnz, np.uint8)).tobytes(), bytes(-(-nnz * k_rice // 8))
    else:
        unary = rng.integers(0, 256, -(-(nnz + ((numel - nnz) >> k_rice) if nnz else 0) // 8), np.uint8).tobytes()
        rem = rng.integers(0, 256, -(-nnz * k_rice // 8), dtype=np.uint8).tobytes()
    values = np.full(nnz, data.draw(st.sampled_from([0.0, 1.0, 3e38, np.nan])), np.float32).tobytes()
    d.arrays[k] = Array(dtype="float32", shape=tuple(shape), stype=protocol.STYPE,
                        data=header(RICE, k_rice, F32, F32, shape, nnz) + unary + rem + values)


SPECIAL = [3e38, -3e38, FLT_MAX, -FLT_MAX, np.nan, np.inf, -np.inf, 1e-45, -0.0, 0.0]


def m_reencode(d, data, t):
    """The tensor re-encoded: another encoding, wire dtype or mask, with special or huge finite
    values (all of them, or some)."""
    if (k := _key(d, data, t)) is None or k not in t.original:
        return
    value = (t.decoded[k] if k in t.decoded else t.original[k]).copy()
    if value.dtype.kind == "f":
        v = data.draw(st.sampled_from(SPECIAL), label="value")
        where = data.draw(st.sampled_from(["none", "all", "some"]), label="where")
        if where == "all":
            value[...] = v
        elif where == "some" and value.size:
            value.flat[data.draw(st.integers(0, value.size - 1), label="at")] = v
        global_mask = (t.strategy.masks or {}).get(k)
        mask = data.draw(st.sampled_from(["none", "global", "ones", "random"]), label="mask")
        m = {"none": None, "global": global_mask, "ones": np.ones(value.shape, bool),
             "random": np.random.default_rng(0).random(value.shape) < 0.3}[mask]
        encoding = data.draw(st.sampled_from(["auto", "dense", "bitmask", "rice", "values"]), label="encoding")
        if m is None and encoding == "values":
            encoding = "auto"
        wire = data.draw(st.sampled_from(["float32", "float16", "float64"]), label="wire")
        blob = encode(value, m, value_dtype=wire, encoding=encoding)
    else:  # BatchNorm's num_batches_tracked: int64, dense
        value[...] = data.draw(st.sampled_from([0, 5, 2**62, 2**63 - 1, -2**63]), label="int")
        blob = encode(value)
    d.arrays[k] = Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=protocol.STYPE, data=blob)


def m_wide_values(d, data, t):
    """float64 values beyond float32's range in a blob whose header says float32 (wire float64)."""
    if (k := _key(d, data, t)) is None or k not in t.original or t.original[k].dtype != np.float32:
        return
    value = t.original[k].astype(np.float64)
    value.flat[0] = data.draw(st.sampled_from([1e300, -1e39, 3.4e38, np.nan]), label="wide")
    blob = bytearray(encode(value, value_dtype="float64", encoding="dense"))
    blob[2] = F32 | (F64 << 4)
    d.arrays[k] = Array(dtype="float32", shape=tuple(value.shape), stype=protocol.STYPE, data=bytes(blob))


def m_numpy(d, data, t):
    """A plain numpy Array: honest, or with a .npy header that lies about shape, dtype or order, or
    with a payload of the wrong length, or no .npy at all."""
    if (k := _key(d, data, t)) is None or k not in t.original:
        return
    value = t.decoded.get(k, t.original[k])
    kind = data.draw(st.sampled_from(["honest", "nan", "shape", "dtype", "fortran", "short", "long", "junk",
                                      "v2-huge"]), label="npy")
    descr, shape, fortran, payload = np.lib.format.dtype_to_descr(value.dtype), value.shape, False, value.tobytes()
    if kind == "honest":
        d.arrays[k] = Array(np.require(value, requirements="C"))  # keeps a 0-d array 0-d
        return
    if kind == "nan" and value.dtype.kind == "f":
        bad = value.copy()
        bad.flat[0] = np.nan
        payload = bad.tobytes()
    elif kind == "shape":
        shape = data.draw(st.sampled_from(HUGE_SHAPES), label="npy-shape")
    elif kind == "dtype":
        descr = data.draw(st.sampled_from(["<f8", ">f4", "|O", "<U10", "<c16", "|b1"]), label="npy-dtype")
    elif kind == "fortran":
        fortran = True
    elif kind == "short":
        payload = payload[:-1]
    elif kind == "long":
        payload = payload + b"\x00" * 4
    blob = (b"\x93NUMPY\x01\x00" + data.draw(st.binary(max_size=32))) if kind == "junk" else \
        npy(descr, shape, fortran, payload, version=2 if kind == "v2-huge" else 1)
    if kind == "v2-huge":  # a v2 header length field claiming 4 GiB
        blob = blob[:8] + (2**32 - 1).to_bytes(4, "little") + blob[12:]
    d.arrays[k] = Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=blob)


def m_declared(d, data, t):
    """The Array's own metadata lies: dtype, shape or stype."""
    if (k := _key(d, data, t)) is None:
        return
    a = d.arrays[k]
    what = data.draw(st.sampled_from(["dtype", "shape", "stype"]), label="declared")
    dtype, shape, stype = a.dtype, tuple(a.shape), a.stype
    if what == "dtype":
        dtype = data.draw(st.sampled_from(["float64", "float16", "int64", "bool", "complex128", "object", "", "f4"]))
    elif what == "shape":
        shape = data.draw(st.sampled_from([(), (0,), (-1,), (2**31 - 1,), (50_000_000,), shape + (1,), shape[::-1]]))
    else:
        stype = data.draw(st.sampled_from(["", "torch.Tensor", "fedprune.codec/2", "numpy.ndarray"]))
    d.arrays[k] = Array(dtype=dtype, shape=shape, stype=stype, data=a.data)


def m_keys(d, data, t):
    """A key missing, an extra key (a 12-byte blob claiming 50 million float64), a renamed key."""
    what = data.draw(st.sampled_from(["drop", "extra", "rename", "private"]), label="keys")
    k = _key(d, data, t)
    if what == "drop" and k is not None:
        d.arrays.pop(k)
    elif what == "extra":
        d.arrays["evil"] = Array(dtype="float64", shape=(50_000_000,), stype=protocol.STYPE,
                                 data=header(DENSE, 0, F64, F64, (50_000_000,), 50_000_000))
    elif what == "rename" and k is not None:
        d.arrays[k + ".x"] = d.arrays.pop(k)
    elif what == "private":  # a FedLP head, or any entry the node should not send
        d.arrays["private_fc2.bias"] = Array(np.zeros(10, np.float32))


NUM_EXAMPLES = [0, -1, -2**63, 2**63, 2**64 + 1, 10**12, 1.5, 0.0, float("nan"), float("inf"), [1], [], 1]
LOSS = [float("nan"), float("inf"), float("-inf"), -1.0, -1e-300, 1e308, [0.1], [], 0.0, 7]
COST = [-1, -1e30, float("inf"), float("nan"), [1.0], [1, 2], 0, 1e300]
VERSION = [0, 1, 2, -1, 2**62, 2**63, 1.0, [1], 0.5]
FORCED = ["12", "x", True, False, None, {"a": 1}, b"\x00"]


def m_metrics(d, data, t):
    """A metric missing, of another type, or out of range (also values Flower's own checks refuse)."""
    key = data.draw(st.sampled_from([protocol.NUM_EXAMPLES, protocol.LOSS, protocol.FLOPS, protocol.PEAK_MEMORY,
                                     protocol.COMPUTE_SECONDS, protocol.MASK_VERSION, protocol.ACCURACY,
                                     "unrelated"]), label="metric")
    pool = {protocol.NUM_EXAMPLES: NUM_EXAMPLES, protocol.LOSS: LOSS, protocol.MASK_VERSION: VERSION}.get(key, COST)
    how = data.draw(st.sampled_from(["missing", "value", "forced"]), label="how")
    if how == "missing":
        d.metrics.__dict__["_data"].pop(key, None)
    elif how == "value":
        d.metrics[key] = data.draw(st.sampled_from(pool), label="value")
    else:
        force(d.metrics, key, data.draw(st.sampled_from(FORCED), label="forced"))


def m_records(d, data, t):
    """Records of the wrong kind or missing; a ``mask`` record the server did not ask for."""
    what = data.draw(st.sampled_from(["arrays", "metrics", "mask"]), label="record")
    if what == "arrays":
        d.arrays_kind = data.draw(st.sampled_from(["missing", "metric", "config", "empty"]))
    elif what == "metrics":
        d.metrics_kind = data.draw(st.sampled_from(["missing", "array", "config"]))
    else:
        masks = t.strategy.masks or {k: np.ones(v.shape, bool) for k, v in t.original.items() if v.ndim > 1}
        d.extra["mask"] = data.draw(st.sampled_from([
            protocol.pack_masks(masks),
            ArrayRecord({"evil": Array(dtype="bool", shape=(2**31 - 1,), stype=protocol.STYPE,
                                       data=header(RICE, 0, BOOL, BOOL, (2**31 - 1,), 2**31 - 1))}),
            ArrayRecord({k: Array(dtype="bool", shape=tuple(m.shape), stype=protocol.STYPE,
                                  data=encode_mask(~m)) for k, m in masks.items()}),
            ConfigRecord({"mask": "all of it"})]))


MUTATIONS = [m_truncate, m_extend, m_bitflip, m_lying_header, m_rice, m_reencode, m_wide_values, m_numpy,
             m_declared, m_keys, m_metrics, m_records]


def build_reply(d: Draft, t: Target) -> Message:
    content = dict(d.extra)
    content["arrays"] = {"ok": ArrayRecord(dict(d.arrays)), "metric": MetricRecord({"x": 1.0}),
                         "config": ConfigRecord({"x": "y"}), "empty": ArrayRecord()}.get(d.arrays_kind)
    content["metrics"] = {"ok": d.metrics, "array": ArrayRecord(), "config": ConfigRecord(
        {k: str(v) for k, v in d.metrics.items()})}.get(d.metrics_kind)
    return Message(RecordDict({k: v for k, v in content.items() if v is not None}), reply_to=t.ins)


def snapshot(arrays: dict[str, np.ndarray]) -> dict:
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in arrays.items()}


FUZZ_TARGETS = {
    "fedavg": lambda mnist, cifar: config(mnist),
    "random-0.2": lambda mnist, cifar: config(mnist, "random", "pruning.density=0.2"),
    "fedlp-homo": lambda mnist, cifar: cifar_rc(cifar, "fedlp-homo", "fedlp.p=0.5"),
    "fedlp-hetero": lambda mnist, cifar: cifar_rc(cifar, "fedlp-hetero",
                                                  "fedlp.preferred_level=3 fedlp.preference_weight=1.0"),
}


@pytest.mark.parametrize("name", FUZZ_TARGETS)
def test_fuzzed_training_replies_never_raise_never_touch_a_model_they_spoil_and_stay_in_memory(
        name, mnist_rc, cifar):
    target = build_target(FUZZ_TARGETS[name](mnist_rc, cifar))
    strategy, bound = target.strategy, PEAK_FACTOR * target.model_bytes + MB
    stats, peaks = Counter(), []
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def fuzz(data):
        target.reset()
        draft = Draft(dict(target.arrays), MetricRecord(dict(target.metrics)))
        for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3), label="mutations"):
            mutation(draft, data, target)
        reply = build_reply(draft, target)
        before = snapshot(strategy.global_arrays)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with warnings.catch_warnings():  # an overflow or a wrapping cast in numpy is a bug too
            warnings.simplefilter("error", RuntimeWarning)
            arrays, metrics = strategy.aggregate_train(1, [reply])
        peak = tracemalloc.get_traced_memory()[1] - base
        peaks.append(peak)
        assert peak <= bound, f"{name}: peak {peak / MB:.1f} MB for a {target.model_bytes / MB:.1f} MB model"
        if arrays is None:
            stats["rejected"] += 1
            assert metrics is None and strategy.trained_rounds == 0
            assert snapshot(strategy.global_arrays) == before
        else:
            stats["accepted"] += 1
            assert strategy.trained_rounds == 1 and set(arrays.keys()) == set(before)
            for k, v in strategy.global_arrays.items():
                assert (v.dtype.str, v.shape) == before[k][:2], k
                assert v.dtype.kind != "f" or np.isfinite(v).all(), k
                assert np.array_equal(arrays[k].numpy(), v, equal_nan=False), k
            for k, m in (strategy.masks or {}).items():  # pruned weights stay pruned
                assert not strategy.global_arrays[k][~m].any(), k
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())

    try:
        fuzz()
    finally:
        if not tracing:
            tracemalloc.stop()
        target.reset()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # KiB on Linux
    assert grown < 100 * MB, f"{name}: max RSS grew by {grown / MB:.0f} MB"
    assert stats["accepted"] > 0 and stats["rejected"] > 0 and sum(stats.values()) >= FUZZ_EXAMPLES, stats
    print(f"{name}: {dict(stats)}, peak {max(peaks) / target.model_bytes:.1f}x of {target.model_bytes} B")


def test_a_rice_parameter_no_encoder_picks_is_refused_before_it_is_decoded(mnist_rc):
    """A Rice blob with k=31 and every position kept is a valid header over a valid stream, but
    its remainder table decodes at 64x the blob's bytes (74x the model); refused up front. The
    encoder's own choice of k always passes (nnz * k <= numel - nnz for an optimal k)."""
    target = build_target(config(mnist_rc))
    k = "classifier.1.weight"
    shape = target.original[k].shape
    numel = int(np.prod(shape))
    blob = header(RICE, 31, F32, F32, shape, numel) + np.packbits(np.ones(numel, np.uint8)).tobytes() + \
        bytes(-(-numel * 31 // 8)) + bytes(4 * numel)
    arrays = {**target.arrays, k: Array(dtype="float32", shape=tuple(shape), stype=protocol.STYPE, data=blob)}
    reply = Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(dict(target.metrics))}),
                    reply_to=target.ins)
    tracemalloc.start()
    try:
        assert target.strategy.aggregate_train(1, [reply]) == (None, None)
        assert tracemalloc.get_traced_memory()[1] < 2 * target.model_bytes + MB
    finally:
        tracemalloc.stop()
    rng = np.random.default_rng(1)
    for density in (1e-4, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0):
        mask = rng.random(shape) < density
        value = np.where(mask, rng.standard_normal(shape), 0).astype(np.float32)
        arrays[k] = Array(dtype="float32", shape=tuple(shape), stype=protocol.STYPE,
                          data=encode(value, mask, encoding="rice"))
        decoded = protocol.unpack(ArrayRecord(arrays), protocol.expected_of(target.original))
        assert np.array_equal(decoded[k], value)


# ------------------------------------------------------------------------------ 2. float32 extremes

@pytest.mark.parametrize("method, extra", [("fedavg", ""), ("random", "pruning.density=0.2")])
@pytest.mark.parametrize("values", [(3e38, 3e38), (FLT_MAX, FLT_MAX), (-FLT_MAX, -3e38), (FLT_MAX, -FLT_MAX)])
def test_finite_float32_extremes_in_two_replies_average_to_a_finite_model(mnist_rc, method, extra, values):
    target = build_target(config(mnist_rc, method, extra))
    strategy, masks = target.strategy, target.strategy.masks
    other = 4243
    strategy.nodes[other] = dataclasses.replace(strategy.nodes[target.node], partition_id=1)
    replies = []
    for node, v, n in ((target.node, values[0], 10), (other, values[1], 30)):
        ins = Message(RecordDict({}), dst_node_id=node, message_type="train")
        arrays = {k: np.full_like(a, v) if a.dtype.kind == "f" else a for k, a in strategy.global_arrays.items()}
        metrics = MetricRecord({"num-examples": n, "mask-version": strategy.mask_version, "loss": 1.0})
        replies.append(Message(RecordDict({"arrays": protocol.pack(arrays, masks), "metrics": metrics}), reply_to=ins))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-nodes"] == 2
    expected = (values[0] * 10 + values[1] * 30) / 40
    for k, v in strategy.global_arrays.items():
        assert v.dtype.kind != "f" or np.isfinite(v).all(), k
        if v.dtype.kind == "f":
            kept = v if masks is None or k not in masks else v[masks[k]]
            assert np.allclose(kept.astype(np.float64), expected, rtol=1e-6), k


# ------------------------------------------------------------------------------ 3. FedLP-Hetero metrics

class EvaluateTamperGrid(InProcessGrid):
    """The in-process grid, tampering evaluate replies too."""

    def __init__(self, *args, tamper_evaluate=None, **kw):
        super().__init__(*args, **kw)
        self.tamper_evaluate = tamper_evaluate

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.tamper_evaluate is None:
            return replies
        return [self.tamper_evaluate(m, r) if m.metadata.message_type == "evaluate" else r
                for m, r in zip(messages, replies)]


def test_fedlp_hetero_rejects_bad_accuracy_and_flops_without_raising(cifar):
    rc = cifar_rc(cifar, "fedlp-hetero", "sampling.fraction_evaluate=1 sampling.min_evaluate_nodes=1")
    probe = InProcessGrid(rc, 4)
    by_pid = {ctx.node_config["partition-id"]: n for n, ctx in probe.contexts.items()}
    bad_eval = {by_pid[0]: {"accuracy": None}, by_pid[1]: {"accuracy": [0.5, 0.6]}}
    bad_train = {by_pid[2]: {"flops": [1.0, 2.0]}}

    def tamper_train(ins, reply):
        return with_metrics(reply, ins, **bad_train[ins.metadata.dst_node_id]) \
            if ins.metadata.dst_node_id in bad_train and not reply.has_error() else reply

    def tamper_evaluate(ins, reply):
        return with_metrics(reply, ins, **bad_eval[ins.metadata.dst_node_id]) \
            if ins.metadata.dst_node_id in bad_eval and not reply.has_error() else reply

    grid = EvaluateTamperGrid(rc, 4, tamper=tamper_train, tamper_evaluate=tamper_evaluate)
    strategy, records, _, error = start(rc, grid=grid)
    assert error is None
    good = {strategy.node_level(by_pid[p]) for p in (2, 3)}
    for r in records[1:]:
        assert r["rejected_replies"] == 3 and r["failed_replies"] == 0
        assert r["train_num_nodes"] == 3 and r["val_num_nodes"] == 2
        assert set(r["fedlp_val_accuracy_by_level"]) == {str(c) for c in good}
        assert sum(r["fedlp_nodes_by_level"].values()) == 3
    # values Flower's own types refuse, straight into aggregate_evaluate
    ins = {p: Message(RecordDict({}), dst_node_id=by_pid[p], message_type="evaluate") for p in range(4)}

    def reply(p, **metrics):
        m = MetricRecord({"num-examples": 5, "loss": 0.5, "accuracy": 0.5})
        for key, value in metrics.items():
            if value is None:
                m.__dict__["_data"].pop(key)
            else:
                force(m, key, value)
        return Message(RecordDict({"metrics": m}), reply_to=ins[p])

    hostile = [reply(0, accuracy="0.9"), reply(1, accuracy=None), reply(2, accuracy=[0.1]),
               reply(3, flops=[1.0], accuracy=True)]
    assert strategy.aggregate_evaluate(3, hostile) is None
    out = strategy.aggregate_evaluate(3, hostile[:3] + [reply(3)])
    assert out["accuracy"] == 0.5 and out["num-nodes"] == 1
    assert strategy.extra_round_record()["fedlp_val_accuracy_by_level"] == {str(strategy.node_level(by_pid[3])): 0.5}


# ------------------------------------------------------------------------------ 4-6. discovery and waiting

def test_a_node_whose_describe_fails_is_refused_and_counted(mnist_rc, monkeypatch):
    import fedprune.data

    monkeypatch.setattr(fedprune.data, "_download", lambda spec: OSError("no network (test)"))
    rc = config(mnist_rc, extra="sampling.min_train_nodes=1 sampling.min_evaluate_nodes=1", rounds=1)
    grid = InProcessGrid(rc, 4)
    by_pid = {ctx.node_config["partition-id"]: n for n, ctx in grid.contexts.items()}
    del grid.contexts[by_pid[1]].node_config["partition-id"]
    grid.contexts[by_pid[3]].node_config["data-root"] = "/nonexistent/fedprune-data"
    strategy, records, _, error = start(rc, grid=grid)
    assert error is None
    assert records[1]["failed_replies"] == 2 and records[1]["train_num_nodes"] == 2
    assert set(strategy.refused) == {by_pid[1], by_pid[3]}
    assert "partition-id" in strategy.refused[by_pid[1]]
    assert "no local copy" in strategy.refused[by_pid[3]]
    assert not any(m.metadata.dst_node_id in strategy.refused for m in grid.sent
                   if m.metadata.message_type in ("train", "evaluate"))


def test_a_federation_of_broken_nodes_stops_at_once_with_the_reason(mnist_rc):
    rc = config(mnist_rc, rounds=1)  # sampling.node_wait_seconds: 300 (the default)
    grid = InProcessGrid(rc, 3)
    for ctx in grid.contexts.values():
        del ctx.node_config["partition-id"]
    t0 = time.monotonic()
    strategy, records, _, error = start(rc, grid=grid)
    assert isinstance(error, RunFailed) and time.monotonic() - t0 < 5
    assert "0 usable nodes" in str(error) and "3 refused" in str(error) and "partition-id" in str(error)
    assert [m.metadata.message_type for m in grid.sent] == ["query.describe"] * 3


@pytest.mark.filterwarnings("ignore::UserWarning")  # flwr-datasets warns at each of its redraws
def test_a_partition_plan_that_cannot_be_built_fails_before_round_1_naming_the_keys(mnist_rc):
    # 600 tiny training samples: 5 partitions of at least 150 are impossible, so flwr-datasets'
    # DirichletPartitioner gives up after its 10 redraws
    rc = config(mnist_rc, extra="partition.scheme=dirichlet partition.alpha=0.01 partition.min_partition_size=150",
                rounds=1)
    t0 = time.monotonic()
    strategy, records, grid, error = start(rc, nodes=5)
    assert isinstance(error, RunFailed) and time.monotonic() - t0 < 60
    message = str(error)
    assert "cannot build the partition plan" in message
    assert all(key in message for key in ("partition.alpha", "partition.min_partition_size", "partition.scheme"))
    assert {m.metadata.message_type for m in grid.sent} == {"query.describe"}  # no round was trained
    assert [r["round"] for r in records] == [0]


def test_two_nodes_claiming_one_partition_one_is_refused_with_the_partition_named(mnist_rc, caplog):
    rc = config(mnist_rc, rounds=1)
    grid = InProcessGrid(rc, 3)
    by_pid = {ctx.node_config["partition-id"]: n for n, ctx in grid.contexts.items()}
    grid.contexts[by_pid[0]].node_config["partition-id"] = 1
    with caplog.at_level(logging.WARNING):
        strategy, records, _, error = start(rc, grid=grid)
    assert error is None and records[1]["train_num_nodes"] == 2
    assert len(strategy.refused) == 1 and "partition-id 1 is already held" in next(iter(strategy.refused.values()))
    refused = next(iter(strategy.refused))
    assert any(f"Node {refused} is refused" in r.getMessage() and "partition-id 1" in r.getMessage()
               for r in caplog.records)


def test_a_node_with_another_number_of_partitions_is_refused(mnist_rc):
    rc = config(mnist_rc, rounds=1)
    grid = InProcessGrid(rc, 3)
    by_pid = {ctx.node_config["partition-id"]: n for n, ctx in grid.contexts.items()}
    # partition 0 has the highest node id: it is described last, against the two others
    grid.contexts[by_pid[0]].node_config["num-partitions"] = 4
    strategy, records, _, error = start(rc, grid=grid)
    assert error is None and records[1]["train_num_nodes"] == 2
    assert set(strategy.refused) == {by_pid[0]} and "num-partitions 4 differs" in strategy.refused[by_pid[0]]


def test_too_few_nodes_stop_the_run_after_the_wait_not_forever(mnist_rc):
    rc = config(mnist_rc, extra="sampling.min_available_nodes=3 sampling.node_wait_seconds=1", rounds=1)
    t0 = time.monotonic()
    _, _, _, error = start(rc, nodes=2)
    elapsed = time.monotonic() - t0
    assert isinstance(error, RunFailed) and 0.9 <= elapsed < 10, elapsed
    assert "2 usable nodes, 3 required" in str(error) and "waited 1 s" in str(error)


# ------------------------------------------------------------------------------ 7. schedules

def reject_round(bad_round: int):
    def tamper(ins, reply):
        if ins.content["config"]["server-round"] == bad_round and not reply.has_error():
            return with_metrics(reply, ins, num_examples=0)
        return reply
    return tamper


def test_a_due_magnitude_cut_follows_a_round_without_accepted_replies(mnist_rc):
    rc = config(mnist_rc, "magnitude", "pruning.warmup_rounds=1 pruning.density=0.1 sampling.fraction_evaluate=0",
                rounds=3)
    strategy, records, _, error = start(rc, tamper=reject_round(1))
    assert error is None
    assert records[1]["rejected_replies"] == 3 and records[1]["density"] == 1.0 and records[1]["mask_changed"] == 0
    assert records[2]["rejected_replies"] == 0 and records[2]["mask_changed"] == 1
    assert records[2]["density"] == pytest.approx(0.1, abs=1e-3) and records[3]["train_num_nodes"] == 3


def test_due_gradual_steps_follow_a_round_without_accepted_replies(mnist_rc):
    rc = config(mnist_rc, "gradual-magnitude", "pruning.start_round=1 pruning.end_round=3 pruning.density=0.1 "
                "sampling.fraction_evaluate=0", rounds=3)
    strategy, records, _, error = start(rc, tamper=reject_round(1))
    assert error is None
    assert records[1]["rejected_replies"] == 3 and records[1]["density"] == 1.0
    assert records[2]["mask_changed"] == 1  # steps 1 and 2 at once: the schedule's density after step 2
    assert strategy.density_after(2) < strategy.density_after(1)
    assert records[2]["density"] == pytest.approx(strategy.density_after(2), abs=1e-3)
    assert records[3]["mask_changed"] == 1 and records[3]["density"] == pytest.approx(0.1, abs=1e-3)
    assert strategy.steps_taken == 3


# ------------------------------------------------------------------------------ 8-9. ledger, lost state

def test_a_changed_mask_travels_on_the_next_evaluate_message_and_is_booked_as_mask(mnist_rc):
    rc = config(mnist_rc, "magnitude", "pruning.warmup_rounds=1 pruning.density=0.1", rounds=2)
    marks = [0]
    strategy, records, grid, error = start(rc, on_round=lambda r, g, s: marks.append(len(g.sent)))
    assert error is None and records[1]["mask_changed"] == 1
    sent = [grid.sent[a:b] for a, b in zip(marks, marks[1:])]
    for r, msgs in zip(records, sent):
        assert r["bytes_down"] == sum(content_bytes(m) for m in msgs), r["round"]
        assert r["bytes_down"] == sum(v for k, v in r.items() if k.startswith("bytes_down_")), r["round"]
    evaluate1 = [m for m in sent[1] if m.metadata.message_type == "evaluate"]
    train1 = [m for m in sent[1] if m.metadata.message_type == "train"]
    assert len(evaluate1) == 3 and all("mask" in m.content for m in evaluate1)
    assert not any("mask" in m.content for m in train1)
    assert records[1]["bytes_down_mask"] == sum(bytes_by_purpose(m)["mask"] for m in evaluate1) > 0
    assert not any("mask" in m.content for m in sent[2]) and records[2].get("bytes_down_mask", 0) == 0
    assert records[1]["rejected_replies"] == records[2]["rejected_replies"] == 0


def test_a_node_that_lost_its_state_gets_the_mask_again_and_is_not_locked_out(mnist_rc):
    rc = config(mnist_rc, "random", "pruning.density=0.2", rounds=2)
    lost = {}

    def forget(record, grid, strategy):
        if record["round"] == 1:
            node = min(grid.contexts)
            grid.contexts[node].state = RecordDict()
            lost["node"], lost["mark"] = node, len(grid.sent)

    strategy, records, grid, error = start(rc, on_round=forget)
    assert error is None
    r2 = records[2]
    assert r2["rejected_replies"] == 0 and r2["failed_replies"] == 0 and r2["train_num_nodes"] == 3
    assert r2["bytes_down_mask"] > 0
    to_node = [m for m in grid.sent[lost["mark"]:] if m.metadata.dst_node_id == lost["node"]]
    assert [("mask" in m.content, m.metadata.message_type) for m in to_node][:2] == [(False, "train"), (True, "train")]
    assert "mask" in grid.contexts[lost["node"]].state
    assert strategy.node_mask_version[lost["node"]] == strategy.mask_version


# ------------------------------------------------------------------------------ 10. the experiment file

@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
def test_a_non_finite_learning_rate_is_refused_naming_the_key(mnist_rc, value):
    with pytest.raises(ExperimentError, match=r"client\.lr"):
        experiment_from_run_config(config(mnist_rc, extra=f"client.lr={value}"))


def test_impossible_schedules_are_refused_naming_the_key(mnist_rc):
    with pytest.raises(ExperimentError, match=r"pruning\.warmup_rounds"):
        experiment_from_run_config(config(mnist_rc, "magnitude", "pruning.warmup_rounds=3", rounds=3))
    with pytest.raises(ExperimentError, match=r"pruning\.end_round"):
        experiment_from_run_config(config(mnist_rc, "gradual-magnitude", "pruning.end_round=4", rounds=3))
    experiment_from_run_config(config(mnist_rc, "magnitude", "pruning.warmup_rounds=2", rounds=3))
    experiment_from_run_config(config(mnist_rc, "gradual-magnitude", "pruning.end_round=3", rounds=3))


def test_an_unknown_method_lists_the_registered_ones(mnist_rc):
    with pytest.raises(ExperimentError) as info:
        experiment_from_run_config(config(mnist_rc, extra="method=prune-everything"))
    assert "method" in str(info.value) and all(name in str(info.value) for name in METHODS)
