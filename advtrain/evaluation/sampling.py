"""Exact distributed evaluation: every sample once, in batches identical to a single process's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class BatchAlignedSampler(Sampler[list[int]]):
    """A batch sampler that cuts ``indices`` into consecutive batches and deals whole batches to the ranks.

    Rank r gets global batches r, r + W, r + 2W, ... (W ranks): no sample is repeated or padded (Lightning's
    ``DistributedSampler`` pads 65 samples to 66 on 2 ranks), and every batch holds exactly the samples it holds in
    a single-process run, so seeded attacks draw the same random starts and the results are identical. Ranks may get
    one batch fewer than others; the evaluation makes no per-batch collective call, so that is harmless. With
    Lightning, pass it as ``batch_sampler`` and set ``Trainer(use_distributed_sampler=False)``.

    Args:
        indices: dataset positions to evaluate, in order.
        batch_size: samples per batch.
        rank: this process's rank (default: from ``torch.distributed``, else 0).
        world_size: number of ranks (default: from ``torch.distributed``, else 1).
    """

    def __init__(
        self,
        indices: Sequence[int] | torch.Tensor,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        default_rank, default_world = dist_info()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {self.rank}.")
        self.indices = [int(i) for i in torch.as_tensor(indices).tolist()]
        self.batch_size = int(batch_size)

    @property
    def num_batches(self) -> int:
        """Number of global batches (over all ranks)."""
        return -(-len(self.indices) // self.batch_size)

    def global_batches(self) -> Iterator[tuple[int, list[int]]]:
        """``(global batch number, dataset positions)`` of this rank's batches."""
        for number in range(self.rank, self.num_batches, self.world_size):
            yield number, self.indices[number * self.batch_size : (number + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self.global_batches():
            yield batch

    def __len__(self) -> int:
        return len(range(self.rank, self.num_batches, self.world_size))


def seeded_subset(size: int, num_samples: int | None, seed: int) -> torch.Tensor:
    """A fixed subset of ``num_samples`` positions out of ``size`` (all of them when ``None`` or larger), drawn with
    ``seed`` and sorted, so the same samples are evaluated at every epoch and on every rank."""
    if num_samples is None or num_samples >= size:
        return torch.arange(size)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}.")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(size, generator=generator)[:num_samples].sort().values
