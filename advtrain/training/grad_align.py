"""GradAlign (Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial Training", NeurIPS 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.maximizers.base import Perturbation, checked_budget
from advtrain.training.objectives import AdversarialCE, Objective, ObjectiveOutput


def input_gradient(model: nn.Module, inputs: Tensor, labels: Tensor, *, create_graph: bool) -> Tensor:
    """∇ₓ of the summed cross-entropy at ``inputs``, per sample (summing makes each row the sample's own gradient;
    the official code differentiates the batch mean, 1/B times this, which no cosine sees). ``create_graph`` keeps
    the graph for double backpropagation to the weights."""
    x = inputs.detach().requires_grad_(True)
    logits = model(x)
    # At least float32 (half-precision logits under autocast), float64 kept.
    loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad


def gradient_alignment(grad1: Tensor, grad2: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample cosine between two input gradients, and the mask of samples where both are non-zero (the official
    code drops the others from the mean: a zero gradient has no direction). Differentiable (no NaN at zero norms)."""
    g1, g2 = grad1.flatten(1), grad2.flatten(1)
    sq1, sq2 = g1.pow(2).sum(1), g2.pow(2).sum(1)
    valid = (sq1 > 0) & (sq2 > 0)
    # clamp_min keeps the square roots' gradients finite at zero; those samples are masked out below.
    cos = (g1 * g2).sum(1) / (sq1.clamp_min(1e-30).sqrt() * sq2.clamp_min(1e-30).sqrt())
    return torch.where(valid, cos, torch.zeros_like(cos)), valid


class GradAlignLoss(Objective):
    """A base objective plus GradAlign's gradient-alignment regulariser:

        λ · (1 − mean_i cos(∇ₓℓ(xᵢ, yᵢ), ∇ₓℓ(xᵢ + ηᵢ, yᵢ))),  ηᵢ ~ U(−εᵢ, εᵢ)^d,

    ℓ the cross-entropy, the mean over the samples whose two gradients are both non-zero. Minimising it keeps the loss
    locally linear inside the ε-ball, the condition under which one FGSM step solves the inner problem; without it,
    FGSM training at large ε collapses (catastrophic overfitting). The gradient at x + η is taken with
    ``create_graph=True`` (double backpropagation), so the weights receive the regulariser's gradient through it.

    Pair it with a single-step maximizer: the paper's method is FGSM from the clean point with α = ε
    (``advtrain.maximizers.PGD`` with ``steps: 1``, ``random_start: false``, ``step_size: ε``,
    ``attack_mode: train``); it also combines with Fast AT (FGSM-RS), N-FGSM or any other maximizer, and wraps any
    base objective (``base``, default :class:`~advtrain.training.AdversarialCE`).

    Follows the official code (github.com/tml-epfl/understanding-fast-adv-training, ``train.py``): η₁ = 0 (the clean
    point) with its gradient detached (the official FGSM branch detaches it; its README notes that back-propagating
    through one of the two gradients suffices), η₂ uniform in the ε-ball with the graph kept, samples with a zero
    gradient dropped from the mean, the forward passes in train mode (the objective runs in train mode: BatchNorm
    uses batch statistics and its running statistics move, as in the official code). λ = 0.2 at ε = 8/255 on CIFAR-10
    (the official script interpolates log-linearly, λ = 0.02·10^(ε·255/8): 0.063 at 4/255, 2.0 at 16/255).

    Deviations, with reasons:
        - The gradient at the clean point costs one more forward-backward here: the official code reuses the FGSM
          step's gradient (the same point when FGSM starts at 0), which a maximizer does not hand to an objective.
          Cost per batch: FGSM step + clean gradient + double-backprop gradient (≈ 3 passes) + training pass.
        - x + η₂ is clipped to the [0, 1] box (a valid image); the official code does not clip it.
        - When no sample has two non-zero gradients the regulariser is the constant λ (no gradient); the official
          mean over an empty set is NaN.

    ε: ``eps`` if given, else the maximizer's per-sample budget (``Perturbation.eps``, which a budget schedule
    ramps), else an error.

    Args:
        weight: λ, the regulariser's weight (≥ 0).
        eps: radius of the uniform η₂ (L∞); ``None``: the maximizer's ε.
        base: the objective the regulariser is added to (default: cross-entropy on the perturbed inputs).

    Example (YAML)::

        model:
          maximizer: {class_path: advtrain.maximizers.PGD,
                      init_args: {eps: 0.0313725, steps: 1, step_size: 0.0313725, random_start: false,
                                  attack_mode: train}}
          objective: {class_path: advtrain.training.GradAlignLoss, init_args: {weight: 0.2}}
    """

    def __init__(self, *, weight: float = 0.2, eps: float | None = None, base: Objective | None = None) -> None:
        if not weight >= 0:
            raise ValueError(f"GradAlignLoss: weight (λ) must be >= 0, got {weight}.")
        self.weight = float(weight)
        self.eps = None if eps is None else checked_budget(eps)
        self.base = base if base is not None else AdversarialCE()

    @property
    def reads(self) -> tuple[type[Perturbation], ...]:  # type: ignore[override]
        """The perturbation types of the base objective: the regulariser reads only the budgets (``eps``), which every
        perturbation carries."""
        return self.base.reads

    def regularizer(self, model: nn.Module, inputs: Tensor, labels: Tensor, eps: Tensor) -> Tensor:
        """λ·(1 − mean cos): the GradAlign term alone, for a (B,) budget ``eps``. Draws η₂ with one
        ``torch.rand_like(inputs)`` from the global generator."""
        x = inputs.detach()
        shape = (-1,) + (1,) * (x.dim() - 1)
        eta = (2 * torch.rand_like(x) - 1) * eps.to(x.dtype).view(shape)
        grad1 = input_gradient(model, x, labels, create_graph=False)
        grad2 = input_gradient(model, (x + eta).clamp(0.0, 1.0), labels, create_graph=True)
        cos, valid = gradient_alignment(grad1, grad2)
        mean_cos = cos.sum() / valid.sum().clamp_min(1).to(cos.dtype)
        return self.weight * (1.0 - mean_cos)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, pert: Perturbation) -> ObjectiveOutput:
        out = self.base(model, inputs, labels, pert)
        if self.weight == 0:
            return out
        if self.eps is not None:
            eps = torch.full((inputs.shape[0],), self.eps, dtype=inputs.dtype, device=inputs.device)
        elif pert.eps is not None:
            eps = pert.eps
        else:
            raise ValueError(
                "GradAlignLoss: no ε for the random point: set objective eps, or use a maximizer that reports its "
                "budget (PGD, FastFGSM, NFGSM, TRADES)."
            )
        reg = self.regularizer(model, inputs, labels, eps)
        return ObjectiveOutput(out.loss + reg, out.logits, out.adversarial)
