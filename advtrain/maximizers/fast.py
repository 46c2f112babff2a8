"""FGSM with random initialisation, the "Fast AT" maximizer (Wong, Rice & Kolter, ICLR 2020)."""

from __future__ import annotations

from typing import Literal

from advtrain.maximizers.pgd import PGD


class FastFGSM(PGD):
    """One FGSM step from a uniform random start: δ ~ U(−ε, ε), δ ← Π_{ball ∩ box}(δ + α·sign ∇CE).

    Wong et al. ("Fast is better than free", ICLR 2020) train PreActResNet-18 on CIFAR-10 with ε = 8/255,
    α = 10/255 (1.25·ε), a cyclic learning rate to 0.2 over 15 epochs and mixed precision: ≈ 86% clean / 46% PGD-50
    (RobustBench 83.34% / 43.21% AutoAttack). α above ~1.25·ε leads to catastrophic overfitting (robust accuracy
    collapses to 0 within an epoch); watch ``val/robust_acc``.

    The reference code generates δ with the model in train mode (BatchNorm batch statistics); that is the default
    here, unlike :class:`~advtrain.maximizers.PGD`. Set ``attack_mode="eval"`` for the eval-mode variant.

    Budget schedule: ``eps`` and α (``step_size``) scale together, so α/ε stays 1.25 (or the recipe's ratio), the
    ratio that decides catastrophic overfitting.

    Args:
        norm: ``"linf"`` (the paper) or ``"l2"``.
        eps: budget.
        step_size: α; ``None`` gives 1.25·ε.
        attack_mode: ``"train"`` (reference) or ``"eval"``.
        autocast: ``"bf16"``/``"fp16"`` autocast for the model during the step.
        compile: use the compiled fused step.
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        step_size: float | None = None,
        attack_mode: Literal["eval", "train"] = "train",
        autocast: Literal["bf16", "fp16"] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__(
            norm=norm, eps=eps, steps=1, step_size=1.25 * eps if step_size is None else step_size,
            random_start=True, attack_mode=attack_mode, autocast=autocast, compile=compile,
        )  # fmt: skip
