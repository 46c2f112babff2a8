"""Attack registry: ``register_attack``, ``create_attack``, ``list_attacks`` and the frozen spec of each attack."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from advtrain.attacks.base import Attack


class AttackKind(str, Enum):
    """Budgeted attacks maximise a loss inside an ε-ball; minimal-norm attacks search the smallest
    perturbation that changes the decision."""

    BUDGETED = "budgeted"
    MINIMAL = "minimal"


@dataclass(frozen=True)
class AttackSpec:
    """What the framework needs to know about an attack without running it."""

    name: str
    kind: AttackKind
    norms: tuple[str, ...]
    targeted: bool
    stochastic: bool
    paper: str = ""


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
    if name not in _REGISTRY:
        raise ValueError(f"Unknown attack {name!r}; registered attacks are {sorted(_REGISTRY)}.")
    cls = _REGISTRY[name][1]
    accepted = list(cls.hyperparameters())
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ValueError(f"Attack {name!r} does not take {unknown}; it takes {accepted}.")
    return cls(**hyperparameters)


def list_attacks() -> dict[str, AttackSpec]:
    """Registered attack names mapped to their specs, sorted by name."""
    return {name: _REGISTRY[name][0] for name in sorted(_REGISTRY)}
