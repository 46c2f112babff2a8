"""Exact resume of a run killed mid-epoch.

Lightning 2.6 restores the weights, optimizer, schedulers, loop progress and callback states, but on its own it
(1) restarts a plain DataLoader from its first batch, in the order of a fresh generator, (2) does not restore the
global RNG streams (torch, NumPy, Python), (3) loses the accumulated state of epoch-level metrics (torchmetrics
objects held by the module and the values logged with ``on_epoch=True``), and (4) starts a new W&B run.

:class:`ResumableFitLoop` wraps the training loader in a :class:`ResumableLoader` (a stateful loader in Lightning's
sense) that replays the epoch's shuffle and skips the batches already trained; :class:`ExactResume` saves and restores
the RNG streams, the metric states and the W&B run id. :class:`advtrain.cli.AdvTrainer` installs both.

Exact (``deterministic`` settings, one process or DDP): weights, optimizer and scheduler state, per-example state
(MMA margins), the batches and their order, the RNG streams seen by every later step, and every logged metric
(step and epoch). Not exact: the RNG of DataLoader worker processes that are *persistent* across epochs (they are
re-created on resume, seeded from the replayed generator: random augmentations in workers may differ; with
``num_workers=0`` or without random augmentation the data are exact); under DDP, main-process random augmentations of
the first batch after resuming on ranks other than 0 (the loader's pre-fetch RNG state is rank 0's); resuming on
another number of processes; the wall-clock timings. Under DDP each rank's RNG streams and running metrics are
all-gathered into the checkpoint (rank 0 writes it) and each rank restores its own.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loops.fit_loop import _FitLoop
from torchmetrics import Metric

from advtrain.errors import UserError
from advtrain.safe_load import read_checkpoint

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """The global RNG streams of this process (torch CPU and CUDA, NumPy, Python)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # NumPy's state as tensors and numbers: checkpoints are read with weights_only=True, which refuses NumPy arrays.
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableLoader:
    """A training DataLoader made stateful: it replays an epoch's shuffle and skips the batches already trained.

    The state is the loader's generator state at the start of the current pass (which fixes the shuffle order and
    the worker seeds), the number of batches trained in it, and the global RNG state just before the next batch was
    fetched (the batch Lightning had prefetched when the checkpoint was written; random augmentations in the main
    process draw from it). Skipped batches are loaded and discarded, so every generator draw happens as in the run
    that was interrupted.

    Args:
        loader: the (already Lightning-processed) training DataLoader.
        trained: returns how many batches of the current pass have been trained (the epoch loop's progress).
    """

    def __init__(self, loader: Any, trained: Any) -> None:
        self.loader = loader
        self._trained = trained
        self._pass_generator: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None
        self._rng_before: deque[tuple[int, dict[str, Any]]] = deque(maxlen=8)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_sampler, dataset, ...: Lightning reads them
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def _generator(self) -> torch.Generator | None:
        generator = getattr(self.loader, "generator", None)
        if generator is None:
            generator = getattr(getattr(self.loader, "sampler", None), "generator", None)
        return generator

    def __iter__(self):
        generator, pending, self._pending = self._generator(), self._pending, None
        skip = 0
        if pending is not None:
            if generator is not None and pending.get("generator") is not None:
                generator.set_state(pending["generator"])
            skip = int(pending["trained"])
        self._pass_generator = generator.get_state() if generator is not None else None
        self._rng_before.clear()
        return self._batches(skip, pending.get("rng_before_next") if pending else None)

    def _batches(self, skip: int, rng_before_next: dict[str, Any] | None):
        iterator = iter(self.loader)
        for _ in range(skip):
            next(iterator, None)
        if rng_before_next is not None:
            # The first batch to train was fetched in the interrupted run from this RNG state (augmentations in the
            # main process draw from it); ExactResume sets the state after the last trained step before the next one.
            set_rng_states(rng_before_next)
        number = skip
        while True:
            self._rng_before.append((number, rng_states()))
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch
            number += 1

    def state_dict(self) -> dict[str, Any]:
        trained = int(self._trained())
        before = dict(self._rng_before).get(trained)
        return {"generator": self._pass_generator, "trained": trained, "rng_before_next": before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)


class ResumableFitLoop(_FitLoop):
    """Lightning's fit loop with the training loaders wrapped in :class:`ResumableLoader` once Lightning has
    processed them (distributed sampler injected), just before it loads their saved states."""

    def _load_combined_loader_states(self) -> None:
        combined = self._combined_loader
        if combined is not None:
            progress = self.epoch_loop.batch_progress
            combined.flattened = [
                loader
                if isinstance(loader, ResumableLoader)
                else ResumableLoader(loader, lambda: progress.current.processed)
                for loader in combined.flattened
            ]
        super()._load_combined_loader_states()


def install_resumable_fit_loop(trainer: pl.Trainer) -> None:
    """Replaces ``trainer.fit_loop`` by a :class:`ResumableFitLoop` (keeping its epoch loop and limits)."""
    old = trainer.fit_loop
    if isinstance(old, ResumableFitLoop):
        return
    loop = ResumableFitLoop(trainer, min_epochs=old.min_epochs, max_epochs=old.max_epochs)
    loop.epoch_loop = old.epoch_loop
    trainer.fit_loop = loop


def _module_metrics(pl_module: pl.LightningModule) -> dict[str, Metric]:
    return {name: m for name, m in pl_module.named_modules() if isinstance(m, Metric) and name}


class ExactResume(pl.Callback):
    """Saves and restores what Lightning's checkpoints leave out: the global RNG streams, the accumulated state of
    the module's torchmetrics and of the epoch-level logged values, and the W&B run id (read by the CLI on resume
    so that the run continues instead of forking). See the module docstring for what is exact."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._inject_results: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        results = {}
        for key, metric in trainer.fit_loop.epoch_loop._results.items():
            if metric.is_tensor and metric.meta.on_epoch:
                size = getattr(metric, "cumulated_batch_size", None)
                results[key] = (metric.value.detach().cpu().clone(), None if size is None else size.detach().cpu())
        metrics = {
            name: {k: v.detach().cpu().clone() for k, v in m.metric_state.items() if isinstance(v, torch.Tensor)}
            for name, m in _module_metrics(pl_module).items()
        }
        own = {"rng": rng_states(), "metrics": metrics, "results": results}
        # Every rank has its own RNG streams and metric accumulations; only rank 0 writes the file, so they are
        # gathered (every rank runs this hook: Lightning builds the checkpoint dict on all ranks).
        ranks = [own]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, own)
        checkpoint[self.state_key] = {
            "ranks": ranks,
            "mid_epoch": trainer.fit_loop.epoch_loop.batch_progress.current.processed < trainer.num_training_batches,
            "wandb_id": wandb_run_id(trainer),
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        saved = checkpoint.get(self.state_key)
        if saved is None:
            log.warning("The checkpoint has no ExactResume state (written by an older advtrain?): the run resumes, "
                        "but the RNG streams and the running epoch metrics start afresh.")  # fmt: skip
            return
        ranks = saved["ranks"]
        if len(ranks) != trainer.world_size:
            log.warning("The checkpoint was written by %d process(es), this run has %d: the data are dealt to the "
                        "ranks differently, so the resumed run is not an exact continuation (rank 0's RNG "
                        "streams are used everywhere).", len(ranks), trainer.world_size)  # fmt: skip
        own = ranks[trainer.global_rank] if trainer.global_rank < len(ranks) else ranks[0]
        self._pending = {**own, "mid_epoch": saved["mid_epoch"]}
        for name, metric in _module_metrics(pl_module).items():
            for key, value in own["metrics"].get(name, {}).items():
                setattr(metric, key, value.to(pl_module.device))
            if own["metrics"].get(name):
                metric._update_count = max(metric._update_count, 1)  # compute() without a warning

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has by now fetched the first batch to train; its own draws were replayed by ResumableLoader.
        if self._pending is None:
            return
        set_rng_states(self._pending["rng"])
        if self._pending.get("mid_epoch"):
            self._inject_results = self._pending["results"]
        self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._inject_results:
            return
        # Epoch-level logged values: the sums of the batches trained before the interruption are added once, after
        # the first batch since resuming registered its values (sums are exact, whatever the order).
        results = trainer.fit_loop.epoch_loop._results
        for key, (value, size) in self._inject_results.items():
            metric = results.get(key)
            if metric is None:
                log.warning("ExactResume: %s was logged before the interruption but not since; its epoch value "
                            "covers only the batches after resuming.", key)  # fmt: skip
                continue
            metric.value = metric.value + value.to(metric.value.device)
            if size is not None:
                metric.cumulated_batch_size = metric.cumulated_batch_size + size.to(metric.value.device)
        self._inject_results = None


def wandb_run_id(trainer: pl.Trainer) -> str | None:
    """The id of the W&B run this trainer logs to (``None`` without a W&B logger or before the run exists)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and (logger._experiment is not None or logger._id):
            version = logger.version
            if isinstance(version, str) and version:
                return version
    return None


def resume_wandb_run(trainer: pl.Trainer, ckpt_path: str) -> str | None:
    """Points the trainer's W&B loggers at the run id stored in the checkpoint file ``ckpt_path``
    (``resume="allow"``, Lightning's default), so that a resumed run continues its W&B run instead of forking a new
    one. Returns the id."""
    from pytorch_lightning.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    path = Path(ckpt_path)
    if not loggers or not path.is_file():  # Lightning's keywords ("best", ...) name no file
        return None
    try:
        run_id = read_checkpoint(path).get(ExactResume().state_key, {}).get("wandb_id")
    except UserError:
        return None  # Lightning reports the unreadable checkpoint itself
    if not run_id:
        log.warning("%s holds no W&B run id: the resumed run logs to a new W&B run.", path)
        return None
    for logger in loggers:
        if logger._experiment is None:
            logger._wandb_init.update(id=run_id, resume="allow")
            logger._id = run_id
    log.info("Resuming W&B run %s from %s", run_id, path)
    return run_id
