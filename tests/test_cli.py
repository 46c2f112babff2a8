"""The CLI end to end: recipes parse and instantiate, the quickstart runs, checkpoints round-trip through
``load_from_checkpoint``/``validate``/``evaluate``, and bad input gets an actionable message."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from advtrain.cli import build_cli, main
from advtrain.training import AdversarialTraining
from advtrain.training.checkpoint import CheckpointError, load_training_module, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
SMOKE = str(ROOT / "configs" / "trainer" / "smoke.yaml")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_recipe_extra_data(recipe: Path) -> None:
    """A recipe with generated data (``extra_data: <file>``) gets a small fake file at that path (cwd-relative)."""
    import re

    from fake_datasets import write_fake_extra_data

    found = re.search(r"extra_data: ([^,}\s]+)", recipe.read_text())
    if found:
        write_fake_extra_data(found.group(1), n=20)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_instantiates(recipe, in_tmp):
    _write_recipe_extra_data(recipe)
    cli = build_cli(["--config", str(recipe), "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model, AdversarialTraining)
    dm = cli.datamodule
    # Dataset facts are linked into the model: classes, input shape and normalisation.
    assert cli.model.num_classes == dm.num_classes
    assert tuple(cli.model.model.mean.flatten().tolist()) == pytest.approx(dm.mean)
    text = recipe.read_text()
    assert text.startswith("#") and ("should reach" in text.lower() or "measured" in text.lower())


@pytest.mark.parametrize("recipe", ["pgd_cifar", "pgd_mnist", "quickstart"])
def test_interpolation_follows_overrides(recipe, in_tmp):
    """``${threat.eps}`` feeds the maximizer and the validation attack, and follows a later override."""
    args = ["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), "--threat.eps", "0.123"]
    cli = build_cli(args + ["--trainer.logger", "false"], run=False)
    assert cli.model.maximizer.eps == pytest.approx(0.123)
    assert cli.model.val_attack.eps == pytest.approx(0.123)


def test_configs_compose(in_tmp):
    cli = build_cli(
        [
            "--config",
            QUICKSTART,
            "--config",
            str(ROOT / "configs/maximizer/standard.yaml"),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert type(cli.model.maximizer).__name__ == "Standard"
    assert cli.model.val_attack is not None  # the rest of the recipe is kept


def test_quickstart_fast_dev_run(in_tmp):
    cli = main(["fit", "--config", QUICKSTART, "--trainer.fast_dev_run", "true"])
    metrics = cli.trainer.callback_metrics
    assert {"val/clean_acc", "val/robust_acc", "train/adv_loss"} <= set(metrics)


def test_fit_checkpoint_validate_evaluate_round_trip(in_tmp):
    args = ["--config", QUICKSTART, "--config", SMOKE, "--run_name", "rt"]
    cli = main(["fit", *args])
    folder = in_tmp / "checkpoints" / "rt"
    assert (folder / "last.ckpt").is_file() and (folder / "config.yaml").is_file()
    assert len(list(folder.glob("best-epoch*.ckpt"))) == 1

    # The checkpoint rebuilds the right architecture, maximizer and validation attack, with the same weights.
    loaded = load_training_module(folder / "last.ckpt")
    assert type(loaded.maximizer).__name__ == "PGD" and loaded.val_attack.steps == cli.model.val_attack.steps
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), cli.model.eval().cpu()(x))
    plain = AdversarialTraining.load_from_checkpoint(folder / "last.ckpt", weights_only=True)
    assert plain.hparams.arch == "small_cnn"

    val = main(["validate", *args, "--ckpt_path", str(folder / "last.ckpt")])
    assert "val/robust_acc" in val.trainer.callback_metrics

    out = in_tmp / "eval"
    main(["evaluate", *args, "--ckpt_path", str(folder / "last.ckpt"), "--max_samples", "24", "--steps", "3",
          "--output", str(out), "--progress", "false"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 24
    assert 0 <= report["robust_accuracy_all"] <= report["clean_accuracy"] <= 1
    assert (out / "report.md").read_text().startswith("# advtrain robustness report")


def _run_expecting_exit(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code != 0
    captured = capsys.readouterr()
    return captured.err + captured.out


def test_misspelled_key_suggests_the_right_one(in_tmp, capsys):
    err = _run_expecting_exit(["fit", "--config", QUICKSTART, "--model.maximiser", "x"], capsys)
    assert "model.maximizer" in err


def test_misspelled_init_arg_lists_the_accepted_ones(in_tmp, capsys):
    err = _run_expecting_exit(["fit", "--config", QUICKSTART, "--model.maximizer.init_args.epz", "3"], capsys)
    assert "PGD accepts: norm, eps, steps" in err and "Did you mean 'eps'" in err


def test_missing_checkpoint_is_one_line(in_tmp, caplog):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--config", QUICKSTART, "--ckpt_path", str(in_tmp / "nothing.ckpt")])
    assert exc.value.code == 2 and "No checkpoint at" in caplog.text


def test_unknown_maximizer_lists_the_known_ones(in_tmp, capsys):
    err = _run_expecting_exit(["fit", "--config", QUICKSTART, "--model.maximizer", "PGDX"], capsys)
    assert "Known values for model.maximizer" in err and "advtrain.maximizers.PGD" in err and "Standard" in err


def test_unknown_model_name_lists_the_registered_ones(in_tmp, capsys):
    err = _run_expecting_exit(["fit", "--config", QUICKSTART, "--model.arch", "resnet1000"], capsys)
    assert "model.arch" in err and "preact_resnet18" in err and "small_cnn" in err


def test_unknown_norm_value_names_the_key_and_values(in_tmp, capsys):
    err = _run_expecting_exit(["fit", "--config", QUICKSTART, "--model.maximizer.init_args.norm", "l3"], capsys)
    assert "norm" in err and "'linf', 'l2'" in err


def test_unknown_dataset_class_lists_the_datamodules(in_tmp, capsys):
    err = _run_expecting_exit(["fit", "--config", QUICKSTART, "--data", "CIFAR11DataModule"], capsys)
    assert "Known values for data" in err and "CIFAR10DataModule" in err


def test_missing_dataset_offline_names_the_folder(in_tmp, caplog):
    args = ["fit", "--config", str(ROOT / "recipes/pgd_cifar.yaml"), "--config", SMOKE,
            "--data.init_args.root", str(in_tmp / "nowhere"), "--data.init_args.download", "false"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    message = caplog.text
    assert str(in_tmp / "nowhere") in message and "data_batch_1" in message


def test_images_outside_unit_box_and_bad_labels_are_rejected():
    model = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        model._check(x * 255 - 128, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        model._check(x, y + 20)


def test_corrupt_and_code_executing_checkpoints_are_refused(tmp_path):
    model = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, good)
    assert "state_dict" in read_checkpoint(good)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(truncated)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="would run code"):
        read_checkpoint(evil)
    assert "payload" in read_checkpoint(evil, trust=True)  # only when the user opts in

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"maximizer": {"class_path": "os.system"}}}, foreign)
    with pytest.raises(CheckpointError, match="os.system"):
        read_checkpoint(foreign)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.ckpt")


class _Payload:
    def __reduce__(self):
        return (pickle.loads, (pickle.dumps(42),))


def test_wandb_runs_offline_and_stores_the_resolved_config(in_tmp, caplog, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(in_tmp))  # no ~/.netrc with a key
    import wandb

    args = ["fit", "--config", QUICKSTART, "--run_name", "wb", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.save_dir", str(in_tmp)]  # fmt: skip
    try:
        main(args)
    finally:
        wandb.finish()
    runs = list((in_tmp / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B must run offline without an API key"
    saved = (runs[0] / "files" / "config.yaml").read_text()
    assert "advtrain.maximizers.PGD" in saved and "run_name: wb" in saved
    assert "wandb sync" in caplog.text and runs[0].name in caplog.text


def test_empty_split_stops_with_a_message(in_tmp, caplog):
    args = ["fit", "--config", QUICKSTART, "--config", SMOKE, "--data.init_args.val_size", "4600"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "val_size" in caplog.text


_RECIPE_DATA = {"CIFAR10DataModule": "cifar10", "MNISTDataModule": "mnist", "MNIST5kDataModule": None}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_runs_fast_dev_run(recipe, in_tmp, monkeypatch):
    """One training and one validation batch of every recipe, on small files in torchvision's on-disk formats."""
    from fake_datasets import accept_fake_checksums, write_fake_cifar10, write_fake_mnist

    text = recipe.read_text()
    _write_recipe_extra_data(recipe)
    kind = next((v for k, v in _RECIPE_DATA.items() if k in text), "missing")
    assert kind != "missing", f"{recipe.name}: add its datamodule to _RECIPE_DATA"
    args = ["fit", "--config", str(recipe), "--trainer.fast_dev_run", "true", "--data.init_args.batch_size", "4"]
    if kind is not None:
        fake = {"cifar10": write_fake_cifar10, "mnist": write_fake_mnist}[kind](in_tmp / "data", n_train=40, n_test=8)
        accept_fake_checksums(monkeypatch, fake)
        args += ["--data.init_args.root", str(in_tmp / "data"), "--data.init_args.download", "false",
                 "--data.init_args.num_workers", "0", "--data.init_args.val_size", "8"]  # fmt: skip
    cli = main(args)
    assert "val/clean_acc" in cli.trainer.callback_metrics


MNIST_FRAGMENTS = sorted((ROOT / "configs" / "maximizer").glob("*_mnist.yaml")) + [
    ROOT / "configs" / "maximizer" / "standard.yaml"
]


@pytest.mark.parametrize("fragment", MNIST_FRAGMENTS, ids=lambda p: p.stem)
def test_maximizer_fragments_compose_onto_the_quickstart(fragment, in_tmp):
    cli = main(["fit", "--config", QUICKSTART, "--config", str(fragment), "--trainer.fast_dev_run", "true"])
    assert "val/robust_acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    "args, names",
    [
        (["evaluate", "--suite", "autoatack"], ['"suite"', "'autoattack'", "'full'", "autoatack"]),
        (["fit", "--trainer.max_epochs", "ten"], ['"trainer.max_epochs"', "int", "ten"]),
        (["evaluate", "--attacks", "[{class_path: FMN, init_args: {norm: l3}}]"],
         ['"attacks"', "FMN", '"norm"', "'l0', 'l1', 'l2', 'linf'", "l3"]),
    ],
)  # fmt: skip
def test_a_bad_value_is_a_short_error_naming_the_key_and_what_it_takes(tmp_path, args, names):
    """Through ``python -m advtrain``: a bad value of an optional key exits 2 with a one-line usage, the tip, and the
    error naming the key, what it accepts and the value given, not argparse's 70-line usage and jsonargparse's account
    of both branches of ``X | None``."""
    code, out = run_cli(*args, cwd=tmp_path)
    lines = out.strip().splitlines()
    assert code == 2, out
    assert lines[0].startswith(f"usage: python -m advtrain {args[0]} ") and len(lines) <= 6, out
    assert "Traceback" not in out and "NoneType" not in out and "Union subtypes" not in out, out
    for name in names:
        assert name in out, (name, out)
