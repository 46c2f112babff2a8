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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from advtrain.attacks.base import Attack
from advtrain.engine.checks import check_logits, check_model_inputs
from advtrain.engine.losses import margin_loss
from advtrain.engine.modes import attack_context
from advtrain.engine.result import AttackResult
from advtrain.errors import InvalidConfigError
from advtrain.evaluation.escalation import ADAPTIVE_SUITES, describe_escalation, plan_escalation
from advtrain.evaluation.masking import REL_TOL, within
from advtrain.evaluation.metrics import PER_ATTACK, PER_SAMPLE, RobustnessRecords
from advtrain.evaluation.report import RobustnessReport, robust_under_all, summarize
from advtrain.evaluation.sampling import BatchAlignedSampler, dist_info
from advtrain.evaluation.suites import ALIASES, ROLES, EvalAttack, build_suite, wrap_attacks
from advtrain.threat.geometry import Geometry, geometry_for
from advtrain.threat.norms import Norm, as_eps_tensor, parse_budget

log = logging.getLogger(__name__)

__all__ = ["FUSE_CHOICES", "REL_TOL", "attack_batch", "evaluate_robustness", "fusion_enabled", "prepare_attacks",
           "verify"]  # fmt: skip


#: The allowed values of the ``fuse`` option (see :func:`attack_batch`).
FUSE_CHOICES = ("auto", True, False)


def fusion_enabled(fuse: str | bool, max_fused_batch: int, device: torch.device | str) -> bool:
    """Validates the fusion options and decides whether a run on ``device`` fuses: ``True`` and ``False`` are taken
    as given, ``"auto"`` fuses on CUDA only (see :func:`attack_batch` for the trade-off).

    Raises:
        ValueError: for a ``fuse`` outside :data:`FUSE_CHOICES` or a ``max_fused_batch`` that is not an int >= 1.
    """
    if not (fuse is True or fuse is False or (isinstance(fuse, str) and fuse == "auto")):
        raise ValueError(f"fuse must be one of {FUSE_CHOICES}, got {fuse!r}.")
    if isinstance(max_fused_batch, bool) or not isinstance(max_fused_batch, int) or max_fused_batch < 1:
        raise ValueError(f"max_fused_batch must be an int >= 1 (the most rows of one fused call), got "
                         f"{max_fused_batch!r}.")  # fmt: skip
    return torch.device(device).type == "cuda" if fuse == "auto" else fuse


def verify(
    model: nn.Module, inputs: Tensor, labels: Tensor, adv: Tensor, geometry: Geometry, eps: float | Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The framework's last word on a claimed adversarial batch: clip it into the ε-ball (when ``eps`` is given, a
    scalar or one per row) and the [0, 1] box, and decide success with a fresh forward pass in eval mode.

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
    check_model_inputs(model, x)  # the evaluation's first model call: a wrong dtype or output fails here, in words
    with attack_context(model, "eval"):
        with torch.no_grad():
            first, second = check_logits(model(x)).float(), model(x).float()
        scale = 1.0 + first.abs().flatten(1).amax(1)
        unstable = ((first - second).abs().flatten(1).amax(1) > 1e-5 * scale) | (first.argmax(1) != second.argmax(1))
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logits = model(xg.to(x.dtype)).float()
            g_ce = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg, retain_graph=True)[0]
            g_margin = torch.autograd.grad(margin_loss(logits, y).sum(), xg)[0]
    zero = (g_ce.flatten(1).abs().amax(1) == 0) & (g_margin.flatten(1).abs().amax(1) == 0)
    return first, unstable, zero


def _timed(call: Callable[[], AttackResult], device: torch.device) -> tuple[AttackResult, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _fusion_groups(attacks: Sequence[EvalAttack], order: Sequence[int]) -> list[list[int]]:
    """The budgeted attacks (in cascade ``order``) cut into runs that can share one call: consecutive attacks that
    the run's first can take into its ``call_fused`` (it
    :meth:`shares passes <advtrain.attacks.APGD.shares_passes_with>` with them: APGD-CE and APGD-DLR of one
    configuration); every other attack is a run of its own."""
    groups: list[list[int]] = []
    for a in order:
        lead = attacks[groups[-1][0]].attack if groups else None
        fusable = lead is not None and callable(getattr(lead, "call_fused", None))
        if fusable and lead.shares_passes_with(attacks[a].attack):
            groups[-1].append(a)
        else:
            groups.append([a])
    return groups


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
    fuse: str | bool = "auto",
    max_fused_batch: int = 1024,
    standing: Tensor | None = None,
    on_verified: Callable[[int, int | None, Tensor, Tensor, Tensor, Tensor, Tensor], None] | None = None,
) -> dict[str, Tensor]:
    """Attacks one batch with every attack and verifies every claim.

    Minimal-norm attacks run first, once, on every correctly classified sample. Then, for each ε of the (ascending)
    grid, the budgeted attacks run in role order (iterative, one-step, black-box); with ``cascade`` each one only
    attacks the samples not yet broken at that ε by any earlier attack (at that ε, at a smaller one, or by a
    minimal-norm attack with a norm ≤ ε).

    Fusion (``fuse``): a budgeted attack runs over the whole grid in one call, on a batch holding each sample once
    per ε that may still need it, with a per-row ε; APGDs that differ only in their loss (APGD-CE and APGD-DLR) join
    the same call, each row ascending its own loss (:meth:`advtrain.attacks.APGD.call_fused`). A call holds at most
    ``max_fused_batch`` rows (more ε go to further calls; a single ε larger than that runs alone). The records are
    then filled in cascade order from the fused results, exactly as the unfused cascade fills them: a row of ε is
    read only where the sample still stands at ε after every earlier attack (a verified break at a smaller ε counts
    at every larger one), and each verification has its row's ε. So for attacks that treat each sample as if alone
    and draw nothing at random (FGSM, FGM, BIM, PGD without random start), and for seeded APGD without the cascade,
    the records equal the unfused ones; seeded random starts are drawn for other batches than unfused, as in the
    halves of an out-of-memory retry.

    The trade-off: a fused call cannot skip the samples that earlier ε or earlier attacks of the same call break
    (the rows are chosen before the call, from what earlier calls found), so it spends more per-sample passes than
    the cascade, in fewer and larger model calls. That wins where the model underfills the device (a GPU at small
    batches, where a call of 4·B rows costs about one of B rows) and loses where every row costs its share (a CPU),
    hence ``"auto"``: fuse on CUDA only. Reported pass counts are those spent.

    Args:
        model, x, y, index: the classifier and the batch (``index``: the samples' positions in the dataset).
        attacks: the prepared attacks (:func:`prepare_attacks`).
        grid: the budgets, ascending.
        geometry: the threat norm's geometry.
        cascade: see above.
        fuse: ``True``, ``False`` or ``"auto"`` (fuse on CUDA only), see :data:`FUSE_CHOICES`.
        max_fused_batch: the most rows of one fused call; tune it to the largest batch that still underfills the
            device.
        standing: (B, G) bool, which samples earlier attacks left standing at each ε (an escalation after a suite):
            only those are attacked there, and only those can count as robust. Default: every sample.
        on_verified: called after each verification of an attack's rows as ``on_verified(attack, column, index, x,
            y, adv, fooled)``: the attack's position, the ε's position in ``grid`` (``None`` for a minimal-norm
            attack), the rows' dataset indices, clean inputs, labels, verified (clipped) points and verified success
            (e.g. :class:`~advtrain.evaluation.interpretability.InterpretabilityCollector`). Its cost is not timed.

    Returns:
        The batch record (tensors on the CPU): ``index``, ``correct``, ``x_norm`` (‖x‖ in the threat norm),
        ``zero_grad``, ``unstable`` of shape (B,); ``attacked``, ``claimed`` (the attack's own success flag),
        ``fooled`` (verified), ``norms`` (verified norm, +inf where not fooled) and ``robust`` of shape (B, A, G);
        ``forward_passes``, ``backward_passes``, ``seconds`` of shape (A,) (the passes and time of a call that served
        several attacks are shared out by the rows each one spent them on). ``robust`` is, with ``cascade``, the
        robust accuracy after this attack and all earlier ones (AutoAttack's convention), else under this attack
        alone. A minimal-norm attack's row is the same at every ε, except ``robust``.
    """
    fused = fusion_enabled(fuse, max_fused_batch, x.device)
    batch, num_attacks, num_eps = x.shape[0], len(attacks), len(grid)
    logits, unstable, zero_grad = _diagnostics(model, x, y)
    correct = logits.argmax(1) == y
    eligible = correct[:, None] & (torch.ones(batch, num_eps, dtype=torch.bool, device=x.device) if standing is None
                                   else standing.to(x.device).bool())  # fmt: skip
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
    # What the calls found, per attack and ε, on every row they ran (a superset of what the records keep).
    ran = {name: rec[name].clone() for name in ("attacked", "claimed", "fooled", "norms")}
    sums = {
        name: torch.zeros(num_attacks, dtype=torch.float64) for name in ("forward_passes", "backward_passes", "seconds")
    }

    def call(cells: Sequence[tuple[int, int | None, Tensor]]) -> None:
        """Runs the cells ``(attack, ε column or None for a minimal-norm attack, rows)`` as one attack call."""
        rows = torch.cat([idx for _, _, idx in cells])
        lead = attacks[cells[0][0]].attack
        if cells[0][1] is None:
            eps = None
        elif len(cells) == 1:
            eps = grid[cells[0][1]]
        else:
            eps = torch.cat([as_eps_tensor(grid[g], x[idx]) for _, g, idx in cells])
        if len(cells) > 1 and callable(getattr(lead, "call_fused", None)):
            segments = [(attacks[a].attack, idx.numel()) for a, _, idx in cells]
            result, seconds = _timed(lambda: lead.call_fused(model, x[rows], y[rows], segments=segments, eps=eps),
                                     x.device)  # fmt: skip
            per_row = (result.extra["forward_passes"].cpu(), result.extra["backward_passes"].cpu())
        else:
            result, seconds = _timed(lambda: lead(model, x[rows], y[rows]) if eps is None else
                                     lead(model, x[rows], y[rows], eps=eps), x.device)  # fmt: skip
            per_row = None
        clipped, fooled, norms = verify(model, x[rows], y[rows], result.adv, geometry, eps)
        found = torch.where(fooled, norms, torch.full_like(norms, float("inf")))
        if per_row is None:  # one attack: the whole call is its own
            for name, value in (("forward_passes", result.forward_passes), ("backward_passes", result.backward_passes),
                                ("seconds", seconds)):  # fmt: skip
                sums[name][cells[0][0]] += value
        offset, total = 0, max(result.forward_passes, 1)
        for a, g, idx in cells:
            part = slice(offset, offset + idx.numel())
            columns = slice(None) if g is None else g
            for name, value in (("attacked", True), ("claimed", result.success[part]), ("fooled", fooled[part]),
                                ("norms", found[part])):  # fmt: skip
                ran[name][idx, a, columns] = value[:, None] if g is None and name != "attacked" else value
            if on_verified is not None:
                on_verified(a, g, rec["index"][idx.cpu()], x[idx], y[idx], clipped[part], fooled[part])
            if per_row is not None:  # a shared call: each attack gets the passes its rows spent, and their time share
                forward, backward = (int(count[part].sum()) for count in per_row)
                sums["forward_passes"][a] += forward
                sums["backward_passes"][a] += backward
                sums["seconds"][a] += seconds * forward / total
            offset += idx.numel()

    order = sorted(range(num_attacks), key=lambda a: ROLES.index(attacks[a].role))
    minimal = [a for a in order if attacks[a].minimal]
    budgeted = [a for a in order if not attacks[a].minimal]
    for a in minimal:
        idx = eligible.any(1).nonzero().squeeze(1)
        if idx.numel():
            call([(a, None, idx)])
    for name in ran:
        rec[name][:, minimal] = ran[name][:, minimal]
    best = torch.full((batch,), float("inf"), device=x.device)  # smallest verified adversarial norm so far
    for a in minimal:
        own = rec["norms"][:, a, 0]
        best = torch.minimum(best, own)
        for g, eps in enumerate(grid):
            rec["robust"][:, a, g] = eligible[:, g] & ~within(best if cascade else own, eps)

    # The cells (attack, ε) in the order they run: ε by ε for the cascade, a fusion group's whole grid at once fused.
    groups = _fusion_groups(attacks, budgeted) if fused else [[a] for a in budgeted]
    if fused:
        sequence = [(a, g) for group in groups for g in range(num_eps) for a in group]
    else:
        sequence = [(a, g) for g in range(num_eps) for a in budgeted]
    group_of = {a: i for i, group in enumerate(groups) for a in group}
    position = {a: i for i, a in enumerate(budgeted)}

    def rows_of(a: int, g: int) -> Tensor:
        """The samples a cell attacks: with the cascade, those not broken at ε_g by anything found at the cells
        before it in cascade order (so never fewer than the cascade itself attacks there), else every correct one."""
        if not cascade:
            return eligible[:, g].nonzero().squeeze(1)
        before = [b for b in budgeted if position[b] < position[a]]
        known = torch.cat([best[:, None], ran["norms"][:, budgeted, :g].flatten(1), ran["norms"][:, before, g]], 1)
        return (eligible[:, g] & ~within(known.amin(1), grid[g])).nonzero().squeeze(1)

    while sequence:
        cells, size = [], 0
        while sequence and (not cells or fused and group_of[sequence[0][0]] == group_of[cells[0][0]]):
            a, g = sequence[0]
            idx = rows_of(a, g)
            if cells and size + idx.numel() > max_fused_batch:
                break
            sequence.pop(0)
            if idx.numel():
                cells.append((a, g, idx))
                size += idx.numel()
        if cells:
            call(cells)

    # The records, filled in cascade order from what the calls found: a cell keeps only the samples still standing
    # there (for the unfused cascade, exactly the ones it ran on).
    for g, eps in enumerate(grid):
        for a in budgeted:
            needed = eligible[:, g] & ~within(best, eps) if cascade else eligible[:, g]
            if bool((needed & ~ran["attacked"][:, a, g]).any()):
                raise RuntimeError(
                    f"evaluate: attack {attacks[a].name!r} did not run on every sample still standing at eps={eps:g}: "
                    "a bug of the fused schedule; rerun with fuse=False."
                )
            for name, empty in (("attacked", False), ("claimed", False), ("fooled", False), ("norms", float("inf"))):
                rec[name][:, a, g] = torch.where(needed, ran[name][:, a, g], empty)
            best = torch.minimum(best, rec["norms"][:, a, g])
            broken = within(best, eps) if cascade else rec["fooled"][:, a, g]
            rec["robust"][:, a, g] = eligible[:, g] & ~broken
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


_SUMMED = ("forward_passes", "backward_passes", "seconds")


def attack_batch_halving_on_oom(
    model: nn.Module, x: Tensor, y: Tensor, index: Tensor, attacks: Sequence[EvalAttack], grid: Sequence[float],
    *, geometry: Geometry, cascade: bool = True, fuse: str | bool = "auto", max_fused_batch: int = 1024,
    standing: Tensor | None = None,
    on_verified: Callable[[int, int | None, Tensor, Tensor, Tensor, Tensor, Tensor], None] | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """:func:`attack_batch`, retried in halves (recursively) when the device runs out of memory.

    The halves' records are joined sample by sample (pass counts and times summed), so the report covers the same
    samples; deterministic attacks give the same numbers, seeded stochastic ones draw other random starts for the
    halves. A single sample that does not fit is reported with what to do.
    """
    options = {"geometry": geometry, "cascade": cascade, "fuse": fuse, "max_fused_batch": max_fused_batch,
               "on_verified": on_verified}  # fmt: skip
    try:
        return attack_batch(model, x, y, index, attacks, grid, **options, standing=standing)
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
            model,
            x[part],
            y[part],
            index[part],
            attacks,
            grid,
            **options,
            standing=None if standing is None else standing[part],
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
    fuse: str | bool = "auto",
    max_fused_batch: int = 1024,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    max_samples: int | None = None,
    progress: bool = True,
    seed: int = 0,
    partial_dir: str | Path | None = None,
    resume: bool = False,
    tolerance: float = 0.01,
    meta: Mapping[str, Any] | None = None,
    adaptive: bool | None = None,
    escalation_options: Mapping[str, Mapping[str, Any]] | None = None,
    interpretability: bool = False,
    is_percentiles: Sequence[float] | None = None,
    gallery_samples: int = 4,
) -> RobustnessReport:
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
        norm: threat norm; required with a suite.
        eps: the main budget (``robust_accuracy_all``); required with a suite.
        eps_grid: the budgets of the accuracy-versus-ε curves (``eps`` is always included).
        cascade: budgeted attacks only attack the samples still robust (see :func:`attack_batch`).
        fuse: run each budgeted attack over the whole ε grid in one call, and APGD-CE with APGD-DLR, on
            concatenated batches: ``True``, ``False`` or ``"auto"`` (only on CUDA). Fewer, larger model calls for
            more per-sample passes: a win where the model underfills the device, a loss on a CPU (see
            :func:`attack_batch`). The records equal the unfused ones for deterministic attacks.
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
            of :data:`~advtrain.evaluation.escalation.ADAPTIVE_SUITES`, off otherwise): the samples still robust
            after the suite are attacked again by the attacks :func:`~advtrain.evaluation.escalation.plan_escalation`
            chooses for the checks that fired (more Square queries and restarts, a transfer attack from a smoothed
            surrogate, EOT for random outputs); they join the report as attacks of role ``"escalation"`` and the
            report's ``escalation`` entry says which checks fired, what ran and what each step changed.
        escalation_options: per-label hyperparameters of the escalation attacks, e.g. ``{"square-more": {"steps":
            2000}}``.
        interpretability: also score every attack's verified points by the interpretability score IS(ν) from the
            adversarial saliency map and the CAM/Grad-CAM (seed 002, §6) and keep a gallery of examples
            (:mod:`advtrain.evaluation.interpretability`): ``report.summary["interpretability"]`` and
            ``report.interpretability``; three forward and two or three backward passes per scored point, not
            counted in the attacks' passes or time.
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
    geometry = geometry_for(threat)
    model = model.to(device)
    collector = None
    if interpretability:
        from advtrain.evaluation.interpretability import InterpretabilityCollector

        collector = InterpretabilityCollector(model, [(e.name, e.minimal) for e in entries], grid, float(eps),
                                              percentiles=is_percentiles, gallery_samples=gallery_samples,
                                              norm=threat.value)  # fmt: skip
    start = time.perf_counter()
    fusion = max_fused_batch if fused else None
    run = {"model": model, "data": data, "grid": grid, "geometry": geometry, "cascade": cascade, "fuse": fused,
           "max_fused_batch": max_fused_batch, "batch_size": batch_size, "device": device, "max_samples": max_samples,
           "progress": progress, "fusion": fusion}  # fmt: skip
    data_out = _records(entries, partial_dir, resume, on_verified=collector, **run)
    suite_size, escalation = len(entries), None
    if adaptive:
        first = summarize(data_out, entries, grid, norm=threat.value, eps=eps, cascade=cascade, tolerance=tolerance)
        extra, escalation = plan_escalation(first, threat=threat, eps=eps, seed=seed, options=escalation_options)
        if extra:
            standing = robust_under_all(data_out, grid)
            log.warning("evaluate: gradient-masking checks fired (%s): escalating with %s on the %d samples still "
                        "robust.", ", ".join(escalation["triggered_by"]), ", ".join(e.name for e in extra),
                        int(standing.any(1).sum()))  # fmt: skip
            folder = None if partial_dir is None else Path(partial_dir) / "escalation"
            more = _records(extra, folder, resume, standing=(data_out["index"], standing), **run)
            data_out = _join(data_out, more)
            entries = [*entries, *extra]
    report = summarize(
        data_out, entries, grid, norm=threat.value, eps=eps, cascade=cascade, tolerance=tolerance,
        seconds=time.perf_counter() - start, meta=meta, fusion=fusion,
    )  # fmt: skip
    if escalation is not None:
        report.summary["escalation"] = describe_escalation(escalation, report, first)
    if collector is not None:  # the suite's attacks only: the escalation's are not scored
        report.attach_interpretability(collector.finish(_columns(data_out, suite_size)))
    report.log_warnings()
    return report


def _columns(data: Mapping[str, Tensor], count: int) -> dict[str, Tensor]:
    """The records of the first ``count`` attacks only."""
    out = dict(data)
    for name, kind in PER_SAMPLE.items():
        if kind == "ag":
            out[name] = data[name][:, :count]
    for name in PER_ATTACK:
        out[name] = data[name][:count]
    return out


def _join(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The records of two runs over the same samples, the second's attacks appended after the first's."""
    out = dict(first)
    for name, kind in PER_SAMPLE.items():
        if kind == "ag":
            out[name] = torch.cat([first[name], second[name]], 1)
    for name in PER_ATTACK:
        out[name] = torch.cat([first[name], second[name]])
    return out


def _records(entries, partial_dir, resume, *, model, data, grid, geometry, cascade, fuse, max_fused_batch, batch_size,
             device, max_samples, progress, fusion, standing: tuple[Tensor, Tensor] | None = None,
             on_verified=None) -> dict[str, Tensor]:  # fmt: skip
    """Attacks every batch (or reuses the per-batch results of an interrupted run) and gathers the records;
    ``standing`` = (dataset indices, (N, G) mask) restricts the attacks to the samples still standing per ε."""
    rank, world = dist_info()
    records = RobustnessRecords(len(entries), len(grid)).to(device)
    partial = _prepare_partial(partial_dir, resume, entries, grid, cascade, data, batch_size, max_samples, rank, world,
                               fusion)  # fmt: skip
    total = None
    if isinstance(data, (DataLoader, Dataset)) and hasattr(data.dataset if isinstance(data, DataLoader) else data,
                                                           "__len__"):  # fmt: skip
        n = len(data.dataset) if isinstance(data, DataLoader) else len(data)
        total = n if max_samples is None else min(n, max_samples)
    desc = "evaluate" if standing is None else "escalate"
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress or rank != 0)
    # ``standing`` is indexed by position among the evaluated samples, sorted by dataset index (as the records are).
    positions = None if standing is None else {int(i): p for p, i in enumerate(standing[0])}
    reused = 0
    for number, x, y, index in _batches_of(data, batch_size, max_samples, rank, world):
        path = partial / f"batch-{number:06d}.pt" if partial is not None else None
        if path is not None and resume and path.is_file():
            record = torch.load(path, map_location="cpu", weights_only=True)
            reused += 1
        else:
            mask = None if standing is None else standing[1][[positions[int(i)] for i in index]]
            record = attack_batch_halving_on_oom(model, x.to(device), y.to(device), index, entries, grid,
                                                 geometry=geometry, cascade=cascade, fuse=fuse,
                                                 max_fused_batch=max_fused_batch, standing=mask,
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


def _prepare_partial(partial_dir, resume, entries, grid, cascade, data, batch_size, max_samples, rank, world, fusion):
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
    stamp = _fingerprint(entries, grid, cascade, range(size), batch_size or 128, fusion)
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
