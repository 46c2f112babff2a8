"""Datamodules yielding ``(x, y, index)`` batches of [0, 1] images for adversarial training.

``DATAMODULES`` maps the dataset names used in configurations to their datamodule classes.
"""

from advtrain.data.base import AdvDataModule, DatasetNotFoundError, IndexedSubset
from advtrain.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from advtrain.data.embedded import MNIST5kDataModule
from advtrain.data.mnist import MNISTDataModule
from advtrain.data.svhn import SVHNDataModule
from advtrain.data.vision import TorchvisionDataModule

DATAMODULES: dict[str, type[AdvDataModule]] = {
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "svhn": SVHNDataModule,
    "mnist": MNISTDataModule,
    "mnist5k": MNIST5kDataModule,
}

__all__ = [
    "DATAMODULES",
    "AdvDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DatasetNotFoundError",
    "IndexedSubset",
    "MNIST5kDataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "TorchvisionDataModule",
]
