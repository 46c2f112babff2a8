"""N-FGSM (de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step Adversarial Training", NeurIPS
2022)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.engine.losses import cross_entropy
from advtrain.engine.modes import AttackMode, attack_context
from advtrain.maximizers.base import InnerMaximizer, Perturbation, batch_budget, checked_budget


class NFGSM(InnerMaximizer):
    """Noise-augmented FGSM: η ~ U(−k·ε, k·ε), δ = η + α·sign ∇_η CE(f(x + η), y), train on clip_[0,1](x + δ).

    What sets it apart from Fast AT (:class:`~advtrain.maximizers.FastFGSM`): a larger noise (k = 2 by default, so
    the start lies outside the ε-ball), a step α = ε, and **no projection back to the ε-ball**: the training
    perturbation reaches ‖δ‖∞ ≤ (k + 1)·ε (3ε by default), only the [0, 1] box clips it. The paper shows that the
    noise, not the projection, is what avoids catastrophic overfitting, and that clipping to the ball (which Fast AT
    does) reduces the effective perturbation and robustness at large ε. Cost: one forward-backward for the step plus
    the training pass, as Fast AT.

    Follows the official code (github.com/pdejorge/N-FGSM, ``train.py``): the noise is clipped so that x + η stays
    in the box before the gradient is taken, then x + δ is clipped to the box; the model stays in train mode for the
    step (BatchNorm batch statistics, running statistics move), so ``attack_mode="train"`` is the default here;
    the official ``--clip`` option (off by default) is ``clip``.

    Deviations: none from the algorithm. ε may differ per sample ((B,) budget); the official code draws the noise per
    channel in normalised units (ε/σ_c), which is the same distribution in pixel units, used here.

    Budget schedule: ``eps`` and ``step_size`` scale together (the official SVHN warm-up ramps both over 5 epochs);
    the noise is ``noise``·ε and follows ε. A clip radius follows ε as well (it is relative).

    Reference numbers (paper, CIFAR-10, PreActResNet-18, ε = 8/255, α = ε, k = 2, 30 epochs, cyclic lr to 0.2):
    ≈ 80% clean / ≈ 48% PGD-50-10, at FGSM's cost; it keeps ≈ the robustness of GradAlign at 3× less cost and does
    not collapse up to ε = 16/255.

    Args:
        norm: ``"linf"`` only (the paper's threat model; the uniform noise is an L∞ box).
        eps: budget ε.
        noise: k, the noise magnitude relative to ε (η ~ U(−kε, kε)); 0 gives FGSM from the clean point.
        step_size: α; ``None`` gives α = ε (the paper's choice).
        clip: if given, project δ onto the L∞ ball of radius ``clip``·ε after the step (the official ``--clip``; 1
            makes it Fast AT's projection); ``None`` (the paper): no projection.
        attack_mode: ``"train"`` (official code) or ``"eval"``.

    Example:
        >>> maximizer = NFGSM(eps=8 / 255)  # doctest: +SKIP
        >>> pert = maximizer(model, x, y)  # pert.adv - x reaches up to 3·ε in L∞
    """

    budget_keys = ("eps", "step_size")

    def __init__(
        self,
        *,
        norm: Literal["linf"] = "linf",
        eps: float = 8 / 255,
        noise: float = 2.0,
        step_size: float | None = None,
        clip: float | None = None,
        attack_mode: Literal["eval", "train"] = "train",
    ) -> None:
        if norm != "linf":
            raise ValueError(f"NFGSM: norm must be 'linf' (the paper's threat model), got {norm!r}.")
        if not noise >= 0:
            raise ValueError(f"NFGSM: noise (k, relative to eps) must be >= 0, got {noise}.")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"NFGSM: step_size must be > 0 or null (= eps), got {step_size}.")
        if clip is not None and not clip > 0:
            raise ValueError(f"NFGSM: clip must be > 0 (a radius relative to eps) or null (no projection), got {clip}.")
        self.norm = norm
        self.eps = checked_budget(eps)
        self.noise = float(noise)
        self.step_size = None if step_size is None else float(step_size)
        self.clip = None if clip is None else float(clip)
        self.attack_mode = AttackMode.parse(attack_mode).value

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        x = inputs.detach()  # validated by the caller (see InnerMaximizer)
        eps = batch_budget(self.eps, x)
        alpha = eps if self.step_size is None else torch.full_like(eps, self.step_size)
        shape = (-1,) + (1,) * (x.dim() - 1)
        radius = (self.noise * eps).view(shape)
        eta = (2 * torch.rand_like(x) - 1) * radius
        eta = (x + eta).clamp(0.0, 1.0) - x  # the official code clips the noisy point to the box first
        with attack_context(model, self.attack_mode):
            eta.requires_grad_(True)
            loss = cross_entropy(model(x + eta), labels).sum()
            (grad,) = torch.autograd.grad(loss, eta)
        delta = eta.detach() + alpha.view(shape) * grad.sign()
        if self.clip is not None:
            bound = (self.clip * eps).view(shape)
            delta = torch.maximum(torch.minimum(delta, bound), -bound)
        return Perturbation(adv=(x + delta).clamp(0.0, 1.0), eps=eps)
