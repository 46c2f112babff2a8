"""Training quality against an independent reference: advtrain's quickstart against a deliberately plain PyTorch loop.

Both train the same network (the Carlini-Wagner MNIST CNN) on the same 4,000 embedded digits at the quickstart's
settings — PGD-10 L∞ (α = 0.05, random start, attack in eval mode, last iterate), cross-entropy on the adversarial
batch, Adam 1e-3, batch 64 — for several seeds each, and both are evaluated the same way on the same held-out test
digits: clean accuracy, PGD-40, APGD-CE-100, and the worst case of advtrain's ``full`` suite (every attack of the zoo).

The plain loop below uses nothing from advtrain: its own network definition, its own PGD, its own loop. What it shares
with advtrain is only the data (the digits are read from the package's file, split by the same indices) and the
evaluation. Each ``--variants`` entry changes one thing at a time, so that a gap can be traced to its cause:

* ``advtrain``: ``python -m advtrain fit --config recipes/quickstart.yaml --seed_everything S`` (extra flags with
  ``--advtrain-args``, e.g. ``"--model.arch_kwargs '{init: he}'"``, labelled with ``--tag``).
* ``advtrain-standard``: the same recipe with ``configs/maximizer/standard.yaml`` (standard training), the baseline.
* ``plain``: the plain loop, PyTorch's default initialisation (SmallCNN's ``init="torch"``).
* ``plain-he``: the plain loop with He-normal (fan_in) weights and zero biases on every layer but the last
  (SmallCNN's ``init="he"``, its default before this comparison).
* ``plain-ref``: the plain loop initialised as the DDN/TRADES/YOPO code initialises this network: He-normal
  convolutions, PyTorch's default hidden linear layers, a zero last layer (SmallCNN's ``init="reference"``).
* ``plain-ramp``: ``plain`` with ε (and α with it) ramped linearly from ε/3 to ε over the first 4 epochs, per
  optimizer step (the quickstart's ``BudgetRamp``).

    python benchmarks/train_quality.py --variants advtrain plain --seeds 0 1 2 [--epochs 10] [--suite full]

Prints a markdown table (per seed and mean ± std per variant) and writes ``train_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS  # noqa: E402  (also tunes the CPU allocator for every run)

EPS, ALPHA, STEPS, BATCH, LR = 0.3, 0.05, 10, 64, 1e-3
# variant -> (initialisation, epochs of the linear ε ramp from ε/3; 0 = none)
PLAIN = {"plain": ("torch", 0), "plain-he": ("he", 0), "plain-ref": ("reference", 0), "plain-ramp": ("torch", 4)}


# ------------------------------------------------------------------------------------------------ the plain loop


def plain_cnn(init: str = "torch") -> nn.Module:
    """The Carlini-Wagner MNIST CNN written out: 32-32-pool-64-64-pool, FC 200-200-10, dropout 0.5."""
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, 10),
    )  # fmt: skip
    layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    if init in ("he", "reference"):
        for m in layers[:-1]:
            if init == "he" or isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(layers[-1].bias)
    if init == "reference":
        nn.init.zeros_(layers[-1].weight)
    return net


def plain_pgd(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    """Madry et al.'s PGD: random start in the ball, ``STEPS`` signed-gradient steps, clip to ball and box."""
    was_training = net.training
    net.eval()
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(STEPS):
        delta.requires_grad_(True)
        loss = F.cross_entropy(net(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    net.train(was_training)
    return (x + delta).detach()


def train_plain(seed: int, epochs: int, init: str, ramp_epochs: int, train_x, train_y) -> nn.Module:
    torch.manual_seed(seed)
    net = plain_cnn(init)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    n = train_x.shape[0]
    batches = (n + BATCH - 1) // BATCH
    for epoch in range(epochs):
        order = torch.randperm(n)
        net.train()
        for b in range(batches):
            idx = order[b * BATCH : (b + 1) * BATCH]
            x, y = train_x[idx], train_y[idx]
            scale = 1.0 if ramp_epochs == 0 else min(1.0, 1 / 3 + (2 / 3) * (epoch + b / batches) / ramp_epochs)
            x_adv = plain_pgd(net, x, y, EPS * scale, ALPHA * scale)
            loss = F.cross_entropy(net(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


# ------------------------------------------------------------------------------------------------ advtrain


def train_advtrain(seed: int, epochs: int, workdir: Path, extra: list[str], name: str = "advtrain") -> nn.Module:
    from advtrain.training.checkpoint import load_training_module

    run = f"{name}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh run folder every time
    args = [sys.executable, "-m", "advtrain", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--seed_everything", str(seed), "--data.init_args.seed", "0", "--trainer.max_epochs", str(epochs),
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--run_name", run, *extra]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run(args, cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL)
    module = load_training_module(workdir / "checkpoints" / run / "last.ckpt")
    return module.model.eval()


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(net: nn.Module, test_x, test_y, suite: str) -> dict[str, float]:
    from advtrain.evaluation import build_suite, evaluate_robustness

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test_x, test_y), batch_size=100)
    entries = build_suite(suite, norm="linf", eps=EPS, seed=0)
    report = evaluate_robustness(net, loader, entries, norm="linf", eps=EPS, eps_grid=[EPS], progress=False,
                                 seed=0).as_dict()  # fmt: skip
    row = {"clean": report["clean_accuracy"], "worst": report["robust_accuracy_all"]}
    for name, attack in report["attacks"].items():
        row[name] = attack["robust_accuracy"]
    row["masking"] = [c["name"] for c in report["masking_checks"] if c["fired"]]
    return row


def data(test_samples: int):
    from advtrain.data import MNIST5kDataModule

    dm = MNIST5kDataModule(batch_size=BATCH, seed=0)
    dm.setup("fit")
    ds = dm.train_dataset.dataset
    train_idx, test_idx = dm.train_dataset.indices, dm.test_dataset.indices[:test_samples]
    return ds.images[train_idx], ds.labels[train_idx], ds.images[test_idx], ds.labels[test_idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["advtrain", "plain"],
                        choices=["advtrain", "advtrain-standard", *PLAIN])  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--test-samples", type=int, default=200)
    parser.add_argument("--suite", default="full", choices=["quick", "apgd", "autoattack", "standard", "full"])
    parser.add_argument("--advtrain-args", default="", help="extra flags for advtrain fit, one string")
    parser.add_argument("--tag", default="", help="label of the advtrain row (what --advtrain-args changes)")
    parser.add_argument("--out", default=str(RESULTS / "train_quality"))
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = data(opts.test_samples)
    results_file = out / "train_quality.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    for variant in opts.variants:
        for seed in opts.seeds:
            start = time.perf_counter()
            if variant.startswith("advtrain"):
                extra = shlex.split(opts.advtrain_args)
                if variant == "advtrain-standard":
                    extra += ["--config", str(ROOT / "configs" / "maximizer" / "standard.yaml")]
                net = train_advtrain(seed, opts.epochs, out, extra, name=variant)
            else:
                init, ramp = PLAIN[variant]
                net = train_plain(seed, opts.epochs, init, ramp, train_x, train_y)
            fit_s = time.perf_counter() - start
            name = variant + (f" {opts.tag}" if opts.tag and variant.startswith("advtrain") else "")
            row = {"variant": name, "seed": seed, "epochs": opts.epochs, "fit_s": round(fit_s, 1),
                   **evaluate(net, test_x, test_y, opts.suite)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            results_file.write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    cols = ["clean", "pgd", "apgd-ce", "worst"]
    print("\n| training | seed | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
    for r in rows:
        print(
            f"| {r['variant']} | {r['seed']} | "
            + " | ".join(f"{100 * r.get(c, float('nan')):.1f}%" for c in cols)
            + " |"
        )
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    print("\n| training | seeds | worst case, mean ± std (min–max) |\n|---|---|---|")
    for v, rs in by.items():
        w = [100 * r["worst"] for r in rs]
        sd = statistics.stdev(w) if len(w) > 1 else 0.0
        print(f"| {v} | {len(w)} | {statistics.mean(w):.1f} ± {sd:.1f} ({min(w):.1f}–{max(w):.1f}) |")


if __name__ == "__main__":
    main()
