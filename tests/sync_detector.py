"""A host-sync detector for tests: records every tensor operation that makes the host wait for the device.

On CUDA, kernels are queued and the Python thread runs ahead of the GPU; an operation whose *result the host needs*
(a Python number or bool from a tensor, a shape that depends on the data, a copy from host memory that is not
pinned) stalls the host until the queue drains, and the GPU then idles while the host prepares the next work. A
training step without such operations keeps the device busy and overlaps data loading for free.

:class:`HostSyncDetector` is a :class:`torch.overrides.TorchFunctionMode`: every torch function and tensor method
called inside it passes through :meth:`HostSyncDetector.__torch_function__`, which records the ones that would
synchronise on CUDA. It inspects the *operation*, not the device, so it works on CPU tensors (where nothing actually
waits): a CPU test run finds the syncs a GPU run would pay for. What it records:

* **reads** of device values into Python: ``item``, ``bool()`` (an ``if`` on a tensor), ``int()``, ``float()``,
  ``__index__``, ``tolist``, ``numpy``/``__array__``, ``cpu()``, ``.to("cpu")`` of a tensor on an accelerator,
  formatting or printing a tensor,
  ``x in tensor``, ``torch.equal``, ``torch.allclose``, ``is_nonzero``;
* **data-dependent shapes**, whose output size the host must read back: ``nonzero``, ``argwhere``, one-argument
  ``torch.where``, ``masked_select``, ``unique``/``unique_consecutive``, ``bincount``, indexing or assigning with a
  boolean mask (``x[mask]``, ``x[mask] = v``, ``index_put_`` with a mask), ``repeat_interleave`` with tensor
  repeats and no ``output_size``, ``one_hot`` without ``num_classes``, ``histc`` with ``min == max``;
* **copies from host data** (a blocking host-to-device copy from pageable memory waits for the stream):
  ``torch.tensor``/``as_tensor``/``asarray`` of Python data with an explicit ``device`` (in a training step the
  device is the accelerator; on a CPU test run any explicit device counts), ``new_tensor`` of Python data, and
  indexing with a Python list;
* ``torch.cuda.synchronize()`` itself.

Limits: a torch function implemented in Python (e.g. some of ``torch.nn.functional``) is seen as one call, not as
the operations inside it; code that reads a tensor through a C extension without a torch function (``ctypes``,
``data_ptr``) is not seen; an optimizer's own CPU step counters (Adam's ``step.item()``) are recorded although they
never touch the device (use SGD where the count must be exact).

Example:
    >>> with HostSyncDetector() as syncs:  # doctest: +SKIP
    ...     training_step()
    >>> assert not syncs.events, syncs.report()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # the separator keeps torchmetrics/ out
_THIS_FILE = os.path.abspath(__file__)

# Tensor methods and torch functions whose result is a Python value read from the tensor's memory.
_READS = frozenset({
    "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "tolist", "numpy", "__array__", "cpu",
    "__format__", "__repr__", "__str__", "__contains__", "equal", "allclose", "is_nonzero",
})  # fmt: skip
# Operations whose output shape depends on the values: the host reads the size back before it can allocate.
_DATA_DEPENDENT = frozenset({
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_unique", "_unique2", "bincount",
})  # fmt: skip
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put_", "index_put", "_index_put_impl_"})
_FROM_HOST_DATA = frozenset({"tensor", "as_tensor", "asarray"})


@dataclass(frozen=True)
class SyncEvent:
    """One operation that would synchronise the host with the device.

    Attributes:
        op: the torch function or tensor method (``"item"``, ``"__bool__"``, ``"__getitem__"``...).
        reason: why it synchronises, in words.
        where: ``file:line (function)`` of the innermost caller outside torch.
    """

    op: str
    reason: str
    where: str

    def __str__(self) -> str:
        return f"{self.op} ({self.reason}) at {self.where}"


def _is_bool_index(index: Any) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_is_bool_index(i) for i in index if i is not None)
    return False  # a Python bool index only adds a dimension


def _is_host_list_index(index: Any) -> bool:
    """A Python list (not a tuple of slices/ints) as an index becomes a host tensor that is copied to the device."""
    if isinstance(index, list):
        return True
    return isinstance(index, tuple) and any(isinstance(i, list) for i in index)


def _device_to_host(args: tuple, kwargs: dict) -> bool:
    """``tensor.to(cpu)`` of a tensor that is on an accelerator. On a CPU run every tensor is on the CPU, and
    Lightning's own batch transfer is ``batch.to(root_device)`` = ``.to(cpu)``: there it cannot be told apart from a
    device-to-host copy, so it is not recorded (``.cpu()``, ``.numpy()`` and ``.tolist()`` are)."""
    source = args[0] if args else None
    if not isinstance(source, torch.Tensor) or source.device.type == "cpu":
        return False
    targets = [kwargs.get("device"), *args[1:]]
    for target in targets:
        if isinstance(target, torch.device) and target.type == "cpu":
            return True
        if isinstance(target, str) and target.split(":")[0] == "cpu":
            return True
    return False


def sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why calling ``func(*args, **kwargs)`` synchronises the host with a CUDA device, or ``None`` if it does not."""
    name = getattr(func, "__name__", "")
    if name in _READS:
        return "reads a device value into Python"
    if name in _DATA_DEPENDENT:
        return "output shape depends on the data"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "one-argument where is nonzero: output shape depends on the data"
    if name in _INDEXING:
        indices = kwargs.get("indices", args[1] if len(args) > 1 else None)
        if _is_bool_index(indices):
            return "boolean-mask indexing: output shape depends on the data"
        if name in ("__getitem__", "__setitem__") and _is_host_list_index(indices):
            return "a Python list index is copied from host memory"
        return None
    if name == "repeat_interleave":
        # torch.repeat_interleave(repeats) (one argument) repeats arange(len(repeats)): its repeats are args[0].
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0] if args else None)
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave with tensor repeats and no output_size: output shape depends on the data"
        return None
    if name == "one_hot":
        classes = kwargs.get("num_classes", args[1] if len(args) > 1 else -1)
        return "one_hot without num_classes reads the largest label" if classes == -1 else None
    if name == "histc":
        lo, hi = kwargs.get("min", args[2] if len(args) > 2 else 0), kwargs.get("max", args[3] if len(args) > 3 else 0)
        return "histc with min == max reads the data's range" if lo == hi else None
    if name == "to" and _device_to_host(args, kwargs):
        return "copies a device tensor to host memory"
    if name in _FROM_HOST_DATA:
        data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
        if not isinstance(data, torch.Tensor) and kwargs.get("device") is not None:
            return "blocking copy of Python data from host memory to the device"
        return None
    if name == "new_tensor":
        data = args[1] if len(args) > 1 else kwargs.get("data")
        return None if isinstance(data, torch.Tensor) else "blocking copy of Python data from host memory to the device"
    return None


def _caller() -> str:
    """``file:line (function)`` of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE and "contextlib" not in path:
            return f"{_short(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _short(path: str) -> str:
    markers = ("/advtrain/", "/tests/", "/benchmarks/", "/pytorch_lightning/", "/lightning_fabric/", "/torchmetrics/")
    for marker in markers:
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return os.path.basename(path)


class HostSyncDetector(TorchFunctionMode):
    """Records the operations that would synchronise the host with the device (see the module docstring).

    Use as a context manager; :attr:`events` lists what was recorded, in order. :meth:`paused` suspends recording for
    host-side work inside the region (data loading, checks on host tensors). Recording never changes a result.

    Args:
        ignore: predicates ``(event) -> bool``; matching events are not recorded.
    """

    def __init__(self, *, ignore: tuple = ()) -> None:
        super().__init__()
        self.events: list[SyncEvent] = []
        self._ignore = tuple(ignore)
        self._paused = 0
        self._cuda_synchronize = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            reason = sync_reason(func, args, kwargs)
            if reason is not None:
                self._record(getattr(func, "__name__", repr(func)), reason)
        return func(*args, **kwargs)

    def _record(self, op: str, reason: str) -> None:
        event = SyncEvent(op, reason, _caller())
        if not any(rule(event) for rule in self._ignore):
            self.events.append(event)

    def __enter__(self) -> HostSyncDetector:
        real = torch.cuda.synchronize

        def synchronize(*args: Any, **kwargs: Any) -> None:
            if not self._paused:
                self._record("torch.cuda.synchronize", "waits for the device")
            return real(*args, **kwargs)

        self._cuda_synchronize = real
        torch.cuda.synchronize = synchronize
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize = self._cuda_synchronize
        return super().__exit__(*exc)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Suspends recording (host-side work inside the detected region)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def count(self) -> int:
        """How many syncs were recorded."""
        return len(self.events)

    def sites(self) -> Counter[str]:
        """Recorded syncs counted per ``op at file:line``."""
        return Counter(f"{e.op} at {e.where}" for e in self.events)

    def report(self) -> str:
        """A readable list of the recorded syncs, one site per line with its count (for assertion messages)."""
        if not self.events:
            return "no host syncs"
        lines = [f"{len(self.events)} host sync(s):"]
        lines += [f"  {n} x {site}" for site, n in self.sites().most_common()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------- per-step counts in a Lightning fit


class StepSyncs:
    """The syncs of a Lightning ``fit`` split per training step (see :func:`fit_counting_syncs`).

    Attributes:
        steps: one list of events per training batch, from its ``on_train_batch_start`` to the next one (so a step
            owns what Lightning does after it: logging, progress bar, checkpoints).
        end: the events from the end of the last epoch to the end of training (the strategy's teardown, which moves
            the model back to the CPU, is not recorded).
    """

    def __init__(self, steps: list[list[SyncEvent]], end: list[SyncEvent]) -> None:
        self.steps = steps
        self.end = end

    def counts(self) -> list[int]:
        """Syncs per step."""
        return [len(s) for s in self.steps]

    def report(self) -> str:
        lines = []
        for k, events in enumerate(self.steps):
            lines.append(f"step {k}: {len(events)}")
            lines += [f"    {e}" for e in events]
        lines.append(f"after the last step: {len(self.end)}")
        lines += [f"    {e}" for e in self.end]
        return "\n".join(lines)


def fit_counting_syncs(module, loader, *, trainer_kwargs: dict | None = None, host_hooks: tuple = ()) -> StepSyncs:
    """Runs ``AdvTrainer.fit(module, loader)`` under a :class:`HostSyncDetector` and splits its events per step.

    Data loading (no torch function of a ``TensorDataset`` loader syncs) and the module hooks named in
    ``host_hooks`` (e.g. ``"on_before_batch_transfer"``, which runs on the host batch before it moves to the device)
    are not recorded. No checkpointing, no logger and no progress bar unless ``trainer_kwargs`` asks for them.
    """
    import pytorch_lightning as pl

    from advtrain.cli import AdvTrainer

    detector = HostSyncDetector()
    marks: list[int] = []
    epoch_end: list[int] = []

    class Marks(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            marks.append(len(detector.events))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            epoch_end.append(len(detector.events))

    for name in host_hooks:
        hook = getattr(module, name)

        def unrecorded(*args, _hook=hook, **kwargs):
            with detector.paused():
                return _hook(*args, **kwargs)

        setattr(module, name, unrecorded)
    kwargs = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
    kwargs.update(trainer_kwargs or {})
    callbacks = [Marks(), *kwargs.pop("callbacks", [])]
    trainer = AdvTrainer(callbacks=callbacks, **kwargs)
    teardown = trainer.strategy.teardown

    def unrecorded_teardown() -> None:
        with detector.paused():
            teardown()

    trainer.strategy.teardown = unrecorded_teardown
    with detector:
        trainer.fit(module, loader)
    for name in host_hooks:
        delattr(module, name)
    bounds = [*marks, epoch_end[-1] if epoch_end else len(detector.events)]
    steps = [detector.events[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return StepSyncs(steps, detector.events[bounds[-1] :])
