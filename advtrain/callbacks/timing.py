"""Wall time per training epoch, excluding validation, logged as ``time/train_epoch_s``."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from typing_extensions import override


class EpochTimer(pl.Callback):
    """Measures each training epoch's wall time (data loading and training steps, not the validation loop).

    The value is logged as ``time/train_epoch_s`` and kept in :attr:`epoch_seconds`, so methods can be compared per
    epoch at equal data (e.g. YOPO-5-3 against PGD-10).
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._start: float | None = None
        self._validation = 0.0
        self._val_start: float | None = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._validation = 0.0

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._validation += time.perf_counter() - self._val_start
            self._val_start = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._start - self._validation
        self.epoch_seconds.append(seconds)
        pl_module.log("time/train_epoch_s", seconds, on_epoch=True)

    @override
    def state_dict(self) -> dict:
        return {"epoch_seconds": list(self.epoch_seconds)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch_seconds = list(state_dict.get("epoch_seconds", []))
