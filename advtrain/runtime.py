"""Process-level settings that make attacks and training faster on CPU.

**The allocator.** On CPU, PyTorch takes its tensors from the C library's ``malloc``. glibc serves every block above
its *mmap threshold* (128 KiB at start, raised dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the
kernel on ``free``; it also gives the top of its heap back once more than the *trim threshold* is free there. An
attack iteration allocates and frees the same few activation-sized buffers every step (a convolution's output, its
gradient), so under the default settings the kernel maps, zeroes and unmaps them again and again once those buffers
outgrow the dynamic threshold. On the reference SmallCNN, DDN-100 on 200 digits (two threads) takes 2.3 million
minor page faults per run in advtrain and 1.8 million in adv-lib and runs in 7.7 s; how many a given loop takes
depends on the order of its allocations rather than on its arithmetic. :func:`tune_cpu_allocator` raises both
thresholds so that freed memory stays in the heap and is reused: the same attack then takes a handful of page faults
and 5.0 s, for both libraries (``benchmarks/peers_walltime.py --n 200 --only ddn``, with and without
``ADVTRAIN_TUNE_MALLOC=0``). With 100 digits the buffers stay below the dynamic threshold and neither setting
faults. The cost is that the process keeps its peak heap
until it exits, which is what a training or evaluation process wants anyway. The same effect is had by starting
Python with ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or with jemalloc/tcmalloc preloaded (the
PyTorch CPU performance guide's advice).

``python -m advtrain`` calls it at start-up; library users can call it themselves. ``ADVTRAIN_TUNE_MALLOC=0`` turns
it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (an activation of a batch of 512 CIFAR images through a 64-channel layer is
# 128 MiB); glibc versions that cap the threshold lower refuse it, and the largest value they accept is used.
_THRESHOLDS = (1 << 30, 1 << 25)
_ENV = "ADVTRAIN_TUNE_MALLOC"


def tune_cpu_allocator() -> bool:
    """Keeps freed memory in glibc's heap for reuse instead of returning it to the kernel (see the module docstring).

    Returns:
        Whether the allocator was tuned: ``False`` off Linux/glibc, when ``ADVTRAIN_TUNE_MALLOC=0``, or when the C
        library refuses the settings. Never raises: this only affects speed.
    """
    if os.environ.get(_ENV, "1").strip() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    for threshold in _THRESHOLDS:
        if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
            # Trim only when far more than the largest pooled block is free at the top of the heap.
            trim = min(2 * threshold, 2**31 - 1)  # mallopt takes a C int
            tuned = mallopt(_M_TRIM_THRESHOLD, trim) == 1
            log.debug("glibc malloc: mmap threshold %d, trim threshold %d (%s)", threshold, trim, tuned)
            return tuned
    return False
