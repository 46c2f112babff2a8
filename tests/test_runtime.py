"""advtrain.runtime: the glibc allocator setting that keeps freed activations in the heap."""

from __future__ import annotations

import subprocess
import sys

import pytest

from advtrain.runtime import tune_cpu_allocator

# Ten input-gradient steps of a small CNN on 200 digits (an attack's inner loop) after one warm-up step, printing the
# minor page faults they take: under glibc's default settings the activation-sized buffers freed at the end of each
# step go back to the kernel and are faulted in again (zeroed page by page) in the next; tuned, they are reused.
_PROBE = """
import resource, torch
from torch import nn
from advtrain.runtime import tune_cpu_allocator
tuned = tune_cpu_allocator()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 14 * 14, 10)).requires_grad_(False)
x, y = torch.rand(200, 1, 28, 28), torch.zeros(200, dtype=torch.long)
def step():
    d = torch.zeros_like(x, requires_grad=True)
    torch.autograd.grad(nn.functional.cross_entropy(model(x + d), y), d)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(env_value: str) -> tuple[bool, int]:
    env = {"ADVTRAIN_TUNE_MALLOC": env_value, "OMP_NUM_THREADS": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in_again():
    tuned, tuned_faults = _probe("1")
    untuned, default_faults = _probe("0")
    assert tuned and not untuned
    activation_pages = 200 * 32 * 28 * 28 * 4 // 4096  # one conv output
    assert default_faults > 10 * activation_pages, default_faults  # the problem exists with the default settings...
    assert tuned_faults < 0.3 * default_faults, (tuned_faults, default_faults)  # ...and the tuning removes most of it


def test_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ADVTRAIN_TUNE_MALLOC", "0")
    assert tune_cpu_allocator() is False
