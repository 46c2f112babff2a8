"""Speed of the attack core and of adversarial training, against the floor and the peers, measured side by side.

One entry point for issue 6. For a model, batch and device it measures, in one run:

* **the floor**: one forward + backward pass (gradient with respect to the input) of the model on the batch, the
  cost no K-step gradient attack can go below K times; and one clean training step (forward, backward to the
  weights, SGD step), the cost PGD-K training cannot go below K + 1 times;
* **every attack of the zoo** (advtrain) at a fixed budget: wall time, peak memory, the per-sample backward passes it
  spent (early stopping makes them fewer than its K), and two ratios: ``x_floor`` = time / (K × floor), with K the
  nominal step count, and ``x_per_pass`` = time / (backward passes per sample × floor), the loop's overhead per
  pass actually spent (1.0 = nothing but model passes);
* **the same attacks in torchattacks and adv-lib** where they have them, at the same budget, timed the same way,
  with ``x_peer`` = advtrain's time / the peer's;
* **PGD-K adversarial training steps** against (K + 1) × the clean step: the bare loop (maximizer + SGD step) and the
  full framework step (:class:`~advtrain.training.AdversarialTraining` under a Lightning ``Trainer``, batches coming
  from a DataLoader); for both, the **host syncs per step** (operations that make the host wait for the GPU, counted
  by ``tests/sync_detector.py``, which sees them on CPU too). A sync-free step lets the host queue the next step and
  load the next batch while the GPU works; on CPU nothing waits, so only the counts, not the times, show it there.

Random CIFAR-shaped data is fine for speed (the pixels do not matter; strength is measured by the ``peers_*``
scripts on a trained network). Labels are the model's own predictions so that every sample starts correctly
classified. On an untrained model random inputs are fooled within a few steps, which early stopping turns into
fewer passes: ``x_per_pass`` is then the fair measure of the loop, ``x_floor`` of what the user waits.

    python benchmarks/speed.py [--model preact_resnet18] [--batch 128] [--device cuda] [--autocast bf16]
                               [--compile] [--channels-last] [--steps 10] [--repeats 3]

CPU example (this machine, minutes): ``OMP_NUM_THREADS=2 python benchmarks/speed.py --model small_cnn --batch 256
--image 1 28 28``; ``--only training`` times the floor and the training rows alone (no attack has that name).
GPU (one command): ``python benchmarks/speed.py --device cuda --model preact_resnet18 --batch 512
--autocast bf16 --compile --channels-last``. Writes ``benchmarks/results/speed.json``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import ROOT, import_adv_lib, import_torchattacks, write_table
from torch import nn

from advtrain.attacks import create_attack
from advtrain.engine import attack_context
from advtrain.maximizers import PGD as PGDMaximizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float, float]:
    """(result, median seconds, peak memory in MiB) over ``repeats`` runs after one warm-up run. Peak memory is the
    CUDA allocator's high-water mark on GPU; on CPU the process's maximum resident set size (a high-water mark of
    the whole process, so it only says when an attack raised it)."""
    out = fn()  # warm-up (and compilation)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out, statistics.median(times), peak


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)


def floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    """One forward + input-gradient backward of the model on the batch: the unit of the floor."""

    def run() -> torch.Tensor:
        xr = x.detach().requires_grad_(True)
        with _autocast(x.device, dtype):
            loss = nn.functional.cross_entropy(model(xr).float(), y)
        return torch.autograd.grad(loss, xr)[0]

    return run


def clean_train_step(model: nn.Module, x, y, opt, dtype) -> Callable[[], Any]:
    """One clean training step: forward, backward to the weights, SGD step."""

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(x.device, dtype):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return run


def adversarial_train_step(model: nn.Module, x, y, opt, dtype, steps: int, eps: float) -> Callable[[], Any]:
    """One PGD-K adversarial training step: the maximizer (K passes, eval mode) then the clean step on its output."""
    autocast = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    maximizer = PGDMaximizer(eps=eps, steps=steps, step_size=2.5 * eps / steps, autocast=autocast)

    def run() -> None:
        adv = maximizer(model, x, y).adv
        clean_train_step(model, adv, y, opt, dtype)()

    return run


def _sync_detector():
    """``tests/sync_detector.py``, the detector the tests use (one implementation)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import sync_detector

    return sync_detector


def count_syncs(fn: Callable[[], Any]) -> int:
    """Host syncs of one call of ``fn`` (after a warm-up call, so that one-off set-up is not counted)."""
    fn()
    with _sync_detector().HostSyncDetector() as syncs:
        fn()
    return syncs.count


def lightning_training(args: argparse.Namespace, device: torch.device, steps: int) -> tuple[float, int, int]:
    """PGD-``steps`` training through :class:`~advtrain.training.AdversarialTraining` and a Lightning ``Trainer``:
    (median seconds per step after two warm-up steps, host syncs per step in the steady state, host syncs of the
    first step). Batches come from a DataLoader on the host (pinned on CUDA), as in a real run; no logger, no
    checkpoints, no clean-accuracy tracking (its extra forward is not part of PGD-K); SGD as in the clean step."""
    from functools import partial

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from advtrain.training import AdversarialTraining

    def module() -> AdversarialTraining:
        torch.manual_seed(0)
        pgd = PGDMaximizer(eps=args.eps, steps=steps, step_size=2.5 * args.eps / steps, autocast=args.autocast,
                           compile=args.compile)  # fmt: skip
        built = AdversarialTraining(arch=args.model, num_classes=args.classes, image_shape=tuple(args.image),
                                    maximizer=pgd, track_clean_train=False,
                                    optimizer=partial(torch.optim.SGD, lr=1e-3, momentum=0.9))  # fmt: skip
        if args.channels_last:
            built.model.to(memory_format=torch.channels_last)
        return built

    torch.manual_seed(0)
    x = torch.rand(args.batch, *args.image)
    with torch.no_grad():
        y = module().model.eval()(x).argmax(1)
    repeats = args.repeats + 2

    def loader(batches: int) -> DataLoader:
        data = TensorDataset(x.repeat(batches, 1, 1, 1), y.repeat(batches), torch.arange(batches * args.batch))
        return DataLoader(data, batch_size=args.batch, pin_memory=device.type == "cuda")

    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(args.autocast)
    settings = dict(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, log_every_n_steps=10, precision=precision)  # fmt: skip
    seconds: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync(device)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(device)
            seconds.append(time.perf_counter() - self.start)

    pl.Trainer(max_steps=repeats, callbacks=[StepTimer()], **settings).fit(module(), loader(repeats))
    counted = _sync_detector().fit_counting_syncs(module(), loader(3), host_hooks=("on_before_batch_transfer",),
                                                  trainer_kwargs=dict(max_steps=3, **settings))  # fmt: skip
    counts = counted.counts()
    return statistics.median(seconds[2:]), max(counts[1:]), counts[0]


def zoo(eps: float, l2_eps: float, steps: int) -> list[tuple[str, dict[str, Any], int]]:
    """(registry name, hyperparameters, nominal K) of the attacks timed."""
    return [
        ("fgsm", {"eps": eps}, 1),
        ("pgd", {"eps": eps, "steps": steps, "seed": 0}, steps),
        ("apgd", {"eps": eps, "steps": steps, "seed": 0}, steps),
        ("pgd", {"norm": "l2", "eps": l2_eps, "steps": steps, "seed": 0}, steps),
        ("deepfool", {"steps": 50}, 50),
        ("ddn", {"steps": steps}, steps),
        ("cw_l2", {"binary_search_steps": 1, "steps": steps, "step_size": 0.1, "initial_const": 1.0}, steps),
        ("tr", {"norm": "linf", "steps": steps}, steps),
    ]


def peers(name: str, kw: dict[str, Any]) -> list[tuple[str, Callable]]:
    """(library, fn(model, x, y)) for the peers that implement this attack at the same budget."""
    ta, al = import_torchattacks(), import_adv_lib()
    out: list[tuple[str, Callable]] = []
    norm = kw.get("norm", "linf")
    steps = kw.get("steps")
    if name == "pgd" and norm == "linf":
        alpha = 2.5 * kw["eps"] / steps
        if ta is not None:
            out.append(("torchattacks", lambda m, x, y: ta.PGD(m, eps=kw["eps"], alpha=alpha, steps=steps)(x, y)))
        if al is not None:
            out.append(
                ("adv-lib", lambda m, x, y: al.pgd_linf(m, x, y, ε=kw["eps"], steps=steps, absolute_step_size=alpha))
            )
    if name == "pgd" and norm == "l2" and ta is not None:
        alpha = 2.5 * kw["eps"] / steps
        out.append(("torchattacks", lambda m, x, y: ta.PGDL2(m, eps=kw["eps"], alpha=alpha, steps=steps)(x, y)))
    if name == "apgd":
        if ta is not None:
            out.append(("torchattacks", lambda m, x, y: ta.APGD(m, eps=kw["eps"], steps=steps, n_restarts=1)(x, y)))
        if al is not None:
            out.append(("adv-lib", lambda m, x, y: al.apgd(m, x, y, eps=kw["eps"], norm=float("inf"), n_iter=steps)))
    if name == "fgsm" and ta is not None:
        out.append(("torchattacks", lambda m, x, y: ta.FGSM(m, eps=kw["eps"])(x, y)))
    if name == "deepfool" and al is not None:
        out.append(("adv-lib", lambda m, x, y: al.df(m, x, y, steps=kw["steps"], overshoot=0.02, norm=2)))
    if name == "ddn" and al is not None:
        out.append(("adv-lib", lambda m, x, y: al.ddn(m, x, y, steps=steps)))
    if name == "cw_l2" and al is not None:
        out.append(("adv-lib", lambda m, x, y: al.carlini_wagner_l2(
            m, x, y, learning_rate=kw["step_size"], initial_const=kw["initial_const"], binary_search_steps=1,
            max_iterations=steps)))  # fmt: skip
    if name == "tr" and al is not None:
        out.append(("adv-lib", lambda m, x, y: al.tr(m, x.clone(), y, p=float("inf"), iter=steps, adaptive=True)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preact_resnet18", help="an advtrain.models name")
    parser.add_argument("--image", type=int, nargs=3, default=[3, 32, 32], help="C H W")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--compile", action="store_true", help="the attacks' fused (torch.compile-d) step")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="K of the iterative attacks and of PGD training")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--only", nargs="*", default=None,
                        help="registry names of the attacks to time (default: all); 'training' (no attack's name) "
                             "keeps the floor and the training rows only")  # fmt: skip
    parser.add_argument("--name", default="speed", help="results file under benchmarks/results/")
    args = parser.parse_args()

    from advtrain.models import create_model

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, in_channels=args.image[0]).to(device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.rand(args.batch, *args.image, device=device).contiguous(memory_format=memory_format)
    with torch.no_grad(), _autocast(device, dtype):
        y = model(x).float().argmax(1)
    for p in model.parameters():
        p.requires_grad_(False)
    setup = f"{args.model}, batch {args.batch}, {device.type}, autocast {args.autocast}, compile {args.compile}"
    print(
        f"# {setup}, channels_last {args.channels_last}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )

    _, t_floor, _ = _measure(floor_step(model, x, y, dtype), device, args.repeats)
    rows: list[dict[str, Any]] = [{"what": "floor: 1 x (forward + input backward)", "library": "-", "seconds": t_floor}]
    for name, kw, k in zoo(args.eps, 0.5, args.steps):
        if args.only and name not in args.only:
            continue
        attack = create_attack(name, **kw, autocast=args.autocast, compile=args.compile)
        label = f"{name} {attack.norm} K={k}"
        result, t, peak = _measure(lambda attack=attack: attack(model, x, y), device, args.repeats)
        per_sample = result.backward_passes / args.batch
        row = {
            "what": label, "library": "advtrain", "seconds": t, "peak_mib": peak, "success": result.success_rate,
            "backward_per_sample": per_sample, "x_floor": t / (k * t_floor),
            "x_per_pass": t / (max(per_sample, 1e-9) * t_floor),
        }  # fmt: skip
        rows.append(row)
        if args.no_peers:
            continue
        for library, fn in peers(name, kw):
            with attack_context(model, "eval"):
                _, tp, peakp = _measure(lambda fn=fn: fn(model, x, y), device, args.repeats)
            rows.append({"what": label, "library": library, "seconds": tp, "peak_mib": peakp})
            row[f"x_{library}"] = t / tp

    if not args.no_training:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        _, t_clean, _ = _measure(clean_train_step(model, x, y, opt, dtype), device, args.repeats)
        k = args.steps
        adv_step = adversarial_train_step(model, x, y, opt, dtype, k, args.eps)
        _, t_adv, peak = _measure(adv_step, device, args.repeats)
        rows.append({"what": "clean training step", "library": "-", "seconds": t_clean})
        rows.append({
            "what": f"PGD-{k} training step", "library": "advtrain", "seconds": t_adv, "peak_mib": peak,
            "x_floor": t_adv / ((k + 1) * t_clean), "images_per_s": args.batch / t_adv,
            "host_syncs": count_syncs(adv_step),
        })  # fmt: skip
        t_fw, syncs, first = lightning_training(args, device, k)
        rows.append({
            "what": f"PGD-{k} training step, Lightning (syncs of the first step: {first})", "library": "advtrain",
            "seconds": t_fw, "x_floor": t_fw / ((k + 1) * t_clean), "images_per_s": args.batch / t_fw,
            "host_syncs": syncs,
        })  # fmt: skip
    columns = ["what", "library", "seconds", "peak_mib", "success", "backward_per_sample", "x_floor", "x_per_pass",
               "x_torchattacks", "x_adv-lib", "images_per_s", "host_syncs"]  # fmt: skip
    for row in rows:
        row["setup"] = setup
    write_table(args.name, rows, columns)


if __name__ == "__main__":
    main()
