"""Per-sample attack state: a typed structure whose per-sample fields shrink, or are masked, together.

Every attack keeps, for the samples still under attack, a few tensors with one row per sample (the iterate, its
budget, a step size, a radius…). An attack declares them once, as a dataclass deriving from :class:`SampleState`::

    @dataclass(eq=False)
    class _State(SampleState):
        x: Tensor
        delta: Tensor
        eps: Tensor

and the core builds it (:meth:`~advtrain.engine.core.AttackCore.start`) in one of two modes, chosen per call:

* **shrinking** (the default): the state holds only the active samples; when some finish, :meth:`SampleState.retire`
  drops their rows from every field at once, so finished samples cost no further passes (per-sample early stopping).
* **masked**: the state keeps every row of the batch (fixed shapes), and an ``active`` mask says which samples are
  still under attack. Writing a field only changes the active rows (a finished sample's row is frozen where it
  finished), random draws go to the active rows only, and the pass counters count active rows. So a masked run gives
  the shrinking run's results, while every tensor keeps the shape of the batch: the precondition for capturing an
  iteration in a CUDA graph. It computes on the finished rows too (their results are discarded), so on a CPU it
  costs more than shrinking; it equals shrinking as long as the model treats each sample on its own (no
  batch-statistics BatchNorm).

Attack code reads and writes the fields as attributes and never needs to know the mode: global per-batch arrays are
read with ``array[state.index]`` and written with :meth:`SampleState.write`; trackers take the state
(:meth:`~advtrain.engine.tracking.MinimalNormTracker.offer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from advtrain.threat.norms import view_as_batch

_PER_SAMPLE: dict[type, tuple[str, ...]] = {}

#: The attack's own per-call mode of the active set, see :class:`SampleState`.
ACTIVE_SET_MODES = ("shrink", "mask")


def shared(default=None):
    """A field of a :class:`SampleState` subclass that is not per-sample (a scalar, a per-run constant): it is neither
    shrunk nor masked."""
    return field(default=default, metadata={"shared": True})


@dataclass(eq=False, kw_only=True)
class SampleState:
    """Base of every attack's per-sample state (see the module docstring).

    Subclasses are ``@dataclass(eq=False)`` with their per-sample fields annotated ``Tensor`` (leading dimension: one
    row per sample of the state) and any other field declared with :func:`shared`; the core builds them with keyword
    arguments. Optional per-sample fields (``Tensor | None = None``) take part once set.

    Attributes:
        index: (n,) the samples' positions in the batch (masked mode: every position, always).
        active: (n,) bool, masked mode only: which rows are still under attack (``None`` when shrinking).
        count: the number of samples still under attack (a host integer, refreshed by :meth:`retire`).
    """

    index: Tensor = shared()
    active: Tensor | None = shared()
    count: int = shared(0)

    def __post_init__(self) -> None:
        rows = self.index.shape[0]
        for name in self.per_sample_fields():
            value = object.__getattribute__(self, name)
            if value is not None and value.shape[:1] != (rows,):
                raise ValueError(f"state field {name!r} has {value.shape[0]} rows for {rows} samples.")
        if self.active is None:
            self.count = rows
        self._ready = True

    @classmethod
    def per_sample_fields(cls) -> tuple[str, ...]:
        """Names of the per-sample fields (every field not declared :func:`shared`)."""
        names = _PER_SAMPLE.get(cls)
        if names is None:
            names = _PER_SAMPLE[cls] = tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("shared"))
        return names

    def __setattr__(self, name: str, value) -> None:
        # In masked mode a write to a per-sample field changes the active rows only: a finished sample stays frozen.
        if (
            self.__dict__.get("_ready")
            and self.active is not None
            and value is not None
            and name in self.per_sample_fields()
        ):
            old = object.__getattribute__(self, name)
            if old is not None:
                value = torch.where(view_as_batch(self.active, value), value, old)
        object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return self.count

    @property
    def masked(self) -> bool:
        return self.active is not None

    def _items(self) -> Iterator[tuple[str, Tensor]]:
        for name in self.per_sample_fields():
            value = object.__getattribute__(self, name)
            if value is not None:
                yield name, value

    def retire(self, done: Tensor) -> int:
        """Ends the attack on the samples flagged ``done`` ((n,) bool over the state's rows); returns how many remain
        (the one host sync of an iteration). Shrinking drops their rows from every per-sample field; masked clears
        their ``active`` flag."""
        if self.active is not None:
            self.active = self.active & ~done
            self.count = int(self.active.sum())
            return self.count
        remaining = int((~done).sum())
        if remaining < self.count:
            self.keep(~done)
        return remaining

    def keep(self, keep: Tensor) -> None:
        """Shrinking mode: keeps only the rows where ``keep`` is true (no host sync; :attr:`count` is refreshed from
        the new index). Masked mode: deactivates the others (and reads the new count back, a host sync)."""
        if self.active is not None:
            self.active = self.active & keep
            self.count = int(self.active.sum())
            return
        object.__setattr__(self, "index", self.index[keep])
        for name, value in list(self._items()):
            object.__setattr__(self, name, value[keep])
        self.count = self.index.shape[0]

    def write(self, target: Tensor, value: Tensor, rows: Tensor | None = None) -> None:
        """Writes ``value`` (one row per state row, or per row of ``rows``, a bool mask over the state) into the
        per-batch array ``target`` at the samples' positions, in place; masked mode writes the active rows only."""
        if self.active is None:
            index = self.index if rows is None else self.index[rows]
            target[index] = value if rows is None else value[rows]
            return
        keep = self.active if rows is None else rows & self.active
        target.copy_(torch.where(view_as_batch(keep, target), value.to(target.dtype), target))

    def rand(self, *shape: int, generator: torch.Generator | None = None, normal: bool = False) -> Tensor:
        """Random numbers with one row per state row (uniform on [0, 1), or standard normal with ``normal``), see
        :meth:`_spread`."""
        draw = torch.randn if normal else torch.rand
        return self._spread(draw((self.count, *shape), generator=generator, device=self.index.device))

    def randint(self, high: int, *shape: int, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integers in [0, high) with one row per state row, see :meth:`_spread`."""
        return self._spread(torch.randint(0, high, (self.count, *shape), device=self.index.device, generator=generator))

    def _spread(self, values: Tensor) -> Tensor:
        """Draws made one row per active sample, in order, as rows of the state: as they are when shrinking; masked,
        scattered into the active rows (zeros elsewhere), so that both modes see the same numbers."""
        if self.active is None:
            return values
        out = values.new_zeros((self.index.shape[0], *values.shape[1:]))
        out[self.active] = values
        return out
