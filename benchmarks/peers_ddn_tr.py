"""Minimal-norm attacks DDN and TR against their peers (adv-lib), against C&W, and TR's second order.

On the trained reference SmallCNN (MNIST, standard training) and the first ``--n`` correctly classified test digits:

1. **Peers, same iteration budget**: DDN-100 (advtrain ``DDN``) vs adv-lib ``ddn`` (100 steps, γ = 0.05, 256
   levels); TR first order, adaptive radius, best class, L2 and L∞ (advtrain ``TrustRegion``) vs adv-lib ``tr``
   (``adaptive=True``, same 100 iterations). An extra advtrain row runs TR-L∞ with 200 iterations: with the
   paper's radius ratio (σ1 = 0.9) the L∞ radius grows slowly on this model and a few digits need more than 100.
2. **The seed claims' shape**, on the first ``--cw-n`` of those digits: DDN-100 (seed 001, Table 1: within ~5% of
   C&W 9×10 000 with ~500× fewer gradients) and TR (seed 000: C&W-like norms, much faster) against a strong C&W L2
   run (adv-lib ``carlini_wagner_l2``, ``--cw-search`` × ``--cw-steps`` = 9 × 1000 with abort-early, the paper's
   Adam lr 0.01 and c0 = 1e-3; ~2 minutes of CPU on 25 digits), with the gradient-count ratio C&W/attack.
3. **TR second order vs first order** on the smooth reference model (``activation="softplus"``) at equal iterations,
   on ``--o2-n`` digits: fixed radius 0.5 with 50 iterations and the adaptive default with 100.

Every result is re-verified the same way for every library: a fresh forward pass on the returned images decides
success; norms are measured here. Peers' passes are counted per sample by a wrapper around the model (forwards; a
hook on the logits counts backward passes); advtrain rows report the attack's own counts (which equal the wrapper's
for first-order attacks and also count each Hessian-vector product as a backward pass). Wall times are medians of
``--repeats`` runs, interleaved ours/peer to share the machine's load fairly. Reported per attack: success rate,
mean norm over successes, median norm (failures = +inf, seed 001's convention), ρ = ‖δ‖/‖x‖ average and worst over
successes (seed 000), passes per sample, wall time (and CPU time of this process, less sensitive to other load on
a shared machine), and the ratios advtrain/peer of median norm, wall time and CPU time.

    OMP_NUM_THREADS=1 python benchmarks/peers_ddn_tr.py [--n 200] [--repeats 2] [--cw-n 25] [--o2-n 100]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from _common import (
    CountingModel,
    correct_digits,
    import_adv_lib,
    median_norm_with_failures,
    reference_model,
    write_table,
)
from torch import nn

from advtrain.attacks.ddn import DDN
from advtrain.attacks.trust_region import TrustRegion

P = {"l2": 2.0, "linf": math.inf}


def score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, norm: str) -> dict:
    """Fresh-forward success and norm statistics of returned images."""
    adv = adv.detach().clamp(0.0, 1.0)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    norms = (adv - x).flatten(1).norm(p=P[norm], dim=1)
    rho = norms / x.flatten(1).norm(p=P[norm], dim=1)
    ok = fooled.any()
    return {
        "norm": norm,
        "success": float(fooled.float().mean()),
        "mean_norm": float(norms[fooled].mean()) if ok else math.nan,
        "median_norm": median_norm_with_failures(norms, fooled),
        "rho_mean": float(rho[fooled].mean()) if ok else math.nan,
        "rho_worst": float(rho[fooled].max()) if ok else math.nan,
        "_norms": norms,
        "_fooled": fooled,
    }


Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, tuple[int, int] | None]]


def ours(attack) -> Runner:
    """advtrain attack: returns (adv, (forward, backward) as the attack counted them)."""

    def run(model, x, y):
        result = attack(model, x, y)
        return result.adv, (result.forward_passes, result.backward_passes)

    return run


def peer(fn) -> Runner:
    return lambda model, x, y: (fn(model, x, y), None)


def measure_group(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, entries: list[tuple[str, str, str, Runner]], repeats: int
) -> list[dict]:
    """Runs (attack, library, norm, runner) entries ``repeats`` times, interleaved, and scores the first run."""
    model = CountingModel(base).eval()
    times: list[list[float]] = [[] for _ in entries]
    cpu: list[list[float]] = [[] for _ in entries]
    rows: list[dict | None] = [None] * len(entries)
    n = x.shape[0]
    for r in range(repeats):
        order = range(len(entries)) if r % 2 == 0 else reversed(range(len(entries)))
        for i in order:
            attack, library, norm, runner = entries[i]
            model.reset()
            torch.manual_seed(0)
            start, start_cpu = time.perf_counter(), time.process_time()
            adv, counts = runner(model, x, y)
            times[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
            if rows[i] is None:
                forward, backward = counts if counts is not None else (model.forwards, model.backwards)
                rows[i] = {
                    "attack": attack,
                    "library": library,
                    **score(base, x, y, adv, norm),
                    "fwd_per_sample": forward / n,
                    "bwd_per_sample": backward / n,
                }
            print(f"  {attack} [{library}] {times[i][-1]:.1f}s", flush=True)
    for row, t, c in zip(rows, times, cpu, strict=True):
        row["time_s"] = statistics.median(t)
        row["cpu_s"] = statistics.median(c)
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def add_ratios(rows: list[dict], reference: dict[str, str]) -> None:
    """For each peer row, the ratios advtrain/peer of median norm and wall time (``reference``: attack -> ours)."""
    by_key = {(r["attack"], r["library"]): r for r in rows}
    for row in rows:
        if row["library"] == "advtrain" or row["attack"] not in reference:
            continue
        mine = by_key[(reference[row["attack"]], "advtrain")]
        row["norm_ratio"] = _ratio(mine["median_norm"], row["median_norm"])
        row["time_ratio"] = mine["time_s"] / row["time_s"]
        row["cpu_ratio"] = mine["cpu_s"] / row["cpu_s"]


def peers_section(base, x, y, al, steps, opts, columns) -> None:
    """1. Peers at the same iteration budget."""
    print(f"1. peers, {x.shape[0]} digits", flush=True)
    rows: list[dict] = []
    ddn = f"DDN-{steps}"
    group = [(ddn, "advtrain", "l2", ours(DDN(steps=steps)))]
    if al is not None:
        group.append((ddn, "adv-lib", "l2", peer(lambda m, a, b: al.ddn(m, a, b, steps=steps))))
    rows += measure_group(base, x, y, group, opts.repeats)
    reference = {ddn: ddn}
    for norm in ("l2", "linf"):
        name = f"TR-{norm}-adaptive-{steps}"
        group = [(name, "advtrain", norm, ours(TrustRegion(norm=norm, steps=steps)))]
        if al is not None:
            # adv-lib's tr switches requires_grad on its input in place: give it a copy.
            fn = lambda m, a, b, p=P[norm]: al.tr(m, a.clone(), b, iter=steps, adaptive=True, p=p)  # noqa: E731
            group.append((name, "adv-lib", norm, peer(fn)))
        rows += measure_group(base, x, y, group, opts.repeats)
        reference[name] = name
    long = f"TR-linf-adaptive-{2 * steps}"
    rows += measure_group(base, x, y, [(long, "advtrain", "linf", ours(TrustRegion(norm="linf", steps=2 * steps)))], 1)
    add_ratios(rows, reference)
    print(f"\n{x.shape[0]} correctly classified test digits; ratios advtrain/peer (< 1: advtrain smaller/faster)")
    write_table(opts.name, [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], columns)


def cw_section(base, x, y, al, steps, opts) -> None:
    """2. The seed claims' shape: DDN and TR vs a strong C&W."""
    ddn = f"DDN-{steps}"
    xs, ys = x[: opts.cw_n], y[: opts.cw_n]
    print(f"\n2. C&W comparison, {xs.shape[0]} digits", flush=True)
    claims: list[dict] = []
    group = [
        (ddn, "advtrain", "l2", ours(DDN(steps=steps))),
        (f"TR-l2-adaptive-{steps}", "advtrain", "l2", ours(TrustRegion(norm="l2", steps=steps))),
    ]
    if al is not None:
        cw = f"C&W-{opts.cw_search}x{opts.cw_steps}"
        fn = lambda m, a, b: al.carlini_wagner_l2(  # noqa: E731
            m, a, b, binary_search_steps=opts.cw_search, max_iterations=opts.cw_steps
        )
        group.append((cw, "adv-lib", "l2", peer(fn)))
    claims += measure_group(base, xs, ys, group, 1)
    if al is not None:
        strong = claims[-1]
        for row in claims[:-1]:
            row["norm_vs_cw"] = _ratio(row["median_norm"], strong["median_norm"])
            row["mean_vs_cw"] = _ratio(row["mean_norm"], strong["mean_norm"])
            row["grads_cw_over_attack"] = strong["bwd_per_sample"] / row["bwd_per_sample"]
            row["time_vs_cw"] = row["time_s"] / strong["time_s"]
    print(f"\n{xs.shape[0]} digits; *_vs_cw = attack/C&W (norm < 1.05: within 5% of C&W); grads = C&W/attack")
    write_table(
        opts.name + "_cw",
        [{k: v for k, v in r.items() if not k.startswith("_")} for r in claims],
        ["attack", "library", "success", "mean_norm", "median_norm", "bwd_per_sample", "time_s", "norm_vs_cw",
         "mean_vs_cw", "grads_cw_over_attack", "time_vs_cw"],
    )  # fmt: skip


def order2_section(steps, opts) -> None:
    """3. Second order vs first order on the smooth model."""
    smooth = reference_model("softplus")
    for p in smooth.parameters():
        p.requires_grad_(False)
    xo, yo = correct_digits(smooth, opts.o2_n)
    print(f"\n3. second order, softplus model, {xo.shape[0]} digits", flush=True)
    fixed = {"adaptive": False, "radius": 0.5, "steps": steps // 2}
    group = [
        (f"TR-l2-r0.5-{steps // 2} order 1", "advtrain", "l2", ours(TrustRegion(norm="l2", **fixed))),
        (f"TR-l2-r0.5-{steps // 2} order 2 lanczos", "advtrain", "l2", ours(TrustRegion(norm="l2", order=2, **fixed))),
        (
            f"TR-l2-r0.5-{steps // 2} order 2 steihaug",
            "advtrain",
            "l2",
            ours(TrustRegion(norm="l2", order=2, solver="steihaug", **fixed)),
        ),
        (f"TR-l2-adaptive-{steps} order 1", "advtrain", "l2", ours(TrustRegion(norm="l2", steps=steps))),
        (f"TR-l2-adaptive-{steps} order 2", "advtrain", "l2", ours(TrustRegion(norm="l2", steps=steps, order=2))),
        (f"TR-linf-adaptive-{steps} order 1", "advtrain", "linf", ours(TrustRegion(norm="linf", steps=steps))),
        (
            f"TR-linf-adaptive-{steps} order 2",
            "advtrain",
            "linf",
            ours(TrustRegion(norm="linf", steps=steps, order=2)),
        ),
    ]
    second = measure_group(smooth, xo, yo, group, 1)
    for first, later in ((0, 1), (0, 2), (3, 4), (5, 6)):
        second[later]["norm_vs_order1"] = _ratio(second[later]["median_norm"], second[first]["median_norm"])
        second[later]["time_vs_order1"] = second[later]["time_s"] / second[first]["time_s"]
    print(f"\n{xo.shape[0]} digits, softplus SmallCNN; *_vs_order1 = order 2 / order 1")
    write_table(
        opts.name + "_order2",
        [{k: v for k, v in r.items() if not k.startswith("_")} for r in second],
        ["attack", "success", "mean_norm", "median_norm", "fwd_per_sample", "bwd_per_sample", "time_s",
         "norm_vs_order1", "time_vs_order1"],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="correctly classified test digits")
    parser.add_argument("--steps", type=int, default=100, help="iterations of DDN and TR")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (median), interleaved")
    parser.add_argument("--cw-n", type=int, default=25, help="digits for the C&W comparison")
    parser.add_argument("--cw-search", type=int, default=9, help="C&W binary search steps")
    parser.add_argument("--cw-steps", type=int, default=1000, help="C&W iterations per search step")
    parser.add_argument("--o2-n", type=int, default=100, help="digits for second order vs first order")
    parser.add_argument("--name", default="peers_ddn_tr", help="results file name under benchmarks/results/")
    parser.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3], help="which parts to run")
    opts = parser.parse_args()
    al = import_adv_lib()
    steps = opts.steps

    base = reference_model()
    for p in base.parameters():
        p.requires_grad_(False)
    x, y = correct_digits(base, opts.n)
    columns = ["attack", "library", "norm", "success", "mean_norm", "median_norm", "rho_mean", "rho_worst",
               "fwd_per_sample", "bwd_per_sample", "time_s", "cpu_s", "norm_ratio", "time_ratio",
               "cpu_ratio"]  # fmt: skip

    if 1 in opts.sections:
        peers_section(base, x, y, al, steps, opts, columns)
    if 2 in opts.sections:
        cw_section(base, x, y, al, steps, opts)
    if 3 in opts.sections:
        order2_section(steps, opts)


if __name__ == "__main__":
    main()
