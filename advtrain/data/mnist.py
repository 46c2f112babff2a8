"""MNIST datamodule (the full dataset, through torchvision)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import datasets

from advtrain.data.vision import TorchvisionDataModule

__all__ = ["MNISTDataModule"]

# The MNIST statistics (mean 0.1307, std 0.3081) are deliberately not used: adversarial-training work on MNIST
# (Madry et al., DDN, YOPO, ...) trains and attacks models on raw [0, 1] pixels, and epsilons such as 0.3 are quoted
# in that space, so the model's normalisation is the identity.
MNIST_MEAN: tuple[float, ...] = (0.0,)
MNIST_STD: tuple[float, ...] = (1.0,)


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (60,000 training and 10,000 test 28x28 grey-scale digits) via ``torchvision.datasets.MNIST``.

    No augmentation (``augment`` has no effect) and no normalisation (``mean`` 0, ``std`` 1; see the module comment).
    Constructor arguments are those of :class:`~advtrain.data.base.AdvDataModule`.
    """

    name: ClassVar[str] = "mnist"
    title: ClassVar[str] = "MNIST"
    num_classes: ClassVar[int] = 10
    image_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    mean: ClassVar[tuple[float, ...]] = MNIST_MEAN
    std: ClassVar[tuple[float, ...]] = MNIST_STD
    subfolder: ClassVar[str] = os.path.join("MNIST", "raw")
    expected_files: ClassVar[tuple[str, ...]] = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )

    def _make_dataset(self, *, train: bool, transform: Any, download: bool) -> Dataset:
        return datasets.MNIST(self.root_path, train=train, transform=transform, download=download)
