"""An exponential moving average (EMA) of the weights, on Lightning's ``WeightAveraging`` callback."""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch import Tensor
from typing_extensions import override

log = logging.getLogger(__name__)

#: The classifier's tensors in the LightningModule's state (``AdversarialTraining.model``): the ones averaged.
_CLASSIFIER = "model."


class EMA(WeightAveraging):
    """Exponential moving average of the classifier's weights (Polyak averaging), as used by the leaderboard's
    generated-data entries (Gowal et al. 2020, "Uncovering the Limits of Adversarial Training"; Rebuffi et al. 2021,
    "Fixing Data Augmentation to Improve Adversarial Robustness"; Wang et al. 2023, DM-Improves-AT code
    ``gowal21uncovering/utils/watrain.py``).

    After every optimizer step t (0-based), θ_avg ← d_t·θ_avg + (1 − d_t)·θ with

        d_t = 0 for t < warmup_steps (the average follows the weights),
        d_t = min(decay, (1 + s) / (10 + s)), s = t − warmup_steps, with ``ramp`` (else ``decay``),

    the DM-Improves-AT code's ``ema_update(..., dynamic_decay=True)``: the ramp lets the average forget the random
    initialisation quickly (d = 0.1, 0.18, 0.25, ... up to ``decay``). τ = 0.999 in Rebuffi et al. (batch 512 and
    more; 0.995 is the DM-Improves-AT default).

    BatchNorm statistics: with ``buffers="average"`` (default) the running means and variances get the same EMA as
    the weights (the averaged model's statistics follow the averaged weights; Lightning's ``use_buffers=True``);
    ``"copy"`` copies the live statistics into the averaged model instead, as the DM-Improves-AT code's ``update_bn``
    does (it copies them at each epoch end, here at each update: the same values at every epoch-end validation and
    checkpoint). Integer counters (``num_batches_tracked``) and the module's other state (MMA's per-example margins,
    Free AT's carried perturbation) are copied, never averaged.

    What Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` gives and this keeps: validation runs on
    the averaged weights (the module's weights are swapped in for the validation epoch and back), so robust
    validation accuracy (``val/robust_acc``) and the best-checkpoint selection of ``ModelCheckpoint`` see the averaged
    model; checkpoints hold the averaged weights under ``state_dict`` (what ``evaluate``, ``validate``, ``test``,
    ``load_from_checkpoint`` and ``--model.init_weights`` then use) and the live weights under
    ``current_model_state``; a resumed ``fit`` restores both; after ``fit`` the module holds the averaged weights.

    Departure from Lightning's update (``AveragedModel.update_parameters`` with an ``avg_fn``): that update reads its
    update counter back from the device every step (``if self.n_averaged == 0``, a host sync the training step of
    advtrain avoids), has no decay schedule (its ``get_ema_multi_avg_fn`` decay is fixed) and would average the
    integer counters and the maximizer's state too. Here the decay is a Python float computed from the global step
    (exact under resume: the step is in the checkpoint), the update is one fused ``lerp`` over the classifier's
    floating-point tensors, and tensors that change shape (MMA's margins grow) are swapped by reference.

    Args:
        decay: τ, the largest decay (in (0, 1)).
        warmup_steps: optimizer steps before averaging starts (the average equals the weights until then).
        ramp: use the (1 + s)/(10 + s) ramp up to ``decay``; ``False``: ``decay`` from the first averaged step.
        buffers: ``"average"`` or ``"copy"`` the BatchNorm statistics (see above).
        device: where to keep the averaged copy (default: the model's device; ``"cpu"`` saves GPU memory).

    Example (YAML, ``recipes/pgd_ema_cifar.yaml``)::

        trainer:
          callbacks+:
            - class_path: advtrain.callbacks.EMA
              init_args: {decay: 0.999}
    """

    def __init__(
        self,
        *,
        decay: float = 0.999,
        warmup_steps: int = 0,
        ramp: bool = True,
        buffers: Literal["average", "copy"] = "average",
        device: str | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}.")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}.")
        if buffers not in ("average", "copy"):
            raise ValueError(f"buffers must be 'average' or 'copy', got {buffers!r}.")
        super().__init__(device=device, use_buffers=True)
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.ramp = bool(ramp)
        self.buffers = buffers

    def decay_at(self, step: int) -> float:
        """d_t for the optimizer step of 0-based index ``step`` (see the class docstring)."""
        if step < self.warmup_steps:
            return 0.0
        if not self.ramp:
            return self.decay
        s = step - self.warmup_steps
        return min(self.decay, (1.0 + s) / (10.0 + s))

    @override
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's WeightAveraging builds the average as a deep copy of the whole LightningModule, with every
        # object it refers to. Under DDP, rank 0's copy fails: its Trainer holds the launcher's worker processes
        # (subprocess.Popen, with a thread lock), and so do the optimizer and scheduler factories LightningCLI gives
        # the module (functools.partial objects that refer back to it). The average needs neither: they are detached
        # for the copy (the Trainer through the module's public ``trainer`` setter) and put back after it.
        detached = {name: value for name, value in vars(pl_module).items() if isinstance(value, functools.partial)}
        pl_module.trainer = None
        for name in detached:
            setattr(pl_module, name, None)
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            pl_module.trainer = trainer
            for name, value in detached.items():
                setattr(pl_module, name, value)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None

    def _pairs(self, pl_module: pl.LightningModule) -> list[tuple[str, Tensor, Tensor]]:
        """(name, averaged tensor, live tensor) for every parameter and buffer, in Lightning's order."""
        assert self._average_model is not None
        averaged = self._average_model.module
        names = [n for n, _ in pl_module.named_parameters()] + [n for n, _ in pl_module.named_buffers()]
        mine = [*averaged.parameters(), *averaged.buffers()]
        live = [*pl_module.parameters(), *pl_module.buffers()]
        if not len(names) == len(mine) == len(live):
            raise RuntimeError("EMA: the averaged copy no longer has the module's parameters and buffers.")
        return list(zip(names, mine, live, strict=True))

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule, step: int) -> None:
        """One EMA update after the optimizer step of 0-based index ``step``."""
        decay = self.decay_at(step)
        params = {n for n, _ in pl_module.named_parameters()}
        averaged, live = [], []
        for name, avg, cur in self._pairs(pl_module):
            cur = cur.detach()
            is_stat = name not in params
            if (
                name.startswith(_CLASSIFIER)
                and avg.is_floating_point()
                and avg.shape == cur.shape
                and decay > 0.0
                and not (is_stat and self.buffers == "copy")
            ):
                averaged.append(avg)
                live.append(cur.to(avg.device))
            elif avg.shape == cur.shape:
                avg.copy_(cur)
            else:
                avg.data = cur.to(avg.device, copy=True)
        if averaged:
            torch._foreach_lerp_(averaged, live, 1.0 - decay)
        self._average_model.n_averaged += 1  # Lightning's counter, kept for its checkpoint layout (no host read)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Once per optimizer step (trainer.global_step is the number taken; a Free AT batch takes several: one update
        # per batch, at the decay of its last step).
        if trainer.global_step > self._latest_update_step:
            self.update(pl_module, trainer.global_step - 1)
            self._latest_update_step = trainer.global_step

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # updates are per step only

    def _swap(self, pl_module: pl.LightningModule) -> None:
        for _, avg, cur in self._pairs(pl_module):
            if avg.shape == cur.shape and avg.device == cur.device:
                tmp = avg.detach().clone()
                avg.data.copy_(cur.data)
                cur.data.copy_(tmp)
            else:
                avg.data, cur.data = cur.data.to(avg.device), avg.data.to(cur.device)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            self._swap(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is None:
            return
        for _, avg, cur in self._pairs(pl_module):
            if avg.shape == cur.shape:
                cur.data.copy_(avg.data.to(cur.device))
            else:
                cur.data = avg.data.to(cur.device, copy=True)
        log.info("EMA: the module now holds the averaged weights (decay %g).", self.decay)


def averaged_state(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint (read by :func:`advtrain.training.checkpoint.read_checkpoint`) holds averaged weights
    under ``state_dict`` (written with :class:`EMA` or Lightning's ``WeightAveraging``: the live weights are then
    under ``current_model_state``)."""
    return "current_model_state" in checkpoint and "averaging_state" in checkpoint
