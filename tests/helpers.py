"""Small models and data shared by the tests."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def random_batch(
    n: int = 6, shape: tuple[int, ...] = (1, 8, 8), classes: int = 10, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch: ``n`` inputs uniform in [0, 1) of ``shape`` (``dtype``, default float32), then ``n``
    labels uniform in ``[0, classes)``, both drawn in that order from one generator seeded with ``seed``.

    The inputs do not depend on the labels drawn after them, so ``x, _ = random_batch(...)`` is the tests' seeded
    ``torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))``. Returns ``(x, y)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen, dtype=dtype), torch.randint(0, classes, (n,), generator=gen)


class LinearNet(nn.Module):
    """A linear classifier on flattened inputs: logits = W x + b."""

    def __init__(self, in_features: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(in_features, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, in_features, generator=gen))
            self.fc.bias.copy_(torch.randn(num_classes, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class TinyCNN(nn.Module):
    """Conv + BatchNorm + dropout: has train/eval-dependent behaviour to check mode handling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def linear_problem(n: int = 200, dim: int = 100, classes: int = 10, seed: int = 0, scale: float = 1.0):
    """A random linear classifier with inputs at 0.5 ± 0.1 and labels = its predictions, and per class j the exact
    minimal perturbation to its half-space z_j ≥ z_y: (z_y − z_j) / ‖w_y − w_j‖_q, q = 2 for L2 and 1 for L∞ (the
    dual norm); +inf for the label's own class. Their minimum over j is the exact minimal untargeted perturbation.
    They lie in about [0.04, 0.34] (L2) and [0.005, 0.04] (L∞), so the box never binds; ``scale`` multiplies the
    weights (flatter logits: larger perturbations, by 1/scale).

    Returns:
        ``(model, x, y, {"l2": (n, C) float64, "linf": (n, C) float64})``.
    """
    gen = torch.Generator().manual_seed(seed)
    model = LinearNet(dim, classes, seed=seed)
    with torch.no_grad():
        model.fc.weight.mul_(scale)
    x = 0.5 + 0.1 * (2 * torch.rand(n, dim, generator=gen) - 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    w, b = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    z = x.double() @ w.T + b
    margin = z.gather(1, y[:, None]) - z
    diff = w[y][:, None, :] - w[None, :, :]
    own = F.one_hot(y, classes).bool()
    per_class = {
        "l2": (margin / diff.norm(dim=2)).masked_fill(own, float("inf")),
        "linf": (margin / diff.abs().sum(dim=2)).masked_fill(own, float("inf")),
    }
    return model, x, y, per_class


def never_fooled_binary(in_features: int = 64):
    """A 2-class linear model whose true class (0) keeps a margin of 3 over the whole L∞ ball of radius 0.1 (and the
    L2 ball of radius 0.5) around x = 0.5: never fooled there, the box never binds, and float32 CE gradients do not
    saturate. Returns ``(model, x, y)`` with 5 samples."""
    model = LinearNet(in_features, 2, seed=3)
    x = torch.full((5, 1, 8, 8), 0.5)
    w = model.fc.weight.detach()
    diff = w[0] - w[1]
    with torch.no_grad():
        worst = max(0.1 * diff.abs().sum(), 0.5 * diff.norm())
        model.fc.bias.copy_(torch.stack([3.0 + worst - diff @ x[0].flatten(), torch.tensor(0.0)]))
    return model, x, torch.zeros(5, dtype=torch.long)


@functools.cache
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small trained model for cross-checks against other attack implementations: a 196-64-10 ReLU MLP on 14×14
    (2×2-average-pooled) embedded MNIST digits, 150 full-batch Adam steps on 2,000 shuffled training digits (~2 s on
    CPU, ~89% test accuracy; its robust accuracy is between 10% and 60% at budgets like L1 1-2, L∞ 0.05). Returns
    ``(model, x, y)`` with the 176 correctly classified of 200 held-out digits; cached per session (do not modify)."""
    data = np.load(ROOT / "advtrain" / "data" / "assets" / "mnist5k.npz")
    x = F.avg_pool2d(torch.tensor(data["images"], dtype=torch.float32)[:, None] / 255, 2)
    y = torch.tensor(data["labels"]).long()
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(196, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x[:2000]), y[:2000]).backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    xs, ys = x[4000:4200], y[4000:4200]
    with torch.no_grad():
        keep = model(xs).argmax(1) == ys
    return model, xs[keep], ys[keep]


class _TopLeft(nn.Module):
    """Reads the top-left 14×14 of its input (a picklable module, unlike a closure)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z[..., :14, :14])


def padded_digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """:func:`digits_mlp` on its digits padded to 15×15 (a zero row and column at the bottom and right), the model
    reading the first 14×14: the official Square attack's L1 and L2 initialisations index tiles past the border of
    14×14 images and fail there."""
    mlp, x, y = digits_mlp()
    return _TopLeft(mlp).eval(), F.pad(x, (0, 1, 0, 1)), y


class Float64Compute(nn.Module):
    """Runs ``model`` in float64 on float32 inputs and returns float32 logits.

    For tests comparing two evaluation orders of the same computation (a batched attack against a one-sample
    reference, a fused call against separate calls): in float32 the batch size changes the kernels' summation order,
    so gradients differ by ~1e-7 relative, which an L∞ sign step on a near-zero component, or a ReLU at its kink,
    turns into a visible difference. In float64 that noise is ~1e-16 and vanishes when the logits and the input
    gradient are rounded to float32 (it survives only where a value straddles a float32 rounding boundary), so both
    orders see the same float32 numbers and the comparison can be exact to float32 rounding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.double()).float()


ROOT = Path(__file__).resolve().parents[1]


def run_advtrain(
    *args: object, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m advtrain ARGS`` as a user runs it, in a subprocess in ``cwd``: this checkout's advtrain (and the
    tests' modules, for test callbacks named in configs), one thread, W&B offline under ``cwd``; ``env`` adds to or
    replaces variables. Returns the finished process (``returncode``, ``stdout``, ``stderr``)."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(cwd), **(env or {})}  # fmt: skip
    # The timeout only guards the test suite against a hang; no test asserts on time.
    command = [sys.executable, "-m", "advtrain", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def sitecustomize_env(folder: Path, source: str) -> dict[str, str]:
    """``env`` for :func:`run_advtrain` whose interpreter runs ``source`` at start-up: a ``sitecustomize.py`` in
    ``folder``, first on the path (e.g. :func:`fake_datasets.checksums_sitecustomize`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT / "tests"), str(ROOT)])}


def run_cli(*args: object, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> tuple[int, str]:
    """:func:`run_advtrain`, returning ``(exit code, stderr + stdout)``."""
    done = run_advtrain(*args, cwd=cwd, env=env, timeout=timeout)
    return done.returncode, done.stderr + done.stdout
