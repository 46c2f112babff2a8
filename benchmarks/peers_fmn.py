"""FMN (Pintor et al., NeurIPS 2021) against adv-lib's ``fmn`` at the same budget, in L0, L1, L2 and L∞.

On the trained reference SmallCNN (and, with ``--robust``, the PGD-trained MNIST model of
``benchmarks/autoattack_compare.py``, whose minimal perturbations are far larger) and the first ``--n`` correctly
classified embedded test digits, runs advtrain's ``FMN`` and adv-lib's ``fmn`` with the same steps and the authors'
schedules (α from 1 to 1/100, γ from 0.05 to 0.001), untargeted, interleaved round by round (``--repeats``).

Reported per norm and library: success rate, median norm over all samples with failures as +inf (Rony et al.'s
convention), mean norm over successes, forward/backward passes (counted by a wrapper around the model, the same way
for both), median wall and CPU time, and advtrain/adv-lib ratios: median norm (goal ≤ 1.01) and wall time, the median
of the per-round ratios (goal ≤ 1).

    OMP_NUM_THREADS=1 python benchmarks/peers_fmn.py [--n 100] [--steps 100] [--repeats 3] [--robust]

Writes ``benchmarks/results/peers_fmn.json``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import (
    CountingModel,
    correct_digits,
    import_adv_lib,
    interleaved,
    median_norm_with_failures,
    paired_ratios,
    reference_model,
    write_table,
)

from advtrain.attacks.fmn import FMN

P = {"l0": 0.0, "l1": 1.0, "l2": 2.0, "linf": float("inf")}


def _row(model_name, norm, library, timing, counter, x, y, model):
    adv = timing.output
    with torch.no_grad():
        success = model(adv).argmax(1) != y
    norms = (adv - x).flatten(1).norm(p=P[norm], dim=1)
    return {
        "model": model_name,
        "norm": norm,
        "library": library,
        "success": float(success.float().mean()),
        "median_norm": median_norm_with_failures(norms, success),
        "mean_norm": float(norms[success].mean()) if bool(success.any()) else float("nan"),
        "forward": counter.forwards,
        "backward": counter.backwards,
        "wall_s": round(statistics.median(timing.wall), 3),
        "cpu_s": round(statistics.median(timing.cpu), 3),
    }


def compare(model_name, model, x, y, norms, steps, repeats, adv_lib) -> list[dict]:
    rows = []
    for norm in norms:
        ours_model, peer_model = CountingModel(model), CountingModel(model)
        ours = FMN(norm=norm, steps=steps)
        timings = interleaved(
            [
                lambda a=ours, m=ours_model: a(m, x, y).adv,
                lambda m=peer_model, p=P[norm]: adv_lib.fmn(m, x, y, norm=p, steps=steps),
            ],
            repeats,
        )
        # Pass counts of one call (the wrappers counted the warm-up and every timed round).
        calls = repeats + 1
        for counter in (ours_model, peer_model):
            counter.forwards //= calls
            counter.backwards //= calls
        mine = _row(model_name, norm, "advtrain", timings[0], ours_model, x, y, model)
        peer = _row(model_name, norm, "adv-lib", timings[1], peer_model, x, y, model)
        ratios = paired_ratios(timings[0], timings[1])
        mine["norm_ratio"] = mine["median_norm"] / peer["median_norm"]
        mine["wall_ratio"] = ratios["wall_ratio"]
        mine["cpu_ratio"] = ratios["cpu_ratio"]
        rows += [mine, peer]
        print(mine, peer, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="correctly classified test digits")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (after one warm-up)")
    parser.add_argument("--norms", nargs="+", default=list(P), choices=list(P))
    parser.add_argument("--robust", action="store_true", help="also the PGD-trained model of autoattack_compare.py")
    opts = parser.parse_args()
    adv_lib = import_adv_lib()
    if adv_lib is None:
        raise SystemExit("adv-lib is not installed: pip install --no-deps adv-lib")
    torch.manual_seed(0)
    models = [("reference", reference_model())]
    if opts.robust:
        from autoattack_compare import load

        models.append(("pgd", load("pgd")))
    rows = []
    for name, model in models:
        model.eval()
        x, y = correct_digits(model, opts.n)
        rows += compare(name, model, x, y, opts.norms, opts.steps, opts.repeats, adv_lib)
    columns = ["model", "norm", "library", "success", "median_norm", "mean_norm", "forward", "backward", "wall_s",
               "cpu_s", "norm_ratio", "wall_ratio", "cpu_ratio"]  # fmt: skip
    write_table("peers_fmn", rows, columns)


if __name__ == "__main__":
    main()
