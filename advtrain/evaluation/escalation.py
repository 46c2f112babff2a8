"""Escalation instead of a warning: when a gradient-masking check fires, attack the samples still robust again, with
attacks chosen for the failure the check points at.

AutoAttack's ``checks.py`` only warns. Athalye, Carlini and Wagner (ICML 2018) say what a careful evaluator does next:
gradient-free attacks with a larger budget where gradients are masked, attacks through a differentiable surrogate
(BPDA-style) where they are shattered or zero, and Expectation over Transformation where the model is random.
:func:`plan_escalation` maps each check to such attacks:

* ``black_box_beats_white_box``, ``one_step_beats_iterative``, ``zero_gradients``, ``unbounded_below_full_success``
  → ``square-more`` (Square with 10,000 queries and 2 restarts, another seed) and ``transfer`` (APGD-DLR on a
  Gaussian-smoothed copy of the model, :class:`~advtrain.attacks.Transfer`).
* ``random_outputs`` → ``apgd-ce-eot`` and ``apgd-dlr-eot`` (APGD with gradients averaged over 20 draws, as
  AutoAttack's ``rand`` version).

The escalation attacks run only on the samples the suite left standing (per ε), and join the report as attacks of
role ``"escalation"``: the worst case includes them, and the report's ``escalation`` entry says which check fired,
what ran and how much each step changed. The responses are data (:data:`advtrain.attacks.suites.RESPONSES`,
re-exported here as :data:`RESPONSES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from advtrain.attacks.suites import RESPONSES, SuiteEntry
from advtrain.errors import InvalidConfigError
from advtrain.evaluation.suites import EvalAttack, build_suite
from advtrain.threat.norms import Norm

#: Suites that escalate by default (``adaptive=None``).
ADAPTIVE_SUITES = ("autoattack", "full")


def plan_escalation(
    report, *, threat: Norm, eps: float, seed: int, options: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[list[EvalAttack], dict[str, Any] | None]:
    """The escalation attacks for the checks that fired in ``report`` (a
    :class:`~advtrain.evaluation.report.RobustnessReport` of the suite), and what triggered them.

    Args:
        report: the suite's report (its masking checks decide).
        threat, eps: the threat model (the attacks are built for it; those that do not support the norm are left
            out, e.g. Square under L1).
        seed: the evaluation's seed; the escalation attacks draw with ``seed + 1`` so that they do not repeat the
            suite's random draws.
        options: per-label hyperparameters replacing the defaults (e.g. ``{"square-more": {"steps": 2000}}``).

    Returns:
        ``(attacks, plan)``: no attacks and ``None`` when nothing fired (or nothing applies); else the attacks and
        ``{"triggered_by": [...], "attacks": [...]}``.
    """
    fired = [c.name for c in report.checks if c.fired and c.name in RESPONSES]
    entries: list[SuiteEntry] = []
    for name in fired:
        entries += [e for e in RESPONSES[name] if e not in entries]
    if not entries:
        return [], None
    known = {e.label for entries_ in RESPONSES.values() for e in entries_}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise InvalidConfigError(f"escalation_options: {unknown[0]!r} is not an escalation attack; they are "
                                 f"{', '.join(sorted(known))}.")  # fmt: skip
    options = {k: v for k, v in (options or {}).items() if k in {e.label for e in entries}}
    try:
        attacks = build_suite(entries, norm=threat.value, eps=eps, seed=seed + 1, overrides=options)
    except ValueError:  # no escalation attack supports this norm
        return [], None
    return attacks, {"triggered_by": fired, "attacks": [a.name for a in attacks]}


def describe_escalation(plan: Mapping[str, Any], report, before) -> dict[str, Any]:
    """The report's ``escalation`` entry: the checks that triggered it, and per escalation attack its configuration
    and the worst-case robust accuracy at the main ε before and after it (the attacks run in order, each on the
    samples still standing, so each step's "after" is the next one's "before")."""
    robust = before.summary["robust_accuracy_all"]
    steps = []
    for name in plan["attacks"]:
        attack = report.summary["attacks"][name]
        after = min(robust, attack["robust_accuracy"]) if report.summary["cascade"] else attack["robust_accuracy"]
        steps.append({"attack": name, "config": attack["config"], "attacked": attack["attacked"],
                      "robust_before": robust, "robust_after": after, "seconds": attack["seconds"]})  # fmt: skip
        robust = after
    return {
        "triggered_by": list(plan["triggered_by"]),
        "robust_accuracy_before": before.summary["robust_accuracy_all"],
        "robust_accuracy_after": report.summary["robust_accuracy_all"],
        "steps": steps,
    }


__all__ = ["ADAPTIVE_SUITES", "RESPONSES", "describe_escalation", "plan_escalation"]
