"""Projected steepest ascent on the attack core: FGSM, FGM, BIM, PGD and the PGD inner maximizer.

The loop is :meth:`advtrain.engine.core.AttackCore.loop`; this module supplies the body. Two uses:

* **attack** (``keep_best=True``, ``early_stop=True``): per-sample active set — a sample stops costing
  passes as soon as it is fooled —, the best point per sample (fooled beats not fooled; otherwise the largest
  loss seen inside the ball), restarts on the samples still standing, and a final forward pass that scores
  the last iterate.
* **training maximizer** (``keep_best=False``, ``early_stop=False``): Madry et al.'s recipe, the last iterate
  of every sample, with no extra forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advtrain.engine.core import AttackCore
from advtrain.engine.losses import LossFn
from advtrain.engine.result import AttackResult
from advtrain.engine.state import SampleState
from advtrain.engine.tracking import MaxLossTracker
from advtrain.threat.geometry import Geometry
from advtrain.threat.norms import view_as_batch


@dataclass(eq=False)
class _AscentState(SampleState):
    x: Tensor
    eps: Tensor
    alpha: Tensor
    delta: Tensor
    grad: Tensor | None = None


def ascent_step(geometry: Geometry, inputs: Tensor, delta: Tensor, grad: Tensor, alpha: Tensor, eps: Tensor) -> Tensor:
    """One projected steepest-ascent step, δ ← Π_{ball ∩ box}(δ + α · u(∇)): all elementwise, one fusible unit."""
    step = view_as_batch(alpha, delta) * geometry.ascent_direction(grad)
    return geometry.project_ball_box(inputs, delta + step, eps)


def gradient_ascent(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    geometry: Geometry,
    eps: Tensor,
    step_size: Tensor,
    steps: int,
    loss_fn: LossFn,
    random_start: bool,
    targeted: bool = False,
    restarts: int = 1,
    keep_best: bool = True,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    autocast: torch.dtype | None = None,
    compile: bool = False,
    checks: bool = True,
    active_set: str = "shrink",
    rows: Tensor | None = None,
    start: Tensor | None = None,
) -> AttackResult:
    """Projected steepest ascent of ``loss_fn`` in the ε-ball of ``geometry``, intersected with [0, 1].

    Each step: δ ← Π_{ball ∩ box}(δ + α · u(∇_δ L)), with u the geometry's steepest-ascent direction
    (sign for L∞, normalised gradient for L2). Targeted attacks descend the loss towards ``labels``.
    The caller sets the model's mode (see :func:`advtrain.engine.attack_context`).

    Args:
        model: maps [0, 1] inputs to logits.
        inputs: clean batch in [0, 1].
        labels: true labels, or targets when ``targeted``.
        geometry: the norm's geometry.
        eps: (B,) budgets.
        step_size: (B,) step lengths α.
        steps: gradient steps per restart.
        loss_fn: per-sample loss of (logits, labels).
        random_start: start from a random point in the ball (else from δ = 0).
        targeted: make ``labels`` the targets.
        restarts: independent runs; later runs only attack samples not yet fooled.
        keep_best: keep the best point per sample and score the last iterate (attacks); otherwise return the
            last iterate (training).
        early_stop: drop fooled samples from the active set.
        generator: RNG for the random start.
        autocast, compile, checks, active_set: the options of the :class:`~advtrain.engine.core.AttackCore` (the
            fused :func:`ascent_step` with ``compile``; the training maximizers, whose batch was validated on the
            host, pass ``checks=False``).
        rows: attack only these samples (default: all); the others come back unchanged, not fooled, at no cost
            (masked mode: masked from the start, so that every model call still sees the whole batch).
        start: the first restart's δ (one row per sample of the batch, moved into ball ∩ box), in place of
            ``random_start`` (e.g. TRADES's Gaussian start); later restarts draw as ``random_start`` says.

    Returns:
        An :class:`AttackResult`; ``success`` is only meaningful when ``keep_best`` is set.
    """
    core = AttackCore(model, inputs, labels, targeted=targeted, autocast=autocast, compile=compile, checks=checks,
                      active_set=active_set)  # fmt: skip
    x = core.x
    run = _Ascent(core, geometry, loss_fn, -1.0 if targeted else 1.0, MaxLossTracker(x), core.step(ascent_step),
                  keep_best, early_stop)  # fmt: skip
    for restart in range(max(1, restarts)):
        index = _restart_rows(run.tracker.success, rows, first=restart == 0, early_stop=early_stop)
        if index.numel() == 0:
            break
        xa, ea = x[index], eps[index]
        if start is not None and restart == 0:
            delta = start[index].float()
        else:
            delta = geometry.sample(xa, ea, generator) if random_start else torch.zeros_like(xa)
        active = core.start(_AscentState, index, x=xa, eps=ea, alpha=step_size[index],
                            delta=geometry.project_ball_box(xa, delta, ea))  # fmt: skip
        core.loop(active, steps, run.evaluate, run.advance)
        run.finish(active)
    return core.result(x + run.tracker.best_delta.to(x.dtype), run.tracker.success, geometry.measure)


@dataclass
class _Ascent:
    """One call of :func:`gradient_ascent`: its loop halves and the end of a restart."""

    core: AttackCore
    geometry: Geometry
    loss_fn: LossFn
    sign: float
    tracker: MaxLossTracker
    step_fn: object
    keep_best: bool
    early_stop: bool

    def evaluate(self, k: int, s: _AscentState) -> Tensor | None:
        core, y = self.core, self.core.y
        objective = lambda z: self.sign * self.loss_fn(z, y[s.index])  # noqa: E731
        logits, loss, s.grad, _ = core.value_and_grad(s.delta, lambda d: s.x + d, objective)
        if self.keep_best:
            self.tracker.offer(s, s.delta, loss, core.fooled(logits, s.index))
        return self.tracker.success[s.index] if self.early_stop else None

    def advance(self, k: int, s: _AscentState) -> None:
        s.delta = self.step_fn(self.geometry, s.x, s.delta, s.grad, s.alpha, s.eps)

    def finish(self, s: _AscentState) -> None:
        """Scores the last iterate of the samples still standing (attacks), or keeps it (training)."""
        if self.keep_best and len(s) > 0:
            logits = self.core.forward(s.x + s.delta)
            loss = self.sign * self.loss_fn(logits, self.core.y[s.index])
            self.tracker.offer(s, s.delta, loss, self.core.fooled(logits, s.index))
        if not self.keep_best:
            s.write(self.tracker.best_delta, s.delta)


def _restart_rows(success: Tensor, rows: Tensor | None, *, first: bool, early_stop: bool) -> Tensor:
    """The samples a restart attacks: ``rows`` (default: the whole batch), less, after the first restart and with
    early stopping, those already fooled."""
    everyone = torch.arange(success.shape[0], device=success.device) if rows is None else rows
    if not early_stop or (first and rows is not None):
        return everyone
    return everyone[~success[everyone]]
