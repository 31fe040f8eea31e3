"""Model tensors on the wire: the pruning codec carried in Flower Arrays of their own stype.

A masked tensor travels as its kept values only when the receiver already holds the mask, and
otherwise as mask + values (the smaller of a bitmask and Rice-coded gaps), so the mask is sent
exactly when the receiver lacks it. Unmasked tensors (biases, BatchNorm) go through the codec's
automatic choice. Each blob is an ``Array(dtype, shape, stype=STYPE, data=blob)``, so every Flower
transport carries it unchanged and the ledger counts its real size. Plain numpy Arrays are accepted
on the way in, so a client or test may answer without the codec.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from pruning.codec import CodecError, decode_with_mask, encode, encoding_sizes

STYPE = "fedprune.codec/1"


def _tensor(x) -> torch.Tensor:
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray makes num_batches_tracked shape (1,))
    return torch.from_numpy(np.require(x, requirements="C")) if isinstance(x, np.ndarray) else x.detach().cpu()


def pack(tensors: Mapping[str, object], masks: Mapping[str, object] | None = None, *,
         receiver_has_mask: bool = False, value_dtype: str = "float32") -> ArrayRecord:
    """Encode ``tensors`` (zeroed outside their mask, if any) into an ArrayRecord."""
    masks = masks or {}
    record = {}
    for name, value in tensors.items():
        t = _tensor(value)
        mask = masks.get(name)
        if mask is None:
            blob = encode(t, value_dtype=value_dtype)
        else:
            mask = _tensor(mask)
            if receiver_has_mask:
                blob = encode(t, mask, value_dtype=value_dtype, encoding="values")
            else:
                sizes = encoding_sizes(t, mask, value_dtype=value_dtype)
                blob = encode(t, mask, value_dtype=value_dtype,
                              encoding=min(("bitmask", "rice"), key=sizes.__getitem__))
        record[name] = Array(dtype=str(t.numpy().dtype) if t.dtype != torch.bfloat16 else "bfloat16",
                             shape=tuple(t.shape), stype=STYPE, data=blob)
    return ArrayRecord(record)


def unpack(record: ArrayRecord, masks: Mapping[str, np.ndarray] | None = None,
           shapes: Mapping[str, tuple[int, ...]] | None = None, maskable: frozenset[str] = frozenset()
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Decode an ArrayRecord into numpy arrays, and the masks its blobs carried.

    ``masks`` are the receiver's masks (needed for values-only blobs); ``shapes`` the expected
    shapes, checked before decoding; carried masks are kept only for ``maskable`` names (an
    unmasked tensor full of zeros may travel sparse, which says nothing about a mask).
    Raises :class:`CodecError` naming the tensor on bad input.
    """
    masks, shapes = masks or {}, shapes or {}
    arrays, carried = {}, {}
    for name, arr in record.items():
        try:
            if arr.stype != STYPE:
                arrays[name] = arr.numpy()
                continue
            mask = masks.get(name)
            tensor, mask_out = decode_with_mask(arr.data, None if mask is None else torch.from_numpy(mask),
                                                shape=shapes.get(name))
        except CodecError as exc:
            raise CodecError(f"{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - numpy deserialization of a plain Array
            raise CodecError(f"{name}: cannot decode ({exc})") from None
        arrays[name] = tensor.numpy()
        if mask_out is not None and mask is None and name in maskable:
            carried[name] = mask_out.numpy()
    return arrays, carried
