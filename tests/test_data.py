"""Tests of advtrain.data: the (x, y, index) batch contract, splits, augmentation and missing-data errors.

File-backed datamodules run on tiny fake datasets written in torchvision's on-disk formats (tests/fake_datasets.py);
nothing here touches the network: downloads are intercepted at urllib.
"""

from __future__ import annotations

import inspect
import math
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.data import (
    DATAMODULES,
    AdvDataModule,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    MNIST5kDataModule,
    MNISTDataModule,
    SVHNDataModule,
)
from advtrain.data.base import seeded_split, stratified_permutation
from advtrain.data.embedded import load_mnist5k

sys.path.insert(0, os.path.dirname(__file__))
from fake_datasets import WRITERS, FakeDataset, accept_fake_checksums  # noqa: E402

N_TRAIN, N_TEST, VAL_SIZE, BATCH = 90, 30, 20, 16
FILE_BACKED = ["cifar10", "cifar100", "mnist", "svhn"]
ALL = [*FILE_BACKED, "mnist5k"]

EXPECTED_FACTS = {
    "cifar10": (CIFAR10DataModule, 10, (3, 32, 32)),
    "cifar100": (CIFAR100DataModule, 100, (3, 32, 32)),
    "svhn": (SVHNDataModule, 10, (3, 32, 32)),
    "mnist": (MNISTDataModule, 10, (1, 28, 28)),
    "mnist5k": (MNIST5kDataModule, 10, (1, 28, 28)),
}
# Folder (relative to root) and one file that the missing-data message must name; written out here rather than read
# from the classes so that a wrong class attribute fails the test.
EXPECTED_LOCATION = {
    "cifar10": ("cifar-10-batches-py", "data_batch_1"),
    "cifar100": ("cifar-100-python", "meta"),
    "mnist": (os.path.join("MNIST", "raw"), "train-images-idx3-ubyte"),
    "svhn": ("", "train_32x32.mat"),
}


class Split:
    """Ground truth of one dataset for the tests: raw uint8 images and labels of the training pool and test set."""

    def __init__(self, train_images, train_labels, test_images, test_labels) -> None:
        self.train_images, self.train_labels = train_images, train_labels
        self.test_images, self.test_labels = test_images, test_labels


def _mnist5k_truth() -> Split:
    images, labels = load_mnist5k()
    # The embedded module indexes one pool of 5000 digits for all three splits.
    return Split(images[:, None], labels.astype(np.int64), images[:, None], labels.astype(np.int64))


@pytest.fixture
def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory ``make(key, **kwargs) -> (datamodule, truth)``; writes fake files for file-backed datasets."""
    written: dict[str, FakeDataset] = {}

    def factory(key: str, **kwargs: Any) -> tuple[AdvDataModule, Split]:
        if key == "mnist5k":
            kwargs.setdefault("batch_size", 128)
            return MNIST5kDataModule(**kwargs), _mnist5k_truth()
        root = tmp_path / "data"
        if key not in written:
            written[key] = WRITERS[key](root, n_train=N_TRAIN, n_test=N_TEST)
            accept_fake_checksums(monkeypatch, written[key])
        fake = written[key]
        options = {"root": str(root), "val_size": VAL_SIZE, "batch_size": BATCH, "num_workers": 0, **kwargs}
        return DATAMODULES[key](**options), Split(
            fake.train_images, fake.train_labels, fake.test_images, fake.test_labels
        )

    return factory


def _as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images, dtype=np.float32)) / 255.0


def _sizes(key: str) -> tuple[int, int, int]:
    if key == "mnist5k":
        return 4000, 500, 500
    return N_TRAIN - VAL_SIZE, VAL_SIZE, N_TEST


# --------------------------------------------------------------------------------------------------- static facts


@pytest.mark.parametrize("key", ALL)
def test_registry_and_facts_available_before_setup(key: str, tmp_path: Path) -> None:
    cls, num_classes, image_shape = EXPECTED_FACTS[key]
    assert DATAMODULES[key] is cls
    root = tmp_path / "absent"
    dm = cls(root=str(root), download=False)
    for holder in (cls, dm):
        assert holder.name == key
        assert holder.num_classes == num_classes
        assert tuple(holder.image_shape) == image_shape
        assert len(holder.mean) == len(holder.std) == image_shape[0]
        assert all(0.0 <= m < 1.0 for m in holder.mean) and all(s > 0 for s in holder.std)
    assert dm.train_dataset is None and not root.exists()  # construction must not touch the disk


def test_normalisation_statistics() -> None:
    assert CIFAR10DataModule.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-3)
    assert CIFAR10DataModule.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=1e-3)
    assert CIFAR100DataModule.mean == pytest.approx((0.5071, 0.4865, 0.4409), abs=1e-3)
    assert SVHNDataModule.mean == pytest.approx((0.4377, 0.4438, 0.4728), abs=1e-3)
    # Adversarial MNIST models take raw [0, 1] pixels, so both MNIST variants normalise with the identity.
    for cls in (MNISTDataModule, MNIST5kDataModule):
        assert cls.mean == (0.0,) and cls.std == (1.0,)


@pytest.mark.parametrize("key", ALL)
def test_constructor_is_cli_friendly(key: str) -> None:
    from jsonargparse import ArgumentParser

    cls = DATAMODULES[key]
    params = inspect.signature(cls.__init__).parameters
    expected = {
        "root": "data",
        "batch_size": 128,
        "eval_batch_size": None,
        "num_workers": 0 if key == "mnist5k" else 2,
        "val_size": 500 if key == "mnist5k" else 1000,
        "seed": None,  # None: the run's seed_everything (PL_GLOBAL_SEED), else 0
        "download": True,
        "augment": True,
        "pin_memory": None,  # None: pinned when the trainer runs on CUDA (tests/test_host_syncs.py)
        "train_subset": None,
    }
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_args(["--data.batch_size=7", "--data.train_subset=5", "--data.root=elsewhere"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    dm = instantiate(cfg).data
    assert isinstance(dm, cls) and dm.batch_size == 7 and dm.eval_batch_size == 7
    assert dm.train_subset == 5 and dm.root == "elsewhere"


# --------------------------------------------------------------------------------------------------- batch contract


@pytest.mark.parametrize("key", ALL)
def test_train_epoch_contract(make, key: str) -> None:
    dm, truth = make(key)
    dm.prepare_data()
    dm.setup("fit")
    n_train, _, _ = _sizes(key)
    assert len(dm.train_dataset) == n_train
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(n_train / dm.batch_size)  # drop_last=False keeps the partial batch
    seen = []
    for x, y, index in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == dm.image_shape
        assert y.dtype == torch.int64 and index.dtype == torch.int64
        assert x.shape[0] == y.shape[0] == index.shape[0]
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert 0 <= y.min() and y.max() < dm.num_classes
        original = dm.train_dataset.indices[index].numpy()
        assert torch.equal(y, torch.from_numpy(truth.train_labels[original]))
        seen.append(index)
    seen = torch.cat(seen)
    assert torch.equal(torch.sort(seen).values, torch.arange(n_train))  # each training index exactly once


@pytest.mark.parametrize("key", ALL)
def test_eval_splits_are_ordered_unaugmented_and_disjoint(make, key: str) -> None:
    dm, truth = make(key)
    dm.setup("fit")
    dm.setup("test")
    n_train, n_val, n_test = _sizes(key)
    train_idx, val_idx = set(dm.train_dataset.indices.tolist()), set(dm.val_dataset.indices.tolist())
    assert (len(dm.val_dataset), len(dm.test_dataset)) == (n_val, n_test)
    assert len(val_idx) == n_val and len(train_idx) == n_train and not train_idx & val_idx
    if key == "mnist5k":
        test_idx = set(dm.test_dataset.indices.tolist())
        assert not test_idx & (train_idx | val_idx) and len(train_idx | val_idx | test_idx) == 5000
    else:
        assert train_idx | val_idx == set(range(N_TRAIN))
    torch.manual_seed(0)
    first, second = dm.val_dataset[3][0], dm.val_dataset[3][0]
    assert torch.equal(first, second)
    for loader, dataset, images in (
        (dm.val_dataloader(), dm.val_dataset, truth.train_images),
        (dm.test_dataloader(), dm.test_dataset, truth.test_images),
    ):
        indices = []
        for x, _, index in loader:
            original = dataset.indices[index].numpy()
            assert torch.equal(x, _as_float(images[original]))  # exact pixels: no augmentation, right mapping
            indices.append(index)
        assert torch.equal(torch.cat(indices), torch.arange(len(dataset)))  # not shuffled


def _augmentation_of(view: torch.Tensor, raw: torch.Tensor, pad: int = 4) -> tuple[int, int, bool] | None:
    """Returns (dy, dx, flipped) if ``view`` is a zero-padded crop of ``raw``, optionally mirrored, else None."""
    padded = F.pad(raw, (pad, pad, pad, pad))
    height, width = raw.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + height, dx : dx + width]
            for flipped in (False, True):
                if torch.equal(view, crop.flip(-1) if flipped else crop):
                    return dy - pad, dx - pad, flipped
    return None


@pytest.mark.parametrize(
    ("key", "augment", "expect_shift", "expect_flip"),
    [
        ("cifar10", True, True, True),
        ("cifar100", True, True, True),
        ("svhn", True, True, False),  # digits are not mirrored
        ("cifar10", False, False, False),
        ("mnist", True, False, False),
        ("mnist5k", True, False, False),
    ],
)
def test_training_augmentation(make, key: str, augment: bool, expect_shift: bool, expect_flip: bool) -> None:
    dm, truth = make(key, augment=augment)
    dm.setup("fit")
    raw = _as_float(truth.train_images[int(dm.train_dataset.indices[0])])
    torch.manual_seed(0)
    draws = [_augmentation_of(dm.train_dataset[0][0], raw) for _ in range(40)]
    assert all(d is not None for d in draws), "training view is not a <=4-pixel zero-padded crop (+flip) of the image"
    assert any(d[:2] != (0, 0) for d in draws) == expect_shift
    if expect_shift:  # the full 4-pixel padding is used, not a smaller one
        assert max(max(abs(d[0]), abs(d[1])) for d in draws) == 4
    assert any(d[2] for d in draws) == expect_flip


# --------------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("key", ALL)
def test_splits_and_order_are_deterministic_under_seed(make, key: str) -> None:
    dms = [make(key, seed=seed, augment=False)[0] for seed in (3, 3, 4)]
    for dm in dms:
        dm.setup("fit")
        dm.setup("test")
    same, other = dms[1], dms[2]
    assert torch.equal(dms[0].train_dataset.indices, same.train_dataset.indices)
    assert torch.equal(dms[0].val_dataset.indices, same.val_dataset.indices)
    assert not torch.equal(dms[0].val_dataset.indices, other.val_dataset.indices)
    if key == "mnist5k":  # the test split does not follow the seed, so runs with different seeds compare fairly
        assert torch.equal(dms[0].test_dataset.indices, other.test_dataset.indices)
    loaders = [dm.train_dataloader() for dm in dms[:2]]
    epochs = [[torch.cat([b[2] for b in loader]) for _ in range(2)] for loader in loaders]
    assert torch.equal(epochs[0][0], epochs[1][0]) and torch.equal(epochs[0][1], epochs[1][1])
    assert not torch.equal(epochs[0][0], epochs[0][1])  # reshuffled every epoch
    x0 = next(iter(dms[0].train_dataloader()))[0]
    x1 = next(iter(dms[1].train_dataloader()))[0]
    assert torch.equal(x0, x1)


@pytest.mark.parametrize("key", ["cifar10", "mnist5k"])
def test_train_subset_is_prefix_of_seeded_permutation(make, key: str) -> None:
    full, _ = make(key)
    sub, _ = make(key, train_subset=10)
    full.setup("fit")
    sub.setup("fit")
    assert len(sub.train_dataset) == 10
    assert torch.equal(sub.train_dataset.indices, full.train_dataset.indices[:10])
    assert torch.equal(sub.val_dataset.indices, full.val_dataset.indices)
    assert sorted(torch.cat([b[2] for b in sub.train_dataloader()]).tolist()) == list(range(10))


@pytest.mark.parametrize("key", ALL)
def test_val_size_zero_validates_on_test_set(make, key: str) -> None:
    dm, truth = make(key, val_size=0)
    dm.setup("fit")
    n_train = 4500 if key == "mnist5k" else N_TRAIN
    assert len(dm.train_dataset) == n_train and dm.val_dataset is None
    batches = list(dm.val_dataloader())
    x = torch.cat([b[0] for b in batches])
    original = dm.test_dataset.indices[torch.cat([b[2] for b in batches])].numpy()
    assert x.shape[0] == len(dm.test_dataset)
    assert torch.equal(x, _as_float(truth.test_images[original]))


def test_loader_settings(make) -> None:
    dm, _ = make("mnist5k", batch_size=32, eval_batch_size=100, pin_memory=True)
    dm.setup("fit")
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert (train.batch_size, val.batch_size, test.batch_size) == (32, 100, 100)
    assert not train.drop_last and not val.drop_last and not test.drop_last
    assert train.pin_memory and not train.persistent_workers and train.num_workers == 0
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    workers, _ = make("mnist5k", num_workers=2)
    workers.setup()
    assert workers.train_dataloader().persistent_workers and workers.test_dataloader().num_workers == 2


def test_setup_per_stage_and_loaders_before_setup(make) -> None:
    dm, _ = make("cifar10")
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup("test")
    assert dm.train_dataset is None and len(dm.test_dataset) == N_TEST
    dm.setup("fit")
    train = dm.train_dataset
    dm.setup("fit")
    assert dm.train_dataset is train  # idempotent: a second call must not re-split


# --------------------------------------------------------------------------------------------------- size errors


@pytest.mark.parametrize("key", ALL)
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"train_subset": 0}, "train_subset=0"),
        ({"train_subset": -5}, "train_subset=-5"),
        ({"val_size": -1}, "val_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_invalid_sizes_rejected_at_construction(key: str, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DATAMODULES[key](**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "patterns"),
    [
        ({"val_size": N_TRAIN}, [f"val_size={N_TRAIN}", f"{N_TRAIN} samples"]),
        ({"val_size": 10 * N_TRAIN}, [f"val_size={10 * N_TRAIN}", f"{N_TRAIN} samples"]),
        ({"train_subset": N_TRAIN - VAL_SIZE + 1}, [f"train_subset={N_TRAIN - VAL_SIZE + 1}", str(N_TRAIN - VAL_SIZE)]),
    ],
)
def test_empty_or_oversized_training_split_rejected_at_setup(make, kwargs: dict, patterns: list[str]) -> None:
    dm, _ = make("cifar10", **kwargs)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    for pattern in patterns:
        assert pattern in str(info.value)
    # The boundary case still works: a single training sample.
    ok, _ = make("cifar10", val_size=N_TRAIN - 1)
    ok.setup("fit")
    assert len(ok.train_dataset) == 1


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"test_size": 0}, "test_size"),
        ({"test_size": -3}, "test_size"),
        ({"val_size": 2500, "test_size": 2500}, "5000"),
        ({"val_size": 0, "test_size": 5000}, "5000"),
    ],
)
def test_embedded_size_errors(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        MNIST5kDataModule(**kwargs)


def test_embedded_train_subset_too_large() -> None:
    dm = MNIST5kDataModule(train_subset=4001)
    with pytest.raises(ValueError, match="train_subset=4001.*4000"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------------- missing data


def _expected_folder(base: Path, key: str) -> str:
    subfolder, _ = EXPECTED_LOCATION[key]
    return str(base / subfolder) if subfolder else str(base)


@pytest.mark.parametrize("key", FILE_BACKED)
def test_missing_files_with_download_disabled(key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative root must be reported as the absolute folder it resolves to
    dm = DATAMODULES[key](root="data", download=False, num_workers=0)
    for call in (dm.prepare_data, lambda: dm.setup("fit"), lambda: dm.setup("test")):
        with pytest.raises(DatasetNotFoundError) as info:
            call()
        message = str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        assert _expected_folder(tmp_path / "data", key) in message
        assert EXPECTED_LOCATION[key][1] in message
        assert "download: true" in message and "mnist5k" in message
        assert info.value.folder == _expected_folder(tmp_path / "data", key)
    assert not (tmp_path / "data").exists()


def test_partially_missing_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = WRITERS["mnist"](tmp_path, n_train=10, n_test=5)
    (fake.folder / "t10k-labels-idx1-ubyte").unlink()
    dm = MNISTDataModule(root=str(tmp_path), download=False, val_size=2, num_workers=0)
    with pytest.raises(DatasetNotFoundError, match="missing t10k-labels-idx1-ubyte and"):
        dm.setup("fit")


def test_empty_test_set_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    accept_fake_checksums(monkeypatch, WRITERS["cifar10"](tmp_path, n_train=10, n_test=0))
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, val_size=2, num_workers=0)
    with pytest.raises(ValueError, match="test set is empty"):
        dm.setup("test")


def test_setup_without_prepare_data_points_to_prepare_data(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="prepare_data"):
        dm.setup("fit")


class _Offline:
    """Stand-in for ``urllib.request.urlopen`` that fails like a machine without network."""

    def __init__(self) -> None:
        self.calls = 0
        self.timeouts: list[float | None] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.timeouts.append(kwargs.get("timeout", socket.getdefaulttimeout()))
        raise urllib.error.URLError("[Errno -2] Name or service not known")


@pytest.mark.parametrize("key", FILE_BACKED)
def test_failed_download_raises_dataset_not_found(key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    offline = _Offline()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = DATAMODULES[key](root=str(tmp_path / "data"), download=True)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert offline.calls > 0  # torchvision's own downloader was tried
    assert "download failed" in message and _expected_folder(tmp_path / "data", key) in message
    assert EXPECTED_LOCATION[key][1] in message
    assert info.value.__cause__ is not None
    # A stalled connection must time out rather than hang, and the global default must be restored afterwards.
    assert all(t is not None and t <= 120 for t in offline.timeouts)
    assert socket.getdefaulttimeout() is None


@pytest.mark.parametrize("key", FILE_BACKED)
def test_present_files_are_not_downloaded_again(make, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    offline = _Offline()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm, _ = make(key, download=True)
    dm.prepare_data()
    dm.setup("fit")
    assert offline.calls == 0 and len(dm.train_dataset) == N_TRAIN - VAL_SIZE


@pytest.mark.parametrize("key", ["cifar10", "cifar100", "svhn"])
def test_corrupted_files_raise_dataset_not_found(key: str, tmp_path: Path) -> None:
    # No accept_fake_checksums here: torchvision's md5 check of the fake files must fail.
    WRITERS[key](tmp_path, n_train=10, n_test=5)
    dm = DATAMODULES[key](root=str(tmp_path), download=False, val_size=2, num_workers=0)
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------------- embedded set


def test_embedded_digits_are_real_mnist() -> None:
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    pixels = images.astype(np.float64) / 255.0
    assert 0.11 < pixels.mean() < 0.15  # MNIST's mean intensity is ~0.13; uniform noise would give ~0.5
    assert (images == 0).mean() > 0.7  # mostly black background
    assert pixels[:, :2].mean() < 0.01 and pixels[:, :, :2].mean() < 0.01  # digits are centred, borders empty
    ink = [pixels[labels == digit].mean() for digit in range(10)]
    assert int(np.argmin(ink)) == 1 and int(np.argmax(ink)) in (0, 8)  # a "1" has the least ink


def test_embedded_splits_are_stratified(make) -> None:
    dm, truth = make("mnist5k")
    dm.setup("fit")
    dm.setup("test")
    for dataset, per_class in ((dm.train_dataset, 400), (dm.val_dataset, 50), (dm.test_dataset, 50)):
        counts = np.bincount(truth.train_labels[dataset.indices.numpy()], minlength=10)
        assert counts.tolist() == [per_class] * 10
    x = torch.cat([b[0] for b in dm.train_dataloader()])
    assert 0.11 < x.mean().item() < 0.15


def test_lightning_fit_sees_every_training_index(tmp_path: Path) -> None:
    class Probe(pl.LightningModule):
        def __init__(self, num_classes: int, pixels: int) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(pixels, num_classes)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y, index = batch
            self.seen.append(index)
            return F.cross_entropy(self.layer(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            self.log("val_loss", F.cross_entropy(self.layer(x.flatten(1)), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MNIST5kDataModule(batch_size=16, train_subset=48)
    model = Probe(dm.num_classes, math.prod(dm.image_shape))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(torch.cat(model.seen).tolist()) == list(range(48))


# --------------------------------------------------------------------------------------------------- split helpers


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), data=st.data())
def test_seeded_split_properties(n: int, data: st.DataObject) -> None:
    val_size = data.draw(st.integers(0, n - 1))
    subset = data.draw(st.none() | st.integers(1, n - val_size))
    seed = data.draw(st.integers(0, 2**31))
    train, val = seeded_split(n, val_size=val_size, seed=seed, train_subset=subset)
    assert len(val) == val_size and len(train) == (n - val_size if subset is None else subset)
    combined = torch.cat([train, val])
    assert combined.unique().numel() == combined.numel() and (0 <= combined).all() and (combined < n).all()
    again, _ = seeded_split(n, val_size=val_size, seed=seed, train_subset=subset)
    assert torch.equal(train, again)


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=8), seed=st.integers(0, 2**31))
def test_stratified_permutation_prefixes_are_balanced(counts: list[int], seed: int) -> None:
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]
    order = stratified_permutation(labels, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(torch.sort(order).values, torch.arange(labels.numel()))
    sizes = torch.tensor(counts, dtype=torch.float64)
    tolerance = 1.0 / sizes[:, None] + 1.0 / sizes[None, :] + 1e-9
    for prefix in range(1, labels.numel() + 1):
        fraction = torch.bincount(labels[order[:prefix]], minlength=len(counts)).double() / sizes
        assert ((fraction[:, None] - fraction[None, :]).abs() <= tolerance).all()


@given(num_classes=st.integers(1, 10), per_class=st.integers(1, 30), seed=st.integers(0, 2**31))
def test_stratified_permutation_exact_for_equal_classes(num_classes: int, per_class: int, seed: int) -> None:
    labels = torch.arange(num_classes).repeat(per_class)
    order = stratified_permutation(labels, generator=torch.Generator().manual_seed(seed))
    for rounds in range(1, per_class + 1):
        counts = torch.bincount(labels[order[: rounds * num_classes]], minlength=num_classes)
        assert counts.tolist() == [rounds] * num_classes
