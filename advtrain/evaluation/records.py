"""The evaluation's record schema, declared once: every field of a batch record, its shape, dtype, fill value and how
it reduces across DDP ranks.

Everything that handles records derives from :data:`RECORD`: the batch record of
:func:`~advtrain.evaluation.attack_batch` (:func:`empty_fields`), the DDP-exact accumulator
:class:`~advtrain.evaluation.metrics.RobustnessRecords` (its states and their ``dist_reduce_fx``), the joins of an
out-of-memory retry's halves (:func:`join_samples`) and of an escalation's attacks (:func:`join_attacks`), and
:func:`select_attacks`. Shapes: ``"B"`` one value per sample, ``"BAG"`` per sample, attack and ε of the grid, ``"A"``
per attack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class Field:
    """One field of the record.

    Attributes:
        name: its key.
        shape: ``"B"`` (B,), ``"BAG"`` (B, A, G) or ``"A"`` (A,).
        dtype: its dtype in a batch record (float64 for the per-attack sums).
        fill: the value of a sample, attack and ε that was not attacked (and the start of a sum).
        reduce: across DDP ranks: ``"cat"`` gathers the rows of every rank (uneven counts, no padding), ``"sum"`` adds.
        source: what fills it: ``"clean"`` (the clean forward and gradient checks), ``"call"`` (what an attack call
            found, verified), ``"cascade"`` (the cascade's bookkeeping over the calls) or ``"cost"`` (passes and time).
        doc: what it holds.
    """

    name: str
    shape: Literal["B", "BAG", "A"]
    dtype: torch.dtype
    fill: bool | int | float
    reduce: Literal["cat", "sum"]
    source: Literal["clean", "call", "cascade", "cost"]
    doc: str


#: The fields of a batch record, in order.
# fmt: off
RECORD: tuple[Field, ...] = (
    Field("index", "B", torch.long, 0, "cat", "clean", "the sample's position in the dataset"),
    Field("correct", "B", torch.bool, False, "cat", "clean", "classified correctly"),
    Field("x_norm", "B", torch.float32, 0.0, "cat", "clean", "‖x‖ in the threat norm"),
    Field("zero_grad", "B", torch.bool, False, "cat", "clean", "the CE and margin gradients are both exactly zero"),
    Field("unstable", "B", torch.bool, False, "cat", "clean", "two forward passes disagree"),
    Field("attacked", "BAG", torch.bool, False, "cat", "call", "the attack ran on the sample at that ε"),
    Field("claimed", "BAG", torch.bool, False, "cat", "call", "the attack's own success flag"),
    Field("fooled", "BAG", torch.bool, False, "cat", "call", "verified success (clipped into ball and box)"),
    Field("robust", "BAG", torch.bool, False, "cat", "cascade",
          "robust after this attack and every earlier one (with the cascade, AutoAttack's convention), else under this "
          "attack alone"),
    Field("norms", "BAG", torch.float32, math.inf, "cat", "call", "verified norm of the point, +inf where not fooled"),
    Field("forward_passes", "A", torch.float64, 0.0, "sum", "cost", "forward passes spent"),
    Field("backward_passes", "A", torch.float64, 0.0, "sum", "cost", "backward passes spent"),
    Field("seconds", "A", torch.float64, 0.0, "sum", "cost", "time spent in the attack's calls"),
)
# fmt: on
FIELDS: dict[str, Field] = {f.name: f for f in RECORD}


def fields(*sources: str) -> tuple[Field, ...]:
    """The fields filled from ``sources`` (see :attr:`Field.source`), in record order."""
    return tuple(f for f in RECORD if f.source in sources)


def empty_fields(
    batch: int, num_attacks: int, num_eps: int, device: torch.device | str, *sources: str
) -> dict[str, Tensor]:
    """The fields of ``sources`` for a batch of ``batch`` samples, every value at its fill."""
    shapes = {"B": (batch,), "BAG": (batch, num_attacks, num_eps), "A": (num_attacks,)}
    return {f.name: torch.full(shapes[f.shape], f.fill, dtype=f.dtype, device=device) for f in fields(*sources)}


def join_samples(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Two records of the same attacks over different samples as one: rows concatenated, sums added."""
    return {f.name: first[f.name] + second[f.name] if f.reduce == "sum" else torch.cat([first[f.name], second[f.name]])
            for f in RECORD}  # fmt: skip


def join_attacks(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The records of two runs over the same samples, the second's attacks appended after the first's."""
    out = dict(first)
    for f in RECORD:
        if f.shape != "B":
            out[f.name] = torch.cat([first[f.name], second[f.name]], 1 if f.shape == "BAG" else 0)
    return out


def select_attacks(data: Mapping[str, Tensor], attacks: Sequence[int] | slice) -> dict[str, Tensor]:
    """The records of some attacks only (their positions, or a slice)."""
    out = dict(data)
    for f in RECORD:
        if f.shape != "B":
            out[f.name] = data[f.name][:, attacks] if f.shape == "BAG" else data[f.name][attacks]
    return out


__all__ = ["FIELDS", "RECORD", "Field", "empty_fields", "fields", "join_attacks", "join_samples", "select_attacks"]
