"""Full-zoo evaluation three ways: the attacks one after another, the cascade, and the fused cascade (issue 6).

On the trained reference SmallCNN (standard training, cached) and the first ``--n`` embedded MNIST test digits it
classifies correctly, runs ``evaluate_robustness`` with the ``--suite`` over the ``--eps-grid`` at every
``--batch-sizes`` in three modes, interleaved round by round in one process:

* one after another: every attack on every sample at every ε (``cascade=False, fuse=False``);
* cascade: each budgeted attack only on the samples still robust at that ε, minimal-norm attacks once for the whole
  grid (``cascade=True, fuse=False``);
* fused cascade: each budgeted attack once over the whole grid on a batch holding each sample once per ε it may still
  need, APGD-CE and APGD-DLR in the same call (``cascade=True, fuse=True``). Fewer, larger model calls for more
  per-sample passes: made for a device the model underfills.

Prints per mode and batch size the wall and CPU seconds, the model calls, the forward/backward passes spent, the
worst-case robust accuracy "All" (per ε) and the time relative to the cascade.

    OMP_NUM_THREADS=1 python benchmarks/zoo_cascade.py [--n 200] [--batch-sizes 16 200] [--suite full]
        [--norm linf] [--eps-grid 0.05 0.1 0.15] [--square-steps 300] [--repeats 1] [--device cpu]

On a GPU: ``python benchmarks/zoo_cascade.py --device cuda --batch-sizes 16 64 200``. Writes
``benchmarks/results/zoo_cascade.json`` (``zoo_cascade_cuda.json`` on CUDA).
"""

from __future__ import annotations

import argparse

import torch
from _common import correct_digits, interleaved, reference_model, write_table
from torch.utils.data import TensorDataset

from advtrain.evaluation import evaluate_robustness
from advtrain.evaluation.suites import build_suite

MODES = {
    "one after another": {"cascade": False, "fuse": False},
    "cascade": {"cascade": True, "fuse": False},
    "fused cascade": {"cascade": True, "fuse": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 200])
    parser.add_argument("--suite", default="full")
    parser.add_argument("--norm", default="linf")
    parser.add_argument("--eps-grid", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    parser.add_argument("--square-steps", type=int, default=300, help="query budget of Square in the suite")
    parser.add_argument("--max-fused-batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per mode (interleaved)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = reference_model().eval().to(device)
    calls = [0]
    model.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    x, y = correct_digits(model.cpu(), args.n)
    model.to(device)
    eps = max(args.eps_grid)
    overrides = {"square": {"steps": args.square_steps}}

    def evaluate(batch_size: int, options: dict):
        def run():
            calls[0] = 0
            entries = build_suite(args.suite, norm=args.norm, eps=eps, seed=0, overrides=overrides)
            report = evaluate_robustness(model, TensorDataset(x, y), entries, norm=args.norm, eps=eps,
                                         eps_grid=args.eps_grid, batch_size=batch_size, device=device, progress=False,
                                         max_fused_batch=args.max_fused_batch, **options)  # fmt: skip
            return report.as_dict(), calls[0]

        return run

    # Untimed warm-up of every code path (lazy imports, kernel choice, the heap's growth) on a few samples.
    for options in MODES.values():
        entries = build_suite("apgd", norm=args.norm, eps=eps, overrides={"apgd-ce": {"steps": 5},
                                                                                "apgd-dlr": {"steps": 5}})  # fmt: skip
        evaluate_robustness(model, TensorDataset(x[:16], y[:16]), entries, norm=args.norm, eps=eps,
                            eps_grid=args.eps_grid, batch_size=8, device=device, progress=False, **options)  # fmt: skip
    cases = [(b, mode) for b in args.batch_sizes for mode in MODES]
    timings = interleaved([evaluate(b, MODES[mode]) for b, mode in cases], args.repeats, warmup=False)
    rows = []
    for (batch_size, mode), timing in zip(cases, timings, strict=True):
        summary, model_calls = timing.output
        attacks = summary["attacks"].values()
        rows.append({
            "batch": batch_size,
            "mode": mode,
            "wall_s": min(timing.wall),
            "cpu_s": min(timing.cpu),
            "model_calls": model_calls,
            "forward": sum(int(a["forward_passes"]) for a in attacks),
            "backward": sum(int(a["backward_passes"]) for a in attacks),
            "robust_all": summary["robust_accuracy_all"],
            "all_by_eps": summary["robust_accuracy_all_by_eps"],
        })  # fmt: skip
    for row in rows:
        cascade = next(r for r in rows if r["batch"] == row["batch"] and r["mode"] == "cascade")
        row["wall_vs_cascade"] = row["wall_s"] / cascade["wall_s"]
        row["cpu_vs_cascade"] = row["cpu_s"] / cascade["cpu_s"]
    name = "zoo_cascade" if device.type == "cpu" else f"zoo_cascade_{device.type}"
    write_table(name, rows, ["batch", "mode", "wall_s", "cpu_s", "wall_vs_cascade", "cpu_vs_cascade", "model_calls",
                             "forward", "backward", "robust_all", "all_by_eps"])  # fmt: skip


if __name__ == "__main__":
    main()
