"""Round trips, sizes and error handling of the sparse wire codec."""

import contextlib
import math
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pruning import codec
from pruning.codec import (
    ENCODINGS,
    CodecError,
    decode,
    decode_mask,
    decode_with_mask,
    decode_tensors,
    encode,
    encode_mask,
    encode_tensors,
    encoded_bits_per_param,
    encoding_sizes,
    entropy_bound_bits,
    header_bytes,
    inspect,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def masked_tensors(draw):
    """A float32 tensor (0-d, empty or small n-d, with -0.0/inf sprinkled in) and a bool mask."""
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=4)))
    seed = draw(st.integers(0, 2**31 - 1))
    d = draw(st.sampled_from([0.0, 1.0, 0.01, 0.1, 0.5, 0.9]) | st.floats(0.0, 1.0))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 10.0 ** draw(st.integers(-3, 3))
    specials = torch.tensor([-0.0, float("inf"), float("-inf"), 1e30, 1e-40])
    pick = torch.rand(shape, generator=g) < 0.1
    if pick.any():
        idx = torch.randint(len(specials), (int(pick.sum()),), generator=g)
        t[pick] = specials[idx]
    mask = torch.rand(shape, generator=g) < d
    return t, mask


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def expected(t, mask, value_dtype):
    out = t.masked_fill(~mask, 0)
    return out.half().float() if value_dtype == "float16" else out


@FAST
@given(masked_tensors(), st.sampled_from(ENCODINGS + ("auto",)), st.sampled_from(["float32", "float16"]))
def test_round_trip_every_encoding(tm, encoding, value_dtype):
    t, mask = tm
    blob = encode(t, mask, encoding=encoding, value_dtype=value_dtype, receiver_has_mask=True)
    assert isinstance(blob, bytes)
    out = decode(blob, mask)
    assert out.shape == t.shape and out.dtype == torch.float32
    # float32: bit exact (-0.0, inf included); float16: exactly the fp16 rounding of each value
    assert torch.equal(bits(out), bits(expected(t, mask, value_dtype)))
    # pruned positions are exactly +0
    assert torch.equal(bits(out[~mask]), torch.zeros(int((~mask).sum()), dtype=torch.int32))
    if blob[1] & 7 != ENCODINGS.index("values"):  # self-contained: decodes without the mask too
        assert torch.equal(bits(decode(blob)), bits(out))
        assert torch.equal(bits(decode(np.frombuffer(blob, dtype=np.uint8))), bits(out))


@FAST
@given(masked_tensors(), st.booleans(), st.sampled_from(["float32", "float16"]))
def test_auto_picks_the_smallest_and_sizes_are_exact(tm, receiver_has_mask, value_dtype):
    t, mask = tm
    sizes = encoding_sizes(t, mask, value_dtype=value_dtype, receiver_has_mask=receiver_has_mask)
    assert ("values" in sizes) == receiver_has_mask
    for enc, size in sizes.items():
        assert len(encode(t, mask, encoding=enc, value_dtype=value_dtype)) == size
    auto = encode(t, mask, value_dtype=value_dtype, receiver_has_mask=receiver_has_mask)
    assert len(auto) == min(sizes.values())


def test_header_size_is_8_plus_4_per_dim():
    for shape in [(), (5,), (3, 4), (2, 3, 4, 5)]:
        t = torch.zeros(shape)
        blob = encode(t, torch.zeros(shape, dtype=torch.bool), encoding="values")
        assert len(blob) == header_bytes(len(shape)) == 8 + 4 * len(shape)
        assert len(encode(t, encoding="dense")) == header_bytes(len(shape)) + 4 * t.numel()


def test_implicit_mask_keeps_negative_zero_and_goes_sparse():
    t = torch.zeros(10_000)
    t[::97] = torch.randn(len(t[::97]))
    t[5] = -0.0
    blob = encode(t)
    assert len(blob) < 4 * t.numel() / 8
    assert torch.equal(bits(decode(blob)), bits(t))


def test_special_values_do_not_crash():
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 7e4, 1.0])
    assert torch.equal(bits(decode(encode(t))), bits(t))
    half = decode(encode(t, value_dtype="float16"))
    assert torch.isinf(half[4])  # 7e4 overflows fp16: inf, not an exception
    assert torch.equal(bits(half[1:4]), bits(t[1:4]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tensors_travel_in_their_own_dtype(dtype):
    t = torch.randn(50).to(dtype)
    mask = torch.rand(50) < 0.3
    for enc in ENCODINGS:
        out = decode(encode(t, mask, encoding=enc, receiver_has_mask=True), mask)
        assert out.dtype == dtype
        assert torch.equal(out.view(torch.int16), t.masked_fill(~mask, 0).view(torch.int16))


def test_float64_tensor():
    t = torch.randn(20, dtype=torch.float64)
    assert torch.equal(decode(encode(t, value_dtype="float64")), t)
    out = decode(encode(t))  # float32 on the wire, float64 back
    assert out.dtype == torch.float64 and torch.equal(out, t.float().double())


@pytest.mark.parametrize("t", [
    torch.tensor(123456789012, dtype=torch.int64),
    torch.arange(-5, 5, dtype=torch.int32),
    torch.randint(0, 255, (3, 4), dtype=torch.uint8),
    torch.randint(-100, 100, (7,), dtype=torch.int8),
    torch.randint(-100, 100, (7,), dtype=torch.int16),
    torch.zeros(0, 3, dtype=torch.int64),
])
def test_integer_tensors_go_dense_in_their_own_dtype(t):
    blob = encode(t, value_dtype="float16")
    assert blob[1] & 7 == ENCODINGS.index("dense")
    assert len(blob) == header_bytes(t.dim()) + t.numel() * t.element_size()
    out = decode(blob)
    assert out.dtype == t.dtype and torch.equal(out, t)
    with pytest.raises(ValueError, match="dense"):
        encode(t, encoding="bitmask")


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_a_mask_travels_as_its_positions_only(density):
    mask = torch.rand(64, 3, 3, generator=torch.Generator().manual_seed(1)) < density
    blob = encode_mask(mask)
    info = inspect(blob)
    assert info.encoding in ("bitmask", "rice") and info.value_bytes == 0
    assert len(blob) <= header_bytes(3) + -(-mask.numel() // 8)  # never more than a bitmask
    assert torch.equal(decode_mask(blob, shape=(64, 3, 3)), mask)
    with pytest.raises(CodecError, match="shape"):
        decode_mask(blob, shape=(64, 9))
    with pytest.raises(CodecError, match="dtype"):
        decode_mask(encode(torch.ones(64, 3, 3)), shape=(64, 3, 3))


def test_values_encoding_needs_the_mask():
    t, mask = torch.randn(10), torch.rand(10) < 0.5
    with pytest.raises(ValueError, match="needs the mask"):
        encode(t, encoding="values")
    with pytest.raises(ValueError, match="needs the mask"):
        encode(t, receiver_has_mask=True)
    blob = encode(t, mask, encoding="values")
    with pytest.raises(CodecError, match="needs the receiver's mask"):
        decode(blob)


def test_bad_encode_arguments():
    t = torch.randn(3, 4)
    with pytest.raises(ValueError, match="encoding"):
        encode(t, encoding="zip")
    with pytest.raises(ValueError, match="value_dtype"):
        encode(t, value_dtype="int8")
    with pytest.raises(ValueError, match="shape"):
        encode(t, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        encode(t, torch.ones(3, 4))
    with pytest.raises(TypeError):
        encode([1.0, 2.0])
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode(torch.zeros(2, dtype=torch.complex64))


# --- malformed blobs ---------------------------------------------------------------------------


def _blobs():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 30, generator=g)
    mask = torch.rand(40, 30, generator=g) < 0.1
    return t, mask, {enc: encode(t, mask, encoding=enc) for enc in ENCODINGS}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_truncation_and_extension_is_rejected(encoding):
    _, mask, blobs = _blobs()
    blob = blobs[encoding]
    for n in range(len(blob)):
        with pytest.raises(CodecError):
            decode(blob[:n], mask)
    with pytest.raises(CodecError):
        decode(blob + b"\x00", mask)
    with pytest.raises(CodecError):
        decode(blob + b"\xff", mask)


def test_wrong_magic_encoding_and_dtype_ids():
    _, mask, blobs = _blobs()
    blob = bytearray(blobs["bitmask"])
    with pytest.raises(CodecError, match="magic"):
        decode(bytes([0x00]) + bytes(blob[1:]))
    with pytest.raises(CodecError, match="encoding id"):
        decode(bytes(blob[:1]) + bytes([7]) + bytes(blob[2:]))
    with pytest.raises(CodecError, match="k="):
        decode(bytes(blob[:1]) + bytes([1 | (3 << 3)]) + bytes(blob[2:]))
    with pytest.raises(CodecError, match="dtype ids"):
        decode(bytes(blob[:2]) + bytes([0xFF]) + bytes(blob[3:]))
    with pytest.raises(CodecError, match="dtype pair"):  # int64 tensor sent as bitmask
        decode(bytes(blob[:2]) + bytes([0x44]) + bytes(blob[3:]))


def _with_u32(blob: bytes, offset: int, value: int) -> bytes:
    return blob[:offset] + np.array([value], dtype="<u4").tobytes() + blob[offset + 4:]


@pytest.mark.parametrize("encoding", ["bitmask", "rice", "values"])
def test_inconsistent_counts(encoding):
    _, mask, blobs = _blobs()
    blob = blobs[encoding]
    nnz = int(mask.sum())
    for wrong in (nnz - 1, nnz + 1, 40 * 30 + 1):
        with pytest.raises(CodecError):
            decode(_with_u32(blob, 4, wrong), mask)


def test_shape_and_mask_mismatches():
    t, mask, blobs = _blobs()
    for enc, blob in blobs.items():
        with pytest.raises(CodecError, match="shape"):
            decode(blob, mask.T.contiguous())
        with pytest.raises(CodecError, match="bool"):
            decode(blob, mask.float())
    other = mask.clone()
    other[0, 0] = not other[0, 0]
    with pytest.raises(CodecError, match="mask keeps"):
        decode(blobs["values"], other)
    for enc in ("bitmask", "rice"):
        with pytest.raises(CodecError):
            decode(blobs[enc], other)
    # same count, different positions
    moved = mask.clone().reshape(-1)
    first_kept, first_dropped = int(moved.nonzero()[0]), int((~moved).nonzero()[0])
    moved[first_kept], moved[first_dropped] = False, True
    for enc in ("bitmask", "rice"):
        with pytest.raises(CodecError, match="differs"):
            decode(blobs[enc], moved.reshape(mask.shape))
    # a header that claims a smaller shape than the positions reach
    with pytest.raises(CodecError):
        decode(_with_u32(blobs["rice"], 8, 20))


def test_expected_shape_is_checked_before_allocation():
    t = torch.randn(4, 5)
    assert torch.equal(decode(encode(t), shape=(4, 5)), t)
    with pytest.raises(CodecError, match="expected"):
        decode(encode(t), shape=(5, 4))
    # an all-zero blob claiming 2**31 x 2**31 elements is refused, not allocated
    huge = encode(torch.zeros(2, 2), encoding="rice")
    huge = _with_u32(_with_u32(huge, 8, 2**31), 12, 2**31)
    with pytest.raises(CodecError, match="limit"):
        decode(huge)
    with pytest.raises(CodecError, match="expected"):
        decode(huge, shape=(2, 2))
    with pytest.raises(CodecError, match="w"):
        decode_tensors({"w": encode(t)}, shapes={"w": (20,)})


def test_non_contiguous_inputs():
    t = torch.randn(6, 8)
    for x in (t.T, t[:, ::2], torch.randn(10)[::3]):
        mask = torch.rand(x.shape) < 0.5
        for enc in ENCODINGS:
            out = decode(encode(x, mask, encoding=enc), mask)
            assert torch.equal(out, x.masked_fill(~mask, 0))
    p = torch.nn.Parameter(torch.randn(3))
    assert torch.equal(decode(encode(p)), p.detach())


def test_padding_bits_must_be_zero():
    t = torch.randn(5)
    mask = torch.tensor([True, False, True, False, True])
    blob = bytearray(encode(t, mask, encoding="bitmask"))
    blob[header_bytes(1)] |= 0x01  # a padding bit after the 5 mask bits
    with pytest.raises(CodecError, match="padding"):
        decode(bytes(blob))


def test_bad_blob_types():
    with pytest.raises(CodecError):
        decode("not bytes")
    with pytest.raises(CodecError):
        decode(np.zeros(20, dtype=np.int32))
    with pytest.raises(CodecError, match="shorter"):
        decode(b"\xf1\x00")


def test_bool_dense_values_must_be_0_or_1():
    blob = bytearray(encode(torch.tensor([True, False]), encoding="dense"))
    blob[-1] = 2
    with pytest.raises(CodecError, match="0 or 1"):
        decode(bytes(blob))


# --- inspect: the header against the length, before anything is allocated ---------------------


WIRE = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


@FAST
@given(masked_tensors(), st.sampled_from(ENCODINGS), st.sampled_from(sorted(WIRE)))
def test_inspect_agrees_with_encode(tm, encoding, value_dtype):
    t, mask = tm
    blob = encode(t, mask, encoding=encoding, value_dtype=value_dtype)
    info = inspect(blob)
    nnz = t.numel() if encoding == "dense" else int(mask.sum())
    assert (info.encoding, info.dtype, info.wire_dtype, info.shape, info.nnz, info.numel) == (
        encoding, torch.float32, WIRE[value_dtype], tuple(t.shape), nnz, t.numel())
    assert info.nbytes == len(blob) == header_bytes(t.dim()) + info.index_bytes + info.value_bytes
    assert info.value_bytes == nnz * WIRE[value_dtype].itemsize
    assert info.k == (blob[1] >> 3) and (info.k == 0 or encoding == "rice")
    if encoding in ("dense", "values"):
        assert info.index_bytes == 0
    elif encoding == "bitmask":
        assert info.index_bytes == -(-t.numel() // 8)
    assert inspect(np.frombuffer(blob, dtype=np.uint8)) == info


@pytest.mark.parametrize("dtype, encoding", [(dt, enc) for dt in codec._DTYPES for enc in ENCODINGS
                                             if dt.is_floating_point or enc == "dense"])
def test_inspect_every_dtype(dtype, encoding):
    t = (torch.randn(6, 7) * 100).to(dtype)
    mask = torch.rand(6, 7) < 0.3
    blob = encode(t, mask, encoding=encoding, value_dtype="float64")
    info = inspect(blob, shape=(6, 7), expect_dtype=dtype)
    wire = dtype if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point else torch.float64
    assert (info.dtype, info.wire_dtype, info.encoding) == (dtype, wire, encoding)
    assert header_bytes(2) + info.index_bytes + info.value_bytes == len(blob)
    assert info.value_bytes == info.nnz * wire.itemsize
    assert decode(blob, mask, shape=(6, 7), expect_dtype=dtype).dtype == dtype


@contextlib.contextmanager
def allocates_at_most(monkeypatch, limit: int = 2**20):
    """Fails if ``torch.zeros`` (where decoding allocates the tensor) is reached, or if numpy and
    Python allocations (which tracemalloc sees; torch's do not) peak at ``limit`` bytes or more."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.zeros reached")

    with monkeypatch.context() as m:
        m.setattr(torch, "zeros", refuse)
        tracemalloc.start()
        try:
            yield
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < limit, f"peak {peak} bytes"


def _head(encoding, shape, nnz, dtype=torch.float64, wire=None, k=0) -> bytes:
    ids = codec._DTYPE_ID
    return bytes([0xF1, ENCODINGS.index(encoding) | k << 3, ids[dtype] | ids[wire or dtype] << 4,
                  len(shape)]) + np.array((nnz, *shape), dtype="<u4").tobytes()


LYING = {  # headers whose claims the blob's length refutes
    "empty": b"",
    "truncated shape": _head("dense", (2**31, 3), 0)[:12],
    "numel >= 2**32": _head("dense", (2**16, 2**16), 0),
    "dense of 2**31 float64 in 12 bytes": _head("dense", (2**31,), 2**31),
    "dense with nnz != numel": _head("dense", (2**31,), 0),
    "bitmask without its mask bytes": _head("bitmask", (2**31,), 0),
    "bitmask one byte short": _head("bitmask", (80,), 0) + bytes(9),
    "bitmask one byte long": _head("bitmask", (80,), 0) + bytes(11),
    "nnz > numel": _head("bitmask", (10,), 2**31) + bytes(2),
    "rice without its streams": _head("rice", (2**31,), 2**20, k=3),
    "rice unary stream too long": _head("rice", (100,), 1, torch.float32) + bytes(2**20) + bytes(4),
    "rice bytes with nnz=0": _head("rice", (2**31,), 0) + b"\x01",
    "values of 2**31 float64 in 12 bytes": _head("values", (2**31,), 2**31),
    "values too long": _head("values", (10,), 2, torch.float32) + bytes(9),
}


@pytest.mark.parametrize("name", LYING)
def test_lying_headers_are_refused_before_allocation(name, monkeypatch):
    blob = LYING[name]
    with allocates_at_most(monkeypatch):
        with pytest.raises(CodecError):
            inspect(blob)
        with pytest.raises(CodecError):
            decode(blob)
        with pytest.raises(CodecError):
            decode_with_mask(blob, shape=(10,))


def test_expected_shape_and_dtype_refuse_a_valid_but_unexpected_blob(monkeypatch):
    # a valid 12-byte blob: an all-zero float64 tensor of 2**31 elements, which decode(blob) would
    # allocate (16 GiB); a receiver that states what it expects never gets that far
    blob = _head("rice", (2**31,), 0)
    info = inspect(blob)
    assert (info.numel, info.index_bytes, info.value_bytes) == (2**31, 0, 0)
    with allocates_at_most(monkeypatch):
        with pytest.raises(CodecError, match="expected"):
            decode(blob, shape=(10,))
        with pytest.raises(CodecError, match="dtype .*expected"):
            decode(blob, shape=(2**31,), expect_dtype=torch.float32)
        with pytest.raises(CodecError, match="dtype .*expected"):
            inspect(blob, expect_dtype=torch.float32)
    t = torch.randn(3, 4)
    assert torch.equal(decode(encode(t), shape=(3, 4), expect_dtype=torch.float32), t)
    with pytest.raises(CodecError, match="expected torch.float16"):
        decode_with_mask(encode(t), expect_dtype=torch.float16)


def test_lying_rice_stream_costs_at_most_a_few_times_the_blob(monkeypatch):
    # the header allows a long unary stream (numel 2**31), which holds 8 Mi ones, not nnz=1
    blob = _head("rice", (2**31,), 1, torch.float32) + b"\xff" * 2**20 + bytes(4)
    assert inspect(blob).index_bytes == 2**20
    with allocates_at_most(monkeypatch, 10 * len(blob)):
        with pytest.raises(CodecError, match="holds 8388608 positions"):
            decode(blob)


# --- Rice parameter and efficiency -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=200))
def test_rice_k_is_optimal(gaps):
    gaps = np.array(gaps, dtype=np.int64)
    k, unary = codec._best_rice_k(gaps)
    costs = [int((gaps >> j).sum()) + len(gaps) * (j + 1) for j in range(32)]
    assert costs[k] == min(costs)
    assert unary == int((gaps >> k).sum()) + len(gaps)


@pytest.mark.parametrize("d", [0.5, 0.2, 0.1, 0.05, 0.01])
def test_near_entropy_bound_on_random_masks(d):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(200_000, generator=g)
    mask = torch.rand(200_000, generator=g) < d
    measured = encoded_bits_per_param(t, mask)
    bound = entropy_bound_bits(float(mask.float().mean()), 32)
    assert bound <= measured <= 1.03 * bound + 8 * header_bytes(1) / t.numel()


def test_entropy_bound():
    assert entropy_bound_bits(0.0, 32) == 0.0
    assert entropy_bound_bits(1.0, 32) == 32.0
    assert entropy_bound_bits(0.5, 32) == pytest.approx(17.0)
    assert entropy_bound_bits(0.1, 16) == pytest.approx(0.469 + 1.6, abs=1e-3)
    with pytest.raises(ValueError):
        entropy_bound_bits(1.5, 32)


def test_dict_helpers():
    tensors = {"a.weight": torch.randn(20, 10), "a.bias": torch.randn(10),
               "bn.num_batches_tracked": torch.tensor(3)}
    masks = {"a.weight": torch.rand(20, 10) < 0.2}
    blobs = encode_tensors(tensors, masks, receiver_has_mask=True)
    out = decode_tensors(blobs, masks)
    assert torch.equal(out["a.weight"], tensors["a.weight"] * masks["a.weight"])
    assert torch.equal(out["a.bias"], tensors["a.bias"])
    assert torch.equal(out["bn.num_batches_tracked"], tensors["bn.num_batches_tracked"])
    with pytest.raises(CodecError, match="a.weight"):
        decode_tensors(blobs)  # 'values' blob without its mask names the tensor
    with pytest.raises(ValueError, match="unknown"):
        encode_tensors(tensors, {"nope": torch.ones(1, dtype=torch.bool)})
    total = sum(len(b) for b in encode_tensors(tensors, masks).values())
    assert encoded_bits_per_param(tensors, masks) == pytest.approx(8 * total / 211)
    assert math.isfinite(encoded_bits_per_param(tensors["a.weight"], masks["a.weight"]))
