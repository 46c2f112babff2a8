"""Bad input gets one actionable line, not a traceback and not silence.

Through the CLI in a subprocess, as a user runs it: what is printed (the key, the value, what to write instead), the
exit status (2) and what is left on disk. Python-API inputs (labels, budgets, models, dtypes) are checked in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import LinearNet, TinyCNN, random_batch, run_cli
from torch import nn
from torch.utils.data import TensorDataset

from advtrain.attacks import APGD, PGD
from advtrain.errors import InvalidConfigError, InvalidInputError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
SMOKE = str(ROOT / "configs" / "trainer" / "smoke.yaml")
TINY = ["--config", QUICKSTART, "--config", SMOKE, "--model.maximizer.init_args.steps", "1",
        "--model.val_attack.init_args.steps", "1", "--data.init_args.batch_size", "8",
        "--data.init_args.eval_batch_size", "8", "--trainer.enable_progress_bar", "false"]  # fmt: skip


def _one_line_refusal(code: int, out: str, *needles: str) -> None:
    assert code == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-3000:]}"


# --------------------------------------------------------------------------------------------- parse time (fit)


def test_abbreviated_key_is_refused_at_parse_time(tmp_path):
    code, out = run_cli("fit", *TINY, "--trainer.max_epoch", "3", cwd=tmp_path)
    _one_line_refusal(code, out, "unrecognized arguments: --trainer.max_epoch 3", "trainer.max_epochs")
    assert not (tmp_path / "checkpoints").exists()


def test_a_batch_count_of_one_stays_one_batch(tmp_path):
    """Lightning annotates limit_*_batches ``float | int``: the CLI parsed ``1`` (one batch) as 1.0 (every batch)."""
    code, out = run_cli("fit", "--config", QUICKSTART, "--trainer.limit_val_batches", "1",
                             "--trainer.limit_train_batches", "0.5", "--print_config", cwd=tmp_path)  # fmt: skip
    assert code == 0, out[-3000:]
    assert "  limit_val_batches: 1\n" in out and "  limit_train_batches: 0.5\n" in out


def test_linf_budget_above_one_is_refused(tmp_path):
    code, out = run_cli("fit", *TINY, "--threat.eps", "8", cwd=tmp_path)
    _one_line_refusal(code, out, "eps=8.0 with norm 'linf' exceeds 1", "8/255")
    assert not (tmp_path / "checkpoints").exists()


def test_multistep_milestone_outside_training_stops_before_the_run_starts(tmp_path):
    args = ["--model.lr_scheduler.class_path", "advtrain.training.schedules.MultiStep",
            "--model.lr_scheduler.init_args.milestones", "[0.5, 1.5]"]  # fmt: skip
    wandb = ["--trainer.logger", "pytorch_lightning.loggers.WandbLogger", "--trainer.logger.init_args.save_dir", "."]
    code, out = run_cli("fit", *TINY, *args, *wandb, cwd=tmp_path)
    _one_line_refusal(code, out, "model.lr_scheduler", "[0.5, 1.5]", "(0, 1)")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "wandb").exists()  # no W&B run was started


def test_undefined_interpolation_names_the_key(tmp_path):
    code, out = run_cli("fit", *TINY, "--model.maximizer.init_args.eps", "${nonexistent}", cwd=tmp_path)
    _one_line_refusal(code, out, "model.maximizer.init_args.eps", "nonexistent")


def test_yaml_error_names_the_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("trainer:\n  max_epochs: [1\n")
    code, out = run_cli("fit", *TINY, "--config", "broken.yaml", cwd=tmp_path)
    _one_line_refusal(code, out, '"broken.yaml", line')
    assert "<unicode string>" not in out


def test_unwritable_checkpoint_folder_stops_before_training(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")  # as root, chmod cannot deny writes
    code, out = run_cli("fit", *TINY, "--run_name", "x", cwd=tmp_path)
    _one_line_refusal(code, out, "Cannot write to the checkpoint folder", "checkpoints/x (Not a directory)", "dirpath")


def test_mismatched_mnist_files_are_named(tmp_path):
    import numpy as np
    from fake_datasets import _write_idx, write_fake_mnist

    fake = write_fake_mnist(tmp_path / "data", n_train=40, n_test=8)
    _write_idx(fake.folder / "train-labels-idx1-ubyte", fake.train_labels[:30].astype(np.uint8))  # another download
    data = ["--data", "advtrain.data.MNISTDataModule", "--data.init_args.root", "data", "--data.init_args.download",
            "false", "--data.init_args.num_workers", "0", "--data.init_args.val_size", "8"]  # fmt: skip
    code, out = run_cli("fit", *TINY, *data, cwd=tmp_path)
    _one_line_refusal(code, out, "MNIST training files in", "do not match: 40 images but 30 labels")


# ------------------------------------------------------------------------------------------------------ evaluate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    code, out = run_cli("fit", *TINY, "--run_name", "tiny", "--trainer.limit_train_batches", "1", cwd=folder)
    assert code == 0, out[-3000:]
    return folder / "checkpoints" / "tiny" / "last.ckpt"


def _evaluate(checkpoint: Path, *args: str, cwd: Path):
    return run_cli("evaluate", *TINY, "--ckpt_path", str(checkpoint), "--max_samples", "8", "--steps", "1",
                        "--plots", "false", *args, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--eps_grid", "[0.1, -0.2]"], ["eps_grid[1]", "-0.2", ">= 0"]),
        (["--max_samples", "0"], ["max_samples must be >= 1", "got 0"]),
        (["--batch_size", "0"], ["batch_size must be >= 1", "got 0"]),
        (["--suite", "apgd", "--overrides", "{apgd_ce: {steps: 3}}"], ["'apgd_ce' is not", "apgd-ce, apgd-dlr"]),
        (["--suite", "quick", "--overrides", "{pgd20: {stepz: 3}}"], ["pgd20 has no hyperparameter 'stepz'"]),
        (["--norm", "l2"], ["--norm l2 differs", "linf, eps=0.3", "pass --eps"]),
        (["--eps", "2"], ["eps=2.0 with norm 'linf' exceeds 1"]),
        (["--arch", "preact_resnet18"], ["--arch preact_resnet18: the weights in", "missing", "unexpected"]),
    ],
    ids=["negative-eps-grid", "max-samples-0", "batch-size-0", "unknown-override", "unknown-hyperparameter",
         "l2-with-linf-eps", "linf-eps-above-1", "arch-mismatch"],
)  # fmt: skip
def test_evaluate_refuses_bad_options_in_one_line(checkpoint, tmp_path, args, needles):
    code, out = _evaluate(checkpoint, "--output", "report", *args, cwd=tmp_path)
    _one_line_refusal(code, out, *needles)
    assert not (tmp_path / "report" / "report.json").exists()


def test_evaluate_output_onto_a_file_is_refused(checkpoint, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    code, out = _evaluate(checkpoint, "--output", "taken", cwd=tmp_path)
    _one_line_refusal(code, out, "--output taken is a file")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_evaluate_logs_to_every_logger_and_follows_the_trainer(checkpoint, tmp_path):
    """The report scalars go to a CSV logger; --trainer.precision bf16-mixed puts the attacks under autocast;
    --trainer.enable_progress_bar false hides the bar."""
    csv = ["--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", "logs",
           "--trainer.precision", "bf16-mixed"]  # fmt: skip
    code, out = _evaluate(checkpoint, "--output", "report", *csv, cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert "evaluate:" in out and "img/s" not in out and "it/s" not in out  # no progress bar
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all("autocast='bf16'" in a["config"] for a in report["attacks"].values()), report["attacks"]
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "robust/All/acc" in metrics.splitlines()[0] and len(metrics.splitlines()) == 2


def test_evaluate_does_not_overwrite_a_report_unless_told(checkpoint, tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text("{}")  # an earlier evaluation's report
    code, out = _evaluate(checkpoint, "--output", "report", cwd=tmp_path)
    _one_line_refusal(code, out, "report already holds a report", "--overwrite true")
    assert (tmp_path / "report" / "report.json").read_text() == "{}"

    code, out = _evaluate(checkpoint, "--output", "report", "--overwrite", "true", cwd=tmp_path)
    assert code == 0, out[-3000:]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["samples"] == 8


def test_predict_writes_per_sample_predictions_next_to_the_checkpoint(checkpoint, tmp_path):
    import csv
    import shutil

    ckpt = tmp_path / "model.ckpt"
    shutil.copy(checkpoint, ckpt)
    (tmp_path / "one_batch.yaml").write_text("trainer:\n  limit_predict_batches: 1\n")
    args = ["predict", *TINY, "--config", "one_batch.yaml", "--ckpt_path", str(ckpt)]
    code, out = run_cli(*args, "--adversarial", "true", cwd=tmp_path)
    assert code == 0, out[-3000:]
    rows = list(csv.DictReader((tmp_path / "model-predictions.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(8))  # one batch of the test split, in order
    assert list(rows[0])[:4] == ["index", "label", "pred", "adv_pred"] and len(rows[0]) == 4 + 10
    for row in rows:
        probs = [float(row[f"prob_{k}"]) for k in range(10)]
        assert abs(sum(probs) - 1) < 1e-4 and int(row["pred"]) == max(range(10), key=probs.__getitem__)
    code, out = run_cli(*args, cwd=tmp_path)  # the file is kept
    _one_line_refusal(code, out, "model-predictions.csv already exists", "--overwrite true")


# --------------------------------------------------------------------------------------------------- Python API


def test_float_labels_from_a_dataset_are_refused_not_truncated():
    from advtrain.data.base import IndexedSubset

    images = torch.rand(3, 1, 4, 4)
    subset = IndexedSubset([(images[0], 1), (images[1], 2.7), (images[2], torch.tensor(1.0))], range(3))
    assert subset[0][1] == 1
    with pytest.raises(InvalidInputError, match=r"label 2.7 \(float\): labels must be integer class indices"):
        subset[1]
    with pytest.raises(InvalidInputError, match="labels must be integer class indices"):
        subset[2]


def test_int32_labels_are_refused_by_the_label_check():
    from advtrain.engine.checks import check_labels

    with pytest.raises(InvalidInputError, match=r"int64 \(torch.long\).*got torch.int32: use y.long\(\)"):
        check_labels(torch.tensor([0, 1], dtype=torch.int32), 10)
    with pytest.raises(InvalidInputError, match="int64"):
        PGD(eps=0.1, steps=1)(TinyCNN().eval(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1], dtype=torch.int32))


@pytest.mark.parametrize("eps,message", [("8/255", r"string '8/255': pass eps=0.0313725"), (8, "exceeds 1")])
def test_budget_strings_and_pixel_scale_budgets_are_refused(eps, message):
    from advtrain.maximizers import PGD as PGDMaximizer

    for cls in (PGD, APGD, PGDMaximizer):
        with pytest.raises(InvalidConfigError, match=message):
            cls(eps=eps)
    assert PGD(norm="l2", eps=8).eps == 8.0  # an L2 budget above 1 is legitimate


class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.model, self.kind = TinyCNN().eval(), kind

    def forward(self, x):
        logits = self.model(x)
        return (logits, x) if self.kind == "tuple" else {"logits": logits}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_model_returning_a_tuple_or_dict_is_named(kind):
    from advtrain.evaluation import evaluate_robustness

    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(InvalidInputError, match=f"the model returned a {kind}.*not a logits tensor"):
        PGD(eps=0.1, steps=1)(_Returns(kind), x, y)
    with pytest.raises(InvalidInputError, match=f"the model returned a {kind}"):
        evaluate_robustness(_Returns(kind), TensorDataset(x, y), {"pgd": PGD(eps=0.1, steps=1)}, progress=False)


def test_float64_inputs_and_wrong_channels_are_named():
    from advtrain.evaluation import evaluate_robustness
    from advtrain.training import AdversarialTraining

    model, y = TinyCNN().eval(), torch.tensor([0, 1])
    with pytest.raises(InvalidInputError, match=r"inputs are torch.float64 .* x.to\(torch.float32\)"):
        PGD(eps=0.1, steps=1)(model, torch.rand(2, 1, 8, 8, dtype=torch.float64), y)
    data = TensorDataset(torch.rand(2, 1, 8, 8, dtype=torch.float64), y)
    with pytest.raises(InvalidInputError, match="inputs are torch.float64"):
        evaluate_robustness(model, data, {"pgd": PGD(eps=0.1, steps=1)}, progress=False)
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
    with pytest.raises(InvalidInputError, match=r"shape \(C, H, W\) = \(3, 28, 28\) .* built for \(1, 28, 28\)"):
        module._check(torch.rand(2, 3, 28, 28), y)


def test_targeted_attacks_are_refused_where_only_true_labels_exist():
    from advtrain.evaluation import evaluate_robustness
    from advtrain.training import AdversarialTraining

    x, y = torch.rand(4, 64), torch.tensor([0, 1, 2, 3])
    with pytest.raises(InvalidConfigError, match="'pgd' is targeted .* Use targeted=False"):
        evaluate_robustness(LinearNet(64, 10), TensorDataset(x, y), {"pgd": PGD(eps=0.1, targeted=True)},
                            progress=False)  # fmt: skip
    with pytest.raises(InvalidConfigError, match="model.val_attack: a targeted attack"):
        AdversarialTraining(arch="small_cnn", val_attack=PGD(eps=0.1, targeted=True))


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from advtrain.evaluation import evaluate_robustness, write_report

    x, y = torch.rand(8, 64), torch.arange(8)
    report = evaluate_robustness(LinearNet(64, 10), TensorDataset(x, y), {"pgd": PGD(eps=0.05, steps=2)},
                                 progress=False)  # fmt: skip
    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a backend other than Agg, as a notebook's inline backend is
    try:
        write_report(report, tmp_path / "out", {}, plots=True)
        assert matplotlib.get_backend() == "pdf"
        assert (tmp_path / "out" / "accuracy_vs_eps.png").stat().st_size > 0
    finally:
        matplotlib.use(before)


def test_wandb_key_for_a_self_hosted_server_in_netrc_is_found(tmp_path, monkeypatch):
    from advtrain import cli

    netrc = tmp_path / "netrc"
    netrc.write_text("machine wandb.example.org\n  login user\n  password " + "0" * 40 + "\n")
    netrc.chmod(0o600)
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    probed = []
    monkeypatch.setattr(cli, "_wandb_unreachable", lambda url: probed.append(url))  # the server answers
    cli._configure_wandb()
    assert probed == ["https://wandb.example.org"]
    assert "WANDB_MODE" not in __import__("os").environ  # online, as the user's key asks


def test_seed_everything_reaches_the_data_split(tmp_path, monkeypatch):
    from advtrain.cli import build_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    cli = build_cli(["--config", QUICKSTART, "--seed_everything", "5", "--trainer.logger", "false"], run=False)
    assert cli.datamodule.seed == 5
    cli = build_cli(["--config", QUICKSTART, "--seed_everything", "5", "--data.init_args.seed", "3",
                     "--trainer.logger", "false"], run=False)  # fmt: skip
    assert cli.datamodule.seed == 3  # an explicit data seed still wins


def test_every_third_party_import_is_a_declared_dependency():
    import ast
    import sys

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("-", "_") for d in declared}
    names |= {"yaml" if n == "pyyaml" else "PIL" if n == "pillow" else n for n in names}  # distribution → import name
    imported = set()
    for path in (ROOT / "advtrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "advtrain"}
    assert third_party - names == set(), f"imported but not declared in pyproject.toml: {third_party - names}"
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "advtrain contributors" in (ROOT / "LICENSE").read_text()


def test_epoch_level_train_metrics_are_reduced_over_ranks(monkeypatch, tmp_path):
    """Plain tensors logged per epoch are reduced over the DDP ranks (sync_dist); Metric objects reduce themselves."""
    from torch.utils.data import DataLoader

    from advtrain.cli import AdvTrainer
    from advtrain.training import AdversarialTraining

    logged = {}
    real_log = AdversarialTraining.log

    def recording_log(self, name, value, *args, **kwargs):
        logged[name] = (isinstance(value, torch.Tensor), kwargs.get("sync_dist", False), kwargs.get("on_epoch"))
        return real_log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(AdversarialTraining, "log", recording_log)
    data = TensorDataset(*random_batch(8, (1, 28, 28)), torch.arange(8))
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
    trainer = AdvTrainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))
    plain_epoch = {name: sync for name, (tensor, sync, epoch) in logged.items() if tensor and epoch}
    assert plain_epoch and all(plain_epoch.values()), plain_epoch
