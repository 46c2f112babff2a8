"""Building blocks every attack shares: pass counting, model calls with optional autocast, best-result tracking."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advtrain.engine.checks import check_logits
from advtrain.engine.result import AttackResult
from advtrain.engine.state import SampleState
from advtrain.threat.norms import view_as_batch


@dataclass
class PassCounter:
    """Counts per-sample forward and backward passes (a batch of n samples counts n) and batched model calls."""

    forward_passes: int = 0
    backward_passes: int = 0
    model_calls: int = 0

    def forward(self, n: int) -> None:
        self.forward_passes += int(n)
        self.model_calls += 1

    def backward(self, n: int) -> None:
        self.backward_passes += int(n)

    def absorb(self, result: AttackResult) -> None:
        """Adds the passes of a sub-attack run on part of the batch (e.g. AN-PGD's PGD)."""
        self.forward_passes += result.forward_passes
        self.backward_passes += result.backward_passes
        self.model_calls += result.model_calls


AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """Parses an ``autocast`` option (``None``, ``"bf16"``, ``"fp16"``) once, at the boundary."""
    if name is None:
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(
            f"Unknown autocast {name!r}; allowed values are None, {', '.join(map(repr, AUTOCAST_DTYPES))}."
        )
    return AUTOCAST_DTYPES[name]


def logits_of(
    model: nn.Module, inputs: Tensor, counter: PassCounter | None = None, *, autocast: torch.dtype | None = None
) -> Tensor:
    """Calls the model and returns float32 logits; with ``autocast`` (e.g. ``torch.bfloat16``) the model runs in
    that precision while the perturbation and everything computed from the logits stay in float32."""
    ctx = torch.autocast(inputs.device.type, dtype=autocast) if autocast is not None else nullcontext()
    with ctx:
        logits = check_logits(model(inputs))
    if counter is not None:
        counter.forward(inputs.shape[0])
    return logits.float()


class MinimalNormTracker:
    """Keeps, per sample, the successful point of smallest norm (minimal-norm attacks).

    A sample that is never fooled keeps its clean input, with ``success = False``.

    Args:
        inputs: the clean batch.
    """

    def __init__(self, inputs: Tensor) -> None:
        self.inputs = inputs.detach()
        self.best_adv = self.inputs.clone()
        self.best_norm = torch.full((inputs.shape[0],), float("inf"), device=inputs.device)
        self.success = torch.zeros(inputs.shape[0], dtype=torch.bool, device=inputs.device)

    def update(self, index: Tensor | None, adv: Tensor, norms: Tensor, fooled: Tensor) -> None:
        """Offers candidate points ``adv`` (with their ``norms`` and whether they fool) for samples ``index``, or for
        the whole batch when ``index`` is ``None`` (then with no host sync: selects rather than indexes)."""
        if index is None:
            better = fooled & (norms < self.best_norm)
            self.best_adv = torch.where(view_as_batch(better, adv), adv.detach().to(self.best_adv.dtype), self.best_adv)
            self.best_norm = torch.where(better, norms.detach().float(), self.best_norm)
            self.success |= better
            return
        better = fooled & (norms < self.best_norm[index])
        upd = index[better]
        self.best_adv[upd] = adv[better].detach().to(self.best_adv.dtype)
        self.best_norm[upd] = norms[better].detach().float()
        self.success[upd] = True

    def offer(self, state: SampleState, adv: Tensor, norms: Tensor, fooled: Tensor, *, everyone: bool = False) -> None:
        """:meth:`update` with the candidates of every row of ``state`` (in the masked mode, of its active rows).

        ``everyone``: the caller vouches that ``state`` holds every sample of the batch, in order, and never retires
        one (e.g. DDN, which has no early stopping); the shrinking mode then selects as the masked one does, with no
        host sync."""
        if state.masked:
            self.update(None, adv, norms, fooled & state.active)
        elif everyone:
            self.update(None, adv, norms, fooled)
        else:
            self.update(state.index, adv, norms, fooled)


class MaxLossTracker:
    """Keeps, per sample, the best point of a loss-maximising (budgeted) attack: a point that fools the model beats one
    that does not; between two that both fool or both do not, the larger loss wins (so a fooled sample is never
    undone). A sample never offered a point keeps δ = 0 with loss −∞.

    Args:
        inputs: the clean batch (δ is kept in float32, with its shape).
    """

    def __init__(self, inputs: Tensor) -> None:
        batch = inputs.shape[0]
        self.best_delta = torch.zeros_like(inputs, dtype=torch.float32)
        self.best_loss = torch.full((batch,), float("-inf"), device=inputs.device)
        self.success = torch.zeros(batch, dtype=torch.bool, device=inputs.device)

    def offer(self, state: SampleState, delta: Tensor, loss: Tensor, fooled: Tensor) -> None:
        """Offers the perturbations ``delta`` of the rows of ``state`` with their ``loss`` and whether they fool."""
        index = state.index
        success, best_loss = self.success[index], self.best_loss[index]
        better = (fooled & ~success) | ((fooled == success) & (loss > best_loss))
        if state.masked:
            better = better & state.active
            self.best_delta = torch.where(view_as_batch(better, delta), delta.float(), self.best_delta)
            self.best_loss = torch.where(better, loss, self.best_loss)
            self.success = torch.where(better, fooled, self.success)
            return
        upd = index[better]
        self.best_delta[upd] = delta[better].float()
        self.best_loss[upd] = loss[better]
        self.success[upd] = fooled[better]
