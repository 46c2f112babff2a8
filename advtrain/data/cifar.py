"""CIFAR-10 and CIFAR-100 datamodules."""

from __future__ import annotations

from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from advtrain.data.vision import TorchvisionDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (50,000 training and 10,000 test 32x32 colour images, 10 classes) via ``torchvision.datasets.CIFAR10``.

    Training images are augmented with a random 32x32 crop of the zero-padded (4 pixels) image and a random
    horizontal flip. Constructor arguments are those of :class:`~advtrain.data.base.AdvDataModule`.
    """

    name: ClassVar[str] = "cifar10"
    title: ClassVar[str] = "CIFAR-10"
    num_classes: ClassVar[int] = 10
    image_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    # Per-channel statistics over all training pixels.
    mean: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    std: ClassVar[tuple[float, ...]] = (0.2470, 0.2435, 0.2616)
    subfolder: ClassVar[str] = "cifar-10-batches-py"
    expected_files: ClassVar[tuple[str, ...]] = (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    )
    _torchvision_class: ClassVar[type[datasets.CIFAR10]] = datasets.CIFAR10

    def _augmentations(self) -> list[Any]:
        return [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]

    def _make_dataset(self, *, train: bool, transform: Any, download: bool) -> Dataset:
        return self._torchvision_class(self.root_path, train=train, transform=transform, download=download)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (50,000 training and 10,000 test 32x32 colour images, 100 fine classes) via torchvision.

    Same augmentation as :class:`CIFAR10DataModule`; labels are the 100 fine classes.
    """

    name: ClassVar[str] = "cifar100"
    title: ClassVar[str] = "CIFAR-100"
    num_classes: ClassVar[int] = 100
    mean: ClassVar[tuple[float, ...]] = (0.5071, 0.4865, 0.4409)
    std: ClassVar[tuple[float, ...]] = (0.2673, 0.2564, 0.2762)
    subfolder: ClassVar[str] = "cifar-100-python"
    expected_files: ClassVar[tuple[str, ...]] = ("train", "test", "meta")
    _torchvision_class: ClassVar[type[datasets.CIFAR10]] = datasets.CIFAR100
