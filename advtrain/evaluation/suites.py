"""Evaluation suites: the attacks of a suite built for one threat model, each in its role.

The suites themselves are data about attacks and live in :mod:`advtrain.attacks.suites` (re-exported here:
:data:`SUITES`, :class:`SuiteEntry`, ...). :func:`build_suite` turns a suite into attacks for one threat model, keeping
only the attacks whose registry spec supports the norm, and reads everything else it needs from the spec (the
default role, what ``eps`` means); this module names no attack. The role of an attack decides where it runs in the
cascade and which gradient-masking checks it feeds (:mod:`advtrain.evaluation.masking`):

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
from dataclasses import dataclass

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import (
    SUITE_ROLES,
    AttackKind,
    AttackSpec,
    EpsMeaning,
    attack_class,
    create_attack,
    list_attacks,
)
from advtrain.attacks.suites import ALIASES, NOTES, SUITES, SuiteEntry
from advtrain.errors import InvalidConfigError
from advtrain.threat.norms import Norm

#: Every role, in cascade order: the attacks' own (:data:`advtrain.attacks.registry.SUITE_ROLES`), then the
#: escalation's.
ROLES = (*SUITE_ROLES, "escalation")


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

    @property
    def fusable(self) -> bool:
        """Whether calls of this attack can be fused (its spec says so: it has ``call_fused`` and
        ``shares_passes_with``)."""
        spec = getattr(self.attack, "spec", None)
        return spec is not None and spec.fusable


def _unbounded(spec: AttackSpec | None, budget: float | None) -> bool:
    """Whether an attack searches the whole box, hence must eventually fool every sample: a minimal-norm attack not
    restricted by a budget, unless its ``eps`` is only the initial radius of a search that stops (AN-PGD)."""
    return (
        spec is not None
        and spec.kind is AttackKind.MINIMAL
        and spec.eps_meaning is not EpsMeaning.INITIAL
        and budget is None
    )


def suite_note(name: str) -> str:
    """One line saying what the built-in suite ``name`` (or an alias) runs, for reports."""
    canonical = ALIASES.get(name, name)
    note = NOTES.get(canonical, "")
    return f"{name} = {note}" if name != canonical else note


def list_suites() -> list[str]:
    """Names of the built-in suites (aliases included)."""
    return sorted([*SUITES, *ALIASES])


def suite_entries(name: str) -> list[SuiteEntry]:
    """The entries of the built-in suite ``name`` (or an alias): its table in :data:`SUITES`, and for ``full`` also
    every registered attack whose spec declares ``full_suite`` hyperparameters and that the table does not list (a
    new attack joins ``full`` from its spec alone).

    Raises:
        ValueError: for an unknown name, listing the suites.
    """
    if name not in SUITES and name not in ALIASES:
        raise ValueError(f"Unknown suite {name!r}; the suites are {list_suites()}.")
    canonical = ALIASES.get(name, name)
    entries = list(SUITES[canonical])
    if canonical == "full":
        listed = {entry.attack for entry in entries}
        entries += [SuiteEntry(spec.name, spec.name, dict(spec.full_suite)) for spec in list_attacks().values()
                    if spec.full_suite is not None and spec.name not in listed]  # fmt: skip
    return entries


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
        entries = suite_entries(suite)
    else:
        entries = list(suite)
    norm = Norm.parse(norm).value
    unknown = sorted(set(overrides or {}) - {entry.label for entry in entries})
    if unknown:
        raise InvalidConfigError(
            f"overrides: {unknown[0]!r} is not an attack of this suite; its labels are "
            f"{', '.join(entry.label for entry in entries)} (e.g. --overrides '{{{entries[0].label}: {{steps: 10}}}}')."
        )
    built = [_build_entry(entry, norm, eps, seed, (overrides or {}).get(entry.label, {})) for entry in entries]
    built = [attack for attack in built if attack is not None]
    if not built:
        raise ValueError(f"No attack of suite {suite!r} supports the {norm} threat model.")
    return built


def _build_entry(entry: SuiteEntry, norm: str, eps: float, seed: int, override: Mapping) -> EvalAttack | None:
    """One suite entry built for the threat model, or ``None`` when its attack does not support ``norm``.

    Raises:
        ValueError: for an unknown attack, or a hyperparameter the attack does not take (an InvalidConfigError).
    """
    specs = list_attacks()
    if entry.attack not in specs:
        raise ValueError(f"Suite entry {entry.label!r} names unknown attack {entry.attack!r}; known: {sorted(specs)}.")
    spec = specs[entry.attack]
    if norm not in spec.norms:
        return None
    accepted = attack_class(entry.attack).hyperparameters()
    kwargs = {**entry.kwargs, **entry.per_norm.get(norm, {}), **override}
    if "norm" in accepted:
        kwargs.setdefault("norm", norm)
    # A budget bounds a budgeted attack (and a minimal-norm one run as budgeted); some minimal-norm attacks start
    # their search at it (AN-PGD); the others take none.
    if spec.eps_meaning in (EpsMeaning.BUDGET, EpsMeaning.INITIAL) or entry.budgeted:
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
    role = entry.role or ("iterative" if entry.budgeted else spec.role)
    unbounded = entry.unbounded and minimal and _unbounded(spec, kwargs.get("eps"))
    return EvalAttack(entry.label, attack, role, minimal, unbounded)


def wrap_attacks(attacks: Mapping[str, Attack]) -> list[EvalAttack]:
    """Wraps explicitly given attacks (name → attack) for the evaluation, each in its spec's role (an iterative
    attack configured with ``steps == 1`` is one-step; an attack without a spec is iterative or one-step)."""
    wrapped = []
    for name, attack in attacks.items():
        spec = getattr(attack, "spec", None)
        minimal = spec is not None and spec.kind is AttackKind.MINIMAL
        role = spec.role if spec is not None else "iterative"
        if role == "iterative" and getattr(attack, "steps", None) == 1:
            role = "one_step"
        unbounded = minimal and _unbounded(spec, getattr(attack, "eps", None))
        wrapped.append(EvalAttack(name, attack, role, minimal, unbounded))
    return wrapped


__all__ = ["ALIASES", "NOTES", "ROLES", "SUITES", "EvalAttack", "SuiteEntry", "build_suite", "list_suites",
           "suite_entries", "suite_note", "wrap_attacks"]  # fmt: skip
