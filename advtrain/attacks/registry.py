"""Attack registry: ``register_attack``, ``create_attack``, ``list_attacks`` and the frozen spec of each attack."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from advtrain.attacks.base import Attack


class AttackKind(str, Enum):
    """Budgeted attacks maximise a loss inside an ε-ball; minimal-norm attacks search the smallest
    perturbation that changes the decision."""

    BUDGETED = "budgeted"
    MINIMAL = "minimal"


#: The roles an attack can take in an evaluation suite, in cascade order (:mod:`advtrain.evaluation.suites`):
#: minimal-norm attacks first, once per sample; then multi-step gradient attacks, single-step ones and gradient-free
#: ones at every ε (the last two feed gradient-masking checks).
SUITE_ROLES = ("minimal", "iterative", "one_step", "black_box")


class EpsMeaning(str, Enum):
    """What an attack's ``eps`` means to the evaluation.

    * ``BUDGET``: the radius of the ball it stays in (every budgeted attack); the evaluation calls it at each ε.
    * ``OPTIONAL_BUDGET``: a minimal-norm attack that an ``eps`` restricts to a ball (FAB: without one it searches
      the whole box; AutoAttack runs it restricted).
    * ``INITIAL``: only the starting radius of a minimal-norm search that stops at its own ``max_eps`` (AN-PGD): it is
      never unbounded.
    * ``NONE``: an unbudgeted minimal-norm attack, which takes no ``eps``.
    """

    BUDGET = "budget"
    OPTIONAL_BUDGET = "optional_budget"
    INITIAL = "initial"
    NONE = "none"


@dataclass(frozen=True)
class AttackSpec:
    """What the framework needs to know about an attack without running it.

    Attributes:
        name: the registry name.
        kind: budgeted or minimal-norm.
        norms: the threat norms it supports.
        targeted: whether it has a targeted mode.
        stochastic: whether it draws at random (a ``seed`` makes it reproducible).
        paper: the paper it implements.
        role: its default role in an evaluation suite, one of :data:`SUITE_ROLES` (default: ``"minimal"`` for a
            minimal-norm attack, else ``"iterative"``).
        eps_meaning: what its ``eps`` means (default: :attr:`EpsMeaning.BUDGET` for a budgeted attack,
            :attr:`EpsMeaning.NONE` for a minimal-norm one).
        fusable: several of its calls can run as one on a concatenated batch: the class has
            ``shares_passes_with(other)`` and ``call_fused(model, inputs, labels, *, segments, eps)`` (APGD).
        full_suite: the hyperparameters the ``full`` suite runs it with (``{}``: its defaults), so that a new attack
            joins the suite from its spec alone; ``None`` (the default): the suite tables say whether and how it runs
            (:mod:`advtrain.attacks.suites`).
    """

    name: str
    kind: AttackKind
    norms: tuple[str, ...]
    targeted: bool
    stochastic: bool
    paper: str = ""
    role: str | None = None
    eps_meaning: EpsMeaning | str | None = None
    fusable: bool = False
    full_suite: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        minimal = self.kind is AttackKind.MINIMAL
        role = self.role or ("minimal" if minimal else "iterative")
        if role not in SUITE_ROLES or (role == "minimal") != minimal:
            allowed = ("minimal",) if minimal else SUITE_ROLES[1:]
            raise ValueError(f"AttackSpec {self.name!r}: role must be one of {allowed} for a {self.kind.value} "
                             f"attack, got {role!r}.")  # fmt: skip
        meaning = EpsMeaning(self.eps_meaning or (EpsMeaning.NONE if minimal else EpsMeaning.BUDGET))
        if (meaning is EpsMeaning.BUDGET) == minimal:
            allowed = [m.value for m in EpsMeaning if m is not EpsMeaning.BUDGET] if minimal else ["budget"]
            raise ValueError(f"AttackSpec {self.name!r}: eps_meaning must be one of {allowed} for a {self.kind.value} "
                             f"attack, got {meaning.value!r}.")  # fmt: skip
        object.__setattr__(self, "role", role)  # frozen: the defaults are filled in once, here
        object.__setattr__(self, "eps_meaning", meaning)


_REGISTRY: dict[str, tuple[AttackSpec, type[Attack]]] = {}
A = TypeVar("A", bound="type[Attack]")


def register_attack(spec: AttackSpec) -> Callable[[A], A]:
    """Class decorator registering an attack under ``spec.name``.

    Raises:
        ValueError: if the name is taken.
    """

    def wrap(cls: A) -> A:
        if spec.name in _REGISTRY:
            raise ValueError(f"An attack named {spec.name!r} is already registered.")
        missing = [m for m in ("call_fused", "shares_passes_with") if not callable(getattr(cls, m, None))]
        if spec.fusable and missing:
            raise TypeError(f"Attack {spec.name!r} is declared fusable but has no {' or '.join(missing)}.")
        cls.spec = spec
        _REGISTRY[spec.name] = (spec, cls)
        return cls

    return wrap


def create_attack(name: str, **hyperparameters) -> Attack:
    """Builds a registered attack, e.g. ``create_attack("pgd", norm="linf", eps=8/255, steps=20)``.

    Raises:
        ValueError: for an unknown name (listing the registered ones) or a hyperparameter the attack does not
            take (listing the ones it does).
    """
    cls = attack_class(name)
    accepted = list(cls.hyperparameters())
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ValueError(f"Attack {name!r} does not take {unknown}; it takes {accepted}.")
    return cls(**hyperparameters)


def attack_class(name: str) -> type[Attack]:
    """The class registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown attack {name!r}; registered attacks are {sorted(_REGISTRY)}.")
    return _REGISTRY[name][1]


def list_attacks() -> dict[str, AttackSpec]:
    """Registered attack names mapped to their specs, sorted by name."""
    return {name: _REGISTRY[name][0] for name in sorted(_REGISTRY)}
