"""``last.ckpt`` that follows training: written at every epoch end and on Ctrl-C, whatever the monitored metric did."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn
from typing_extensions import override

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` at the end of every training epoch (after that epoch's validation) and when
    training is interrupted with Ctrl-C, independently of the checkpoints kept for the best monitored value.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` rewrites ``last.ckpt`` only in a step where it also
    wrote a top-k file: once the monitored metric stops improving, ``last.ckpt`` stays at the best epoch and a resume
    loses every later epoch. It also writes ``last.ckpt`` at the end of a ``fast_dev_run``. This callback writes
    through ``trainer.save_checkpoint`` only (no private Lightning API), never in a ``fast_dev_run`` or the sanity
    check, and once per global step at most. Being a ``Checkpoint``, Lightning runs it after the module's and the
    other callbacks' epoch-end hooks (in list order among checkpoint callbacks: after a ``ModelCheckpoint`` listed
    before it, so the saved state holds that epoch's best score).

    Args:
        dirpath: the run's folder, e.g. ``checkpoints/${run_name}``.
        filename: the file name without ``.ckpt``.

    Example (``advtrain/defaults.yaml``)::

        trainer:
          callbacks:
            - class_path: advtrain.callbacks.LastCheckpoint
              init_args: {dirpath: "checkpoints/${run_name}"}
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        self.dirpath = dirpath
        self.filename = filename
        self._saved_step: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"{self.filename}.ckpt"

    def _should_save(self, trainer: pl.Trainer) -> bool:
        return (
            not trainer.fast_dev_run
            and not trainer.sanity_checking
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.global_step != self._saved_step
        )

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_save(trainer):
            self._save(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl-C only: after another exception the state may be the cause (NaN weights, a full disk). One process
        # only: with several, the other ranks may not be in this hook, and the save's barrier would hang.
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1 and self._should_save(trainer):
            self._save(trainer)
            log.info("Interrupted: saved %s at epoch %d, global step %d; resume with --ckpt_path last.", self.path,
                     trainer.current_epoch, trainer.global_step)  # fmt: skip
