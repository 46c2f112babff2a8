"""Evaluation suites as data: which registered attacks to run, with which budgets, in which role.

A suite is a list of :class:`SuiteEntry`. :func:`build_suite` turns it into attacks for one threat model, keeping
only the attacks whose registry spec supports the norm. The role of an attack decides where it runs in the cascade
and which gradient-masking checks it feeds (:mod:`advtrain.evaluation.masking`):

* ``minimal``: minimal-norm attacks, run once per sample; the robust accuracy at every ε is read off their norms.
* ``iterative``: multi-step gradient attacks at each ε of the grid.
* ``one_step``: single-step gradient attacks (FGSM/FGM), after the iterative ones: breaking samples that they
  missed is a sign of gradient masking.
* ``black_box``: gradient-free attacks (Square), last: breaking samples that every gradient attack missed is a
  sign of gradient masking.
* ``escalation``: attacks an adaptive evaluation adds when a masking check fires
  (:mod:`advtrain.evaluation.escalation`); they run only on the samples the suite left standing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import _REGISTRY, AttackKind, create_attack, list_attacks
from advtrain.errors import InvalidConfigError
from advtrain.threat.norms import Norm

ROLES = ("minimal", "iterative", "one_step", "black_box", "escalation")


@dataclass(frozen=True)
class SuiteEntry:
    """One attack of a suite.

    Attributes:
        label: name in reports and logged keys (e.g. ``"apgd-ce"``).
        attack: registered attack name (see :func:`advtrain.attacks.list_attacks`).
        kwargs: hyperparameters; ``norm`` and ``eps`` are filled in by :func:`build_suite` for attacks that take
            them (a minimal-norm attack gets no ``eps``: it is unbounded).
        role: ``"minimal"``, ``"iterative"``, ``"one_step"`` or ``"black_box"`` (see the module docstring).
        unbounded: a minimal-norm attack searching the whole box, expected to fool every sample (AN-PGD stops at
            its ``max_eps`` and is not).
        budgeted: run a minimal-norm attack as a budgeted one, restricted to ε at each ε of the grid (AutoAttack's
            FAB): it gets ``eps`` and counts only perturbations within it.
        per_norm: hyperparameters that depend on the norm, e.g. ``{"l2": {"max_eps": 10.0}}``.
    """

    label: str
    attack: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    role: str = "iterative"
    unbounded: bool = True
    per_norm: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    budgeted: bool = False


@dataclass
class EvalAttack:
    """An attack ready for the evaluation: its report label, the attack object, its role and kind."""

    name: str
    attack: Attack
    role: str
    minimal: bool
    unbounded: bool = False
    config: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Unknown role {self.role!r} for attack {self.name!r}; allowed roles are {ROLES}.")
        self.config = self.config or repr(self.attack)


_MINIMAL = [
    SuiteEntry("deepfool", "deepfool", {"steps": 50}, role="minimal"),
    SuiteEntry("cw_l2", "cw_l2", {"steps": 100, "binary_search_steps": 5, "initial_const": 0.1}, role="minimal"),
    SuiteEntry("ddn", "ddn", {"steps": 100}, role="minimal"),
    SuiteEntry("tr", "tr", {"steps": 300}, role="minimal"),
    SuiteEntry("strattack", "strattack", {"steps": 50, "binary_search_steps": 3}, role="minimal"),
    SuiteEntry(
        "anpgd",
        "anpgd",
        {"steps": 20, "bisection_steps": 10},
        role="minimal",
        unbounded=False,
        per_norm={"linf": {"max_eps": 1.0}, "l2": {"max_eps": 10.0}},
    ),  # fmt: skip
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
_SQUARE = SuiteEntry("square", "square", {"steps": 5000, "p_init": 0.8}, role="black_box")

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
        SuiteEntry("fab", "fab", {"steps": 100}, role="minimal"),
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
        SuiteEntry("fgsm", "fgsm", role="one_step"),
        SuiteEntry("fgm", "fgm", role="one_step"),
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


def suite_note(name: str) -> str:
    """One line saying what the built-in suite ``name`` (or an alias) runs, for reports."""
    canonical = ALIASES.get(name, name)
    note = NOTES.get(canonical, "")
    return f"{name} = {note}" if name != canonical else note


def list_suites() -> list[str]:
    """Names of the built-in suites (aliases included)."""
    return sorted([*SUITES, *ALIASES])


def build_suite(
    suite: str | list[SuiteEntry],
    *,
    norm: str,
    eps: float,
    seed: int = 0,
    overrides: Mapping[str, Mapping] | None = None,
) -> list[EvalAttack]:
    """Builds the attacks of a suite for one threat model, skipping those whose spec does not support ``norm``.

    Args:
        suite: a name of :data:`SUITES` or a list of entries.
        norm: threat norm (``"linf"``, ``"l2"``).
        eps: the budget the budgeted attacks are configured with (the evaluation calls them at every ε of its grid).
        seed: seed of the stochastic attacks.
        overrides: per-label hyperparameters replacing the suite's (e.g. ``{"square": {"steps": 100}}``).

    Returns:
        The attacks, in suite order.

    Raises:
        ValueError: for an unknown suite name, an ``overrides`` key that is not one of its labels, or when no attack
            of the suite supports the norm.
    """
    if isinstance(suite, str):
        if suite not in SUITES and suite not in ALIASES:
            raise ValueError(f"Unknown suite {suite!r}; the suites are {list_suites()}.")
        entries = SUITES[ALIASES.get(suite, suite)]
    else:
        entries = list(suite)
    norm = Norm.parse(norm).value
    unknown = sorted(set(overrides or {}) - {entry.label for entry in entries})
    if unknown:
        raise InvalidConfigError(
            f"overrides: {unknown[0]!r} is not an attack of this suite; its labels are "
            f"{', '.join(entry.label for entry in entries)} (e.g. --overrides '{{{entries[0].label}: {{steps: 10}}}}')."
        )
    specs = list_attacks()
    built = []
    for entry in entries:
        if entry.attack not in specs:
            raise ValueError(
                f"Suite entry {entry.label!r} names unknown attack {entry.attack!r}; known: {sorted(specs)}."
            )
        spec = specs[entry.attack]
        if norm not in spec.norms:
            continue
        accepted = _REGISTRY[entry.attack][1].hyperparameters()
        kwargs = {**entry.kwargs, **entry.per_norm.get(norm, {}), **(overrides or {}).get(entry.label, {})}
        if "norm" in accepted:
            kwargs.setdefault("norm", norm)
        # AN-PGD's eps is its initial budget; a minimal-norm attack run as budgeted is restricted to it.
        if spec.kind is AttackKind.BUDGETED or entry.budgeted or entry.attack == "anpgd":
            kwargs.setdefault("eps", eps)
        if spec.stochastic and "seed" in accepted:
            kwargs.setdefault("seed", seed)
        wrong = sorted(set(kwargs) - set(accepted) - {"self"})
        if wrong:
            raise InvalidConfigError(
                f"overrides: {entry.label} has no hyperparameter {wrong[0]!r}; it accepts "
                f"{', '.join(p for p in accepted if p != 'self')}."
            )
        attack = create_attack(entry.attack, **kwargs)
        minimal = spec.kind is AttackKind.MINIMAL and not entry.budgeted
        built.append(EvalAttack(entry.label, attack, entry.role, minimal, entry.unbounded and minimal))
    if not built:
        raise ValueError(f"No attack of suite {suite!r} supports the {norm} threat model.")
    return built


def wrap_attacks(attacks: Mapping[str, Attack]) -> list[EvalAttack]:
    """Wraps explicitly given attacks (name → attack) for the evaluation, inferring each role from its spec:
    minimal-norm, gradient-free (``square``), one-step (``steps == 1``) or iterative."""
    wrapped = []
    for name, attack in attacks.items():
        spec = getattr(attack, "spec", None)
        minimal = spec is not None and spec.kind is AttackKind.MINIMAL
        if minimal:
            role = "minimal"
        elif spec is not None and spec.name == "square":
            role = "black_box"
        elif getattr(attack, "steps", None) == 1:
            role = "one_step"
        else:
            role = "iterative"
        unbounded = minimal and getattr(attack, "eps", None) is None and spec.name != "anpgd"
        wrapped.append(EvalAttack(name, attack, role, minimal, unbounded))
    return wrapped
