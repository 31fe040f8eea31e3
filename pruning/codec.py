r"""Wire codec for (optionally masked) tensors.

One tensor becomes one self-describing ``bytes`` blob and back. Four encodings:

``dense``
    every value.
``bitmask``
    the mask as packed bits (``numpy.packbits``, one bit per position), then the kept values.
``rice``
    the kept positions as gaps (zeros skipped before each kept position), Golomb-Rice coded with a
    per-tensor parameter ``k`` (the optimal one, found from the mean gap), then the kept values.
    The unary quotients and the ``k``-bit remainders are stored as two separate bit streams (the
    same bit count as interleaved Rice) so that both directions are vectorised numpy.
``values``
    the kept values only; the receiver must already hold the mask and pass it to :func:`decode`.

Every blob starts with a little-endian header of ``8 + 4 * ndim`` bytes (:func:`header_bytes`):

====== ======= ===========================================================================
offset size    field
====== ======= ===========================================================================
0      1       magic and format version (``0xF1``)
1      1       encoding id (bits 0-2) and Rice parameter ``k`` (bits 3-7; 0 unless ``rice``)
2      1       dtype of the tensor (bits 0-3) and dtype of the values on the wire (bits 4-7)
3      1       ``ndim``
4      4       ``nnz``: number of values that follow (``numel`` for ``dense``), uint32
8      4*ndim  shape, uint32 each
====== ======= ===========================================================================

The payload follows: ``bitmask`` = ``ceil(numel/8)`` mask bytes + values; ``rice`` = unary bytes
(``sum(q) + nnz`` bits: ``q`` zeros then a one per kept position, zero-padded) + remainder bytes
(``ceil(nnz*k/8)``) + values; ``dense`` and ``values`` = values only. Values are little-endian.

Values of floating tensors travel as ``value_dtype`` (``"float32"``, ``"float16"`` or
``"float64"``), except that float16 and bfloat16 tensors always travel in their own dtype.
``float32`` round trips are bit exact (``-0.0`` and non-finite values included). Integer tensors
(an ``int64`` ``num_batches_tracked``) always travel ``dense`` in their own dtype; a mask given with
them is ignored. A ``bool`` tensor (a mask, :func:`encode_mask`) travels as its ``True`` positions
only (``bitmask`` or ``rice`` with no value bytes) or ``dense``. Positions outside the mask decode as exactly ``+0``.
Without a mask, a floating tensor's implicit mask is "bit pattern non-zero", so sparse tensors
still go sparse and ``-0.0`` survives.

Malformed blobs raise :class:`CodecError` (a ``ValueError``) naming what was wrong. A receiver can
check a blob against what it expects before anything is decoded with :func:`inspect`, which reads
the header and the length only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BlobInfo",
    "CodecError",
    "ENCODINGS",
    "HEADER_BASE_BYTES",
    "decode",
    "decode_mask",
    "decode_with_mask",
    "decode_tensors",
    "encode",
    "encode_mask",
    "encode_tensors",
    "encoded_bits_per_param",
    "encoding_sizes",
    "entropy_bound_bits",
    "header_bytes",
    "inspect",
]

_MAGIC = 0xF1
HEADER_BASE_BYTES = 8
"""Fixed part of the header; the shape adds 4 bytes per dimension."""

ENCODINGS = ("dense", "bitmask", "rice", "values")
_ENC_ID = {name: i for i, name in enumerate(ENCODINGS)}
_VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}

_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_DTYPE_ID = {dt: i for i, dt in enumerate(_DTYPES)}
# Same-width integer dtype used to move raw bits, and its little-endian numpy spelling.
_BITS = {
    torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
    torch.float64: torch.int64, torch.int64: torch.int64, torch.int32: torch.int32,
    torch.int16: torch.int16, torch.int8: torch.int8, torch.uint8: torch.uint8,
    torch.bool: torch.uint8,
}
_NP_LE = {
    torch.int64: np.dtype("<i8"), torch.int32: np.dtype("<i4"), torch.int16: np.dtype("<i2"),
    torch.int8: np.dtype("i1"), torch.uint8: np.dtype("u1"),
}
_U32 = np.dtype("<u4")
_MAX_K = 31  # five header bits


class CodecError(ValueError):
    """A blob that cannot be decoded: truncated, corrupt, or inconsistent with the given mask."""


def header_bytes(ndim: int) -> int:
    """Size in bytes of the header for a tensor of ``ndim`` dimensions: ``8 + 4 * ndim``."""
    return HEADER_BASE_BYTES + 4 * ndim


def entropy_bound_bits(d: float, value_bits: int) -> float:
    """Bits per parameter of an ideal coder at density ``d``: ``H(d) + d * value_bits``.

    ``H`` is the binary entropy, the cost of an i.i.d. mask of density ``d``.
    """
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {d}")
    h = 0.0 if d in (0.0, 1.0) else -(d * math.log2(d) + (1 - d) * math.log2(1 - d))
    return h + d * value_bits


# ---------------------------------------------------------------------------------------------
# encoding


@dataclass
class _Plan:
    """Everything needed to size or write one tensor, computed once."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    wire: torch.dtype
    flat: torch.Tensor  # original values, flattened
    mask: torch.Tensor | None  # flat bool, None for non-floating tensors
    positions: np.ndarray | None  # int64 kept positions
    k: int
    unary_bits: int

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @property
    def nnz(self) -> int:
        return self.numel if self.positions is None else len(self.positions)

    @property
    def value_size(self) -> int:
        return torch.empty((), dtype=self.wire).element_size()

    def payload_size(self, encoding: str) -> int:
        values = 0 if self.dtype == torch.bool else self.nnz * self.value_size
        if encoding == "dense":
            return self.numel * self.value_size
        if encoding == "bitmask":
            return -(-self.numel // 8) + values
        if encoding == "rice":
            return -(-self.unary_bits // 8) + -(-self.nnz * self.k // 8) + values
        return values


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")
    return x.detach().cpu()


def _check_mask(mask, shape: tuple[int, ...], exc=ValueError) -> torch.Tensor:
    mask = _as_tensor(mask)
    if mask.dtype != torch.bool:
        raise exc(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise exc(f"mask shape {tuple(mask.shape)} does not match tensor shape {shape}")
    return mask.reshape(-1)


def _best_rice_k(gaps: np.ndarray) -> tuple[int, int]:
    """Optimal Rice parameter for ``gaps`` and the unary bit count it gives.

    Starts from the mean-gap estimate ``k ~ log2(ln2 * mean)`` and walks downhill; the total bit
    count ``n*(k+1) + sum(g >> k)`` is convex in ``k``, so the walk ends at the global optimum.
    """
    n = len(gaps)
    if n == 0:
        return 0, 0

    def cost(k: int) -> tuple[int, int]:
        unary = int((gaps >> k).sum()) + n
        return unary + n * k, unary

    mean = float(gaps.mean())
    k = min(_MAX_K, max(0, math.ceil(math.log2(math.log(2) * mean)))) if mean > 1 else 0
    best, unary = cost(k)
    for step in (-1, 1):
        while 0 <= k + step <= _MAX_K:
            c, u = cost(k + step)
            if c >= best:
                break
            k, best, unary = k + step, c, u
    return k, unary


def _plan(tensor, mask, value_dtype: str) -> _Plan:
    t = _as_tensor(tensor)
    if t.dtype not in _DTYPE_ID:
        raise ValueError(f"unsupported dtype {t.dtype}; supported: {[str(d) for d in _DTYPES]}")
    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(_VALUE_DTYPES)}, got {value_dtype!r}")
    shape = tuple(t.shape)
    if len(shape) > 255 or any(s >= 2**32 for s in shape) or t.numel() >= 2**32:
        raise ValueError(f"tensor of shape {shape} is too large for the codec (numel < 2**32)")
    flat = t.reshape(-1)
    if mask is not None and not t.is_floating_point():
        _check_mask(mask, shape)
    if t.dtype == torch.bool:  # a mask: its True positions, no values
        m, wire = flat, torch.bool
    elif not t.is_floating_point():
        return _Plan(shape, t.dtype, t.dtype, flat, None, None, 0, 0)
    else:
        wire = t.dtype if t.dtype in (torch.float16, torch.bfloat16) else _VALUE_DTYPES[value_dtype]
        m = _check_mask(mask, shape) if mask is not None else flat.view(_BITS[t.dtype]) != 0
    positions = torch.nonzero(m).reshape(-1).numpy().astype(np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    k, unary = _best_rice_k(gaps)
    return _Plan(shape, t.dtype, wire, flat, m, positions, k, unary)


def _value_bytes(values: torch.Tensor) -> bytes:
    bits = values.to(torch.uint8) if values.dtype == torch.bool else values.view(_BITS[values.dtype])
    return bits.numpy().astype(_NP_LE[bits.dtype], copy=False).tobytes()


def _header(plan: _Plan, encoding: str) -> bytes:
    k = plan.k if encoding == "rice" else 0
    head = np.array(
        [_MAGIC, _ENC_ID[encoding] | (k << 3),
         _DTYPE_ID[plan.dtype] | (_DTYPE_ID[plan.wire] << 4), len(plan.shape)],
        dtype=np.uint8,
    ).tobytes()
    return head + np.array((plan.nnz if encoding != "dense" else plan.numel,) + plan.shape,
                           dtype=_U32).tobytes()


def _write(plan: _Plan, encoding: str) -> bytes:
    parts = [_header(plan, encoding)]
    if encoding == "dense":
        flat = plan.flat if plan.mask is None else plan.flat.masked_fill(~plan.mask, 0)
        parts.append(_value_bytes(flat.to(plan.wire)))
        return b"".join(parts)
    if encoding == "bitmask":
        parts.append(np.packbits(plan.mask.numpy()).tobytes())
    elif encoding == "rice":
        gaps = np.diff(plan.positions, prepend=-1) - 1
        q = gaps >> plan.k
        unary = np.zeros(plan.unary_bits, dtype=np.uint8)
        unary[np.cumsum(q + 1) - 1] = 1
        parts.append(np.packbits(unary).tobytes())
        if plan.k:
            shifts = np.arange(plan.k - 1, -1, -1, dtype=np.int64)
            parts.append(np.packbits(((gaps[:, None] >> shifts) & 1).astype(np.uint8)).tobytes())
    if plan.dtype != torch.bool:
        parts.append(_value_bytes(plan.flat[torch.from_numpy(plan.positions)].to(plan.wire)))
    return b"".join(parts)


def _candidates(plan: _Plan, receiver_has_mask: bool) -> tuple[str, ...]:
    if plan.mask is None:
        return ("dense",)
    if plan.dtype == torch.bool:
        return ("bitmask", "rice", "dense")
    return ("values",) * receiver_has_mask + ("bitmask", "rice", "dense")


def encoding_sizes(tensor, mask=None, *, value_dtype: str = "float32",
                   receiver_has_mask: bool = False) -> dict[str, int]:
    """Exact blob size in bytes (header included) of every encoding open to this tensor."""
    if receiver_has_mask and mask is None:
        raise ValueError("receiver_has_mask=True needs the mask")
    plan = _plan(tensor, mask, value_dtype)
    head = header_bytes(len(plan.shape))
    return {e: head + plan.payload_size(e) for e in _candidates(plan, receiver_has_mask)}


def encode(tensor, mask=None, *, value_dtype: str = "float32", receiver_has_mask: bool = False,
           encoding: str = "auto") -> bytes:
    """Encode ``tensor`` (zeroed outside ``mask``) into a self-describing blob.

    Args:
        tensor: a torch tensor or numpy array (any device; read on the CPU).
        mask: optional bool tensor of the same shape; positions where it is ``False`` are dropped.
            Without it a floating tensor's non-zero bit patterns form the mask.
        value_dtype: wire precision of floating values: ``"float32"``, ``"float16"`` (lossy, only
            when asked) or ``"float64"``.
        receiver_has_mask: the receiver holds ``mask`` already, so ``auto`` may pick ``values``.
        encoding: ``"auto"`` (smallest exact size; ties go to the earlier of values, bitmask, rice,
            dense) or one of :data:`ENCODINGS`.
    """
    if encoding != "auto" and encoding not in _ENC_ID:
        raise ValueError(f"encoding must be 'auto' or one of {ENCODINGS}, got {encoding!r}")
    if (receiver_has_mask or encoding == "values") and mask is None:
        raise ValueError("the 'values' encoding (receiver_has_mask=True) needs the mask")
    plan = _plan(tensor, mask, value_dtype)
    if encoding == "auto":
        encoding = min(_candidates(plan, receiver_has_mask), key=plan.payload_size)
    elif encoding not in _candidates(plan, mask is not None):
        raise ValueError(f"{plan.dtype} tensors are encoded {' or '.join(_candidates(plan, False))}, "
                         f"not {encoding!r}")
    return _write(plan, encoding)


# ---------------------------------------------------------------------------------------------
# decoding


@dataclass(frozen=True)
class BlobInfo:
    """What a blob's header says, checked against the blob's length by :func:`inspect`."""

    encoding: str
    dtype: torch.dtype
    """Dtype of the decoded tensor."""
    wire_dtype: torch.dtype
    """Dtype of the values on the wire."""
    shape: tuple[int, ...]
    nnz: int
    """Number of values carried (``numel`` for ``dense``)."""
    k: int
    """Rice parameter (0 unless ``rice``)."""
    nbytes: int
    """Length of the whole blob: header + ``index_bytes`` + ``value_bytes``."""
    index_bytes: int
    """Payload bytes encoding positions: the bitmask, or both Rice streams; 0 otherwise."""
    value_bytes: int
    """Payload bytes holding the ``nnz`` values."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _as_buffer(blob) -> np.ndarray:
    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise CodecError(f"blob array must be 1-D uint8, got {blob.dtype} with ndim {blob.ndim}")
        return blob
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return np.frombuffer(blob, dtype=np.uint8)
    raise CodecError(f"blob must be bytes or a uint8 array, got {type(blob).__name__}")


def inspect(blob, *, shape: tuple[int, ...] | None = None,
            expect_dtype: torch.dtype | None = None) -> BlobInfo:
    """Read a blob's header and check it against the blob's length; nothing is decoded.

    Raises :class:`CodecError` on everything the header and the length alone refute: bad magic,
    unknown ids, an invalid dtype pair, a truncated header, ``numel >= 2**32``, ``nnz`` above
    ``numel`` (or other than it for ``dense``), a payload length the encoding cannot have. ``shape``
    and ``expect_dtype``, when given, must equal the header's, and are checked first. Memory use is
    O(ndim), whatever the header claims. The positions themselves (padding bits, range, agreement
    with a given mask) are checked by :func:`decode`.
    """
    buf = _as_buffer(blob)
    if len(buf) < HEADER_BASE_BYTES:
        raise CodecError(f"blob of {len(buf)} bytes is shorter than the {HEADER_BASE_BYTES}-byte header")
    magic, enc_k, dtypes, ndim = (int(b) for b in buf[:4])
    if magic != _MAGIC:
        raise CodecError(f"bad magic/version byte 0x{magic:02X}, expected 0x{_MAGIC:02X}")
    enc_id, k = enc_k & 7, enc_k >> 3
    if enc_id >= len(ENCODINGS):
        raise CodecError(f"unknown encoding id {enc_id}")
    encoding = ENCODINGS[enc_id]
    if k and encoding != "rice":
        raise CodecError(f"Rice parameter k={k} set for encoding {encoding!r}")
    dtype_id, wire_id = dtypes & 15, dtypes >> 4
    if dtype_id >= len(_DTYPES) or wire_id >= len(_DTYPES):
        raise CodecError(f"unknown dtype ids {dtype_id}/{wire_id}")
    dtype, wire = _DTYPES[dtype_id], _DTYPES[wire_id]
    if dtype.is_floating_point:
        ok = wire == dtype if dtype in (torch.float16, torch.bfloat16) else wire in _VALUE_DTYPES.values()
    else:
        ok = wire == dtype and (encoding == "dense" or (dtype == torch.bool and encoding != "values"))
    if not ok:
        raise CodecError(f"invalid dtype pair: tensor {dtype}, wire {wire}, encoding {encoding!r}")
    head = header_bytes(ndim)
    if len(buf) < head:
        raise CodecError(f"blob of {len(buf)} bytes is shorter than its {head}-byte header")
    fields = buf[4:head].view(_U32).astype(np.int64)
    nnz, header_shape = int(fields[0]), tuple(int(s) for s in fields[1:])
    if shape is not None and tuple(shape) != header_shape:
        raise CodecError(f"blob holds shape {header_shape}, expected {tuple(shape)}")
    if expect_dtype is not None and dtype != expect_dtype:
        raise CodecError(f"blob holds dtype {dtype}, expected {expect_dtype}")
    numel = math.prod(header_shape)
    if numel >= 2**32:
        raise CodecError(f"shape {header_shape} exceeds the codec limit (numel < 2**32)")
    if nnz > numel or (encoding == "dense" and nnz != numel):
        raise CodecError(f"nnz={nnz} inconsistent with shape {header_shape} and encoding {encoding!r}")
    value_bytes = 0 if dtype == torch.bool and encoding != "dense" else nnz * wire.itemsize
    index_bytes = len(buf) - head - value_bytes
    if encoding == "bitmask":
        lo = hi = -(-numel // 8)
    elif encoding == "rice":
        # unary: nnz ones and at most (numel - nnz) >> k zeros (the gaps sum to <= numel - nnz)
        max_unary_bits = nnz + ((numel - nnz) >> k) if nnz else 0
        if nnz * k > numel - nnz:
            # the encoder's k never spends more remainder bits than the skipped positions they
            # count; a larger k only inflates decoding (an (nnz, k) table per blob)
            raise CodecError(f"Rice parameter k={k} for nnz={nnz} of numel={numel}: more remainder bits "
                             "than skipped positions")
        rem = -(-nnz * k // 8)
        lo, hi = -(-nnz // 8) + rem, -(-max_unary_bits // 8) + rem
    else:
        lo = hi = 0
    if not lo <= index_bytes <= hi:
        need = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise CodecError(f"{encoding} payload is {len(buf) - head} bytes, expected {need} index "
                         f"bytes + {value_bytes} for {nnz} values of {wire}")
    return BlobInfo(encoding, dtype, wire, header_shape, nnz, k, len(buf), index_bytes, value_bytes)


def _read_values(buf: np.ndarray, n: int, wire: torch.dtype) -> torch.Tensor:
    bits_dtype = _BITS[wire]
    arr = buf.view(_NP_LE[bits_dtype])[:n].astype(_NP_LE[bits_dtype].newbyteorder("="))
    t = torch.from_numpy(arr)
    if wire == torch.bool:
        if bool((t > 1).any()):
            raise CodecError("bool values must be 0 or 1")
        return t.to(torch.bool)
    return t.view(wire)


def _decode_rice(index: np.ndarray, info: BlobInfo) -> np.ndarray:
    """Kept positions from the two Rice streams, whose lengths :func:`inspect` has bounded."""
    nnz, k = info.nnz, info.k
    if nnz == 0:
        return np.zeros(0, dtype=np.int64)
    unary_len = len(index) - -(-nnz * k // 8)
    unary, rem = index[:unary_len], index[unary_len:]
    bits = np.unpackbits(unary)
    if (count := np.count_nonzero(bits)) != nnz:
        raise CodecError(f"rice stream holds {count} positions, header says nnz={nnz}")
    ones = np.flatnonzero(bits)
    if ones[-1] // 8 != unary_len - 1:
        raise CodecError("rice unary stream has trailing bytes (truncated or corrupt blob)")
    gaps = np.diff(ones, prepend=-1) - 1
    if k:
        rbits = np.unpackbits(rem)
        if rbits[nnz * k:].any():
            raise CodecError("rice remainder stream has non-zero padding")
        weights = np.left_shift(1, np.arange(k - 1, -1, -1, dtype=np.int64))
        gaps = (gaps << k) | (rbits[: nnz * k].reshape(nnz, k).astype(np.int64) @ weights)
    positions = np.cumsum(gaps + 1) - 1
    if positions[-1] >= info.numel:
        raise CodecError(f"rice position {positions[-1]} out of range for numel={info.numel}")
    return positions


def decode(blob, mask=None, *, shape: tuple[int, ...] | None = None,
           expect_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a blob from :func:`encode` into a CPU tensor of the original shape and dtype.

    ``mask`` is required for the ``values`` encoding; for the others it is optional and, when
    given, must match the shape (and for ``bitmask``/``rice`` the positions) carried in the blob.
    ``shape`` and ``expect_dtype``, when given, must equal the header's; like every check of the
    header against the blob's length (:func:`inspect`), they are made before anything is
    allocated, so decoding needs O(``len(blob)`` + ``numel`` of ``shape``) memory. Without
    ``shape`` the header's shape is trusted: an all-zero tensor of any size is a valid 12-byte
    ``rice`` blob. Raises :class:`CodecError` on any inconsistency. There is no checksum: a flipped
    bit inside the values goes unnoticed (transport integrity is the transport's job).
    """
    return _decode(blob, mask, shape, expect_dtype)[0]


def decode_with_mask(blob, mask=None, *, shape: tuple[int, ...] | None = None,
                     expect_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`decode`, plus the mask the blob carries: its kept positions for ``bitmask`` and
    ``rice``, ``mask`` itself for ``values``, ``None`` for ``dense`` (which carries no mask)."""
    out, positions = _decode(blob, mask, shape, expect_dtype)
    if positions is None:
        return out, None
    carried = torch.zeros(out.numel(), dtype=torch.bool)
    carried[positions] = True
    return out, carried.reshape(out.shape)


def _decode(blob, mask, shape, expect_dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    buf = _as_buffer(blob)
    info = inspect(buf, shape=shape, expect_dtype=expect_dtype)
    shape, numel, nnz, wire = info.shape, info.numel, info.nnz, info.wire_dtype
    flat_mask = _check_mask(mask, shape, CodecError) if mask is not None else None
    values_at = len(buf) - info.value_bytes
    index, values = buf[values_at - info.index_bytes:values_at], buf[values_at:]
    if info.encoding == "dense":
        out = _read_values(values, numel, wire).to(info.dtype)
        if flat_mask is not None:
            out = out.masked_fill(~flat_mask, 0)
        return out.reshape(shape), None
    if info.encoding == "values":
        if flat_mask is None:
            raise CodecError("the 'values' encoding needs the receiver's mask to decode")
        positions = torch.nonzero(flat_mask).reshape(-1)
        if len(positions) != nnz:
            raise CodecError(f"mask keeps {len(positions)} positions, blob carries {nnz} values")
    else:
        if info.encoding == "bitmask":
            bits = np.unpackbits(index)
            if bits[numel:].any():
                raise CodecError("bitmask has non-zero padding bits")
            pos = np.flatnonzero(bits[:numel])
            if len(pos) != nnz:
                raise CodecError(f"bitmask keeps {len(pos)} positions, header says nnz={nnz}")
        else:
            pos = _decode_rice(index, info)
        positions = torch.from_numpy(pos.astype(np.int64))
        if flat_mask is not None:
            given = torch.nonzero(flat_mask).reshape(-1)
            if not torch.equal(given, positions):
                raise CodecError("the given mask differs from the mask carried in the blob")
    out = torch.zeros(numel, dtype=info.dtype)
    out[positions] = True if info.dtype == torch.bool else _read_values(values, nnz, wire).to(info.dtype)
    return out.reshape(shape), positions


def encode_mask(mask) -> bytes:
    """A bool mask as its kept positions only: the smaller of a bitmask and Rice-coded gaps."""
    mask = _as_tensor(mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    plan = _plan(mask, None, "float32")
    return _write(plan, min(("bitmask", "rice"), key=plan.payload_size))


def decode_mask(blob, *, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The bool mask of a blob from :func:`encode_mask` (checked like :func:`decode`)."""
    info = inspect(blob, shape=shape, expect_dtype=torch.bool)
    if info.encoding not in ("bitmask", "rice"):
        raise CodecError(f"a mask blob must be 'bitmask' or 'rice', got {info.encoding!r}")
    return decode(blob, shape=shape, expect_dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# dicts of tensors and measurements


def encode_tensors(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None,
                   *, receiver_has_mask: bool = False, **kwargs) -> dict[str, bytes]:
    """:func:`encode` each tensor with its mask (``masks`` may leave names out).

    ``receiver_has_mask`` applies to the tensors that have a mask in ``masks``.
    """
    masks = masks or {}
    unknown = set(masks) - set(tensors)
    if unknown:
        raise ValueError(f"masks for unknown tensors: {sorted(unknown)}")
    return {name: encode(t, masks.get(name), receiver_has_mask=receiver_has_mask and name in masks,
                         **kwargs)
            for name, t in tensors.items()}


def decode_tensors(blobs: Mapping[str, bytes], masks: Mapping[str, torch.Tensor] | None = None,
                   shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """:func:`decode` each blob with its mask (needed for blobs encoded as ``values``) and its
    expected shape, if given. Errors name the tensor."""
    masks, shapes = masks or {}, shapes or {}
    out = {}
    for name, blob in blobs.items():
        try:
            out[name] = decode(blob, masks.get(name), shape=shapes.get(name))
        except CodecError as e:
            raise CodecError(f"{name}: {e}") from None
    return out


def encoded_bits_per_param(tensors, masks=None, **kwargs) -> float:
    """Encoded bits (headers included) per parameter for one tensor or a dict of tensors.

    Keyword arguments go to :func:`encode`.
    """
    if isinstance(tensors, Mapping):
        blobs = encode_tensors(tensors, masks, **kwargs)
        numel = sum(_as_tensor(t).numel() for t in tensors.values())
        nbytes = sum(len(b) for b in blobs.values())
    else:
        numel, nbytes = _as_tensor(tensors).numel(), len(encode(tensors, masks, **kwargs))
    if numel == 0:
        raise ValueError("no parameters to measure")
    return 8.0 * nbytes / numel
