"""``advtrain evaluate`` (full suite, worst case) against an independent APGD evaluation (torchattacks, adv-lib).

Trains the quickstart recipe (PGD adversarial training of the SmallCNN on the embedded MNIST digits) and its
standard-training baseline through the CLI, with few epochs, or reuses their checkpoints; runs
``python -m advtrain evaluate --suite full`` on the first test digits; then attacks the same digits with
torchattacks' and adv-lib's APGD-CE and APGD-DLR (100 iterations, L∞ ε = 0.3), re-scored with a fresh forward pass
after clipping to the ball and box. advtrain's worst case must match or undercut every peer number.

    python benchmarks/evaluate_compare.py [--epochs 3] [--samples 200] [--eps-grid 0.1 0.2 0.3]

Prints a markdown table and writes ``benchmarks/results/evaluate_compare.json``.
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
from _common import RESULTS, import_adv_lib, import_torchattacks, write_table

ROOT = Path(__file__).resolve().parents[1]
OUT = RESULTS / "evaluate_compare"


def _cli(args: list[str]) -> float:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "advtrain", *args], cwd=OUT, env=env, check=True)
    return time.perf_counter() - start


def _checkpoint(name: str, extra: list[str], epochs: int) -> tuple[Path, float | None]:
    """Trains (or reuses) ``checkpoints/<name>/last.ckpt`` of the quickstart recipe with ``extra`` configs."""
    ckpt = OUT / "checkpoints" / name / "last.ckpt"
    if ckpt.is_file():
        return ckpt, None
    args = ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), *extra, "--run_name", name,
            "--trainer.max_epochs", str(epochs), "--trainer.logger", "false"]  # fmt: skip
    return ckpt, _cli(args)


def _peer_attacks(eps: float, steps: int):
    ta, al = import_torchattacks(), import_adv_lib()
    attacks = {}
    for loss in ("ce", "dlr"):
        if ta is not None:
            attacks[f"torchattacks APGD-{loss.upper()}"] = lambda m, x, y, loss=loss: ta.APGD(
                m, norm="Linf", eps=eps, steps=steps, loss=loss, seed=0
            )(x, y)
        if al is not None:
            attacks[f"adv-lib APGD-{loss.upper()}"] = lambda m, x, y, loss=loss: al.apgd(
                m, x, y, eps=eps, norm=float("inf"), n_iter=steps, loss_function=loss
            )
    return attacks


def _peer_evaluation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> dict:
    """Robust accuracy per peer attack and their per-sample worst case, each claim re-scored by us."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    robust_all = correct.clone()
    out = {}
    for name, attack in _peer_attacks(eps, steps).items():
        start = time.perf_counter()
        adv = attack(model, x, y)
        seconds = time.perf_counter() - start
        adv = (x + (adv.detach() - x).clamp(-eps, eps)).clamp(0.0, 1.0)
        with torch.no_grad():
            robust = correct & (model(adv).argmax(1) == y)
        robust_all &= robust
        out[name] = {"robust_accuracy": float(robust.float().mean()), "seconds": round(seconds, 1)}
    out["peers worst case"] = {"robust_accuracy": float(robust_all.float().mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of both models (recipe: 10)")
    parser.add_argument("--samples", type=int, default=200, help="first test digits to evaluate")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--eps-grid", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--steps", type=int, default=100, help="APGD iterations of the peers")
    parser.add_argument("--suite", default="full")
    opts = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    from advtrain.models.reference import reference_batch
    from advtrain.training.checkpoint import load_training_module

    x, y = reference_batch(opts.samples)
    variants = {"pgd (quickstart)": [], "standard": ["--config", str(ROOT / "configs" / "maximizer" / "standard.yaml")]}
    rows, details = [], {}
    for label, extra in variants.items():
        name = "quickstart-pgd" if not extra else "quickstart-standard"
        ckpt, fit_s = _checkpoint(name, extra, opts.epochs)
        report_dir = OUT / f"eval-{name}"
        grid = json.dumps(sorted(set(opts.eps_grid) | {opts.eps}))
        eval_s = _cli([
            "evaluate", "--config", str(ROOT / "recipes" / "quickstart.yaml"), *extra, "--trainer.logger", "false",
            "--ckpt_path", str(ckpt), "--suite", opts.suite, "--eps", str(opts.eps), "--eps_grid", grid,
            "--max_samples", str(opts.samples), "--output", str(report_dir), "--progress", "false",
        ])  # fmt: skip
        report = json.loads((report_dir / "report.json").read_text())
        model = load_training_module(ckpt).model.eval()
        start = time.perf_counter()
        peers = _peer_evaluation(model, x, y, opts.eps, opts.steps)
        peers_s = time.perf_counter() - start
        key = f"{opts.eps:.4g}"
        ours = {n: a["robust_accuracy_by_eps"][key] for n, a in report["attacks"].items()}
        row = {
            "model": label,
            "clean": report["clean_accuracy"],
            "advtrain APGD-CE": ours.get("apgd-ce"),
            "advtrain APGD-DLR": ours.get("apgd-dlr"),
            "advtrain All": report["robust_accuracy_all"],
            **{n: p["robust_accuracy"] for n, p in peers.items()},
            "fit (s)": None if fit_s is None else round(fit_s, 1),
            "evaluate (s)": round(eval_s, 1),
            "peers (s)": round(peers_s, 1),
            "masking checks fired": ", ".join(c["name"] for c in report["masking_checks"] if c["fired"]) or "none",
        }
        single = [p["robust_accuracy"] for n, p in peers.items() if n != "peers worst case"]
        row["All <= every peer attack"] = all(row["advtrain All"] <= p + 1e-12 for p in single)
        row["All <= peers' worst case"] = row["advtrain All"] <= peers["peers worst case"]["robust_accuracy"] + 1e-12
        rows.append(row)
        details[label] = {"report": report, "peers": peers}
    columns = list(rows[0])
    write_table("evaluate_compare", rows, columns)
    (OUT / "details.json").write_text(json.dumps(details, indent=2, default=str))
    print(f"\n{opts.samples} test digits, L∞ ε = {opts.eps}; advtrain APGD columns are cumulative in the cascade "
          f"(after the minimal-norm and earlier attacks); reports in {OUT}")  # fmt: skip
    for label, d in details.items():
        print(f"\n{label}: robust accuracy per ε (advtrain All): {d['report']['robust_accuracy_all_by_eps']}")
        for name, a in d["report"]["attacks"].items():
            print(f"  {name:10s} {a['kind']:8s} success {a['success_rate']!s:>8.6s} median norm "
                  f"{a['median_norm']!s:>8.6s} fwd {a['forward_passes']:>8d} bwd {a['backward_passes']:>8d} "
                  f"{a['seconds']:>7.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
