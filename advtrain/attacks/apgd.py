"""Auto-PGD: APGD-CE, APGD-DLR, APGD-T (targeted DLR over the top classes), l1-APGD, and EOT for randomized models.

References:
    Croce & Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks*, ICML 2020 (Algorithm 1, Sec. 3.1-3.3: APGD, the DLR loss, APGD-T).
    Croce & Hein, *Mind the box: l1-APGD for sparse adversarial attacks on image classifiers*, ICML 2021 (l1-APGD:
    the exact projection onto the ℓ1 ball ∩ box, the sparse step with adaptive sparsity, the ε schedule).
    Athalye, Carlini & Wagner, *Obfuscated gradients give a false sense of security*, ICML 2018 (EOT).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.core import AttackCore
from advtrain.engine.losses import cross_entropy, dlr_loss
from advtrain.engine.modes import attack_context
from advtrain.engine.result import AttackResult
from advtrain.engine.state import SampleState, shared
from advtrain.engine.tracking import MaxLossTracker
from advtrain.errors import InvalidInputError
from advtrain.threat.geometry import Geometry, L1Geometry, geometry_for
from advtrain.threat.norms import Norm, view_as_batch

log = logging.getLogger(__name__)

_PAPER = (
    "Croce & Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free "
    "attacks, ICML 2020; Croce & Hein, Mind the box: l1-APGD for sparse adversarial attacks on image classifiers, "
    "ICML 2021"
)
_LOSSES = ("ce", "dlr", "dlr-targeted")


def targeted_dlr_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Targeted DLR loss of Croce & Hein (2020): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12).

    Ascending it raises the target logit over the label's. Needs at least 4 classes.
    """
    logits = logits.float()
    top = logits.topk(4, dim=1).values
    gap = logits.gather(1, labels[:, None]).squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)
    return -gap / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def halving_condition(
    raises: Tensor, window: int, rho: float, reduced_last: Tensor, best_loss: Tensor, best_loss_last: Tensor
) -> Tensor:
    """Which samples halve their step size at a checkpoint (Croce & Hein 2020, Sec. 3.2).

    Args:
        raises: per sample, how many of the ``window`` steps since the last checkpoint raised the loss.
        window: w_j − w_{j−1}.
        rho: ρ.
        reduced_last: whether the sample halved at the last checkpoint.
        best_loss: f_max now.
        best_loss_last: f_max at the last checkpoint.

    Returns:
        Condition 1 (fewer than ρ·window raising steps) or condition 2 (no halving last time and f_max unchanged).
    """
    return (raises < rho * window) | (~reduced_last & (best_loss <= best_loss_last))


def _momentum_step(
    geometry: Geometry, x: Tensor, delta: Tensor, prev: Tensor, grad: Tensor, eta: Tensor, eps: Tensor, a: Tensor
) -> Tensor:
    """APGD's step: z = Π(δ + η·u(∇)), then δ ← Π(δ + a·(z − δ) + (1 − a)·(δ − δ_prev)), Π onto ball ∩ box.
    One fusible unit (see :meth:`~advtrain.engine.core.AttackCore.step`)."""
    z = geometry.project_ball_box(x, delta + view_as_batch(eta, delta) * geometry.ascent_direction(grad), eps)
    moved = delta + a * (z - delta) + (1.0 - a) * (delta - prev)
    return geometry.project_ball_box(x, moved, eps)


def _sparse_step(geometry: L1Geometry, x: Tensor, delta: Tensor, grad: Tensor, k: Tensor, eta: Tensor, eps: Tensor):
    """l1-APGD's step (Croce & Hein 2021): δ ← Π(δ + η·u_k(∇)), u_k the sparse direction over the top-k coordinates
    (:meth:`L1Geometry.sparse_ascent_direction`), Π the exact projection onto ℓ1 ball ∩ box."""
    step = view_as_batch(eta, delta) * geometry.sparse_ascent_direction(grad, k)
    return geometry.project_ball_box(x, delta + step, eps)


def _checkpoint_fractions() -> list[float]:
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), while p_j ≤ 1 (Sec. 3.2)."""
    fractions = [0.0, 0.22]
    while True:
        nxt = fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06)
        if round(nxt, 9) > 1.0:
            return fractions
        fractions.append(nxt)


def largereps_stages(steps: int) -> list[tuple[float, int]]:
    """The ε schedule of ``use_largereps`` (Croce & Hein 2021): ``(factor, iterations)`` for 3ε, 2ε and ε over 30%,
    30% and the remaining 40% of ``steps`` (⌈0.3·steps⌉ each for the first two, as AutoAttack rounds). For 100 steps:
    ``[(3.0, 30), (2.0, 30), (1.0, 40)]``. The first two shrink where that would leave the last stage no iteration
    (AutoAttack's code would run it with none: steps = 4 gives 1, 1, 2 here, 2, 2, 0 there).

    Raises:
        ValueError: for fewer than 3 steps.
    """
    if steps < 3:
        raise ValueError(f"use_largereps needs steps >= 3 (one per stage), got steps={steps}.")
    first = min(math.ceil(round(0.3 * steps, 9)), (steps - 1) // 2)
    return [(3.0, first), (2.0, first), (1.0, steps - 2 * first)]


@dataclass(eq=False)
class _RunState(SampleState):
    """Per-sample state of one APGD run: the samples still under attack (or, masked, all with a mask)."""

    x: Tensor
    y: Tensor
    eps: Tensor
    delta: Tensor
    eta: Tensor  # step size η
    run_best_loss: Tensor  # this run's best point: the restart target of the schedule
    run_best_delta: Tensor
    run_best_grad: Tensor
    loss: Tensor | None = None  # the loss at delta (after a restart: at the best point)
    grad: Tensor | None = None  # the gradient at delta, until the step takes it
    clean: Tensor | None = None  # loss inputs: targeted DLR's true class (the clean prediction)
    dlr: Tensor | None = None  # a fused call's rows that ascend DLR (the others CE)
    target: Tensor | None = None  # APGD-T's target class
    prev: Tensor | None = None  # halving schedule: the previous iterate (momentum)
    raises: Tensor | None = None  # steps since the last checkpoint that raised the loss
    reduced: Tensor | None = None  # η was halved at the last checkpoint
    checkpoint_best: Tensor | None = None  # f_max at the last checkpoint
    sparsity: Tensor | None = None  # l1 schedule: ‖δ_best‖₀ at the last checkpoint
    k: Tensor | None = None  # l1 schedule: coordinates moved per step
    last_checkpoint: int = shared(0)  # the iteration of the last checkpoint (w_{j−1})


@dataclass(eq=False)
class _Points(SampleState):
    """The clean points of some samples (for a forward pass on them that counts as theirs)."""

    x: Tensor


@dataclass
class _Call:
    """What one attack call shares across its runs: the core, the loss and its per-sample inputs, the best points
    and the per-sample passes."""

    core: AttackCore
    kind: str  # "ce", "dlr", "dlr-targeted" or "mixed"
    tracker: MaxLossTracker  # per sample: the first fooling point, else the largest-loss point over the restarts
    forward_rows: Tensor  # (B,) passes per sample, to attribute a fused call's cost to its parts
    backward_rows: Tensor
    clean: Tensor | None = None  # (B,) loss inputs, see _RunState
    dlr: Tensor | None = None
    target: Tensor | None = None

    def loss_inputs(self, idx: Tensor) -> dict[str, Tensor]:
        """The per-sample loss inputs of the samples ``idx`` (the fields of :class:`_RunState` they fill)."""
        inputs = {"clean": self.clean, "dlr": self.dlr, "target": self.target}
        return {name: value[idx] for name, value in inputs.items() if value is not None}

    def count(self, s: SampleState, rows: Tensor | None, forward: int, backward: int) -> None:
        """Adds passes to the samples of ``s`` (those flagged ``rows``, or all)."""
        s.write(self.forward_rows, self.forward_rows[s.index] + forward, rows)
        s.write(self.backward_rows, self.backward_rows[s.index] + backward, rows)


class _HalvingSchedule:
    """APGD's step and step-size rule for L∞ and L2 (Croce & Hein 2020, Algorithm 1 and Sec. 3.2): the momentum
    step from η⁽⁰⁾ = 2ε, halved at the checkpoints w_j by the two conditions of :func:`halving_condition`."""

    def __init__(self, rho: float, alpha: float, compile_step) -> None:
        self.rho, self.alpha, self._step = rho, alpha, compile_step(_momentum_step)

    @staticmethod
    def checkpoints(steps: int) -> set[int]:
        return {w for w in APGD.checkpoints(steps)[1:] if w < steps}

    def start(self, eps: Tensor, delta: Tensor, warm: bool) -> dict[str, Tensor]:
        """The schedule's fields of :class:`_RunState` at the start of a run."""
        return {"eta": 2.0 * eps, "prev": delta, "raises": torch.zeros_like(eps),
                "reduced": torch.zeros_like(eps, dtype=torch.bool)}  # fmt: skip

    def observe(self, s: _RunState, k: int, loss: Tensor) -> None:
        if k == 0:
            s.checkpoint_best = loss
        else:
            s.raises = s.raises + (loss > s.loss).float()

    def checkpoint(self, s: _RunState, window: int) -> Tensor:
        """Halves η where the conditions hold; returns where the run goes back to its best point."""
        halve = halving_condition(s.raises, window, self.rho, s.reduced, s.run_best_loss, s.checkpoint_best)
        s.eta = torch.where(halve, 0.5 * s.eta, s.eta)
        s.reduced = halve
        s.checkpoint_best = s.run_best_loss
        s.raises = torch.zeros_like(s.raises)
        return halve

    def step(self, geometry: Geometry, s: _RunState, k: int) -> None:
        a = torch.tensor(1.0 if k == 0 else self.alpha, device=s.eta.device)
        s.prev, s.delta = s.delta, self._step(geometry, s.x, s.delta, s.prev, s.grad, s.eta, s.eps, a)


class _SparseSchedule:
    """l1-APGD's step and schedule (Croce & Hein 2021; details from AutoAttack's ``autopgd_base.py``): the sparse
    step over the top-k coordinates from η⁽⁰⁾ = ε, no momentum; every max(⌊0.04·N⌋, 1) iterations the sparsity k
    becomes ⌈‖δ_best‖₀ / 1.5⌉, and η is reset to ε (and the run goes back to its best point) where ‖δ_best‖₀ fell by
    more than 5% since the last checkpoint, else divided by 1.5, within [ε/10, ε]. k starts at ⌈0.2·d⌉ (from a
    warm start: ⌈‖δ⁽⁰⁾‖₀ / 1.5⌉)."""

    def __init__(self, compile_step) -> None:
        self._step = compile_step(_sparse_step)

    @staticmethod
    def checkpoints(steps: int) -> set[int]:
        period = max(int(round(0.04 * steps, 9)), 1)
        return set(range(period, steps, period))

    @staticmethod
    def _nonzeros(delta: Tensor) -> Tensor:
        return (delta.flatten(1) != 0).sum(dim=1).float()

    def start(self, eps: Tensor, delta: Tensor, warm: bool) -> dict[str, Tensor]:
        """The schedule's fields of :class:`_RunState` at the start of a run."""
        dims = delta[0].numel()
        if warm:
            sparsity = self._nonzeros(delta)
            k = (sparsity / 1.5).ceil().clamp(1, dims)
        else:
            sparsity = torch.full_like(eps, float(dims))
            k = torch.full_like(eps, float(max(math.ceil(round(0.2 * dims, 9)), 1)))
        return {"eta": eps.clone(), "sparsity": sparsity, "k": k}

    def observe(self, s: _RunState, k: int, loss: Tensor) -> None:
        pass

    def checkpoint(self, s: _RunState, window: int) -> Tensor:
        dims = s.delta[0].numel()
        sparsity = self._nonzeros(s.run_best_delta)
        back = sparsity < 0.95 * s.sparsity
        s.k = (sparsity / 1.5).ceil().clamp(1, dims)
        eta = torch.where(back, s.eps, s.eta / 1.5)
        s.eta = torch.minimum(torch.maximum(eta, s.eps / 10.0), s.eps)
        s.sparsity = sparsity
        return back

    def step(self, geometry: Geometry, s: _RunState, k: int) -> None:
        s.delta = self._step(geometry, s.x, s.delta, s.grad, s.k, s.eta, s.eps)


class _Run:
    """One APGD run of ``steps`` iterations on some samples, as the two halves of the core's loop: ``evaluate``
    (loss, gradient and success at the iterates, the run's best point; a ``final`` run's fooled samples leave with
    their first fooling point) and ``advance`` (the schedule's checkpoint, then its step). Iteration ``steps`` only
    scores the last iterate: no gradient, no step."""

    def __init__(self, attack: APGD, call: _Call, steps: int, final: bool) -> None:
        self.attack, self.call, self.steps, self.final = attack, call, steps, final
        if isinstance(attack.geometry, L1Geometry):
            self.schedule = _SparseSchedule(call.core.step)
        else:
            self.schedule = _HalvingSchedule(attack.rho, attack.alpha, call.core.step)
        self.checkpoints = self.schedule.checkpoints(steps)

    def start(self, idx: Tensor, start: Tensor, eps: Tensor) -> _RunState:
        """The state of the samples ``idx`` starting from ``start`` (projected into their balls ``eps``)."""
        core = self.call.core
        x = core.x32[idx]
        delta = self.attack.geometry.project_ball_box(x, start, eps)
        return core.start(
            _RunState, idx, x=x, y=core.y[idx], eps=eps, delta=delta,
            run_best_loss=torch.full_like(eps, float("-inf")), run_best_delta=delta.clone(),
            run_best_grad=torch.zeros_like(delta), **self.call.loss_inputs(idx),
            **self.schedule.start(eps, delta, warm=self.attack.use_largereps),
        )  # fmt: skip

    def evaluate(self, k: int, s: _RunState) -> Tensor | None:
        last = k == self.steps
        logits, loss, grad = self.attack._evaluate(self.call, s, with_grad=not last)
        fooled = self.call.core.fooled(logits, s.index)
        if self.final:  # fooled samples leave with their first fooling point
            eot = self.attack.eot_iter
            self.call.tracker.offer(s, s.delta, torch.where(fooled, loss, float("-inf")), fooled)
            self.call.count(s, fooled, (k + 1) * eot, min(k + 1, self.steps) * eot)
        improved = loss > s.run_best_loss
        s.run_best_delta = torch.where(view_as_batch(improved, s.delta), s.delta, s.run_best_delta)
        if not last:
            s.grad = grad
            s.run_best_grad = torch.where(view_as_batch(improved, grad), grad, s.run_best_grad)
        self.schedule.observe(s, k, loss)
        s.run_best_loss = torch.maximum(loss, s.run_best_loss)
        s.loss = loss
        return fooled if self.final else None

    def advance(self, k: int, s: _RunState) -> None:
        if k == self.steps:
            return
        if k in self.checkpoints:
            back = self.schedule.checkpoint(s, k - s.last_checkpoint)
            rows = view_as_batch(back, s.delta)
            s.delta = torch.where(rows, s.run_best_delta, s.delta)
            s.grad = torch.where(rows, s.run_best_grad, s.grad)
            s.loss = torch.where(back, s.run_best_loss, s.loss)
            s.last_checkpoint = k
        self.schedule.step(self.attack.geometry, s, k)
        s.grad = None  # taken by the step

    def finish(self, s: _RunState, idx: Tensor) -> Tensor | None:
        """Counts the passes of the samples still standing; a ``final`` run offers their best-loss points to the call
        (kept if they beat earlier restarts) and returns ``None``, an earlier stage returns its best-loss points for
        the samples ``idx`` (nobody left it), the next stage's start."""
        eot = self.attack.eot_iter
        self.call.count(s, None, (self.steps + 1) * eot, self.steps * eot)
        if self.final:
            standing = torch.zeros_like(s.run_best_loss, dtype=torch.bool)  # not fooled
            self.call.tracker.offer(s, s.run_best_delta, s.run_best_loss, standing)
            return None
        best = torch.zeros_like(self.call.core.x32)
        s.write(best, s.run_best_delta)
        return best[idx]


@register_attack(
    AttackSpec("apgd", AttackKind.BUDGETED, ("linf", "l2", "l1"), targeted=True, stochastic=True, paper=_PAPER,
               fusable=True)
)  # fmt: skip
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020, Algorithm 1): APGD-CE with ``loss="ce"``, APGD-DLR with ``loss="dlr"``, APGD-T with
    ``loss="dlr-targeted"``; l1-APGD (Croce & Hein 2021) with ``norm="l1"``; EOT over ``eot_iter`` passes.

    From a random start x⁽⁰⁾ in the ball, each iteration takes a projected step along the geometry's steepest
    ascent direction (sign ∇ for L∞, ∇/‖∇‖₂ for L2) and mixes it with the previous move:

        z⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + η⁽ᵏ⁾ u(∇f(x⁽ᵏ⁾))),
        x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α (z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)),

    with α = 1 on the first step, P the projection onto ball ∩ [0, 1] of the core's geometry, and η⁽⁰⁾ = 2ε. At
    the checkpoints w_j = ⌈p_j N⌉ (:meth:`checkpoints`) each sample halves its step size and restarts from its
    best point so far when (1) fewer than ρ·(w_j − w_{j−1}) of the steps since the last checkpoint raised the
    loss, or (2) its step size was not halved at the last checkpoint and its best loss has not improved since.
    Every quantity is per sample (ε may be a (B,) tensor).

    The returned point per sample is the first point that fooled the model or, failing that, the largest-loss
    point seen over all restarts. Restarts re-attack, from fresh random starts, only the samples still standing.

    **APGD-T** (``loss="dlr-targeted"``, Sec. 3.3 of the paper) keeps the untargeted contract: ``labels`` are the
    true labels and success means misclassified. For t = 1, ..., ``n_target_classes`` it runs APGD on the targeted
    DLR loss (:func:`targeted_dlr_loss`) towards each sample's t-th highest clean logit other than its label, with
    ``restarts`` restarts, on the samples not fooled yet. A model with fewer than ``n_target_classes`` + 1 classes
    gets its classes − 1 targets (logged once per attack, as AutoAttack's checks warn).

    **l1-APGD** (``norm="l1"``, Croce & Hein 2021): the projection is the exact one onto ℓ1 ball ∩ box
    (:meth:`L1Geometry.project_ball_box`); the step moves η/k along sign(∇) on the k coordinates with the largest
    |∇| (:meth:`L1Geometry.sparse_ascent_direction`), without momentum, from η⁽⁰⁾ = ε; every max(⌊0.04·N⌋, 1)
    iterations k becomes ‖δ_best‖₀ / 1.5 and η is reset to ε (going back to the best point) where ‖δ_best‖₀ fell by
    more than 5%, else divided by 1.5 (within [ε/10, ε]). ``rho`` and ``alpha`` are not used. With
    ``use_largereps=True`` the run is three stages at 3ε, 2ε and ε over 30%, 30% and 40% of the steps
    (:func:`largereps_stages`), each starting, projected onto its smaller ball, from the previous stage's
    largest-loss point with k = ‖δ⁽⁰⁾‖₀ / 1.5; only the last stage (inside the ε-ball) can fool.

    **EOT** (``eot_iter`` > 1, Athalye et al. 2018): every gradient, every loss value the schedule compares and the
    logits that decide success are the means over ``eot_iter`` forward (and backward) passes, all counted; for a
    randomized model that is a gradient of the expected loss. The means are taken in float64, so a deterministic
    model gives exactly the iterates and passes/``eot_iter`` of ``eot_iter=1``.

    Deviations from the papers and from AutoAttack's code (``autopgd_base.py``), and why:

    * Early stopping: a sample leaves the batch as soon as it is fooled, so it stops costing passes. AutoAttack
      steps the whole batch to the end, but a sample's outcome is fixed at its first fooling iterate (it is
      counted as non-robust from then on) and every APGD quantity is per sample, so this changes neither robust
      accuracy nor the trajectory of any other sample; it only changes the cost, and which fooling point is
      returned (the first one instead of the last).
    * Checkpoints follow the paper's formula; AutoAttack's code uses the integer approximation
      (0.22N, then shrinking by 0.03N down to 0.06N). For N = 100 both give 22, 41, 57, 70, 80, 87, 93, 99.
    * Condition 1 uses the paper's strict "fewer than ρ·(w_j − w_{j−1})"; AutoAttack's code halves at equality
      too (≤), which only differs when ρ·(w_j − w_{j−1}) is an integer (for N = 100: the 16-step window).
    * Condition 2 is checked at the first checkpoint too (against f(x⁽⁰⁾)), as the paper states; AutoAttack's
      code starts with "reduced at the last checkpoint" set, which disables it there.
    * After a restart from the best point, the next "did the step raise the loss" comparison is made against the
      loss of that best point (the iterate actually stepped from); AutoAttack compares with the loss recorded
      before the restart.
    * Random start: the core's :meth:`Geometry.sample` (uniform in the L∞ cube; random direction times U(0,1)·ε
      for L2), where AutoAttack starts on the sphere of its norm. Both are valid random inits; the step size 2ε
      makes the first step leave the start behind in either case. For L1 the start is AutoAttack's: the exact
      projection of a standard normal vector onto ball ∩ box (:meth:`L1Geometry.sample_ball_box`).
    * Targeted (``targeted=True``, ``labels`` are targets): ``loss="ce"`` descends the cross-entropy to the
      target; ``loss="dlr"`` ascends the paper's targeted DLR loss (:func:`targeted_dlr_loss`), whose true
      class y is taken as the model's clean prediction (one extra forward pass), since the attack contract
      passes targets only. For correctly classified inputs this is the true class.
    * APGD-T ranks the targets once, from one clean forward pass (``eot_iter`` passes) of the whole batch, where
      AutoAttack's code recomputes the clean logits of the remaining samples before every target (the same ranking
      for a deterministic model); the targets are "highest other than the label" where AutoAttack takes the 2nd to
      10th highest logits (the same for a correctly classified sample, the only ones it attacks). A sample not
      fooled by any target returns its largest-loss point; AutoAttack returns the clean input.
    * l1-APGD's step, schedule and sparsity rule (no momentum, the 4% checkpoint period, η⁽⁰⁾ = ε and the ε/10 floor,
      the initial 20% sparsity, the ⌈0.3N⌉ stage lengths) are read from AutoAttack's code; k is kept as a number of
      coordinates, ⌈‖δ‖₀ / 1.5⌉, which is what AutoAttack's fraction-and-sort indexing selects up to float rounding.
    * l1-APGD's ‖δ‖₀ counts the exact zeros the projection leaves in δ. AutoAttack counts the non-zeros of
      x_adv − x in float32, where the coordinates its projection zeroes come back as rounding noise on non-zero pixels
      (on 14×14 digits: 24 counted for 10 true non-zeros at the start), so its k is larger and its steps denser.
      Measured on a small digits MLP (176 points, 8 seeds): identical robust accuracy on average without
      ``use_largereps`` (0.247 both at ε = 1.5); with it, 0.591 here against AutoAttack's 0.577 at ε = 1.0 (emulating
      its rounding noise here gives 0.575) and 0.305 against 0.295 at ε = 1.5; AutoAttack's L1 configurations
      (APGD-CE with 5 restarts, APGD-T with 5 targets, both with ``use_largereps``) agree to one of the 176 points.
    * EOT: AutoAttack averages the gradient only and takes the loss and the success test from the last of the
      ``eot_iter`` passes; here all three are means (the success test on the mean logits is the expected
      classifier's, which a single noisy pass can flip either way).

    Fused calls: :meth:`call_fused` runs several calls of APGDs that differ only in their loss (APGD-CE and
    APGD-DLR) and ε as one call on their concatenated batches, each row ascending its own call's loss, with one
    model call per iteration for all of them; every row ends exactly as in its own call. The result's ``extra``
    holds the per-sample ``"forward_passes"`` and ``"backward_passes"`` (they sum to the call's counts), so that
    the passes of a fused call can be attributed to its parts. APGD-T does not fuse.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        eps: budget (a per-call ``eps`` tensor of shape (B,) overrides it).
        steps: iterations N (gradient evaluations per restart).
        restarts: random restarts; later ones attack only the samples not yet fooled (for APGD-T: per target).
        loss: ``"ce"`` (APGD-CE), ``"dlr"`` (APGD-DLR; needs ≥ 3 classes, ≥ 4 when targeted) or ``"dlr-targeted"``
            (APGD-T; needs ≥ 4 classes and ``targeted=False``).
        rho: ρ, the fraction of loss-raising steps below which the step size is halved (L∞, L2).
        alpha: momentum weight α of the new step (1 − α goes to the previous move; L∞, L2).
        targeted: ``labels`` are targets to reach (``loss="ce"`` or ``"dlr"``).
        n_target_classes: APGD-T's number of target classes (AutoAttack: 9; 5 in its L1 version).
        eot_iter: passes averaged per gradient (EOT; AutoAttack's ``rand`` version: 20).
        use_largereps: l1-APGD's 3ε/2ε/ε schedule (``norm="l1"`` only; needs ``steps`` ≥ 3).
        options: ``autocast``, ``compile``, ``mode``, ``seed``, shared by every attack (see :class:`Attack`).

    Example:
        >>> attack = APGD(norm="linf", eps=8 / 255, loss="dlr")  # doctest: +SKIP
        >>> robust = ~attack(model, images, labels).success  # doctest: +SKIP
        >>> l1_apgd_t = APGD(norm="l1", eps=12.0, loss="dlr-targeted", n_target_classes=5,
        ...                  use_largereps=True)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2", "l1"] = "linf",
        eps: float = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        loss: Literal["ce", "dlr", "dlr-targeted"] = "ce",
        rho: float = 0.75,
        alpha: float = 0.75,
        targeted: bool = False,
        n_target_classes: int = 9,
        eot_iter: int = 1,
        use_largereps: bool = False,
        **options,
    ) -> None:
        super().__init__(**options)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}.")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if not 0.0 <= rho <= 1.0 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"rho must lie in [0, 1] and alpha in (0, 1], got rho={rho}, alpha={alpha}.")
        if loss not in _LOSSES:
            raise ValueError(f"Unknown loss {loss!r} for APGD; allowed values are {', '.join(map(repr, _LOSSES))}.")
        if loss == "dlr-targeted" and targeted:
            raise ValueError(
                "loss='dlr-targeted' (APGD-T) takes the true labels and picks its own targets; it cannot be combined "
                "with targeted=True (for given targets use loss='dlr', targeted=True)."
            )
        if isinstance(n_target_classes, bool) or not isinstance(n_target_classes, int) or n_target_classes < 1:
            raise ValueError(f"n_target_classes must be an int >= 1, got {n_target_classes!r}.")
        if isinstance(eot_iter, bool) or not isinstance(eot_iter, int) or eot_iter < 1:
            raise ValueError(f"eot_iter must be an int >= 1, got {eot_iter!r}.")
        self.geometry = geometry_for(norm)
        if use_largereps and self.geometry.norm is not Norm.L1:
            raise ValueError(f"use_largereps is l1-APGD's ε schedule; it needs norm='l1', got norm={norm!r}.")
        self.norm = self.geometry.norm.value
        self.eps = float(eps)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.loss = loss
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.targeted = bool(targeted)
        self.n_target_classes = n_target_classes
        self.eot_iter = eot_iter
        self.use_largereps = bool(use_largereps)
        self._stages = largereps_stages(self.steps) if self.use_largereps else [(1.0, self.steps)]
        self._warned_targets = False

    @staticmethod
    def checkpoints(steps: int) -> list[int]:
        """The checkpoints w_j = ⌈p_j·steps⌉ of the paper (Sec. 3.2), duplicates removed, starting at w_0 = 0.

        For 100 steps: ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.
        """
        # Rounding before the ceiling keeps float noise (0.41 * 100 = 41.000000000000007) from adding a step.
        points = [math.ceil(round(p * steps, 6)) for p in _checkpoint_fractions()]
        return sorted(set(points))

    def shares_passes_with(self, other: object) -> bool:
        """Whether ``other`` can run in one :meth:`call_fused` with this attack: an APGD with the same configuration
        except, possibly, its loss (``"ce"`` or ``"dlr"``; APGD-T does not fuse) and its default ``eps`` (a fused
        call passes every row's ε)."""
        same = ("norm", "steps", "restarts", "rho", "alpha", "targeted", "eot_iter", "use_largereps", "autocast",
                "compile", "mode", "seed")  # fmt: skip
        return (
            type(other) is type(self)
            and "dlr-targeted" not in (self.loss, other.loss)
            and all(getattr(self, k) == getattr(other, k) for k in same)
        )

    def _check_classes(self, num_classes: int, loss: str) -> None:
        need = 4 if self.targeted or loss == "dlr-targeted" else 3
        if loss in ("dlr", "dlr-targeted") and num_classes < need:
            name = "APGD-T" if loss == "dlr-targeted" else f"APGD-DLR{' (targeted)' if self.targeted else ''}"
            raise InvalidInputError(
                f"{name} needs at least {need} classes (its denominator uses the {'3rd' if need == 3 else '4th'} "
                f"largest logit), but the model has {num_classes}. Use loss='ce' instead."
            )

    def _loss(self, logits: Tensor, s: _RunState, loss: str) -> Tensor:
        """The per-sample loss to ascend for the samples of ``s``: ``loss`` is ``"ce"``, ``"dlr"``,
        ``"dlr-targeted"`` (towards ``s.target``) or ``"mixed"`` (each row's own, DLR where ``s.dlr``; the other loss
        gets a zero gradient on that row)."""
        if loss == "mixed":
            return torch.where(s.dlr, self._loss(logits, s, "dlr"), self._loss(logits, s, "ce"))
        self._check_classes(logits.shape[1], loss)
        if loss == "ce":
            ce = cross_entropy(logits, s.y)
            return -ce if self.targeted else ce
        if loss == "dlr-targeted":
            return targeted_dlr_loss(logits, s.y, s.target)
        if self.targeted:
            return targeted_dlr_loss(logits, s.clean, s.y)
        return dlr_loss(logits, s.y)

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        return self.run_on(self.core(model, inputs, labels), self.budget(eps, inputs), generator)

    def run_on(self, core: AttackCore, eps: Tensor, generator: torch.Generator | None = None) -> AttackResult:
        """The attack on the batch of ``core``, a core the caller built (its model, options and active-set mode: a
        surrogate's, see :class:`~advtrain.attacks.Transfer`), with (B,) budgets ``eps``; the model must be in the
        attack's mode already."""
        return self._run(core, eps, [(self.loss, core.batch, generator)])

    def call_fused(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        *,
        segments: Sequence[tuple[APGD, int]],
        eps: float | Tensor | None = None,
    ) -> AttackResult:
        """Runs several APGD calls as one: ``inputs`` is their batches concatenated, ``segments`` says, in order,
        whose call each run of rows is (``(attack, rows)``), and ``eps`` (a (B,) tensor) holds every row's budget.

        Each segment ends exactly as ``attack(model, inputs[rows], labels[rows], eps=eps[rows])`` would: its own
        loss, its own generator seeded with the attack's seed (random starts are drawn per segment, in the same
        order), and APGD's per-sample schedule; only the model sees one batch per iteration instead of one per
        segment. That is what lets the evaluation run APGD-CE and APGD-DLR over a grid of ε with one forward and
        one backward pass per iteration (AutoAttack runs them one after another).

        Args:
            model, inputs, labels: as for a call.
            segments: ``(attack, rows)`` per segment; every attack must :meth:`share passes <shares_passes_with>`
                with this one, and the rows must add up to the batch.
            eps: per-row (or common) budget; default: each segment's attack's ``eps``.

        Returns:
            One :class:`AttackResult` for the whole batch; ``extra["forward_passes"]`` and
            ``extra["backward_passes"]`` give each row's passes, so a segment's cost is the sum over its rows.

        Raises:
            ValueError: if a segment's attack is not a compatible APGD or the rows do not cover the batch.
        """
        sizes = [int(rows) for _, rows in segments]
        if sum(sizes) != inputs.shape[0] or min(sizes, default=0) < 0:
            raise ValueError(f"call_fused: the segments' rows {sizes} must be >= 0 and add up to the batch of "
                             f"{inputs.shape[0]}.")  # fmt: skip
        for attack, _ in segments:
            if not self.shares_passes_with(attack):
                raise ValueError(f"call_fused: {attack!r} cannot share passes with {self!r}; only APGDs that differ "
                                 "in loss and eps can.")  # fmt: skip
        if eps is None:
            eps = torch.cat([torch.full((n,), a.eps) for (a, _), n in zip(segments, sizes, strict=True)])
        # Each segment draws from its own generator, seeded as its own call would be.
        parts = [(a.loss, n, a.generator(inputs.device)) for (a, _), n in zip(segments, sizes, strict=True)]
        with attack_context(model, self.mode):
            return self._run(self.core(model, inputs, labels), self.budget(eps, inputs), parts)

    def _run(
        self, core: AttackCore, eps_t: Tensor, segments: Sequence[tuple[str, int, torch.Generator | None]]
    ) -> AttackResult:
        """The attack on the batch of ``core``, consecutive segments ``(loss, rows, generator)`` (one for a plain
        call)."""
        call = self._call(core, segments)
        bounds = torch.tensor([0, *[n for _, n, _ in segments]], device=call.core.device).cumsum(0)
        targets = self._target_classes(call) if call.kind == "dlr-targeted" else [None]
        first_eps = eps_t * self._stages[0][0]
        for target in targets:
            call.target = target
            for _ in range(self.restarts):
                idx = (~call.tracker.success).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                # Each segment draws its random starts from its own generator, as its own call would.
                segment = torch.bucketize(idx, bounds[1:], right=True)
                start = torch.cat([
                    self.geometry.sample_ball_box(call.core.x32[part], first_eps[part], generator)
                    for s, (_, _, generator) in enumerate(segments)
                    if (part := idx[segment == s]).numel()
                ])  # fmt: skip
                for number, (factor, steps) in enumerate(self._stages):
                    final = number == len(self._stages) - 1
                    start = self._single_run(call, idx, start, eps_t[idx] * factor, steps, final)
        x, tracker = call.core.x, call.tracker
        extra = {"forward_passes": call.forward_rows, "backward_passes": call.backward_rows}
        return call.core.result(x + tracker.best_delta.to(x.dtype), tracker.success, self.geometry.measure, extra)

    def _call(self, core: AttackCore, segments: Sequence[tuple[str, int, torch.Generator | None]]) -> _Call:
        """The shared state of a call on ``segments``: its loss (``"mixed"`` when the segments' differ) and, for a
        targeted DLR, the true classes (the clean predictions: one forward pass of the DLR rows)."""
        losses = {loss for loss, n, _ in segments if n > 0}
        kind = losses.pop() if len(losses) == 1 else "mixed"
        counts = torch.zeros(core.batch, dtype=torch.long, device=core.device)
        call = _Call(core, kind, MaxLossTracker(core.x), forward_rows=counts, backward_rows=counts.clone())
        dlr = torch.cat([torch.full((n,), loss == "dlr", device=core.device) for loss, n, _ in segments])
        if kind == "mixed":
            call.dlr = dlr
        if self.targeted and kind != "ce" and bool(dlr.any()):
            rows = dlr.nonzero().squeeze(1)
            clean_logits = self._clean_logits(call, rows)
            self._check_classes(clean_logits.shape[1], "dlr")
            call.clean = core.y.clone()  # CE rows never read it
            call.clean[rows] = clean_logits.argmax(dim=1)
        return call

    def _clean_logits(self, call: _Call, rows: Tensor) -> Tensor:
        """The (EOT-mean) logits of the clean inputs ``rows``, passes counted (masked: a pass on the whole batch)."""
        core = call.core
        points = core.start(_Points, rows, x=core.x[rows])
        logits = self._mean(lambda: (core.forward(points.x),))[0]
        call.forward_rows[rows] += self.eot_iter
        return logits[rows] if points.masked else logits

    def _target_classes(self, call: _Call) -> list[Tensor]:
        """APGD-T's targets: per sample, its classes other than the label by decreasing clean logit, the first
        ``n_target_classes`` of them (fewer when the model has fewer classes: logged once)."""
        everyone = torch.arange(call.core.batch, device=call.core.device)
        logits = self._clean_logits(call, everyone)
        classes = logits.shape[1]
        self._check_classes(classes, "dlr-targeted")
        count = min(self.n_target_classes, classes - 1)
        if count < self.n_target_classes and not self._warned_targets:
            log.warning("APGD-T: n_target_classes=%d, but the model has %d classes, so only its %d other classes are "
                        "targets; pass n_target_classes=%d to silence this.", self.n_target_classes, classes, count,
                        count)  # fmt: skip
            self._warned_targets = True
        others = logits.scatter(1, call.core.y[:, None], float("-inf"))
        ranked = others.argsort(dim=1, descending=True)
        return [ranked[:, t] for t in range(count)]

    def _mean(self, evaluate) -> tuple[Tensor | None, ...]:
        """``evaluate()`` (a tuple of tensors or ``None``) averaged over ``eot_iter`` calls, in float64 so that equal
        passes give back exactly their value; a single call is returned as is."""
        if self.eot_iter == 1:
            return evaluate()
        total = None
        for _ in range(self.eot_iter):
            parts = [None if t is None else t.double() for t in evaluate()]
            total = (
                parts if total is None else [None if a is None else a + b for a, b in zip(total, parts, strict=True)]
            )
        return tuple(None if t is None else (t / self.eot_iter).float() for t in total)

    def _evaluate(self, call: _Call, s: _RunState, with_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Logits, loss and (``with_grad``) gradient at the iterates of ``s``, EOT-averaged."""
        core = call.core

        def once() -> tuple[Tensor, Tensor, Tensor | None]:
            if with_grad:
                logits, loss, grad, _ = core.value_and_grad(
                    s.delta, lambda d: s.x + d, lambda z: self._loss(z, s, call.kind)
                )
                return logits, loss, grad
            logits = core.forward(s.x + s.delta)
            return logits, self._loss(logits, s, call.kind), None

        return self._mean(once)

    def _single_run(
        self, call: _Call, idx: Tensor, start: Tensor, eps: Tensor, steps: int, final: bool
    ) -> Tensor | None:
        """One APGD run of ``steps`` iterations on the samples ``idx`` from the points ``start`` in budgets ``eps``
        (see :class:`_Run`).

        A ``final`` run (every run but the first two stages of ``use_largereps``) offers fooled points and best-loss
        points to the call's tracker, and its fooled samples leave as they are found; an earlier stage fools nothing
        (its ball is larger than the budget) and returns its largest-loss points, the next stage's start. Passes are
        counted into ``call`` either way.
        """
        run = _Run(self, call, steps, final)
        state = run.start(idx, start, eps)
        call.core.loop(state, steps + 1, run.evaluate, run.advance)
        return run.finish(state, idx)
