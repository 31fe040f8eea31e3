"""Loaders read the official on-disk formats; a missing dataset says where we looked and what to do."""

import numpy as np
import pytest
import torch

from fedprune import data
from fedprune.data import DatasetNotFoundError, load_dataset, normalize, read_idx
from tests.conftest import write_cifar10, write_mnist


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(data, "search_roots",
                        lambda name, root=None: ([data.Path(root)] if root else []) + [tmp_path / "cache"])
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_flat_directory(tmp_path, compress):
    write_mnist(tmp_path / "flat", n_train=50, n_test=20, compress=compress)
    s = load_dataset("mnist", str(tmp_path / "flat"), download=False)
    assert s.train_x.shape == (50, 1, 28, 28) and s.train_x.dtype == torch.uint8
    assert s.test_y.shape == (20,) and s.test_y.dtype == torch.int64
    assert int(s.train_y.max()) <= 9


def test_mnist_in_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "root" / "MNIST" / "raw", n_train=30, n_test=10)
    s = load_dataset("mnist", str(tmp_path / "root"), download=False)
    assert len(s.train_x) == 30 and len(s.test_x) == 10


def test_fashion_mnist_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "root" / "FashionMNIST" / "raw", n_train=30, n_test=10, compress=False)
    assert len(load_dataset("fashion-mnist", str(tmp_path / "root"), download=False).train_x) == 30


def test_cifar10_python_batches(tmp_path):
    write_cifar10(tmp_path / "root", per_batch=12, n_test=7)
    s = load_dataset("cifar10", str(tmp_path / "root"), download=False)
    assert s.train_x.shape == (60, 3, 32, 32) and s.test_x.shape == (7, 3, 32, 32)
    x = normalize(s.train_x, s.spec)
    assert x.dtype == torch.float32 and x.shape == s.train_x.shape


def test_idx_pixels_round_trip(tmp_path):
    from tests.conftest import write_idx

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", arr, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)


def test_corrupt_idx_is_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("name, hint", [("mnist", "IDX files"), ("cifar10", "cifar-10-python.tar.gz"),
                                        ("fashion-mnist", "dataset-fashion-mnist")])
def test_missing_dataset_names_it_every_place_and_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, str(tmp_path / "mine"), download=False)
    text = str(info.value)
    assert repr(name) in text and hint in text
    assert str(tmp_path / "mine") in text and str(tmp_path / "cache") in text


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="allowed: fashion-mnist, mnist, cifar10"):
        load_dataset("svhn", download=False)
