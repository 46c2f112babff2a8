"""FAB: the fast adaptive boundary attack (untargeted, FAB-T and targeted), L∞, L2 and L1.

References:
    Croce & Hein, *Minimally distorted adversarial examples with a fast adaptive boundary attack*, ICML 2020
    (Algorithm 1, Sec. 3); FAB-T as run by AutoAttack: Croce & Hein, *Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks*, ICML 2020 (Sec. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.core import AttackCore
from advtrain.engine.result import AttackResult
from advtrain.engine.state import SampleState
from advtrain.engine.tracking import MinimalNormTracker
from advtrain.threat.hyperplane import HyperplaneProjection, hyperplane_projection
from advtrain.threat.norms import Norm, view_as_batch

_PAPER = "Croce & Hein, Minimally distorted adversarial examples with a fast adaptive boundary attack, ICML 2020"
# Radius of the random restarts when no eps is given: the official code's default eps per norm (fab_base.py).
_DEFAULT_RESTART_EPS = {Norm.LINF: 0.3, Norm.L2: 1.0, Norm.L1: 5.0}
_FLOOR = 1e-8  # the official floor on the step norms in the bias α


def _fab_step(
    point: Tensor, origin: Tensor, to_plane: Tensor, from_origin: Tensor, alpha: Tensor, eta: Tensor
) -> Tensor:
    """FAB's biased step: clip((x + η δ_x)(1 − α) + (x_orig + η δ_orig) α) to the box, α (n,) per sample. One
    fusible unit (see :meth:`~advtrain.engine.core.AttackCore.step`)."""
    a = view_as_batch(alpha, point)
    return ((point + eta * to_plane) * (1.0 - a) + (origin + eta * from_origin) * a).clamp(0.0, 1.0)


@dataclass(eq=False)
class _FABState(SampleState):
    """Per-sample state of a FAB run (the samples still under attack, or, masked, all with a mask)."""

    x: Tensor  # the iterate
    x0: Tensor  # the original point
    y: Tensor  # the label (targeted: the target)
    t: Tensor | None = None  # FAB-T's target
    eps: Tensor | None = None  # the budget, when there is one
    new: Tensor | None = None  # the iteration's new point (evaluated, then stepped from)
    fooled: Tensor | None = None  # whether the new point fools


def _offer(tracker: MinimalNormTracker, s: SampleState, adv: Tensor, norms: Tensor, fooled: Tensor) -> None:
    """``tracker.offer`` without a host sync: the rows of ``s`` are selected, not masked out."""
    index = s.index
    best = tracker.best_norm[index]
    better = fooled & (norms < best)
    if s.masked:
        better = better & s.active
    tracker.best_norm[index] = torch.where(better, norms.float(), best)
    kept = tracker.best_adv[index]
    tracker.best_adv[index] = torch.where(view_as_batch(better, adv), adv.to(kept.dtype), kept)
    tracker.success[index] = tracker.success[index] | better


@register_attack(
    AttackSpec("fab", AttackKind.MINIMAL, ("linf", "l2", "l1"), targeted=True, stochastic=True, paper=_PAPER,
               eps_meaning="optional_budget")
)  # fmt: skip
class FAB(Attack):
    """Fast adaptive boundary attack (Croce & Hein, ICML 2020): a minimal-norm attack in L∞, L2 or L1.

    Each iteration linearises the classifier at the current iterate x: every boundary f_j = z_j − z_y (untargeted:
    all j ≠ y) becomes the hyperplane f_j(x) + ⟨∇f_j(x), δ⟩ = 0 and the closest one, argmin_j |f_j| / ‖∇f_j‖_q
    (q the dual norm), is kept. Its minimal-norm projection inside the [0, 1] box
    (:mod:`advtrain.threat.hyperplane`) is taken twice, from x (δ_x) and from the original point x_orig (δ_orig),
    and the two are mixed with the bias α = min(‖δ_x‖ / (‖δ_x‖ + ‖δ_orig‖), α_max) and the overshoot η:

        x ← clip((x + η δ_x)(1 − α) + (x_orig + η δ_orig) α).

    If the new x is adversarial it is kept when its norm is the smallest so far, and x is pulled back towards x_orig,
    x ← x_orig + β (x − x_orig), so that the next steps search closer to the original point. A run starts at x_orig;
    restarts after the first start at a random point of the p-sphere of radius r/2 around x_orig (uniform in the L∞
    cube rescaled to it; a Gaussian direction for L2 and L1: the official laws) with r = ε when ``eps`` is given.

    Three variants, the boundary differing:

    * untargeted (default): all C − 1 boundaries f_j = z_j − z_y; success = misclassified. C − 1 backward passes
      per iteration.
    * FAB-T (``n_target_classes=k``), as AutoAttack runs it: ``labels`` are the true labels, and for each of the k
      classes t of highest clean logit other than y (all other classes when C ≤ k), in that order, a targeted run
      uses the single boundary f = z_t − z_y (one backward pass per iteration). Success still means misclassified
      (not "reached t"); per sample the smallest successful perturbation over all targets and restarts is kept.
    * targeted (``targeted=True``): ``labels`` are the targets; the boundary is f = z_t − z_c with c the strongest
      other class at the current iterate; success = classified as t.

    Which samples each run attacks: samples misclassified at the start (at the target, when targeted) succeed at
    once with δ = 0 and cost nothing more. Without ``eps`` every other sample goes through every restart and every
    target (each run can only lower its norm), for ``steps`` iterations each. With ``eps`` only perturbations with
    ‖δ‖_p ≤ ε count as success, and a sample stops as soon as it has one: it leaves the run at that iteration and
    is not attacked by later restarts or targets (its success cannot change any more). So AutoAttack's FAB-T at a
    budget is ``FAB(n_target_classes=9, eps=ε)``; without ``eps`` FAB-T runs all k targets on every sample (about
    k times the cost, for the smallest norm over targets).

    Cost: one forward pass of the clean batch, then per iteration and sample in a run one forward pass with a
    graph, K backward passes (K = C − 1 untargeted, 1 for FAB-T and targeted) and one forward pass of the new
    iterate, as in the official code. Counted as run. The untargeted Jacobian holds C − 1 input-sized gradients per
    sample (as the official code's C): with many classes (ImageNet) run FAB-T, as AutoAttack does.

    Deviations from the paper and from the official code (``fab_base.py``, ``fab_pt.py``), and why:

    * With ``eps`` a sample leaves its run at its first success within ε; the official code steps it to the end of
      the run, minimising further. Success within ε, the only thing the official code reports, is the same (it is
      per sample and cannot be lost once found); the returned point is the first one within ε, not the smallest,
      and the cost drops. Run without ``eps`` for minimal norms.
    * Without ``eps``, restarts and FAB-T's targets attack every sample that is not fooled from the start, keeping
      the smallest norm over runs (what a minimal-norm attack wants from them); the official code, whose ``eps``
      defaults to 0.3/1/5 (L∞/L2/L1), only re-attacks the samples not yet fooled within that default. The radius is
      then r = min(smallest norm found so far, that default): a restart is meant to search near the boundary, and a
      sample with a known adversarial point has it closer than the default (the official code's ``min(res2, eps)``
      has the same form but its res2 is reset before every run, so it always draws at eps/2).
    * FAB-T's targets are the top-k clean logits other than the label; the official code takes the 2nd to
      (k+1)-th largest logits, the same classes for the correctly classified samples it attacks.
    * Untargeted linearisation takes the gradients of the C − 1 logit differences (C − 1 backward passes); the
      official code takes those of all C logits and subtracts. Same hyperplanes, one pass fewer.
    * The projection is solved exactly by sorting (one sort, cumulative sums, no bisection); it gives the official
      ``fab_projections.py`` results to float rounding, also where the hyperplane misses the box (then the box
      point of most progress towards it) (tests/test_threat_hyperplane.py).
    * The targeted variant with ``labels`` as targets is not in the official code (its FAB-T knows the true label,
      and the clean prediction is the competing class); here the competing class is the strongest class other than
      the target at the current iterate, since crossing that boundary is what reaching the target needs.
    * ε may be a (B,) tensor; random starts come from the attack's seeded generator (``seed``), so results are
      reproducible, rather than from the global RNG reseeded by ``perturb``.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        eps: optional budget: only perturbations with norm ≤ ε count as success, and restarts start at radius ε/2
            (a per-call ``eps``, scalar or (B,), overrides it). ``None``: unbounded.
        steps: iterations per run (the official 100).
        restarts: runs per target (untargeted: runs); the first starts at the clean point, the others at random.
        n_target_classes: ``None`` for untargeted FAB; k for FAB-T with the k highest other classes (AutoAttack: 9).
        targeted: ``labels`` are targets to reach (exclusive with ``n_target_classes``).
        alpha_max: α_max, the largest weight of the step from the original point (official 0.1).
        eta: η, the overshoot of both projections (official 1.05).
        beta: β, the backward step towards the original point after a success (official 0.9).
        options: ``autocast``, ``compile``, ``mode``, ``seed``, shared by every attack (see
            :class:`~advtrain.attacks.base.Attack`).

    Example:
        >>> attack = FAB(norm="linf", n_target_classes=9, eps=8 / 255)  # doctest: +SKIP
        >>> result = attack(model, images, labels)  # doctest: +SKIP
        >>> robust = ~result.success  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2", "l1"] = "linf",
        eps: float | None = None,
        steps: int = 100,
        restarts: int = 1,
        n_target_classes: int | None = None,
        targeted: bool = False,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        **options,
    ) -> None:
        super().__init__(**options)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}.")
        if n_target_classes is not None and n_target_classes < 1:
            raise ValueError(f"n_target_classes must be None (untargeted FAB) or >= 1 (FAB-T), got {n_target_classes}.")
        if n_target_classes is not None and targeted:
            raise ValueError(
                "n_target_classes (FAB-T: labels are the true labels) and targeted=True (labels are the targets) "
                "exclude each other: pass one of them."
            )
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must lie in [0, 1], got {alpha_max}.")
        if eta < 1.0:
            raise ValueError(f"eta (the overshoot) must be >= 1, got {eta}.")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1], got {beta}.")
        self.projection: HyperplaneProjection = hyperplane_projection(norm)
        self.norm = self.projection.norm.value
        self.eps = self.optional_eps(eps)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.n_target_classes = None if n_target_classes is None else int(n_target_classes)
        self.targeted = bool(targeted)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        core = self.core(model, inputs, labels)
        budget = self.budget(eps, inputs)
        x0 = core.x32
        tracker = MinimalNormTracker(core.x)
        clean = core.forward(x0)
        if clean.shape[1] < 2:
            raise ValueError(f"FAB needs a model with at least two classes, got {clean.shape[1]} logits.")
        fooled_at_start = core.fooled(clean, torch.arange(core.batch, device=core.device))
        tracker.update(None, core.x, torch.zeros(core.batch, device=core.device), fooled_at_start)
        for target in self._targets(clean, core.y):
            for restart in range(self.restarts):
                # Without a budget every run can still lower a norm; with one, a success within ε is final.
                standing = ~fooled_at_start if budget is None else ~tracker.success
                index = standing.nonzero().squeeze(1)  # one host sync per run
                if index.numel() == 0:
                    break
                self._single_run(core, tracker, index, target, budget, restart > 0, generator)
        return core.result(tracker.best_adv, tracker.success.clone(), self.projection.measure)

    def _targets(self, clean: Tensor, labels: Tensor) -> list[Tensor | None]:
        """The target of each run: ``None`` (untargeted, or targeted with the labels as targets), or FAB-T's
        (B,) classes of highest clean logit other than the label, one entry per target rank."""
        if self.n_target_classes is None:
            return [None]
        k = min(self.n_target_classes, clean.shape[1] - 1)
        ranked = clean.scatter(1, labels[:, None], float("-inf")).topk(k, dim=1).indices
        return list(ranked.unbind(dim=1))

    def _single_run(
        self,
        core: AttackCore,
        tracker: MinimalNormTracker,
        index: Tensor,
        target: Tensor | None,
        budget: Tensor | None,
        random_start: bool,
        generator: torch.Generator | None,
    ) -> None:
        """One FAB run of ``steps`` iterations on the samples ``index`` (see the class docstring): each iteration
        linearises at the iterate, evaluates the new point (``evaluate``: tracking; with a budget, the samples with a
        success within ε are done), then moves there (``advance``)."""
        projection = self.projection
        x0 = core.x32[index]
        start = x0
        if random_start:
            radius = (
                budget[index]
                if budget is not None
                else tracker.best_norm[index].clamp_max(_DEFAULT_RESTART_EPS[projection.norm])
            )
            start = (x0 + projection.sphere(x0, radius / 2.0, generator)).clamp(0.0, 1.0)
        state = core.start(_FABState, index, x=start, x0=x0, y=core.y[index],
                           t=None if target is None else target[index],
                           eps=None if budget is None else budget[index])  # fmt: skip
        step = core.step(_fab_step)
        eta = torch.full((), self.eta, device=core.device)

        def evaluate(k: int, s: _FABState) -> Tensor | None:
            with torch.enable_grad():
                point = s.x.detach().requires_grad_(True)
                values = self._boundaries(core.logits(point), s)
                normals = core.jacobian(values, point)
            s.new = self._new_point(s, values.detach(), normals, step, eta)
            s.fooled = core.fooled(core.forward(s.new), s.index)
            norms = projection.measure(s.new - s.x0)
            _offer(tracker, s, s.new, norms, s.fooled if budget is None else s.fooled & (norms <= s.eps))
            return None if budget is None else tracker.success[s.index]

        def advance(k: int, s: _FABState) -> None:
            s.x = torch.where(view_as_batch(s.fooled, s.new), s.x0 + self.beta * (s.new - s.x0), s.new)

        core.loop(state, self.steps, evaluate, advance)

    def _new_point(self, s: _FABState, values: Tensor, normals: Tensor, step, eta: Tensor) -> Tensor:
        """FAB's new point from the linearisation (``values`` (n, K) and their gradients ``normals``) at ``s.x``:
        the closest boundary's hyperplane, projected onto from x and from x_orig, the two mixed by the bias α."""
        projection = self.projection
        closest = projection.distance(values, normals).argmin(dim=1)
        rows = torch.arange(values.shape[0], device=values.device)
        f, w = values[rows, closest], normals[rows, closest]
        xk, origin = s.x, s.x0
        # The same hyperplane seen from x (value f) and from x_orig (value f + ⟨w, x_orig − x⟩): one batched call.
        at_origin = f + (w * (origin - xk)).flatten(1).sum(dim=1)
        steps = projection.project(torch.cat([xk, origin]), torch.cat([w, w]), torch.cat([f, at_origin]))
        to_plane, from_origin = steps.split(xk.shape[0])
        n_plane = projection.measure(to_plane).clamp_min(_FLOOR)
        n_origin = projection.measure(from_origin).clamp_min(_FLOOR)
        alpha = (n_plane / (n_plane + n_origin)).clamp_max(self.alpha_max)
        return step(xk, origin, to_plane, from_origin, alpha, eta)

    def _boundaries(self, logits: Tensor, s: _FABState) -> Tensor:
        """(n, K) logit differences whose zero sets are the boundaries of this variant (see the class docstring)."""
        if self.n_target_classes is not None:  # FAB-T: the target against the true label
            return logits.gather(1, s.t[:, None]) - logits.gather(1, s.y[:, None])
        if self.targeted:  # the target against the strongest other class here
            rival = logits.detach().scatter(1, s.y[:, None], float("-inf")).argmax(dim=1, keepdim=True)
            return logits.gather(1, s.y[:, None]) - logits.gather(1, rival)
        num_classes = logits.shape[1]
        others = (s.y[:, None] + torch.arange(1, num_classes, device=logits.device)) % num_classes
        return logits.gather(1, others) - logits.gather(1, s.y[:, None])
