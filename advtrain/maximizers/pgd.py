"""PGD inner maximizer (Madry et al., ICLR 2018)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from advtrain.engine.loop import gradient_ascent
from advtrain.engine.losses import cross_entropy
from advtrain.engine.modes import AttackMode, attack_context
from advtrain.engine.tracking import autocast_dtype
from advtrain.maximizers.base import InnerMaximizer, Perturbation, batch_budget, checked_budget
from advtrain.threat.geometry import geometry_for


class PGD(InnerMaximizer):
    """Madry et al.'s PGD adversarial training maximizer.

    Start at x + U(−ε, ε) (L2: a random direction scaled to U(0, 1)·ε), take ``steps`` steps of
    ``step_size``·sign ∇CE (L2: the normalised gradient), project onto the ball and the [0, 1] box after each,
    and train on the **last iterate** of every sample (no best-loss selection, no early stopping), as the paper
    and its official code do.

    The attack runs with the model in eval mode by default (BatchNorm running statistics, no dropout), as most
    later work does; ``attack_mode="train"`` reproduces the official code, which attacks in train mode (and so
    moves BatchNorm statistics with adversarial batches). The model's modes are restored afterwards.

    Budget schedule: ``eps`` and ``step_size`` scale together (α/ε constant, so the same number of steps crosses
    the same fraction of the ball); with ``step_size=None`` α = 2.5·ε/steps follows ε by itself.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: budget (CIFAR L∞ 8/255, L2 128/255; MNIST L∞ 0.3).
        steps: PGD steps (CIFAR 7 in the paper, 10 in the official config; MNIST 40).
        step_size: α (CIFAR L∞ 2/255, L2 15/255; MNIST 0.01); ``None`` gives 2.5·ε/steps.
        random_start: start from a random point of the ball.
        attack_mode: ``"eval"`` or ``"train"``.
        autocast: run the model in ``"bf16"`` or ``"fp16"`` autocast during the attack (perturbation in float32).
        compile: use the ``torch.compile``-d fused step.
    """

    budget_keys = ("eps", "step_size")

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = 2 / 255,
        random_start: bool = True,
        attack_mode: Literal["eval", "train"] = "eval",
        autocast: Literal["bf16", "fp16"] | None = None,
        compile: bool = False,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if eps < 0 or (step_size is not None and step_size <= 0):
            raise ValueError(f"eps must be >= 0 and step_size > 0, got eps={eps}, step_size={step_size}.")
        self._geometry = geometry_for(norm)
        self.norm = self._geometry.norm.value
        self.eps = checked_budget(eps)
        self.steps = int(steps)
        self.step_size = step_size
        self.random_start = bool(random_start)
        self.attack_mode = AttackMode.parse(attack_mode).value
        self.autocast = autocast
        self._autocast = autocast_dtype(autocast)
        self.compile = bool(compile)

    def __call__(self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None) -> Perturbation:
        eps = batch_budget(self.eps, inputs)
        alpha = eps * (2.5 / self.steps) if self.step_size is None else eps.new_full(eps.shape, self.step_size)
        with attack_context(model, self.attack_mode):
            result = gradient_ascent(
                model,
                inputs,
                labels,
                geometry=self._geometry,
                eps=eps,
                step_size=alpha,
                steps=self.steps,
                loss_fn=cross_entropy,
                random_start=self.random_start,
                keep_best=False,
                early_stop=False,
                autocast=self._autocast,
                compile=self.compile,
                checks=False,  # the batch was validated before it reached the device (see InnerMaximizer)
            )
        return Perturbation(adv=result.adv, eps=eps)
