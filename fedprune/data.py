"""Datasets, read from local files in their official formats; downloaded only when a network is there.

Fashion-MNIST and MNIST are IDX files (``train-images-idx3-ubyte[.gz]`` ...), found flat in a
directory (the Debian package ``dataset-fashion-mnist`` puts them in
/usr/share/datasets/fashion-mnist) or under a torchvision root (``<root>/FashionMNIST/raw``).
CIFAR-10 is the python pickle batches (``<root>/cifar-10-batches-py/data_batch_1`` ...).
Images come back as uint8 tensors N x C x H x W, labels as int64.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    subdirs: tuple[str, ...]
    """Where the files sit below a root: flat, and torchvision's layout."""
    torchvision_class: str


SPECS = {
    "fashion-mnist": DatasetSpec("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,),
                                 ("", "FashionMNIST/raw", "fashion-mnist"), "FashionMNIST"),
    "mnist": DatasetSpec("mnist", 1, 28, 10, (0.1307,), (0.3081,), ("", "MNIST/raw", "mnist"), "MNIST"),
    "cifar10": DatasetSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           ("cifar-10-batches-py", ""), "CIFAR10"),
}

CACHE_DIR = Path(os.environ.get("FEDPRUNE_DATA", Path.home() / ".cache" / "fedprune" / "data"))


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a dataset and no way to download it."""


@dataclass(frozen=True)
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    spec: DatasetSpec


def search_roots(name: str, root: str | None = None) -> list[Path]:
    """Directories looked at, in order: the experiment's root, $FEDPRUNE_DATA, system places."""
    roots = [Path(root).expanduser()] if root else []
    roots.append(CACHE_DIR)
    if name == "fashion-mnist":
        roots.append(Path("/usr/share/datasets/fashion-mnist"))
    roots.append(Path("/usr/share/datasets"))
    return roots


# ---------------------------------------------------------------------------------------- IDX

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzip-compressed) as a numpy array of its declared shape."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def find_idx(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _IDX_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _load_idx(files: dict[str, Path], spec: DatasetSpec) -> Splits:
    arrays = {k: read_idx(p) for k, p in files.items()}
    return Splits(
        torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        spec,
    )


# ------------------------------------------------------------------------------------ CIFAR-10

def find_cifar(directory: Path) -> Path | None:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return directory if all((directory / n).is_file() for n in names) else None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def _load_cifar(directory: Path, spec: DatasetSpec) -> Splits:
    train = [_read_cifar_batch(directory / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _read_cifar_batch(directory / "test_batch")
    return Splits(
        torch.from_numpy(np.concatenate([x for x, _ in train])),
        torch.from_numpy(np.concatenate([y for _, y in train])),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        spec,
    )


# ------------------------------------------------------------------------------------ loading

def _find_local(spec: DatasetSpec, roots: list[Path]) -> tuple[Path | dict[str, Path] | None, list[Path]]:
    """The first local copy (a CIFAR directory, or IDX files by split), and the directories looked at."""
    looked = []
    for root in roots:
        for sub in spec.subdirs:
            directory = root / sub if sub else root
            looked.append(directory)
            found = find_cifar(directory) if spec.name == "cifar10" else find_idx(directory)
            if found:
                return found, looked
    return None, looked


def _try_local(spec: DatasetSpec, roots: list[Path]) -> tuple[Splits | None, list[Path]]:
    found, looked = _find_local(spec, roots)
    if found is None:
        return None, looked
    return (_load_cifar(found, spec) if spec.name == "cifar10" else _load_idx(found, spec)), looked


def local_files(name: str, root: str | None = None) -> list[Path]:
    """The files of the local copy :func:`load_dataset` would read (none: it would download)."""
    found, _ = _find_local(SPECS[name], search_roots(name, root))
    if isinstance(found, Path):
        return sorted(p for p in found.iterdir() if p.name.endswith("_batch") or "_batch_" in p.name)
    return sorted((found or {}).values())


def _download(spec: DatasetSpec) -> Exception | None:
    """Fetch with torchvision into CACHE_DIR; returns the error when there is no network."""
    import torchvision.datasets as tvd

    try:
        cls = getattr(tvd, spec.torchvision_class)
        for train in (True, False):
            cls(str(CACHE_DIR), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "no copy"; reported to the user
        return exc
    return None


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, root: str | None = None, download: bool = True) -> Splits:
    """The train and test splits of ``name``; cached per process."""
    if name not in SPECS:
        raise ValueError(f"dataset: got {name!r}; allowed: {', '.join(SPECS)}")
    spec = SPECS[name]
    roots = search_roots(name, root)
    splits, looked = _try_local(spec, roots)
    if splits is not None:
        return splits
    error = _download(spec) if download else None
    if download and error is None:
        splits, _ = _try_local(spec, [CACHE_DIR])
        if splits is not None:
            return splits
    how = {
        "fashion-mnist": "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
                         "IDX files (train-images-idx3-ubyte.gz ...) in one of these directories",
        "mnist": "put the four MNIST IDX files (train-images-idx3-ubyte[.gz] ...) in one of these "
                 "directories, or run once with a network so torchvision can download them",
        "cifar10": "unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
                   "into one of these directories, or run once with a network",
    }[name]
    places = "\n  ".join(str(p) for p in looked)
    reason = f"\ndownload failed: {error}" if error else ""
    raise DatasetNotFoundError(
        f"dataset {name!r}: no local copy found. Looked in:\n  {places}\nTo get it: {how} "
        f"(set dataset.root in the experiment or $FEDPRUNE_DATA to use another directory).{reason}"
    )


def normalize(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 images -> float32, standardized per channel."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - mean) / std
