"""Per-sample attack losses (shape (B,)); an attack ascends them."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample cross-entropy, computed in float32 for autocast safety."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """max_{j≠y} z_j − z_y: positive exactly when the sample is misclassified (C&W's margin)."""
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return other - true


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020): −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e-12)."""
    logits = logits.float()
    sorted_logits = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return -(true - other) / (sorted_logits[:, 0] - sorted_logits[:, 2] + 1e-12)


def soft_logit_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Soft logit margin log Σ_{j≠y} exp z_j − z_y (MMA training, Ding et al. 2020; seed 003).

    A smooth upper bound of :func:`margin_loss` (it exceeds the hard margin by at most log(K − 1)): negative
    means correctly classified with some slack; misclassified samples always have SLM ≥ 0.
    """
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(dim=1)
    return other - true


LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy,
    "margin": margin_loss,
    "dlr": dlr_loss,
    "slm": soft_logit_margin,
}


def get_loss(name: str) -> LossFn:
    """Looks a loss up by name, with an error listing the allowed names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"Unknown loss {name!r}; allowed values are {sorted(LOSSES)}.") from None


def is_fooled(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """Untargeted: the prediction differs from the label; targeted: the prediction equals the target."""
    pred = logits.argmax(dim=1)
    return pred == labels if targeted else pred != labels


__all__ = [
    "LOSSES",
    "LossFn",
    "cross_entropy",
    "dlr_loss",
    "get_loss",
    "is_fooled",
    "margin_loss",
    "soft_logit_margin",
]
