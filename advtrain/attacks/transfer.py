"""Transfer attack from a smoothed surrogate: APGD on a Gaussian-smoothed copy of the model, judged on the model.

Reference:
    Athalye, Carlini and Wagner, *Obfuscated Gradients Give a False Sense of Security*, ICML 2018 (Sec. 4.1: attack
    a differentiable approximation of the defended model, BPDA; Sec. 3.1: transfer attacks as a check).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.apgd import APGD
from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.result import AttackResult
from advtrain.threat.geometry import geometry_for

_PAPER = "Athalye, Carlini & Wagner, Obfuscated Gradients Give a False Sense of Security, ICML 2018"


class SmoothedModel(nn.Module):
    """f̄(x) = (1/k) Σᵢ f(x + σ·nᵢ) with k fixed noise draws nᵢ ~ N(0, I) shared by every sample of a call.

    Where a model masks its gradients (piecewise-constant layers, thresholded inputs, a saturated softmax), the
    gradient of f is zero or uninformative almost everywhere, but f̄ is smooth: its gradient is the model's output
    averaged over a neighbourhood, which points towards the decision boundary. The draws are fixed per call so that
    f̄ is a deterministic function (an attack's success test on it is repeatable), and shared across samples so that
    each sample is attacked as if alone.
    """

    def __init__(self, model: nn.Module, sigma: float, noise: Tensor) -> None:
        super().__init__()
        self.model, self.sigma = model, float(sigma)
        self.register_buffer("noise", noise, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        k = self.noise.shape[0]
        noisy = (x[None] + self.sigma * self.noise[:, None].to(x.dtype)).flatten(0, 1)
        return self.model(noisy).unflatten(0, (k, x.shape[0])).mean(0)


@register_attack(AttackSpec("transfer", AttackKind.BUDGETED, ("linf", "l2"), targeted=False, stochastic=True,
                            paper=_PAPER))  # fmt: skip
class Transfer(Attack):
    """APGD on a Gaussian-smoothed surrogate of the model (:class:`SmoothedModel`), its points judged on the model.

    The escalation of an adaptive evaluation (:mod:`advtrain.evaluation.escalation`) runs it when a gradient-masking
    check fires: a transfer attack from a differentiable surrogate is Athalye et al.'s remedy for masked gradients.
    The surrogate's noise (``samples`` draws of standard deviation ``sigma``) is drawn once per call from the seed.
    The APGD run ascends its loss on the surrogate
    and stops a sample once the surrogate is fooled; the returned points are then scored on the model itself (one
    forward pass): ``success`` is the model's verdict, so a surrogate success that does not transfer is a failure.

    Cost: APGD's passes times ``samples`` (every surrogate pass runs the model on ``samples`` noisy copies), plus one
    forward pass per sample for the final verdict.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: budget (a per-call ``eps`` overrides it).
        steps: APGD iterations on the surrogate.
        loss: ``"dlr"`` or ``"ce"``: the APGD loss.
        samples: k, noise draws of the surrogate.
        sigma: noise standard deviation per input coordinate; default ``None``: ε / (2‖1‖), i.e. half the
            per-coordinate size of a perturbation of norm ε spread evenly (ε/2 for L∞, ε/(2√d) for L2, d inputs).
        options: ``autocast``, ``compile``, ``mode``, ``seed``, shared by every attack (see :class:`Attack`); the
            inner APGD runs with them.
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        steps: int = 100,
        loss: Literal["ce", "dlr"] = "dlr",
        samples: int = 8,
        sigma: float | None = None,
        **options,
    ) -> None:
        super().__init__(**options)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}.")
        if sigma is not None and sigma < 0:
            raise ValueError(f"sigma must be None or >= 0, got {sigma}.")
        self.geometry = geometry_for(norm)
        self.norm = self.geometry.norm.value
        self.eps = float(eps)
        self.steps = int(steps)
        self.loss = loss
        self.samples = int(samples)
        self.sigma = None if sigma is None else float(sigma)
        self._inner = APGD(norm=norm, eps=eps, steps=steps, loss=loss, **options)

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        eps_t = self.budget(eps, inputs)
        sigma = self.sigma
        if sigma is None:  # the largest budget of the call sets the scale (one host read per call)
            top = float(eps_t.max()) if eps_t.numel() else self.eps
            sigma = top / (2 * float(self.geometry.measure(torch.ones_like(inputs[:1], dtype=torch.float32))))
        noise = torch.randn((self.samples, *inputs.shape[1:]), generator=generator, device=inputs.device)
        surrogate = SmoothedModel(model, sigma, noise)
        # The APGD runs on a core of the surrogate with this call's options (autocast, compile, active-set mode).
        found = self._inner.run_on(self.core(surrogate, inputs, labels), eps_t, generator)
        core = self.core(model, inputs, labels)
        success = core.fooled(core.forward(found.adv), torch.arange(core.batch, device=core.device))
        result = core.result(found.adv, success, self.geometry.measure)
        result.forward_passes += found.forward_passes * self.samples
        result.backward_passes += found.backward_passes * self.samples
        result.model_calls += found.model_calls
        return result
