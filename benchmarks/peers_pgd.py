"""Budgeted gradient attacks against their peers: PGD and APGD-CE/-DLR (advtrain, torchattacks, adv-lib).

On the trained reference SmallCNN (MNIST, standard training) and the first ``--n`` correctly classified test
digits, runs at the same L∞ budget and the same number of iterations, side by side:

* PGD-40 with random start and step α = 2.5·ε/40: ``advtrain.attacks.PGD``, ``torchattacks.PGD``,
  ``adv_lib.attacks.pgd_linf``;
* APGD-100 (CE and DLR losses, one restart): ``advtrain.attacks.apgd.APGD``, ``torchattacks.APGD``,
  ``adv_lib.attacks.auto_pgd.apgd``.

Every result is re-verified the way the framework does: the returned images are clipped to the ball and the box and
scored with a fresh forward pass. Passes are counted per sample by a wrapper around the model (a forward of n
samples counts n; backward passes through a hook on the logits), the same wrapper for every library. Reported per
attack: robust accuracy, success rate, mean L∞ norm over successes, median norm (failures = +inf), forward/backward
passes, wall time, and for peers the ratios advtrain/peer of robust accuracy and wall time.

    OMP_NUM_THREADS=1 python benchmarks/peers_pgd.py [--n 200] [--eps 0.3 0.1] [--repeats 1]

ε = 0.3 is the standard MNIST budget; on this undefended model every attack drives robust accuracy to ~0 there, so
the default also runs ε = 0.1, where robust accuracy separates the attacks.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from _common import (
    CountingModel,
    correct_digits,
    import_adv_lib,
    import_torchattacks,
    median_norm_with_failures,
    reference_model,
    timed,
    write_table,
)
from torch import nn

from advtrain.attacks.apgd import APGD
from advtrain.attacks.gradient import PGD


def attacks(eps: float, pgd_steps: int, apgd_steps: int) -> list[tuple[str, str, Callable]]:
    """(attack, library, fn(model, x, y) -> adv) at the same budget and iteration count."""
    alpha = 2.5 * eps / pgd_steps
    rows: list[tuple[str, str, Callable]] = []
    ta = import_torchattacks()
    al = import_adv_lib()

    pgd = PGD(norm="linf", eps=eps, steps=pgd_steps, step_size=alpha, seed=0)
    rows.append((f"PGD-{pgd_steps}", "advtrain", lambda m, x, y: pgd(m, x, y).adv))
    if ta is not None:
        rows.append((
            f"PGD-{pgd_steps}", "torchattacks",
            lambda m, x, y: ta.PGD(m, eps=eps, alpha=alpha, steps=pgd_steps, random_start=True)(x, y),
        ))  # fmt: skip
    if al is not None:
        rows.append((
            f"PGD-{pgd_steps}", "adv-lib",
            lambda m, x, y: al.pgd_linf(m, x, y, ε=eps, steps=pgd_steps, absolute_step_size=alpha),
        ))  # fmt: skip
    for loss in ("ce", "dlr"):
        name = f"APGD-{loss.upper()}-{apgd_steps}"
        ours = APGD(norm="linf", eps=eps, steps=apgd_steps, loss=loss, seed=0)
        rows.append((name, "advtrain", lambda m, x, y, a=ours: a(m, x, y).adv))
        if ta is not None:
            rows.append((
                name, "torchattacks",
                lambda m, x, y, loss=loss: ta.APGD(m, norm="Linf", eps=eps, steps=apgd_steps, loss=loss, seed=0)(x, y),
            ))  # fmt: skip
        if al is not None:
            rows.append((
                name, "adv-lib",
                lambda m, x, y, loss=loss: al.apgd(m, x, y, eps=eps, norm=float("inf"), n_iter=apgd_steps,
                                                   loss_function=loss),
            ))  # fmt: skip
    return rows


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, eps: float) -> dict:
    """Clips to the ball and the box, re-scores with a fresh forward pass, and summarises."""
    adv = (x + (adv.detach() - x).clamp(-eps, eps)).clamp(0.0, 1.0)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    norms = (adv - x).flatten(1).abs().amax(1)
    return {
        "robust_acc": 1.0 - float(fooled.float().mean()),
        "success": float(fooled.float().mean()),
        "mean_norm": float(norms[fooled].mean()) if fooled.any() else math.nan,
        "median_norm": median_norm_with_failures(norms, fooled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="correctly classified test digits")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--pgd-steps", type=int, default=40)
    parser.add_argument("--apgd-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats (median)")
    parser.add_argument("--name", default="peers_pgd", help="results file name under benchmarks/results/")
    opts = parser.parse_args()

    base = reference_model()
    for p in base.parameters():
        p.requires_grad_(False)
    model = CountingModel(base).eval()
    x, y = correct_digits(base, opts.n)

    rows = []
    for eps in opts.eps:
        ours: dict[str, dict] = {}
        for attack, library, fn in attacks(eps, opts.pgd_steps, opts.apgd_steps):
            torch.manual_seed(0)
            model.reset()
            adv, seconds = timed(lambda fn=fn: fn(model, x, y), repeats=opts.repeats)
            row = {
                "eps": eps,
                "attack": attack,
                "library": library,
                **evaluate(base, x, y, adv, eps),
                "forward": model.forwards // opts.repeats,
                "backward": model.backwards // opts.repeats,
                "time_s": seconds,
            }
            if library == "advtrain":
                ours[attack] = row
            else:
                mine = ours[attack]
                if row["robust_acc"] > 0:
                    row["robacc_ratio"] = mine["robust_acc"] / row["robust_acc"]
                else:
                    row["robacc_ratio"] = 1.0 if mine["robust_acc"] == 0 else math.inf
                row["time_ratio"] = mine["time_s"] / seconds
            rows.append(row)
            print(f"done: eps={eps} {attack} {library} {seconds:.1f}s", flush=True)

    columns = ["eps", "attack", "library", "robust_acc", "success", "mean_norm", "median_norm", "forward", "backward",
               "time_s", "robacc_ratio", "time_ratio"]  # fmt: skip
    print(f"\n{x.shape[0]} correctly classified test digits, L∞; ratios advtrain/peer (time < 1: advtrain faster)")
    write_table(opts.name, rows, columns)


if __name__ == "__main__":
    main()
