"""One batch of an evaluation: the plan (which attack runs at which ε on which rows, in which order, fused how), the
run (one attack call: call, verify, charge its passes and time) and the batch record
(:data:`~advtrain.evaluation.records.RECORD`).

Order. Minimal-norm attacks run first, once, on every correctly classified sample. Then, for each ε of the (ascending)
grid, the budgeted attacks run in role order (iterative, one-step, black-box); with the cascade each one only attacks
the samples not yet broken at that ε by any earlier attack (at that ε, at a smaller one, or by a minimal-norm attack
with a norm ≤ ε).

Fusion (``fuse``). A budgeted attack runs over the whole grid in one call, on a batch holding each sample once per ε
that may still need it, with a per-row ε; attacks whose spec says they fuse and that share passes (APGD-CE and
APGD-DLR, :meth:`advtrain.attacks.APGD.call_fused`) join the same call, each row ascending its own loss. A call holds
at most ``max_fused_batch`` rows (more ε go to further calls; a single ε larger than that runs alone). The records are
then filled in cascade order from the fused results, exactly as the unfused cascade fills them: a row of ε is read
only where the sample still stands at ε after every earlier attack (a verified break at a smaller ε counts at every
larger one), and each verification has its row's ε. So for attacks that treat each sample as if alone and draw
nothing at random (FGSM, FGM, BIM, PGD without random start), and for seeded APGD without the cascade, the records
equal the unfused ones; seeded random starts are drawn for other batches than unfused, as in the halves of an
out-of-memory retry.

The trade-off: a fused call cannot skip the samples that earlier ε or earlier attacks of the same call break (the rows
are chosen before the call, from what earlier calls found), so it spends more per-sample passes than the cascade, in
fewer and larger model calls. That wins where the model underfills the device (a GPU at small batches, where a call of
4·B rows costs about one of B rows) and loses where every row costs its share (a CPU), hence ``"auto"``: fuse on CUDA
only. Reported pass counts are those spent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.engine.checks import check_logits, check_model_inputs
from advtrain.engine.losses import margin_loss
from advtrain.engine.modes import attack_context
from advtrain.engine.result import AttackResult
from advtrain.evaluation.masking import within
from advtrain.evaluation.records import RECORD, empty_fields, join_samples
from advtrain.evaluation.suites import ROLES, EvalAttack
from advtrain.threat.geometry import Geometry
from advtrain.threat.norms import as_eps_tensor

log = logging.getLogger(__name__)

#: ``on_verified(attack, column, index, x, y, adv, fooled)``, see :func:`attack_batch`.
OnVerified = Callable[[int, "int | None", Tensor, Tensor, Tensor, Tensor, Tensor], None]

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


def _timed(device: torch.device, call: Callable[..., AttackResult], *args, **kwargs) -> tuple[AttackResult, float]:
    """``call(*args, **kwargs)`` and its wall time (the device synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = call(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


# The plan ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One planned piece of an attack call: the attack at position ``attack``, at the grid's ε number ``column``
    (``None``: a minimal-norm attack, once for every ε), on the batch rows ``rows``."""

    attack: int
    column: int | None
    rows: Tensor


def _cascade_order(attacks: Sequence[EvalAttack]) -> tuple[list[int], list[int]]:
    """The attacks' positions in cascade (role) order: the minimal-norm ones, then the budgeted ones."""
    order = sorted(range(len(attacks)), key=lambda a: ROLES.index(attacks[a].role))
    return [a for a in order if attacks[a].minimal], [a for a in order if not attacks[a].minimal]


def _fusion_groups(attacks: Sequence[EvalAttack], order: Sequence[int]) -> list[list[int]]:
    """The budgeted attacks (in cascade ``order``) cut into runs that can share one call: consecutive attacks that
    the run's first, a :attr:`fusable <advtrain.attacks.AttackSpec.fusable>` attack, takes into its ``call_fused``
    (it :meth:`shares passes <advtrain.attacks.APGD.shares_passes_with>` with them: APGD-CE and APGD-DLR of one
    configuration); every other attack is a run of its own."""
    groups: list[list[int]] = []
    for a in order:
        lead = attacks[groups[-1][0]] if groups else None
        if lead is not None and lead.fusable and lead.attack.shares_passes_with(attacks[a].attack):
            groups[-1].append(a)
        else:
            groups.append([a])
    return groups


def _rows(
    norms: Tensor, eligible: Tensor, best: Tensor, budgeted: list[int], a: int, g: int, grid: Sequence[float],
    cascade: bool,
) -> Tensor:  # fmt: skip
    """The samples the cell (attack ``a``, ε number ``g``) attacks: with the cascade, those not broken at ε_g by
    anything found so far at the cells before it in cascade order (``norms``: the verified norms found, ``best``: the
    minimal-norm attacks'; so never fewer than the cascade itself attacks there), else every eligible one."""
    if not cascade:
        return eligible[:, g].nonzero().squeeze(1)
    before = budgeted[: budgeted.index(a)]
    known = torch.cat([best[:, None], norms[:, budgeted, :g].flatten(1), norms[:, before, g]], 1)
    return (eligible[:, g] & ~within(known.amin(1), grid[g])).nonzero().squeeze(1)


def _planned_calls(
    attacks: Sequence[EvalAttack], budgeted: list[int], grid: Sequence[float], norms: Tensor, eligible: Tensor,
    best: Tensor, *, cascade: bool, fused: bool, max_fused_batch: int,
) -> Iterator[list[Cell]]:  # fmt: skip
    """The budgeted attacks' calls, each a list of cells, in the order they run: ε by ε for the cascade, a fusion
    group's whole grid at once when fused (at most ``max_fused_batch`` rows a call). Each cell's rows are chosen
    when its call is planned, from what the calls before it found (``norms`` is updated in place between them)."""
    groups = _fusion_groups(attacks, budgeted) if fused else [[a] for a in budgeted]
    if fused:
        sequence = [(a, g) for group in groups for g in range(len(grid)) for a in group]
    else:
        sequence = [(a, g) for g in range(len(grid)) for a in budgeted]
    group_of = {a: i for i, group in enumerate(groups) for a in group}
    sequence.reverse()  # popped from the end
    while sequence:
        cells, size = [], 0
        while sequence and (not cells or fused and group_of[sequence[-1][0]] == group_of[cells[0].attack]):
            a, g = sequence[-1]
            rows = _rows(norms, eligible, best, budgeted, a, g, grid, cascade)
            if cells and size + rows.numel() > max_fused_batch:
                break
            sequence.pop()
            if rows.numel():
                cells.append(Cell(a, g, rows))
                size += rows.numel()
        if cells:
            yield cells


# The run -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """What every call on one batch shares: the model, the batch (``index``: dataset positions, on the CPU), the
    attacks, the grid, the threat norm's geometry and the verification hook."""

    model: nn.Module
    x: Tensor
    y: Tensor
    index: Tensor
    attacks: Sequence[EvalAttack]
    grid: Sequence[float]
    geometry: Geometry
    on_verified: OnVerified | None


def _call(
    batch: _Batch, cells: Sequence[Cell], rows: Tensor, eps: float | Tensor | None
) -> tuple[AttackResult, float, tuple[Tensor, Tensor] | None]:
    """Calls the cells' attack on their rows: one ``call_fused`` for several cells of a fusable attack, else a plain
    call. Returns the result, its time and, for a fused call, each row's forward and backward passes."""
    lead, x, y = batch.attacks[cells[0].attack], batch.x[rows], batch.y[rows]
    if len(cells) > 1 and lead.fusable:
        segments = [(batch.attacks[c.attack].attack, c.rows.numel()) for c in cells]
        result, seconds = _timed(x.device, lead.attack.call_fused, batch.model, x, y, segments=segments, eps=eps)
        return result, seconds, (result.extra["forward_passes"].cpu(), result.extra["backward_passes"].cpu())
    kwargs = {} if eps is None else {"eps": eps}
    result, seconds = _timed(x.device, lead.attack, batch.model, x, y, **kwargs)
    return result, seconds, None


def _run(batch: _Batch, cells: Sequence[Cell], found: dict[str, Tensor]) -> None:
    """Runs the cells as one attack call on their rows, concatenated: calls the attack (each row at its cell's ε),
    verifies every point, keeps what each cell found in ``found`` and charges the call's passes and time."""
    rows = torch.cat([c.rows for c in cells])
    if cells[0].column is None:
        eps = None
    elif len(cells) == 1:
        eps = batch.grid[cells[0].column]
    else:
        eps = torch.cat([as_eps_tensor(batch.grid[c.column], batch.x[c.rows]) for c in cells])
    result, seconds, per_row = _call(batch, cells, rows, eps)
    clipped, fooled, norms = verify(batch.model, batch.x[rows], batch.y[rows], result.adv, batch.geometry, eps)
    norms = torch.where(fooled, norms, torch.full_like(norms, float("inf")))
    offset = 0
    for cell in cells:
        part = slice(offset, offset + cell.rows.numel())
        at = (cell.rows, cell.attack, slice(None) if cell.column is None else cell.column)
        for name, value in (("claimed", result.success[part]), ("fooled", fooled[part]), ("norms", norms[part])):
            found[name][at] = value[:, None] if cell.column is None else value
        found["attacked"][at] = True
        if batch.on_verified is not None:
            batch.on_verified(cell.attack, cell.column, batch.index[cell.rows.cpu()], batch.x[cell.rows],
                              batch.y[cell.rows], clipped[part], fooled[part])  # fmt: skip
        offset += cell.rows.numel()
    _charge(found, cells, result, seconds, per_row)


def _charge(
    found: dict[str, Tensor], cells: Sequence[Cell], result: AttackResult, seconds: float,
    per_row: tuple[Tensor, Tensor] | None,
) -> None:  # fmt: skip
    """Adds a call's passes and time to its attacks: all of them to the attack of a call of its own; in a fused call
    each attack gets the passes its rows spent and a share of the time in proportion to its forward passes."""
    if per_row is None:
        a = cells[0].attack
        found["forward_passes"][a] += result.forward_passes
        found["backward_passes"][a] += result.backward_passes
        found["seconds"][a] += seconds
        return
    offset, total = 0, max(result.forward_passes, 1)
    for cell in cells:
        part = slice(offset, offset + cell.rows.numel())
        forward, backward = (int(count[part].sum()) for count in per_row)
        found["forward_passes"][cell.attack] += forward
        found["backward_passes"][cell.attack] += backward
        found["seconds"][cell.attack] += seconds * forward / total
        offset += cell.rows.numel()


# The records ---------------------------------------------------------------------------------------------------------


def _minimal_records(
    rec: dict[str, Tensor], found: dict[str, Tensor], minimal: list[int], eligible: Tensor, grid: Sequence[float],
    cascade: bool,
) -> Tensor:  # fmt: skip
    """Fills the minimal-norm attacks' records (a call's row is the same at every ε, except ``robust``) and returns
    the smallest verified adversarial norm they found per sample."""
    for f in RECORD:
        if f.source == "call":
            rec[f.name][:, minimal] = found[f.name][:, minimal]
    best = torch.full_like(eligible[:, 0], float("inf"), dtype=rec["norms"].dtype)
    for a in minimal:
        own = rec["norms"][:, a, 0]
        best = torch.minimum(best, own)
        for g, eps in enumerate(grid):
            rec["robust"][:, a, g] = eligible[:, g] & ~within(best if cascade else own, eps)
    return best


def _budgeted_records(
    rec: dict[str, Tensor], found: dict[str, Tensor], attacks: Sequence[EvalAttack], budgeted: list[int],
    eligible: Tensor, best: Tensor, grid: Sequence[float], cascade: bool,
) -> None:  # fmt: skip
    """Fills the budgeted attacks' records in cascade order from what the calls found: a cell keeps only the samples
    still standing there (for the unfused cascade, exactly the ones it ran on).

    Raises:
        RuntimeError: if an attack did not run on a sample still standing (a bug of the fused schedule).
    """
    calls = [f for f in RECORD if f.source == "call"]
    for g, eps in enumerate(grid):
        for a in budgeted:
            needed = eligible[:, g] & ~within(best, eps) if cascade else eligible[:, g]
            if bool((needed & ~found["attacked"][:, a, g]).any()):
                raise RuntimeError(
                    f"evaluate: attack {attacks[a].name!r} did not run on every sample still standing at eps={eps:g}: "
                    "a bug of the fused schedule; rerun with fuse=False."
                )
            for f in calls:
                rec[f.name][:, a, g] = torch.where(needed, found[f.name][:, a, g], f.fill)
            best = torch.minimum(best, rec["norms"][:, a, g])
            broken = within(best, eps) if cascade else rec["fooled"][:, a, g]
            rec["robust"][:, a, g] = eligible[:, g] & ~broken


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
    on_verified: OnVerified | None = None,
) -> dict[str, Tensor]:
    """Attacks one batch with every attack and verifies every claim, in the order and with the fusion the module
    docstring describes (:mod:`advtrain.evaluation.batch`).

    Args:
        model, x, y, index: the classifier and the batch (``index``: the samples' positions in the dataset).
        attacks: the prepared attacks (:func:`~advtrain.evaluation.prepare_attacks`).
        grid: the budgets, ascending.
        geometry: the threat norm's geometry.
        cascade: budgeted attacks only attack the samples not yet broken.
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
        The batch record, tensors on the CPU with the fields of :data:`~advtrain.evaluation.records.RECORD`: (B,)
        per sample, (B, A, G) per sample, attack and ε (a minimal-norm attack's row is the same at every ε, except
        ``robust``), (A,) per attack (the passes and time of a call that served several attacks are shared out by the
        rows each one spent them on).
    """
    fused = fusion_enabled(fuse, max_fused_batch, x.device)
    size = (x.shape[0], len(attacks), len(grid))
    logits, unstable, zero_grad = _diagnostics(model, x, y)
    correct = logits.argmax(1) == y
    eligible = correct[:, None] & (torch.ones(size[0], size[2], dtype=torch.bool, device=x.device) if standing is None
                                   else standing.to(x.device).bool())  # fmt: skip
    clean = {"index": index.detach().cpu().long(), "correct": correct, "x_norm": geometry.measure(x.float()),
             "zero_grad": zero_grad, "unstable": unstable}  # fmt: skip
    rec = {**clean, **empty_fields(*size, x.device, "call", "cascade")}
    # What the calls found, on every row they ran (a superset of what the record keeps), and what they cost.
    found = {**empty_fields(*size, x.device, "call"), **empty_fields(*size, "cpu", "cost")}
    batch = _Batch(model, x, y, rec["index"], attacks, grid, geometry, on_verified)
    minimal, budgeted = _cascade_order(attacks)
    for a in minimal:
        rows = eligible.any(1).nonzero().squeeze(1)
        if rows.numel():
            _run(batch, [Cell(a, None, rows)], found)
    best = _minimal_records(rec, found, minimal, eligible, grid, cascade)
    for cells in _planned_calls(attacks, budgeted, grid, found["norms"], eligible, best, cascade=cascade, fused=fused,
                                max_fused_batch=max_fused_batch):  # fmt: skip
        _run(batch, cells, found)
    _budgeted_records(rec, found, attacks, budgeted, eligible, best, grid, cascade)
    return {f.name: (found if f.source == "cost" else rec)[f.name].detach().cpu() for f in RECORD}


def attack_batch_halving_on_oom(
    model: nn.Module, x: Tensor, y: Tensor, index: Tensor, attacks: Sequence[EvalAttack], grid: Sequence[float],
    *, geometry: Geometry, cascade: bool = True, fuse: str | bool = "auto", max_fused_batch: int = 1024,
    standing: Tensor | None = None,
    on_verified: OnVerified | None = None,
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
    first, second = (
        attack_batch_halving_on_oom(model, x[part], y[part], index[part], attacks, grid, **options,
                                    standing=None if standing is None else standing[part])
        for part in (slice(0, half), slice(half, None))
    )  # fmt: skip
    return join_samples(first, second)


__all__ = ["FUSE_CHOICES", "Cell", "attack_batch", "attack_batch_halving_on_oom", "fusion_enabled", "verify"]
