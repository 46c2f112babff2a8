"""Outer objectives: the loss a training step minimises, given the maximizer's :class:`Perturbation`.

Maximizer and objective are separate components so that they combine in YAML (e.g. PGD + mixed CE). Each objective
declares the :class:`~advtrain.maximizers.Perturbation` types it reads (``reads``) and each maximizer the type it
produces; the module refuses a pairing that does not fit when it is built (:mod:`advtrain.training.pairing`), so that
no objective silently ignores what its maximizer produced or silently trains without what it needs.
The model is in train mode when an objective runs.

Label smoothing: the cross-entropy objectives (:class:`AdversarialCE`, :class:`MixedCE`, the natural term of
:class:`TRADESLoss`) take ``label_smoothing`` s: the target is (1 − s)·one-hot + s/K, as in
``torch.nn.functional.cross_entropy`` (Szegedy et al. 2016; used for adversarial training by Rebuffi et al. 2021 and
the DM-Improves-AT code, ``--ls``, where it smooths the natural CE of TRADES and the CE of PGD-AT). The KL terms of
TRADES and MART compare two model distributions and have no labels to smooth; MART's boosted CE has a margin term
built on the hard label and takes no smoothing either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.maximizers.base import Perturbation
from advtrain.maximizers.bilateral import SoftLabelPerturbation
from advtrain.maximizers.mma import MarginPerturbation
from advtrain.maximizers.steps import StepOutput
from advtrain.maximizers.trades import kl_to_clean

#: The loss to minimise and the logits it was computed from (for training metrics): what an objective returns, the
#: same record a training step reports (:class:`~advtrain.maximizers.steps.StepOutput`: ``loss``, ``logits``,
#: ``adversarial``).
ObjectiveOutput = StepOutput


def checked_smoothing(label_smoothing: float) -> float:
    """``label_smoothing`` as a float in [0, 1), or a ValueError naming the argument."""
    value = float(label_smoothing)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
    return value


class Objective(ABC):
    """Base class: ``objective(model, inputs, labels, perturbation) -> ObjectiveOutput``.

    ``reads``: the :class:`~advtrain.maximizers.Perturbation` types the objective makes full use of; the module pairs
    it only with a maximizer whose ``produces`` is one of them (exactly: a subclass carries fields this objective would
    ignore). The default, the plain :class:`~advtrain.maximizers.Perturbation`, fits every maximizer that hands over
    only adversarial inputs (and their budgets).
    """

    reads: ClassVar[tuple[type[Perturbation], ...]] = (Perturbation,)

    @abstractmethod
    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        """Computes the training loss."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class AdversarialCE(Objective):
    """Cross-entropy on the perturbed inputs only (Madry et al.); on clean inputs when there is no perturbation.

    Args:
        label_smoothing: s in [0, 1) (module docstring); 0 is the plain cross-entropy.
    """

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = checked_smoothing(label_smoothing)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        train_inputs = inputs if pert.adv is None else pert.adv
        logits = model(train_inputs)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return ObjectiveOutput(loss, logits, adversarial=pert.adv is not None)


class MixedCE(Objective):
    """w · CE(clean) + (1 − w) · CE(perturbed) (Goodfellow et al. 2015 used w = 0.5).

    Args:
        clean_weight: w in [0, 1].
        label_smoothing: s in [0, 1) for both cross-entropies (module docstring).
    """

    def __init__(self, *, clean_weight: float = 0.5, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"clean_weight must lie in [0, 1], got {clean_weight}.")
        self.clean_weight = float(clean_weight)
        self.label_smoothing = checked_smoothing(label_smoothing)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        s = self.label_smoothing
        if pert.adv is None:
            logits = model(inputs)
            return ObjectiveOutput(F.cross_entropy(logits, labels, label_smoothing=s), logits, adversarial=False)
        clean_logits = model(inputs)
        adv_logits = model(pert.adv)
        clean = F.cross_entropy(clean_logits, labels, label_smoothing=s)
        adv = F.cross_entropy(adv_logits, labels, label_smoothing=s)
        loss = self.clean_weight * clean + (1 - self.clean_weight) * adv
        return ObjectiveOutput(loss, adv_logits, adversarial=True)


class SoftLabelCE(Objective):
    """Cross-entropy against the maximizer's soft labels (:class:`~advtrain.maximizers.SoftLabelPerturbation`) on the
    perturbed inputs only (bilateral adversarial training); hard labels when the maximizer gives none (a plain
    :class:`~advtrain.maximizers.Perturbation`)."""

    reads = (SoftLabelPerturbation, Perturbation)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        train_inputs = inputs if pert.adv is None else pert.adv
        logits = model(train_inputs)
        if isinstance(pert, SoftLabelPerturbation):
            loss = -(pert.soft_labels * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
        else:
            loss = F.cross_entropy(logits, labels)
        return ObjectiveOutput(loss, logits, adversarial=pert.adv is not None)


class TRADESLoss(Objective):
    """CE(f(x), y) + β · KL(f(x) ‖ f(x')) averaged over the batch (Zhang et al. 2019; β = 6 in the paper's CIFAR
    setting, 1/λ in its notation). Both forwards run in train mode; the KL gradient flows through both terms, as in
    the reference code.

    Args:
        beta: weight of the robustness (KL) term.
        label_smoothing: s in [0, 1) for the natural cross-entropy (the DM-Improves-AT code's ``--ls``); the KL term
            is between two model distributions and is not smoothed.
    """

    def __init__(self, *, beta: float = 6.0, label_smoothing: float = 0.0) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}.")
        self.beta = float(beta)
        self.label_smoothing = checked_smoothing(label_smoothing)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        clean_logits = model(inputs)
        natural = F.cross_entropy(clean_logits, labels, label_smoothing=self.label_smoothing)
        if pert.adv is None:
            return ObjectiveOutput(natural, clean_logits, adversarial=False)
        adv_logits = model(pert.adv)
        robust = kl_to_clean(F.softmax(clean_logits.float(), dim=1), adv_logits).mean()
        return ObjectiveOutput(natural + self.beta * robust, adv_logits, adversarial=True)


class MMALoss(Objective):
    """MMA's loss mix (seed 003 Alg. 2): 1/3·CE on every clean example plus 2/3·[CE(x + δ*) over the
    correct examples with ε* < d_max and CE(x) over the misclassified ones], summed and divided by the batch size.
    Misclassified examples thus weigh 1 on their clean loss, correct ones 1/3 clean + 2/3 adversarial, and correct
    ones already beyond d_max only 1/3 clean. Needs :class:`~advtrain.maximizers.MMA`'s masks
    (:class:`~advtrain.maximizers.MarginPerturbation`): the module refuses any other maximizer, and a call with another
    perturbation raises a TypeError (it never falls back to clean training)."""

    reads = (MarginPerturbation,)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        if not isinstance(pert, MarginPerturbation):
            raise TypeError(
                f"MMALoss needs MMA's MarginPerturbation (its correct/use_adv masks), got {type(pert).__name__}: "
                "pair it with advtrain.maximizers.MMA."
            )
        clean_logits = model(inputs)
        clean_ce = F.cross_entropy(clean_logits, labels, reduction="none")
        use_adv, correct = pert.use_adv, pert.correct
        margin_term = clean_ce.masked_fill(correct, 0.0).sum()
        # The adversarial term runs the model on the chosen examples only (in train mode, so BatchNorm sees their
        # statistics): a data-dependent shape, one host sync for the positions, then gathers.
        chosen = use_adv.nonzero().squeeze(1)
        if chosen.numel() > 0:
            margin_term = margin_term + F.cross_entropy(model(pert.adv[chosen]), labels[chosen], reduction="sum")
        loss = clean_ce.mean() / 3 + 2 / 3 * margin_term / inputs.shape[0]
        return ObjectiveOutput(loss, clean_logits, adversarial=False)


class MARTLoss(Objective):
    """MART, misclassification-aware adversarial training (Wang et al., "Improving Adversarial Robustness Requires
    Revisiting Misclassified Examples", ICLR 2020; official code YisenWang/MART, ``mart.py``).

    With p' = softmax(f(x')) on the adversarial input and p = softmax(f(x)) on the clean one (both forwards in train
    mode, gradients through both):

        L = BCE(p', y) + β · 1/B · Σ_i KL(p_i ‖ p'_i) · (1 − p_i[y_i])
        BCE(p', y) = −log p'[y] − log(1 − max_{k≠y} p'[k])

    The boosted cross-entropy adds a margin term that pushes down the most likely wrong class on the adversarial
    input; the KL term is weighted by the clean misclassification-awareness 1 − p[y], so that examples the model
    gets wrong (or barely right) weigh more. β = 6 in the paper and the official code (ResNet-18 and WRN-34-10).
    Pair with :class:`~advtrain.maximizers.PGD` (cross-entropy PGD, as the official code; ``recipes/mart_cifar.yaml``).

    Official-code details followed: the most likely wrong class is read from the adversarial probabilities (the top
    two: the top one, or the runner-up when the top one is the label; ``topk`` here, ``argsort`` there, which may
    break an exact tie between two probabilities the other way); the margin term is
    −log(1.0001 − p'[k] + 1e-12) and the KL uses log(p' + 1e-12) (numerical guards: a saturated p'[k] = 1 gives
    log(1e-4) instead of −∞); the weight is 1.0000001 − p[y]; the KL is summed over classes and divided by the batch
    size. Computed in float32 even under autocast (the guards are below bf16's resolution).

    Args:
        beta: weight of the misclassification-aware KL term (λ in the paper's Eq. 9).
    """

    def __init__(self, *, beta: float = 6.0) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}.")
        self.beta = float(beta)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        clean_logits = model(inputs)
        if pert.adv is None:
            return ObjectiveOutput(F.cross_entropy(clean_logits, labels), clean_logits, adversarial=False)
        adv_logits = model(pert.adv)
        loss = mart_loss(clean_logits, adv_logits, labels, self.beta)
        return ObjectiveOutput(loss, adv_logits, adversarial=True)


def mart_loss(clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """MART's loss from the clean and adversarial logits (see :class:`MARTLoss`)."""
    adv_probs = F.softmax(adv_logits.float(), dim=1)
    top2 = adv_probs.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
    boosted = F.cross_entropy(adv_logits.float(), labels) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    clean_probs = F.softmax(clean_logits.float(), dim=1)
    true_probs = clean_probs.gather(1, labels[:, None]).squeeze(1)
    kl = (clean_probs * (torch.log(clean_probs.clamp_min(1e-30)) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    return boosted + beta * (kl * (1.0000001 - true_probs)).mean()
