"""Shared test helpers: small datasets written in their real on-disk formats, contexts, messages."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.inprocess import make_context  # noqa: F401 - re-exported for the tests


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An IDX file of unsigned bytes, as MNIST ships them."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist(directory: Path, n_train: int = 600, n_test: int = 200, compress: bool = True,
                seed: int = 0) -> Path:
    """A small learnable MNIST-format dataset: class k draws a bright k-th row band, plus noise."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4: 2 * k + 7, :] = 230
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return directory


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with pickled batches in the official python format."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(directory / name, "wb") as fh:
            pickle.dump(batch, fh)
    return directory


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def tiny_run_config(tiny_mnist) -> dict:
    """A run config for a fast experiment on the tiny MNIST files."""
    return {
        "experiment": "configs/fedavg.yaml", "num-server-rounds": 2, "seed": 7, "run-name": "", "output-dir": "",
        "overrides": f"dataset.name=mnist dataset.root={tiny_mnist} partition.scheme=iid client.batch_size=16",
    }


@pytest.fixture(autouse=True)
def _task_identity():
    """Instruction Messages can only be built when a task identity is set (flower-api.md, gotcha 12)."""
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    yield


