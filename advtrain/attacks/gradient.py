"""Projected-gradient attacks: FGSM, FGM, BIM and PGD (all run on :func:`advtrain.engine.gradient_ascent`).

References:
    Goodfellow et al., *Explaining and Harnessing Adversarial Examples*, ICLR 2015 (FGSM; seed 004).
    Kurakin et al., *Adversarial Examples in the Physical World*, 2017 (BIM / I-FGSM).
    Madry et al., *Towards Deep Learning Models Resistant to Adversarial Attacks*, ICLR 2018 (PGD).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.loop import gradient_ascent
from advtrain.engine.losses import get_loss
from advtrain.engine.result import AttackResult
from advtrain.threat.geometry import geometry_for

_PAPER_PGD = "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"


@register_attack(
    AttackSpec("pgd", AttackKind.BUDGETED, ("linf", "l2"), targeted=True, stochastic=True, paper=_PAPER_PGD)
)
class PGD(Attack):
    """Projected gradient descent with random start and restarts (Madry et al. 2018).

    Starts uniformly in the L∞ cube (L2: random direction scaled by U(0,1)·ε), takes ``steps`` steps of
    ``step_size`` along sign ∇ (L∞) or ∇/‖∇‖₂ (L2), projecting onto the ball and the [0, 1] box after each.
    Per sample it keeps the first fooling point, or else the largest-loss point seen; fooled samples stop
    costing passes; restarts only re-attack samples still standing.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: budget (a per-call ``eps`` tensor of shape (B,) overrides it).
        steps: gradient steps per restart.
        step_size: α; ``None`` uses Madry et al.'s rule α = 2.5·ε/steps (per sample when ε is).
        restarts: number of random restarts.
        random_start: start from a random point in the ball.
        targeted: ``labels`` are targets to reach.
        loss: ``"ce"`` (default), ``"margin"`` or ``"dlr"``.
        options: ``autocast``, ``compile``, ``mode``, ``seed``, shared by every attack (see :class:`Attack`).

    Example:
        >>> attack = PGD(norm="linf", eps=8 / 255, steps=20)  # doctest: +SKIP
        >>> result = attack(model, images, labels)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        steps: int = 40,
        step_size: float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        targeted: bool = False,
        loss: str = "ce",
        **options,
    ) -> None:
        super().__init__(**options)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}.")
        if eps < 0 or (step_size is not None and step_size <= 0):
            raise ValueError(f"eps must be >= 0 and step_size > 0, got eps={eps}, step_size={step_size}.")
        self.geometry = geometry_for(norm)
        self.norm = self.geometry.norm.value
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = step_size
        self.restarts = int(restarts)
        self.random_start = bool(random_start)
        self.targeted = bool(targeted)
        self.loss = loss
        self._loss_fn = get_loss(loss)

    def step_sizes(self, eps: Tensor) -> Tensor:
        """Per-sample α: the configured value, or 2.5·ε/steps."""
        if self.step_size is None:
            return eps * (2.5 / self.steps)
        return torch.full_like(eps, float(self.step_size))

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        eps_t = self.budget(eps, inputs)
        return gradient_ascent(
            model,
            inputs,
            labels,
            geometry=self.geometry,
            eps=eps_t,
            step_size=self.step_sizes(eps_t),
            steps=self.steps,
            loss_fn=self._loss_fn,
            random_start=self.random_start,
            targeted=self.targeted,
            restarts=self.restarts,
            generator=generator,
            **self.engine_options(),
        )


@register_attack(AttackSpec("bim", AttackKind.BUDGETED, ("linf", "l2"), targeted=True, stochastic=False))
class BIM(PGD):
    """Basic iterative method / I-FGSM (Kurakin et al. 2017): PGD without random start or restarts.

    Args:
        norm, eps, steps, step_size, targeted, loss, options: as :class:`PGD` (``step_size=None``
            gives ε/steps·1.25,
            the usual choice that lets the iterate reach the boundary).
    """

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        targeted: bool = False,
        loss: str = "ce",
        **options,
    ) -> None:
        super().__init__(
            norm=norm, eps=eps, steps=steps, step_size=step_size, restarts=1, random_start=False,
            targeted=targeted, loss=loss, **options,
        )  # fmt: skip

    def step_sizes(self, eps: Tensor) -> Tensor:
        if self.step_size is None:
            return eps * (1.25 / self.steps)
        return super().step_sizes(eps)


@register_attack(
    AttackSpec("fgsm", AttackKind.BUDGETED, ("linf",), targeted=True, stochastic=False, paper="Goodfellow et al. 2015",
               role="one_step")
)  # fmt: skip
class FGSM(PGD):
    """Fast gradient sign method: x + ε·sign ∇CE, clipped to [0, 1] (Goodfellow et al. 2015; seed 004).

    Args:
        eps: budget.
        targeted: step towards ``labels`` (x − ε·sign ∇CE(x, target)).
        loss, options: as :class:`PGD`.
    """

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        targeted: bool = False,
        loss: str = "ce",
        **options,
    ) -> None:
        super().__init__(
            norm="linf", eps=eps, steps=1, step_size=None, restarts=1, random_start=False, targeted=targeted,
            loss=loss, **options,
        )  # fmt: skip

    def step_sizes(self, eps: Tensor) -> Tensor:
        return eps.clone()


@register_attack(AttackSpec("fgm", AttackKind.BUDGETED, ("l2",), targeted=True, stochastic=False, role="one_step"))
class FGM(FGSM):
    """Fast gradient method, the L2 version of FGSM: x + ε·∇/‖∇‖₂, clipped to [0, 1].

    Args:
        eps, targeted, loss, options: as :class:`FGSM`.
    """

    def __init__(
        self,
        *,
        eps: float = 0.5,
        targeted: bool = False,
        loss: str = "ce",
        **options,
    ) -> None:
        super().__init__(eps=eps, targeted=targeted, loss=loss, **options)
        self.geometry = geometry_for("l2")
        self.norm = self.geometry.norm.value
