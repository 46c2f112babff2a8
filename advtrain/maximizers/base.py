"""Inner maximizers produce the inputs (and, for some methods, labels or budgets) a training step learns from.

They differ from attacks: an attack must return verified adversarial examples for evaluation; a maximizer
returns whatever its method trains on (Madry's PGD uses the last iterate, not the best one), as cheaply as the
method allows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.threat.norms import checks_budget_arguments

A = TypeVar("A", bound=Attack)


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

    The batch comes validated (images in [0, 1], labels in range): :class:`~advtrain.training.AdversarialTraining`
    checks it on the host before it reaches the device. Maximizers therefore do not check it again — each check
    reads values back from the device, a host sync per step — and run their attack cores with ``checks=False``;
    call :func:`advtrain.engine.checks.check_inputs` and ``check_labels`` first when using one on an unchecked batch.

    A maximizer that computes the weight gradients itself (YOPO) sets ``manual_optimization = True`` and implements
    ``training_step(model, inputs, labels, backward)``; the module then runs in manual optimisation and takes one
    optimizer step after it. One that also takes the optimizer steps itself (Free AT: several per minibatch) sets
    ``steps_itself = True`` as well; its ``training_step(model, inputs, labels, backward, step)`` calls ``step(loss)``
    for each of its :attr:`steps_per_batch` optimizer steps.

    Budgets: ``budget_keys`` names the hyperparameters that are lengths in input space and scale together (the budget
    first, then the step sizes and radii measured against it; dotted for an inner attack's, e.g.
    ``"_attack.max_eps"``). :meth:`budget_scaled` multiplies them all by one factor for the duration of a step, which
    is how a budget schedule (:class:`advtrain.training.BudgetRamp`) ramps ε and keeps α/ε constant; at factor f the
    maximizer is the one built with every budget × f.
    """

    manual_optimization: bool = False
    steps_itself: bool = False
    budget_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        checks_budget_arguments(cls)  # eps: a number, >= 0, <= 1 for L∞, parsed once in the constructor

    @abstractmethod
    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        """Computes the training perturbation for a batch."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per training batch (``trainer.global_step`` grows by this much per batch)."""
        return 1

    @property
    def budget(self) -> float | None:
        """The current value of the first budget key (ε; MMA's d_max), or ``None`` for a maximizer without budgets."""
        return _get(self, self.budget_keys[0]) if self.budget_keys else None

    @contextmanager
    def budget_scaled(self, factor: float) -> Iterator[None]:
        """Multiplies every budget in ``budget_keys`` by ``factor`` inside the block and puts the original values back
        after it (the same objects, so they are restored bit for bit, also when the block raises). Host-side Python
        numbers only: no device work and no sync. ``None`` values (a step size derived from ε) stay ``None`` and follow
        ε by their own rule.

        Example:
            >>> pgd = PGD(eps=0.3, step_size=0.05)  # doctest: +SKIP
            >>> with pgd.budget_scaled(0.5):  # doctest: +SKIP
            ...     pert = pgd(model, x, y)  # PGD at eps 0.15, step_size 0.025
        """
        factor = float(factor)
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"a budget factor must be finite and > 0, got {factor}.")
        saved = [(key, _get(self, key)) for key in self.budget_keys]
        try:
            if factor != 1.0:
                for key, value in saved:
                    _set(self, key, _scaled(value, factor))
            yield
        finally:
            for key, value in saved:
                _set(self, key, value)


def _get(obj: object, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _set(obj: object, path: str, value: Any) -> None:
    *owners, name = path.split(".")
    for owner in owners:
        obj = getattr(obj, owner)
    setattr(obj, name, value)


def _scaled(value: Any, factor: float) -> Any:
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(float(v) * factor for v in value)
    return float(value) * factor


def checked_budget(eps: float, name: str = "eps") -> float:
    """A maximizer's budget as a float, validated once at construction (finite and >= 0), so that each call can build
    its per-sample tensor with :func:`batch_budget` without reading anything back from the device."""
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {eps}.")
    return eps


def trusted(attack: A) -> A:
    """``attack`` with its per-call input and label checks off (:attr:`advtrain.attacks.base.Attack.checks`): for the
    attacks a maximizer runs on the training batch, which was validated on the host before it reached the device."""
    attack.checks = False
    return attack


def batch_budget(eps: float, inputs: Tensor) -> Tensor:
    """The (B,) float32 budget tensor on the inputs' device: a fill kernel, not a copy from host memory, and no
    value checks (the float was checked by :func:`checked_budget`) — no host sync, unlike
    :func:`advtrain.threat.norms.as_eps_tensor`, which validates tensors of unknown origin."""
    return torch.full((inputs.shape[0],), eps, dtype=torch.float32, device=inputs.device)


class Standard(InnerMaximizer):
    """No inner maximisation: standard (clean) training."""

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        return Perturbation(adv=None)
