"""The TRADES maximizer (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019): PGD on the KL divergence between clean and perturbed predictions."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.engine.loop import gradient_ascent
from advtrain.engine.modes import AttackMode, attack_context
from advtrain.maximizers.base import InnerMaximizer, Perturbation, batch_budget, checked_budget
from advtrain.threat.geometry import geometry_for


def kl_to_clean(clean_probs: Tensor, adv_logits: Tensor) -> Tensor:
    """Per-sample KL(p_clean ‖ softmax(adv_logits)), the TRADES robustness term."""
    log_q = F.log_softmax(adv_logits.float(), dim=1)
    return (clean_probs * (torch.log(clean_probs.clamp_min(1e-12)) - log_q)).sum(dim=1)


def _kl_loss(adv_logits: Tensor, clean_probs: Tensor) -> Tensor:
    """:func:`kl_to_clean` as an attack loss ``loss(logits, labels)``, the clean distribution in the labels' place."""
    return kl_to_clean(clean_probs, adv_logits)


class TRADES(InnerMaximizer):
    """x' = x + 0.001·N(0, I), then ``steps`` steps of ``step_size``·sign ∇_x' KL(f(x) ‖ f(x')), each projected onto
    the ε-ball and the [0, 1] box (the reference code's procedure). The clean distribution f(x) is computed once,
    without gradient. The attack runs in eval mode, as the reference code does; pair with
    :class:`~advtrain.training.objectives.TRADESLoss`.

    Budget schedule: ``eps`` and ``step_size`` scale together; the Gaussian start (``init_std``, 0.001) is a
    numerical nudge off the clean point, not a budget, and stays.

    Reference numbers (CIFAR-10, WRN-34-10, ε = 8/255, 10 steps of 2/255, β = 6): 84.92% clean, 53.08% AutoAttack
    (RobustBench Zhang2019Theoretically).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: budget.
        steps: ascent steps.
        step_size: α.
        init_std: std of the Gaussian start.
        attack_mode: ``"eval"`` (reference) or ``"train"``.
    """

    budget_keys = ("eps", "step_size")

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float = 2 / 255,
        init_std: float = 0.001,
        attack_mode: Literal["eval", "train"] = "eval",
    ) -> None:
        if steps < 1 or eps < 0 or step_size <= 0 or init_std < 0:
            raise ValueError("TRADES needs steps >= 1, eps >= 0, step_size > 0 and init_std >= 0.")
        self._geometry = geometry_for(norm)
        self.norm = self._geometry.norm.value
        self.eps = checked_budget(eps)
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.init_std = float(init_std)
        self.attack_mode = AttackMode.parse(attack_mode).value

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        x = inputs.detach()  # validated by the caller (see InnerMaximizer)
        eps = batch_budget(self.eps, x)
        alpha = torch.full_like(eps, self.step_size)
        with attack_context(model, self.attack_mode):
            with torch.no_grad():
                clean_probs = F.softmax(model(x).float(), dim=1)
            # The engine's ascent loop with the clean distribution in the labels' place: the last iterate of every
            # sample (no early stopping, no best-point tracking), from the Gaussian start; the batch was checked.
            result = gradient_ascent(model, x, clean_probs, geometry=self._geometry, eps=eps, step_size=alpha,
                                     steps=self.steps, loss_fn=_kl_loss, random_start=False,
                                     start=self.init_std * torch.randn_like(x), keep_best=False, early_stop=False,
                                     checks=False)  # fmt: skip
        return Perturbation(adv=result.adv, eps=eps)
