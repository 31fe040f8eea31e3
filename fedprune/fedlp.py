"""FedLP's pure pieces, shared by the strategy and the ClientApp (no Flower import).

FedLP (Zhu et al., ICC 2023) prunes whole layers:

* **Homo**: every client trains the full model and uploads each *unit* with probability ``p``
  (the layer-preserving rate); the server averages each unit over the clients that sent it.
  A unit is one state-dict entry (``unit="tensor"``, the authors' code: weight, bias and each
  BatchNorm buffer decided independently) or one module with all its entries
  (``unit="module"``: a conv's weight and bias together, a BatchNorm with its running stats).
* **Hetero**: client k holds a depth level ``c_k`` in 1..5 for the whole run, drawn from a
  preference distribution; it trains the first ``c_k + 1`` conv layers of the shared trunk plus a
  private head (:class:`fedprune.models.FedLPCNN`), and exchanges only the trunk. The head starts
  every round from its initial value, as in the authors' code, unless ``fedlp.keep_head`` keeps
  the trained one (client_app/fedlp.py).

Every draw derives from the run seed, so the server recomputes what each client does from the
partition id it learned through ``query.describe``: levels from ``(seed, "fedlp-level",
partition_id)``, keep decisions from ``(seed, "fedlp-keep", round, partition_id)``, private heads'
initial values from ``(seed, "fedlp-head", partition_id)``.

The communication model (:func:`homo_params_per_client_round`,
:func:`hetero_params_per_client_round`) counts parameters exchanged per client and round, down +
up, as the paper's table does (BatchNorm buffers excluded unless asked for).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from torch import nn

from fedprune.models import FEDLP_LEVELS, PRIVATE_PREFIX, FedLPCNN
from fedprune.seeding import numpy_rng

UNITS = ("tensor", "module")


# ------------------------------------------------------------------------------ Hetero levels

def preference_probs(preferred_level: int | None, weight: float = 0.6) -> tuple[float, ...]:
    """P(level = 1..5): the preferred level gets ``weight``, the others share the rest equally;
    ``None`` is the uniform distribution (the paper's "Hetero(u)").

    The authors' flag f: ``P(c=f) = 0.6``, the others 0.1 each.
    """
    n = len(FEDLP_LEVELS)
    if preferred_level is None:
        return tuple(1.0 / n for _ in FEDLP_LEVELS)
    if preferred_level not in FEDLP_LEVELS:
        raise ValueError(f"fedlp.preferred_level: got {preferred_level!r}; allowed: 1..5 or null (uniform)")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fedlp.preference_weight: got {weight!r}; allowed: 0..1")
    rest = (1.0 - weight) / (n - 1)
    return tuple(weight if c == preferred_level else rest for c in FEDLP_LEVELS)


def draw_level(seed: int, partition_id: int, probs: Sequence[float]) -> int:
    """The fixed depth level of one client, from ``numpy_rng(seed, "fedlp-level", partition_id)``."""
    return int(numpy_rng(seed, "fedlp-level", partition_id).choice(FEDLP_LEVELS, p=np.asarray(probs)))


def shared_keys(model: nn.Module) -> list[str]:
    """A FedLP sub-model's state-dict entries that are exchanged (everything but the private head)."""
    return [k for k in model.state_dict() if not k.startswith(PRIVATE_PREFIX)]


def private_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if k.startswith(PRIVATE_PREFIX)]


# ------------------------------------------------------------------------------ Homo keep draws

def units(keys: Iterable[str], unit: str) -> list[list[str]]:
    """State-dict keys grouped into FedLP's layer units, in key order."""
    keys = list(keys)
    if unit == "tensor":
        return [[k] for k in keys]
    if unit == "module":
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(k.rpartition(".")[0], []).append(k)
        return list(groups.values())
    raise ValueError(f"fedlp.unit: got {unit!r}; allowed: {', '.join(UNITS)}")


def kept_keys(seed: int, server_round: int, partition_id: int, keys: Iterable[str], p: float,
              unit: str = "tensor") -> list[str]:
    """The keys one client uploads in one round: each unit independently with probability ``p``.

    Drawn from ``numpy_rng(seed, "fedlp-keep", server_round, partition_id)``, one uniform number
    per unit in key order, so the server and the client get the same answer.
    """
    groups = units(keys, unit)
    keep = numpy_rng(seed, "fedlp-keep", server_round, partition_id).random(len(groups)) < p
    return [k for group, kept in zip(groups, keep) if kept for k in group]


# ------------------------------------------------------------------------------ communication model

def entry_counts(model: nn.Module, include_buffers: bool = False) -> dict[str, int]:
    """Elements per state-dict entry; parameters only unless ``include_buffers`` (BatchNorm's
    running statistics and ``num_batches_tracked``)."""
    params = dict(model.named_parameters())
    return {k: v.numel() for k, v in model.state_dict().items() if include_buffers or k in params}


def level_shared_params(in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                        include_buffers: bool = False) -> dict[int, int]:
    """Shared (exchanged) elements of each level's sub-model of the FedLP CNN."""
    out = {}
    for level in FEDLP_LEVELS:
        model = FedLPCNN(in_channels, num_classes, image_size, level)
        counts = entry_counts(model, include_buffers)
        out[level] = sum(n for k, n in counts.items() if not k.startswith(PRIVATE_PREFIX))
    return out


def homo_params_per_client_round(model: nn.Module, p: float, include_buffers: bool = False) -> float:
    """Expected elements a FedLP-Homo client exchanges per round: the full model down, a share
    ``p`` of it up (the expectation of the per-unit Bernoulli draws)."""
    total = sum(entry_counts(model, include_buffers).values())
    return total * (1.0 + p)


def hetero_params_per_client_round(shared_by_level: Mapping[int, int], probs: Sequence[float]) -> float:
    """Expected elements a FedLP-Hetero client exchanges per round: its level's shared part down
    and up, averaged over the level distribution: ``2 * sum_c P(c) * shared(c)``."""
    return 2.0 * sum(q * shared_by_level[c] for c, q in zip(FEDLP_LEVELS, probs))
