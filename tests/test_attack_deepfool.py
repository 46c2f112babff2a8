"""DeepFool: closed-form minimal perturbations of linear classifiers, candidates, budgets, passes, adv-lib. The
contract every attack shares (the box, batch independence in both norms, bad inputs, ...) is tested from the
registry."""

from __future__ import annotations

import sys
from pathlib import Path

import helpers
import pytest
import torch
from helpers import TinyCNN, random_batch

from advtrain.attacks.deepfool import DeepFool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import import_adv_lib  # noqa: E402


def linear_problem(n=200, **kwargs):
    """The shared linear problem (tests/helpers.py) with its exact per-class L2 and L∞ distances."""
    model, x, y, per_class = helpers.linear_problem(n=n, **kwargs)
    return model, x, y, per_class["l2"], per_class["linf"]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_linear_classifier_exact_minimal_norm(norm):
    model, x, y, exact_l2, exact_linf = linear_problem()
    exact = (exact_l2 if norm == "l2" else exact_linf).min(1).values
    assert (x.min() > 0.3) and (x.max() < 0.7) and exact.max() < 0.35  # the box never binds
    result = DeepFool(norm=norm)(model, x, y)
    assert result.success.all()
    ratio = result.norms.double() / exact
    # A linear model is solved in one step: the exact boundary point pushed by the overshoot (and 1e-4).
    assert (ratio >= 1.0 - 1e-5).all()
    assert ratio.median() <= 1.05 and ratio.quantile(0.95) <= 1.15
    expected = (1.02 * (exact + 1e-4)) / exact
    torch.testing.assert_close(ratio, expected, atol=1e-3, rtol=0)
    # Early stopping: one forward + 9 backward passes per sample for the step, one forward to see it succeed.
    assert result.forward_passes == 2 * x.shape[0]
    assert result.backward_passes == 9 * x.shape[0]
    with torch.no_grad():
        assert (model(result.adv).argmax(1) != y).all()


def test_top_k_candidates():
    model, x, y, exact_l2, _ = linear_problem(n=100)
    with torch.no_grad():
        top = model(x).scatter(1, y[:, None], float("-inf")).argmax(1)
    # With one candidate, DeepFool heads for the boundary of the runner-up class only.
    one = DeepFool(norm="l2", candidates=1)(model, x, y)
    to_top = exact_l2.gather(1, top[:, None]).squeeze(1)
    assert one.success.all()
    torch.testing.assert_close(one.norms.double(), 1.02 * (to_top + 1e-4), rtol=1e-3, atol=1e-5)
    assert one.backward_passes == x.shape[0]
    full = DeepFool(norm="l2")(model, x, y)
    assert (full.norms <= one.norms + 1e-6).all()
    assert (full.norms < one.norms - 1e-4).any()  # the runner-up is not always the closest boundary
    # k >= C - 1 means all classes.
    torch.testing.assert_close(DeepFool(norm="l2", candidates=50)(model, x, y).adv, full.adv)


def test_per_sample_budget_and_unchanged_failures():
    model, x, y, exact_l2, _ = linear_problem(n=40)
    exact = exact_l2.min(1).values.float()
    free = DeepFool(norm="l2")(model, x, y)
    eps = torch.where(torch.arange(40) % 2 == 0, free.norms + 1e-4, free.norms - 1e-3)
    result = DeepFool(norm="l2")(model, x, y, eps=eps)
    assert torch.equal(result.success, torch.arange(40) % 2 == 0)
    assert torch.equal(result.adv[~result.success], x[~result.success])
    torch.testing.assert_close(result.adv[result.success], free.adv[result.success])
    # The configured budget applies when the call gives none; a scalar budget below every norm fools nothing.
    assert not DeepFool(norm="l2", eps=0.5 * float(exact.min()))(model, x, y).success.any()
    assert DeepFool(norm="l2", eps=1.0)(model, x, y).success.all()


def test_misclassified_samples_cost_no_backward_pass():
    model, x, y, _, _ = linear_problem(n=10)
    wrong = (y + 1) % 10
    labels = torch.where(torch.arange(10) < 4, wrong, y)
    result = DeepFool(norm="l2")(model, x, labels)
    assert result.success.all()
    assert torch.equal(result.adv[:4], x[:4]) and (result.norms[:4] == 0).all()
    # Backward passes for the 6 standing samples only: their graph is rebuilt (4 fooled rows × 9 candidates cost
    # more than 6 forwards), so 10 + 6 forwards before the step and 6 after it.
    assert result.backward_passes == 6 * 9 and result.forward_passes == 10 + 6 + 6
    # One fooled row among 20 is cheaper to carry through the 9 backward passes than a new forward of 19 rows:
    # the passes are counted for the whole graph.
    model, x, y, _, _ = linear_problem(n=20)
    labels = torch.where(torch.arange(20) < 1, (y + 1) % 10, y)
    result = DeepFool(norm="l2")(model, x, labels)
    assert result.success.all() and result.norms[0] == 0
    assert result.backward_passes == 20 * 9 and result.forward_passes == 20 + 19


def test_validation():
    with pytest.raises(ValueError):
        DeepFool(norm="l1")
    with pytest.raises(ValueError):
        DeepFool(steps=0)
    with pytest.raises(ValueError):
        DeepFool(candidates=0)


def _adv_lib_check(model, x, y, steps):
    adv_lib = import_adv_lib()
    if adv_lib is None:
        pytest.skip("adv-lib is not installed")
    for norm, p in (("l2", 2.0), ("linf", float("inf"))):
        ours = DeepFool(norm=norm, steps=steps)(model, x, y)
        for q in model.parameters():
            q.requires_grad_(False)
        theirs = adv_lib.df(model, x, y, steps=steps, norm=p)
        with torch.no_grad():
            their_success = model(theirs).argmax(1) != y
        assert torch.equal(ours.success, their_success)
        their_norms = (theirs - x).flatten(1).norm(p=p, dim=1)
        # Same algorithm (overshoot per step, 1e-4, clipping): the same points up to float rounding.
        torch.testing.assert_close(ours.norms[ours.success], their_norms[ours.success], rtol=1e-3, atol=1e-5)


def test_matches_adv_lib_on_small_cnn():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, _ = random_batch(16, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)
    _adv_lib_check(model, x, y, steps=50)


@pytest.mark.slow
def test_matches_adv_lib_on_reference_model():
    from _common import reference_model

    from advtrain.models.reference import reference_batch

    model = reference_model()
    x, y = reference_batch(64)
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    _adv_lib_check(model, x[keep], y[keep], steps=50)
