"""Common machinery of the advtrain datamodules.

Every datamodule yields batches ``(x, y, index)``: ``x`` float32 images in [0, 1] of shape (B, C, H, W), ``y`` int64
class labels and ``index`` int64 positions of the samples inside their split. Training methods keep per-example state
(e.g. perturbations carried across epochs) keyed by ``index``, so the index of a training sample must not depend on
the epoch, the shuffling or the worker that loaded it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from advtrain.errors import InvalidConfigError, InvalidInputError, UserError

__all__ = [
    "AdvDataModule",
    "DatasetNotFoundError",
    "IndexedSubset",
    "seeded_split",
    "stratified_permutation",
    "take_train_subset",
]

logger = logging.getLogger(__name__)


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The files of a dataset are not on disk and could not be downloaded.

    Args:
        message: Human-readable explanation; it names the dataset, the folder searched, the files expected there and
            how to obtain them.
        dataset: Display name of the dataset, e.g. ``"CIFAR-10"``.
        folder: Absolute path of the folder that was searched.
        expected_files: Names of the files expected inside ``folder``.
    """

    def __init__(
        self,
        message: str,
        *,
        dataset: str | None = None,
        folder: str | None = None,
        expected_files: Sequence[str] = (),
    ) -> None:
        # Only the message goes to OSError: with more positional arguments it would reformat str(err) as
        # "[Errno ...]" and the actionable text would be lost.
        super().__init__(message)
        self.dataset = dataset
        self.folder = folder
        self.expected_files = tuple(expected_files)


class IndexedSubset(Dataset):
    """A view of ``dataset`` restricted to ``indices`` that also returns each sample's position in the view.

    Args:
        dataset: Map-style dataset returning ``(image, label)`` pairs.
        indices: Positions in ``dataset`` that make up this split, in split order.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | torch.Tensor) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.int64).clone()

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        """Returns the sample at position ``index`` of the split.

        Args:
            index: Position in the split, in ``[0, len(self))``.

        Returns:
            ``(image, label, index)``; the default collate turns the two ints into int64 tensors.
        """
        image, label = self.dataset[int(self.indices[index])]
        return image, _class_index(label, self.dataset, int(self.indices[index])), int(index)


def _class_index(label: Any, dataset: Dataset, position: int) -> int:
    """A sample's label as an int, refusing what ``int()`` would silently truncate (2.7 -> 2) or misread."""
    if isinstance(label, torch.Tensor):
        if label.numel() != 1 or torch.is_floating_point(label) or label.dtype == torch.bool:
            raise InvalidInputError(_label_message(label, dataset, position))
        return int(label)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise InvalidInputError(_label_message(label, dataset, position))
    return int(label)


def _label_message(label: Any, dataset: Dataset, position: int) -> str:
    return (
        f"{type(dataset).__name__}[{position}] has label {label!r} ({type(label).__name__}): labels must be integer "
        "class indices (0, 1, ..., num_classes - 1). Convert them in the dataset (e.g. int(round(y)) if they are "
        "whole numbers stored as floats)."
    )


def _run_seed() -> int:
    """The seed ``seed_everything`` set for this run (Lightning exports it as ``PL_GLOBAL_SEED``), else 0."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None and value.lstrip("-").isdigit() else 0


def seeded_split(
    num_samples: int, *, val_size: int, seed: int, train_subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits ``range(num_samples)`` into training and validation indices with a seeded permutation.

    The first ``val_size`` entries of the permutation form the validation split and the rest the training split, of
    which only the first ``train_subset`` entries are kept when it is given.

    Args:
        num_samples: Size of the set being split.
        val_size: Number of samples held out for validation (may be 0).
        seed: Seed of the permutation.
        train_subset: If given, keep only this many training samples.

    Returns:
        ``(train_indices, val_indices)`` as int64 tensors.

    Raises:
        ValueError: If a size is negative or the training split would be empty or larger than what is available.
    """
    if val_size < 0:
        raise InvalidConfigError(f"val_size must be >= 0, got {val_size}")
    if val_size >= num_samples:
        raise InvalidConfigError(
            f"val_size={val_size} leaves no training samples: the training set has {num_samples} samples, "
            f"so val_size must be < {num_samples}"
        )
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(num_samples, generator=generator)
    val_indices, train_indices = permutation[:val_size], permutation[val_size:]
    return take_train_subset(train_indices, train_subset, val_size=val_size), val_indices


def take_train_subset(train_indices: torch.Tensor, train_subset: int | None, *, val_size: int) -> torch.Tensor:
    """Keeps the first ``train_subset`` training indices (all of them when it is None).

    Args:
        train_indices: Training indices in permutation order.
        train_subset: Number of indices to keep, or None.
        val_size: Size of the held-out validation split, only quoted in the error message.

    Returns:
        The kept indices.

    Raises:
        ValueError: If ``train_subset`` is not positive or exceeds the available indices.
    """
    if train_subset is None:
        return train_indices
    _check_train_subset(train_subset)
    if train_subset > train_indices.numel():
        raise InvalidConfigError(
            f"train_subset={train_subset} exceeds the {train_indices.numel()} training samples left after holding out "
            f"val_size={val_size}; use train_subset <= {train_indices.numel()} or train_subset: null for all"
        )
    return train_indices[:train_subset]


def _check_train_subset(train_subset: int | None) -> None:
    if train_subset is not None and train_subset <= 0:
        raise InvalidConfigError(
            f"train_subset={train_subset} would make the training set empty; use a positive size or null for all"
        )


def stratified_permutation(labels: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Returns a random permutation whose every prefix is class-balanced.

    Each class's samples are shuffled and spread evenly over [0, 1) with a random phase; sorting by that position
    interleaves the classes, so in any prefix the fraction taken of each class is the same for all classes to within
    one sample of that class (with equal class sizes, a prefix whose length is a multiple of the number of classes is
    exactly balanced). Splitting the permutation into consecutive chunks therefore gives stratified splits.

    Args:
        labels: 1-D integer tensor of class labels.
        generator: Source of randomness.

    Returns:
        int64 tensor, a permutation of ``range(len(labels))``.
    """
    labels = torch.as_tensor(labels).flatten()
    keys = torch.empty(labels.numel(), dtype=torch.float64)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        phase = torch.rand((), generator=generator, dtype=torch.float64)
        keys[members] = (torch.arange(members.numel(), dtype=torch.float64) + phase) / members.numel()
    return torch.argsort(keys, stable=True)


class AdvDataModule(pl.LightningDataModule):
    """Base class of the advtrain datamodules.

    Subclasses set the class attributes below, which are readable before ``setup`` (the CLI links them into the
    model at instantiation), and implement :meth:`_load_train_pool` and :meth:`_load_test_set`. Normalisation is
    deliberately left to the model (with ``mean``/``std``): attacks must operate in [0, 1] pixel space.

    Args:
        root: Folder holding the datasets.
        batch_size: Training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes (kept alive across epochs, ``persistent_workers``).
        val_size: Number of training samples held out (with a seeded permutation) for validation. With 0 there is
            no validation split and ``val_dataloader`` serves the test set.
        seed: Seed of the train/validation split and of the training loader's shuffling. Default: the seed of
            ``seed_everything`` (the CLI's ``--seed_everything``, read from ``PL_GLOBAL_SEED``), else 0.
        download: Whether ``prepare_data`` may download missing files.
        augment: Whether to augment training images (datasets without augmentations ignore it).
        pin_memory: Whether the DataLoaders put batches in page-locked memory. ``None`` (default): when the trainer
            runs on a CUDA device. Lightning moves batches with ``non_blocking=True``; from pinned memory that copy
            is asynchronous and overlaps the previous step's kernels, from pageable memory the host copies it first.
        train_subset: If given, train on only the first ``train_subset`` samples of the seeded training permutation
            (for quick runs).
        extra_data: an ``.npz`` file of extra (generated or pseudo-labelled) training images, ``image`` uint8
            N×H×W×C and ``label`` (the format of the DM-Improves-AT / Rebuffi et al. files): every training batch then
            holds ``int(batch_size · extra_fraction)`` of them and original images for the rest, ``ceil(N_train /
            batch_size)`` batches an epoch (:mod:`advtrain.data.extra`). Checked against the dataset when the
            datamodule is built (keys, dtype, shape) and when training starts (labels).
        extra_fraction: the share of extra images in every training batch, in (0, 1) (0.7 in Wang et al. 2023, 0.3
            in Rebuffi et al. 2021); ignored without ``extra_data``.
    """

    name: ClassVar[str]
    num_classes: ClassVar[int]
    image_shape: ClassVar[tuple[int, int, int]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]

    def __init__(
        self,
        *,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_size: int = 1000,
        seed: int | None = None,
        download: bool = True,
        augment: bool = True,
        pin_memory: bool | None = None,
        train_subset: int | None = None,
        extra_data: str | None = None,
        extra_fraction: float = 0.7,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise InvalidConfigError(f"batch_size must be positive, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise InvalidConfigError(f"eval_batch_size must be positive or null, got {eval_batch_size}")
        if num_workers < 0:
            raise InvalidConfigError(f"num_workers must be >= 0, got {num_workers}")
        if val_size < 0:
            raise InvalidConfigError(f"val_size must be >= 0, got {val_size}")
        _check_train_subset(train_subset)
        if extra_data is not None:
            from advtrain.data.extra import check_extra_file, check_extra_fraction

            check_extra_fraction(batch_size, extra_fraction)
            check_extra_file(str(extra_data), image_shape=self.image_shape, dataset=self.name)
        self.save_hyperparameters()
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = _run_seed() if seed is None else seed
        self.download = download
        self.augment = augment
        self.pin_memory = pin_memory
        self.train_subset = train_subset
        self.extra_data = None if extra_data is None else str(extra_data)
        self.extra_fraction = float(extra_fraction)
        self._extra_images: Any = None  # advtrain.data.extra.ExtraImages, loaded with the first training loader
        self.train_dataset: IndexedSubset | None = None
        self.val_dataset: IndexedSubset | None = None
        self.test_dataset: IndexedSubset | None = None

    # ----------------------------------------------------------------------------------------- dataset hooks

    def _augmentations(self) -> list[Any]:
        """Returns the training augmentations, applied to PIL images before scaling; none by default."""
        return []

    def _train_transform(self) -> Any:
        return transforms.Compose([*self._augmentations(), transforms.ToTensor()])

    def _eval_transform(self) -> Any:
        return transforms.ToTensor()

    def _load_train_pool(self, transform: Any) -> Dataset:
        """Returns the whole training set (before the validation hold-out) with ``transform`` applied.

        Called once per transform, so the pool must be a fresh object each time.
        """
        raise NotImplementedError

    def _load_test_set(self, transform: Any) -> Dataset:
        """Returns the test set with ``transform`` applied."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits needed for ``stage`` (all of them when ``stage`` is None); idempotent.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or None.
        """
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self._setup_train_val()
        needs_test = stage in (None, "test", "predict") or self.val_size == 0
        if needs_test and self.test_dataset is None:
            test_set = self._load_test_set(self._eval_transform())
            if len(test_set) == 0:
                raise InvalidConfigError(f"the {self.name} test set is empty")
            self.test_dataset = IndexedSubset(test_set, range(len(test_set)))
            logger.info("%s: test split of %d samples", self.name, len(self.test_dataset))

    def _setup_train_val(self) -> None:
        augment = self.augment and bool(self._augmentations())
        # The validation split reads the same training files through a second, non-augmenting dataset object,
        # so it shares the permutation with the training split but never sees random crops or flips.
        plain_pool = self._load_train_pool(self._eval_transform()) if self.val_size > 0 or not augment else None
        train_pool = self._load_train_pool(self._train_transform()) if augment else plain_pool
        train_indices, val_indices = seeded_split(
            len(train_pool), val_size=self.val_size, seed=self.seed, train_subset=self.train_subset
        )
        self.train_dataset = IndexedSubset(train_pool, train_indices)
        if plain_pool is not None and self.val_size > 0:
            self.val_dataset = IndexedSubset(plain_pool, val_indices)
        logger.info(
            "%s: %d training and %d validation samples (seed %d, augment=%s)",
            self.name,
            len(self.train_dataset),
            self.val_size,
            self.seed,
            augment,
        )

    def train_dataloader(self) -> DataLoader:
        """Returns the shuffling training loader; its order is seeded from ``seed``.

        Returns:
            DataLoader yielding ``(x, y, index)`` batches.
        """
        dataset = self._require(self.train_dataset, "train_dataloader", "fit")
        generator = torch.Generator().manual_seed(self.seed)
        if self.extra_data is not None:
            return self._mixed_loader(dataset, generator)
        return self._loader(dataset, batch_size=self.batch_size, shuffle=True, generator=generator)

    def _mixed_loader(self, dataset: IndexedSubset, generator: torch.Generator) -> DataLoader:
        """The training loader with ``extra_data``: batches composed by :class:`advtrain.data.extra.MixedBatchSampler`
        from the training split followed by the extra images, all draws from ``generator`` (the loader's own, which
        exact resume saves and replays)."""
        from advtrain.data.extra import ExtraImages, MixedBatchSampler, MixedDataset, load_extra_data

        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            raise InvalidConfigError(
                "extra_data composes the training batches itself and does not shard them over processes yet: train "
                "with --trainer.devices 1"
            )
        if self._extra_images is None:
            images, labels = load_extra_data(self.extra_data, image_shape=self.image_shape,
                                             num_classes=self.num_classes, dataset=self.name)  # fmt: skip
            self._extra_images = ExtraImages(images, labels, self._extra_transform(), offset=len(dataset))
            logger.info("%s: %d extra training images from %s, %d of every batch of %d", self.name, len(labels),
                        self.extra_data, int(self.batch_size * self.extra_fraction), self.batch_size)  # fmt: skip
        mixed = MixedDataset(dataset, self._extra_images)
        sampler = MixedBatchSampler(len(dataset), len(self._extra_images), self.batch_size, self.extra_fraction,
                                    generator)  # fmt: skip
        return DataLoader(
            mixed,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def _extra_transform(self) -> Any:
        """The transform of the extra images (PIL in, tensor out): the training augmentations when ``augment``."""
        return self._train_transform() if self.augment else self._eval_transform()

    def val_dataloader(self) -> DataLoader:
        """Returns the validation loader, or the test loader when ``val_size`` is 0.

        Returns:
            DataLoader yielding ``(x, y, index)`` batches in split order.
        """
        if self.val_size == 0:
            dataset = self._require(self.test_dataset, "val_dataloader", "validate")
        else:
            dataset = self._require(self.val_dataset, "val_dataloader", "validate")
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Returns the test loader.

        Returns:
            DataLoader yielding ``(x, y, index)`` batches in split order.
        """
        dataset = self._require(self.test_dataset, "test_dataloader", "test")
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Returns the test loader, for ``predict`` (per-sample predictions on the test split).

        Returns:
            DataLoader yielding ``(x, y, index)`` batches in split order.
        """
        dataset = self._require(self.test_dataset, "predict_dataloader", "predict")
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def _require(self, dataset: IndexedSubset | None, caller: str, stage: str) -> IndexedSubset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{caller}() needs setup({stage!r}) to be called first")
        return dataset

    def _pin_memory(self) -> bool:
        """``pin_memory`` as configured, or (``None``) whether the attached trainer runs on a CUDA device."""
        if self.pin_memory is not None:
            return self.pin_memory
        from pytorch_lightning.accelerators import CUDAAccelerator

        return isinstance(getattr(self.trainer, "accelerator", None), CUDAAccelerator)

    def _loader(
        self, dataset: Dataset, *, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )
