"""Writers of small fake datasets in torchvision's exact on-disk formats.

The files are read by the real torchvision dataset classes, so tests exercise the same code path as real data.
Pixels are random uint8 values and labels random classes; every writer returns what it wrote so tests can check
that a batch element is exactly the image and label stored at the corresponding position of the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
from torchvision import datasets


@dataclass(frozen=True)
class FakeDataset:
    """What a writer put on disk.

    Attributes:
        kind: ``"cifar10"``, ``"cifar100"``, ``"mnist"`` or ``"svhn"``.
        folder: Folder holding the files.
        train_images: uint8 (N, C, H, W) training images, in file order.
        train_labels: int64 (N,) training labels (SVHN: digit 0 as 0, as torchvision returns it).
        test_images: uint8 (M, C, H, W) test images.
        test_labels: int64 (M,) test labels.
        md5: File name -> md5 hex digest of each written file.
    """

    kind: str
    folder: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    md5: dict[str, str] = field(default_factory=dict)

    def images(self, train: bool) -> np.ndarray:
        """Returns the training or test images."""
        return self.train_images if train else self.test_images

    def labels(self, train: bool) -> np.ndarray:
        """Returns the training or test labels."""
        return self.train_labels if train else self.test_labels


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _random_split(rng: np.random.Generator, n: int, shape: tuple[int, ...], num_classes: int) -> tuple[Any, Any]:
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    return images, labels


def _pickle(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    # CIFAR rows are the 1024 red, then green, then blue values of a 32x32 image, i.e. a flattened CHW image.
    return np.ascontiguousarray(images.reshape(images.shape[0], 3 * 32 * 32))


def write_fake_cifar10(root: str | os.PathLike, n_train: int = 90, n_test: int = 30, seed: int = 0) -> FakeDataset:
    """Writes ``<root>/cifar-10-batches-py`` with ``data_batch_1..5``, ``test_batch`` and ``batches.meta``.

    Args:
        root: Dataset root (what the datamodule gets as ``root``).
        n_train: Training images, spread over the five batch files.
        n_test: Test images.
        seed: Seed of the random pixels and labels.

    Returns:
        The written data.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = _random_split(rng, n_train, (3, 32, 32), 10)
    test_images, test_labels = _random_split(rng, n_test, (3, 32, 32), 10)
    for number, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _pickle(
            folder / f"data_batch_{number}",
            {
                "batch_label": f"training batch {number} of 5",
                "labels": train_labels[chunk].tolist(),
                "data": _cifar_rows(train_images[chunk]),
                "filenames": [f"train_{i}.png" for i in chunk],
            },
        )
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels.tolist(),
            "data": _cifar_rows(test_images),
            "filenames": [f"test_{i}.png" for i in range(n_test)],
        },
    )
    label_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"num_cases_per_batch": 10000, "label_names": label_names, "num_vis": 3072})
    md5 = {path.name: _md5(path) for path in folder.iterdir()}
    return FakeDataset("cifar10", folder, train_images, train_labels, test_images, test_labels, md5)


def write_fake_cifar100(root: str | os.PathLike, n_train: int = 90, n_test: int = 30, seed: int = 0) -> FakeDataset:
    """Writes ``<root>/cifar-100-python`` with ``train``, ``test`` and ``meta``.

    Args:
        root: Dataset root.
        n_train: Training images.
        n_test: Test images.
        seed: Seed of the random pixels and labels.

    Returns:
        The written data (labels are the fine labels).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = _random_split(rng, n_train, (3, 32, 32), 100)
    test_images, test_labels = _random_split(rng, n_test, (3, 32, 32), 100)
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        _pickle(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": _cifar_rows(images),
            },
        )
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    md5 = {path.name: _md5(path) for path in folder.iterdir()}
    return FakeDataset("cifar100", folder, train_images, train_labels, test_images, test_labels, md5)


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX header: two zero bytes, the type code (0x08 = uint8), the number of dimensions, then big-endian int32 sizes.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_mnist(root: str | os.PathLike, n_train: int = 90, n_test: int = 30, seed: int = 0) -> FakeDataset:
    """Writes the four uncompressed idx-ubyte files under ``<root>/MNIST/raw``.

    Args:
        root: Dataset root.
        n_train: Training images.
        n_test: Test images.
        seed: Seed of the random pixels and labels.

    Returns:
        The written data, images as (N, 1, 28, 28).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = _random_split(rng, n_train, (1, 28, 28), 10)
    test_images, test_labels = _random_split(rng, n_test, (1, 28, 28), 10)
    for prefix, images, labels in (("train", train_images, train_labels), ("t10k", test_images, test_labels)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images[:, 0])
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    md5 = {path.name: _md5(path) for path in folder.iterdir()}
    return FakeDataset("mnist", folder, train_images, train_labels, test_images, test_labels, md5)


def write_fake_svhn(root: str | os.PathLike, n_train: int = 90, n_test: int = 30, seed: int = 0) -> FakeDataset:
    """Writes ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``.

    The files hold ``X`` of shape (32, 32, 3, N) and ``y`` of shape (N, 1) with label 10 standing for digit 0, as
    in the real files.

    Args:
        root: Dataset root.
        n_train: Training images.
        n_test: Test images.
        seed: Seed of the random pixels and labels.

    Returns:
        The written data, with labels as torchvision returns them (digit 0 as 0).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = _random_split(rng, n_train, (3, 32, 32), 10)
    test_images, test_labels = _random_split(rng, n_test, (3, 32, 32), 10)
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        file_labels = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": file_labels})
    md5 = {name: _md5(folder / name) for name in ("train_32x32.mat", "test_32x32.mat")}
    return FakeDataset("svhn", folder, train_images, train_labels, test_images, test_labels, md5)


WRITERS = {
    "cifar10": write_fake_cifar10,
    "cifar100": write_fake_cifar100,
    "mnist": write_fake_mnist,
    "svhn": write_fake_svhn,
}


def accept_fake_checksums(monkeypatch: pytest.MonkeyPatch, fake: FakeDataset) -> None:
    """Makes torchvision's integrity checks accept ``fake``'s files, for the duration of one test.

    torchvision 0.29 compares the md5 of every CIFAR file (``train_list``, ``test_list`` and ``meta``) and of the
    SVHN ``.mat`` files (``split_list``) with hard-coded digests of the real files; MNIST's raw files are only checked
    for existence. We patch those class attributes (with ``monkeypatch``, so they are restored after the test) rather
    than subclassing, so the datamodules run against the unmodified torchvision classes they use in production.

    Args:
        monkeypatch: The test's monkeypatch fixture.
        fake: What the writer returned.
    """
    if fake.kind in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if fake.kind == "cifar10" else datasets.CIFAR100
        monkeypatch.setattr(cls, "train_list", [[name, fake.md5[name]] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, fake.md5[name]] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": fake.md5[cls.meta["filename"]]})
    elif fake.kind == "svhn":
        split_list = {
            split: [url, name, fake.md5.get(name, md5)] for split, (url, name, md5) in datasets.SVHN.split_list.items()
        }
        monkeypatch.setattr(datasets.SVHN, "split_list", split_list)


def checksums_sitecustomize(fake: FakeDataset) -> str:
    """The source of a ``sitecustomize.py`` doing what :func:`accept_fake_checksums` does, for a subprocess (``python
    -m advtrain ...``), which no monkeypatch reaches: see :func:`helpers.sitecustomize_env`."""
    if fake.kind not in ("cifar10", "cifar100"):
        raise ValueError(f"checksums_sitecustomize covers the CIFAR datasets, not {fake.kind}")
    cls = "CIFAR10" if fake.kind == "cifar10" else "CIFAR100"
    return f"""from torchvision import datasets

md5 = {fake.md5!r}
cls = datasets.{cls}
cls.train_list = [[name, md5[name]] for name, _ in cls.train_list]
cls.test_list = [[name, md5[name]] for name, _ in cls.test_list]
cls.meta = {{**cls.meta, "md5": md5[cls.meta["filename"]]}}
"""


def write_fake_extra_data(
    path: str | os.PathLike,
    n: int = 20,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Writes an extra-data ``.npz`` in the DM-Improves-AT / Rebuffi et al. format: ``image`` uint8 N×H×W×C and
    ``label`` int64 (N,). Returns ``(images, labels)``."""
    rng = np.random.default_rng(seed)
    channels, height, width = image_shape
    images = rng.integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(np.int64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=images, label=labels)
    return images, labels
