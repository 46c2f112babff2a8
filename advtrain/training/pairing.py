"""Which maximizers and objectives fit together: checked when :class:`~advtrain.training.AdversarialTraining` is built.

Each maximizer declares the :class:`~advtrain.maximizers.Perturbation` type it produces
(:attr:`InnerMaximizer.produces <advtrain.maximizers.InnerMaximizer.produces>`), each objective the types it reads
(:attr:`Objective.reads <advtrain.training.objectives.Objective.reads>`). A pair fits when the maximizer's type is one
of the objective's, exactly: a base type would lack fields the objective needs (``MMALoss`` without MMA's masks), a
subtype carries fields it would ignore (MMA's masks or bilateral's soft labels under a plain cross-entropy). A maximizer
that produces no perturbation (``produces = None``: a whole training step with its own loss, as YOPO and Free AT) takes
no objective: only the default one is accepted, since it would not be used.

Pairs that are well defined stay allowed even where a paper used another: ``TRADESLoss`` (CE(x) + β·KL(f(x) ‖ f(x')))
and ``MARTLoss`` on any maximizer's x' (MART's official code pairs it with cross-entropy PGD), ``AdversarialCE`` on
TRADES's KL-maximising x'.
"""

from __future__ import annotations

import dataclasses
import inspect

from advtrain.errors import InvalidConfigError
from advtrain.maximizers.base import InnerMaximizer, Perturbation
from advtrain.training.objectives import AdversarialCE, Objective

__all__ = ["check_pairing", "objectives_for", "maximizers_for"]


def check_pairing(maximizer: InnerMaximizer, objective: Objective | None) -> None:
    """Raises :class:`~advtrain.errors.InvalidConfigError` (one line, naming both classes and each one's partners)
    when ``objective`` (``None``: the default, :class:`~advtrain.training.AdversarialCE`) does not fit ``maximizer``.

    Example:
        >>> check_pairing(PGD(), MMALoss())  # doctest: +SKIP
        InvalidConfigError: model.objective: MMALoss does not pair with model.maximizer PGD: MMALoss needs correct,
        use_adv, which PGD does not produce (MMALoss reads MarginPerturbation; PGD produces Perturbation). MMALoss pairs
        with MMA; PGD pairs with AdversarialCE, MARTLoss, MixedCE, SoftLabelCE, TRADESLoss, GradAlignLoss(base=one of
        these).
    """
    name = type(maximizer).__name__
    produced = maximizer.produces
    if produced is None:
        if objective is None or _is_plain_cross_entropy(objective):
            return
        raise InvalidConfigError(
            f"model.objective: {name} is a whole training step with its own loss (produces=None) and takes no "
            f"objective: {type(objective).__name__} would be ignored. Remove model.objective (or leave it at the "
            "default, advtrain.training.AdversarialCE without label smoothing)."
        )
    objective = objective if objective is not None else AdversarialCE()
    reads = objective.reads
    if produced in reads:
        return
    label = type(objective).__name__
    why = _mismatch(label, reads, name, produced)
    maximizers = _names(maximizers_for(reads)) or "no advtrain maximizer"
    objectives = _objective_names(produced) or "no advtrain objective"
    raise InvalidConfigError(
        f"model.objective: {label} does not pair with model.maximizer {name}: {why}. {label} pairs with {maximizers}; "
        f"{name} pairs with {objectives}."
    )


def maximizers_for(reads: tuple[type[Perturbation], ...]) -> list[type[InnerMaximizer]]:
    """advtrain's maximizers whose perturbation type is one of ``reads`` (an objective's ``reads``)."""
    return [cls for cls in _known(InnerMaximizer) if cls.produces in reads]


def objectives_for(produced: type[Perturbation]) -> list[type[Objective]]:
    """advtrain's objectives that read the perturbation type ``produced`` (a maximizer's ``produces``); wrappers whose
    ``reads`` is their base's (GradAlignLoss) are left out."""
    return [cls for cls in _known(Objective) if isinstance(cls.reads, tuple) and produced in cls.reads]


def _is_plain_cross_entropy(objective: Objective) -> bool:
    return type(objective) is AdversarialCE and objective.label_smoothing == 0.0


def _mismatch(label: str, reads: tuple[type[Perturbation], ...], name: str, produced: type[Perturbation]) -> str:
    """Why the pair does not fit, against the closest type the objective reads: the fields it needs and the maximizer
    does not produce, and the fields the maximizer produces and it would ignore."""
    have = _fields(produced)
    closest = min(reads, key=lambda t: len(_fields(t) ^ have))
    missing, ignored = sorted(_fields(closest) - have), sorted(have - _fields(closest))
    parts = [f"{label} needs {', '.join(missing)}, which {name} does not produce"] if missing else []
    if ignored:
        whose = f"its {', '.join(ignored)}" if missing else f"{name}'s {', '.join(ignored)}"
        parts.append(f"would ignore {whose}" if missing else f"{label} would ignore {whose}")
    return " and ".join(parts) + f" ({label} reads {_names(list(reads))}; {name} produces {produced.__name__})"


def _fields(cls: type[Perturbation]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _known(base: type) -> list[type]:
    """The public, concrete subclasses of ``base`` defined in advtrain, in name order."""
    found, stack = set(), list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("advtrain.") and not cls.__name__.startswith("_") and not inspect.isabstract(cls):
            found.add(cls)
    return sorted(found, key=lambda c: c.__name__)


def _names(classes: list[type]) -> str:
    return ", ".join(cls.__name__ for cls in classes)


def _objective_names(produced: type[Perturbation]) -> str:
    names = _names(objectives_for(produced))
    wrappers = [cls.__name__ for cls in _known(Objective) if not isinstance(cls.reads, tuple)]
    if names and wrappers:
        names += ", " + ", ".join(f"{w}(base=one of these)" for w in wrappers)
    return names
