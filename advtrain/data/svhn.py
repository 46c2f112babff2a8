"""SVHN (Street View House Numbers) datamodule."""

from __future__ import annotations

from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from advtrain.data.vision import TorchvisionDataModule

__all__ = ["SVHNDataModule"]


class SVHNDataModule(TorchvisionDataModule):
    """SVHN cropped digits (73,257 training and 26,032 test 32x32 colour images) via ``torchvision.datasets.SVHN``.

    Uses the ``"train"`` and ``"test"`` splits (not ``"extra"``); torchvision maps the file's label 10 to digit 0.
    Training images get a random 32x32 crop of the zero-padded (4 pixels) image but no flip, since mirrored digits
    are not digits. Constructor arguments are those of :class:`~advtrain.data.base.AdvDataModule`.
    """

    name: ClassVar[str] = "svhn"
    title: ClassVar[str] = "SVHN"
    num_classes: ClassVar[int] = 10
    image_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)
    mean: ClassVar[tuple[float, ...]] = (0.4377, 0.4438, 0.4728)
    std: ClassVar[tuple[float, ...]] = (0.1980, 0.2010, 0.1970)
    subfolder: ClassVar[str] = ""
    expected_files: ClassVar[tuple[str, ...]] = ("train_32x32.mat", "test_32x32.mat")

    def _augmentations(self) -> list[Any]:
        return [transforms.RandomCrop(32, padding=4)]

    def _make_dataset(self, *, train: bool, transform: Any, download: bool) -> Dataset:
        split = "train" if train else "test"
        return datasets.SVHN(self.root_path, split=split, transform=transform, download=download)
