"""Robust evaluation: the worst case, verification of claims, minimal-norm curves, gradient-masking checks, resume,
exact DDP reduction and the report files."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LinearNet, linear_problem
from torch import nn
from torch.utils.data import TensorDataset

from advtrain.attacks import DeepFool, list_attacks
from advtrain.attacks.base import Attack
from advtrain.engine.result import AttackResult
from advtrain.evaluation import (
    EvalAttack,
    SuiteEntry,
    build_suite,
    evaluate_robustness,
    run_checks,
    write_report,
)
from advtrain.evaluation.masking import within
from advtrain.evaluation.suites import suite_entries

GRID = [0.01, 0.02, 0.04, 0.08]

# Small budgets of every role: the suite the masking tests run.
SUITE = [
    SuiteEntry("deepfool", "deepfool", {"steps": 30}, role="minimal"),
    SuiteEntry("pgd", "pgd", {"steps": 10}),
    SuiteEntry("apgd-ce", "apgd", {"loss": "ce", "steps": 20}),
    SuiteEntry("fgsm", "fgsm", role="one_step"),
    SuiteEntry("square", "square", {"steps": 200}, role="black_box"),
]


def _images(n: int = 48):
    """The linear ground-truth problem on 8×8 one-channel images (a 64-input linear classifier, labels = its
    predictions; minimal perturbations in about [0.027, 0.064] (L∞) and [0.17, 0.40] (L2))."""
    model, x, y, _ = linear_problem(n=n, dim=64)
    return model.eval(), x.view(n, 1, 8, 8), y


def _evaluate(model, x, y, suite=SUITE, *, grid=GRID, norm="linf", **kwargs):
    entries = build_suite(suite, norm=norm, eps=grid[-1], seed=0)
    return evaluate_robustness(model, TensorDataset(x, y), entries, norm=norm, eps=grid[-1], eps_grid=grid,
                               batch_size=16, progress=False, **kwargs)  # fmt: skip


class RoundInput(nn.Module):
    """Quantises its input to 8 levels before the classifier: zero gradients everywhere (a masking defence)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 8) / 8)


class SaturatedSoftmax(nn.Module):
    """Returns softmax(100·z) instead of logits: saturated to exact one-hot, so every gradient vanishes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(100.0 * self.model(x), dim=1)


class NoisyInput(nn.Module):
    """Adds fresh Gaussian noise to the input at every call, also in eval mode (a randomised defence)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


@pytest.fixture(scope="module")
def normal_report():
    model, x, y = _images()
    return _evaluate(model, x, y, cascade=False)


def test_worst_case_never_exceeds_any_single_attack(normal_report):
    s = normal_report.as_dict()
    for key, worst in s["robust_accuracy_all_by_eps"].items():
        for name, a in s["attacks"].items():
            assert worst <= a["robust_accuracy_by_eps"][key] + 1e-12, (name, key)
        assert worst <= s["clean_accuracy"]
    # The worst case is per sample, not the minimum of the per-attack accuracies: recompute it from the records.
    data = normal_report.data
    best = data["norms"].flatten(1).amin(1)
    for eps in GRID:
        expected = (data["correct"] & ~within(best, eps)).float().mean()
        assert s["robust_accuracy_all_by_eps"][f"{eps:.4g}"] == pytest.approx(float(expected))
    # And it is monotone in ε, reaching 0 at the largest budget on this easy problem.
    curve = list(s["robust_accuracy_all_by_eps"].values())
    assert curve == sorted(curve, reverse=True) and curve[-1] == 0.0


def test_cascade_worst_case_matches_individual_attacks():
    model, x, y = _images()
    cascaded = _evaluate(model, x, y, cascade=True)
    assert cascaded.fired == []  # a normal model fires no check in the cascade either
    cascade = cascaded.as_dict()
    individual = _evaluate(model, x, y, cascade=False).as_dict()
    assert cascade["robust_accuracy_all_by_eps"] == individual["robust_accuracy_all_by_eps"]
    # The cascade spends fewer passes on the budgeted attacks.
    fwd = lambda s: sum(a["forward_passes"] for a in s["attacks"].values() if a["kind"] == "budgeted")  # noqa: E731
    assert fwd(cascade) < fwd(individual)


def test_normal_model_fires_no_masking_check(normal_report):
    assert normal_report.fired == []
    names = {c["name"] for c in normal_report.as_dict()["masking_checks"]}
    assert names == {"one_step_beats_iterative", "black_box_beats_white_box", "unbounded_below_full_success",
                     "success_not_growing_with_eps", "zero_gradients", "random_outputs"}  # fmt: skip


def test_rounding_model_fires_the_masking_checks(caplog):
    model, x, y = _images()
    report = _evaluate(RoundInput(model), x, y)
    fired = set(report.fired)
    assert {"zero_gradients", "unbounded_below_full_success", "black_box_beats_white_box"} <= fired
    assert "success_not_growing_with_eps" in fired  # the gradient attacks' curves stay flat
    assert "random_outputs" not in fired
    assert "Gradient-masking check zero_gradients fired" in caplog.text


def test_saturated_softmax_fires_zero_gradients():
    model, x, y = _images()
    report = _evaluate(SaturatedSoftmax(model), x, y)
    assert {"zero_gradients", "unbounded_below_full_success"} <= set(report.fired)


def test_random_model_fires_random_outputs():
    model, x, y = _images(16)
    suite = [SuiteEntry("pgd", "pgd", {"steps": 3})]
    report = _evaluate(NoisyInput(model), x, y, suite)
    assert "random_outputs" in report.fired and "zero_gradients" not in report.fired


def test_check_logic_on_synthetic_records():
    """one-step/black-box beating the gradient attacks and rising curves, on hand-made records."""
    n, inf = 10, float("inf")
    norms = torch.full((n, 3, 2), inf)
    norms[:4, 0, :] = 0.05  # the iterative attack breaks samples 0-3 at ε = 0.1
    norms[4:6, 1, 1] = 0.1  # the one-step attack breaks samples 4-5 the iterative one missed
    data = {
        "correct": torch.ones(n, dtype=torch.bool),
        "norms": norms,
        "attacked": torch.ones(n, 3, 2, dtype=torch.bool),
        "fooled": torch.isfinite(norms),
        "zero_grad": torch.zeros(n, dtype=torch.bool),
        "unstable": torch.zeros(n, dtype=torch.bool),
    }
    roles, names = ["iterative", "one_step", "black_box"], ["pgd", "fgsm", "square"]
    checks = {c.name: c for c in run_checks(data, names, roles, [False] * 3, [0.05, 0.1], {"All": [0.6, 0.4]})}
    assert checks["one_step_beats_iterative"].fired and "2 samples" in checks["one_step_beats_iterative"].detail
    assert not checks["black_box_beats_white_box"].fired
    assert not checks["success_not_growing_with_eps"].fired
    rising = run_checks(data, names, roles, [False] * 3, [0.05, 0.1], {"pgd": [0.4, 0.6]})
    assert next(c for c in rising if c.name == "success_not_growing_with_eps").fired
    norms[6, 2, 0] = 0.04  # now the black-box attack breaks a sample nobody else does
    checks = {c.name: c for c in run_checks(data, names, roles, [False] * 3, [0.05, 0.1], {"All": [0.6, 0.4]})}
    assert checks["black_box_beats_white_box"].fired


class LiarAttack(Attack):
    """Claims every sample fooled and returns the clean inputs: a defective attack."""

    def __init__(self, *, norm: str = "linf", eps: float = 0.1) -> None:
        super().__init__()
        self.norm, self.eps = norm, eps

    def run(self, model, inputs, labels, *, eps=None, generator=None) -> AttackResult:
        n = inputs.shape[0]
        return AttackResult(inputs.clone(), torch.ones(n, dtype=torch.bool), torch.zeros(n), forward_passes=n)


def test_false_claims_are_caught_as_attack_defects(caplog):
    model, x, y = _images(20)
    entries = [EvalAttack("liar", LiarAttack(eps=0.08), "iterative", minimal=False)]
    report = evaluate_robustness(model, TensorDataset(x, y), entries, batch_size=8, progress=False).as_dict()
    liar = report["attacks"]["liar"]
    correct = round(report["clean_accuracy"] * 20)
    assert liar["claimed_successes"] == correct and liar["false_claims"] == correct
    assert liar["verified_successes"] == 0
    assert report["robust_accuracy_all"] == report["clean_accuracy"]  # false claims count as failures
    assert report["defects"] and "attack defect" in caplog.text


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_minimal_norm_accuracy_equals_thresholded_norms(norm):
    model, x, y = _images()
    grid = [0.2, 0.3, 0.5] if norm == "l2" else [0.03, 0.045, 0.07]
    suite = [SuiteEntry("deepfool", "deepfool", {"steps": 30}, role="minimal")]
    report = _evaluate(model, x, y, suite, grid=grid, norm=norm).as_dict()
    result = DeepFool(norm=norm, steps=30)(model, x, y)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    for eps in grid:
        expected = (correct & ~(result.success & (result.norms <= eps))).float().mean()
        assert report["attacks"]["deepfool"]["robust_accuracy_by_eps"][f"{eps:.4g}"] == pytest.approx(float(expected))
        assert report["robust_accuracy_all_by_eps"][f"{eps:.4g}"] == pytest.approx(float(expected))
    # Not a trivial curve: it moves across the grid.
    curve = list(report["attacks"]["deepfool"]["robust_accuracy_by_eps"].values())
    assert curve[0] > curve[-1]


class CountingPGD(nn.Module):
    """Counts the batches the model sees with gradients (one per attacked batch) to observe what a resume skips."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += int(torch.is_grad_enabled())
        return self.model(x)


def test_interrupted_evaluation_resumes(tmp_path):
    model, x, y = _images(40)
    suite = [SuiteEntry("pgd", "pgd", {"steps": 3})]
    first = _evaluate(model, x, y, suite, partial_dir=tmp_path)
    files = sorted((tmp_path / "partial").glob("batch-*.pt"))
    assert len(files) == 3  # 40 samples in batches of 16
    files[1].unlink()  # as if interrupted before the second batch was saved
    counting = CountingPGD(model)
    second = _evaluate(counting, x, y, suite, partial_dir=tmp_path, resume=True)
    fresh = CountingPGD(model)
    _evaluate(fresh, x, y, suite)
    assert 0 < counting.calls < fresh.calls  # only the missing batch was attacked again
    strip = lambda s: {k: v for k, v in s.items() if k not in ("wall_time_s", "attacks")}  # noqa: E731
    assert strip(second.as_dict()) == strip(first.as_dict())
    with pytest.raises(ValueError, match="different evaluation"):
        _evaluate(model, x, y, suite, grid=[0.02, 0.08], partial_dir=tmp_path, resume=True)


def test_report_files(tmp_path, normal_report):
    folder = write_report(normal_report, tmp_path / "out", meta={"checkpoint": "x.ckpt"})
    data = json.loads((folder / "report.json").read_text())
    assert data["checkpoint"] == "x.ckpt" and data["eps_grid"] == GRID
    assert set(data["attacks"]) == {"deepfool", "pgd", "apgd-ce", "fgsm", "square"}
    text = (folder / "report.md").read_text()
    assert text.startswith("# advtrain robustness report") and "| **All** |" in text and "Gradient-masking" in text
    for png in ("accuracy_vs_eps.png", "minimal_norms.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"


def test_suites_respect_the_threat_norm():
    linf = {e.name for e in build_suite("full", norm="linf", eps=0.3)}
    l2 = {e.name for e in build_suite("full", norm="l2", eps=1.0)}
    assert {"cw_l2", "ddn", "strattack", "fgm"}.isdisjoint(linf) and "fgsm" in linf and "square" in linf
    assert {"cw_l2", "ddn", "strattack", "fgm", "square", "deepfool", "tr", "anpgd"} <= l2 and "fgsm" not in l2
    assert [e.name for e in build_suite("quick", norm="linf", eps=0.3)] == ["pgd20"]
    assert [e.name for e in build_suite("apgd", norm="l2", eps=0.5)] == ["apgd-ce", "apgd-dlr"]
    l1 = {e.name for e in build_suite("full", norm="l1", eps=12.0)}
    assert {"fab", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"} <= l1
    for norm, built in (("linf", linf), ("l2", l2), ("l1", l1)):  # exactly the entries whose spec has the norm
        assert built == {e.label for e in suite_entries("full") if norm in list_attacks()[e.attack].norms}
    with pytest.raises(ValueError, match="Unknown suite"):
        build_suite("fastest", norm="linf", eps=0.3)


def test_mixed_norms_are_refused():
    from advtrain.attacks import PGD

    model, x, y = _images(8)
    attacks = {"a": PGD(norm="linf", eps=0.1, steps=2), "b": PGD(norm="l2", eps=0.5, steps=2)}
    with pytest.raises(ValueError, match="different norms"):
        evaluate_robustness(model, TensorDataset(x, y), attacks, progress=False)


def test_legacy_mapping_of_attacks_still_works():
    from advtrain.attacks import PGD

    model, x, y = _images(24)
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=10)
    report = evaluate_robustness(model, loader, {"pgd": PGD(norm="linf", eps=0.08, steps=5, seed=0)}, progress=False)
    data = report.as_dict()
    assert data["samples"] == 24 and data["eps_grid"] == [0.08]
    assert data["attacks"]["pgd"]["robust_accuracy"] == data["robust_accuracy_all"]


def test_linear_net_helper_is_the_model_of_these_tests():
    # Guards the premise of the masking tests: the clean model classifies every sample correctly.
    model, x, y = _images()
    assert isinstance(model, LinearNet)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
