"""Free adversarial training (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019; official code
ashafahi/free_adv_train, TensorFlow CIFAR code, and mahyarnajibi/FreeAdversarialTraining for ImageNet in PyTorch).

Free AT is a whole training step rather than a perturbation: every backward pass yields the weight gradient (one
optimizer step) and the input gradient (one FGSM step of the perturbation) at once, and each minibatch is replayed m
times. It declares its own step strategy, :class:`FreeATStep`: the LightningModule runs it in manual optimisation
and lets it take its own optimizer steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.maximizers.base import InnerMaximizer, batch_budget, checked_budget
from advtrain.maximizers.steps import ManualStep, ManualStepOutput, StepHost
from advtrain.threat.geometry import geometry_for
from advtrain.threat.norms import view_as_batch


class FreeATStep(ManualStep):
    """Free AT's training step: the maximizer's m replays (:meth:`FreeAT.training_step`), each ending in one optimizer
    step that this strategy takes when the maximizer calls it (:meth:`take_step`)."""

    def run(self, host: StepHost, optimizer: Any, inputs: Tensor, labels: Tensor) -> ManualStepOutput:
        step = functools.partial(self.take_step, host, optimizer)
        return host.maximizer.training_step(host.model, inputs, labels, host.manual_backward, step)

    @staticmethod
    def take_step(host: StepHost, optimizer: Any, loss: Tensor) -> None:
        """One replay's optimizer step, after its loss is recorded (with ``divergence_check_every=1`` a non-finite
        loss raises here, before the step)."""
        host.record_loss(loss)
        optimizer.step()
        optimizer.zero_grad()


class FreeAT(InnerMaximizer, nn.Module):
    """Free adversarial training with minibatch replay m (Shafahi et al., Alg. 1).

    Per minibatch, m replays; each replay: a forward pass at clamp01(x + δ) in train mode, the cross-entropy, one
    backward pass giving the gradients of the weights and of δ together, one optimizer step, then
    δ ← Π_ε(δ + α·sign ∇_δ) (L2: the normalised gradient). δ starts at 0 once and is **carried**: from replay to
    replay and from minibatch to minibatch (the next minibatch starts from the last δ of the previous one, a
    perturbation found for other images, as in the paper). So one minibatch costs m forward/backward passes and makes
    m optimizer steps: ``trainer.global_step`` grows by m per batch. Its loss is that cross-entropy: it takes no
    objective (``produces = None``; the module refuses any but the default one).

    Epochs: each minibatch is seen m times, so the paper divides the number of epochs by m to keep the number of
    passes (and optimizer steps) of natural training; a recipe states this directly as ``trainer.max_epochs`` (e.g.
    ``recipes/free_cifar.yaml``: m = 8 and ``max_epochs: 26`` ≈ 205/8). Learning-rate schedules of advtrain step once
    per minibatch (fractions of ``max_epochs × batches``), so their shape over training is unchanged; the m steps of
    one minibatch share its learning rate. A budget schedule counts minibatches (``global_step / m``).

    Official-code choices followed: δ lives in a buffer of the batch shape; a smaller (last) batch uses its first rows
    (``global_noise_data[0:B]``); δ is clipped to the ε-ball only and x + δ is clamped to [0, 1] for the forward
    pass (δ itself is not projected onto the box, so it carries over to other images unchanged); step size α = ε
    (``fgsm_step = clip_eps``); the forward runs in train mode. The δ buffer is saved in checkpoints (exact resume).
    Under DDP, DDP broadcasts rank 0's buffers at every forward: all ranks then carry rank 0's δ (a perturbation
    found on other images in any case).

    Reference numbers (Shafahi et al., CIFAR-10, WRN-32-10, ε = 8/255, m = 8): 85.96% clean, 46.82% PGD-20,
    785 min against 5418 min for PGD-7 AT; ≈ 44% AutoAttack is typical of Free-trained models.

    Args:
        norm: ``"linf"`` (the paper) or ``"l2"``.
        eps: budget (CIFAR 8/255).
        m: minibatch replays (the paper's CIFAR setting: 8).
        step_size: α of the δ update; ``None`` gives ε (the paper).
    """

    step_strategy = FreeATStep
    produces = None
    budget_keys = ("eps", "step_size")

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        m: int = 8,
        step_size: float | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if int(m) != m or m < 1:
            raise ValueError(f"m (the minibatch replays) must be an integer >= 1, got {m}.")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 or null (= eps), got {step_size}.")
        self._geometry = geometry_for(norm)
        self.norm = self._geometry.norm.value
        self.eps = checked_budget(eps)
        self.m = int(m)
        self.step_size = None if step_size is None else float(step_size)
        self.register_buffer("delta", torch.zeros(0))

    @property
    def steps_per_batch(self) -> int:
        return self.m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        saved = state_dict.get(prefix + "delta")
        if saved is not None:
            self.delta = self.delta.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _carried(self, inputs: Tensor) -> Tensor:
        """The carried δ for this batch (zeros the first time, or when the input shape changes)."""
        if self.delta.shape[1:] != inputs.shape[1:] or self.delta.device != inputs.device:
            self.delta = torch.zeros_like(inputs)
        elif self.delta.shape[0] < inputs.shape[0]:
            missing = self.delta.new_zeros(inputs.shape[0] - self.delta.shape[0], *inputs.shape[1:])
            self.delta = torch.cat([self.delta, missing])
        return self.delta[: inputs.shape[0]]

    def training_step(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        backward: Callable[[Tensor], None],
        step: Callable[[Tensor], None],
    ) -> ManualStepOutput:
        """The m replays of one minibatch.

        Args:
            model: the classifier, in train mode.
            inputs: clean batch in [0, 1], validated by the caller (see :class:`InnerMaximizer`).
            labels: true labels.
            backward: the backward function (Lightning's ``manual_backward``, or ``Tensor.backward``).
            step: takes one optimizer step (and zeroes the gradients) given the replay's loss; called m times.

        Returns:
            The mean loss over the replays and the last replay's logits.
        """
        x = inputs.detach()
        eps = batch_budget(self.eps, x)
        alpha = eps if self.step_size is None else torch.full_like(eps, self.step_size)
        delta = self._carried(x).clone()
        losses, logits = [], None
        for _ in range(self.m):
            delta.requires_grad_(True)
            logits = model((x + delta).clamp(0.0, 1.0))
            loss = F.cross_entropy(logits, labels)
            backward(loss)
            grad = delta.grad
            step(loss.detach())
            with torch.no_grad():
                direction = self._geometry.ascent_direction(grad)
                delta = self._geometry.project(delta.detach() + view_as_batch(alpha, x) * direction, eps)
            losses.append(loss.detach())
        with torch.no_grad():
            self.delta[: x.shape[0]] = delta
        return ManualStepOutput(loss=torch.stack(losses).mean(), logits=logits.detach())

    def __repr__(self) -> str:
        return InnerMaximizer.__repr__(self)
