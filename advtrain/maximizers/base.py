"""Inner maximizers produce the inputs (and, for some methods, labels or budgets) a training step learns from.

They differ from attacks: an attack must return verified adversarial examples for evaluation; a maximizer
returns whatever its method trains on (Madry's PGD uses the last iterate, not the best one), as cheaply as the
method allows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class Perturbation:
    """What a maximizer hands to the outer objective.

    Attributes:
        adv: the perturbed training inputs in [0, 1], or ``None`` to train on the clean inputs.
        soft_labels: optional (B, K) target distributions (label-side methods).
        eps: optional (B,) per-sample budgets the maximizer used.
        extra: method-specific per-sample tensors for the matching objective (e.g. MMA's masks).
    """

    adv: Tensor | None
    soft_labels: Tensor | None = None
    eps: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


class InnerMaximizer(ABC):
    """Base class: ``maximizer(model, inputs, labels, index) -> Perturbation``.

    ``model`` is the bare classifier (not the LightningModule). The maximizer must leave the model's modes and
    parameter flags as it found them (use :func:`advtrain.engine.attack_context`).

    A maximizer that computes the weight gradients itself (YOPO) sets ``manual_optimization = True`` and implements
    ``training_step(model, inputs, labels, backward)``; the module then runs in manual optimisation.
    """

    manual_optimization: bool = False

    @abstractmethod
    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        """Computes the training perturbation for a batch."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Standard(InnerMaximizer):
    """No inner maximisation: standard (clean) training."""

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        return Perturbation(adv=None)
