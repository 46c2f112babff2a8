"""Learning-rate schedules stated as fractions of training, so a recipe does not hard-code the step count, and
budget schedules for the inner maximizer (:class:`BudgetRamp`).

``MultiStep(milestones=[0.5, 0.75])`` divides the learning rate at 50% and 75% of training whatever the number
of epochs, batches or devices. The total number of optimizer steps comes from the Trainer
(``estimated_stepping_batches``), which :class:`advtrain.training.AdversarialTraining` makes available while it
builds the schedule. These schedules step every optimizer step (``interval = "step"``); PyTorch's own
schedulers can be used too and step every epoch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
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


class BudgetSchedule(ABC):
    """The factor multiplying the inner maximizer's budgets at an optimizer step (``model.budget_schedule``).

    :class:`~advtrain.training.AdversarialTraining` asks for the factor of every training step, from the Trainer's
    global step (a Python int, restored by a resume), and runs the maximizer inside
    :meth:`~advtrain.maximizers.InnerMaximizer.budget_scaled`; validation and evaluation attacks keep the full budget.
    """

    def check(self, budget: float | None) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Validates the schedule against the maximizer's full budget (``None``: the maximizer has none)."""

    @abstractmethod
    def factor(self, step: int, *, steps_per_epoch: int | None = None, budget: float | None = None) -> float:
        """The budget factor in (0, 1] at optimizer step ``step`` (0-based); ``steps_per_epoch`` counts optimizer
        steps, ``budget`` is the maximizer's full budget."""


class BudgetRamp(BudgetSchedule):
    """A linear ramp of the maximizer's budgets from a start fraction to the full budget, then constant.

    At optimizer step t of a ramp over T steps the factor is ``start + (1 − start)·t/T`` for t < T and exactly 1 from
    t = T on; every budget of the maximizer (ε and the step sizes measured against it, see
    :attr:`~advtrain.maximizers.InnerMaximizer.budget_keys`) is multiplied by it, so α/ε stays constant. With
    ``epochs`` the length is ``epochs`` × the optimizer steps of one epoch (fractions allowed), so the factor moves
    within an epoch too. Training at the full ε from scratch can stay at chance for many epochs (a SmallCNN under
    PGD-10 at MNIST's ε = 0.3); starting from a smaller ε and ramping it up is the common remedy (the linear ε ramp of
    Gowal et al., "On the Effectiveness of Interval Bound Propagation", 2018, is the same shape).

    Args:
        start: the factor at step 0, in (0, 1] (``1/3``: ε 0.1 → 0.3 at MNIST's budget).
        start_eps: instead of ``start``, the budget at step 0 in the maximizer's own units (its first budget key:
            ε; MMA's d_max); ``start = start_eps / budget``.
        epochs: ramp length in epochs (>= 0; 0 disables the ramp).
        steps: ramp length in optimizer steps (>= 0), instead of ``epochs``.

    Raises:
        InvalidConfigError: ``start`` outside (0, 1], ``start_eps`` outside (0, budget], a negative length, or not
            exactly one of ``start``/``start_eps`` and of ``epochs``/``steps``.

    Example:
        >>> ramp = BudgetRamp(start=0.25, epochs=4)
        >>> [ramp.factor(t, steps_per_epoch=10) for t in (0, 20, 40, 99)]
        [0.25, 0.625, 1.0, 1.0]
    """

    def __init__(
        self,
        *,
        start: float | None = None,
        start_eps: float | None = None,
        epochs: float | None = None,
        steps: int | None = None,
    ) -> None:
        if (start is None) == (start_eps is None):
            raise InvalidConfigError(
                f"budget_schedule: give exactly one of start (a fraction) and start_eps (a budget); got start={start}, "
                f"start_eps={start_eps}."
            )
        if (epochs is None) == (steps is None):
            raise InvalidConfigError(
                f"budget_schedule: give exactly one of epochs and steps (the ramp's length); got epochs={epochs}, "
                f"steps={steps}."
            )
        if start is not None and not (math.isfinite(start) and 0 < start <= 1):
            raise InvalidConfigError(f"budget_schedule.start must be in (0, 1] (a fraction of ε), got {start}.")
        if start_eps is not None and not (math.isfinite(start_eps) and start_eps > 0):
            raise InvalidConfigError(f"budget_schedule.start_eps must be > 0, got {start_eps}.")
        if epochs is not None and not (math.isfinite(epochs) and epochs >= 0):
            raise InvalidConfigError(f"budget_schedule.epochs must be >= 0, got {epochs}.")
        if steps is not None and (steps < 0 or int(steps) != steps):
            raise InvalidConfigError(f"budget_schedule.steps must be an integer >= 0, got {steps}.")
        self.start = None if start is None else float(start)
        self.start_eps = None if start_eps is None else float(start_eps)
        self.epochs = None if epochs is None else float(epochs)
        self.steps = None if steps is None else int(steps)

    def check(self, budget: float | None) -> None:
        if self.start_eps is not None and not (budget is not None and 0 < self.start_eps <= budget):
            raise InvalidConfigError(
                f"budget_schedule.start_eps={self.start_eps} must lie in (0, the maximizer's budget {budget}]; "
                "or give start as a fraction."
            )

    def factor(self, step: int, *, steps_per_epoch: int | None = None, budget: float | None = None) -> float:
        if self.steps is not None:
            length = float(self.steps)
        elif steps_per_epoch is None:
            raise InvalidConfigError(
                "budget_schedule.epochs needs the number of optimizer steps per epoch, which this training loader does "
                "not have (no length); give the ramp in steps instead."
            )
        else:
            length = self.epochs * steps_per_epoch
        if step >= length:
            return 1.0
        start = self.start if self.start is not None else self.start_eps / budget
        return start + (1.0 - start) * (step / length)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({args})"
