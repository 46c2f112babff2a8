"""Stopping on a non-finite loss or gradient without making the host wait for the device every step.

``if not torch.isfinite(loss)`` reads a value back from the GPU: the host stops until every queued kernel has run,
and the GPU then idles while the host prepares the next step. :class:`DivergenceWatch` instead keeps, on the device,
a record of the *first* non-finite step (updated with ``torch.where``, no read), and the training module reads it
back only every ``every`` steps, at the end of each epoch, before validation and **before every checkpoint is
written**. The guarantees:

* no checkpoint ever holds weights produced by a non-finite step (the module reads the record in
  ``on_save_checkpoint`` and raises before the file is written, so the previous checkpoint stays the last one);
* training stops with :class:`~advtrain.errors.TrainingDivergedError` at most ``every`` steps after the bad one,
  naming the epoch and batch (loss) or step (gradients) where it happened first;
* with ``every = 1`` the record is read at once, before the backward pass (loss) or the optimizer step (gradients):
  the weights in memory never see the bad step, at the price of one host sync per step (and one more per
  optimizer step).

Between a bad step and the read, the optimizer keeps stepping on non-finite values: the weights *in memory* are
lost, the checkpoints are not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from advtrain.engine.checks import looks_like_probabilities, warn_probabilities
from advtrain.errors import InvalidConfigError, TrainingDivergedError

# Record fields (int64): what went wrong first (0 = nothing), where, which non-finite value the loss had, and whether
# the first batch's outputs looked like probabilities (read with the same sync, warned once).
_KIND, _EPOCH, _BATCH, _STEP, _VALUE, _PROBABILITIES = range(6)
_LOSS, _GRADIENTS = 1, 2
_VALUES = ("nan", "inf", "-inf")


def check_every_option(value: int | None) -> int | None:
    """Validates ``divergence_check_every``: a positive number of steps, or ``None`` (follow the trainer)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidConfigError(
            f"divergence_check_every must be a positive number of steps (1 checks every step, before the weights "
            f"move) or null (every trainer.log_every_n_steps steps), got {value!r}."
        )
    return value


class DivergenceWatch:
    """The device-side record of the first non-finite training step (see the module docstring).

    Args:
        every: steps between reads of the record; 1 reads it at once (raising before the weights move).
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.record: Tensor | None = None
        self._since_read = 0

    def _record_on(self, device: torch.device) -> Tensor:
        if self.record is None or self.record.device != device:
            self.record = torch.zeros(6, dtype=torch.int64, device=device)
        return self.record

    def _note(self, kind: int, finite: Tensor, value_code: Tensor | int, epoch: int, batch: int, step: int) -> None:
        record = self._record_on(finite.device)
        first = ~finite & (record[_KIND] == 0)
        row = torch.empty_like(record[:_PROBABILITIES])
        # Python numbers reach the device as kernel arguments (a fill), never as a blocking copy from host memory.
        for field, number in ((_KIND, kind), (_EPOCH, epoch), (_BATCH, batch), (_STEP, step)):
            row[field] = number
        row[_VALUE] = value_code
        record[:_PROBABILITIES] = torch.where(first, row, record[:_PROBABILITIES])
        if self.every == 1:
            self.check()

    def loss(self, loss: Tensor, *, epoch: int, batch: int, step: int) -> None:
        """Notes whether the training loss of this step is finite (and reads the record when ``every`` is 1)."""
        loss = loss.detach()
        code = torch.where(loss.isnan(), 0, torch.where(loss > 0, 1, 2))
        self._note(_LOSS, torch.isfinite(loss), code, epoch, batch, step)

    def gradients(self, grads: list[Tensor], *, epoch: int, batch: int, step: int) -> None:
        """Notes whether every gradient is finite before the optimizer step (and reads the record when ``every`` is
        1, so that the step never happens)."""
        if grads:
            finite = torch.stack([g.isfinite().all() for g in grads]).all()
            self._note(_GRADIENTS, finite, 0, epoch, batch, step)

    def outputs(self, logits: Tensor) -> None:
        """Notes whether the outputs look like probabilities (:func:`~advtrain.engine.checks.warn_if_probabilities`);
        the warning comes with the next read."""
        flag = looks_like_probabilities(logits)
        if flag is not None:
            self._record_on(logits.device)[_PROBABILITIES] = flag.long()
            if self.every == 1:
                self.check()

    def step_done(self) -> bool:
        """Counts a finished step; whether a read is due now."""
        self._since_read += 1
        return self._since_read >= self.every

    def check(self, *, now: int | None = None) -> None:
        """Reads the record (the one host sync): warns about probabilities once, and raises on divergence.

        Args:
            now: the global step at the time of the read, quoted in the message when it is later than the bad step.

        Raises:
            TrainingDivergedError: naming the epoch and batch (loss) or step (gradients) of the first bad step.
        """
        self._since_read = 0
        if self.record is None:
            return
        kind, epoch, batch, step, value, probabilities = self.record.tolist()
        if probabilities:
            self.record[_PROBABILITIES] = 0  # warned once
            warn_probabilities()
        if kind == 0:
            return
        if kind == _LOSS:
            message = (
                f"The training loss is {_VALUES[value]} at epoch {epoch}, batch {batch}. Lower the learning rate or "
                "check the data; the last checkpoint is intact."
            )
        else:
            message = (
                f"Non-finite gradients at epoch {epoch}, step {step} (the loss was finite). Lower the learning rate, "
                "clip gradients (--trainer.gradient_clip_val) or check the model; the last checkpoint is intact and "
                "can be resumed with --ckpt_path last."
            )
        if now is not None and now > step:
            message += (
                f" Found at step {now}: non-finite values are read back every {self.every} steps, at epoch ends and "
                "before every checkpoint (divergence_check_every=1 stops at the bad step itself)."
            )
        raise TrainingDivergedError(message)
