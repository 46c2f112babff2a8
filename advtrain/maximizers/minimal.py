"""Inner maximizers built on minimal-norm attacks, projected to the training budget: DDN (Rony et al., CVPR 2019)
and advtrain's TR-L∞ (on Yao et al., CVPR 2019). They differ in what a sample the attack
never fooled trains on: DDN returns it unchanged (the official training), TR-L∞ uses the attack's last iterate."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from advtrain.attacks.ddn import DDN as DDNAttack
from advtrain.attacks.trust_region import TrustRegion
from advtrain.engine.modes import attack_context
from advtrain.engine.result import AttackResult
from advtrain.maximizers.base import InnerMaximizer, Perturbation, batch_budget, checked_budget, trusted
from advtrain.threat.geometry import geometry_for


class _ProjectedMinimalNorm(InnerMaximizer):
    """Runs a minimal-norm attack in eval mode with frozen parameters, then shrinks each training point into the
    ε-ball and the box (the projection only ever shrinks: a perturbation already inside is kept). Which point a
    sample the attack never fooled trains on is the subclass's decision (:meth:`_start_point`).

    Host syncs: the attacks keep theirs (DDN: on CPU only, one per iteration, the zero-gradient test; TR: the
    active-set bookkeeping of its adaptive radius); the input and label checks are skipped (the batch was validated
    before it reached the device) and the projection adds none."""

    norm: str
    _inner: object  # the attack, set by subclasses

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        geometry = geometry_for(self.norm)
        eps = batch_budget(self.eps, inputs)
        with attack_context(model, "eval"):
            result = self._inner(model, inputs, labels)
        delta = geometry.project_ball_box(inputs, self._start_point(result) - inputs, eps)
        return Perturbation(adv=(inputs + delta).clamp(0.0, 1.0), eps=eps)

    def _start_point(self, result: AttackResult) -> Tensor:
        """The point to project: the attack's output (a never-fooled sample comes back unchanged)."""
        return result.adv


class DDN(_ProjectedMinimalNorm):
    """DDN adversarial training (Rony et al. 2019, Sec. 5–6).

    DDN (``steps`` iterations, γ, cosine step 1 → 0.01, 256-level quantisation) finds the smallest adversarial
    perturbation it can; it is then renormalised down to ‖δ‖₂ ≤ ε and the model trains on the adversarial examples
    only. Inside the ε-ball this gives the minimal-norm point (near the boundary), not the max-loss point.

    Decision (as the official training code): a sample DDN never fools comes back unchanged and trains
    clean; advtrain does not substitute DDN's last iterate (unlike :class:`TRLinf`). With 100 steps DDN's radius grows
    by up to 5% per step, so on a trained network such samples are rare; samples whose minimal perturbation is longer
    than ε, shrunk into the ball, may stop fooling and then train near the boundary.

    Budget schedule: only the projection radius ``eps`` scales. DDN is a minimal-norm attack without a budget (its
    radius adapts multiplicatively from 1), so at factor f it finds the same minimal perturbation and shrinks it into
    the f·ε ball.

    Reported: CIFAR-10 (WRN-28-10, ε = 1.0, 30 adversarial epochs after standard training) 89.05% clean / 67.6% at
    L2 0.5 (66.44% AutoAttack); MNIST (ε = 2.4, 50 epochs) 87.2% robust at ε = 1.5.

    Args:
        eps: L2 budget of the training perturbations (CIFAR 1.0, MNIST 2.4).
        steps: DDN iterations (100).
        gamma: DDN's norm update factor (0.05).
        levels: quantisation levels (256; ``None`` for none).
    """

    budget_keys = ("eps",)

    def __init__(self, *, eps: float = 1.0, steps: int = 100, gamma: float = 0.05, levels: int | None = 256) -> None:
        self.norm = "l2"
        self.eps = checked_budget(eps)
        self.steps = int(steps)
        self.gamma = float(gamma)
        self.levels = levels
        self._inner = trusted(DDNAttack(steps=steps, gamma=gamma, levels=levels))


class TRLinf(_ProjectedMinimalNorm):
    """advtrain's TR-L∞ maximizer (no official recipe exists).

    The trust-region attack (L∞, first order, adaptive radius, best class) runs for a fixed small budget of
    ``steps`` iterations; each sample's point is clipped to [x − ε, x + ε] and the box, and the model trains on the
    result. A fooled sample's point is its first fooling point (the minimal-norm one the attack found); a sample
    still unfooled after the budget uses the attack's **last iterate** (``AttackResult.extra["last_iterate"]``).

    Decision: the design is "run TR with a fixed small budget, project to the ε-ball, train
    on the result", i.e. on where the budget left each sample. Returning an unfooled sample unchanged (a minimal-norm
    attack's evaluation contract) would train exactly the samples the attack found hardest on clean inputs, and with
    a small budget that is most of them: the model then trains (nearly) clean and has no robustness. The last iterate
    is not grown further into the ball: TR-L∞ stays a projection of what the trust-region steps found, and how far
    they reach is set by the budget and the radius (about ``steps`` × the radius cap), so ``radius_bounds`` should
    let ``steps`` iterations reach ε (MNIST ε = 0.3 with 10 steps: radius 0.03, cap 0.1; the reference bounds
    [1e-4, 1e-2] suit CIFAR's 8/255). The seed's appendix trains with ABSA, whose code uses FGSM; this design is
    advtrain's, and its strength must be shown by evaluation (``benchmarks/train_compare.py``).

    Budget schedule: ``eps``, the initial trust radius and its bounds scale together, so that ``steps`` iterations
    reach the same multiple of ε at every factor (the reach, about ``steps`` × the radius cap, is what this design
    ties to ε).

    Args:
        eps: L∞ budget (CIFAR 8/255, MNIST 0.3).
        steps: trust-region iterations per batch.
        radius: initial trust radius.
        radius_bounds: (min, max) of the adaptive radius; ``None`` for the reference L∞ bounds (1e-4, 1e-2).
        order: 1 or 2 (second order needs a smooth model).
    """

    budget_keys = ("eps", "radius", "radius_bounds", "_inner.radius", "_inner.radius_bounds")

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        steps: int = 10,
        radius: float = 1e-3,
        radius_bounds: tuple[float, float] | None = None,
        order: Literal[1, 2] = 1,
    ) -> None:
        self.norm = "linf"
        self.eps = checked_budget(eps)
        self.steps = int(steps)
        self.radius = float(radius)
        self.radius_bounds = None if radius_bounds is None else (float(radius_bounds[0]), float(radius_bounds[1]))
        self.order = order
        self._inner = trusted(
            TrustRegion(
                norm="linf",
                steps=steps,
                radius=radius,
                radius_bounds=self.radius_bounds,
                order=order,
                adaptive=True,
                target="best",
            )
        )

    def _start_point(self, result: AttackResult) -> Tensor:
        """The first fooling point where the attack fooled the sample, its last iterate elsewhere."""
        return result.extra["last_iterate"]
