"""Robust accuracy of a model under a suite of attacks, with the framework's own verification of every claim.

One code path serves the CLI (``advtrain evaluate``), the :class:`~advtrain.callbacks.RobustEvaluation` callback
and scripts: :func:`attack_batch` attacks one batch and verifies every claim; :class:`RobustnessRecords` collects
the per-sample results (exactly, under DDP); :func:`summarize` turns them into a :class:`RobustnessReport`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from advtrain.attacks.base import Attack
from advtrain.engine.losses import margin_loss
from advtrain.engine.modes import attack_context
from advtrain.evaluation.masking import REL_TOL, within
from advtrain.evaluation.metrics import RobustnessRecords
from advtrain.evaluation.report import RobustnessReport, summarize
from advtrain.evaluation.sampling import BatchAlignedSampler, dist_info
from advtrain.evaluation.suites import ROLES, EvalAttack, build_suite, wrap_attacks
from advtrain.threat.geometry import Geometry, geometry_for
from advtrain.threat.norms import Norm, as_eps_tensor

log = logging.getLogger(__name__)

__all__ = ["REL_TOL", "attack_batch", "evaluate_robustness", "prepare_attacks", "verify"]


def verify(
    model: nn.Module, inputs: Tensor, labels: Tensor, adv: Tensor, geometry: Geometry, eps: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The framework's last word on a claimed adversarial batch: clip it into the ε-ball (when ``eps`` is given) and
    the [0, 1] box, and decide success with a fresh forward pass in eval mode.

    Returns:
        ``(adv, fooled, norms)``: the clipped points, whether each is misclassified, and their sizes in the threat
        norm.
    """
    delta = adv.detach().float() - inputs.float()
    if eps is not None:
        delta = geometry.project(delta, as_eps_tensor(eps, inputs))
    clipped = (inputs.float() + delta).clamp(0.0, 1.0).to(inputs.dtype)
    with torch.no_grad(), attack_context(model, "eval"):
        fooled = model(clipped).argmax(1) != labels
    return clipped, fooled, geometry.measure((clipped - inputs).float())


def _diagnostics(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clean logits, whether two forward passes disagree, and whether the CE and margin gradients are both exactly
    zero (the inputs of two gradient-masking checks, at the cost of one extra forward and two backward passes)."""
    with attack_context(model, "eval"):
        with torch.no_grad():
            first, second = model(x).float(), model(x).float()
        scale = 1.0 + first.abs().flatten(1).amax(1)
        unstable = ((first - second).abs().flatten(1).amax(1) > 1e-5 * scale) | (first.argmax(1) != second.argmax(1))
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logits = model(xg.to(x.dtype)).float()
            g_ce = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg, retain_graph=True)[0]
            g_margin = torch.autograd.grad(margin_loss(logits, y).sum(), xg)[0]
    zero = (g_ce.flatten(1).abs().amax(1) == 0) & (g_margin.flatten(1).abs().amax(1) == 0)
    return first, unstable, zero


def _timed(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, eps: float | None):
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    result = attack(model, x, y) if eps is None else attack(model, x, y, eps=eps)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return result, time.perf_counter() - start


def attack_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    index: Tensor,
    attacks: Sequence[EvalAttack],
    grid: Sequence[float],
    *,
    geometry: Geometry,
    cascade: bool = True,
) -> dict[str, Tensor]:
    """Attacks one batch with every attack and verifies every claim.

    Minimal-norm attacks run first, once, on every correctly classified sample. Then, for each ε of the (ascending)
    grid, the budgeted attacks run in role order (iterative, one-step, black-box); with ``cascade`` each one only
    attacks the samples not yet broken at that ε by any earlier attack (at that ε, at a smaller one, or by a
    minimal-norm attack with a norm ≤ ε).

    Returns:
        The batch record (tensors on the CPU): ``index``, ``correct``, ``x_norm`` (‖x‖ in the threat norm),
        ``zero_grad``, ``unstable`` of shape (B,); ``attacked``, ``claimed`` (the attack's own success flag),
        ``fooled`` (verified), ``norms`` (verified norm, +inf where not fooled) and ``robust`` of shape (B, A, G);
        ``forward_passes``, ``backward_passes``, ``seconds`` of shape (A,). ``robust`` is, with ``cascade``, the
        robust accuracy after this attack and all earlier ones (AutoAttack's convention), else under this attack
        alone. A minimal-norm attack's row is the same at every ε, except ``robust``.
    """
    batch, num_attacks, num_eps = x.shape[0], len(attacks), len(grid)
    logits, unstable, zero_grad = _diagnostics(model, x, y)
    correct = logits.argmax(1) == y
    shape = (batch, num_attacks, num_eps)
    rec: dict[str, Tensor] = {
        "index": index.detach().cpu().long(),
        "correct": correct,
        "x_norm": geometry.measure(x.float()),
        "zero_grad": zero_grad,
        "unstable": unstable,
        "attacked": torch.zeros(shape, dtype=torch.bool, device=x.device),
        "claimed": torch.zeros(shape, dtype=torch.bool, device=x.device),
        "fooled": torch.zeros(shape, dtype=torch.bool, device=x.device),
        "robust": torch.zeros(shape, dtype=torch.bool, device=x.device),
        "norms": torch.full(shape, float("inf"), device=x.device),
    }
    sums = {
        name: torch.zeros(num_attacks, dtype=torch.float64) for name in ("forward_passes", "backward_passes", "seconds")
    }
    best = torch.full((batch,), float("inf"), device=x.device)  # smallest verified adversarial norm so far

    def run(a: int, idx: Tensor, eps: float | None, columns: slice) -> Tensor:
        entry = attacks[a]
        result, seconds = _timed(entry.attack, model, x[idx], y[idx], eps)
        _, fooled, norms = verify(model, x[idx], y[idx], result.adv, geometry, eps)
        found = torch.where(fooled, norms, torch.full_like(norms, float("inf")))
        for name, value in (("attacked", True), ("claimed", result.success[:, None]), ("fooled", fooled[:, None]),
                            ("norms", found[:, None])):  # fmt: skip
            rec[name][idx, a, columns] = value
        sums["forward_passes"][a] += result.forward_passes
        sums["backward_passes"][a] += result.backward_passes
        sums["seconds"][a] += seconds
        best[idx] = torch.minimum(best[idx], found)
        return found

    order = sorted(range(num_attacks), key=lambda a: ROLES.index(attacks[a].role))
    for a in (a for a in order if attacks[a].minimal):
        idx = correct.nonzero().squeeze(1)
        if idx.numel():
            run(a, idx, None, slice(None))
        own = rec["norms"][:, a, 0]
        for g, eps in enumerate(grid):
            rec["robust"][:, a, g] = correct & ~within(best if cascade else own, eps)
    for g, eps in enumerate(grid):
        for a in (a for a in order if not attacks[a].minimal):
            standing = correct & ~within(best, eps) if cascade else correct
            idx = standing.nonzero().squeeze(1)
            if idx.numel():
                run(a, idx, eps, slice(g, g + 1))
            broken = within(best, eps) if cascade else rec["fooled"][:, a, g]
            rec["robust"][:, a, g] = correct & ~broken
    out = {name: value.detach().cpu() for name, value in rec.items()}
    out.update(sums)
    return out


def prepare_attacks(
    attacks: Mapping[str, Attack] | Sequence[EvalAttack] | None = None,
    *,
    suite: str | None = None,
    norm: str | None = None,
    eps: float | None = None,
    eps_grid: Sequence[float] | None = None,
    seed: int = 0,
) -> tuple[list[EvalAttack], Norm, float, list[float]]:
    """Resolves the attacks and the threat model of an evaluation.

    Args:
        attacks: explicit attacks (name → attack, or :class:`EvalAttack`), or ``None`` to use ``suite``.
        suite: a suite name of :data:`advtrain.evaluation.SUITES`.
        norm: threat norm (default: the explicit attacks' common norm).
        eps: the main budget, reported as ``robust_accuracy_all`` (default: the largest budget of the attacks).
        eps_grid: the budgets to evaluate; ``eps`` is always added.
        seed: seed of the suite's stochastic attacks.

    Returns:
        ``(attacks, norm, eps, grid)`` with the grid sorted ascending.

    Raises:
        ValueError: for attacks with different norms, a missing threat model, or an empty/negative grid.
    """
    if attacks is None:
        if suite is None:
            raise ValueError("Give either attacks or a suite name.")
        if norm is None or eps is None:
            raise ValueError(f"Suite {suite!r} needs the threat model: pass norm and eps.")
        entries = build_suite(suite, norm=norm, eps=eps, seed=seed)
    elif isinstance(attacks, Mapping):
        entries = wrap_attacks(attacks)
    else:
        entries = list(attacks)
    if not entries:
        raise ValueError("No attacks to evaluate.")
    norms = {Norm.parse(getattr(e.attack, "norm", None) or e.attack.spec.norms[0]) for e in entries}
    if norm is not None:
        norms.add(Norm.parse(norm))
    if len(norms) > 1:
        raise ValueError(f"The attacks use different norms ({sorted(n.value for n in norms)}): evaluate one threat "
                         "model at a time.")  # fmt: skip
    threat = norms.pop()
    budgets = [float(e.attack.eps) for e in entries if not e.minimal and getattr(e.attack, "eps", None) is not None]
    if eps is None:
        if not budgets and not eps_grid:
            raise ValueError("Only minimal-norm attacks were given: pass eps or an eps_grid.")
        eps = max(budgets) if budgets else max(eps_grid)
    grid = sorted({float(e) for e in (eps_grid or [])} | {float(eps)} | (set() if eps_grid else set(budgets)))
    if grid[0] < 0:
        raise ValueError(f"eps values must be >= 0, got {grid}.")
    return entries, threat, float(eps), grid


def _fingerprint(entries: Sequence[EvalAttack], grid: Sequence[float], cascade: bool, positions: Sequence[int],
                 batch_size: int) -> str:  # fmt: skip
    text = json.dumps([[e.name, e.config, e.role] for e in entries] + [list(grid), cascade, batch_size])
    digest = hashlib.sha256(text.encode())
    digest.update(torch.as_tensor(list(positions)).numpy().tobytes())
    return digest.hexdigest()


_SUMMED = ("forward_passes", "backward_passes", "seconds")


def attack_batch_halving_on_oom(
    model: nn.Module, x: Tensor, y: Tensor, index: Tensor, attacks: Sequence[EvalAttack], grid: Sequence[float],
    *, geometry: Geometry, cascade: bool = True,
) -> dict[str, Tensor]:  # fmt: skip
    """:func:`attack_batch`, retried in halves (recursively) when the device runs out of memory.

    The halves' records are joined sample by sample (pass counts and times summed), so the report covers the same
    samples; deterministic attacks give the same numbers, seeded stochastic ones draw other random starts for the
    halves. A single sample that does not fit is reported with what to do.
    """
    try:
        return attack_batch(model, x, y, index, attacks, grid, geometry=geometry, cascade=cascade)
    except torch.OutOfMemoryError as err:
        if x.shape[0] == 1:
            raise torch.OutOfMemoryError(
                f"evaluate: one sample does not fit in memory under the attacks ({str(err).splitlines()[0]}). Free "
                "memory on the device, use fewer restarts/steps, or run on a larger device."
            ) from None
    # Outside the except block: the failed attempt's frames (and the memory they hold) are released first.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = (x.shape[0] + 1) // 2
    log.warning("evaluate: out of memory on a batch of %d samples; retrying it as %d + %d (pass a smaller "
                "--batch_size to avoid the retries).", x.shape[0], half, x.shape[0] - half)  # fmt: skip
    parts = [
        attack_batch_halving_on_oom(
            model, x[part], y[part], index[part], attacks, grid, geometry=geometry, cascade=cascade
        )  # fmt: skip
        for part in (slice(0, half), slice(half, None))
    ]
    return {
        name: parts[0][name] + parts[1][name] if name in _SUMMED else torch.cat([parts[0][name], parts[1][name]])
        for name in parts[0]
    }


def _batches_of(data, batch_size: int | None, max_samples: int | None, rank: int, world: int):
    """Yields ``(global batch number, x, y, index)`` for this rank (batch-aligned, unrepeated)."""
    dataset: Dataset | None = None
    if isinstance(data, DataLoader):
        dataset, batch_size = data.dataset, batch_size or data.batch_size
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        dataset = data
    if dataset is None:  # a plain iterable of batches: single process only
        if world > 1:
            raise ValueError("Distributed evaluation needs a Dataset or DataLoader, not a plain iterable of batches.")
        offset = 0
        for number, batch in enumerate(data):
            x, y = batch[0], batch[1]
            if max_samples is not None:
                room = max_samples - offset
                if room <= 0:
                    return
                x, y = x[:room], y[:room]
            yield number, x, y, torch.arange(offset, offset + x.shape[0])
            offset += x.shape[0]
        return
    size = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    sampler = BatchAlignedSampler(range(size), batch_size or 128, rank=rank, world_size=world)
    for number, positions in sampler.global_batches():
        batch = default_collate([dataset[i] for i in positions])
        yield number, batch[0], batch[1], torch.as_tensor(positions)


def evaluate_robustness(
    model: nn.Module,
    data: Iterable | Dataset | DataLoader,
    attacks: Mapping[str, Attack] | Sequence[EvalAttack] | None = None,
    *,
    suite: str | None = None,
    norm: str | None = None,
    eps: float | None = None,
    eps_grid: Sequence[float] | None = None,
    cascade: bool = True,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    max_samples: int | None = None,
    progress: bool = True,
    seed: int = 0,
    partial_dir: str | Path | None = None,
    resume: bool = False,
    tolerance: float = 0.01,
    meta: Mapping[str, Any] | None = None,
) -> RobustnessReport:
    """Evaluates a model under a set of attacks (or a suite) over a grid of budgets, verifying every claim.

    Under ``torch.distributed`` each rank evaluates whole batches of a :class:`BatchAlignedSampler` (no sample twice,
    the same batches as one process) and the records are gathered exactly before the summary, so every rank returns
    the single-process report.

    Args:
        model: classifier taking [0, 1] inputs (attacked and verified in eval mode; its mode is restored).
        data: a Dataset or DataLoader of ``(x, y[, index])`` (a plain iterable of batches works in one process).
        attacks: name → attack, or prepared :class:`EvalAttack` objects; ``None`` to use ``suite``.
        suite: a built-in suite (``"quick"``, ``"standard"``, ``"full"``), see :mod:`advtrain.evaluation.suites`.
        norm: threat norm; required with a suite.
        eps: the main budget (``robust_accuracy_all``); required with a suite.
        eps_grid: the budgets of the accuracy-versus-ε curves (``eps`` is always included).
        cascade: budgeted attacks only attack the samples still robust (see :func:`attack_batch`).
        batch_size: batch size for a Dataset (default: the DataLoader's, else 128).
        device: where to run.
        max_samples: evaluate only the first samples.
        progress: show a progress bar (rank 0).
        seed: seed of the suite's stochastic attacks.
        partial_dir: folder for per-batch results (``partial/`` inside it), so an interrupted run can resume.
        resume: reuse the per-batch results of an earlier run with the same configuration found in ``partial_dir``.
        tolerance: fraction of samples above which a gradient-masking check fires.
        meta: extra facts for the report (checkpoint, split, ...).

    Returns:
        The :class:`RobustnessReport`.
    """
    entries, threat, eps, grid = prepare_attacks(attacks, suite=suite, norm=norm, eps=eps, eps_grid=eps_grid, seed=seed)
    geometry = geometry_for(threat)
    rank, world = dist_info()
    model = model.to(device)
    records = RobustnessRecords(len(entries), len(grid)).to(device)
    start = time.perf_counter()
    partial = _prepare_partial(partial_dir, resume, entries, grid, cascade, data, batch_size, max_samples, rank, world)
    total = None
    if isinstance(data, (DataLoader, Dataset)) and hasattr(data.dataset if isinstance(data, DataLoader) else data,
                                                           "__len__"):  # fmt: skip
        n = len(data.dataset) if isinstance(data, DataLoader) else len(data)
        total = n if max_samples is None else min(n, max_samples)
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress or rank != 0)
    reused = 0
    for number, x, y, index in _batches_of(data, batch_size, max_samples, rank, world):
        path = partial / f"batch-{number:06d}.pt" if partial is not None else None
        if path is not None and resume and path.is_file():
            record = torch.load(path, map_location="cpu", weights_only=True)
            reused += 1
        else:
            record = attack_batch_halving_on_oom(model, x.to(device), y.to(device), index, entries, grid,
                                                 geometry=geometry, cascade=cascade)  # fmt: skip
            if path is not None:
                torch.save(record, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)  # atomic: an interrupted write leaves no half file
        records.update(record)
        bar.update(int(x.shape[0]) * (world if total is not None else 1))
    bar.close()
    if reused:
        log.info("evaluate: resumed %d batches from %s", reused, partial)
    data_out = records.results()
    report = summarize(
        data_out, entries, grid, norm=threat.value, eps=eps, cascade=cascade, tolerance=tolerance,
        seconds=time.perf_counter() - start, meta=meta,
    )  # fmt: skip
    report.log_warnings()
    return report


def _prepare_partial(partial_dir, resume, entries, grid, cascade, data, batch_size, max_samples, rank, world):
    """The folder of per-batch results, checked against (or stamped with) this run's configuration."""
    if partial_dir is None:
        return None
    folder = Path(partial_dir) / "partial"
    size = None
    if isinstance(data, DataLoader):
        size, batch_size = len(data.dataset), batch_size or data.batch_size
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        size = len(data)
    if size is None:
        raise ValueError("Resumable evaluation (partial_dir) needs a Dataset or DataLoader.")
    size = size if max_samples is None else min(size, max_samples)
    stamp = _fingerprint(entries, grid, cascade, range(size), batch_size or 128)
    meta_file = folder / "meta.json"
    if rank == 0:
        if resume and meta_file.is_file() and json.loads(meta_file.read_text()).get("fingerprint") != stamp:
            raise ValueError(f"{folder} holds results of a different evaluation (attacks, grid, samples or batch size "
                             "differ): rerun without --resume or use another --output.")  # fmt: skip
        if not resume and folder.is_dir():
            for old in folder.glob("batch-*.pt"):
                old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps({"fingerprint": stamp}))
    if world > 1:
        dist.barrier()  # once, before the first batch: the folder is ready on every rank
    return folder
