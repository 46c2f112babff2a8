"""Exact resume: a run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends with the same weights, MMA
margins, optimizer state, RNG streams and logged metrics as the uninterrupted run, and continues its W&B run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import random_batch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from advtrain.training.resume import ResumableLoader, rng_states

ROOT = Path(__file__).resolve().parents[1]
_KILL_ENV = "ADVTRAIN_TEST_KILL_AT"


class JsonlLogger(Logger):
    """Appends every logged metric dict to a JSON-lines file (a logger whose output the test can compare exactly)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001 - Lightning's signature
        pass

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001 - Lightning's signature
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **{k: float(v) for k, v in sorted(metrics.items())}}) + "\n")


class KillAt(pl.Callback):
    """SIGKILLs its own process at the start of training step N (when the environment asks), i.e. right after the
    checkpoint of step N was written: no cleanup, no hooks, as a crash or a pre-empted job."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = os.environ.get(_KILL_ENV)
        if at is not None and trainer.global_step == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseAt(pl.Callback):
    """Raises in every rank at the start of training step N (when the environment asks): a crash that Lightning's
    DDP launcher turns into the end of all the ranks (a SIGKILL of one rank would leave the other waiting)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = os.environ.get(_KILL_ENV)
        if at is not None and trainer.global_step == int(at):
            raise RuntimeError("simulated crash")


class SeedPerRank(pl.Callback):
    """Gives each rank its own torch RNG stream at the start of a fresh run (Lightning seeds all ranks alike, and
    ranks drawing the same amounts would then keep identical streams: the per-rank restore would go unseen)."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            torch.manual_seed(1000 + trainer.global_rank)


class FinalDump(pl.Callback):
    """Writes the end state of a run: module state (weights, BatchNorm statistics, MMA margins), optimizer state,
    global RNG streams, the batches' dataset indices in training order."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(f"indices-rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(batch[2].tolist()) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "optimizer": trainer.optimizers[0].state_dict(),
                "rng": rng_states(),
                "global_step": trainer.global_step,
                "loader_is_resumable": isinstance(trainer.fit_loop._combined_loader.flattened[0], ResumableLoader),
            },
            f"final-rank{trainer.global_rank}.pt",
        )


_TRAINER = """
trainer:
  deterministic: true
  log_every_n_steps: 1
  limit_val_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {dirpath: "checkpoints/${run_name}", save_last: true, every_n_train_steps: 1, save_top_k: 0}
"""


def _config(extra: str, callbacks: list[str]) -> str:
    """The common trainer settings (a checkpoint after every step) with ``extra`` trainer keys and test callbacks."""
    listed = "".join(f"    - class_path: test_resume.{name}\n" for name in callbacks)
    return _TRAINER + listed + "".join(f"  {line}\n" for line in extra.strip().splitlines())


_CONFIG = _config(
    """max_epochs: 6
logger:
  - class_path: pytorch_lightning.loggers.WandbLogger
    init_args: {project: advtrain, name: resume, save_dir: .}
  - class_path: test_resume.JsonlLogger
    init_args: {path: metrics.jsonl}""",
    ["KillAt", "FinalDump"],
)


def _pretrained(path: Path) -> Path:
    """A small_cnn trained for 40 clean steps, so that MMA finds correctly classified samples and stores margins from
    the first step (an untrained model has none, and the margins would be zeros in both runs)."""
    from advtrain.data.embedded import load_mnist5k
    from advtrain.data.mnist import MNIST_MEAN, MNIST_STD
    from advtrain.training import AdversarialTraining

    torch.manual_seed(0)
    images, labels = load_mnist5k()
    x, y = torch.from_numpy(images[:2560, None].copy()).float() / 255, torch.from_numpy(labels[:2560].copy()).long()
    perm = torch.randperm(2560)
    # He init pinned: 40 Adam steps from it classify most digits (from PyTorch's default init, fewer).
    model = AdversarialTraining(arch="small_cnn", arch_kwargs={"init": "he"}, mean=MNIST_MEAN, std=MNIST_STD).model
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(40):
        idx = perm[64 * i : 64 * (i + 1)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _fit(cwd: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    (cwd / "resume.yaml").write_text(_CONFIG)
    args = [sys.executable, "-m", "advtrain", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--config", str(ROOT / "configs" / "maximizer" / "mma_mnist.yaml"), "--config", "resume.yaml",
            "--run_name", "r", "--model.maximizer.init_args.steps", "3",  "--model.val_attack.init_args.steps", "2",
            "--data.init_args.train_subset", "32", "--data.init_args.batch_size", "16",
            "--data.init_args.val_size", "32", "--data.init_args.num_workers", "0", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_DIR": str(cwd)}  # fmt: skip
    env.pop(_KILL_ENV, None)
    if kill_at is not None:
        env[_KILL_ENV] = str(kill_at)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    init = ("--model.init_weights", str(_pretrained(tmp_path / "init.pt")))
    done = _fit(straight, *init)
    assert done.returncode == 0, done.stderr[-3000:]

    # 2 batches per epoch, 6 epochs (few samples, so that the model gets confident and MMA stores margins): killed at
    # the start of step 8 (the 2nd batch of epoch 4), after the checkpoint of step 7 was written; resumed from it.
    killed = _fit(broken, *init, kill_at=7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (broken / "final-rank0.pt").exists()
    ckpt = torch.load(broken / "checkpoints" / "r" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 7 and ckpt["ExactResume"]["mid_epoch"]
    resumed = _fit(broken, *init, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from a checkpoint that ended before the epoch ended" not in resumed.stderr

    a, b = torch.load(straight / "final-rank0.pt"), torch.load(broken / "final-rank0.pt")
    assert a["global_step"] == b["global_step"] == 12 and a["loader_is_resumable"]
    # The same batches in the same order: the killed run's 7, then the resumed run's from the 8th.
    seen_a, seen_b = _lines(straight / "indices-rank0.jsonl"), _lines(broken / "indices-rank0.jsonl")
    assert len(seen_a) == 12 and seen_b == seen_a
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), f"{key} differs after resuming"
    assert a["state"]["maximizer.margins"].count_nonzero() > 0  # MMA margins were learnt and match
    for (k1, v1), (k2, v2) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert k1 == k2 and all(torch.equal(v1[n], v2[n]) for n in v1)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["rng"]["numpy"][1], b["rng"]["numpy"][1]) and a["rng"]["python"] == b["rng"]["python"]
    # Every logged value (per step and per epoch, train and validation) is the same, step for step.
    logged_a, logged_b = _lines(straight / "metrics.jsonl"), _lines(broken / "metrics.jsonl")
    assert sum("train/clean_loss_epoch" in row for row in logged_a) == 6 and len(logged_a) == 24
    assert logged_b == logged_a

    # W&B: the resumed run continues the killed one (same id), recorded in the checkpoint.
    runs = sorted(p.name for p in (broken / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1] == ckpt["ExactResume"]["wandb_id"]
    assert "Resuming W&B run" in resumed.stderr


class _Crash(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def _in_process_fit(folder: Path, *, crash_at: int | None = None, ckpt_path: str | None = None):
    """A small in-process fit (PGD with random starts: it draws from the global RNG every step) through AdvTrainer,
    with its budget ramped over the first 2 epochs (a crash mid-ramp must resume at the same budget)."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from advtrain.cli import AdvTrainer
    from advtrain.maximizers import PGD
    from advtrain.training import AdversarialTraining, BudgetRamp

    pl.seed_everything(0, verbose=False)
    data = TensorDataset(*random_batch(40, (1, 28, 28), seed=1), torch.arange(40))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8},
                                 maximizer=PGD(eps=0.1, steps=2, step_size=0.05),
                                 budget_schedule=BudgetRamp(start=0.25, epochs=2))  # fmt: skip
    callbacks = [ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1, save_top_k=0)]
    callbacks += ([_Crash(crash_at)] if crash_at is not None else []) + [FinalDump()]
    trainer = AdvTrainer(max_epochs=3, deterministic=True, logger=JsonlLogger(str(folder / "metrics.jsonl")),
                         log_every_n_steps=1, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=folder)  # fmt: skip
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_resume_in_process_replays_order_rng_and_epoch_metrics(tmp_path, monkeypatch):
    """The fast check of the default run: 5 batches per epoch, a crash at step 7 (mid epoch 2), resume from the
    checkpoint of step 7; same batches, weights, RNG streams and logged metrics as without the crash."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for folder in (straight, broken):
        folder.mkdir()
    monkeypatch.chdir(straight)
    _in_process_fit(straight)
    monkeypatch.chdir(broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _in_process_fit(broken, crash_at=7)
    _in_process_fit(broken, ckpt_path=str(broken / "last.ckpt"))
    a, b = torch.load(straight / "final-rank0.pt"), torch.load(broken / "final-rank0.pt")
    assert a["global_step"] == b["global_step"] == 15
    seen_a, seen_b = _lines(straight / "indices-rank0.jsonl"), _lines(broken / "indices-rank0.jsonl")
    assert len(seen_a) == 15 and seen_b == seen_a  # epoch 2 resumed in its own shuffle, from its 3rd batch
    assert seen_a[5:10] != seen_a[:5]  # (epochs are shuffled differently, so replaying epoch 1's order would show)
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), f"{key} differs after resuming"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]
    assert _lines(broken / "metrics.jsonl") == _lines(straight / "metrics.jsonl")
    # The ramp's epoch means of ε (steps 0-4, 5-9 on the ramp; 10-14 at the full 0.1), logged alike in both runs.
    eps = [row["train/eps"] for row in _lines(broken / "metrics.jsonl") if "train/eps" in row]
    assert eps == pytest.approx([0.1 * (0.25 + 0.75 * 2 / 10), 0.1 * (0.25 + 0.75 * 7 / 10), 0.1], rel=1e-6)


_DDP_CONFIG = _config(
    """max_epochs: 3
strategy: ddp
devices: 2
accelerator: cpu
logger:
  class_path: test_resume.JsonlLogger
  init_args: {path: metrics.jsonl}""",
    ["RaiseAt", "SeedPerRank", "FinalDump"],
)


@pytest.mark.slow
def test_ddp_crash_and_resume_equals_uninterrupted(tmp_path):
    """2 gloo ranks, PGD with random starts (each rank draws from its own RNG stream): crashed at step 5 (mid epoch
    3 of 2-batch epochs per rank), resumed; each rank ends with the uninterrupted run's weights, RNG stream and
    batches, and rank 0 logged the same metrics."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for folder in (straight, broken):
        folder.mkdir()
        (folder / "ddp.yaml").write_text(_DDP_CONFIG)
    args = [sys.executable, "-m", "advtrain", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--config", "ddp.yaml", "--run_name", "r", "--model.maximizer.init_args.steps", "2",
            "--model.val_attack.init_args.steps", "1", "--data.init_args.train_subset", "32",
            "--data.init_args.batch_size", "8", "--data.init_args.val_size", "16",
            "--data.init_args.num_workers", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}  # fmt: skip
    env.pop(_KILL_ENV, None)
    run = dict(env=env, capture_output=True, text=True, timeout=300)
    done = subprocess.run(args, cwd=straight, **run)
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = subprocess.run(args, cwd=broken, **{**run, "env": {**env, _KILL_ENV: "5"}})
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr
    assert torch.load(broken / "checkpoints" / "r" / "last.ckpt", weights_only=True)["global_step"] == 5
    resumed = subprocess.run([*args, "--ckpt_path", "last"], cwd=broken, **run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in range(2):
        a, b = torch.load(straight / f"final-rank{rank}.pt"), torch.load(broken / f"final-rank{rank}.pt")
        assert a["global_step"] == b["global_step"] == 6
        for key, value in a["state"].items():
            assert torch.equal(value, b["state"][key]), f"rank {rank}: {key} differs after resuming"
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), f"rank {rank}: torch RNG stream differs"
        seen = _lines(straight / f"indices-rank{rank}.jsonl")
        assert len(seen) == 6 and _lines(broken / f"indices-rank{rank}.jsonl") == seen
    first, second = torch.load(straight / "final-rank0.pt"), torch.load(straight / "final-rank1.pt")
    assert not torch.equal(first["rng"]["torch"], second["rng"]["torch"])  # the ranks' streams are distinct
    assert _lines(broken / "metrics.jsonl") == _lines(straight / "metrics.jsonl")
