"""The host-sync detector (tests/sync_detector.py) catches every kind of sync it promises, on CPU tensors, and does
not flag the ordinary arithmetic of an attack or a training step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sync_detector import HostSyncDetector, sync_reason

X = torch.rand(6, 3)
MASK = X[:, 0] > 0.5
LABELS = torch.tensor([0, 2, 1, 2, 0, 1])


def _set_masked(x):
    x[x > 0.5] = 0.0


def _set_list(x):
    x[[0, 2]] = 1.0


def _print(x):
    return f"{x.sum():.3f}"


def _if(x):
    if (x > 0).any():
        return 1
    return 0


SYNCING = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "if on torch.any": _if,
    "int": lambda x: int(x.argmax()),
    "float": lambda x: float(x.sum()),
    "index": lambda x: list(range(x.shape[0]))[x.argmax() % 3],
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "np.asarray": lambda x: np.asarray(x),
    "cpu": lambda x: x.cpu(),
    "format": _print,
    "repr": lambda x: repr(x),
    "contains": lambda x: 0.5 in x,
    "equal": lambda x: torch.equal(x, x),
    "allclose": lambda x: torch.allclose(x, x),
    "nonzero": lambda x: (x > 0.5).nonzero(),
    "torch.nonzero": lambda x: torch.nonzero(x > 0.5),
    "argwhere": lambda x: torch.argwhere(x > 0.5),
    "where 1-arg": lambda x: torch.where(x > 0.5),
    "masked_select": lambda x: x.masked_select(x > 0.5),
    "unique": lambda x: torch.unique(LABELS),
    "unique method": lambda x: LABELS.unique(),
    "unique_consecutive": lambda x: torch.unique_consecutive(LABELS),
    "bincount": lambda x: torch.bincount(LABELS),
    "bool-mask getitem": lambda x: x[MASK],
    "bool-mask getitem in tuple": lambda x: x[MASK, 1:],
    "bool-mask setitem": _set_masked,
    "bool-mask index_put_": lambda x: x.index_put_((MASK,), torch.tensor(0.0)),
    "list index": lambda x: x[[0, 2]],
    "list setitem": _set_list,
    "repeat_interleave tensor repeats": lambda x: torch.repeat_interleave(x[:, 0], LABELS),
    "repeat_interleave one argument": lambda x: torch.repeat_interleave(LABELS),
    "one_hot without num_classes": lambda x: F.one_hot(LABELS),
    "histc without range": lambda x: torch.histc(x),
    "torch.tensor on a device": lambda x: torch.tensor(0.5, device=x.device),
    "as_tensor on a device": lambda x: torch.as_tensor([1.0, 2.0], device=x.device),
    "new_tensor": lambda x: x.new_tensor([1.0, 2.0]),
}


@pytest.mark.parametrize("name", sorted(SYNCING))
def test_each_syncing_operation_is_recorded_once_with_its_site(name):
    x = X.clone()
    with HostSyncDetector() as syncs:
        SYNCING[name](x)
    assert syncs.count == 1, syncs.report()
    assert "test_sync_detector.py" in syncs.events[0].where  # the caller, not torch's internals


def test_ordinary_arithmetic_and_training_are_not_flagged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    with HostSyncDetector() as syncs:
        eps = torch.full((5,), 0.1)
        delta = (2 * torch.rand_like(x) - 1) * eps.view(-1, 1, 1, 1)
        for _ in range(2):  # a PGD-like loop: gradients, sign, clamp, where, masks used arithmetically
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            bound = eps.view(-1, 1, 1, 1)
            delta = torch.maximum(torch.minimum(delta.detach() + 0.01 * grad.sign(), bound), -bound)
            delta = (x + delta).clamp(0, 1) - x
        fooled = model(x + delta).argmax(1) != y
        kept = torch.where(fooled.view(-1, 1, 1, 1), x + delta, x)
        index = torch.arange(5)[:3]
        picked = kept[index] * 2.0 + kept[1:3].mean() - kept[..., 0].amax()
        picked = picked.masked_fill(picked > 1, 0.0)
        shaped = F.one_hot(y, 3).float().sum() + torch.repeat_interleave(y, 2).sum() + x.shape[0] + len(x)
        ok = torch.isfinite(loss).all() & ~fooled.any()  # a device flag, never read
        opt.zero_grad()
        F.cross_entropy(model(kept), y).backward()
        opt.step()
        torch.tensor(0.5) * picked.sum() + shaped  # a CPU constant, no device given
    assert syncs.count == 0, syncs.report()
    assert ok.dtype == torch.bool


def test_paused_regions_and_ignore_rules_are_not_recorded():
    x = X.clone()
    with HostSyncDetector(ignore=(lambda e: e.op == "tolist",)) as syncs:
        with syncs.paused():
            x.sum().item()
        x.tolist()
        float(x.sum())
    assert [e.op for e in syncs.events] == ["__float__"]
    assert "1 x __float__ at tests/test_sync_detector.py" in syncs.report()


def test_cuda_synchronize_is_recorded_and_restored():
    real = torch.cuda.synchronize
    with HostSyncDetector() as syncs:
        try:
            torch.cuda.synchronize()
        except (RuntimeError, AssertionError):  # no CUDA here: the call is still recorded
            pass
    assert torch.cuda.synchronize is real
    assert [e.op for e in syncs.events] == ["torch.cuda.synchronize"]


def test_sync_reason_leaves_device_side_variants_alone():
    t = torch.rand(4)
    assert sync_reason(torch.Tensor.__getitem__, (t, torch.tensor([0, 2])), {}) is None  # a device index tensor
    assert sync_reason(torch.repeat_interleave, (t, torch.tensor([1, 1, 1, 1])), {"output_size": 4}) is None
    assert sync_reason(torch.histc, (t,), {"min": 0.0, "max": 1.0}) is None
    assert sync_reason(torch.tensor, (0.5,), {}) is None  # a CPU constant (no device)
    assert sync_reason(torch.Tensor.to, (t, torch.float64), {}) is None
    assert sync_reason(torch.where, (t > 0, t, 0.0), {}) is None
