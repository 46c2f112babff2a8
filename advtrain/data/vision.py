"""Datamodules backed by torchvision's dataset classes, with actionable errors for missing files."""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any, ClassVar

from torch.utils.data import Dataset

from advtrain.data.base import AdvDataModule, DatasetNotFoundError
from advtrain.errors import InvalidInputError

__all__ = ["TorchvisionDataModule"]

logger = logging.getLogger(__name__)

# Per-socket-operation timeout while downloading: without one, a silently dropped connection blocks prepare_data()
# indefinitely instead of failing with an error we can explain.
_DOWNLOAD_SOCKET_TIMEOUT_S = 60.0

# What torchvision's downloaders raise when there is no network or the transfer breaks: URLError and socket errors
# are OSErrors, checksum failures and exhausted mirrors are RuntimeErrors, truncated responses are HTTPExceptions.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, http.client.HTTPException)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        if previous is None:
            socket.setdefaulttimeout(None)


def _check_images_match_labels(dataset: Dataset, what: str, folder: str) -> None:
    """Raises a clear error when a dataset's image and label files hold different numbers of samples (files from two
    downloads, or one truncated), which would otherwise fail mid-epoch with an IndexError."""
    images = getattr(dataset, "data", None)
    labels = getattr(dataset, "targets", getattr(dataset, "labels", None))
    if images is not None and labels is not None and len(images) != len(labels):
        raise InvalidInputError(
            f"{what} files in {folder} do not match: {len(images)} images but {len(labels)} labels. Replace them with "
            "one complete copy (delete them and download again)."
        )


class TorchvisionDataModule(AdvDataModule):
    """Base of the datamodules whose files are read (and downloaded) by a torchvision dataset class.

    Subclasses set :attr:`title`, :attr:`subfolder` and :attr:`expected_files` and implement :meth:`_make_dataset`.
    Existence of the files is checked here before torchvision is called, so that a missing dataset produces a
    :class:`DatasetNotFoundError` naming the folder and files instead of a torchvision stack trace.
    """

    #: Display name used in messages, e.g. ``"CIFAR-10"``.
    title: ClassVar[str]
    #: Folder, relative to ``root``, in which torchvision keeps the files ("" for ``root`` itself).
    subfolder: ClassVar[str]
    #: Files that must exist in :attr:`data_folder` for torchvision to load the dataset without downloading.
    expected_files: ClassVar[tuple[str, ...]]

    @property
    def root_path(self) -> str:
        """Absolute path of ``root``, resolved the way torchvision resolves it (with ``~`` expanded)."""
        return os.path.abspath(os.path.expanduser(self.root))

    @property
    def data_folder(self) -> str:
        """Absolute path of the folder that holds :attr:`expected_files`."""
        return os.path.join(self.root_path, self.subfolder) if self.subfolder else self.root_path

    def _make_dataset(self, *, train: bool, transform: Any, download: bool) -> Dataset:
        """Instantiates the torchvision dataset for the training or the test split.

        Args:
            train: Training split if True, test split otherwise.
            transform: Image transform.
            download: Passed to torchvision.

        Returns:
            The torchvision dataset.
        """
        raise NotImplementedError

    def _missing_files(self) -> list[str]:
        return [name for name in self.expected_files if not os.path.isfile(os.path.join(self.data_folder, name))]

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        folder = self.data_folder
        message = (
            f"{self.title} dataset not found: {reason}.\n"
            f"Searched folder: {folder}\n"
            f"Expected files there: {', '.join(self.expected_files)}\n"
            f"To fix this, either run once on a machine with network access with download: true (torchvision then "
            f"downloads the files into that folder), or copy the files into {folder} yourself; "
            f"or train on the embedded offline dataset 'mnist5k' (MNIST5kDataModule), which needs no files."
        )
        return DatasetNotFoundError(message, dataset=self.title, folder=folder, expected_files=self.expected_files)

    def prepare_data(self) -> None:
        """Downloads the dataset with torchvision if it is missing and downloading is allowed.

        Raises:
            DatasetNotFoundError: If files are missing and ``download`` is False or the download fails.
        """
        missing = self._missing_files()
        if not missing:
            return
        if not self.download:
            raise self._not_found(f"missing {', '.join(missing)} and downloading is disabled (download: false)")
        logger.info("%s: downloading into %s", self.title, self.root_path)
        try:
            with _socket_timeout(_DOWNLOAD_SOCKET_TIMEOUT_S):
                for train in (True, False):
                    self._make_dataset(train=train, transform=None, download=True)
        except _DOWNLOAD_ERRORS as err:
            detail = " ".join(str(err).split())  # torchvision joins per-mirror errors with newlines
            raise self._not_found(f"the download failed ({type(err).__name__}: {detail})") from err
        missing = self._missing_files()
        if missing:
            raise self._not_found(f"the download did not produce {', '.join(missing)}")

    def _load(self, *, train: bool, transform: Any) -> Dataset:
        missing = self._missing_files()
        if missing:
            if self.download:
                reason = f"missing {', '.join(missing)}; files are downloaded by prepare_data(), run it before setup()"
            else:
                reason = f"missing {', '.join(missing)} and downloading is disabled (download: false)"
            raise self._not_found(reason)
        try:
            dataset = self._make_dataset(train=train, transform=transform, download=False)
        except RuntimeError as err:
            # torchvision signals checksum mismatches (corrupted or partial files) with a bare RuntimeError.
            raise self._not_found(
                f"the files are present but torchvision could not load them, they are probably corrupted or "
                f"incomplete; delete them and download again ({err})"
            ) from err
        _check_images_match_labels(dataset, f"{self.title} {'training' if train else 'test'}", self.data_folder)
        return dataset

    def _load_train_pool(self, transform: Any) -> Dataset:
        return self._load(train=True, transform=transform)

    def _load_test_set(self, transform: Any) -> Dataset:
        return self._load(train=False, transform=transform)
