"""The binary search on the trade-off constant c of the penalty attacks (Carlini–Wagner L2, StrAttack).

Both attacks minimise ``distance + c · attack loss`` for a fixed c per sample, and search c per sample between runs:
while no run has succeeded, c grows by a constant factor; once one has, c bisects the bracket between the largest
failing and the smallest succeeding value (Carlini and Wagner, IEEE S&P 2017, Sec. V; Xu et al., ICLR 2019, whose
authors' code follows it with a factor 5).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class ConstantSearch:
    """Per-sample binary search on the constant c.

    After a run at c, a sample that succeeded lowers the bracket's upper end to c (``upper ← min(upper, c)``), one
    that failed raises its lower end (``lower ← max(lower, c)``). The next c is the bracket's midpoint once an upper
    end is known, else ``growth · c`` (a sample that succeeded while its upper end still counts as unknown keeps c).

    Args:
        initial: (B,) the first c of every sample (its dtype and device are the search's).
        growth: the factor c grows by while no run has succeeded (C&W: 10, StrAttack: 5).
        no_upper: the upper end of a bracket that has none yet; an upper end counts as known below ``no_upper / 10``
            (C&W's reference code: 1e10; the default ``inf``: any finite value is known).

    Attributes:
        const: (B,) the c of the next run.
        lower, upper: (B,) the bracket.
    """

    def __init__(self, initial: Tensor, *, growth: float, no_upper: float = math.inf) -> None:
        self.const = initial.clone()
        self.lower = torch.zeros_like(initial)
        self.upper = torch.full_like(initial, no_upper)
        self.growth = float(growth)
        self.no_upper = float(no_upper)

    def bounded(self, upper: Tensor) -> Tensor:
        """Where ``upper`` is a known upper end."""
        return upper < self.no_upper / 10

    def update(self, success: Tensor, index: Tensor | None = None) -> None:
        """Moves the search on past a run at :attr:`const`: ``success`` says, for the samples ``index`` (positions;
        ``None``: every sample), whether that run succeeded."""
        if index is None:
            c, upper, lower = self.const, self.upper, self.lower
        else:
            c, upper, lower = self.const[index], self.upper[index], self.lower[index]
        upper = torch.where(success, torch.minimum(upper, c), upper)
        lower = torch.where(success, lower, torch.maximum(lower, c))
        const = torch.where(self.bounded(upper), (lower + upper) / 2, torch.where(success, c, c * self.growth))
        if index is None:
            self.const, self.upper, self.lower = const, upper, lower
        else:
            self.const[index], self.upper[index], self.lower[index] = const, upper, lower

    def smallest_success(self) -> Tensor:
        """(B,) the smallest c that succeeded, or the next c where none has."""
        return torch.where(self.bounded(self.upper), self.upper, self.const)
