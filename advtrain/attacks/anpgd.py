"""Adaptive-norm PGD (AN-PGD): PGD at an initial budget, then bisection along the found direction.

Reference:
    Ding, Sharma, Lui & Huang, *MMA Training: Direct Input Space Margin Maximization through Adversarial
    Training*, ICLR 2020 (Algorithm 1; seed 003).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.core import AttackCore
from advtrain.engine.loop import gradient_ascent
from advtrain.engine.losses import soft_logit_margin
from advtrain.engine.result import AttackResult
from advtrain.engine.state import SampleState
from advtrain.engine.tracking import MinimalNormTracker
from advtrain.threat.geometry import geometry_for
from advtrain.threat.norms import view_as_batch

_PAPER = "Ding et al., MMA Training: Direct Input Space Margin Maximization through Adversarial Training, ICLR 2020"


@dataclass(eq=False)
class _BisectionState(SampleState):
    """Per-sample state of the bisection along the PGD direction (step 3)."""

    x: Tensor  # the clean point
    u: Tensor  # the unit direction
    found: Tensor  # some evaluated point fools
    best: Tensor  # the shortest fooling point evaluated (else the PGD point, or x)
    lo: Tensor  # the bracket [lo, hi] of η
    hi: Tensor
    mid: Tensor | None = None  # this iteration's midpoint
    fooled: Tensor | None = None  # whether it fools


@register_attack(
    AttackSpec("anpgd", AttackKind.MINIMAL, ("linf", "l2"), targeted=False, stochastic=True, paper=_PAPER,
               eps_meaning="initial")
)  # fmt: skip
class ANPGD(Attack):
    """Adaptive-norm PGD (Ding et al. 2020, Algorithm 1): an approximate shortest successful perturbation.

    Per correctly classified sample:

    1. δ₁ = PGD(x, y, ε_init): ``steps`` steps of size 2.5·ε_init/``steps`` from a random start, ascending the
       soft logit margin SLM = log Σ_{j≠y} exp z_j − z_y (:func:`~advtrain.engine.losses.soft_logit_margin`),
       in the core's :func:`~advtrain.engine.loop.gradient_ascent` (stops at the first fooling iterate).
    2. u = δ₁/‖δ₁‖, the unit direction.
    3. Bisection on η for the point where x + η·u (clipped to [0, 1]) first fools the model: over [0, ‖δ₁‖] if
       x + δ₁ fools, else over [‖δ₁‖, 1.05·``max_eps``], ``bisection_steps`` midpoints.
    4. δ* = x + η·u at the smallest fooling η evaluated (the upper end of the final bracket).

    Samples already misclassified come back unchanged, fooled at norm 0 (``success=True``, ``norms=0``);
    samples for which no evaluated point fools come back unchanged with ``success=False``. ``eps`` here is the
    initial budget ε_init of step 1 (in MMA training the per-sample margin estimate, passed per call as a (B,)
    tensor), not a success threshold; every fooling point found counts as a success, and the bisection never
    looks beyond 1.05·``max_eps`` (d_max in the paper).

    Deviations from the paper and from the official MMA code, and why:

    * The bisection looks for the zero crossing of the hard logit margin max_{j≠y} z_j − z_y, i.e. the decision
      boundary, as Algorithm 1 states it (its L is the paper's L^LM); the official code bisects on the SLM. The
      SLM exceeds the hard margin, so its zero crossing can come before the boundary and its end point need not
      be adversarial, which the attack contract (success = fooled) cannot accept.
    * The returned point is the smallest evaluated point that fools; the official code returns the last midpoint,
      which may be on the correct side.
    * u = δ₁/‖δ₁‖ as in Algorithm 1, so η is the perturbation's norm; the official code
      divides by ε_init instead, which is the same whenever PGD ends on the sphere (always for L∞ in practice),
      and makes the bracket's η differ from the norm when it does not.
    * Every forward runs in the attack's ``mode`` (eval by default) and points are clipped to [0, 1]; the official
      bisection runs in train mode (updating BatchNorm statistics) and does not clip.
    * PGD stops at its first fooling iterate (the core loop's early stopping) where the official code runs all
      steps; the bisection then starts from a shorter fooling point along a direction that already fools.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: ε_init, the budget of the first PGD (a per-call (B,) ``eps`` overrides it).
        max_eps: d_max; the bisection searches up to 1.05·d_max.
        steps: PGD steps (the paper: 10 on CIFAR-10, 40 on MNIST).
        step_size: PGD step α; ``None`` uses 2.5·ε_init/``steps`` per sample.
        bisection_steps: bisection midpoints evaluated (each one forward pass per sample).
        options: ``autocast``, ``compile``, ``mode``, ``seed``, shared by every attack (see :class:`Attack`).

    Example:
        >>> attack = ANPGD(norm="linf", eps=0.1, max_eps=0.45, steps=40)  # doctest: +SKIP
        >>> margins = attack(model, images, labels).norms  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 16 / 255,
        max_eps: float = 32 / 255,
        steps: int = 10,
        step_size: float | None = None,
        bisection_steps: int = 10,
        **options,
    ) -> None:
        super().__init__(**options)
        if steps < 1 or bisection_steps < 0:
            raise ValueError(f"steps must be >= 1 and bisection_steps >= 0, got {steps}, {bisection_steps}.")
        if eps < 0 or max_eps <= 0 or (step_size is not None and step_size <= 0):
            raise ValueError(
                f"eps must be >= 0, max_eps and step_size > 0, got eps={eps}, max_eps={max_eps}, step_size={step_size}."
            )
        self.geometry = geometry_for(norm)
        self.norm = self.geometry.norm.value
        self.eps = float(eps)
        self.max_eps = float(max_eps)
        self.steps = int(steps)
        self.step_size = step_size
        self.bisection_steps = int(bisection_steps)

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        core = self.core(model, inputs, labels)
        x = core.x
        eps_init = self.budget(eps, inputs)
        geometry = self.geometry
        tracker = MinimalNormTracker(x)

        everyone = torch.arange(core.batch, device=core.device)
        wrong = core.fooled(core.forward(x), everyone)
        tracker.update(everyone, x, torch.zeros(core.batch, device=core.device), wrong)
        index = (~wrong).nonzero().squeeze(1)
        if index.numel() == 0:
            return core.result(tracker.best_adv, tracker.success.clone(), geometry.measure)

        # 1. PGD at ε_init on the soft logit margin (its passes count as this call's).
        pgd = self._pgd(model, core, eps_init, index, generator)
        core.counter.absorb(pgd)

        # 2. The unit direction; a zero δ₁ (ε_init = 0, or no gradient) gives u = 0 and no success.
        xa, adv, fooled = x[index], pgd.adv[index], pgd.success[index]
        delta = (adv - xa).float()
        radius = geometry.measure(delta)
        u = delta / view_as_batch(radius.clamp_min(1e-12), delta)

        # 3. Bisection on η, starting from the bracket the PGD point gives; forwards only.
        cap = torch.full_like(radius, 1.05 * self.max_eps)
        state = core.start(
            _BisectionState, index, x=xa.float(), u=u, found=fooled.clone(),
            best=torch.where(view_as_batch(fooled, xa), adv, xa).float(),
            lo=torch.where(fooled, torch.zeros_like(radius), torch.minimum(radius, cap)),
            hi=torch.where(fooled, radius, cap),
        )  # fmt: skip
        core.loop(state, self.bisection_steps, functools.partial(self._midpoint, core), self._narrow)
        tracker.offer(state, state.best, geometry.measure(state.best - state.x), state.found)
        return core.result(tracker.best_adv, tracker.success.clone(), geometry.measure)

    def _pgd(
        self, model: nn.Module, core: AttackCore, eps_init: Tensor, index: Tensor, generator: torch.Generator | None
    ) -> AttackResult:
        """Step 1: PGD at ε_init on the soft logit margin, of the samples ``index`` (the others are left alone)."""
        alpha = (
            eps_init * (2.5 / self.steps)
            if self.step_size is None
            else torch.full_like(eps_init, float(self.step_size))
        )
        options = {**self.engine_options(), "checks": False}  # this attack's own core has checked the batch
        return gradient_ascent(
            model, core.x, core.y, geometry=self.geometry, eps=eps_init, step_size=alpha, steps=self.steps,
            loss_fn=soft_logit_margin, random_start=True, generator=generator, rows=index, **options,
        )  # fmt: skip

    @staticmethod
    def _midpoint(core: AttackCore, k: int, s: _BisectionState) -> None:
        """Evaluates the midpoint of each bracket; the last fooling candidate is the shortest (hi only ever
        decreases to a fooling midpoint)."""
        s.mid = 0.5 * (s.lo + s.hi)
        candidate = (s.x + view_as_batch(s.mid, s.u) * s.u).clamp(0.0, 1.0)
        s.fooled = core.fooled(core.forward(candidate), s.index)
        s.best = torch.where(view_as_batch(s.fooled, candidate), candidate, s.best)
        s.found = s.found | s.fooled

    @staticmethod
    def _narrow(k: int, s: _BisectionState) -> None:
        """Keeps the half of each bracket where the boundary is crossed."""
        s.hi = torch.where(s.fooled, s.mid, s.hi)
        s.lo = torch.where(s.fooled, s.lo, s.mid)
