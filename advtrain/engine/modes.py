"""Puts a model in the state an attack needs and restores the caller's state afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

from torch import nn


class AttackMode(str, Enum):
    """BatchNorm/dropout policy while an attack runs.

    ``eval``: running statistics, no dropout (the default for evaluation and for most adversarial training).
    ``train``: batch statistics and dropout, as Madry et al.'s official code runs its training attack; note that
    BatchNorm running statistics move during the attack's forward passes.
    ``keep``: leave the modules as the caller set them.
    """

    EVAL = "eval"
    TRAIN = "train"
    KEEP = "keep"

    @classmethod
    def parse(cls, value: str | AttackMode) -> AttackMode:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"Unknown attack mode {value!r}; allowed values are {allowed}.") from None


@contextmanager
def attack_context(model: nn.Module, mode: AttackMode | str = AttackMode.EVAL) -> Iterator[nn.Module]:
    """Sets the model's mode and freezes its parameters for the duration of an attack.

    Every submodule's ``training`` flag and every parameter's ``requires_grad`` flag are recorded and
    restored on exit, even if the attack raises, so a model with mixed modes (e.g. frozen BatchNorm) comes
    back exactly as it was. Parameters are frozen so that the attack's backward passes compute input
    gradients only; attacks use ``torch.autograd.grad`` and never touch ``.grad`` buffers.

    Args:
        model: the classifier under attack.
        mode: see :class:`AttackMode`.

    Yields:
        The same model, ready to attack.
    """
    mode = AttackMode.parse(mode)
    training_flags = [(m, m.training) for m in model.modules()]
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if mode is AttackMode.EVAL:
            model.eval()
        elif mode is AttackMode.TRAIN:
            model.train()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in training_flags:
            m.training = flag
        for p, flag in grad_flags:
            p.requires_grad_(flag)
