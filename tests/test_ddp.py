"""Training under DDP (2 CPU processes, gloo): every maximizer trains through Lightning's ``ddp`` strategy, and MMA's
per-example margins are exactly what one process would hold after seeing the same samples."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_mma import _linear_case

from advtrain.maximizers import MMA

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
FRAGMENTS = sorted((ROOT / "configs" / "maximizer").glob("*_mnist.yaml")) + [
    ROOT / "configs" / "maximizer" / "standard.yaml"
]

# Two uneven batches per rank: (rank, step) -> positions in the 12-example linear problem of test_mma.
_PARTS = {(0, 0): [0, 1, 2, 3, 4, 5, 6], (1, 0): [7, 8, 9, 10, 11], (0, 1): [11, 3, 5], (1, 1): [0, 8, 9, 1]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mma() -> MMA:
    return MMA(norm="linf", max_eps=0.5, min_eps=0.005, steps=5, bisection_steps=12)


def _step(mma: MMA, model, x, y, rank: int, step: int) -> None:
    positions = torch.tensor(_PARTS[(rank, step)])
    torch.manual_seed(100 * step + rank)  # each rank's random starts, replayed by the single-process reference
    mma(model, x[positions], y[positions], 100 + positions)


def _margins_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    model, x, y = _linear_case()
    # The reference first, before the process group exists: one process seeing every rank's batches in turn.
    reference = _mma()
    for step in range(2):
        for r in range(world):
            _step(reference, model, x, y, r, step)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mma = _mma()
        for step in range(2):
            _step(mma, model, x, y, rank, step)
        torch.save({"ddp": mma.margins.clone(), "single": reference.margins.clone()}, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_mma_margins_under_two_processes_equal_one_process(tmp_path):
    mp.spawn(_margins_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        single, ddp = got["single"], got["ddp"]
        assert ddp.shape == single.shape == (112,)
        assert torch.equal(ddp, single), f"rank {rank}: margins differ from the single-process run"
        # Not a vacuous equality: both ranks' correct examples hold margins, including those only the other rank saw.
        other = [p for (r, _), ps in _PARTS.items() if r != rank for p in ps]
        assert (ddp[100 + torch.tensor(other)] > 0).sum() >= 3


class RankDump(pl.Callback):
    """Saves each rank's module state at the start and the end of training (used by the subprocess runs below)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "step": trainer.global_step, "per_batch": pl_module.maximizer.steps_per_batch},
                   Path(self.folder, f"{when}-rank{trainer.global_rank}.pt"))  # fmt: skip

    def on_train_start(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "end")


def _ddp_fit(fragment: Path, tmp_path: Path, *extra_args: str) -> subprocess.CompletedProcess:
    extra = tmp_path / "extra.yaml"
    extra.write_text(f"trainer:\n  callbacks+:\n    - class_path: test_ddp.RankDump\n"
                     f"      init_args: {{folder: '{tmp_path}'}}\n")  # fmt: skip
    args = [sys.executable, "-m", "advtrain", "fit", "--config", QUICKSTART, "--config", str(fragment),
            "--config", str(extra), "--run_name", "ddp", "--trainer.logger", "false",
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--model.val_attack.init_args.steps", "2",
            "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8",
            "--data.init_args.num_workers", "0", *extra_args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}  # fmt: skip
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _check_trained_under_ddp(fragment: Path, tmp_path: Path, *extra_args: str) -> dict:
    done = _ddp_fit(fragment, tmp_path, *extra_args)
    assert done.returncode == 0, done.stderr[-3000:]
    start = [torch.load(tmp_path / f"start-rank{r}.pt") for r in range(2)]
    end = [torch.load(tmp_path / f"end-rank{r}.pt") for r in range(2)]
    # Two batches on each rank: two optimizer steps, or 2m for Free AT's m replays.
    assert end[0]["step"] == end[1]["step"] == 2 * end[0]["per_batch"]
    assert end[0]["per_batch"] == (4 if fragment.stem == "free_mnist" else 1)
    for key, value in end[0]["state"].items():
        if key == "maximizer.delta":
            # Free AT's carried δ: DDP broadcasts rank 0's buffers at each step's forward, then each rank's replays
            # move δ on its own images (advtrain.maximizers.FreeAT), so the ranks hold different δ between steps.
            continue
        # DDP keeps the ranks in lockstep: identical weights, BatchNorm statistics and (MMA) margins.
        assert torch.equal(value, end[1]["state"][key]), f"{fragment.stem}: {key} differs between the ranks"
    moved = [
        k for k, v in end[0]["state"].items() if k.startswith("model.") and not torch.equal(v, start[0]["state"][k])
    ]
    assert moved, f"{fragment.stem}: no weight changed in two steps"
    assert (tmp_path / "checkpoints" / "ddp" / "last.ckpt").is_file()
    return end[0]["state"]


def test_mma_trains_under_lightning_ddp(tmp_path):
    """The fast smoke of the default run: MMA (per-example state, an all-gather per step) through ``--trainer.strategy
    ddp`` with 2 CPU processes."""
    from test_resume import _pretrained

    # From weights that classify most digits, so that MMA stores margins (an untrained model has no correct samples).
    init = _pretrained(tmp_path / "init.pt")
    state = _check_trained_under_ddp(ROOT / "configs" / "maximizer" / "mma_mnist.yaml", tmp_path,
                                     "--model.init_weights", str(init))  # fmt: skip
    # 2 ranks x 2 steps x 8 samples: more than 16 stored margins means each rank holds the other's writes too.
    assert state["maximizer.margins"].count_nonzero() > 16


@pytest.mark.slow
@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_every_maximizer_trains_under_lightning_ddp(fragment, tmp_path):
    _check_trained_under_ddp(fragment, tmp_path)
