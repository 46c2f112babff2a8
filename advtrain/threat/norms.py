"""Norm names and the small tensor helpers every geometry shares."""

from __future__ import annotations

import functools
import inspect
import math
import typing
from enum import Enum
from fractions import Fraction

import torch
from torch import Tensor

from advtrain.errors import InvalidConfigError


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


def parse_budget(eps: object, norm: str | Norm | None, name: str = "eps") -> float | None:
    """A budget given to a constructor, checked once at the boundary: a finite number >= 0 (``None`` passes through,
    for unbudgeted minimal-norm attacks), at most 1 for L∞ (inputs live in [0, 1]: ε ≥ 1 allows any image).

    Raises:
        InvalidConfigError (a ValueError): naming ``name``, the value and what to write instead.
    """
    if eps is None or isinstance(eps, Tensor):
        return eps  # per-sample tensors are checked per call (as_eps_tensor)
    if isinstance(eps, str):
        try:
            hint = f"eps={float(Fraction(eps.strip())):.6g} or the expression {eps.strip()} without quotes"
        except (ValueError, ZeroDivisionError):
            hint = "a number such as 8/255 (a Python expression, not a string)"
        raise InvalidConfigError(f"{name} must be a number, got the string {eps!r}: pass {hint}.")
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"{name} must be a number, got {eps!r} ({type(eps).__name__}).") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidConfigError(f"{name} must be finite and >= 0, got {eps!r}.")
    if value > 1 and norm is not None and Norm.parse(norm) is Norm.LINF:
        raise InvalidConfigError(
            f"{name}={eps!r} with norm 'linf' exceeds 1, the whole [0, 1] pixel range, so every image would be "
            f"allowed: give the budget on the [0, 1] scale (8/255, not 8)."
        )
    return value


def checks_budget_arguments(cls: type) -> None:
    """Makes ``cls.__init__`` pass its ``eps`` argument through :func:`parse_budget` (with the call's ``norm``, or
    the signature's default), and check a given ``norm`` against the ``Literal`` of its signature, before the body
    runs. Called from ``__init_subclass__`` of the attack and maximizer bases, so every subclass parses its budget
    and norm at the boundary; the signature is kept (``functools.wraps``) for jsonargparse and ``repr``."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_checks_budget", False):
        return
    params = inspect.signature(init).parameters
    if "eps" not in params and "norm" not in params:
        return
    default_norm = params["norm"].default if "norm" in params else None
    default_norm = None if default_norm is inspect.Parameter.empty else default_norm

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):  # noqa: N807
        if "norm" in kwargs:
            _check_declared_norm(init, kwargs["norm"], type(self).__name__)
        if "eps" in kwargs:
            norm = kwargs.get("norm", default_norm)
            if "norm" not in params:  # one-norm classes (FGSM, DDN): the norm of their registry spec
                norms = getattr(getattr(self, "spec", None), "norms", ())
                norm = norms[0] if len(norms) == 1 else None
            kwargs["eps"] = parse_budget(kwargs["eps"], norm)
        init(self, *args, **kwargs)

    __init__._checks_budget = True
    cls.__init__ = __init__


@functools.cache
def _declared_norms(init) -> tuple[str, ...] | None:
    try:
        hint = typing.get_type_hints(init).get("norm")
    except (NameError, TypeError):
        return None
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def _check_declared_norm(init, norm: object, owner: str) -> None:
    """Refuses a norm outside the ``Literal`` of ``init``'s ``norm`` parameter: a geometry existing for a norm (L1)
    does not make every attack or maximizer correct or tested for it. Annotations that are not a ``Literal`` (or
    cannot be resolved) are not checked."""
    allowed = _declared_norms(init)
    if allowed is not None and Norm.parse(norm).value not in allowed:
        raise InvalidConfigError(
            f"{owner} does not support norm={norm!r}; allowed values are {', '.join(repr(a) for a in allowed)}."
        )


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
