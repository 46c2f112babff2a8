"""Extra and generated training data (``extra_data``/``extra_fraction`` of every datamodule): the batch composition,
the mapping of samples to the file, and the one-line errors for files that do not fit the dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_datasets import write_fake_extra_data
from test_cli import QUICKSTART, SMOKE

from advtrain.cli import main
from advtrain.data import MNIST5kDataModule
from advtrain.data.extra import MixedBatchSampler, extra_per_batch
from advtrain.errors import InvalidConfigError, InvalidInputError

MNIST = (1, 28, 28)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("batch", "fraction", "extra"), [(512, 0.7, 358), (128, 0.5, 64), (256, 0.3, 76), (4, 0.7, 2)])
def test_extra_images_per_batch_round_down_as_the_papers(batch, fraction, extra):
    assert extra_per_batch(batch, fraction) == extra  # int(batch · fraction), DM-Improves-AT's SemiSupervisedSampler


def test_batches_of_the_datamodule_are_358_generated_and_154_original(tmp_path):
    """Batch 512, fraction 0.7, 4,000 training digits: 8 batches an epoch, each of 358 extra images (index ≥ 4000,
    pixels and labels those of the file) and 154 original ones, all distinct within the epoch."""
    path = tmp_path / "extra.npz"
    images, labels = write_fake_extra_data(path, n=300, image_shape=MNIST)
    dm = MNIST5kDataModule(batch_size=512, seed=0, extra_data=str(path), extra_fraction=0.7)
    dm.setup("fit")
    n_train = len(dm.train_dataset)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert n_train == 4000 and len(loader) == len(batches) == 8  # ceil(4000 / 512)
    seen_original = []
    for x, y, index in batches:
        extra = index >= n_train
        assert x.shape == (512, 1, 28, 28) and int(extra.sum()) == 358 and int((~extra).sum()) == 154
        position = (index[extra] - n_train).numpy()
        np.testing.assert_array_equal(y[extra].numpy(), labels[position])
        expected = torch.from_numpy(images[position]).float().div(255).permute(0, 3, 1, 2)
        torch.testing.assert_close(x[extra], expected, atol=0, rtol=0)  # ToTensor: exact k/255 floats
        original_x, original_y = zip(*[dm.train_dataset[int(i)][:2] for i in index[~extra]], strict=True)
        torch.testing.assert_close(x[~extra], torch.stack(original_x), atol=0, rtol=0)
        assert y[~extra].tolist() == list(original_y)
        seen_original += index[~extra].tolist()
    assert len(set(seen_original)) == len(seen_original) == 8 * 154  # without replacement within an epoch


def test_a_short_last_chunk_is_topped_up_with_extra_images():
    """Original images run out inside the epoch (5 originals, 3 per batch, 2 batches): the second batch holds the
    permutation's last 2 and 2 extra images, the official sampler's rule; every batch is full."""
    sampler = MixedBatchSampler(5, 50, 4, 0.25, torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(sampler) == len(batches) == 2
    assert [sum(i < 5 for i in b) for b in batches] == [3, 2]
    assert all(len(b) == 4 for b in batches)
    assert sorted(i for b in batches for i in b if i < 5) == [0, 1, 2, 3, 4]


def test_the_sampler_is_seeded_by_the_loader_generator():
    """Same generator state, same batches (exact resume replays the loader's generator); the next epoch differs."""
    first = list(MixedBatchSampler(100, 1000, 16, 0.5, torch.Generator().manual_seed(3)))
    again = list(MixedBatchSampler(100, 1000, 16, 0.5, torch.Generator().manual_seed(3)))
    assert first == again
    sampler = MixedBatchSampler(100, 1000, 16, 0.5, torch.Generator().manual_seed(3))
    assert list(sampler) == first and list(sampler) != first


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4, np.int64)}, r"shape \(4, 32, 32, 3\)"),
        ({"image": np.zeros((4, 1, 28, 28), np.uint8), "label": np.zeros(4, np.int64)}, "channels last"),
        ({"image": np.zeros((4, 28, 28, 1), np.float32), "label": np.zeros(4, np.int64)}, "must be uint8"),
        ({"image": np.zeros((4, 28, 28, 1), np.uint8)}, "missing array 'label'"),
        ({"image": np.zeros((4, 28, 28, 1), np.uint8), "label": np.zeros(3, np.int64)}, r"must be \(4,\)"),
        ({"image": np.zeros((4, 28, 28, 1), np.uint8), "label": np.zeros(4, np.float32)}, "must be integers"),
    ],
    ids=["cifar-shape-for-mnist", "channels-first", "float-pixels", "no-labels", "label-count", "float-labels"],
)
def test_files_that_do_not_fit_the_dataset_are_refused_when_built(tmp_path, arrays, message):
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidInputError, match=message):
        MNIST5kDataModule(extra_data=path)


def test_labels_out_of_range_and_unlabelled_images_are_refused(tmp_path):
    images = np.zeros((6, 28, 28), np.uint8)  # N×H×W: grey-scale without a channel axis is accepted
    for label, message in [(np.array([0, 1, 2, 10, 3, 4]), r"outside 0\.\.9.*image 3, has 10"),
                           (np.array([0, -1, -1, 3, 4, 5]), r"2 unlabelled, -1: pseudo-label")]:  # fmt: skip
        dm = MNIST5kDataModule(extra_data=_write(tmp_path / "labels.npz", image=images, label=label))
        dm.setup("fit")
        with pytest.raises(InvalidInputError, match=message):
            dm.train_dataloader()


@pytest.mark.parametrize(("batch", "fraction"), [(64, 0.0), (64, 1.0), (4, 0.1), (1, 0.5)])
def test_fractions_that_empty_one_side_of_the_batch_are_refused(tmp_path, batch, fraction):
    path = str(tmp_path / "e.npz")
    write_fake_extra_data(path, n=4, image_shape=MNIST)
    with pytest.raises(InvalidConfigError, match="extra_fraction"):
        MNIST5kDataModule(batch_size=batch, extra_data=path, extra_fraction=fraction)


def test_cli_trains_with_extra_data(in_tmp):
    write_fake_extra_data(in_tmp / "extra.npz", n=50, image_shape=MNIST)
    cli = main(["fit", "--config", QUICKSTART, "--config", SMOKE, "--trainer.fast_dev_run", "true",
                "--data.init_args.extra_data", "extra.npz", "--data.init_args.extra_fraction", "0.5"])  # fmt: skip
    assert "val/clean_acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4, np.int64)}, "32, 32, 3"),
        ({"image": np.zeros((4, 28, 28, 1), np.uint8), "label": np.full(4, -1)}, "unlabelled"),
    ],
    ids=["shape-at-instantiation", "labels-at-fit"],
)
def test_cli_stops_with_one_line_and_exit_2(in_tmp, caplog, arrays, message):
    path = _write(in_tmp / "bad.npz", **arrays)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", QUICKSTART, "--config", SMOKE, "--trainer.fast_dev_run", "true",
              "--data.init_args.extra_data", path])  # fmt: skip
    assert exc.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "extra_data" in errors[0] and "\n" not in errors[0]
