"""YOPO-m-n, "You Only Propagate Once" (Zhang et al., NeurIPS 2019; seed 003).

YOPO is a whole training step rather than a perturbation: it reuses each full backward pass m times, running n cheap
inner updates of the perturbation through the first layer only, and builds the weight gradients itself. It declares
its own step strategy, :class:`YOPOStep`, which the LightningModule runs in manual optimisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.engine.loop import ascent_step
from advtrain.maximizers.base import InnerMaximizer, batch_budget, checked_budget
from advtrain.maximizers.steps import ManualStep, ManualStepOutput, StepHost
from advtrain.threat.geometry import geometry_for


class YOPOStep(ManualStep):
    """YOPO's training step: the maximizer accumulates the weight gradients of its m rounds
    (:meth:`YOPO.training_step`), then one optimizer step. Its full backward passes reach every layer but the first,
    and its Hamiltonian passes only the first: DDP must look for unused parameters (``partial_backward``)."""

    partial_backward = True

    def run(self, host: StepHost, optimizer: Any, inputs: Tensor, labels: Tensor) -> ManualStepOutput:
        out = host.maximizer.training_step(host.model, inputs, labels, host.manual_backward)
        host.record_loss(out.loss)  # with divergence_check_every=1 this raises before the step
        optimizer.step()
        return out


class YOPO(InnerMaximizer):
    """YOPO-m-n adversarial training.

    Per batch: η ~ U(−ε, ε); for j = 1..m: a full forward/backward at x + η in train mode accumulates the gradients
    of every layer after the first (g) and gives the costate p = ∂L/∂f0(x + η); then n inner steps on the
    Hamiltonian ⟨f0(x + η), p⟩ move η (η ← Π(η + σ·sign ∇_η), inside the ε-ball and the [0, 1] box) through the
    first layer only; then the first layer's weight gradient of ⟨f0(x + η_new), p⟩ is accumulated. After m rounds
    :class:`YOPOStep` takes one optimizer step. Gradients are summed over the m rounds, so recipes using SGD
    pre-divide the learning rate by m (CIFAR PreActResNet-18: 0.1·2/m; MNIST: 0.01/m); Adam is invariant to the
    gradient's scale and keeps its learning rate (``configs/maximizer/yopo_mnist.yaml``).

    Decision: the official PreActResNet config also accumulates the first layer's gradient from the
    full backward passes, counting it twice; here the full backward passes reach only g, and the first layer gets
    exactly the m Hamiltonian terms (the WRN/MNIST configs' behaviour). The model must be an
    :class:`advtrain.models.Classifier` (``layer_one``/``rest`` split). YOPO's loss is the cross-entropy on its
    perturbed inputs: it takes no objective (``produces = None``; the module refuses any but the default one).

    Cost per batch: m full forward/backward passes (with g's weight gradients), m·n layer-one forward + input-VJP
    passes and m layer-one forward/backward passes for its weight gradient; PGD-m costs m forward + input-gradient
    passes and one training pass. YOPO-m-0 therefore costs about PGD-m, and YOPO-m-n's excess is m(n + 1) layer-one
    passes, cheap when layer one is small next to the network (the paper's GPUs: "PGD-5 and YOPO-5-3 have
    approximately the same computational cost"). Measured on one CPU thread with the MNIST SmallCNN (batch 64): a
    layer-one step costs about 1/6 of a full pass, not the ~1/50 its FLOPs suggest, because its output (32×26×26) is
    the network's largest activation and oneDNN runs the single-input-channel convolution at a few percent of the
    throughput it reaches on conv2 (its input-gradient: 5.5 ms for 14.5 M multiply-adds against conv2's full backward,
    14.8 ms for 680 M); YOPO-5-10 there costs about PGD-10, not PGD-5 (``benchmarks/train_compare.py``).

    Budget schedule: ``eps`` and the inner step ``sigma`` scale together (σ/ε constant), so the n inner steps cross
    the same fraction of the ball at every factor.

    Why its rounds are not an attack on :meth:`advtrain.engine.core.AttackCore.loop`: that loop evaluates the model at
    each iterate (logits, verdicts, retirement) and advances it; YOPO's inner steps never call the model — they
    differentiate layer one alone against the costate p of the last full pass — and every round also accumulates
    weight gradients. Its steps share the engine's :func:`~advtrain.engine.loop.ascent_step` (projection onto ball ∩
    box); the seam that keeps it out of the module is its step strategy, :class:`YOPOStep`.

    Args:
        norm: ``"linf"`` (the paper) or ``"l2"``.
        eps: budget (CIFAR 8/255; MNIST 0.3).
        m: full forward/backward rounds per batch (5).
        n: inner first-layer steps per round (CIFAR 3; MNIST 10).
        sigma: inner step size σ (CIFAR 2/255; MNIST 0.01).
    """

    step_strategy = YOPOStep
    produces = None
    budget_keys = ("eps", "sigma")

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        m: int = 5,
        n: int = 3,
        sigma: float = 2 / 255,
    ) -> None:
        if m < 1 or n < 0 or sigma <= 0 or eps < 0:
            raise ValueError(f"YOPO needs m >= 1, n >= 0, sigma > 0, eps >= 0; got m={m}, n={n}, sigma={sigma}.")
        self._geometry = geometry_for(norm)
        self.norm = self._geometry.norm.value
        self.eps = checked_budget(eps)
        self.m = int(m)
        self.n = int(n)
        self.sigma = float(sigma)

    def training_step(
        self, model: nn.Module, inputs: Tensor, labels: Tensor, backward: Callable[[Tensor], None]
    ) -> ManualStepOutput:
        """Accumulates YOPO's gradients into ``.grad`` (the caller zeroes them before and steps after).

        Args:
            model: an :class:`advtrain.models.Classifier` in train mode.
            inputs: clean batch in [0, 1], validated by the caller (see :class:`InnerMaximizer`).
            labels: true labels.
            backward: the backward function to use (Lightning's ``manual_backward``, or ``Tensor.backward``).

        Returns:
            The mean loss over the m rounds and the logits of the last round.
        """
        if not (hasattr(model, "layer_one") and hasattr(model, "rest")):
            raise TypeError("YOPO needs a model split into layer_one/rest (an advtrain.models.Classifier).")
        x = inputs.detach()
        eps = batch_budget(self.eps, x)
        sigma = torch.full_like(eps, self.sigma)
        eta = self._geometry.project_ball_box(x, self._geometry.sample(x, eps), eps)
        losses, logits = [], None
        with torch.no_grad():
            h0 = model.layer_one(x + eta)
        for _ in range(self.m):
            # Full pass with layer one's output as a leaf: the backward reaches g only and yields p.
            h = h0.detach().requires_grad_(True)
            logits = model.rest(h)
            loss = F.cross_entropy(logits, labels)
            backward(loss)
            costate = h.grad.detach()
            losses.append(loss.detach())
            # Inner steps on the Hamiltonian ⟨f0(x + η), p⟩ through layer one only. Its η-gradient is the
            # vector-Jacobian product of f0 with p, taken directly (no elementwise product with p and its backward on
            # f0's output, the largest activation of the MNIST SmallCNN); autograd.grad computes no weight gradient.
            for _ in range(self.n):
                eta.requires_grad_(True)
                (grad,) = torch.autograd.grad(model.layer_one(x + eta), eta, grad_outputs=costate)
                eta = ascent_step(self._geometry, x, eta.detach(), grad, sigma, eps)
            # Layer one's weight gradient of the Hamiltonian at the updated perturbation. Its forward is also the next
            # round's layer-one output at x + η, so the next full pass starts from it (one layer-one forward a round).
            h0 = model.layer_one(x + eta)
            backward((h0 * costate).sum())
        return ManualStepOutput(loss=torch.stack(losses).mean(), logits=logits.detach())
