"""Adversarial weight perturbation (Wu et al., "Adversarial Weight Perturbation Helps Robust Generalization",
NeurIPS 2020; official code csdongxian/AWP): a perturbation of the weights, on top of the inputs', applied for the
step's gradient and removed after the optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class PerturbedWeights:
    """What :meth:`AWP.perturb` changed, for :meth:`AWP.restore`: the weights and their unperturbed values and
    perturbations (the perturbed values are ``original + offset``, recomputed bit for bit)."""

    params: list[nn.Parameter]
    original: list[Tensor]
    offsets: list[Tensor]


class AWP:
    """Adversarial weight perturbation, injected into :class:`~advtrain.training.AdversarialTraining` as
    ``model.weight_perturbation``; it works with any automatic-optimisation maximizer and objective (PGD-AT's
    cross-entropy, TRADES, MART, ...), because its ascent step is taken on the objective's own loss.

    Per training step, after the maximizer has produced the adversarial inputs (Wu et al., Alg. 1, one ascent step):

    1. the objective's loss L(w) on the batch is differentiated with respect to the weights (model in train mode,
       BatchNorm statistics left as they were);
    2. every weight tensor w_l (each parameter with more than one dimension: convolution and linear weights;
       BatchNorm scales and biases are not perturbed) moves by v_l = γ · ‖w_l‖ · g_l / ‖g_l‖, g_l = ∂L/∂w_l, so
       that ‖v_l‖ = γ‖w_l‖ (layer-wise relative size γ, Frobenius norms);
    3. the objective's loss is computed again at w + v; its gradient drives the optimizer step;
    4. after the step the perturbation is removed: the weights become w + u, where u is the update the optimizer
       made to the perturbed weights (new − (w + v)), i.e. the update computed at the perturbed point applied to the
       unperturbed weights. ``w`` is restored from a copy, not by subtracting v, so no rounding drift accumulates.

    From epoch ``warmup_epochs`` on (counted from 0); before, steps are plain adversarial training.

    Official-code choices followed: the ascent direction is the gradient of the same loss the step minimises (the
    code takes one SGD step on a proxy copy of the model and rescales the weight difference, which for plain SGD
    without momentum is the gradient direction); normalisation by ‖w_l‖/(‖g_l‖ + 1e-20) per tensor; the ascent
    forward runs in train mode (the proxy's BatchNorm statistics are discarded: here they are restored); weight decay
    and momentum of the optimizer act at the perturbed point (as ``opt.step()`` on the perturbed model there).
    Departures: no proxy model (the gradient is taken on the model itself with ``torch.autograd.grad``, which writes
    no ``.grad``; the BatchNorm buffers are saved and put back), and tensors are selected by shape, not by a
    ``'weight'`` substring in the state-dict key (same tensors in the official models).

    Official settings: AT-AWP γ = 0.01, no warm-up (``AT_AWP/train_cifar10.py``); TRADES-AWP γ = 0.005,
    ``--awp-warmup 10`` with 1-based epochs, i.e. AWP from the 10th epoch: ``warmup_epochs: 9`` here. Cost: one more
    forward/backward of the objective per step (about +1/11 for PGD-10 AT).

    Not combinable with maximizers that take their optimizer steps themselves (YOPO, Free AT), nor with gradient
    accumulation (the perturbation is removed after every optimizer step).

    Args:
        gamma: γ, the relative size of each weight tensor's perturbation (≥ 0; 0 turns AWP off).
        warmup_epochs: epochs of plain training before AWP starts.

    Example:
        >>> module = AdversarialTraining(maximizer=PGD(eps=0.3), weight_perturbation=AWP(gamma=0.01))  # doctest: +SKIP
    """

    #: The guard of the official ``diff_in_weights`` against a zero gradient.
    EPS = 1e-20

    def __init__(self, *, gamma: float = 0.01, warmup_epochs: int = 0) -> None:
        gamma = float(gamma)
        if not gamma >= 0 or gamma == float("inf"):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma}.")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs}.")
        self.gamma = gamma
        self.warmup_epochs = int(warmup_epochs)

    def __repr__(self) -> str:
        return f"AWP(gamma={self.gamma!r}, warmup_epochs={self.warmup_epochs!r})"

    def active(self, epoch: int) -> bool:
        """Whether the step of ``epoch`` (0-based) is perturbed."""
        return self.gamma > 0 and epoch >= self.warmup_epochs

    @staticmethod
    def weights(model: nn.Module) -> list[nn.Parameter]:
        """The perturbed tensors: trainable parameters with more than one dimension (convolution and linear
        weights)."""
        return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]

    def offsets(self, params: list[nn.Parameter], loss: Tensor) -> list[Tensor]:
        """v_l = γ‖w_l‖ g_l/(‖g_l‖ + 1e-20) for the gradient g of ``loss`` (ascent direction).

        Under DDP the gradient is averaged over the ranks first (one all-reduce), as DDP averages the step's own
        gradients: so every rank perturbs by the same v, the one the whole global batch gives (the official code runs
        one process over the whole batch), and the ranks stay in lockstep."""
        grads = [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)
        ]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                flat = torch.cat([g.flatten() for g in grads])
                torch.distributed.all_reduce(flat)
                flat /= world
                grads = [
                    chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
                ]
        return [
            g * (self.gamma * p.detach().norm() / (g.norm() + self.EPS)) for p, g in zip(params, grads, strict=True)
        ]

    def perturb(self, model: nn.Module, loss_fn: Callable[[], Tensor]) -> PerturbedWeights:
        """Takes the ascent step: ``loss_fn()`` (the objective's loss at the current weights) is evaluated with the
        model's buffers (BatchNorm statistics) restored afterwards, and each weight moves by its offset."""
        params = self.weights(model)
        with _buffers_kept(model):  # put back after the backward pass, which may read them
            offsets = self.offsets(params, loss_fn())
        original = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, w, v in zip(params, original, offsets, strict=True):
                p.copy_(w + v)
        return PerturbedWeights(params, original, offsets)

    @staticmethod
    def restore(state: PerturbedWeights) -> None:
        """Removes the perturbation after the optimizer step: w ← w + (p − (w + v)), the step's update applied to the
        unperturbed weights (exactly w when the step was skipped)."""
        with torch.no_grad():
            for p, w, v in zip(state.params, state.original, state.offsets, strict=True):
                p.copy_(w + (p - (w + v)))


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Puts every buffer of ``model`` (BatchNorm running statistics and counters) back as it was after the block."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
