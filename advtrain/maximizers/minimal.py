"""Inner maximizers built on minimal-norm attacks, projected to the training budget: DDN (Rony et al., CVPR 2019)
and advtrain's TR-L∞ (on Yao et al., CVPR 2019). METHODS.md §2 and §3."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from advtrain.attacks.ddn import DDN as DDNAttack
from advtrain.attacks.trust_region import TrustRegion
from advtrain.engine.modes import attack_context
from advtrain.maximizers.base import InnerMaximizer, Perturbation
from advtrain.threat.geometry import geometry_for
from advtrain.threat.norms import as_eps_tensor


class _ProjectedMinimalNorm(InnerMaximizer):
    """Runs a minimal-norm attack in eval mode with frozen parameters, then shrinks each perturbation into the
    ε-ball (projection only ever shrinks: a perturbation already inside is kept). Samples the attack never fooled
    come back unchanged and are trained on clean."""

    norm: str
    _inner: object  # the attack, set by subclasses

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        geometry = geometry_for(self.norm)
        eps = as_eps_tensor(self.eps, inputs)
        with attack_context(model, "eval"):
            result = self._inner(model, inputs, labels)
        delta = geometry.project_ball_box(inputs, result.adv - inputs, eps)
        return Perturbation(adv=(inputs + delta).clamp(0.0, 1.0), eps=eps)


class DDN(_ProjectedMinimalNorm):
    """DDN adversarial training (Rony et al. 2019, Sec. 5–6; METHODS.md §2).

    DDN (``steps`` iterations, γ, cosine step 1 → 0.01, 256-level quantisation) finds the smallest adversarial
    perturbation it can; it is then renormalised down to ‖δ‖₂ ≤ ε and the model trains on the adversarial examples
    only. Inside the ε-ball this gives the minimal-norm point (near the boundary), not the max-loss point; samples
    DDN never fools, and those beyond ε after projection that stop fooling, train (nearly) clean.

    Reported: CIFAR-10 (WRN-28-10, ε = 1.0, 30 adversarial epochs after standard training) 89.05% clean / 67.6% at
    L2 0.5 (66.44% AutoAttack); MNIST (ε = 2.4, 50 epochs) 87.2% robust at ε = 1.5.

    Args:
        eps: L2 budget of the training perturbations (CIFAR 1.0, MNIST 2.4).
        steps: DDN iterations (100).
        gamma: DDN's norm update factor (0.05).
        levels: quantisation levels (256; ``None`` for none).
    """

    def __init__(self, *, eps: float = 1.0, steps: int = 100, gamma: float = 0.05, levels: int | None = 256) -> None:
        self.norm = "l2"
        self.eps = float(eps)
        self.steps = int(steps)
        self.gamma = float(gamma)
        self.levels = levels
        self._inner = DDNAttack(steps=steps, gamma=gamma, levels=levels)


class TRLinf(_ProjectedMinimalNorm):
    """advtrain's TR-L∞ maximizer (METHODS.md §3: no official recipe exists).

    The trust-region attack (L∞, first order, adaptive radius, best class) runs for a fixed small budget of
    ``steps`` iterations; its perturbation is clipped to [x − ε, x + ε] and the box, and the model trains on the
    result. Samples still unfooled after the budget train clean. The seed's appendix trains with ABSA, whose code uses
    FGSM; this design is advtrain's, and its strength must be shown by evaluation (``benchmarks/train_compare.py``).

    Args:
        eps: L∞ budget (CIFAR 8/255, MNIST 0.3).
        steps: trust-region iterations per batch.
        radius: initial trust radius.
        order: 1 or 2 (second order needs a smooth model).
    """

    def __init__(
        self, *, eps: float = 8 / 255, steps: int = 10, radius: float = 1e-3, order: Literal[1, 2] = 1
    ) -> None:
        self.norm = "linf"
        self.eps = float(eps)
        self.steps = int(steps)
        self.radius = float(radius)
        self.order = order
        self._inner = TrustRegion(norm="linf", steps=steps, radius=radius, order=order, adaptive=True, target="best")
