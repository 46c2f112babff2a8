"""Bilateral adversarial training (Wang & Zhang, "Bilateral Adversarial Training: Towards Fast Training of More
Robust Models Against Adversarial Attacks", ICCV 2019; seed 003): perturb the image with a
one-step targeted attack toward the most confusing class, and the label with an adversarial or smoothed label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.engine.loop import gradient_ascent
from advtrain.engine.losses import cross_entropy
from advtrain.engine.modes import AttackMode, attack_context
from advtrain.maximizers.base import InnerMaximizer, Perturbation, batch_budget, checked_budget
from advtrain.threat.geometry import geometry_for


@dataclass(kw_only=True)
class SoftLabelPerturbation(Perturbation):
    """A perturbation with the target distributions to train on (label-side methods: :class:`Bilateral`); read by
    :class:`~advtrain.training.objectives.SoftLabelCE`.

    Attributes:
        soft_labels: (B, K) target distributions (each row sums to 1).
    """

    soft_labels: Tensor


def adversarial_labels(probs: Tensor, labels: Tensor, *, beta: float = 9.0, gamma: float = 0.01) -> Tensor:
    """R-MC-LA adversarial labels.

    With L_k = −log(p_k + 1e-8) for k ≠ y, m = min L_k, M = max L_k, D = Σ_{k≠y}(L_k − m + γ) and
    δ = 1 / (1 + β(M − m + γ)/D): ỹ_k = δ(L_k − m + γ)/D for k ≠ y and ỹ_y = 1 − δ. Off-class mass grows with L_k
    (it goes to the least likely classes, the direction that raises the CE), and the true class keeps β times the
    largest off-class mass.

    Args:
        probs: (B, K) clean probabilities.
        labels: (B,) true classes.
        beta: ratio of the true-class mass to the largest off-class mass.
        gamma: offset keeping every off-class mass positive.

    Returns:
        (B, K) label distributions.
    """
    true = F.one_hot(labels, probs.shape[1]).bool()
    losses = -torch.log(probs.float() + 1e-8)
    off = losses.masked_fill(true, float("inf"))
    m = off.amin(dim=1, keepdim=True)
    big = losses.masked_fill(true, float("-inf")).amax(dim=1, keepdim=True)
    shifted = (losses - m + gamma).masked_fill(true, 0.0)
    d = shifted.sum(dim=1, keepdim=True)
    delta = 1.0 / (1.0 + beta * (big - m + gamma) / d)
    return torch.where(true, 1.0 - delta, delta * shifted / d)


def smoothed_labels(labels: Tensor, num_classes: int, *, smoothing: float = 0.5) -> Tensor:
    """R-MC-LS: uniform label smoothing with budget ε_y: 1 − ε_y on the true class, ε_y/(K − 1) elsewhere."""
    out = torch.full((labels.shape[0], num_classes), smoothing / (num_classes - 1), device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing)


class Bilateral(InnerMaximizer):
    """Bilateral adversarial training's maximizer: adversarial image and adversarial (or smoothed) label.

    Image side: t = argmax_{k≠y} f(x)_k (the most confusing class); x0 = x + U(−ε, ε); one targeted step
    x1 = x0 − α·sign ∇CE(f(x0), t) with α = ε, clipped to the ball and the box. Label side: R-MC-LA
    (:func:`adversarial_labels`, ``label="adversarial"``) or R-MC-LS (:func:`smoothed_labels`, ``label="smooth"``),
    from the clean probabilities. Pair with :class:`~advtrain.training.objectives.SoftLabelCE` (soft-label CE on the
    adversarial images only). The clean forward for t and p runs in the attack mode (eval by default), without
    gradient.

    Known: the reported 53–55% under PGD-100 on CIFAR-10 fall to 29% under AutoAttack (gradient masking); evaluate
    with APGD, not PGD alone.

    Budget schedule: ``eps`` and α scale together (α = ε by default follows ε by itself; an explicit ``step_size``
    is scaled); the label side has no input-space budget and is unchanged.

    Args:
        norm: ``"linf"`` (the paper) or ``"l2"``.
        eps: budget (CIFAR: 8/255).
        step_size: α; ``None`` gives ε (the paper).
        label: ``"adversarial"`` (R-MC-LA) or ``"smooth"`` (R-MC-LS).
        beta: R-MC-LA's true-to-largest-off-class mass ratio (9 on CIFAR-10).
        smoothing: R-MC-LS's budget ε_y (0.5 ≈ β = 9 on 10 classes).
        attack_mode: ``"eval"`` or ``"train"``.
    """

    produces = SoftLabelPerturbation
    budget_keys = ("eps", "step_size")

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        step_size: float | None = None,
        label: Literal["adversarial", "smooth"] = "adversarial",
        beta: float = 9.0,
        smoothing: float = 0.5,
        attack_mode: Literal["eval", "train"] = "eval",
    ) -> None:
        if label not in ("adversarial", "smooth"):
            raise ValueError(f"label must be 'adversarial' or 'smooth', got {label!r}.")
        self._geometry = geometry_for(norm)
        self.norm = self._geometry.norm.value
        self.eps = checked_budget(eps)
        self.step_size = step_size
        self.label = label
        self.beta = float(beta)
        self.smoothing = float(smoothing)
        self.attack_mode = AttackMode.parse(attack_mode).value

    def __call__(
        self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None
    ) -> SoftLabelPerturbation:
        eps = batch_budget(self.eps, inputs)
        alpha = eps.clone() if self.step_size is None else torch.full_like(eps, self.step_size)
        with attack_context(model, self.attack_mode):
            with torch.no_grad():
                logits = model(inputs).float()
            target = logits.scatter(1, labels[:, None], float("-inf")).argmax(dim=1)
            result = gradient_ascent(
                model, inputs, target, geometry=self._geometry, eps=eps, step_size=alpha, steps=1,
                loss_fn=cross_entropy, random_start=True, targeted=True, keep_best=False, early_stop=False,
                checks=False,  # validated batch (see InnerMaximizer); the targets are in range by construction
            )  # fmt: skip
        probs = F.softmax(logits, dim=1)
        if self.label == "adversarial":
            soft = adversarial_labels(probs, labels, beta=self.beta)
        else:
            soft = smoothed_labels(labels, logits.shape[1], smoothing=self.smoothing)
        return SoftLabelPerturbation(adv=result.adv, soft_labels=soft, eps=eps)
