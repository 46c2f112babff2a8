"""StrAttack: advtrain against adv-lib's ``str_attack``, with adv-lib's C&W L2 for seed 002's Table 1 shape.

On the trained reference SmallCNN and the first ``--n`` correctly classified embedded test digits, runs side by side
at the same budget (ADMM iterations per search step, binary-search steps; the refinement at adv-lib's fixed 8 × 400):

* advtrain ``StrAttack`` without refinement vs adv-lib ``str_attack(retrain=False)``;
* advtrain ``StrAttack`` with the refined attack vs adv-lib ``str_attack(retrain=True)``;
* each advtrain row twice: with its default η_k = η·k and with the authors' η_k = η·√k (adv-lib's schedule); and
  without refinement once more scoring its dense iterate like adv-lib (``scored="dense"``);
* optionally (``--overlap``) both with overlapping 3×3 stride-2 groups, advtrain scoring its group-sparse iterate (the
  default) and, like adv-lib, its dense one (``scored="dense"``);
* adv-lib ``carlini_wagner_l2`` (Adam) at the same iterations and search steps, for the L0 comparison of Table 1:
  StrAttack should be far sparser (L0) at a comparable L2.

All attacks are untargeted (advtrain's default) from c₀ = 0.5 (the paper's MNIST value). Reported per attack:
success rate, means over successes of the L0/L1/L2/L∞ sizes of the perturbation (L0 counts non-zero pixels), the
median L2 over all samples with failures as +inf, forward/backward passes (counted by a wrapper around the model, so
the same way for every library), wall time, and the advtrain/adv-lib ratios of median L2 and wall time.

    OMP_NUM_THREADS=1 python benchmarks/peers_strattack.py [--n 100] [--steps 200] [--search 5]
        [--overlap | --only-overlap]

Writes ``benchmarks/results/peers_strattack.json``.
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import CountingModel, import_adv_lib, median_norm_with_failures, reference_model, timed, write_table

from advtrain.attacks.strattack import StrAttack
from advtrain.models.reference import reference_batch


def _sizes(adv: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    delta = (adv - x).flatten(1).float()
    return {
        "l0": (delta != 0).sum(1).float(),
        "l1": delta.abs().sum(1),
        "l2": delta.norm(dim=1),
        "linf": delta.abs().amax(1),
    }


def _row(name, library, adv, x, y, model, counter, wall):
    with torch.no_grad():
        success = model(adv).argmax(1) != y
    sizes = _sizes(adv, x)

    def mean(t):
        return float(t[success].mean()) if bool(success.any()) else math.nan

    return {
        "attack": name,
        "library": library,
        "success": float(success.float().mean()),
        "mean_l0": mean(sizes["l0"]),
        "mean_l1": mean(sizes["l1"]),
        "mean_l2": mean(sizes["l2"]),
        "mean_linf": mean(sizes["linf"]),
        "median_l2": median_norm_with_failures(sizes["l2"], success),
        "forward": counter.forwards,
        "backward": counter.backwards,
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="correctly classified test digits (100-200)")
    parser.add_argument("--steps", type=int, default=200, help="ADMM iterations per binary-search step")
    parser.add_argument("--search", type=int, default=5, help="binary-search steps on c")
    parser.add_argument("--const", type=float, default=0.5, help="initial c (paper: 0.5 on MNIST)")
    parser.add_argument("--overlap", action="store_true", help="also compare overlapping 3x3 stride-2 groups")
    parser.add_argument("--only-overlap", action="store_true", help="only the overlapping-group rows (and C&W)")
    parser.add_argument("--no-refine", action="store_true", help="skip the refined-attack rows (adv-lib: 8x400)")
    parser.add_argument("--cw-lr", type=float, default=0.05, help="Adam step of C&W L2 at this short budget")
    opts = parser.parse_args()

    attacks = import_adv_lib()
    if attacks is None:
        raise SystemExit("adv-lib is not installed: pip install --no-deps adv-lib")
    torch.manual_seed(0)
    base = reference_model()
    for p in base.parameters():
        p.requires_grad_(False)
    model = CountingModel(base).eval()
    x, y = reference_batch(int(opts.n * 1.1) + 16)
    with torch.no_grad():
        keep = base(x).argmax(1) == y
    x, y = x[keep][: opts.n], y[keep][: opts.n]

    budget = dict(steps=opts.steps, binary_search_steps=opts.search, initial_const=opts.const)
    peer_budget = dict(max_iterations=opts.steps, binary_search_steps=opts.search, initial_const=opts.const)
    # adv-lib's refinement is fixed at 8 search steps x 400 iterations; advtrain's is given the same budget.
    refine = dict(refine_steps=400, refine_search_steps=8)
    # (row name, advtrain arguments, adv-lib arguments); adv-lib runs are shared between rows with equal arguments.
    pairs = [] if opts.only_overlap else [
        ("StrAttack", dict(refine=False), dict(retrain=False)),
        ("StrAttack, eta*sqrt(k)", dict(refine=False, eta_growth="sqrt"), dict(retrain=False)),
        ("StrAttack, scored dense", dict(refine=False, scored="dense"), dict(retrain=False)),
    ]  # fmt: skip
    if not opts.no_refine and not opts.only_overlap:
        pairs += [
            ("StrAttack + refine", dict(refine=True, **refine), dict(retrain=True)),
            ("StrAttack + refine, eta*sqrt(k)", dict(refine=True, eta_growth="sqrt", **refine), dict(retrain=True)),
        ]
    if opts.overlap or opts.only_overlap:
        overlap_peer = dict(retrain=False, group_size=3, stride=2)
        pairs.append(("StrAttack overlap", dict(refine=False, overlap=True), overlap_peer))
        pairs.append(
            ("StrAttack overlap, scored dense", dict(refine=False, overlap=True, scored="dense"), overlap_peer)
        )

    rows, peers = [], {}
    for name, ours_kw, peer_kw in pairs:
        key = tuple(sorted(peer_kw.items()))
        if key not in peers:
            model.reset()
            peer_adv, peer_wall = timed(lambda: attacks.str_attack(model, x, y, **peer_budget, **peer_kw))  # noqa: B023
            peers[key] = _row(name, "adv-lib", peer_adv, x, y, base, model, peer_wall)
            rows.append(peers[key])
        peer = peers[key]
        model.reset()
        attack = StrAttack(**budget, **ours_kw)
        result, wall = timed(lambda: attack(model, x, y))  # noqa: B023
        ours = _row(name, "advtrain", result.adv, x, y, base, model, wall)
        ours["ratio_median_l2"] = ours["median_l2"] / peer["median_l2"]
        ours["ratio_wall"] = ours["wall_s"] / peer["wall_s"]
        rows.append(ours)

    model.reset()
    cw_budget = dict(max_iterations=opts.steps, binary_search_steps=opts.search, initial_const=opts.const)
    cw_adv, cw_wall = timed(lambda: attacks.carlini_wagner_l2(model, x, y, learning_rate=opts.cw_lr, **cw_budget))
    rows.append(_row("C&W L2", "adv-lib", cw_adv, x, y, base, model, cw_wall))

    columns = ["attack", "library", "success", "mean_l0", "mean_l1", "mean_l2", "mean_linf", "median_l2", "forward",
               "backward", "wall_s", "ratio_median_l2", "ratio_wall"]  # fmt: skip
    print(f"{x.shape[0]} correctly classified test digits; {opts.search} search steps x {opts.steps} ADMM iterations, "
          f"c0 = {opts.const}, untargeted\n")  # fmt: skip
    write_table("peers_strattack", rows, columns)


if __name__ == "__main__":
    main()
