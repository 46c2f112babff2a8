"""Extra and generated training data: a fixed fraction of every training batch drawn from a user-given file.

The generated-data papers (Rebuffi et al., "Data Augmentation Can Improve Robustness", NeurIPS 2021; Wang et al.,
"Better Diffusion Models Further Improve Adversarial Training", ICML 2023; before them Carmon et al., "Unlabeled Data
Improves Adversarial Robustness", NeurIPS 2019, with 500K pseudo-labelled Tiny Images) train on batches that mix the
original training set with a large pool of extra images. This module reproduces their batch composition (read from
github.com/wzekai99/DM-Improves-AT, ``core/data/semisup.py``, ``SemiSupervisedSampler``):

- every batch holds ``int(batch_size · fraction)`` extra images and ``batch_size − int(batch_size · fraction)``
  original ones (batch 512, fraction 0.7: 358 + 154), whatever the sizes of the two sets;
- an epoch is ``ceil(N / batch_size)`` batches, N the original training set's size (as without extra data: the
  schedules keep their meaning), so an epoch sees only a ``1 − fraction`` share of the original images;
- the original images are drawn without replacement from a fresh permutation; when the permutation runs out, the
  last, shorter chunk is topped up with extra images and the next batch starts a new permutation;
- the extra images are drawn uniformly **with** replacement (a pool of millions, sampled independently per batch);
- extra images go through the datamodule's training augmentation (random crop and flip on CIFAR), as in the
  official code, where they are appended to the same dataset object.

Deviations: the official sampler shuffles the order inside each batch; here the original images come first and the
extra ones after (a batch's order changes nothing in the loss, BatchNorm included). The draws come from the training
loader's seeded generator, so a resumed run replays the same batches (:mod:`advtrain.training.resume`).

File format (that of the DM-Improves-AT / Rebuffi et al. ``.npz`` files): ``image``, uint8, N×H×W×C (N×H×W for
grey-scale datasets), and ``label``, integers in [0, num_classes). The header (keys, dtype, shape) is checked when the
datamodule is built and the labels when the training loader is first built; a mismatch stops with one line naming
the file, the key, what was found and what the dataset needs.

Unlabelled images (label −1, as the DM-Improves-AT dataset class marks images without labels) are refused: advtrain's
training step checks every label against the number of classes, and its objectives (TRADES included, whose CE term
needs a label although its KL term does not) have no per-sample label mask. Pseudo-label them first with a standard
classifier, as Carmon et al. and the generated-data releases do (their files ship with labels).

Each sample's ``index`` is its position in the original training split, or ``N + j`` for the extra file's image
``j``, so per-example state keyed by index (MMA's margins) never mixes the two.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from advtrain.errors import InvalidConfigError, InvalidInputError

__all__ = ["ExtraImages", "MixedBatchSampler", "MixedDataset", "check_extra_file", "extra_per_batch", "load_extra_data"]

logger = logging.getLogger(__name__)

_IMAGE_KEY = "image"
_LABEL_KEY = "label"


def extra_per_batch(batch_size: int, fraction: float) -> int:
    """How many images of a batch come from the extra file: ``int(batch_size · fraction)``, rounded down as the papers'
    code does (512 × 0.7 → 358)."""
    return int(batch_size * fraction)


def check_extra_fraction(batch_size: int, fraction: float) -> None:
    """Refuses a fraction that leaves a batch without extra or without original images."""
    if not 0.0 < fraction < 1.0:
        raise InvalidConfigError(f"extra_fraction must lie in (0, 1) (the papers use 0.3-0.8), got {fraction}")
    extra = extra_per_batch(batch_size, fraction)
    if extra < 1 or extra >= batch_size:
        raise InvalidConfigError(
            f"extra_fraction={fraction} with batch_size={batch_size} gives {extra} extra and {batch_size - extra} "
            "original images per batch; both must be at least 1: change the fraction or the batch size"
        )


def _expected_image_shapes(image_shape: tuple[int, int, int]) -> list[tuple[int, ...]]:
    channels, height, width = image_shape
    return [(height, width, channels)] + ([(height, width)] if channels == 1 else [])


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of an ``.npz`` file, read from the ``.npy`` headers without loading the data."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(".npy"):
                continue
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
            headers[name[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    return headers


def check_extra_file(path: str, *, image_shape: tuple[int, int, int], dataset: str) -> int:
    """Checks an extra-data file's keys, dtypes and shapes against the dataset (cheap: headers only).

    Args:
        path: the ``.npz`` file.
        image_shape: (C, H, W) of the dataset.
        dataset: the dataset's name, for messages.

    Returns:
        The number of images in the file.

    Raises:
        InvalidInputError: a missing file, a missing key, a wrong dtype or shape, or a label count that differs from
            the image count.
    """
    where = f"extra_data {path}"
    if not os.path.isfile(path):
        raise InvalidInputError(f"{where}: no such file")
    try:
        headers = _npz_headers(path)
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise InvalidInputError(f"{where}: not a readable .npz file ({err}); save it with numpy.savez") from None
    missing = [k for k in (_IMAGE_KEY, _LABEL_KEY) if k not in headers]
    if missing:
        raise InvalidInputError(
            f"{where}: missing array {' and '.join(map(repr, missing))} (found {sorted(headers)}); the file needs "
            f"'{_IMAGE_KEY}' (uint8 N×H×W×C) and '{_LABEL_KEY}' (N integer class labels)"
        )
    shape, dtype = headers[_IMAGE_KEY]
    expected = _expected_image_shapes(image_shape)
    if dtype != np.uint8:
        raise InvalidInputError(f"{where}: '{_IMAGE_KEY}' has dtype {dtype}; it must be uint8 (pixels 0-255)")
    if len(shape) < 1 or tuple(shape[1:]) not in expected:
        wanted = " or ".join("N×" + "×".join(map(str, s)) for s in expected)
        raise InvalidInputError(
            f"{where}: '{_IMAGE_KEY}' has shape {shape}; {dataset} images need {wanted} (N×H×W×C, channels last)"
        )
    label_shape, label_dtype = headers[_LABEL_KEY]
    if label_dtype.kind not in "iu":
        raise InvalidInputError(f"{where}: '{_LABEL_KEY}' has dtype {label_dtype}; class labels must be integers")
    if label_shape != (shape[0],):
        raise InvalidInputError(
            f"{where}: '{_LABEL_KEY}' has shape {label_shape} for {shape[0]} images; it must be ({shape[0]},)"
        )
    if shape[0] == 0:
        raise InvalidInputError(f"{where}: the file holds no images")
    return int(shape[0])


def load_extra_data(
    path: str, *, image_shape: tuple[int, int, int], num_classes: int, dataset: str
) -> tuple[np.ndarray, np.ndarray]:
    """Loads and checks an extra-data file.

    Returns:
        ``(images, labels)``: uint8 (N, H, W, C) or (N, H, W) and int64 (N,).

    Raises:
        InvalidInputError: as :func:`check_extra_file`, or labels outside [0, num_classes) (unlabelled −1 included).
    """
    check_extra_file(path, image_shape=image_shape, dataset=dataset)
    with np.load(path) as archive:
        images, labels = archive[_IMAGE_KEY], archive[_LABEL_KEY].astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        unlabeled = int((labels == -1).sum())
        hint = (
            f" ({unlabeled} unlabelled, -1: pseudo-label them with a standard classifier first, as the generated-data "
            "releases do; advtrain trains on labelled extra images only)"
            if unlabeled
            else ""
        )
        raise InvalidInputError(
            f"extra_data {path}: {int(bad.sum())} labels outside 0..{num_classes - 1} of {dataset} (the first, "
            f"image {first}, has {int(labels[first])}){hint}"
        )
    return images, labels


class ExtraImages(Dataset):
    """The extra file's images as ``(image, label, index)`` samples, through a PIL transform (the datamodule's
    training transform: augmentations, then ``ToTensor``).

    Args:
        images: uint8 (N, H, W, C) or (N, H, W).
        labels: int64 (N,).
        transform: applied to each image as a PIL image.
        offset: added to the position to form the sample's ``index``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any, offset: int) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self.offset = int(offset)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, position: int) -> tuple[Any, int, int]:
        array = self.images[position]
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return self.transform(Image.fromarray(array)), int(self.labels[position]), self.offset + int(position)


class MixedDataset(Dataset):
    """The original training split (positions 0..N−1) followed by the extra images (N..N+M−1)."""

    def __init__(self, original: Dataset, extra: ExtraImages) -> None:
        self.original = original
        self.extra = extra
        self.num_original = len(original)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_original + len(self.extra)

    def __getitem__(self, position: int) -> tuple[Any, int, int]:
        if position < self.num_original:
            return self.original[position]
        return self.extra[position - self.num_original]


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size − int(batch_size · fraction)`` original and ``int(batch_size · fraction)`` extra
    positions of a :class:`MixedDataset`, ``ceil(num_original / batch_size)`` per epoch (see the module docstring).

    Args:
        num_original: size of the original training split.
        num_extra: number of extra images.
        batch_size: images per batch.
        fraction: share of extra images in a batch.
        generator: source of every draw (the training loader's, so that resuming replays the epoch).
    """

    def __init__(
        self, num_original: int, num_extra: int, batch_size: int, fraction: float, generator: torch.Generator
    ) -> None:
        check_extra_fraction(batch_size, fraction)
        self.num_original = int(num_original)
        self.num_extra = int(num_extra)
        self.batch_size = int(batch_size)
        self.extra_size = extra_per_batch(batch_size, fraction)
        self.original_size = self.batch_size - self.extra_size
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(self.num_original / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_original, generator=self.generator)
        start = 0
        for _ in range(len(self)):
            if start >= self.num_original:
                order, start = torch.randperm(self.num_original, generator=self.generator), 0
            chunk = order[start : start + self.original_size]
            start += self.original_size
            fill = self.batch_size - chunk.numel()  # more extra images when the permutation's last chunk is short
            extra = torch.randint(self.num_extra, (fill,), generator=self.generator) + self.num_original
            yield torch.cat([chunk, extra]).tolist()
