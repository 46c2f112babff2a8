"""Robust accuracy of a model under a suite of attacks, with the framework's own verification of every claim.

One code path serves the CLI (``advtrain evaluate``, :mod:`advtrain.evaluation.entry`), the
:class:`~advtrain.callbacks.RobustEvaluation` callback and scripts: :func:`evaluate_robustness` resolves the attacks
and threat model (:func:`prepare_attacks`), attacks every batch (:func:`~advtrain.evaluation.batch.attack_batch`
plans, runs and verifies every claim), collects the per-sample records (exactly, under DDP:
:class:`~advtrain.evaluation.metrics.RobustnessRecords`), escalates when a gradient-masking check fires, and
:func:`~advtrain.evaluation.report.summarize` turns the records into a :class:`RobustnessReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from advtrain.attacks.base import Attack
from advtrain.errors import InvalidConfigError
from advtrain.evaluation.batch import (
    FUSE_CHOICES,
    OnVerified,
    attack_batch,
    attack_batch_halving_on_oom,
    fusion_enabled,
    verify,
)
from advtrain.evaluation.escalation import ADAPTIVE_SUITES, describe_escalation, plan_escalation
from advtrain.evaluation.masking import REL_TOL
from advtrain.evaluation.metrics import RobustnessRecords
from advtrain.evaluation.records import join_attacks, select_attacks
from advtrain.evaluation.report import RobustnessReport, robust_under_all, summarize
from advtrain.evaluation.sampling import BatchAlignedSampler, dist_info
from advtrain.evaluation.suites import ALIASES, EvalAttack, build_suite, wrap_attacks
from advtrain.threat.geometry import Geometry, geometry_for
from advtrain.threat.norms import Norm, parse_budget

log = logging.getLogger(__name__)

__all__ = ["FUSE_CHOICES", "REL_TOL", "attack_batch", "evaluate_robustness", "fusion_enabled", "prepare_attacks",
           "verify"]  # fmt: skip


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
        InvalidConfigError (a ValueError): for attacks with different norms, a targeted attack (the evaluation
            passes the true labels, which a targeted attack would take as its targets), a missing threat model, or
            a budget that is negative or, for L∞, above 1.
    """
    if attacks is None:
        if suite is None:
            raise InvalidConfigError("Give either attacks or a suite name.")
        if norm is None or eps is None:
            raise InvalidConfigError(f"Suite {suite!r} needs the threat model: pass norm and eps.")
        entries = build_suite(suite, norm=norm, eps=eps, seed=seed)
    elif isinstance(attacks, Mapping):
        entries = wrap_attacks(attacks)
    else:
        entries = list(attacks)
    if not entries:
        raise InvalidConfigError("No attacks to evaluate.")
    targeted = [e.name for e in entries if getattr(e.attack, "targeted", False)]
    if targeted:
        raise InvalidConfigError(
            f"attack {targeted[0]!r} is targeted (targeted=True), but the evaluation passes the true labels, which it "
            "would take as its targets (already reached: nothing is attacked). Use targeted=False."
        )
    norms = {Norm.parse(getattr(e.attack, "norm", None) or e.attack.spec.norms[0]) for e in entries}
    if norm is not None:
        norms.add(Norm.parse(norm))
    if len(norms) > 1:
        raise InvalidConfigError(f"The attacks use different norms ({sorted(n.value for n in norms)}): evaluate one "
                                 "threat model at a time.")  # fmt: skip
    threat = norms.pop()
    budgets = [float(e.attack.eps) for e in entries if not e.minimal and getattr(e.attack, "eps", None) is not None]
    if eps is None:
        if not budgets and not eps_grid:
            raise InvalidConfigError("Only minimal-norm attacks were given: pass eps or an eps_grid.")
        eps = max(budgets) if budgets else max(eps_grid)
    eps = parse_budget(eps, threat, "eps")
    checked = [parse_budget(e, threat, f"eps_grid[{i}]") for i, e in enumerate(eps_grid or [])]
    grid = sorted(set(checked) | {eps} | (set() if eps_grid else set(budgets)))
    return entries, threat, float(eps), grid


def _fingerprint(entries: Sequence[EvalAttack], grid: Sequence[float], cascade: bool, positions: Sequence[int],
                 batch_size: int, fusion: int | None = None) -> str:  # fmt: skip
    # ``fusion`` (the max fused batch of a fused run) only enters when set, so unfused fingerprints stay as they were.
    extra = [] if fusion is None else [fusion]
    text = json.dumps([[e.name, e.config, e.role] for e in entries] + [list(grid), cascade, batch_size, *extra])
    digest = hashlib.sha256(text.encode())
    digest.update(torch.as_tensor(list(positions)).numpy().tobytes())
    return digest.hexdigest()


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
    model: nn.Module, data: Iterable | Dataset | DataLoader,
    attacks: Mapping[str, Attack] | Sequence[EvalAttack] | None = None, *, suite: str | None = None,
    norm: str | None = None, eps: float | None = None, eps_grid: Sequence[float] | None = None, cascade: bool = True,
    fuse: str | bool = "auto", max_fused_batch: int = 1024, batch_size: int | None = None,
    device: torch.device | str = "cpu", max_samples: int | None = None, progress: bool = True, seed: int = 0,
    partial_dir: str | Path | None = None, resume: bool = False, tolerance: float = 0.01,
    meta: Mapping[str, Any] | None = None, adaptive: bool | None = None,
    escalation_options: Mapping[str, Mapping[str, Any]] | None = None, interpretability: bool = False,
    is_percentiles: Sequence[float] | None = None, gallery_samples: int = 4,
) -> RobustnessReport:  # fmt: skip
    """Evaluates a model under a set of attacks (or a suite) over a grid of budgets, verifying every claim.

    Under ``torch.distributed`` each rank evaluates whole batches of a :class:`BatchAlignedSampler` (no sample twice,
    the same batches as one process) and the records are gathered exactly before the summary, so every rank returns
    the single-process report.

    Args:
        model: classifier taking [0, 1] inputs (attacked and verified in eval mode; its mode is restored).
        data: a Dataset or DataLoader of ``(x, y[, index])`` (a plain iterable of batches works in one process).
        attacks: name → attack, or prepared :class:`EvalAttack` objects; ``None`` to use ``suite``.
        suite: a built-in suite (``"quick"``, ``"apgd"``, ``"autoattack"`` (alias ``"standard"``),
            ``"autoattack-plus"``, ``"autoattack-rand"``, ``"full"``), see :mod:`advtrain.evaluation.suites`.
        norm, eps: the threat norm and main budget (``robust_accuracy_all``); required with a suite.
        eps_grid: the budgets of the accuracy-versus-ε curves (``eps`` is always included).
        cascade: budgeted attacks only attack the samples still robust (see :mod:`advtrain.evaluation.batch`).
        fuse: run each budgeted attack over the whole ε grid in one call, and APGD-CE with APGD-DLR, on concatenated
            batches: ``True``, ``False`` or ``"auto"`` (only on CUDA). Fewer, larger model calls for more per-sample
            passes: a win where the model underfills the device, a loss on a CPU. The records equal the unfused ones
            for deterministic attacks.
        max_fused_batch: the most rows of one fused call (the largest batch that still underfills the device).
        batch_size: batch size for a Dataset (default: the DataLoader's, else 128).
        device: where to run.
        max_samples: evaluate only the first samples.
        progress: show a progress bar (rank 0).
        seed: seed of the suite's stochastic attacks.
        partial_dir: folder for per-batch results (``partial/`` inside it), so an interrupted run can resume.
        resume: reuse the per-batch results of an earlier run with the same configuration found in ``partial_dir``.
        tolerance: fraction of samples above which a gradient-masking check fires.
        meta: extra facts for the report (checkpoint, split, ...).
        adaptive: escalate when a gradient-masking check fires instead of only warning (default: on for the suites
            of :data:`~advtrain.evaluation.escalation.ADAPTIVE_SUITES`): the samples still robust after the suite are
            attacked again by the attacks :func:`~advtrain.evaluation.escalation.plan_escalation` chooses; they join
            the report in role ``"escalation"``, and its ``escalation`` entry says what fired, ran and changed.
        escalation_options: per-label hyperparameters of the escalation attacks, e.g. ``{"square-more": {"steps":
            2000}}``.
        interpretability: also score every attack's verified points by the interpretability score IS(ν) and keep a
            gallery of examples (:mod:`advtrain.evaluation.interpretability`): ``report.summary["interpretability"]``
            and ``report.interpretability``; not counted in the attacks' passes or time.
        is_percentiles: the percentiles ν of IS(ν) (default 30, 40, ..., 90).
        gallery_samples: examples per attack in the gallery (0: none).

    Returns:
        The :class:`RobustnessReport`.
    """
    for key, value in (("max_samples", max_samples), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise InvalidConfigError(f"{key} must be >= 1 (or null for the default), got {value}.")
    fused = fusion_enabled(fuse, max_fused_batch, device)
    entries, threat, eps, grid = prepare_attacks(attacks, suite=suite, norm=norm, eps=eps, eps_grid=eps_grid, seed=seed)
    if adaptive is None:
        adaptive = suite is not None and ALIASES.get(suite, suite) in ADAPTIVE_SUITES
    run = _Run(model.to(device), data, grid, geometry_for(threat), cascade, fused, max_fused_batch, batch_size, device,
               max_samples, progress, partial_dir, resume)  # fmt: skip
    collector = _collector(run, entries, eps, threat, is_percentiles, gallery_samples) if interpretability else None
    start = time.perf_counter()
    records = _records(entries, run, on_verified=collector)
    options = {"norm": threat.value, "eps": eps, "cascade": cascade, "tolerance": tolerance}
    suite_size, escalation = len(entries), None
    if adaptive:
        records, entries, escalation = _escalate(records, entries, run, options, seed, escalation_options)
    report = summarize(records, entries, grid, **options, seconds=time.perf_counter() - start, meta=meta,
                       fusion=run.fusion)  # fmt: skip
    if escalation is not None:
        report.summary["escalation"] = describe_escalation(escalation[0], report, escalation[1])
    if collector is not None:  # the suite's attacks only: the escalation's are not scored
        report.attach_interpretability(collector.finish(select_attacks(records, slice(0, suite_size))))
    report.log_warnings()
    return report


def _collector(run: _Run, entries: Sequence[EvalAttack], eps: float, threat: Norm, percentiles, gallery_samples: int):
    """The interpretability collector of an evaluation (:mod:`advtrain.evaluation.interpretability`)."""
    from advtrain.evaluation.interpretability import InterpretabilityCollector

    return InterpretabilityCollector(run.model, [(e.name, e.minimal) for e in entries], run.grid, float(eps),
                                     percentiles=percentiles, gallery_samples=gallery_samples,
                                     norm=threat.value)  # fmt: skip


@dataclass(frozen=True)
class _Run:
    """What every batch of one evaluation shares: the options of :func:`evaluate_robustness` that reach the batches
    (``fuse`` decided: :func:`fusion_enabled`)."""

    model: nn.Module
    data: Any
    grid: list[float]
    geometry: Geometry
    cascade: bool
    fuse: bool
    max_fused_batch: int
    batch_size: int | None
    device: torch.device | str
    max_samples: int | None
    progress: bool
    partial_dir: str | Path | None
    resume: bool

    @property
    def fusion(self) -> int | None:
        """The max fused batch of a fused run, else ``None`` (as the report and the resume fingerprint give it)."""
        return self.max_fused_batch if self.fuse else None


def _escalate(
    records: dict[str, Tensor], entries: list[EvalAttack], run: _Run, options: Mapping[str, Any], seed: int,
    escalation_options: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[dict[str, Tensor], list[EvalAttack], tuple[dict[str, Any], RobustnessReport] | None]:  # fmt: skip
    """An adaptive evaluation's second step: when the suite's gradient-masking checks fire, the samples still robust
    (per ε) are attacked again by the attacks :func:`plan_escalation` chooses.

    Returns:
        The records and attacks with the escalation's appended, and ``(plan, the suite's report)`` for the report's
        ``escalation`` entry; the records and attacks unchanged and ``None`` when nothing fired.
    """
    first = summarize(records, entries, run.grid, **options)
    extra, plan = plan_escalation(first, threat=Norm.parse(options["norm"]), eps=options["eps"], seed=seed,
                                  options=escalation_options)  # fmt: skip
    if not extra:
        return records, entries, None
    standing = robust_under_all(records, run.grid)
    log.warning("evaluate: gradient-masking checks fired (%s): escalating with %s on the %d samples still robust.",
                ", ".join(plan["triggered_by"]), ", ".join(e.name for e in extra),
                int(standing.any(1).sum()))  # fmt: skip
    folder = None if run.partial_dir is None else Path(run.partial_dir) / "escalation"
    more = _records(extra, dataclasses.replace(run, partial_dir=folder), standing=(records["index"], standing))
    return join_attacks(records, more), [*entries, *extra], (plan, first)


def _records(
    entries: Sequence[EvalAttack], run: _Run, *, standing: tuple[Tensor, Tensor] | None = None,
    on_verified: OnVerified | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """Attacks every batch (or reuses the per-batch results of an interrupted run) and gathers the records;
    ``standing`` = (dataset indices, (N, G) mask) restricts the attacks to the samples still standing per ε."""
    rank, world = dist_info()
    records = RobustnessRecords(len(entries), len(run.grid)).to(run.device)
    partial = _prepare_partial(run, entries, rank, world)
    total = _size(run.data)
    total = total if total is None or run.max_samples is None else min(total, run.max_samples)
    desc = "evaluate" if standing is None else "escalate"
    bar = tqdm(total=total, desc=desc, unit="img", disable=not run.progress or rank != 0)
    # ``standing`` is indexed by position among the evaluated samples, sorted by dataset index (as the records are).
    positions = None if standing is None else {int(i): p for p, i in enumerate(standing[0])}
    reused = 0
    for number, x, y, index in _batches_of(run.data, run.batch_size, run.max_samples, rank, world):
        path = partial / f"batch-{number:06d}.pt" if partial is not None else None
        if path is not None and run.resume and path.is_file():
            record = torch.load(path, map_location="cpu", weights_only=True)
            reused += 1
        else:
            mask = None if standing is None else standing[1][[positions[int(i)] for i in index]]
            record = attack_batch_halving_on_oom(run.model, x.to(run.device), y.to(run.device), index, entries,
                                                 run.grid, geometry=run.geometry, cascade=run.cascade, fuse=run.fuse,
                                                 max_fused_batch=run.max_fused_batch, standing=mask,
                                                 on_verified=on_verified)  # fmt: skip
            if path is not None:
                torch.save(record, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)  # atomic: an interrupted write leaves no half file
        records.update(record)
        bar.update(int(x.shape[0]) * (world if total is not None else 1))
    bar.close()
    if reused:
        log.info("evaluate: resumed %d batches from %s", reused, partial)
        if on_verified is not None:
            log.warning("evaluate: the interpretability scores and gallery cover only the batches attacked in this "
                        "run, not the %d resumed ones (rerun without --resume for all).", reused)  # fmt: skip
    return records.results()


def _size(data) -> int | None:
    """The number of samples of a DataLoader or Dataset with a length, else ``None``."""
    if isinstance(data, DataLoader):
        return len(data.dataset) if hasattr(data.dataset, "__len__") else None
    return len(data) if isinstance(data, Dataset) and hasattr(data, "__len__") else None


def _prepare_partial(run: _Run, entries: Sequence[EvalAttack], rank: int, world: int) -> Path | None:
    """The folder of per-batch results, checked against (or stamped with) this run's configuration."""
    if run.partial_dir is None:
        return None
    folder = Path(run.partial_dir) / "partial"
    size = _size(run.data)
    if size is None:
        raise ValueError("Resumable evaluation (partial_dir) needs a Dataset or DataLoader.")
    size = size if run.max_samples is None else min(size, run.max_samples)
    batch_size = run.batch_size or (run.data.batch_size if isinstance(run.data, DataLoader) else None)
    stamp = _fingerprint(entries, run.grid, run.cascade, range(size), batch_size or 128, run.fusion)
    meta_file = folder / "meta.json"
    if rank == 0:
        if run.resume and meta_file.is_file() and json.loads(meta_file.read_text()).get("fingerprint") != stamp:
            raise ValueError(f"{folder} holds results of a different evaluation (attacks, grid, samples or batch size "
                             "differ): rerun without --resume or use another --output.")  # fmt: skip
        if not run.resume and folder.is_dir():
            for old in folder.glob("batch-*.pt"):
                old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps({"fingerprint": stamp}))
    if world > 1:
        dist.barrier()  # once, before the first batch: the folder is ready on every rank
    return folder
