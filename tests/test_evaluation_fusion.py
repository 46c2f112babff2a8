"""Fused evaluation (issue 6): a budgeted attack over the whole ε grid in one call, APGD-CE and APGD-DLR in one call,
checked against its eager twins (the unfused cascade, and a naive cascade of direct attack calls written here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Float64Compute, TinyCNN, random_batch
from torch import nn
from torch.utils.data import TensorDataset

from advtrain.attacks import APGD, BIM, FGM, FGSM, PGD, DeepFool
from advtrain.attacks.base import Attack
from advtrain.callbacks import RobustEvaluation
from advtrain.engine.result import AttackResult
from advtrain.evaluation import EvalAttack, SuiteEntry, build_suite, evaluate_robustness, verify
from advtrain.evaluation.masking import within
from advtrain.evaluation.robust import fusion_enabled
from advtrain.threat import geometry_for

GRID = {"linf": [0.01, 0.02, 0.04, 0.08], "l2": [0.1, 0.2, 0.4, 0.8]}
RECORD = ("attacked", "claimed", "fooled", "robust", "norms")


class Counting(nn.Module):
    """Counts the model calls and the per-sample backward passes through the logits, and keeps the largest batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls, self.backwards, self.largest = model, 0, 0, 0

    def forward(self, x):
        out = self.model(x)
        self.calls += 1
        self.largest = max(self.largest, x.shape[0])
        if out.requires_grad:
            n = x.shape[0]
            out.register_hook(lambda grad: setattr(self, "backwards", self.backwards + n))
        return out


def _problem(n: int = 40):
    """TinyCNN at its own predictions, with every fifth label wrong (those samples are not attacked)."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, _ = random_batch(n)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % 10
    return model, x, y


def _deterministic(norm: str, apgd: bool) -> list[EvalAttack]:
    """Attacks that draw nothing at random (APGD draws seeded random starts: exact only without the cascade), weak
    enough that each of DeepFool, BIM and PGD breaks samples the ones before it missed."""
    eps = GRID[norm][-1]
    pgd = PGD(norm=norm, eps=eps, steps=4, random_start=False, loss="margin")
    entries = [
        EvalAttack("deepfool", DeepFool(norm=norm, steps=1), "minimal", minimal=True),
        EvalAttack("bim", BIM(norm=norm, eps=eps, steps=2), "iterative", minimal=False),
        EvalAttack("pgd-fixed", pgd, "iterative", minimal=False),
        EvalAttack("one-step", FGSM(eps=eps) if norm == "linf" else FGM(eps=eps), "one_step", minimal=False),
    ]
    if apgd:
        entries[3:3] = [
            EvalAttack("apgd-ce", APGD(norm=norm, eps=eps, steps=8, loss="ce", seed=1), "iterative", minimal=False),
            EvalAttack("apgd-dlr", APGD(norm=norm, eps=eps, steps=8, loss="dlr", seed=1), "iterative", minimal=False),
        ]
    return entries


def _run(model, x, y, entries, grid, **kwargs):
    """One batch (seeded random starts depend on the batch, and :func:`_naive_cascade` attacks all at once)."""
    return evaluate_robustness(model, TensorDataset(x, y), entries, eps_grid=grid, batch_size=x.shape[0],
                               progress=False, **kwargs)  # fmt: skip


def _naive_cascade(model, x, y, entries, grid, geometry, cascade):
    """The evaluation written out plainly: minimal-norm attacks once, then ε by ε every budgeted attack called
    directly on the samples still standing (all correct ones without the cascade), each claim verified."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    shape = (x.shape[0], len(entries), len(grid))
    fooled, norms = torch.zeros(shape, dtype=torch.bool), torch.full(shape, float("inf"))
    attacked = torch.zeros(shape, dtype=torch.bool)
    passes = [[0, 0] for _ in entries]  # forward, backward
    best = torch.full((x.shape[0],), float("inf"))

    def attack(a, idx, eps, columns):
        if idx.numel() == 0:
            return
        result = entries[a].attack(model, x[idx], y[idx]) if eps is None else entries[a].attack(model, x[idx], y[idx],
                                                                                                  eps=eps)  # fmt: skip
        _, hit, size = verify(model, x[idx], y[idx], result.adv, geometry, eps)
        attacked[idx, a, columns], fooled[idx, a, columns] = True, hit[:, None] if eps is None else hit
        found = torch.where(hit, size, torch.full_like(size, float("inf")))
        norms[idx, a, columns] = found[:, None] if eps is None else found
        passes[a][0] += result.forward_passes
        passes[a][1] += result.backward_passes
        best[idx] = torch.minimum(best[idx], found)

    for a, entry in enumerate(entries):
        if entry.minimal:
            attack(a, correct.nonzero().squeeze(1), None, slice(None))
    for g, eps in enumerate(grid):
        for a, entry in enumerate(entries):
            if not entry.minimal:
                standing = correct & ~within(best, eps) if cascade else correct
                attack(a, standing.nonzero().squeeze(1), eps, g)
    return {"attacked": attacked, "fooled": fooled, "norms": norms, "passes": passes, "best": best,
            "correct": correct}  # fmt: skip


# A sample's float rounding depends a little on the batch it shares (which rows the model and the per-row reductions
# see together), and an attack's iterations can grow that to about 1e-5; real faults (another loss, other random
# starts, rows of another ε) move points by a sizeable fraction of ε.
ATOL = 1e-4


def _assert_same_records(ours, theirs, names=RECORD):
    for name in names:
        if name == "norms":
            torch.testing.assert_close(ours[name], theirs[name].to(ours[name].dtype), atol=ATOL, rtol=0)
        else:
            assert torch.equal(ours[name], theirs[name]), name


# --- the fused cascade against its eager twins ---------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("cascade", [True, False])
def test_fused_records_equal_the_naive_cascade_and_the_unfused_one(norm, cascade):
    """Deterministic attacks (and seeded APGD without the cascade, whose rows are then the same) give the records
    of the unfused cascade and of direct attack calls, sample by sample, with the ε grid fused into one call per
    attack (or per APGD pair), also when max_fused_batch cuts the grid into several calls."""
    model, x, y = _problem()
    grid = GRID[norm]
    entries = _deterministic(norm, apgd=not cascade)
    naive = _naive_cascade(model, x, y, entries, grid, geometry_for(norm), cascade)
    unfused = _run(model, x, y, entries, grid, cascade=cascade, fuse=False)
    assert unfused.as_dict()["fused"] is False
    calls, largest = {}, {}
    for limit in (1024, 48):
        counting = Counting(model)
        fused = _run(counting, x, y, entries, grid, cascade=cascade, fuse=True, max_fused_batch=limit)
        calls[limit], largest[limit] = counting.calls, counting.largest
        assert fused.as_dict()["fused"] is True and fused.as_dict()["max_fused_batch"] == limit
        _assert_same_records(fused.data, unfused.data)
        _assert_same_records(fused.data, naive, ("attacked", "fooled", "norms"))
        assert fused.as_dict()["robust_accuracy_all_by_eps"] == unfused.as_dict()["robust_accuracy_all_by_eps"]
        spent = [[a["forward_passes"], a["backward_passes"]] for a in fused.as_dict()["attacks"].values()]
        if cascade:  # the fused rows are a superset of the cascade's: never fewer passes
            assert all(s[1] >= p[1] for s, p in zip(spent, naive["passes"], strict=True))
        else:  # the same rows: exactly the same passes, per attack (the APGD pair's shared out by rows)
            assert spent == naive["passes"]
    counting = Counting(model)
    _run(counting, x, y, entries, grid, cascade=cascade, fuse=False)
    # Fusion is real (fewer, larger model calls) and keeps to max_fused_batch (the diagnostics see the 40 samples).
    assert calls[1024] <= calls[48] <= counting.calls and calls[1024] < counting.calls
    assert largest[48] <= 48 < largest[1024] and counting.largest == x.shape[0]
    # Not a trivial problem: the records move across the grid and the attacks break samples.
    curve = list(unfused.as_dict()["robust_accuracy_all_by_eps"].values())
    assert curve[0] > curve[-1] and unfused.data["fooled"][:, 1].any() and unfused.data["fooled"][:, 2].any()


class Erratic(Attack):
    """A valid but non-monotone budgeted L∞ attack: at ε ≥ 0.05 an FGSM step of only 0.01, below that a step of ε
    away from the boundary (which fails). So what it finds at a large ε lies inside the smaller balls where it
    failed, and the attacks after it still have to run there."""

    def __init__(self, *, eps: float = 0.08) -> None:
        super().__init__()
        self.norm, self.eps = "linf", eps

    def run(self, model, inputs, labels, *, eps=None, generator=None) -> AttackResult:
        eps = self.budget(eps, inputs)
        with torch.enable_grad():
            x = inputs.detach().requires_grad_(True)
            grad = torch.autograd.grad(F.cross_entropy(model(x), labels, reduction="sum"), x)[0]
        size = torch.where(eps >= 0.05, torch.full_like(eps, 0.01), -eps)
        adv = (inputs + size.view(-1, 1, 1, 1) * grad.sign()).clamp(0, 1)
        with torch.no_grad():
            success = model(adv).argmax(1) != labels
        n = inputs.shape[0]
        return AttackResult(adv, success, (adv - inputs).flatten(1).abs().amax(1), forward_passes=2 * n,
                            backward_passes=n)  # fmt: skip


def test_fused_rows_cover_the_cascade_after_an_attack_that_finds_small_points_at_a_large_eps():
    """The rows of a fused call are chosen from what earlier calls found at the same or smaller ε only: a find of an
    earlier attack at a larger ε says nothing about the cascade at a smaller one (there BIM must still run)."""
    model, x, y = _problem()
    grid = GRID["linf"]
    short = BIM(eps=0.08, steps=2, step_size=0.002)  # reaches 0.004 at most: breaks few at ε = 0.01
    entries = [EvalAttack("erratic", Erratic(), "iterative", minimal=False),
               EvalAttack("bim", short, "iterative", minimal=False)]  # fmt: skip
    naive = _naive_cascade(model, x, y, entries, grid, geometry_for("linf"), cascade=True)
    # The premise: erratic fails below 0.05 and finds points of norm 0.01 at 0.08, where BIM had to run at 0.01.
    assert not naive["fooled"][:, 0, :3].any()
    small = naive["fooled"][:, 0, 3] & (naive["norms"][:, 0, 3] <= grid[0] * 1.001)
    assert small.any() and naive["attacked"][small, 1, 0].all()
    fused = _run(model, x, y, entries, grid, fuse=True)
    _assert_same_records(fused.data, naive, ("attacked", "fooled", "norms"))


def test_a_break_at_a_smaller_eps_counts_at_every_larger_one():
    """FGSM on a model whose wrong class is a thin band: ε = 0.02 lands in the band, ε = 0.08 jumps over it. The
    sample is broken at 0.08 too (worst case), which the fused run must fill in although its own row at 0.08 fails."""
    model, x, y = _band_problem()
    grid = [0.02, 0.08]
    entries = [EvalAttack("fgsm", FGSM(eps=0.08), "one_step", minimal=False)]
    direct = [verify(model, x, y, FGSM(eps=e)(model, x, y).adv, geometry_for("linf"), e)[1] for e in grid]
    assert direct[0].all() and not direct[1].any()  # the premise: FGSM alone fails at the larger ε
    for cascade in (True, False):
        reports = [_run(model, x, y, entries, grid, cascade=cascade, fuse=fuse) for fuse in (False, True)]
        for report in reports:
            assert report.as_dict()["robust_accuracy_all_by_eps"] == {"0.02": 0.0, "0.08": 0.0}
            # The cascade's robust accuracy is cumulative and skips the broken samples; without it, FGSM alone fails.
            assert report.data["robust"][:, 0, 1].all() != cascade
            assert report.data["attacked"][:, 0, 1].all() != cascade
        _assert_same_records(reports[1].data, reports[0].data)


class _Band(nn.Module):
    """Two classes on s = mean(x) − 0.5: class 1 exactly in the band 0.01 < s < 0.05 (logit 1e4·(0.02² − (s −
    0.03)²)), class 0 elsewhere. An L∞ step of ε along the CE gradient moves s by ε."""

    def forward(self, x):
        s = x.flatten(1).mean(1) - 0.5
        return torch.stack([torch.zeros_like(s), 1e4 * (0.02**2 - (s - 0.03) ** 2)], 1)


def _band_problem(n: int = 6):
    x = 0.5 + 0.002 * (2 * random_batch(n)[0] - 1)
    return _Band(), x, torch.zeros(n, dtype=torch.long)


def test_stochastic_attacks_fused_keep_the_worst_case_sound():
    """PGD with random starts, seeded APGD in the cascade and Square draw other random numbers fused than unfused, so
    only the worst-case properties hold: never weaker than any single attack, monotone in ε sample by sample, a
    cascade record only where the sample still stood, and the reported passes are the passes spent."""
    model, x, y = _problem(60)
    grid = GRID["linf"]
    suite = [
        SuiteEntry("pgd", "pgd", {"steps": 5}),
        SuiteEntry("apgd-ce", "apgd", {"loss": "ce", "steps": 8}),
        SuiteEntry("apgd-dlr", "apgd", {"loss": "dlr", "steps": 8}),
        SuiteEntry("square", "square", {"steps": 40}, role="black_box"),
    ]
    entries = build_suite(suite, norm="linf", eps=grid[-1], seed=0)
    counting = Counting(model)
    report = _run(counting, x, y, entries, grid, fuse=True)
    s, data = report.as_dict(), report.data
    for key, worst in s["robust_accuracy_all_by_eps"].items():
        assert all(worst <= a["robust_accuracy_by_eps"][key] + 1e-12 for a in s["attacks"].values())
    robust_all = data["robust"].all(1)  # (B, G): robust after every attack at each ε
    assert (robust_all[:, 1:] <= robust_all[:, :-1]).all()  # monotone per sample
    best = data["norms"].flatten(1).amin(1)
    for g, eps in enumerate(grid):
        assert torch.equal(robust_all[:, g], data["correct"] & ~within(best, eps))
        for a in range(len(entries)):  # attacked exactly where still standing after the attacks before it
            before = torch.cat([torch.full_like(best[:, None], float("inf")), data["norms"][:, :a, : g + 1].flatten(1),
                                data["norms"][:, a:, :g].flatten(1)], 1).amin(1)  # fmt: skip
            assert torch.equal(data["attacked"][:, a, g], data["correct"] & ~within(before, eps))
    assert 0 < s["robust_accuracy_all"] < s["robust_accuracy_all_by_eps"]["0.01"]
    # Honest counts: every backward pass the model saw is an attack's, except the two of the masking diagnostics.
    reported = sum(a["backward_passes"] for a in s["attacks"].values())
    assert counting.backwards == reported + 2 * x.shape[0]


# --- APGD-CE and APGD-DLR in one call ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.3)])
@pytest.mark.parametrize("targeted", [False, True])
def test_fused_apgd_call_equals_the_separate_calls(norm, eps, targeted):
    eps = 4 * eps if targeted else eps  # so that some targets are reached
    """Each segment of a fused call ends exactly as its own call: own loss, own seeded random starts, restarts, per
    row ε; its per-row passes add up to its own call's passes, in fewer model calls. An empty segment is allowed."""
    model, x, _ = _problem(12)
    # In float64 (Float64Compute) the fused batch's other summation order stays below float32 rounding: in float32 a
    # ReLU at its kink turned it into differences of 1.6e-4 (L2, torch 2.14), so the exact comparison needs float64.
    model = Float64Compute(model)
    with torch.no_grad():
        y = model(x).argmax(1)
    y = (y + 1) % 10 if targeted else y
    kwargs = {"norm": norm, "steps": 10, "restarts": 2, "seed": 1, "targeted": targeted}
    ce, dlr, ce_other_eps = APGD(loss="ce", **kwargs), APGD(loss="dlr", **kwargs), APGD(loss="ce", eps=0.5, **kwargs)
    budget = torch.linspace(eps / 2, eps, 12)
    parts = [(ce, slice(0, 12)), (dlr, slice(0, 7)), (ce_other_eps, slice(3, 3)), (ce, slice(5, 12))]
    separate = [attack(model, x[rows], y[rows], eps=budget[rows]) for attack, rows in parts if rows.stop > rows.start]
    assert sum(int(r.success.sum()) for r in separate) > 0
    cat = lambda t: torch.cat([t[rows] for _, rows in parts])  # noqa: E731
    counting = Counting(model)
    fused = ce.call_fused(counting, cat(x), cat(y), eps=cat(budget),
                          segments=[(attack, rows.stop - rows.start) for attack, rows in parts])  # fmt: skip
    torch.testing.assert_close(fused.adv, torch.cat([r.adv for r in separate]), atol=1e-6, rtol=0)
    assert torch.equal(fused.success, torch.cat([r.success for r in separate]))
    offset = 0
    for result in separate:
        rows = slice(offset, offset + result.adv.shape[0])
        assert int(fused.extra["forward_passes"][rows].sum()) == result.forward_passes
        assert int(fused.extra["backward_passes"][rows].sum()) == result.backward_passes
        offset = rows.stop
    assert fused.forward_passes == sum(r.forward_passes for r in separate)
    assert counting.backwards == fused.backward_passes == sum(r.backward_passes for r in separate)
    assert fused.model_calls < sum(r.model_calls for r in separate)


def test_fused_apgd_call_refuses_what_it_cannot_share():
    model, x, y = _problem(6)
    ce = APGD(eps=0.03, steps=4, loss="ce")
    with pytest.raises(ValueError, match="cannot share passes"):
        ce.call_fused(model, x, y, segments=[(ce, 3), (APGD(eps=0.03, steps=5, loss="dlr"), 3)])
    with pytest.raises(ValueError, match="add up to the batch of 6"):
        ce.call_fused(model, x, y, segments=[(ce, 4)])
    assert ce.shares_passes_with(APGD(eps=0.1, steps=4, loss="dlr")) and not ce.shares_passes_with(PGD(eps=0.03))


# --- when to fuse --------------------------------------------------------------------------------------------------


def test_auto_fuses_on_cuda_only():
    assert fusion_enabled("auto", 1024, "cuda") and not fusion_enabled("auto", 1024, "cpu")
    assert fusion_enabled(True, 8, "cpu") and not fusion_enabled(False, 8, "cuda:0")
    model, x, y = _problem(20)
    entries = _deterministic("linf", apgd=True)
    calls = {}
    for fuse in ("auto", False, True):
        counting = Counting(model)
        report = _run(counting, x, y, entries, GRID["linf"], fuse=fuse)
        calls[fuse] = counting.calls
        assert report.as_dict()["fused"] is (fuse is True)
    assert calls["auto"] == calls[False] > calls[True]


@pytest.mark.parametrize("fuse", ["yes", "Auto", 1, None])
def test_fuse_must_be_auto_true_or_false(fuse):
    model, x, y = _problem(4)
    with pytest.raises(ValueError, match=r"fuse must be one of \('auto', True, False\)"):
        _run(model, x, y, _deterministic("linf", apgd=False), GRID["linf"], fuse=fuse)
    with pytest.raises(ValueError, match="fuse must be one of"):
        RobustEvaluation(fuse=fuse)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "64"])
def test_max_fused_batch_must_be_a_positive_int(limit):
    model, x, y = _problem(4)
    with pytest.raises(ValueError, match="max_fused_batch must be an int >= 1"):
        _run(model, x, y, _deterministic("linf", apgd=False), GRID["linf"], fuse=True, max_fused_batch=limit)
    with pytest.raises(ValueError, match="max_fused_batch must be an int >= 1"):
        RobustEvaluation(max_fused_batch=limit)


def test_a_fused_run_does_not_resume_an_unfused_one(tmp_path):
    model, x, y = _problem(20)
    entries = _deterministic("linf", apgd=False)[1:2]
    _run(model, x, y, entries, GRID["linf"], fuse=False, partial_dir=tmp_path)
    with pytest.raises(ValueError, match="different evaluation"):
        _run(model, x, y, entries, GRID["linf"], fuse=True, partial_dir=tmp_path, resume=True)
    _run(model, x, y, entries, GRID["linf"], fuse="auto", partial_dir=tmp_path, resume=True)  # auto on CPU: unfused
