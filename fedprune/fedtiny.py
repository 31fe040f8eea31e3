"""What FedTiny's server and clients share (strategies/fedtiny.py, client_app/fedtiny.py): the
server's few labelled training images, the clients' data without them, and FedTiny's record,
config and metric keys.

The server warms up on ``fedtiny.server_shots`` images per class of the TRAIN split (the authors'
code takes them from the test split). They are drawn from the partition seed, so the server and
every client agree on them without a message, and no client trains, recalibrates or validates on
them: each client's train and validation splits are its partition's splits minus these images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fedprune.data import load_dataset, normalize
from fedprune.experiment import ClientConfig, DatasetConfig, PartitionConfig
from fedprune.partition import client_indices
from fedprune.seeding import numpy_rng
from pruning.accounting import MemoryReport, training_step_memory

# record keys of the ABNS phases: candidate i's mask (server -> node), its BatchNorm statistics
# (node -> server in bn_stats, the aggregate server -> node in candidate_loss)
CANDIDATE, BN = "candidate-{}", "bn-{}"
# config keys (server -> node)
NUM_CANDIDATES = "fedtiny-candidates"
TOPK_LAYERS, TOPK_COUNTS = "fedtiny-topk-layers", "fedtiny-topk-counts"
# metric keys (node -> server)
CANDIDATE_LOSSES = "candidate-losses"
# the top-K reply: per layer its positions (int32) and gradients (float32)
INDEX, GRAD = "{}:index", "{}:grad"


def server_shot_indices(labels: np.ndarray, partition_seed: int, shots: int) -> np.ndarray:
    """Sorted indices of ``shots`` training samples of every class (all of a smaller class), drawn
    from ``numpy_rng(partition_seed, "fedtiny-server-shots")``."""
    rng = numpy_rng(partition_seed, "fedtiny-server-shots")
    chosen = [rng.choice(idx, size=min(shots, idx.size), replace=False)
              for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(chosen))


@functools.lru_cache(maxsize=2)
def server_shots(dataset: DatasetConfig, partition: PartitionConfig, shots: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's warm-up images (normalized) and labels."""
    splits = load_dataset(dataset.name, dataset.root)
    idx = torch.from_numpy(server_shot_indices(splits.train_y.numpy(), partition.seed, shots))
    return normalize(splits.train_x[idx], splits.spec), splits.train_y[idx]


@functools.lru_cache(maxsize=4)
def client_data(dataset: DatasetConfig, partition: PartitionConfig, shots: int, partition_id: int,
                num_partitions: int):
    """(train_x, train_y, val_x, val_y) of one client without the server's images; cached per process."""
    splits = load_dataset(dataset.name, dataset.root)
    labels = splits.train_y.numpy()
    held = server_shot_indices(labels, partition.seed, shots)
    out = []
    for idx in client_indices(labels, partition, partition_id, num_partitions):
        keep = torch.from_numpy(np.setdiff1d(idx, held))
        out += [normalize(splits.train_x[keep], splits.spec), splits.train_y[keep]]
    return tuple(out)


def step_memory(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, client: ClientConfig) -> MemoryReport:
    """One training step of ``model`` on the first batch of ``x``, measured with the optimizer rule
    client_app.node.training_costs uses for every method (Adam for ``adam``, else SGD with momentum).

    The batch is copied first: a slice of the node's data shares its storage, which the
    measurement would count whole."""
    factory = None if client.optimizer == "sgd" else (lambda params: torch.optim.Adam(params, lr=client.lr))
    batch = (x[: client.batch_size].clone(), y[: client.batch_size].clone())
    return training_step_memory(model, torch.nn.functional.cross_entropy, batch, optimizer_factory=factory)
