"""Automatic warning signs of gradient masking (Athalye, Carlini and Wagner, ICML 2018, Sec. 3.1 and 4.1),
computed from numbers the evaluation already produces.

Each check returns a :class:`MaskingCheck`; one that fires is logged as a warning and flagged in the report with
what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import Tensor

#: Relative slack when comparing a verified norm with ε (a point projected onto the ε-ball may measure ε·(1 + 1e-7)).
REL_TOL = 1e-6


def within(norms: Tensor, eps: float) -> Tensor:
    """Whether each norm is at most ε (up to :data:`REL_TOL`); +inf (nothing found) never is."""
    return norms <= eps * (1.0 + REL_TOL)


@dataclass
class MaskingCheck:
    """The outcome of one check: its name, whether it fired, the numbers behind it and what to do."""

    name: str
    fired: bool
    detail: str
    advice: str

    def as_dict(self) -> dict:
        return asdict(self)


ADVICE = {
    "one_step_beats_iterative": (
        "A single gradient step should never beat an iterative attack: the loss surface is probably masked (shattered "
        "or noisy gradients). Check the iterative attacks' step sizes, then attack adaptively (BPDA for "
        "non-differentiable layers, EOT for randomness; Athalye et al. 2018)."
    ),
    "black_box_beats_white_box": (
        "A gradient-free attack found adversarial examples that every gradient attack missed: the gradients are "
        "masked or obfuscated. Report the black-box numbers and attack adaptively (BPDA, EOT, a differentiable "
        "surrogate of the defence)."
    ),
    "unbounded_below_full_success": (
        "An unbounded minimal-norm attack must eventually fool every sample; failing means it cannot follow the "
        "gradient (zero, shattered or saturated gradients) or its budget is too small. Raise its steps, and look for "
        "non-differentiable or saturating layers in the model."
    ),
    "success_not_growing_with_eps": (
        "Robust accuracy must fall as ε grows (to 0 at a large enough ε); a flat or rising curve means the attacks "
        "are not working, not that the model is robust. Check the attacks' step sizes and the model for gradient "
        "masking; extend the ε grid."
    ),
    "zero_gradients": (
        "The loss gradient with respect to the input is exactly zero for many samples, so gradient attacks cannot "
        "move. Look for rounding/quantisation, argmax or a saturated softmax in the model; make the model return "
        "logits and attack with BPDA or a differentiable surrogate."
    ),
    "random_outputs": (
        "The model's outputs differ between two forward passes in eval mode (dropout left on, noise injection): single "
        "gradients are unreliable. Fix the randomness, or attack with EOT (gradients averaged over many draws)."
    ),
}


def _broken(norms: Tensor, mask: Sequence[bool], eps: float) -> Tensor:
    """(N,) samples broken at ε by any attack selected by ``mask``, whatever ε it ran at (closure over the grid)."""
    selected = [a for a, keep in enumerate(mask) if keep]
    if not selected:
        return norms.new_zeros(norms.shape[0], dtype=bool)
    return within(norms[:, selected].flatten(1).amin(1), eps)


def beats_check(
    name: str, norms: Tensor, roles: Sequence[str], grid: Sequence[float], strong: set[str], weak: set[str],
    limit: float,
) -> MaskingCheck:  # fmt: skip
    """Fires when attacks of the ``weak`` roles break more than ``limit`` samples that no attack of the ``strong``
    roles breaks, at some ε."""
    worst, at = 0, None
    for eps in grid:
        extra = int(
            (_broken(norms, [r in weak for r in roles], eps) & ~_broken(norms, [r in strong for r in roles], eps)).sum()
        )
        if extra > worst:
            worst, at = extra, eps
    have = any(r in weak for r in roles) and any(r in strong for r in roles)
    fired = have and worst > limit
    detail = (
        f"{worst} samples broken by {'/'.join(sorted(weak))} attacks but by no {'/'.join(sorted(strong))} attack "
        f"(at ε = {at:g})"
        if at is not None
        else f"no sample broken only by {'/'.join(sorted(weak))} attacks"
    )
    if not have:
        detail = f"not checked: the suite lacks {'/'.join(sorted(weak))} or {'/'.join(sorted(strong))} attacks"
    return MaskingCheck(name, fired, detail, ADVICE[name])


def curve_check(curves: dict[str, list[float]], grid: Sequence[float], tolerance: float) -> MaskingCheck:
    """Fires when a robust-accuracy curve rises with ε by more than ``tolerance``, or stays flat (within
    ``tolerance``) above ``tolerance`` while ε at least doubles over the grid."""
    name = "success_not_growing_with_eps"
    problems = []
    for label, curve in curves.items():
        rises = [(grid[g], grid[g + 1]) for g in range(len(curve) - 1) if curve[g + 1] > curve[g] + tolerance]
        if rises:
            problems.append(f"{label} rises from ε = {rises[0][0]:g} to {rises[0][1]:g}")
        spread = len(grid) >= 2 and grid[0] > 0 and grid[-1] >= 2 * grid[0]
        if spread and curve[-1] >= curve[0] - tolerance and curve[-1] > tolerance:
            problems.append(f"{label} stays at {100 * curve[-1]:.1f}% from ε = {grid[0]:g} to {grid[-1]:g}")
    detail = "; ".join(problems) if problems else "every robust-accuracy curve falls with ε"
    return MaskingCheck(name, bool(problems), detail, ADVICE[name])


def run_checks(
    data: dict[str, Tensor],
    names: Sequence[str],
    roles: Sequence[str],
    unbounded: Sequence[bool],
    grid: Sequence[float],
    curves: dict[str, list[float]],
    tolerance: float = 0.01,
) -> list[MaskingCheck]:
    """All checks, from the evaluation's records (fields: :data:`advtrain.evaluation.records.RECORD`).

    Args:
        data: the gathered records.
        names, roles, unbounded: per attack, its label, role and whether it is an unbounded minimal-norm attack.
        grid: the ε grid.
        curves: robust accuracy per ε of every budgeted attack and of the worst case ``"All"``.
        tolerance: fraction of the correctly classified samples a check tolerates before firing.
    """
    correct = data["correct"]
    n_correct = int(correct.sum())
    limit = tolerance * n_correct
    norms = data["norms"]
    gradient = {"iterative", "minimal"}
    checks = [
        beats_check("one_step_beats_iterative", norms, roles, grid, gradient, {"one_step"}, limit),
        beats_check("black_box_beats_white_box", norms, roles, grid, gradient | {"one_step"}, {"black_box"}, limit),
    ]
    short = []
    for a, name in enumerate(names):
        if not unbounded[a]:
            continue
        attacked = data["attacked"][:, a, 0]
        if int(attacked.sum()):
            rate = float((data["fooled"][:, a, 0] & attacked).sum()) / float(attacked.sum())
            if rate < 1.0 - tolerance:
                short.append(f"{name} fools {100 * rate:.1f}% of the correctly classified samples")
    detail = "; ".join(short) if short else "every unbounded attack fools (almost) every sample"
    if not any(unbounded):
        detail = "not checked: the suite has no unbounded minimal-norm attack"
    name = "unbounded_below_full_success"
    checks.append(MaskingCheck(name, bool(short), detail, ADVICE[name]))
    checks.append(curve_check(curves, grid, tolerance))
    zero = int((data["zero_grad"] & correct).sum())
    name = "zero_gradients"
    detail = f"{zero} of {n_correct} correctly classified samples have an exactly zero input gradient"
    checks.append(MaskingCheck(name, zero > limit and zero > 0, detail, ADVICE[name]))
    unstable = int(data["unstable"].sum())
    name = "random_outputs"
    checks.append(MaskingCheck(name, unstable > 0,
                               f"{unstable} of {correct.numel()} samples get different outputs from two forward passes",
                               ADVICE[name]))  # fmt: skip
    return checks
