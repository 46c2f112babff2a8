"""advtrain's ``autoattack`` suite side by side with the official AutoAttack (``pyautoattack``), on the same models and
the same samples, in one process, interleaved.

Models (trained once and cached under ``benchmarks/results/cache/autoattack_compare/``; all the quickstart's SmallCNN
on the embedded MNIST digits, L∞ ε = 0.3):

* ``standard``: the quickstart recipe with standard training (no robustness: a sanity row).
* ``pgd``: the quickstart recipe (PGD-10 adversarial training through the CLI, 10 epochs).
* ``plain-pgd``: PGD-AT by a deliberately plain PyTorch loop that uses nothing from advtrain (``train_quality.py``'s
  loop, budget ramp over 4 epochs), trained for 20 epochs: long enough that its gradients mask (Square breaks points
  that every gradient attack misses).
* ``trades``: the quickstart recipe with ``configs/maximizer/trades_mnist.yaml`` (TRADES, β = 6).
* ``plain-pgd-noramp``: the same plain PGD-AT loop at ε = 0.3 from the first step (no budget ramp), 5 epochs: its
  gradients mask at this point of training (Square breaks digits that APGD-CE misses; by 10 epochs they no longer do).
* ``fast``: the quickstart recipe with ``configs/maximizer/fast_mnist.yaml`` (FGSM with random init), 10 epochs:
  catastrophic overfitting, the black box beats every gradient attack.

For each model, on the first ``--samples`` test digits: the official ``AutoAttack(version="standard")``
(APGD-CE, APGD-T, FAB-T, Square-5000, each on the points still robust) and advtrain's ``autoattack`` suite (the same
protocol), timed one after the other in the same process, the order alternating between models; then each attack
alone on every correctly classified digit (official ``run_standard_evaluation_individual`` against advtrain without
the cascade), so that each of APGD-T, FAB-T and Square can be compared with its official counterpart.
advtrain's number must be ≤ the official one everywhere (lower is a stronger attack). Where a gradient-masking check
fires, advtrain's suite escalates (``adaptive``, its default for ``autoattack``): the table gives the suite's own
number and time (the same protocol as the official code) and, apart, the escalated number and the escalation's time.
Times are wall and CPU seconds of the process: run with ``OMP_NUM_THREADS=1`` on a shared machine, where the CPU
time ratio (``cpu_speedup``) does not move with the other jobs' load as the wall time ratio does.

Seed study (``--seeds``): the stochastic attacks (random starts, Square's windows) land a digit or two apart from one
seed to the next, so single runs of the two sides can differ by that much either way; ``--seeds 0 1 2 3 4`` runs both
sides with each seed (``--only square``: that attack alone) and compares the distributions, and the digits each side
breaks that the other never does. ``--digits`` restricts it to given test digits (e.g. the ones that change between
runs, with many more seeds). ``--side`` runs one side, so that the two can run in two processes; ``--summarize`` merges
their result files.

    python benchmarks/autoattack_compare.py [--models standard pgd plain-pgd trades] [--samples 200] [--train-only]
    python benchmarks/autoattack_compare.py --models pgd --samples 100 --seeds 0 1 2 3 4 --only square

Prints a markdown table and writes ``autoattack_compare.json`` (and ``..._individual.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import CACHE, write_table  # noqa: E402

EPS = 0.3
MODELS = ("standard", "pgd", "plain-pgd", "trades", "plain-pgd-noramp", "fast")
FOLDER = CACHE / "autoattack_compare"
# name -> (configs/maximizer fragment or None for the quickstart's PGD-10, epochs)
RECIPES = {"standard": ("standard.yaml", 3), "pgd": (None, 10), "trades": ("trades_mnist.yaml", 10),
           "fast": ("fast_mnist.yaml", 10)}  # fmt: skip
# plain-loop models -> (epochs, epochs of the budget ramp; 0 = none)
PLAIN = {"plain-pgd": (20, 4), "plain-pgd-noramp": (5, 0)}


def _small_cnn() -> nn.Module:
    from advtrain.models import create_model

    return create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)


def _train_cli(name: str) -> dict:
    """Trains ``name`` with ``python -m advtrain fit`` on the quickstart recipe; returns the classifier's state dict."""
    from advtrain.training.checkpoint import load_training_module

    fragment, epochs = RECIPES[name]
    run = f"aa-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    args = [sys.executable, "-m", "advtrain", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml")]
    if fragment is not None:
        args += ["--config", str(ROOT / "configs" / "maximizer" / fragment)]
    args += ["--seed_everything", "0", "--trainer.max_epochs", str(epochs), "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--run_name", run]  # fmt: skip
    subprocess.run(args, cwd=FOLDER, env={**os.environ, "WANDB_MODE": "disabled"}, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    module = load_training_module(FOLDER / "checkpoints" / run / "last.ckpt")
    return module.model.state_dict()


def _train_plain(name: str) -> nn.Module:
    from train_quality import data, train_plain

    train_x, train_y, _, _ = data(1)
    epochs, ramp = PLAIN[name]
    return train_plain(0, epochs, "torch", ramp, train_x, train_y)


def load(name: str) -> nn.Module:
    """The cached model ``name``, trained first when missing."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    path = FOLDER / f"{name}.pt"
    if name in PLAIN:
        if not path.is_file():
            torch.save(_train_plain(name).state_dict(), path)
        from train_quality import plain_cnn

        net = plain_cnn()
    else:
        if not path.is_file():
            torch.save(_train_cli(name), path)
        net = _small_cnn()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def test_digits(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    from train_quality import data

    _, _, x, y = data(samples)
    return x, y


def official(model: nn.Module, x: torch.Tensor, y: torch.Tensor, individual: bool, seed: int = 0,
             only: str | None = None) -> dict:  # fmt: skip
    """The official AutoAttack, standard version: robust accuracy and the digits still robust (or, ``individual``,
    per attack alone); ``only``: that attack of the standard version alone, on every correctly classified digit."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=seed, device="cpu")
    if only is not None:
        adversary.attacks_to_run = [only]  # its standard-version configuration, run alone
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    if individual:
        advs = adversary.run_standard_evaluation_individual(x, y, batch_size=len(x))
        out = {}
        for attack, (adv, _) in advs.items():
            with torch.no_grad():
                out[attack] = (model(adv).argmax(1) == y).float().mean().item()
        return {"clean": clean, "attacks": out, "seconds": time.perf_counter() - start}
    adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
    with torch.no_grad():
        robust = model(adv).argmax(1) == y
    return {"clean": clean, "robust": robust.float().mean().item(), "seconds": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu,
            "robust_digits": robust.nonzero().flatten().tolist()}  # fmt: skip


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cascade: bool, suite: str, adaptive: bool,
         seed: int = 0, only: str | None = None) -> dict:  # fmt: skip
    """advtrain's suite; with ``adaptive`` the escalation runs when a masking check fires, and the suite's own number,
    time and robust digits (``robust``, ``seconds``, ``robust_digits``) are reported apart from the escalated ones;
    ``only``: the suite's attack of that label alone."""
    from advtrain.evaluation import build_suite, evaluate_robustness
    from advtrain.evaluation.records import select_attacks
    from advtrain.evaluation.report import robust_under_all
    from advtrain.evaluation.suites import suite_entries

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    alone = None
    if only is not None:
        entries = [entry for entry in suite_entries(suite) if entry.label == only]
        alone, suite, adaptive = build_suite(entries, norm="linf", eps=EPS, seed=seed), None, False
    start, cpu = time.perf_counter(), time.process_time()
    result = evaluate_robustness(model, loader, alone, suite=suite, norm="linf", eps=EPS, eps_grid=[EPS],
                                 cascade=cascade, progress=False, seed=seed, adaptive=adaptive)  # fmt: skip
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    report = result.as_dict()
    escalation = report.get("escalation")
    n_suite = len(report["attacks"]) - (len(escalation["steps"]) if escalation else 0)
    standing = robust_under_all(select_attacks(result.data, slice(0, n_suite)), [EPS])[:, 0]
    robust_digits = result.data["index"][standing].tolist()
    attacks = {name: a["robust_accuracy"] for name, a in report["attacks"].items()}
    extra_s = sum(step["seconds"] for step in escalation["steps"]) if escalation else 0.0
    return {"clean": report["clean_accuracy"], "attacks": attacks,
            "robust": escalation["robust_accuracy_before"] if escalation else report["robust_accuracy_all"],
            "escalated": report["robust_accuracy_all"], "seconds": seconds - extra_s, "escalation_s": extra_s,
            # the escalation's share of the CPU time, in proportion to its share of the wall time
            "cpu_s": cpu_s * (1 - extra_s / seconds),
            "masking": [c["name"] for c in report["masking_checks"] if c["fired"]],
            "steps": {s["attack"]: s["robust_after"] for s in escalation["steps"]} if escalation else {},
            "robust_digits": robust_digits}  # fmt: skip


# advtrain's label of each official attack
PAIRS = {"apgd-ce": "apgd-ce", "apgd-t": "apgd-t", "fab-t": "fab-t", "square": "square"}


def seed_study(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, seeds: list[int], sides: list[str],
               only: str | None, suite: str, digits: list[int]) -> list[dict]:  # fmt: skip
    """Both sides with each seed on the same digits (AutoAttack's standard version, or the attack ``only`` alone):
    one row per model, seed and side, with the digits still robust (``digits[i]`` names row ``i`` of ``x``).
    Stochastic attacks (random starts, Square's windows) land a digit or two apart from one seed to the next; the
    comparison that means something is between the two distributions, not between two single runs."""
    rows = []
    for name, model in models.items():
        for seed in seeds:
            for side in sides:
                if side == "official":
                    out = official(model, x, y, False, seed=seed, only=only)
                else:
                    out = ours(model, x, y, True, suite, False, seed=seed, only=only)
                rows.append({"model": name, "attack": only or suite, "seed": seed, "side": side,
                             "robust": out["robust"], "seconds": out["seconds"], "cpu_s": out["cpu_s"],
                             "robust_digits": [digits[i] for i in out["robust_digits"]]})  # fmt: skip
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "robust_digits"}), flush=True)
    return rows


def summarize_seeds(rows: list[dict]) -> list[dict]:
    """Per model and attack: each side's robust accuracy over the seeds (mean, min, max), and the digits one side
    breaks in some seed that the other side breaks in none."""
    out = []
    for key in sorted({(r["model"], r["attack"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["attack"]) == key]
        stats = {}
        for side in ("official", "advtrain"):
            runs = [r for r in group if r["side"] == side]
            values = [100 * r["robust"] for r in runs]
            never_broken = set.intersection(*(set(r["robust_digits"]) for r in runs)) if runs else set()
            stats[side] = {"seeds": len(runs), "mean": sum(values) / len(values) if values else None,
                           "min": min(values, default=None), "max": max(values, default=None),
                           "never_broken": never_broken}  # fmt: skip
        off, adv = stats["official"], stats["advtrain"]
        out.append({"model": key[0], "attack": key[1], "seeds": f"{off['seeds']}/{adv['seeds']}",
                    "official_mean": off["mean"], "official_range": _span(off),
                    "advtrain_mean": adv["mean"], "advtrain_range": _span(adv),
                    "only_official_breaks": len(adv["never_broken"] - off["never_broken"]),
                    "only_advtrain_breaks": len(off["never_broken"] - adv["never_broken"])})  # fmt: skip
    return out


def _span(stats: dict) -> str:
    return "-" if stats["min"] is None else f"{stats['min']:.1f}–{stats['max']:.1f}"


SEED_COLUMNS = ["model", "attack", "seeds", "official_mean", "official_range", "advtrain_mean", "advtrain_range",
                "only_official_breaks", "only_advtrain_breaks"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--suite", default="autoattack")
    parser.add_argument("--train-only", action="store_true", help="train (and cache) the models, then stop")
    parser.add_argument("--no-individual", action="store_true", help="skip the attack-by-attack comparison")
    parser.add_argument("--no-escalation", action="store_true", help="advtrain without its escalation")
    parser.add_argument("--individual-only", action="store_true", help="only the attack-by-attack comparison")
    parser.add_argument("--individual-samples", type=int, default=None, help="digits of it (default: --samples)")
    parser.add_argument("--tag", default="", help="suffix of the result files (for runs of model subsets)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seed study: both sides with each of these seeds (not timed side by side)")  # fmt: skip
    parser.add_argument("--only", choices=sorted(PAIRS), default=None, help="seed study of this attack alone")
    parser.add_argument("--digits", nargs="+", type=int, default=None,
                        help="seed study on these test digits (indices) instead of the first --samples")  # fmt: skip
    parser.add_argument("--side", choices=["both", "official", "advtrain"], default="both",
                        help="seed study: one side only (to run the two sides in two processes)")  # fmt: skip
    parser.add_argument("--summarize", nargs="+", type=Path, default=None, metavar="JSON",
                        help="summarize the rows of seed-study result files (e.g. the two sides' runs)")  # fmt: skip
    opts = parser.parse_args()
    if opts.summarize:
        rows = [row for path in opts.summarize for row in json.loads(path.read_text())]
        write_table(f"autoattack_compare_seeds_summary{opts.tag}", summarize_seeds(rows), SEED_COLUMNS)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    models = {name: load(name) for name in opts.models}
    if opts.train_only:
        return
    digits = opts.digits if opts.digits and opts.seeds is not None else list(range(opts.samples))
    x, y = test_digits(max(digits) + 1)
    x, y = x[digits], y[digits]
    if opts.seeds is not None:
        sides = ["official", "advtrain"] if opts.side == "both" else [opts.side]
        rows = seed_study(models, x, y, opts.seeds, sides, opts.only, opts.suite, digits)
        write_table(f"autoattack_compare_seeds{opts.tag}", rows, [c for c in rows[0] if c != "robust_digits"])
        write_table(f"autoattack_compare_seeds_summary{opts.tag}", summarize_seeds(rows), SEED_COLUMNS)
        return
    n_individual = opts.individual_samples or opts.samples
    rows, individual = [], []
    for i, (name, model) in enumerate(models.items()):
        if not opts.individual_only:
            # Alternate who goes first, so that a drift in the machine's load does not favour one side.
            runs = [("official", lambda m=model: official(m, x, y, False)),
                    ("advtrain", lambda m=model: ours(m, x, y, True, opts.suite, not opts.no_escalation))]  # fmt: skip
            order = runs if i % 2 == 0 else runs[::-1]
            results = {label: run() for label, run in order}
            off, adv = results["official"], results["advtrain"]
            rows.append({
                "model": name, "clean": adv["clean"], "official": off["robust"], "advtrain": adv["robust"],
                "official_s": off["seconds"], "advtrain_s": adv["seconds"], "speedup": off["seconds"] / adv["seconds"],
                "official_cpu_s": off["cpu_s"], "advtrain_cpu_s": adv["cpu_s"],
                "cpu_speedup": off["cpu_s"] / adv["cpu_s"],
                "masking": " ".join(adv["masking"]) or "-", "escalated": adv["escalated"],
                "escalation_s": adv["escalation_s"],
                "steps": " ".join(f"{k} {100 * v:.1f}%" for k, v in adv["steps"].items()) or "-",
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        if not opts.no_individual:
            xi, yi = x[:n_individual], y[:n_individual]
            off = official(model, xi, yi, True)
            adv = ours(model, xi, yi, False, opts.suite, False)
            for attack, label in PAIRS.items():
                row = {"official": off["attacks"].get(attack), "advtrain": adv["attacks"].get(label)}
                individual.append({"model": name, "samples": n_individual, "attack": attack, **row})
            print(json.dumps(individual[-len(PAIRS) :]), flush=True)
    columns = [
        "model",
        "clean",
        "official",
        "advtrain",
        "official_s",
        "advtrain_s",
        "speedup",
        "cpu_speedup",
        "masking",
        "escalated",
        "escalation_s",
        "steps",
    ]
    if rows:
        write_table(f"autoattack_compare{opts.tag}", rows, columns)
    if individual:
        write_table(f"autoattack_compare_individual{opts.tag}", individual,
                    ["model", "samples", "attack", "official", "advtrain"])  # fmt: skip


if __name__ == "__main__":
    main()
