"""Norm names and the small tensor helpers every geometry shares."""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor


class Norm(str, Enum):
    """The perturbation norms advtrain knows. Parse user strings with :meth:`Norm.parse`."""

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"
    L0 = "l0"

    @classmethod
    def parse(cls, value: str | Norm) -> Norm:
        """Turns a user-facing string into a :class:`Norm`, accepting a few common spellings.

        Args:
            value: ``"linf"``, ``"l2"``, ``"l1"``, ``"l0"`` (also ``"inf"``, ``"Linf"``, ``"L2"``, ...).

        Returns:
            The matching :class:`Norm`.

        Raises:
            ValueError: naming the value and the allowed ones.
        """
        if isinstance(value, Norm):
            return value
        key = str(value).strip().lower().replace("_", "").replace("-", "")
        aliases = {"inf": "linf", "linfty": "linf", "linfinity": "linf", "infinity": "linf", "2": "l2", "1": "l1"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            allowed = ", ".join(repr(n.value) for n in cls)
            raise ValueError(f"Unknown norm {value!r}; allowed values are {allowed}.") from None


def flat_norm(t: Tensor, p: float) -> Tensor:
    """Per-sample p-norm of a batch, flattened over all but the first dimension."""
    return torch.linalg.vector_norm(t.flatten(1), ord=p, dim=1)


def as_eps_tensor(eps: float | Tensor, inputs: Tensor) -> Tensor:
    """Returns ε as a float32 tensor of shape (B,) on the inputs' device (a scalar is broadcast).

    Raises:
        ValueError: if ε is negative, not finite, or a tensor whose shape is not (B,) or scalar.
    """
    batch = inputs.shape[0]
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=inputs.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(batch)
    elif eps_t.shape != (batch,):
        raise ValueError(f"eps must be a scalar or a tensor of shape ({batch},), got shape {tuple(eps_t.shape)}.")
    if not bool(torch.isfinite(eps_t).all()) or bool((eps_t < 0).any()):
        raise ValueError("eps must be finite and non-negative.")
    return eps_t.contiguous()


def clip_to_box(inputs: Tensor, delta: Tensor) -> Tensor:
    """Shrinks ``delta`` so that ``inputs + delta`` lies in the [0, 1] box (coordinate-wise clamp)."""
    return (inputs + delta).clamp_(0.0, 1.0) - inputs


def view_as_batch(values: Tensor, like: Tensor) -> Tensor:
    """Reshapes a (B,) tensor to (B, 1, 1, ...) so it broadcasts against ``like``."""
    return values.view(-1, *([1] * (like.ndim - 1)))
