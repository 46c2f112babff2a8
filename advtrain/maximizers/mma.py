"""Max-Margin Adversarial training with AN-PGD (Ding et al., "MMA Training: Direct Input Space Margin Maximization
through Adversarial Training", ICLR 2020; seed 003 Alg. 1–2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from advtrain.attacks.anpgd import ANPGD
from advtrain.engine.losses import soft_logit_margin
from advtrain.engine.modes import attack_context
from advtrain.maximizers.base import InnerMaximizer, Perturbation, trusted


@dataclass(kw_only=True)
class MarginPerturbation(Perturbation):
    """MMA's perturbation, with the masks of :class:`~advtrain.training.objectives.MMALoss`'s loss mix.

    Attributes:
        adv: x + δ* where ``use_adv``, the clean input elsewhere.
        eps: ε*, the margin AN-PGD found (0 for the misclassified examples, 1.05·d_max where it found no boundary).
        correct: (B,) bool, the examples the model classifies correctly (clean soft logit margin < 0).
        use_adv: (B,) bool, the correct examples with ε* < d_max: trained on ``adv``.
    """

    adv: Tensor
    correct: Tensor
    use_adv: Tensor


class MMA(InnerMaximizer, nn.Module):
    """Per-example margin estimates ε_i, refreshed with AN-PGD every time the example is seen.

    Per batch: the clean soft logit margin SLM = logsumexp(non-true logits) − true logit decides which examples are
    correct (SLM < 0). Each correct example is attacked with AN-PGD starting at ε_i = max(ε_min, stored ε_i) (PGD of
    ``steps`` steps of 2.5·ε_i/steps from a random start on the SLM, then bisection along the found direction up to
    1.05·d_max), giving its approximate margin ε*; ε_i ← ε* (d_max·1.05 when no boundary was found) and 0 for the
    misclassified. Examples with ε* < d_max train on x + δ*; the others only through the clean term of
    :class:`~advtrain.training.objectives.MMALoss`.

    The margins live in a buffer indexed by the dataset index (the datamodules yield it), so they are saved in and
    restored from checkpoints; the buffer grows to the largest index seen.

    Decisions: all attack forwards run in eval mode and points are clipped to [0, 1] (the official
    code bisects in train mode and does not clip); the correct/incorrect split uses an eval-mode clean forward; the
    bisection finds the decision boundary (AN-PGD's docstring says why).

    Under ``torch.distributed`` (DDP) every update all-gathers the (index, new margin) pairs of all ranks before writing
    the buffer, so every rank holds what one process would hold after seeing the same samples (DDP also broadcasts rank
    0's buffers, which would otherwise drop the other ranks' writes).

    Host syncs (inherent to the per-example ε search, on data-dependent subsets): reading the largest index to size the
    margin buffer, selecting the correct examples (one ``nonzero``), AN-PGD's own (its active sets: a count per PGD
    step and bisection step) and, in :class:`~advtrain.training.objectives.MMALoss`, selecting the examples trained
    adversarially (one ``nonzero``). The input and label checks are skipped (the batch was validated before it
    reached the device).

    Budget schedule: d_max (``max_eps``, which is also AN-PGD's bisection cap) and ε_min (``min_eps``) scale
    together, so at factor f the hinge is f·d_max: an example whose margin reaches f·d_max trains only through the
    clean term, and no search looks beyond 1.05·f·d_max. AN-PGD's step 2.5·ε_i/steps is a fraction of each example's
    start budget and follows it. The stored margins are measurements (how far AN-PGD found the boundary), not
    budgets, and the ramp leaves them as they are: an example measured under a smaller cap stored at most
    1.05·f·d_max, and when the cap has grown its next search starts from that estimate (or from the new f·ε_min,
    whichever is larger) and may reach the new cap. Margins and factor both follow the checkpoint (the buffer is
    saved, the factor is a function of the global step), so a resumed run sees the same pairs.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        max_eps: d_max, the hinge (CIFAR L∞ 12/20/32/255; L2 1/2/3; MNIST L∞ 0.45).
        min_eps: ε_min, the smallest initial budget (CIFAR L∞ 0.005, L2 0.5; MNIST 0.1).
        steps: PGD steps of AN-PGD (CIFAR 10, MNIST 40).
        bisection_steps: bisection steps of AN-PGD.
    """

    produces = MarginPerturbation
    budget_keys = ("max_eps", "min_eps", "_attack.max_eps", "_attack.eps")

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        max_eps: float = 32 / 255,
        min_eps: float = 0.005,
        steps: int = 10,
        bisection_steps: int = 10,
    ) -> None:
        nn.Module.__init__(self)
        if not 0 < min_eps <= max_eps:
            raise ValueError(f"MMA needs 0 < min_eps <= max_eps, got min_eps={min_eps}, max_eps={max_eps}.")
        self.norm = norm
        self.max_eps = float(max_eps)
        self.min_eps = float(min_eps)
        self.steps = int(steps)
        self.bisection_steps = int(bisection_steps)
        self._attack = trusted(
            ANPGD(norm=norm, eps=min_eps, max_eps=max_eps, steps=steps, bisection_steps=bisection_steps)
        )
        self.register_buffer("margins", torch.zeros(0))

    def _grow(self, size: int) -> None:
        if size > self.margins.numel():
            grown = self.margins.new_zeros(size)
            grown[: self.margins.numel()] = self.margins
            self.margins = grown

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        saved = state_dict.get(prefix + "margins")
        if saved is not None:
            self.margins = self.margins.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def margin_of(self, index: Tensor) -> Tensor:
        """The stored margins of dataset examples ``index`` (0 for examples never seen)."""
        self._grow(int(index.max()) + 1)
        return self.margins[index]

    def __call__(
        self, model: nn.Module, inputs: Tensor, labels: Tensor, index: Tensor | None = None
    ) -> MarginPerturbation:
        if index is None:
            raise ValueError("MMA keeps a margin per training example and needs the dataset index in each batch; "
                             "advtrain's datamodules yield (x, y, index).")  # fmt: skip
        index = index.to(self.margins.device)
        self._grow(int(index.max()) + 1)  # a host sync: the buffer grows to the largest index seen
        with torch.no_grad(), attack_context(model, "eval"):
            correct = soft_logit_margin(model(inputs).float(), labels) < 0
        eps_star = torch.zeros(inputs.shape[0], device=inputs.device)
        adv = inputs.detach().clone()
        # Only the correct examples are attacked: one host sync for their positions, then gathers and scatters (a
        # boolean mask would sync at every use).
        chosen = correct.nonzero().squeeze(1)
        if chosen.numel() > 0:
            start = self.margins[index[chosen]].clamp_min(self.min_eps).to(inputs.device)
            result = self._attack(model, inputs[chosen], labels[chosen], eps=start)
            found = torch.where(result.success, result.norms, torch.full_like(result.norms, 1.05 * self.max_eps))
            eps_star[chosen] = found
            adv[chosen] = result.adv
        use_adv = correct & (eps_star < self.max_eps)
        adv = torch.where(use_adv.view(-1, *([1] * (inputs.ndim - 1))), adv, inputs.detach())
        everywhere, eps_star_all = _all_gather_pairs(index, eps_star.to(self.margins.device))
        if everywhere is not index:  # the other ranks' examples may lie beyond this rank's largest index
            self._grow(int(everywhere.max()) + 1)
        self.margins[everywhere] = eps_star_all
        return MarginPerturbation(adv=adv, eps=eps_star, correct=correct, use_adv=use_adv)

    def __repr__(self) -> str:
        return InnerMaximizer.__repr__(self)


def _all_gather_pairs(index: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The (index, value) pairs of every rank, concatenated in rank order (unchanged without a process group).

    Ranks may hold batches of different sizes (the last one), so the pairs are padded to the largest before the
    all-gather and cut back after it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return index, values
    world = dist.get_world_size()
    count = torch.tensor([index.numel()], device=index.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    pairs = torch.zeros(2, longest, dtype=torch.float64, device=index.device)
    pairs[0, : index.numel()] = index.double()  # exact for indices below 2**53
    pairs[1, : index.numel()] = values.double()  # float32 margins round-trip exactly through float64
    gathered = [torch.empty_like(pairs) for _ in range(world)]
    dist.all_gather(gathered, pairs)
    joined = torch.cat([g[:, :n] for g, n in zip(gathered, sizes, strict=True)], dim=1)
    return joined[0].long(), joined[1].to(values.dtype)
