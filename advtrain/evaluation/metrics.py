"""Per-sample evaluation records as a torchmetrics Metric, so that DDP ranks reduce exactly.

The states and their reductions come from the record schema (:data:`advtrain.evaluation.records.RECORD`): every
per-sample field is a concatenation state (``dist_reduce_fx="cat"``, as :class:`torchmetrics.CatMetric`), so ranks
gather each other's rows, with uneven row counts and no padding, and the summary is computed from the rows sorted by
sample index, i.e. in the order a single process would have produced them; pass counts and times are sum states
(``dist_reduce_fx="sum"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from advtrain.evaluation.records import RECORD, Field

#: Per-sample fields of a batch record and their trailing shape kind: "" → (B,), "ag" → (B, A, G).
PER_SAMPLE = {f.name: "ag" if f.shape == "BAG" else "" for f in RECORD if f.reduce == "cat"}
#: Per-attack sums: forward and backward passes and seconds.
PER_ATTACK = tuple(f.name for f in RECORD if f.reduce == "sum")
_CAT = tuple(f for f in RECORD if f.reduce == "cat")
_SUM = tuple(f for f in RECORD if f.reduce == "sum")


class RobustnessRecords(Metric):
    """Accumulates the batch records of :func:`advtrain.evaluation.attack_batch` (their fields:
    :data:`~advtrain.evaluation.records.RECORD`).

    Args:
        num_attacks: A, the number of attacks.
        num_eps: G, the number of ε of the grid.
    """

    full_state_update = False

    def __init__(self, num_attacks: int, num_eps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_attacks, self.num_eps = int(num_attacks), int(num_eps)
        for f in _CAT:
            self.add_state(f.name, default=[], dist_reduce_fx="cat")
        for f in _SUM:
            self.add_state(f.name, default=torch.zeros(self.num_attacks, dtype=f.dtype), dist_reduce_fx="sum")

    def update(self, record: Mapping[str, Tensor]) -> None:  # type: ignore[override]
        """Adds one batch record (tensors on any device; rows stored as int64 for integer fields, else float64, on the
        metric's device)."""
        for f in _CAT:
            getattr(self, f.name).append(record[f.name].to(self.device, _stored(f)))
        for f in _SUM:
            total = getattr(self, f.name) + torch.as_tensor(record[f.name], dtype=f.dtype).to(self.device)
            setattr(self, f.name, total)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """All rows (of every rank), sorted by sample index; every field back in its record dtype except the float
        fields, which stay float64.

        Raises:
            ValueError: if a sample index occurs twice (a padded or overlapping distributed sampler).
        """
        out = {}
        for f in _CAT:
            rows = getattr(self, f.name)
            if isinstance(rows, list):  # nothing recorded on this rank
                rows = dim_zero_cat(rows) if rows else self._empty(f)
            out[f.name] = self._shaped(f, rows)
        order = out["index"].argsort(stable=True)
        out = {name: value[order] for name, value in out.items()}
        if out["index"].numel() != out["index"].unique().numel():
            raise ValueError(
                "The evaluation saw some samples twice: use an unrepeated distributed sampler "
                "(advtrain.evaluation.BatchAlignedSampler) and Trainer(use_distributed_sampler=False)."
            )
        for f in _CAT:
            if not f.dtype.is_floating_point:
                out[f.name] = out[f.name].to(f.dtype)
        for f in _SUM:
            out[f.name] = getattr(self, f.name).clone()
        return out

    def results(self) -> dict[str, Tensor]:
        """:meth:`compute` (synchronised across ranks) with the shapes restored: torchmetrics squeezes one-element
        outputs, e.g. the per-attack sums of a single attack."""
        out = self.compute()
        for f in RECORD:
            out[f.name] = self._shaped(f, out[f.name])
        return out

    def _shaped(self, f: Field, rows: Tensor) -> Tensor:
        return rows.reshape(-1, self.num_attacks, self.num_eps) if f.shape == "BAG" else rows.reshape(-1)

    def _empty(self, f: Field) -> Tensor:
        shape = (0, self.num_attacks, self.num_eps) if f.shape == "BAG" else (0,)
        return torch.zeros(shape, dtype=_stored(f), device=self.device)

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:  # type: ignore[override]
        # A rank that saw no batch (fewer batches than ranks) would contribute an empty list, which torchmetrics
        # cannot gather: give it empty rows of the right shape first.
        for f in _CAT:
            if isinstance(getattr(self, f.name), list) and not getattr(self, f.name):
                getattr(self, f.name).append(self._empty(f))
        super()._sync_dist(dist_sync_fn=dist_sync_fn, process_group=process_group)


def _stored(f: Field) -> torch.dtype:
    """The dtype a per-sample field is accumulated in: int64 for integer fields, float64 for the rest (bools
    included: gathering needs one dtype per state on every rank)."""
    return torch.long if f.dtype in (torch.long, torch.int32) else torch.float64
