"""Evaluation suites as data: which registered attacks to run, with which hyperparameters.

This module only holds tables (:class:`SuiteEntry` lists, notes, aliases, the escalation's responses); building the
attacks for a threat model and running them is :mod:`advtrain.evaluation`'s (:func:`~advtrain.evaluation.build_suite`),
which reads what it needs about each attack from its registry spec (role, what ``eps`` means, fusion) and names
none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SuiteEntry:
    """One attack of a suite.

    Attributes:
        label: name in reports and logged keys (e.g. ``"apgd-ce"``).
        attack: registered attack name (see :func:`advtrain.attacks.list_attacks`).
        kwargs: hyperparameters; ``norm`` and ``eps`` are filled in by :func:`~advtrain.evaluation.build_suite` for
            attacks that take them (a minimal-norm attack gets no ``eps`` unless its spec says ``eps`` is its initial
            radius: it is unbounded).
        role: ``"minimal"``, ``"iterative"``, ``"one_step"``, ``"black_box"`` or ``"escalation"`` (see
            :mod:`advtrain.evaluation.suites`); default: the attack spec's ``role`` (``"iterative"`` for a
            minimal-norm attack run ``budgeted``).
        unbounded: ``False`` keeps a minimal-norm attack out of the "unbounded attacks fool every sample" check;
            an attack whose spec says its ``eps`` is only an initial radius (AN-PGD, which stops at its ``max_eps``)
            or that is given a budget is never unbounded.
        budgeted: run a minimal-norm attack as a budgeted one, restricted to ε at each ε of the grid (AutoAttack's
            FAB): it gets ``eps`` and counts only perturbations within it.
        per_norm: hyperparameters that depend on the norm, e.g. ``{"l2": {"max_eps": 10.0}}``.
    """

    label: str
    attack: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    role: str | None = None
    unbounded: bool = True
    per_norm: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    budgeted: bool = False


_MINIMAL = [
    SuiteEntry("deepfool", "deepfool", {"steps": 50}),
    SuiteEntry("cw_l2", "cw_l2", {"steps": 100, "binary_search_steps": 5, "initial_const": 0.1}),
    SuiteEntry("ddn", "ddn", {"steps": 100}),
    SuiteEntry("tr", "tr", {"steps": 300}),
    SuiteEntry("strattack", "strattack", {"steps": 50, "binary_search_steps": 3}),
    SuiteEntry(
        "anpgd",
        "anpgd",
        {"steps": 20, "bisection_steps": 10},
        per_norm={"linf": {"max_eps": 1.0}, "l2": {"max_eps": 10.0}},
    ),
]

# AutoAttack (Croce & Hein, ICML 2020) as its official code runs it (fra31/auto-attack, ``pyautoattack``): each attack
# on the points still robust, APGD with 100 iterations, APGD-T and FAB-T over the 9 highest non-true classes (fewer
# when the model has fewer classes), Square with 5,000 queries, p_init 0.8 and the unscaled p schedule; in its L1
# version APGD-CE takes 5 restarts and APGD and APGD-T the 3ε/2ε/ε schedule ("use_largereps"), APGD-T 5 targets.
# FAB is a minimal-norm attack; AutoAttack runs it restricted to ε, so it takes the budgeted attacks' place here.
_APGD_CE = SuiteEntry("apgd-ce", "apgd", {"loss": "ce", "steps": 100},
                      per_norm={"l1": {"restarts": 5, "use_largereps": True}})  # fmt: skip
_APGD_T = SuiteEntry(
    "apgd-t",
    "apgd",
    {"loss": "dlr-targeted", "steps": 100, "n_target_classes": 9},
    per_norm={"l1": {"n_target_classes": 5, "use_largereps": True}},
)
_FAB_T = SuiteEntry("fab-t", "fab", {"steps": 100, "n_target_classes": 9}, budgeted=True)
_SQUARE = SuiteEntry("square", "square", {"steps": 5000, "p_init": 0.8})

#: The built-in suites:
#:
#: * ``quick``: PGD-20, for frequent checks during training.
#: * ``apgd``: APGD-CE and APGD-DLR (the two APGD losses of AutoAttack, untargeted; this suite was called
#:   ``standard`` before it became AutoAttack's standard version).
#: * ``autoattack`` (also ``standard``): AutoAttack's standard version, for reporting numbers comparable with the
#:   official code and the RobustBench leaderboard.
#: * ``autoattack-plus``: AutoAttack's ``plus`` version (APGD-CE/DLR and FAB with 5 restarts, Square, APGD-T, FAB-T).
#: * ``autoattack-rand``: AutoAttack's ``rand`` version, for randomized defences: APGD-CE/DLR with EOT over 20 draws.
#: * ``full``: every attack of the zoo that supports the norm, a strict superset of ``autoattack``, for auditing a
#:   defence.
SUITES: dict[str, list[SuiteEntry]] = {
    "quick": [SuiteEntry("pgd20", "pgd", {"steps": 20, "restarts": 1})],
    "apgd": [
        SuiteEntry("apgd-ce", "apgd", {"loss": "ce", "steps": 100}),
        SuiteEntry("apgd-dlr", "apgd", {"loss": "dlr", "steps": 100}),
    ],
    "autoattack": [_APGD_CE, _APGD_T, _FAB_T, _SQUARE],
    "autoattack-plus": [
        SuiteEntry("apgd-ce", "apgd", {"loss": "ce", "steps": 100, "restarts": 5}),
        SuiteEntry("apgd-dlr", "apgd", {"loss": "dlr", "steps": 100, "restarts": 5}),
        SuiteEntry("fab", "fab", {"steps": 100, "restarts": 5}, budgeted=True),
        _SQUARE,
        _APGD_T,
        _FAB_T,
    ],
    "autoattack-rand": [
        SuiteEntry("apgd-ce", "apgd", {"loss": "ce", "steps": 100, "eot_iter": 20}),
        SuiteEntry("apgd-dlr", "apgd", {"loss": "dlr", "steps": 100, "eot_iter": 20}),
    ],
    "full": [
        *_MINIMAL,
        SuiteEntry("fab", "fab", {"steps": 100}),
        SuiteEntry("bim", "bim", {"steps": 20}),
        SuiteEntry("pgd", "pgd", {"steps": 40, "restarts": 1}),
        SuiteEntry(
            "apgd-ce",
            "apgd",
            {"loss": "ce", "steps": 100, "restarts": 2},
            per_norm={"l1": {"restarts": 5, "use_largereps": True}},
        ),  # fmt: skip
        SuiteEntry("apgd-dlr", "apgd", {"loss": "dlr", "steps": 100, "restarts": 2}),
        _APGD_T,
        _FAB_T,
        SuiteEntry("fgsm", "fgsm"),
        SuiteEntry("fgm", "fgm"),
        _SQUARE,
    ],
}
#: Other names of built-in suites.
ALIASES = {"standard": "autoattack"}

#: What a report says a suite is (one line).
NOTES = {
    "quick": "PGD-20 (a quick check, not a reportable robust accuracy)",
    "apgd": "APGD-CE + APGD-DLR, untargeted (AutoAttack's untargeted APGD attacks only: weaker than AutoAttack)",
    "autoattack": "AutoAttack, standard version: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 "
    "queries), each on the points still robust",
    "autoattack-plus": "AutoAttack, plus version: APGD-CE/APGD-DLR (5 restarts), FAB (5 restarts), Square (5,000 "
    "queries), APGD-T and FAB-T (9 targets)",
    "autoattack-rand": "AutoAttack, rand version: APGD-CE and APGD-DLR with EOT over 20 draws",
    "full": "every attack of advtrain's zoo for this norm, AutoAttack's standard version included",
}

#: The attack of ``advtrain evaluate`` without ``--suite`` or ``--attacks``: PGD with the ``--steps`` and
#: ``--restarts`` flags (its label is made from the attack, e.g. ``pgd50-linf``).
DEFAULT_ATTACK = SuiteEntry("pgd", "pgd", {"seed": 0})

# The escalation's attacks (:mod:`advtrain.evaluation.escalation`): gradient-free with a larger budget, through a
# smoothed surrogate, and with EOT for random outputs (Athalye, Carlini and Wagner, ICML 2018).
_MORE_SQUARE = SuiteEntry("square-more", "square", {"steps": 10000, "restarts": 2, "p_init": 0.8}, role="escalation")
_TRANSFER = SuiteEntry("transfer", "transfer", {"steps": 100, "loss": "dlr"}, role="escalation")
_EOT = [
    SuiteEntry("apgd-ce-eot", "apgd", {"loss": "ce", "steps": 100, "eot_iter": 20}, role="escalation"),
    SuiteEntry("apgd-dlr-eot", "apgd", {"loss": "dlr", "steps": 100, "eot_iter": 20}, role="escalation"),
]

#: Which escalation attacks each gradient-masking check calls for.
RESPONSES: dict[str, list[SuiteEntry]] = {
    "black_box_beats_white_box": [_MORE_SQUARE, _TRANSFER],
    "one_step_beats_iterative": [_MORE_SQUARE, _TRANSFER],
    "zero_gradients": [_MORE_SQUARE, _TRANSFER],
    "unbounded_below_full_success": [_MORE_SQUARE, _TRANSFER],
    "random_outputs": _EOT,
}

__all__ = ["ALIASES", "DEFAULT_ATTACK", "NOTES", "RESPONSES", "SUITES", "SuiteEntry"]
