"""Every random choice of a run derives from the run seed and the place it is made."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for ``parts`` (e.g. ``"train", round, partition_id``) under ``seed``.

    Stable across processes and Python versions (no ``hash()``), so a node rebuilds the same
    stream whichever process serves its message.
    """
    text = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def numpy_rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))


def torch_generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
