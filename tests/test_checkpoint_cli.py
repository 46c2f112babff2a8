"""Checkpoints and run folders through ``python -m advtrain`` in a subprocess, as a user meets them: what is printed
(one line, exit status 2, no traceback, for bad input) and what is left on disk.

``last.ckpt`` follows training; explicit flags > ``--config`` files > the checkpoint's hyperparameters > defaults; every
``--ckpt_path`` goes through the safe loader (``--trust_checkpoint true`` the opt-in); ``--ckpt_path last`` is the run's
own ``last.ckpt``; a run folder holds one run, used by one process at a time, under a valid name.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, run_advtrain

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# A few steps of a small SmallCNN on the embedded digits: each run takes seconds.
TINY = ["--config", QUICKSTART, "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--model.arch_kwargs", '{"width": 4, "hidden": 8}',
        "--model.maximizer.init_args.steps", "1", "--model.val_attack.init_args.steps", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8",
        "--data.init_args.num_workers", "0"]  # fmt: skip


class InterruptAt(pl.Callback):
    """Raises KeyboardInterrupt (Ctrl-C) at the start of training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class DumpModule(pl.Callback):
    """Writes ``module-<stage>.json``: the hyperparameters the module was built with (what the CLI resolved)."""

    def setup(self, trainer, pl_module, stage) -> None:
        attack, maximizer = pl_module.val_attack, pl_module.maximizer
        facts = {"val_attack_eps": None if attack is None else attack.eps, "maximizer_eps": maximizer.eps,
                 "maximizer_steps": maximizer.steps, "arch_kwargs": pl_module.hparams.arch_kwargs}  # fmt: skip
        Path(f"module-{getattr(stage, 'value', stage)}.json").write_text(json.dumps(facts))  # TrainerFn: "fit", ...


def _with_callback(folder: Path, name: str, **init_args) -> list[str]:
    """``--config`` arguments appending a test callback to the trainer's callbacks."""
    config = folder / f"{name}.yaml"
    entry = {"class_path": f"test_checkpoint_cli.{name}", "init_args": init_args}
    config.write_text(json.dumps({"trainer": {"callbacks+": [entry]}}))
    return ["--config", config]


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The user sees exit status 2 and a message holding ``needles``, without a traceback."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in done.stderr, done.stderr[-3000:]
    return done.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding ``checkpoints/p/``: 2 epochs of the tiny quickstart (PGD-1 at ε = 0.3)."""
    folder = tmp_path_factory.mktemp("trained")
    done = run_advtrain("fit", *TINY, "--run_name", "p", "--trainer.max_epochs", "2", cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture
def workdir(trained, tmp_path) -> Path:
    """A private copy of the trained folder."""
    shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------- 1. last.ckpt follows


def test_last_ckpt_follows_training_when_robust_accuracy_plateaus(tmp_path):
    # A learning rate of 0 (the SmallCNN has no BatchNorm) and ε = 0: the same robust accuracy on the same validation
    # batch in every epoch, so the best (by strict improvement) stays epoch 0 while training goes on.
    done = run_advtrain("fit", *TINY, "--run_name", "x", "--trainer.max_epochs", "4", "--threat.eps", "0.0",
                        "--model.optimizer.init_args.lr", "0.0", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "checkpoints" / "x"
    last = _ckpt(folder / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (3, 8)  # the end of the 4th epoch, not the best epoch
    best = sorted(p.name for p in folder.glob("best-*.ckpt"))
    assert len(best) == 1 and best[0].startswith("best-epoch000-") and _ckpt(folder / best[0])["epoch"] == 0
    assert sorted(p.name for p in folder.iterdir()) == [best[0], "config.yaml", "last.ckpt"]  # no lock left


def test_ctrl_c_saves_last_ckpt_at_the_interrupted_step(tmp_path):
    callback = _with_callback(tmp_path, "InterruptAt", step=3)
    done = run_advtrain("fit", *TINY, *callback, "--run_name", "x", "--trainer.max_epochs", "4", cwd=tmp_path)
    assert done.returncode != 0 and "Interrupted: saved checkpoints/x/last.ckpt" in done.stderr, done.stderr[-3000:]
    folder = tmp_path / "checkpoints" / "x"
    last = _ckpt(folder / "last.ckpt")
    assert last["global_step"] == 3 and last["ExactResume"]["mid_epoch"]  # epoch 1, after its first batch
    assert not (folder / ".lock").exists()
    resumed = run_advtrain("fit", *TINY, "--run_name", "x", "--trainer.max_epochs", "2", "--ckpt_path", "last",
                           cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _ckpt(folder / "last.ckpt")["global_step"] == 4


# ------------------------------------------------------------------------------------------- 2. one precedence rule


def test_flags_beat_the_checkpoint_hyperparameters_in_validate(workdir):
    """``--threat.eps 0.0`` reaches the validation attack through the recipe's ``${threat.eps}``; the recipe's PGD-10
    beats the checkpoint's PGD-1; the checkpoint's ``arch_kwargs`` (given to fit as a flag, not in the recipe) beat
    the defaults, or its weights would not fit. validate leaves the run's config.yaml alone."""
    config = (workdir / "checkpoints" / "p" / "config.yaml").read_bytes()
    probe = _with_callback(workdir, "DumpModule")
    args = ["--config", QUICKSTART, *probe, "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
            "--ckpt_path", "checkpoints/p/last.ckpt", "--run_name", "p",
            "--data.init_args.num_workers", "0"]  # fmt: skip
    done = run_advtrain("validate", *args, "--threat.eps", "0.0", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads((workdir / "module-validate.json").read_text())
    assert facts == {"val_attack_eps": 0.0, "maximizer_eps": 0.0, "maximizer_steps": 10,
                     "arch_kwargs": {"width": 4, "hidden": 8}}  # fmt: skip
    assert (workdir / "checkpoints" / "p" / "config.yaml").read_bytes() == config
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["p"]  # no folder for validate's run name


def test_flags_beat_the_checkpoint_hyperparameters_in_evaluate(workdir):
    """evaluate attacks at the validation attack's ε that the flag gave (through the recipe), on the checkpoint's
    architecture (its arch_kwargs, stated nowhere else)."""
    args = ["--config", QUICKSTART, "--trainer.logger", "false", "--ckpt_path", "checkpoints/p/last.ckpt",
            "--max_samples", "8", "--steps", "1", "--progress", "false", "--plots", "false", "--output", "out",
            "--data.init_args.num_workers", "0"]  # fmt: skip
    done = run_advtrain("evaluate", *args, "--threat.eps", "0.05", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "out" / "report.json").read_text())["eps"] == 0.05  # the checkpoint's is 0.3


def test_an_explicit_null_beats_the_checkpoint_in_test(workdir):
    probe = _with_callback(workdir, "DumpModule")
    done = run_advtrain("test", *TINY, *probe, "--ckpt_path", "checkpoints/p/last.ckpt", "--model.val_attack", "null",
                        cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads((workdir / "module-test.json").read_text())
    assert facts["val_attack_eps"] is None and facts["maximizer_steps"] == 1


def test_flags_beat_the_checkpoint_hyperparameters_when_resuming(workdir):
    probe = _with_callback(workdir, "DumpModule")
    done = run_advtrain("fit", *TINY, *probe, "--run_name", "p", "--ckpt_path", "checkpoints/p/last.ckpt",
                        "--trainer.max_epochs", "3", "--model.maximizer.init_args.steps", "2", cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "module-fit.json").read_text())["maximizer_steps"] == 2
    assert _ckpt(workdir / "checkpoints" / "p" / "last.ckpt")["epoch"] == 2


# --------------------------------------------------------------------------------- 3. one safe loader for --ckpt_path


@pytest.mark.parametrize("subcommand, damage", [("validate", "zero-byte"), ("fit", "truncated")])
def test_a_damaged_checkpoint_is_one_line(workdir, subcommand, damage):
    path = workdir / "damaged.ckpt"
    data = (workdir / "checkpoints" / "p" / "last.ckpt").read_bytes()
    path.write_bytes(b"" if damage == "zero-byte" else data[: len(data) // 2])
    done = run_advtrain(subcommand, *TINY, "--run_name", "q", "--ckpt_path", path, cwd=workdir)
    _one_line_error(done, "damaged.ckpt is truncated or corrupt")
    assert not (workdir / "checkpoints" / "q").exists()


def test_a_foreign_class_path_is_refused_before_it_is_imported(workdir):
    """A pickle-free checkpoint naming ``zen_marker.Zen``: refused by the allow-list; the module, whose import
    writes a marker file, is never imported."""
    marker = workdir / "imported.txt"
    (workdir / "zen_marker.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Zen: ...\n")
    ckpt = _ckpt(workdir / "checkpoints" / "p" / "last.ckpt")
    ckpt["hyper_parameters"]["val_attack"] = {"class_path": "zen_marker.Zen", "init_args": {}}
    torch.save(ckpt, workdir / "foreign.ckpt")
    path = os.pathsep.join([str(workdir), str(ROOT / "tests"), str(ROOT)])
    done = run_advtrain("validate", *TINY, "--ckpt_path", "foreign.ckpt", cwd=workdir, env={"PYTHONPATH": path})
    _one_line_error(done, "asks to import ['zen_marker.Zen']", "--trust_checkpoint true")
    assert not marker.exists()


class _Payload:
    """Unpickles to 42 through ``pickle.loads``: a checkpoint holding it needs code execution to load."""

    def __reduce__(self):
        return (pickle.loads, (pickle.dumps(42),))


@pytest.mark.parametrize("subcommand", ["validate", "fit"])
def test_trust_checkpoint_works_from_the_cli(workdir, subcommand):
    ckpt = _ckpt(workdir / "checkpoints" / "p" / "last.ckpt")
    ckpt["payload"] = _Payload()
    torch.save(ckpt, workdir / "pickled.ckpt")
    args = [subcommand, *TINY, "--run_name", "q", "--trainer.max_epochs", "3", "--ckpt_path", "pickled.ckpt"]
    _one_line_error(run_advtrain(*args, cwd=workdir), "would run code", "--trust_checkpoint true")
    done = run_advtrain(*args, "--trust_checkpoint", "true", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------------------------- 4. --ckpt_path last, this run's


def test_ckpt_path_last_resumes_the_runs_own_last_ckpt_and_says_which(workdir):
    # A stray last-v1.ckpt, newer than last.ckpt (Lightning's name for a second last.ckpt in one folder), is ignored.
    stray = _ckpt(workdir / "checkpoints" / "p" / "last.ckpt")
    stray["epoch"] = 7
    torch.save(stray, workdir / "checkpoints" / "p" / "last-v1.ckpt")
    done = run_advtrain("fit", *TINY, "--run_name", "p", "--ckpt_path", "last", "--trainer.max_epochs", "3",
                        cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming from checkpoints/p/last.ckpt, saved at epoch 1 (global step 4)" in done.stderr
    assert _ckpt(workdir / "checkpoints" / "p" / "last.ckpt")["epoch"] == 2


def test_a_misspelled_run_name_with_ckpt_path_last_is_an_error(workdir):
    done = run_advtrain("fit", *TINY, "--run_name", "pp", "--ckpt_path", "last", cwd=workdir)
    _one_line_error(done, "there is no run 'pp' to resume", "Did you mean: p?")
    assert not (workdir / "checkpoints" / "pp").exists()


def test_fast_dev_run_leaves_nothing_to_resume(tmp_path):
    done = run_advtrain("fit", *TINY, "--run_name", "r", "--trainer.fast_dev_run", "true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("checkpoints/**/*.*"))
    resumed = run_advtrain("fit", *TINY, "--run_name", "r", "--ckpt_path", "last", cwd=tmp_path)
    _one_line_error(resumed, "there is no run 'r' to resume")


# ------------------------------------------------------------------------------------------------- 5. run folders


def test_a_second_run_under_the_same_name_is_refused(workdir):
    folder = workdir / "checkpoints" / "p"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    done = run_advtrain("fit", *TINY, "--run_name", "p", "--trainer.max_epochs", "1", cwd=workdir)
    _one_line_error(done, "checkpoints/p/ already holds a run", "Pass --ckpt_path last to resume it")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_run_folder_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    folder = tmp_path / "checkpoints" / "busy"
    folder.mkdir(parents=True)
    (folder / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}")  # this test's process: alive
    done = run_advtrain("fit", *TINY, "--run_name", "busy", "--trainer.max_epochs", "1", cwd=tmp_path)
    _one_line_error(done, f"checkpoints/busy/ is in use by process {os.getpid()}")
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a process that has ended: its lock is stale
    dead.wait()
    (folder / ".lock").write_text(f"{dead.pid} {socket.gethostname()}")
    done = run_advtrain("fit", *TINY, "--run_name", "busy", "--trainer.max_epochs", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"left by process {dead.pid}, which no longer runs" in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.yaml", "last.ckpt", *_best(folder)])


def _best(folder: Path) -> list[str]:
    return [p.name for p in folder.glob("best-*.ckpt")]


@pytest.mark.parametrize("name", ["", "../x", "a/b"])
def test_an_invalid_run_name_is_one_line(tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    done = run_advtrain("fit", *TINY, "--run_name", name, "--trainer.max_epochs", "1", cwd=work)
    _one_line_error(done, f"Invalid --run_name {name!r}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["work"]  # nothing written, inside or outside
