"""Inner maximizers produce the inputs (and, for some methods, labels or budgets) a training step learns from.

They differ from attacks: an attack must return verified adversarial examples for evaluation; a maximizer
returns whatever its method trains on (Madry's PGD uses the last iterate, not the best one), as cheaply as the
method allows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.errors import InvalidConfigError
from advtrain.maximizers.steps import StepHost, StepOutput, TrainingStep
from advtrain.threat.norms import checks_budget_arguments

A = TypeVar("A", bound=Attack)


@dataclass
class Perturbation:
    """What a maximizer hands to the outer objective.

    A method that hands the objective more than the inputs subclasses it with typed fields (soft labels:
    :class:`~advtrain.maximizers.bilateral.SoftLabelPerturbation`; MMA's masks:
    :class:`~advtrain.maximizers.mma.MarginPerturbation`): the maximizer declares the type it returns
    (:attr:`InnerMaximizer.produces`), each objective the types it reads (``Objective.reads``), and the module refuses,
    when it is built, an objective that needs fields the maximizer does not produce or would ignore fields that it
    does (:func:`advtrain.training.pairing.check_pairing`).

    Attributes:
        adv: the perturbed training inputs in [0, 1], or ``None`` to train on the clean inputs.
        eps: optional (B,) per-sample budgets the maximizer used (information: an objective may ignore it).
    """

    adv: Tensor | None
    eps: Tensor | None = None


class AdversarialStep(TrainingStep):
    """The generic training step (the default :attr:`InnerMaximizer.step_strategy`): ``maximizer(model, x, y, index)``
    gives a :class:`Perturbation`, the module's weight perturbation (if any) is applied on the objective's loss, and
    the objective's loss goes to Lightning's automatic optimisation (its backward pass and one optimizer step)."""

    def check(self, maximizer: InnerMaximizer) -> None:
        if type(maximizer).__call__ is InnerMaximizer.__call__:
            raise InvalidConfigError(
                f"model.maximizer: {type(maximizer).__name__} declares the step {type(self).__name__}, which calls "
                "maximizer(model, inputs, labels, index), but defines no __call__: define it, or declare the step "
                "strategy it needs (step_strategy)."
            )
        if maximizer.produces is None:
            raise InvalidConfigError(
                f"model.maximizer: {type(maximizer).__name__} declares produces=None (no perturbation) but the step "
                f"{type(self).__name__}, which hands its perturbation to the objective: declare the type it returns."
            )

    def __call__(self, host: StepHost, inputs: Tensor, labels: Tensor, index: Tensor | None) -> StepOutput:
        pert = host.maximizer(host.model, inputs, labels, index)
        host.perturb_weights(lambda: host.objective(host.model, inputs, labels, pert).loss)
        out = host.objective(host.model, inputs, labels, pert)
        host.record_loss(out.loss)
        return out


class InnerMaximizer:
    """Base class: ``maximizer(model, inputs, labels, index) -> Perturbation``.

    ``model`` is the bare classifier (not the LightningModule). The maximizer must leave the model's modes and
    parameter flags as it found them (use :func:`advtrain.engine.attack_context`).

    The batch comes validated (images in [0, 1], labels in range): :class:`~advtrain.training.AdversarialTraining`
    checks it on the host before it reaches the device. Maximizers therefore do not check it again — each check
    reads values back from the device, a host sync per step — and run their attack cores with ``checks=False``;
    call :func:`advtrain.engine.checks.check_inputs` and ``check_labels`` first when using one on an unchecked batch.

    What a maximizer declares (class attributes; the module reads them and names no maximizer):

    - ``step_strategy``: the :class:`~advtrain.maximizers.steps.TrainingStep` the module delegates each training step
      to. :class:`AdversarialStep` (default) calls ``__call__`` and minimises the objective under Lightning's automatic
      optimisation. A maximizer that is a whole training step declares its own strategy instead (YOPO's
      :class:`~advtrain.maximizers.yopo.YOPOStep` accumulates the weight gradients itself; Free AT's
      :class:`~advtrain.maximizers.free.FreeATStep` takes several optimizer steps per batch), implements what that
      strategy calls, and has no ``__call__``.
    - ``produces``: the :class:`Perturbation` type ``__call__`` returns; the module checks it against the objective's
      ``reads``. ``None`` for a maximizer that hands no perturbation to an objective (a whole training step with its
      own loss: the module then accepts only the default objective).
    - ``budget_keys``: the hyperparameters that are lengths in input space and scale together (the budget first, then
      the step sizes and radii measured against it; dotted for an inner attack's, e.g. ``"_attack.max_eps"``).
      :meth:`budget_scaled` multiplies them all by one factor for the duration of a step, which is how a budget
      schedule (:class:`advtrain.training.BudgetRamp`) ramps ε and keeps α/ε constant; at factor f the maximizer is
      the one built with every budget × f.
    - :attr:`steps_per_batch` (a property): optimizer steps per batch, when the strategy takes more than one.

    A new maximizer is one file (the class, and its strategy or perturbation type when it needs new ones) plus a
    config fragment under ``configs/maximizer/``.
    """

    step_strategy: ClassVar[type[TrainingStep]] = AdversarialStep
    produces: ClassVar[type[Perturbation] | None] = Perturbation
    budget_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        checks_budget_arguments(cls)  # eps: a number, >= 0, <= 1 for L∞, parsed once in the constructor

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        """Computes the training perturbation for a batch (what :class:`AdversarialStep` calls). A maximizer driven by
        another strategy does not define it."""
        strategy = self.step_strategy
        mode = "automatic" if strategy.automatic_optimization else "manual"
        raise NotImplementedError(
            f"{type(self).__name__} produces no perturbation: it is a whole training step ({strategy.__name__}, "
            f"{mode} optimisation). Use it through AdversarialTraining."
        )

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
