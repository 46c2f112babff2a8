"""The object every attack returns, to be verified by the framework."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class AttackResult:
    """What an attack found, per sample.

    Attributes:
        adv: adversarial inputs, same shape and dtype as the clean inputs, in [0, 1]. A sample the attack
            never fooled comes back as the attack's best effort (budgeted attacks: largest loss inside the
            ball) or unchanged (minimal-norm attacks).
        success: bool (B,), whether ``adv`` fools the model (as observed by the attack; the framework
            re-verifies with a fresh forward pass).
        norms: float32 (B,), the size of ``adv - inputs`` in the attack's norm.
        forward_passes: number of per-sample forward evaluations spent (a forward of a batch of n samples
            counts n), so that early stopping shows up in the count.
        backward_passes: likewise for backward passes (input gradients).
        model_calls: number of batched model calls, forward and backward together.
        extra: optional further per-sample (B,) measurements an attack reports beside ``norms``, keyed by name
            (e.g. StrAttack's ``"l0"``, ``"l1"``, ``"l2"``, ``"linf"`` sizes of ``adv - inputs``); empty by default.
    """

    adv: Tensor
    success: Tensor
    norms: Tensor
    forward_passes: int = 0
    backward_passes: int = 0
    model_calls: int = 0
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Fraction of samples fooled."""
        return float(self.success.float().mean())
