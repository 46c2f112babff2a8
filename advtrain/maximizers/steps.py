"""Training-step strategies: how one training batch becomes weight updates.

:class:`~advtrain.training.AdversarialTraining` delegates every training step to the strategy its maximizer declares
(:attr:`InnerMaximizer.step_strategy <advtrain.maximizers.InnerMaximizer.step_strategy>`), so that the module knows no
maximizer by name:

- :class:`~advtrain.maximizers.base.AdversarialStep` (the default, beside :class:`~advtrain.maximizers.InnerMaximizer`):
  the maximizer's perturbation, then the outer objective's loss, then Lightning's automatic optimisation (one
  optimizer step per batch).
- :class:`ManualStep`: the base of the strategies of maximizers that are a whole training step and take the optimizer
  steps in manual optimisation (YOPO's :class:`~advtrain.maximizers.yopo.YOPOStep`, Free AT's
  :class:`~advtrain.maximizers.free.FreeATStep`, each beside its maximizer).

A strategy talks to the module through :class:`StepHost` (the model, the maximizer, the objective, the backward pass,
the optimizer and schedulers, the divergence record, the weight perturbation), and says what the module must set up
for it through class attributes (:attr:`TrainingStep.automatic_optimization`, :attr:`TrainingStep.partial_backward`).
The strategies live here, beside the maximizers, because a maximizer names its strategy: :mod:`advtrain.training`
imports the maximizers, never the reverse.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from advtrain.maximizers.base import InnerMaximizer, Perturbation


@dataclass
class StepOutput:
    """What a training step (and an outer objective) reports: the loss it minimised and the logits it was computed
    from, for the training metrics.

    Attributes:
        loss: scalar loss.
        logits: (B, K) logits on the batch's training inputs (adversarial when there are any, else clean), one row
            per sample of the batch, in its order (the module's training accuracy compares them with the labels).
        adversarial: whether ``logits`` are on perturbed inputs.
    """

    loss: Tensor
    logits: Tensor
    adversarial: bool


@dataclass
class ManualStepOutput:
    """What a maximizer that is a whole training step reports: the mean loss over its rounds and the (B, K) logits of
    the last round (on its perturbed inputs, one row per sample of the batch)."""

    loss: Tensor
    logits: Tensor


class StepHost(Protocol):
    """What the LightningModule offers a strategy (:class:`~advtrain.training.AdversarialTraining` implements it)."""

    model: nn.Module
    maximizer: InnerMaximizer
    objective: Callable[[nn.Module, Tensor, Tensor, Perturbation], StepOutput]

    def record_loss(self, loss: Tensor) -> None:
        """Records ``loss`` in the device-side divergence record (raises at once with ``divergence_check_every=1``
        when it is not finite): call it before the optimizer step that uses the loss."""

    def perturb_weights(self, loss: Callable[[], Tensor]) -> None:
        """Applies the module's weight perturbation (AWP) for this step, if any, using ``loss()`` for its ascent; the
        module removes it after the optimizer step."""

    def manual_backward(self, loss: Tensor) -> None:
        """Lightning's backward pass (precision plugins, DDP)."""

    def optimizers(self) -> Any:
        """Lightning's optimizer wrapper."""

    def lr_schedulers(self) -> Any:
        """The learning-rate scheduler, or ``None``."""


class TrainingStep(ABC):
    """A training-step strategy: ``strategy(host, inputs, labels, index) -> StepOutput``, called by the module with
    the maximizer's budgets scaled by the budget schedule's factor (:meth:`InnerMaximizer.budget_scaled`).

    Subclasses say what the module must set up for them:

    Attributes:
        automatic_optimization: Lightning takes the optimizer step after the returned loss's backward pass (``True``),
            or the strategy takes its own (``False``: manual optimisation; no weight perturbation then).
        partial_backward: some backward passes reach only part of the weights (DDP must then look for unused
            parameters: the module sets ``find_unused_parameters``).
    """

    automatic_optimization: ClassVar[bool] = True
    partial_backward: ClassVar[bool] = False

    def check(self, maximizer: InnerMaximizer) -> None:
        """Raises :class:`~advtrain.errors.InvalidConfigError` when ``maximizer`` lacks what this strategy calls
        (run when the module is built). Nothing to check by default."""
        return None

    @abstractmethod
    def __call__(self, host: StepHost, inputs: Tensor, labels: Tensor, index: Tensor | None) -> StepOutput:
        """One training step on a batch validated by the module (images in [0, 1], labels in range)."""

    def on_train_epoch_end(self, host: StepHost) -> None:
        """Called at the end of every training epoch (manual optimisation steps epoch-wise schedulers here). Nothing
        by default: Lightning steps the schedulers in automatic optimisation."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ManualStep(TrainingStep):
    """Base of the strategies that take the optimizer steps themselves (manual optimisation): the gradients are zeroed
    before :meth:`run`, and the learning-rate scheduler is stepped after it (``interval: step``) or at the epoch's end
    (``interval: epoch``), as Lightning does in automatic optimisation. The step's logits are on perturbed inputs."""

    automatic_optimization = False

    @abstractmethod
    def run(self, host: StepHost, optimizer: Any, inputs: Tensor, labels: Tensor) -> ManualStepOutput:
        """The optimizer steps of one batch (the gradients are zero on entry)."""

    def __call__(self, host: StepHost, inputs: Tensor, labels: Tensor, index: Tensor | None) -> StepOutput:
        optimizer = host.optimizers()
        optimizer.zero_grad()
        out = self.run(host, optimizer, inputs, labels)
        _step_scheduler(host, "step")
        return StepOutput(out.loss, out.logits, adversarial=True)

    def on_train_epoch_end(self, host: StepHost) -> None:
        _step_scheduler(host, "epoch")


def _step_scheduler(host: StepHost, interval: str) -> None:
    scheduler = host.lr_schedulers()
    if scheduler is not None and getattr(scheduler, "interval", "epoch") == interval:
        scheduler.step()
