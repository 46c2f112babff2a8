"""Outer objectives: the loss a training step minimises, given the maximizer's :class:`Perturbation`.

Maximizer and objective are separate components so that they combine in YAML (e.g. PGD + mixed CE).
The model is in train mode when an objective runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.maximizers.base import Perturbation
from advtrain.maximizers.trades import kl_to_clean


@dataclass
class ObjectiveOutput:
    """The loss to minimise and the logits it was computed from (for training metrics).

    Attributes:
        loss: scalar loss.
        logits: logits on the training inputs (adversarial when there are any, else clean).
        adversarial: whether ``logits`` are on perturbed inputs.
    """

    loss: Tensor
    logits: Tensor
    adversarial: bool


class Objective(ABC):
    """Base class: ``objective(model, inputs, labels, perturbation) -> ObjectiveOutput``."""

    @abstractmethod
    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        """Computes the training loss."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class AdversarialCE(Objective):
    """Cross-entropy on the perturbed inputs only (Madry et al.); on clean inputs when there is no perturbation."""

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        train_inputs = inputs if pert.adv is None else pert.adv
        logits = model(train_inputs)
        return ObjectiveOutput(F.cross_entropy(logits, labels), logits, adversarial=pert.adv is not None)


class MixedCE(Objective):
    """w · CE(clean) + (1 − w) · CE(perturbed) (Goodfellow et al. 2015 used w = 0.5).

    Args:
        clean_weight: w in [0, 1].
    """

    def __init__(self, *, clean_weight: float = 0.5) -> None:
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean_weight must lie in [0, 1], got {clean_weight}.")
        self.clean_weight = float(clean_weight)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        if pert.adv is None:
            logits = model(inputs)
            return ObjectiveOutput(F.cross_entropy(logits, labels), logits, adversarial=False)
        clean_logits = model(inputs)
        adv_logits = model(pert.adv)
        loss = self.clean_weight * F.cross_entropy(clean_logits, labels) + (1 - self.clean_weight) * F.cross_entropy(
            adv_logits, labels
        )
        return ObjectiveOutput(loss, adv_logits, adversarial=True)


class SoftLabelCE(Objective):
    """Cross-entropy against the maximizer's soft labels on the perturbed inputs only (bilateral adversarial
    training); hard labels when the maximizer gives none."""

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        train_inputs = inputs if pert.adv is None else pert.adv
        logits = model(train_inputs)
        if pert.soft_labels is None:
            loss = F.cross_entropy(logits, labels)
        else:
            loss = -(pert.soft_labels * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        return ObjectiveOutput(loss, logits, adversarial=pert.adv is not None)


class TRADESLoss(Objective):
    """CE(f(x), y) + β · KL(f(x) ‖ f(x')) averaged over the batch (Zhang et al. 2019; β = 6 in the paper's CIFAR
    setting, 1/λ in its notation). Both forwards run in train mode; the KL gradient flows through both terms, as in
    the reference code.

    Args:
        beta: weight of the robustness (KL) term.
    """

    def __init__(self, *, beta: float = 6.0) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}.")
        self.beta = float(beta)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        clean_logits = model(inputs)
        natural = F.cross_entropy(clean_logits, labels)
        if pert.adv is None:
            return ObjectiveOutput(natural, clean_logits, adversarial=False)
        adv_logits = model(pert.adv)
        robust = kl_to_clean(F.softmax(clean_logits.float(), dim=1), adv_logits).mean()
        return ObjectiveOutput(natural + self.beta * robust, adv_logits, adversarial=True)


class MMALoss(Objective):
    """MMA's loss mix (seed 003 Alg. 2): 1/3·CE on every clean example plus 2/3·[CE(x + δ*) over the
    correct examples with ε* < d_max and CE(x) over the misclassified ones], summed and divided by the batch size.
    Misclassified examples thus weigh 1 on their clean loss, correct ones 1/3 clean + 2/3 adversarial, and correct
    ones already beyond d_max only 1/3 clean. Needs :class:`~advtrain.maximizers.MMA`'s masks."""

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        clean_logits = model(inputs)
        clean_ce = F.cross_entropy(clean_logits, labels, reduction="none")
        if pert.adv is None or "use_adv" not in pert.extra:
            return ObjectiveOutput(clean_ce.mean(), clean_logits, adversarial=False)
        use_adv, correct = pert.extra["use_adv"], pert.extra["correct"]
        margin_term = clean_ce.masked_fill(correct, 0.0).sum()
        # The adversarial term runs the model on the chosen examples only (in train mode, so BatchNorm sees their
        # statistics): a data-dependent shape, one host sync for the positions, then gathers.
        chosen = use_adv.nonzero().squeeze(1)
        if chosen.numel() > 0:
            margin_term = margin_term + F.cross_entropy(model(pert.adv[chosen]), labels[chosen], reduction="sum")
        loss = clean_ce.mean() / 3 + 2 / 3 * margin_term / inputs.shape[0]
        return ObjectiveOutput(loss, clean_logits, adversarial=False)
