"""Learning-rate schedules stated as fractions of training, so a recipe does not hard-code the step count.

``MultiStep(milestones=[0.5, 0.75])`` divides the learning rate at 50% and 75% of training whatever the number
of epochs, batches or devices. The total number of optimizer steps comes from the Trainer
(``estimated_stepping_batches``), which :class:`advtrain.training.AdversarialTraining` makes available while it
builds the schedule. These schedules step every optimizer step (``interval = "step"``); PyTorch's own
schedulers can be used too and step every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from advtrain.errors import InvalidConfigError

_TOTAL_STEPS: ContextVar[int | None] = ContextVar("advtrain_total_steps", default=None)


@contextmanager
def total_steps_context(total_steps: int) -> Iterator[None]:
    """Makes the run's total number of optimizer steps visible to the schedules built inside."""
    token = _TOTAL_STEPS.set(int(total_steps))
    try:
        yield
    finally:
        _TOTAL_STEPS.reset(token)


def _total_steps(explicit: int | None) -> int:
    total = explicit if explicit is not None else _TOTAL_STEPS.get()
    if total is None or total < 1:
        raise ValueError(
            "This schedule needs the total number of optimizer steps: pass total_steps=..., or build it through "
            "advtrain.training.AdversarialTraining, which reads it from the Trainer."
        )
    return int(total)


class MultiStep(LambdaLR):
    """Multiplies the learning rate by ``gamma`` at each milestone, given as a fraction of training.

    Args:
        optimizer: the optimizer.
        milestones: increasing fractions in (0, 1), e.g. ``[0.5, 0.75]`` (Madry CIFAR: ÷10 at 50% and 75%).
        gamma: factor at each milestone, or one factor per milestone (MMA: 0.3 → 0.09 → 0.03 → 0.009 is
            ``[0.3, 0.3333, 0.3]``).
        total_steps: optional explicit step count (normally read from the Trainer).
    """

    interval = "step"

    def __init__(
        self, optimizer: Optimizer, *, milestones: Sequence[float] = (0.5, 0.75),
        gamma: float | Sequence[float] = 0.1, total_steps: int | None = None,
    ) -> None:  # fmt: skip
        if any(not 0 < m < 1 for m in milestones) or list(milestones) != sorted(milestones):
            raise InvalidConfigError(
                "model.lr_scheduler: MultiStep milestones must be increasing fractions of training in (0, 1) "
                f"(0.5 = halfway), got {list(milestones)}."
            )
        gammas = [float(gamma)] * len(milestones) if isinstance(gamma, int | float) else [float(g) for g in gamma]
        if len(gammas) != len(milestones):
            raise InvalidConfigError(
                f"model.lr_scheduler: MultiStep gamma needs one factor per milestone: {len(milestones)} milestones, "
                f"{len(gammas)} factors."
            )
        total = _total_steps(total_steps)
        steps = [round(m * total) for m in milestones]

        def factor(step: int) -> float:
            out = 1.0
            for at, g in zip(steps, gammas, strict=True):
                if step >= at:
                    out *= g
            return out

        super().__init__(optimizer, factor)


class Cosine(LambdaLR):
    """Linear warm-up over ``warmup`` of training, then cosine decay to ``final_factor`` × the base rate.

    Args:
        optimizer: the optimizer.
        warmup: fraction of training spent warming up linearly from 0.
        final_factor: learning-rate multiplier at the end of training.
        total_steps: optional explicit step count (normally read from the Trainer).
    """

    interval = "step"

    def __init__(
        self, optimizer: Optimizer, *, warmup: float = 0.0, final_factor: float = 0.0, total_steps: int | None = None
    ) -> None:
        if not 0.0 <= warmup < 1.0:
            raise InvalidConfigError(f"model.lr_scheduler: Cosine warmup must be a fraction in [0, 1), got {warmup}.")
        total = _total_steps(total_steps)
        warm = round(warmup * total)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


class OneCycle(OneCycleLR):
    """PyTorch's one-cycle policy with the step count read from the Trainer (Fast AT uses it with
    ``max_lr=0.2``, ``pct_start=0.4``, ``anneal_strategy="linear"``).

    Args:
        optimizer: the optimizer.
        max_lr: peak learning rate.
        pct_start: fraction of training spent increasing the rate.
        anneal_strategy: ``"cos"`` or ``"linear"``.
        div_factor: initial rate = max_lr / div_factor.
        final_div_factor: final rate = initial rate / final_div_factor.
        three_phase: use the three-phase variant.
        total_steps: optional explicit step count (normally read from the Trainer).
    """

    interval = "step"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        max_lr: float = 0.1,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        total_steps: int | None = None,
    ) -> None:
        super().__init__(
            optimizer,
            max_lr=max_lr,
            total_steps=_total_steps(total_steps),
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            three_phase=three_phase,
            cycle_momentum=False,
        )
