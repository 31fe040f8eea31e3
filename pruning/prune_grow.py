"""FedTiny's progressive pruning (Huang et al., ICDCS 2023): which layers adjust in which round, the
clients' memory-bounded top-K gradients, and the server's prune-and-grow.

* :func:`layers_to_adjust`: adjustments fall every ``delta`` rounds up to ``t_end`` and cover all
  masked tensors (``entire``) or one block, cycled deepest first (``block``, :func:`blocks`);
  ``layer`` adjusts one tensor per round, every round up to ``t_end``, deepest first.
* :func:`adjust_counts`: ``n_l = ceil(rate * nnz_l)`` for a rate decayed by
  :func:`~pruning.schedules.cosine_decay`.
* :func:`topk_at_pruned`: a client's ``n`` largest-``|g|`` gradient entries at the positions its
  mask prunes, from a gradient produced chunk by chunk, holding ``O(n + chunk)`` values.
* :func:`mean_sparse`: the server's example-weighted mean of the clients' top-K lists (an entry a
  client did not send counts as 0 for it).
* :func:`prune_and_grow`: per tensor, drop the ``k`` smallest-``|w|`` kept weights and grow the
  ``k`` pruned positions of largest averaged ``|g|``, so the tensor's density is unchanged.

Ties are broken by position (the lower flat index first), so every choice is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["GRANULARITIES", "adjust_counts", "blocks", "layers_to_adjust", "mean_sparse", "prune_and_grow",
           "topk_at_pruned"]

GRANULARITIES = ("entire", "block", "layer")


def blocks(names: Sequence[str]) -> list[list[str]]:
    """Masked tensors grouped into blocks, in model order: by their top-level module when they sit
    at least two modules deep (``layer2.0.conv1.weight`` -> ``layer2``, ``features.4.weight`` ->
    ``features``); a top-level layer's tensor (``fc.weight``) joins the block before it (the first
    one joins the block after it), as the authors' ResNet blocks put the classifier with the last
    stage."""
    groups: list[tuple[str | None, list[str]]] = []
    for name in names:
        parts = name.split(".")
        key = parts[0] if len(parts) >= 3 else None
        if groups and (key is None or groups[-1][0] == key):
            groups[-1][1].append(name)
        elif key is None:
            groups.append((None, [name]))
        else:
            if groups and groups[-1][0] is None:  # leading top-level tensors join this block
                groups[-1] = (key, groups[-1][1] + [name])
            else:
                groups.append((key, [name]))
    return [members for _, members in groups]


def layers_to_adjust(server_round: int, names: Sequence[str], granularity: str, delta: int,
                     t_end: int) -> list[str]:
    """The masked tensors whose mask adjusts after ``server_round`` (empty when none does)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: got {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    if delta < 1:
        raise ValueError(f"delta must be >= 1, got {delta}")
    if not names or server_round < 1 or server_round > t_end:
        return []
    if granularity == "layer":
        return [list(names)[::-1][(server_round - 1) % len(names)]]
    if server_round % delta:
        return []
    if granularity == "entire":
        return list(names)
    deep_first = blocks(names)[::-1]
    return deep_first[(server_round // delta - 1) % len(deep_first)]


def adjust_counts(nnz: Mapping[str, int], rate: float) -> dict[str, int]:
    """``n_l = ceil(rate * nnz_l)`` positions to prune and to grow per tensor."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    return {k: math.ceil(rate * n - 1e-9) for k, n in nnz.items()}


def topk_at_pruned(chunks: Iterable[tuple[int, torch.Tensor]], kept: torch.Tensor, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` largest-``|g|`` entries of a gradient at positions outside ``kept``.

    ``chunks`` yields ``(start, g)``: the flat gradient values of positions ``start ..
    start + len(g) - 1``, in any order, each position once; ``kept`` holds the sorted flat
    positions the mask keeps. Only the best ``n`` entries so far and one chunk are held at a time.
    Returns ``(index, value)``: int64 positions in ascending order and their signed float32
    gradients (fewer than ``n`` when fewer positions are pruned).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    best_i = torch.empty(0, dtype=torch.int64)
    best_v = torch.empty(0, dtype=torch.float32)
    kept = kept.to(torch.int64)
    for start, g in chunks:
        g = g.detach().reshape(-1).to(torch.float32)
        end = start + g.numel()
        lo, hi = (int(i) for i in torch.searchsorted(kept, torch.tensor([start, end])))
        pruned = torch.ones(g.numel(), dtype=torch.bool)
        pruned[kept[lo:hi] - start] = False
        local = pruned.nonzero().squeeze(1)
        best_i = torch.cat([best_i, local + start])
        best_v = torch.cat([best_v, g[local]])
        if best_i.numel() > n:
            # position order first, then a stable sort by |g|: ties go to the lower position
            order = torch.argsort(best_i)
            best_i, best_v = best_i[order], best_v[order]
            top = torch.argsort(best_v.abs(), descending=True, stable=True)[:n]
            best_i, best_v = best_i[top], best_v[top]
    order = torch.argsort(best_i)
    return best_i[order], best_v[order]


def mean_sparse(entries: Sequence[tuple[np.ndarray, np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(index, mean)`` over the union of the entries' positions: ``sum_k w_k g_k / sum_k w_k`` with
    ``g_k = 0`` where entry k has no value. ``entries``: ``(unique positions, values, weight > 0)``."""
    if not entries:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    if any(w <= 0 for _, _, w in entries):
        raise ValueError("mean_sparse: weights must be > 0")
    index = np.unique(np.concatenate([np.asarray(i, np.int64) for i, _, _ in entries]))
    total = np.zeros(index.size, np.float64)
    for i, v, w in entries:
        total[np.searchsorted(index, i)] += float(w) * np.asarray(v, np.float64)
    return index, total / sum(float(w) for _, _, w in entries)


def prune_and_grow(weight: np.ndarray, mask: np.ndarray, grow_index: np.ndarray, grow_score: np.ndarray,
                   n: int) -> np.ndarray:
    """The tensor's new mask: its ``k`` smallest-``|weight|`` kept positions pruned and the ``k``
    positions of ``grow_index`` with the largest ``|grow_score|`` grown, ``k = min(n, kept,
    candidates with a non-zero score)``. ``grow_index`` must be unique pruned positions."""
    flat = mask.reshape(-1)
    grow_index = np.asarray(grow_index, np.int64)
    if grow_index.size and flat[grow_index].any():
        raise ValueError("prune_and_grow: grow candidates must be pruned positions")
    score = np.abs(np.asarray(grow_score, np.float64))
    active = np.flatnonzero(flat)
    k = min(int(n), active.size, int((score > 0).sum()))
    new = flat.copy()
    if k > 0:
        order = np.argsort(grow_index, kind="stable")
        grow_index, score = grow_index[order], score[order]
        new[active[np.argsort(np.abs(weight.reshape(-1)[active]), kind="stable")[:k]]] = False
        new[grow_index[np.argsort(-score, kind="stable")[:k]]] = True
    return new.reshape(mask.shape)
