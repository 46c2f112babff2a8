"""Adversarial training methods side by side on the embedded MNIST digits: clean and robust accuracy, time per epoch.

Every method trains the same model (the quickstart's SmallCNN), on the same 4,000 digits, for the same number of
epochs, with the same optimizer, composing one ``configs/maximizer/*`` fragment onto ``recipes/quickstart.yaml``
(L∞ ε = 0.3). Each last checkpoint is then evaluated on the 500 test digits under APGD-CE and APGD-DLR (100 steps
each, per-sample worst case) — a stronger evaluation than the PGD used for checkpoint selection. Training time per
epoch excludes validation (``EpochTimer``).

    python benchmarks/train_compare.py [--epochs 10] [--methods standard pgd fast ...] [--out benchmarks/results]

Prints a markdown table and writes ``train_compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

FRAGMENTS = {
    "standard": "standard.yaml",
    "pgd": None,  # the quickstart recipe itself: PGD-10
    "fast": "fast_mnist.yaml",
    "trades": "trades_mnist.yaml",
    "bilateral": "bilateral_mnist.yaml",
    "yopo": "yopo_mnist.yaml",
    "mma": "mma_mnist.yaml",
    "ddn": "ddn_mnist.yaml",
    "trlinf": "trlinf_mnist.yaml",
}


def train(method: str, epochs: int, workdir: Path) -> tuple[torch.nn.Module, list[float]]:
    from advtrain.callbacks import EpochTimer
    from advtrain.cli import main

    args = ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml")]
    if FRAGMENTS[method] is not None:
        args += ["--config", str(ROOT / "configs" / "maximizer" / FRAGMENTS[method])]
    args += ["--trainer.max_epochs", str(epochs), "--trainer.logger", "false", "--run_name", f"compare-{method}",
             "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cli = main(args)
    finally:
        os.chdir(cwd)
    timer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EpochTimer))
    return cli.model.model.eval(), timer.epoch_seconds


def evaluate(model: torch.nn.Module, eps: float, steps: int) -> dict[str, float]:
    from advtrain.attacks import APGD
    from advtrain.data import MNIST5kDataModule
    from advtrain.evaluation import evaluate_robustness

    dm = MNIST5kDataModule(batch_size=250)
    dm.setup("test")
    attacks = {
        "apgd-ce": APGD(norm="linf", eps=eps, steps=steps, loss="ce", seed=0),
        "apgd-dlr": APGD(norm="linf", eps=eps, steps=steps, loss="dlr", seed=0),
    }
    report = evaluate_robustness(model, dm.test_dataloader(), attacks, progress=False).as_dict()
    return {
        "clean": report["clean_accuracy"],
        "apgd_ce": report["attacks"]["apgd-ce"]["robust_accuracy"],
        "apgd_dlr": report["attacks"]["apgd-dlr"]["robust_accuracy"],
        "robust_all": report["robust_accuracy_all"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(FRAGMENTS), choices=list(FRAGMENTS))
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=100)
    opts = parser.parse_args()
    from _common import write_table

    os.environ.setdefault("WANDB_MODE", "disabled")
    missing = [m for m in opts.methods if FRAGMENTS[m] and not (ROOT / "configs/maximizer" / FRAGMENTS[m]).is_file()]
    if missing:
        print(f"skipping {missing}: their configs/maximizer fragments do not exist yet", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m for m in opts.methods if m not in missing]:
            torch.manual_seed(0)
            model, seconds = train(method, opts.epochs, Path(tmp))
            row = {"method": method, "epochs": opts.epochs, "epoch_s": statistics.median(seconds)}
            row.update(evaluate(model, opts.eps, opts.steps))
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = next((r["epoch_s"] for r in rows if r["method"] == "standard"), None)
    for r in rows:
        r["epoch_cost_vs_standard"] = r["epoch_s"] / base if base else float("nan")
    columns = ["method", "epochs", "clean", "apgd_ce", "apgd_dlr", "robust_all", "epoch_s", "epoch_cost_vs_standard"]
    write_table("train_compare", rows, columns)


if __name__ == "__main__":
    main()
