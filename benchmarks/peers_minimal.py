"""DeepFool (L2, L∞) and Carlini–Wagner L2 against adv-lib (and torchattacks' DeepFool) at the same budgets.

On the trained reference SmallCNN and the first ``--n`` correctly classified embedded MNIST test digits, runs side by
side in one process:

* DeepFool L2 and L∞, 50 steps, overshoot 0.02: advtrain vs adv-lib ``df``; torchattacks ``DeepFool`` (L2 only;
  it attacks one sample at a time with a backward pass per class, about 50× slower) on the first ``--ta-n`` digits,
  next to advtrain on the same digits.
* C&W L2 at Rony et al.'s 4×25 and 1×100 budgets (seed 001, Table 1), with the learning rate and initial constant
  picked for adv-lib on held-out digits (see ``CW_SMALL``): advtrain with ``abort_early=False`` and with its default
  ``abort_early=True`` (the reference's test on the loss summed over the search step, as adv-lib's), vs adv-lib
  ``carlini_wagner_l2`` (its defaults otherwise).
* With ``--cw-9x1000``: C&W 9×1000 at the paper's lr 0.01 and c0 1e-3 on the first ``--big-n`` digits.

Reports success rate, mean norm over successes, median norm with failures as +inf, per-sample forward/backward
passes (peers: counted by a wrapper around the model, one backward per backward call through the logits per row),
wall and CPU time (median of ``--repeats`` interleaved runs; the machine is shared, so CPU time is the steadier
cost measure), and the advtrain/peer ratios of median norm and of wall and CPU time.

    OMP_NUM_THREADS=1 python benchmarks/peers_minimal.py [--n 100] [--ta-n 10] [--repeats 3] [--cw-9x1000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import (
    CountingModel,
    import_adv_lib,
    import_torchattacks,
    median_norm_with_failures,
    reference_model,
    write_table,
)

from advtrain.attacks.cw import CarliniWagnerL2
from advtrain.attacks.deepfool import DeepFool
from advtrain.models.reference import reference_batch
from advtrain.threat import flat_norm

# (binary search steps, iterations, lr, initial c): the best median L2 for adv-lib over lr in {0.05, 0.1, 0.2, 0.5}
# and c0 in {0.1, 1, 10} on 50 held-out test digits (digits 100-149 of the correctly classified ones).
CW_SMALL = [(4, 25, 0.5, 1.0), (1, 100, 0.2, 1.0)]
CW_PAPER = (9, 1000, 0.01, 1e-3)

COLUMNS = [
    "attack",
    "library",
    "samples",
    "success",
    "mean_norm",
    "median_norm",
    "forward",
    "backward",
    "wall_s",
    "cpu_s",
    "median_ratio",
    "wall_ratio",
    "cpu_ratio",
]


def _run(fn, repeats: int) -> tuple[Any, float, float]:
    """(last output, median wall seconds, median CPU seconds) of ``repeats`` runs."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return out, statistics.median(walls), statistics.median(cpus)


def _row(attack: str, library: str, x, y, adv, model, p: float, counts, wall: float, cpu: float) -> dict[str, Any]:
    with torch.no_grad():
        success = model(adv).argmax(1) != y
    norms = flat_norm((adv - x).float(), p)
    return {
        "attack": attack,
        "library": library,
        "samples": x.shape[0],
        "success": float(success.float().mean()),
        "mean_norm": float(norms[success].mean()) if success.any() else float("nan"),
        "median_norm": median_norm_with_failures(norms, success),
        "forward": counts[0],
        "backward": counts[1],
        "wall_s": wall,
        "cpu_s": cpu,
    }


def _ratios(ours: dict[str, Any], peer: dict[str, Any]) -> None:
    """Writes advtrain/peer ratios into ``ours``."""
    ours["median_ratio"] = ours["median_norm"] / peer["median_norm"]
    ours["wall_ratio"] = ours["wall_s"] / peer["wall_s"]
    ours["cpu_ratio"] = ours["cpu_s"] / peer["cpu_s"]


def compare(
    attack: str, p: float, x, y, model, ours: dict[str, Any], peers: dict[str, Any], repeats: int
) -> list[dict[str, Any]]:
    """Runs advtrain's variants (``ours``: label -> fn returning an AttackResult) and the peers (label -> fn
    returning adversarial inputs), each ``repeats`` times, interleaved; the advtrain rows get their ratios against
    the first peer."""
    counting = CountingModel(model)
    runs = {**{k: (f, True) for k, f in ours.items()}, **{k: (f, False) for k, f in peers.items()}}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    cpus: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for label, (fn, is_ours) in runs.items():
            counting.reset()
            out, wall, cpu = _run(lambda fn=fn: fn(counting), 1)
            walls[label].append(wall)
            cpus[label].append(cpu)
            if is_ours:
                outputs[label] = (out.adv, (out.forward_passes, out.backward_passes))
            else:
                outputs[label] = (out, (counting.forwards, counting.backwards))
    rows = {}
    for label in runs:
        adv, counts = outputs[label]
        wall, cpu = statistics.median(walls[label]), statistics.median(cpus[label])
        rows[label] = _row(attack, label, x, y, adv, model, p, counts, wall, cpu)
    reference = rows[next(iter(peers))]
    for label in ours:
        _ratios(rows[label], reference)
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="correctly classified test digits")
    parser.add_argument("--ta-n", type=int, default=10, help="digits for torchattacks' per-sample DeepFool")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing runs of the DeepFool rows")
    parser.add_argument("--cw-repeats", type=int, default=3, help="interleaved timing runs of the 4×25/1×100 rows")
    parser.add_argument("--cw-9x1000", action="store_true", help="also run C&W 9×1000 on --big-n digits")
    parser.add_argument("--big-n", type=int, default=20)
    opts = parser.parse_args()

    torch.manual_seed(0)
    adv_lib = import_adv_lib()
    torchattacks = import_torchattacks()
    if adv_lib is None:
        raise SystemExit("adv-lib is not installed (pip install --no-deps adv-lib).")
    model = reference_model()
    for q in model.parameters():  # the peers take input gradients only; advtrain freezes them itself
        q.requires_grad_(False)
    x_all, y_all = reference_batch(max(2 * opts.n, 300))
    with torch.no_grad():
        correct = model(x_all).argmax(1) == y_all
    x, y = x_all[correct][: opts.n], y_all[correct][: opts.n]
    rows: list[dict[str, Any]] = []

    for norm, p in (("l2", 2.0), ("linf", float("inf"))):
        rows += compare(
            f"DeepFool {norm} 50 steps",
            p,
            x,
            y,
            model,
            {"advtrain": lambda m, norm=norm: DeepFool(norm=norm, steps=50)(m, x, y)},
            {"adv-lib": lambda m, p=p: adv_lib.df(m, x, y, steps=50, overshoot=0.02, norm=p)},
            opts.repeats,
        )
    if torchattacks is not None and opts.ta_n > 0:
        xs, ys = x[: opts.ta_n], y[: opts.ta_n]
        rows += compare(
            "DeepFool l2 50 steps",
            2.0,
            xs,
            ys,
            model,
            {"advtrain": lambda m: DeepFool(norm="l2", steps=50)(m, xs, ys)},
            {"torchattacks": lambda m: torchattacks.DeepFool(m, steps=50, overshoot=0.02)(xs, ys)},
            1,
        )

    budgets = list(CW_SMALL) + ([CW_PAPER] if opts.cw_9x1000 else [])
    for bss, steps, lr, c0 in budgets:
        paper = (bss, steps, lr, c0) == CW_PAPER
        xs, ys = (x[: opts.big_n], y[: opts.big_n]) if paper else (x, y)
        ours = {}
        for abort in (True,) if paper else (False, True):
            attack = CarliniWagnerL2(
                binary_search_steps=bss, steps=steps, step_size=lr, initial_const=c0, abort_early=abort
            )
            ours[f"advtrain abort_early={abort}"] = lambda m, attack=attack, xs=xs, ys=ys: attack(m, xs, ys)
        peer = {
            "adv-lib": lambda m, bss=bss, steps=steps, lr=lr, c0=c0, xs=xs, ys=ys: adv_lib.carlini_wagner_l2(
                m, xs, ys, binary_search_steps=bss, max_iterations=steps, learning_rate=lr, initial_const=c0
            )
        }
        name = f"C&W L2 {bss}x{steps} lr={lr} c0={c0:g}"
        rows += compare(name, 2.0, xs, ys, model, ours, peer, 1 if paper else opts.cw_repeats)

    write_table("peers_minimal", rows, COLUMNS)


if __name__ == "__main__":
    main()
