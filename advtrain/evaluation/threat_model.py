"""The threat model of an evaluation, resolved in one place for ``advtrain evaluate`` and the
:class:`~advtrain.callbacks.RobustEvaluation` callback."""

from __future__ import annotations

from typing import Any

from advtrain.errors import InvalidConfigError
from advtrain.threat.norms import Norm


def resolve_threat(
    norm: str | None,
    eps: float | None,
    *,
    val_attack: Any = None,
    robustbench: Any = None,
    who: str = "evaluate",
    flags: bool = False,
) -> tuple[str | None, float | None]:
    """The evaluation's norm and main ε, each from the first of: the given ``norm``/``eps`` (flags or arguments); a
    RobustBench model (``robustbench``, its :class:`~advtrain.models.robustbench.RobustBenchEntry`: its own norm and
    the leaderboard's ε for the norm); the module's validation attack (``val_attack``: its ``norm`` and ``eps``).

    Args:
        norm: ``linf``, ``l2`` or ``l1`` in any spelling :meth:`Norm.parse` accepts (``Linf``, ``L2``), or ``None``.
        eps: the main budget, or ``None``.
        val_attack: the module's validation attack (or ``None``).
        robustbench: the RobustBench entry of the evaluated model (or ``None``).
        who: the name errors start with (``"evaluate"``, ``"RobustEvaluation"``).
        flags: errors name the command-line flags (``--norm``, ``--eps``) and the checkpoint, not the arguments.

    Returns:
        ``(norm, eps)``: the norm in advtrain's spelling, ε as a float; either is ``None`` when no source gives it (a
        caller with explicit attacks may not need them).

    Raises:
        InvalidConfigError: for an unknown norm, or a norm given without ε that differs from the validation attack's:
            its ε does not carry over to another norm.
    """
    names = ("--norm", "--eps", "the checkpoint's validation attack") if flags else ("norm", "eps", "the val_attack")
    norm = parse_norm(norm, f"{who}: {names[0]}")
    if robustbench is not None:
        from advtrain.models.robustbench import default_eps

        norm = norm or robustbench.norm
        eps = eps if eps is not None else default_eps(robustbench.dataset, norm)
    if val_attack is not None and (norm is None or eps is None):
        base_norm = getattr(val_attack, "norm", None)
        base_norm = parse_norm(getattr(base_norm, "value", base_norm), f"{who}: {names[2]}'s norm")
        base_eps = getattr(val_attack, "eps", None)
        if norm is not None and base_eps is not None and norm != base_norm:
            raise InvalidConfigError(
                f"{who}: {names[0]} {norm} differs from {names[2]} ({base_norm}, eps={float(base_eps):.4g}), whose ε "
                f"does not carry over to another norm: pass {names[1]} for {norm}."
            )
        norm, eps = norm or base_norm, eps if eps is not None else base_eps
    return norm, None if eps is None else float(eps)


def parse_norm(norm: str | None, what: str) -> str | None:
    """A norm in advtrain's spelling (``linf``, ``l2``, ``l1``) from any case (``Linf``, ``L2``), or ``None``."""
    if norm is None:
        return None
    try:
        return Norm.parse(norm).value
    except ValueError as err:
        raise InvalidConfigError(f"{what}: {err}") from None


__all__ = ["parse_norm", "resolve_threat"]
