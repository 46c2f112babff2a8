"""Wall time against the peers, every attack of the zoo in one run: advtrain vs adv-lib / torchattacks at equal budget.

The issue's bar is "at least as strong and no more wall time". The per-attack scripts (``peers_minimal.py``,
``peers_ddn_tr.py``, ``peers_pgd.py``, ``peers_strattack.py``) measure strength in depth; this one is built for the
time comparison on a shared, noisy machine:

* every pair runs ``--repeats`` rounds after an untimed warm-up, interleaved, the order reversed every other round
  (``_common.interleaved``);
* the reported wall ratio is the median over rounds of (advtrain time / peer time) *of the same round*, with its
  range, next to the CPU-time ratio of this process (less sensitive to other jobs on the machine);
* strength is reported from the first timed run so that speed is never bought with it: the median L2/L∞ norm
  (failures = +inf) for minimal-norm attacks, robust accuracy for budgeted ones, each re-measured here with a fresh
  forward pass on the returned images (budgeted ones also clipped to their ball);
* the minor page faults of each side (median per run), which show what the allocator costs.

By default the process runs with glibc's heap tuned (``advtrain.runtime.tune_cpu_allocator``, for both libraries
alike); ``ADVTRAIN_TUNE_MALLOC=0`` measures under the default allocator, where, once activations outgrow glibc's
dynamic mmap threshold (DDN on 200 digits, not on 100), page faults add half again to an attack's time and reorder
close ratios at random.

Budgets are those of the per-attack scripts: DDN-100; DeepFool-50 (overshoot 0.02); C&W L2 4×25 (Adam 0.5, c0 = 1)
and 1×100 (0.2, 1); TR adaptive, first order, 100 iterations; StrAttack 5×200 (c0 = 0.5), non-overlapping and
overlapping (3×3, stride 2) groups; PGD-40 L∞ ε = 0.3 (α = 2.5ε/40, random start); APGD-CE / DLR-100 L∞ ε = 0.1.
Reference SmallCNN, first ``--n`` correctly classified test digits (``--str-n`` for StrAttack).

    OMP_NUM_THREADS=2 python benchmarks/peers_walltime.py [--n 100] [--str-n 30] [--repeats 5] [--only ddn deepfool]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import (
    correct_digits,
    import_adv_lib,
    import_torchattacks,
    interleaved,
    median_norm_with_failures,
    paired_ratios,
    reference_model,
    write_table,
)
from peers_minimal import CW_SMALL

from advtrain.attacks import APGD, DDN, PGD, CarliniWagnerL2, DeepFool, StrAttack, TrustRegion

P = {"l2": 2.0, "linf": math.inf}
Fn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Pair:
    """advtrain's attack (or named variants of it) and its peers' at the same budget; ``eps`` set for budgeted
    attacks."""

    group: str
    name: str
    norm: str
    ours: Fn | dict[str, Fn]
    peers: dict[str, Fn]
    eps: float | None = None
    samples: str = "n"


def pairs(al, ta) -> list[Pair]:
    out: list[Pair] = []
    ddn = DDN(steps=100)
    out.append(Pair("ddn", "DDN-100", "l2", lambda m, x, y: ddn(m, x, y).adv,
                    {"adv-lib": lambda m, x, y: al.ddn(m, x, y, steps=100)}))  # fmt: skip
    for norm in ("l2", "linf"):
        df = DeepFool(norm=norm, steps=50)
        peer = lambda m, x, y, p=P[norm]: al.df(m, x, y, steps=50, overshoot=0.02, norm=p)  # noqa: E731
        ours = lambda m, x, y, a=df: a(m, x, y).adv  # noqa: E731
        out.append(Pair("deepfool", f"DeepFool-{norm}-50", norm, ours, {"adv-lib": peer}))
    for bss, steps, lr, c0 in CW_SMALL:
        cw = CarliniWagnerL2(binary_search_steps=bss, steps=steps, step_size=lr, initial_const=c0)
        peer = lambda m, x, y, b=bss, s=steps, lr=lr, c=c0: al.carlini_wagner_l2(  # noqa: E731
            m, x, y, binary_search_steps=b, max_iterations=s, learning_rate=lr, initial_const=c
        )
        out.append(Pair("cw", f"C&W-{bss}x{steps}", "l2", lambda m, x, y, a=cw: a(m, x, y).adv, {"adv-lib": peer}))
    for norm in ("l2", "linf"):
        tr = TrustRegion(norm=norm, steps=100)
        # adv-lib's tr switches requires_grad on its input in place: give it a copy.
        peer = lambda m, x, y, p=P[norm]: al.tr(m, x.clone(), y, iter=100, adaptive=True, p=p)  # noqa: E731
        out.append(Pair("tr", f"TR-{norm}-adaptive-100", norm, lambda m, x, y, a=tr: a(m, x, y).adv, {"adv-lib": peer}))
    budget = dict(steps=200, binary_search_steps=5, initial_const=0.5, refine=False)
    peer_budget = dict(max_iterations=200, binary_search_steps=5, initial_const=0.5, retrain=False)
    st = StrAttack(**budget)
    peer = lambda m, x, y: al.str_attack(m, x, y, **peer_budget)  # noqa: E731
    out.append(Pair("strattack", "StrAttack-5x200", "l2", lambda m, x, y: st(m, x, y).adv, {"adv-lib": peer},
                    samples="str_n"))  # fmt: skip
    # Overlapping groups: the default scores the group-sparse iterate (half adv-lib's L0, a larger L2); the second
    # variant scores the dense iterate, adv-lib's rule (see StrAttack's docstring, "Which iterate is scored").
    variants = {
        "advtrain": StrAttack(**budget, overlap=True),
        "advtrain scored=dense": StrAttack(**budget, overlap=True, scored="dense"),
    }
    peer = lambda m, x, y: al.str_attack(m, x, y, **peer_budget, group_size=3, stride=2)  # noqa: E731
    out.append(Pair("strattack", "StrAttack-overlap-5x200", "l2", {k: lambda m, x, y, a=a: a(m, x, y).adv
                    for k, a in variants.items()}, {"adv-lib": peer}, samples="str_n"))  # fmt: skip
    eps, steps = 0.3, 40
    alpha = 2.5 * eps / steps
    pgd = PGD(norm="linf", eps=eps, steps=steps, step_size=alpha, seed=0)
    # (budgets bound as defaults: ``eps`` is rebound below for APGD)
    peers = {"adv-lib": lambda m, x, y, e=eps, a=alpha: al.pgd_linf(m, x, y, ε=e, steps=steps, absolute_step_size=a)}
    if ta is not None:
        peers["torchattacks"] = lambda m, x, y, e=eps, a=alpha: ta.PGD(m, eps=e, alpha=a, steps=steps,
                                                                        random_start=True)(x, y)  # fmt: skip
    out.append(Pair("pgd", "PGD-40-linf", "linf", lambda m, x, y: pgd(m, x, y).adv, peers, eps=eps))
    eps = 0.1
    for loss in ("ce", "dlr"):
        apgd = APGD(norm="linf", eps=eps, steps=100, loss=loss, seed=0)
        peers = {"adv-lib": lambda m, x, y, lf=loss: al.apgd(m, x, y, eps=eps, norm=math.inf, n_iter=100,
                                                              loss_function=lf)}  # fmt: skip
        if ta is not None:
            peers["torchattacks"] = lambda m, x, y, lf=loss: ta.APGD(m, norm="Linf", eps=eps, steps=100, loss=lf,
                                                                      seed=0)(x, y)  # fmt: skip
        out.append(Pair("apgd", f"APGD-{loss.upper()}-100", "linf", lambda m, x, y, a=apgd: a(m, x, y).adv, peers,
                        eps=eps))  # fmt: skip
    return out


def strength(model, x, y, adv, pair: Pair) -> float:
    """Median norm (failures +inf) for minimal-norm attacks; robust accuracy (%) for budgeted ones."""
    adv = adv.detach().float()
    delta = adv - x
    if pair.eps is not None:  # a point outside the ball or the box does not count
        delta = delta.clamp(-pair.eps, pair.eps) if pair.norm == "linf" else delta
    adv = (x + delta).clamp(0.0, 1.0)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    if pair.eps is not None:
        return 100.0 * float((~fooled).float().mean())
    return median_norm_with_failures(torch.linalg.vector_norm((adv - x).flatten(1), ord=P[pair.norm], dim=1), fooled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="correctly classified test digits")
    parser.add_argument("--str-n", type=int, default=30, help="digits for the (slow) StrAttack pairs")
    parser.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds per pair")
    groups = ("ddn", "deepfool", "cw", "tr", "strattack", "pgd", "apgd")
    parser.add_argument("--only", nargs="*", choices=groups, default=list(groups))
    parser.add_argument("--name", default="peers_walltime", help="results file name")
    opts = parser.parse_args()

    al, ta = import_adv_lib(), import_torchattacks()
    if al is None:
        raise SystemExit("adv-lib is not installed: pip install --no-deps adv-lib")
    model = reference_model().eval()
    for p in model.parameters():  # the peers take input gradients only; advtrain freezes them itself
        p.requires_grad_(False)
    x_all, y_all = correct_digits(model, max(opts.n, opts.str_n))
    print(f"threads {torch.get_num_threads()}, {opts.repeats} interleaved rounds per pair", flush=True)
    rows = []
    for pair in (p for p in pairs(al, ta) if p.group in opts.only):
        n = getattr(opts, pair.samples)
        x, y = x_all[:n], y_all[:n]
        ours = pair.ours if isinstance(pair.ours, dict) else {"advtrain": pair.ours}
        fns = [*ours.values(), *pair.peers.values()]
        timings = interleaved([lambda f=f, x=x, y=y: f(model, x, y) for f in fns], opts.repeats)
        mine, theirs_t = timings[: len(ours)], timings[len(ours) :]
        combos = itertools.product(zip(ours, mine, strict=True), zip(pair.peers, theirs_t, strict=True))
        for (variant, timing_ours), (name, timing) in combos:
            ours_strength = strength(model, x, y, timing_ours.output, pair)
            theirs = strength(model, x, y, timing.output, pair)
            row = {
                "attack": pair.name if variant == "advtrain" else f"{pair.name} ({variant})",
                "peer": name,
                "samples": n,
                "measure": "robust acc %" if pair.eps is not None else f"median {pair.norm}",
                "advtrain": ours_strength,
                "peer_value": theirs,
                "strength_ratio": ours_strength / theirs if theirs else math.nan,
                "advtrain_s": statistics.median(timing_ours.wall),
                "peer_s": statistics.median(timing.wall),
                "advtrain_faults": statistics.median(timing_ours.faults),
                "peer_faults": statistics.median(timing.faults),
                **paired_ratios(timing_ours, timing),
            }
            rows.append(row)
            print(f"  {row['attack']} vs {name}: wall ratio {row['wall_ratio']:.3f} "
                  f"[{row['wall_ratio_min']:.3f}, {row['wall_ratio_max']:.3f}], cpu {row['cpu_ratio']:.3f}",
                  flush=True)  # fmt: skip
    print("\nratios advtrain/peer, median over interleaved rounds (< 1: advtrain faster; strength: < 1 is stronger)")
    write_table(
        opts.name,
        rows,
        ["attack", "peer", "samples", "measure", "advtrain", "peer_value", "strength_ratio", "advtrain_s", "peer_s",
         "wall_ratio", "wall_ratio_min", "wall_ratio_max", "cpu_ratio", "advtrain_faults", "peer_faults"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
