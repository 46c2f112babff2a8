"""Full-zoo evaluation as one cascade against the same attacks run one after another (issue 6).

On the trained reference SmallCNN (standard training, cached) and the first ``--n`` embedded MNIST test digits, runs
``evaluate_robustness`` with the ``--suite`` over the ``--eps-grid`` twice in one process: with the cascade (each
budgeted attack only attacks the samples still robust at that ε, minimal-norm attacks run once for the whole grid)
and without it (every attack on every sample at every ε: the attacks one after another). Prints the wall time, the
forward/backward passes spent and the worst-case robust accuracy "All" of both, and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/zoo_cascade.py [--n 200] [--suite full] [--norm linf]
        [--eps-grid 0.05 0.1 0.15] [--square-steps 300]

Writes ``benchmarks/results/zoo_cascade.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import reference_model, write_table

from advtrain.evaluation import evaluate_robustness
from advtrain.evaluation.suites import build_suite
from advtrain.models.reference import reference_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--suite", default="full")
    parser.add_argument("--norm", default="linf")
    parser.add_argument("--eps-grid", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    parser.add_argument("--square-steps", type=int, default=300, help="query budget of Square in the suite")
    args = parser.parse_args()

    model = reference_model().eval()
    x, y = reference_batch(args.n)
    data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, args.n, 100)]
    rows = []
    for cascade in (True, False):
        torch.manual_seed(0)
        start = time.perf_counter()
        eps = max(args.eps_grid)
        entries = build_suite(args.suite, norm=args.norm, eps=eps, overrides={"square": {"steps": args.square_steps}})
        report = evaluate_robustness(
            model, data, entries, norm=args.norm, eps=eps, eps_grid=args.eps_grid, cascade=cascade, progress=False
        )
        seconds = time.perf_counter() - start
        summary = report.as_dict()
        attacks = summary.get("attacks", {})
        rows.append({
            "mode": "cascade" if cascade else "one after another",
            "seconds": seconds,
            "forward": sum(int(a.get("forward_passes", 0)) for a in attacks.values()),
            "backward": sum(int(a.get("backward_passes", 0)) for a in attacks.values()),
            "robust_all": summary.get("robust_accuracy_all"),
            "all_by_eps": summary.get("robust_accuracy_all_by_eps"),
        })  # fmt: skip
    rows[0]["time_ratio"] = rows[0]["seconds"] / rows[1]["seconds"]
    write_table("zoo_cascade", rows, ["mode", "seconds", "forward", "backward", "robust_all", "all_by_eps",
                                      "time_ratio"])  # fmt: skip


if __name__ == "__main__":
    main()
