"""Adversarial training methods side by side on the embedded MNIST digits: clean and robust accuracy, time per epoch.

Every method trains the same model (the quickstart's SmallCNN), on the same 4,000 digits, for the same number of
epochs, with the same optimizer, composing one ``configs/maximizer/*`` fragment (and, for the variants, command-line
overrides) onto ``recipes/quickstart.yaml`` (L∞ ε = 0.3, ramped from 0.1 over the first 4 epochs, PyTorch's
initialisation). Each last checkpoint is then evaluated on the first ``--samples`` test digits under advtrain's
``full`` suite (every attack of the zoo: DeepFool, TR, AN-PGD, BIM, PGD-40, APGD-CE/DLR, FGSM/FGM, Square; per-sample
worst case, every claimed adversarial example re-checked), at ε = 0.1, 0.2 and 0.3; the table gives PGD-40's number
next to the worst case, so that the gap between the attack used for checkpoint selection and the strongest
evaluation shows. Training time per epoch excludes validation (``EpochTimer``).

The variants show the seed's cost claims side by side: YOPO-5-3 and YOPO-5-10 against PGD-5 (the same number of full
passes) and PGD-40 (the robustness YOPO-5-10 should reach; seed 003, Table 1), and Fast AT against PGD-10.
Issue 16's methods: AWP against its base method (``pgd10-awp`` vs ``pgd10``, ``trades-awp`` vs ``trades``), MART
against TRADES, the EMA against the last weights (``pgd10-ema`` is ``pgd10``'s run, same seed and same trajectory,
evaluated on its averaged weights), and Free AT (m = 4) against PGD, for ceil(epochs / 4) epochs (``free-m4``, about
the passes of standard training) and for ceil(11 epochs / 4) (``free-m4-eqtime``, PGD-10's passes); N-FGSM and
FGSM + GradAlign against Fast AT (FGSM-RS) and PGD-10 (does catastrophic overfitting go away, at what cost per
batch).

    python benchmarks/train_compare.py [--epochs 10] [--methods standard pgd10 fast ...] [--samples 200] [--seed 0]
    python benchmarks/train_compare.py --cost-only [--cost-batches 10] [--cost-rounds 3] [--methods ...]

Prints a markdown table and writes ``train_compare.json`` (``--cost-only``: the training time per batch of each method,
measured in alternation, and ``train_compare_cost.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

_PGD = "--model.maximizer.init_args"
# name -> (configs/maximizer fragment or None for the quickstart's PGD-10, command-line overrides). PGD-m step sizes
# keep m·α ≈ 1.7 ε as the quickstart's PGD-10 (α = 0.05), except PGD-40, which uses Madry's MNIST α = 0.01. YOPO-5-3
# uses σ = 0.03 so that its m·n·σ (0.45) matches YOPO-5-10's (0.5): with the paper's MNIST σ = 0.01 three inner steps
# a round barely move η.
METHODS: dict[str, tuple[str | tuple[str, ...] | None, list[str]]] = {
    "standard": ("standard.yaml", []),
    "fast": ("fast_mnist.yaml", []),
    "pgd5": (None, [f"{_PGD}.steps", "5", f"{_PGD}.step_size", "0.1"]),
    "pgd10": (None, []),
    "yopo-5-3": ("yopo_mnist.yaml", [f"{_PGD}.n", "3", f"{_PGD}.sigma", "0.03"]),
    "yopo-5-10": ("yopo_mnist.yaml", []),
    "pgd40": (None, [f"{_PGD}.steps", "40", f"{_PGD}.step_size", "0.01"]),
    "trades": ("trades_mnist.yaml", []),
    "bilateral": ("bilateral_mnist.yaml", []),
    "mma": ("mma_mnist.yaml", []),
    "trlinf": ("trlinf_mnist.yaml", []),
    "ddn": ("ddn_mnist.yaml", []),
    "pgd10-awp": ("awp_mnist.yaml", []),
    "trades-awp": (("trades_mnist.yaml", "awp_mnist.yaml"), ["--model.weight_perturbation.init_args.gamma", "0.005"]),
    "mart": ("mart_mnist.yaml", []),
    "pgd10-ema": ("ema_mnist.yaml", []),
    "free-m4": ("free_mnist.yaml", []),
    "free-m4-eqtime": ("free_mnist.yaml", []),
    # Single-step methods that should not collapse (issue 16), against "fast" (FGSM-RS) and "pgd10".
    "nfgsm": ("nfgsm_mnist.yaml", []),
    "gradalign": ("gradalign_mnist.yaml", []),
}
#: Methods trained for ceil(epochs · k) epochs. Free AT's m = 4 replays make each epoch cost about 4 forward-backward
#: passes per minibatch: ``free-m4`` runs the passes of standard training (the paper's equal-cost setting, k = 1/4),
#: ``free-m4-eqtime`` those of PGD-10 (11 per minibatch: 10 attack steps and the update; k = 11/4), for Free AT against
#: PGD at equal wall time.
EPOCHS_SCALE = {"free-m4": (1, 4), "free-m4-eqtime": (11, 4)}


def _fragments(method: str) -> tuple[str, ...]:
    fragment = METHODS[method][0]
    return () if fragment is None else (fragment,) if isinstance(fragment, str) else fragment


def train(
    method: str, epochs: int, workdir: Path, extra: tuple[str, ...] = (), seed: int = 0
) -> tuple[torch.nn.Module, list[float]]:
    from advtrain.callbacks import EpochTimer
    from advtrain.cli import main

    overrides = METHODS[method][1]
    args = ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml")]
    for fragment in _fragments(method):
        args += ["--config", str(ROOT / "configs" / "maximizer" / fragment)]
    args += overrides
    num, den = EPOCHS_SCALE.get(method, (1, 1))
    epochs = -(-epochs * num // den)
    args += ["--seed_everything", str(seed), "--trainer.max_epochs", str(epochs), "--trainer.logger", "false",
             "--run_name", f"compare-{method}",
             "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
    # Each call trains afresh: its run folder (of an earlier round) goes, or fit would refuse the name.
    shutil.rmtree(workdir / "checkpoints" / f"compare-{method}", ignore_errors=True)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cli = main(args)
    finally:
        os.chdir(cwd)
    timer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EpochTimer))
    return cli.model.model.eval(), timer.epoch_seconds


def evaluate(model: torch.nn.Module, eps: float, samples: int, suite: str = "full") -> dict[str, float]:
    """Robust accuracy on the first ``samples`` test digits, per-sample worst case, every claim verified.

    ``suite="full"``: advtrain's ``full`` suite (every attack of the zoo) at ε/3, 2ε/3 and ε; the minimal-norm attacks
    in it give every ε at once. ``suite="autoattack"``: AutoAttack's standard version (APGD-CE, APGD-T, FAB-T,
    Square-5000, each on the points still robust) plus untargeted APGD-DLR, at ε only, escalating where a
    gradient-masking check fires (``adaptive``); the columns give each attack alone and the worst case."""
    from advtrain.data import MNIST5kDataModule
    from advtrain.evaluation import build_suite, evaluate_robustness
    from advtrain.evaluation.suites import SUITES

    dm = MNIST5kDataModule(batch_size=100, seed=0)
    dm.setup("test")
    if suite == "full":
        grid, entries, adaptive, names = [eps * k / 3 for k in (1, 2, 3)], "full", None, FULL_COLUMNS
    else:
        apgd_ce, *rest = SUITES["autoattack"]
        grid, entries, adaptive, names = [eps], [apgd_ce, SUITES["apgd"][1], *rest], True, AA_COLUMNS
    report = evaluate_robustness(model, dm.test_dataloader(), build_suite(entries, norm="linf", eps=eps, seed=0),
                                 norm="linf", eps=eps, eps_grid=grid, max_samples=samples, progress=False,
                                 seed=0, adaptive=adaptive).as_dict()  # fmt: skip
    row = {"clean": report["clean_accuracy"]}
    for name in names:
        row[name] = report["attacks"][name]["robust_accuracy"]
    for e, acc in report["robust_accuracy_all_by_eps"].items():
        row[f"worst@{float(e):.2g}"] = acc
    row["masking"] = " ".join(c["name"] for c in report["masking_checks"] if c["fired"]) or "-"
    if suite != "full":
        escalation = report.get("escalation")  # the worst case above includes the escalation's attacks
        row["autoattack"] = escalation["robust_accuracy_before"] if escalation else report["robust_accuracy_all"]
        row["escalated"] = report["robust_accuracy_all"]
    return row


FULL_COLUMNS = ("pgd", "apgd-ce", "apgd-dlr", "square", "tr")
AA_COLUMNS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


def cost_per_batch(methods: list[str], batches: int, rounds: int, workdir: Path) -> list[dict[str, float]]:
    """Training time per batch of each method, measured ``rounds`` times in alternation (method 1, 2, …, 1, 2, …) on
    ``batches`` batches without validation; the median over rounds. On a shared machine the load drifts over the
    minutes a full comparison takes, so epoch times measured one method after another compare less well than this."""
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    extra = ("--trainer.limit_train_batches", str(batches), "--trainer.limit_val_batches", "0")
    for _ in range(rounds):
        for method in methods:
            torch.manual_seed(0)
            _, epoch = train(method, 1, workdir, extra)
            seconds[method].append(epoch[0] / batches)
    base = statistics.median(seconds["pgd5"]) if "pgd5" in seconds else float("nan")
    return [
        {"method": m, "batch_ms": 1e3 * statistics.median(s), "cost_vs_pgd5": statistics.median(s) / base}
        for m, s in seconds.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--samples", type=int, default=200, help="test digits attacked by the full suite")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training runs (seed_everything)")
    parser.add_argument(
        "--suite",
        choices=("full", "autoattack"),
        default="full",
        help="full: every attack at ε/3, 2ε/3, ε; autoattack: AutoAttack + APGD-DLR at ε, adaptive",
    )
    parser.add_argument("--tag", default="", help="suffix of the result file (train_compare<tag>.json)")
    parser.add_argument("--cost-only", action="store_true", help="only the interleaved cost per batch")
    parser.add_argument("--cost-batches", type=int, default=10)
    parser.add_argument("--cost-rounds", type=int, default=3)
    opts = parser.parse_args()
    from _common import write_table

    os.environ.setdefault("WANDB_MODE", "disabled")
    if opts.cost_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = cost_per_batch(opts.methods, opts.cost_batches, opts.cost_rounds, Path(tmp))
        write_table("train_compare_cost", rows, ["method", "batch_ms", "cost_vs_pgd5"])
        return

    missing = [m for m in opts.methods if any(not (ROOT / "configs/maximizer" / f).is_file() for f in _fragments(m))]
    if missing:
        print(f"skipping {missing}: their configs/maximizer fragments do not exist yet", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m for m in opts.methods if m not in missing]:
            torch.manual_seed(opts.seed)
            model, seconds = train(method, opts.epochs, Path(tmp), seed=opts.seed)
            row = {"method": method, "seed": opts.seed, "epochs": len(seconds), "epoch_s": statistics.median(seconds)}
            row.update(evaluate(model, opts.eps, opts.samples, opts.suite))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for ref in ("standard", "pgd5"):
        base = next((r["epoch_s"] for r in rows if r["method"] == ref), None)
        for r in rows:
            r[f"cost_vs_{ref}"] = r["epoch_s"] / base if base else float("nan")
    columns = ["method", "seed", "epochs", "clean", *(FULL_COLUMNS if opts.suite == "full" else AA_COLUMNS)]
    if opts.suite == "full":
        columns += [k for k in rows[0] if k.startswith("worst@")] if rows else []
        columns += ["masking"]
    else:
        columns += ["autoattack", "masking", "escalated"]
    columns += ["epoch_s", "cost_vs_standard", "cost_vs_pgd5"]
    write_table(f"train_compare{opts.tag}", rows, columns)


if __name__ == "__main__":
    main()
