"""Quickstart, PGD-trained versus standard-trained: wall time, clean and robust accuracy.

Trains ``recipes/quickstart.yaml`` twice through the CLI — as written (PGD adversarial training) and with
``configs/maximizer/standard.yaml`` composed on top (standard training, same model, data, epochs, optimizer) —
then evaluates both final checkpoints on the embedded test split (500 digits) with ``python -m advtrain evaluate``
under L∞ PGD-50 with 2 restarts at the recipe's ε (≥ 40 steps, as a robust-accuracy claim needs).

    python benchmarks/quickstart_compare.py [--epochs N] [--out benchmarks/results/quickstart]

Prints a markdown table and writes ``results.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "advtrain", *args], cwd=cwd, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's max_epochs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quickstart"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=2)
    opts = parser.parse_args()
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    variants = {"pgd": [], "standard": ["--config", str(ROOT / "configs" / "maximizer" / "standard.yaml")]}
    rows = {}
    for name, extra in variants.items():
        common = ["--config", recipe, *extra, "--run_name", f"quickstart-{name}"]
        if opts.epochs is not None:
            common += ["--trainer.max_epochs", str(opts.epochs)]
        shutil.rmtree(out / "checkpoints" / f"quickstart-{name}", ignore_errors=True)  # trains afresh each time
        fit_s = _run(["fit", *common, "--trainer.logger", "false"], cwd=out)
        ckpt = out / "checkpoints" / f"quickstart-{name}" / "last.ckpt"
        report_dir = out / f"eval-{name}"
        _run(["evaluate", *common, "--ckpt_path", str(ckpt), "--steps", str(opts.steps), "--restarts",
              str(opts.restarts), "--output", str(report_dir), "--progress", "false"], cwd=out)  # fmt: skip
        report = json.loads((report_dir / "report.json").read_text())
        rows[name] = {
            "fit_wall_s": round(fit_s, 1),
            "clean_accuracy": report["clean_accuracy"],
            "robust_accuracy": report["robust_accuracy_all"],
            "attack": next(iter(report["attacks"].values()))["config"],
            "samples": report["samples"],
        }
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\n| training | fit wall time (s) | clean acc. | robust acc. (PGD-{opts.steps}, {opts.restarts} restarts) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['fit_wall_s']:.0f} | {100 * r['clean_accuracy']:.1f}% | {100 * r['robust_accuracy']:.1f}% |"
        )
    print(f"\n{rows['pgd']['samples']} test digits; attack: {rows['pgd']['attack']}; results in {out}")


if __name__ == "__main__":
    main()
