"""Per-sample evaluation records as a torchmetrics Metric, so that DDP ranks reduce exactly.

Every per-sample quantity is a concatenation state (``dist_reduce_fx="cat"``, as :class:`torchmetrics.CatMetric`):
ranks gather each other's rows, with uneven row counts and no padding, and the summary is computed from the rows
sorted by sample index, i.e. in the order a single process would have produced them. Pass counts and times are
sum states (``dist_reduce_fx="sum"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

#: Per-sample fields of a batch record and their trailing shape kind: "" → (B,), "ag" → (B, A, G).
PER_SAMPLE = {
    "index": "",
    "correct": "",
    "x_norm": "",
    "zero_grad": "",
    "unstable": "",
    "attacked": "ag",
    "claimed": "ag",
    "fooled": "ag",
    "robust": "ag",
    "norms": "ag",
}
#: Per-attack sums: forward and backward passes and seconds.
PER_ATTACK = ("forward_passes", "backward_passes", "seconds")


class RobustnessRecords(Metric):
    """Accumulates the batch records of :func:`advtrain.evaluation.robust.attack_batch` (see there for the fields).

    Args:
        num_attacks: A, the number of attacks.
        num_eps: G, the number of ε of the grid.
    """

    full_state_update = False

    def __init__(self, num_attacks: int, num_eps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_attacks, self.num_eps = int(num_attacks), int(num_eps)
        for name in PER_SAMPLE:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        for name in PER_ATTACK:
            self.add_state(name, default=torch.zeros(self.num_attacks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, record: Mapping[str, Tensor]) -> None:  # type: ignore[override]
        """Adds one batch record (tensors on any device; stored as float64/int64 on the metric's device)."""
        for name in PER_SAMPLE:
            value = record[name].to(self.device)
            value = value.long() if name == "index" else value.double()
            getattr(self, name).append(value)
        for name in PER_ATTACK:
            setattr(
                self, name, getattr(self, name) + torch.as_tensor(record[name], dtype=torch.float64).to(self.device)
            )

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """All rows (of every rank), sorted by sample index; boolean fields come back as bool.

        Raises:
            ValueError: if a sample index occurs twice (a padded or overlapping distributed sampler).
        """
        out = {}
        for name, kind in PER_SAMPLE.items():
            rows = getattr(self, name)
            if isinstance(rows, list):  # nothing recorded on this rank
                rows = dim_zero_cat(rows) if rows else self._empty(kind)
            out[name] = rows.reshape(-1, self.num_attacks, self.num_eps) if kind == "ag" else rows.reshape(-1)
        order = out["index"].argsort(stable=True)
        out = {name: value[order] for name, value in out.items()}
        if out["index"].numel() != out["index"].unique().numel():
            raise ValueError(
                "The evaluation saw some samples twice: use an unrepeated distributed sampler "
                "(advtrain.evaluation.BatchAlignedSampler) and Trainer(use_distributed_sampler=False)."
            )
        for name in PER_SAMPLE:
            if name not in ("index", "x_norm", "norms"):
                out[name] = out[name].bool()
        out["index"] = out["index"].long()
        for name in PER_ATTACK:
            out[name] = getattr(self, name).clone()
        return out

    def results(self) -> dict[str, Tensor]:
        """:meth:`compute` (synchronised across ranks) with the shapes restored: torchmetrics squeezes one-element
        outputs, e.g. the per-attack sums of a single attack."""
        out = self.compute()
        for name, kind in PER_SAMPLE.items():
            out[name] = out[name].reshape(-1, self.num_attacks, self.num_eps) if kind == "ag" else out[name].reshape(-1)
        for name in PER_ATTACK:
            out[name] = out[name].reshape(-1)
        return out

    def _empty(self, kind: str) -> Tensor:
        shape = (0, self.num_attacks, self.num_eps) if kind == "ag" else (0,)
        return torch.zeros(shape, dtype=torch.float64, device=self.device)

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:  # type: ignore[override]
        # A rank that saw no batch (fewer batches than ranks) would contribute an empty list, which torchmetrics
        # cannot gather: give it empty rows of the right shape first.
        for name, kind in PER_SAMPLE.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                getattr(self, name).append(self._empty(kind).long() if name == "index" else self._empty(kind))
        super()._sync_dist(dist_sync_fn=dist_sync_fn, process_group=process_group)
