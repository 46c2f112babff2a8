"""Carlini–Wagner L2: closed-form minimal perturbations of linear classifiers, the search on c, targeted mode,
confidence, budgets, early abort in the pass counts, adv-lib. The contract every attack shares (batch independence,
model state, bad inputs, ...) is tested from the registry."""

from __future__ import annotations

import sys
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import Float64Compute, TinyCNN, random_batch

from advtrain.attacks.cw import CarliniWagnerL2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import import_adv_lib  # noqa: E402


def linear_problem(n=100, **kwargs):
    """The shared linear problem (tests/helpers.py) with its exact per-class L2 distances."""
    model, x, y, per_class = helpers.linear_problem(n=n, **kwargs)
    return model, x, y, per_class["l2"]


def test_linear_classifier_exact_minimal_norm():
    model, x, y, dist = linear_problem()
    exact = dist.min(1).values
    result = CarliniWagnerL2(binary_search_steps=9, steps=200)(model, x, y)
    assert result.success.all()
    ratio = result.norms.double() / exact
    assert (ratio >= 1.0 - 1e-4).all()  # nothing beats the exact minimum
    assert ratio.median() <= 1.05 and ratio.quantile(0.95) <= 1.15
    with torch.no_grad():
        assert (model(result.adv).argmax(1) != y).all()


def test_targeted_linear_classifier():
    model, x, y, dist = linear_problem(n=60)
    # The nearest class as target: the targeted optimum is the untargeted one.
    nearest = dist.argmin(1)
    result = CarliniWagnerL2(targeted=True, binary_search_steps=9, steps=200)(model, x, nearest)
    assert result.success.all()
    with torch.no_grad():
        assert torch.equal(model(result.adv).argmax(1), nearest)
    ratio = result.norms.double() / dist.min(1).values
    assert (ratio >= 1.0 - 1e-4).all() and ratio.median() <= 1.05
    # The farthest class: reached, and never closer than its half-space.
    farthest = dist.masked_fill(dist.isinf(), -1.0).argmax(1)
    far = CarliniWagnerL2(targeted=True, binary_search_steps=9, steps=200)(model, x, farthest)
    with torch.no_grad():
        assert torch.equal(model(far.adv).argmax(1)[far.success], farthest[far.success])
    assert far.success.float().mean() >= 0.9
    assert (far.norms.double()[far.success] >= dist.gather(1, farthest[:, None]).squeeze(1)[far.success] - 1e-4).all()


def test_binary_search_raises_c_until_success():
    model, x, y, _ = linear_problem(n=20)
    # With c = 1e-5 one search step cannot fool anything; ×10 per failing step reaches a working c.
    weak = CarliniWagnerL2(binary_search_steps=1, steps=100, initial_const=1e-5)(model, x, y)
    assert not weak.success.any()
    searched = CarliniWagnerL2(binary_search_steps=7, steps=100, initial_const=1e-5)(model, x, y)
    assert searched.success.all()
    assert torch.equal(weak.adv, x)


def test_confidence_margin():
    model, x, y, _ = linear_problem(n=30)
    kappa = 2.0
    result = CarliniWagnerL2(confidence=kappa, binary_search_steps=8, steps=200, initial_const=1e-2)(model, x, y)
    assert result.success.all()
    with torch.no_grad():
        z = model(result.adv)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    assert (other - z.gather(1, y[:, None]).squeeze(1) >= kappa - 1e-4).all()
    # Linear model: the closest point with some z_j ≥ z_y + κ is min_j (z_y − z_j + κ) / ‖w_y − w_j‖₂.
    w, b = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    zc = x.double() @ w.T + b
    need = (zc.gather(1, y[:, None]) - zc + kappa) / (w[y][:, None, :] - w[None, :, :]).norm(dim=2)
    exact = need.masked_fill(F.one_hot(y, 10).bool(), float("inf")).min(1).values
    ratio = result.norms.double() / exact
    assert (ratio >= 1 - 1e-4).all() and ratio.median() <= 1.05


def test_already_fooled_samples_cost_one_pass_under_a_budget():
    model, x, y, _ = linear_problem(n=10)
    wrong = (y + 1) % 10
    result = CarliniWagnerL2(binary_search_steps=5, steps=50, eps=1.0)(model, x, wrong)
    # (The first iterate is (tanh(arctanh((2x − 1)·(1 − 1e-6))) + 1) / 2, within 1e-6 of x.)
    assert result.success.all() and (result.norms < 1e-5).all()
    assert result.forward_passes == result.backward_passes == 10
    # Without a budget the search goes on for smaller norms (there are none) at every step and c.
    unbudgeted = CarliniWagnerL2(binary_search_steps=5, steps=50, abort_early=False)(model, x, wrong)
    assert unbudgeted.success.all() and (unbudgeted.norms < 1e-5).all()
    assert unbudgeted.forward_passes == 10 * 5 * 50


def test_per_sample_budget_stops_early():
    model, x, y, dist = linear_problem(n=20)
    exact = dist.min(1).values.float()
    eps = torch.where(torch.arange(20) % 2 == 0, 1.5 * exact, 0.9 * exact)
    attack = CarliniWagnerL2(binary_search_steps=5, steps=100, abort_early=False, initial_const=1.0)
    result = attack(model, x, y, eps=eps)
    assert torch.equal(result.success, torch.arange(20) % 2 == 0)
    assert (result.norms[result.success] <= eps[result.success] + 1e-6).all()
    assert torch.equal(result.adv[~result.success], x[~result.success])
    # Samples found within their budget stop costing passes.
    full = attack(model, x, y)
    assert full.forward_passes == 20 * 5 * 100
    assert result.forward_passes < full.forward_passes * 0.75
    assert result.forward_passes == result.backward_passes


def _budget_retraces(model, x, y, **kwargs):
    attack = CarliniWagnerL2(**kwargs)
    free = attack(model, x, y)
    assert free.success.all()
    eps = free.norms * 1.0001 + 1e-6
    budgeted = attack(model, x, y, eps=eps)
    assert budgeted.success.all() and (budgeted.norms <= eps).all()
    assert budgeted.forward_passes < free.forward_passes


def test_budget_follows_the_unbudgeted_search():
    """Under a budget the search on c still follows the decision (a success beyond ε lowers c), so the budgeted run
    retraces the unbudgeted one until it meets a point within ε: a budget at the unbudgeted norm always succeeds."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = random_batch(12, seed=3)
    _budget_retraces(model, x, y, binary_search_steps=5, steps=30, step_size=0.05, initial_const=10.0)


@pytest.mark.slow
def test_budget_follows_the_unbudgeted_search_on_reference_model():
    """On a trained network a large c gives large norms, so a search that took successes beyond ε for failures
    (raising c) would miss every budget; TinyCNN is too flat to tell."""
    from _common import reference_model

    from advtrain.models.reference import reference_batch

    x, y = reference_batch(16)
    kwargs = dict(binary_search_steps=4, steps=25, step_size=0.5, initial_const=10.0, abort_early=False)
    _budget_retraces(reference_model(), x, y, **kwargs)


def test_abort_early_shows_in_pass_counts():
    model, x, y, _ = linear_problem(n=20)
    full = CarliniWagnerL2(binary_search_steps=3, steps=200, abort_early=False)(model, x, y)
    assert full.forward_passes == full.backward_passes == 20 * 3 * 200
    aborted = CarliniWagnerL2(binary_search_steps=3, steps=200, abort_early=True)(model, x, y)
    assert aborted.forward_passes == aborted.backward_passes < full.forward_passes
    assert aborted.model_calls < full.model_calls


def test_validation():
    with pytest.raises(ValueError):
        CarliniWagnerL2(steps=0)
    with pytest.raises(ValueError):
        CarliniWagnerL2(step_size=0.0)
    with pytest.raises(ValueError):
        CarliniWagnerL2(confidence=-1.0)


def _adv_lib_check(model, x, y, **budget):
    adv_lib = import_adv_lib()
    if adv_lib is None:
        pytest.skip("adv-lib is not installed")
    # adv-lib aborts only when every sample of the batch stalls; without the abort both run the same algorithm.
    ours = CarliniWagnerL2(abort_early=False, **budget)(model, x, y)
    theirs = adv_lib.carlini_wagner_l2(
        model,
        x,
        y,
        binary_search_steps=budget["binary_search_steps"],
        max_iterations=budget["steps"],
        learning_rate=budget["step_size"],
        initial_const=budget["initial_const"],
        abort_early=False,
    )
    with torch.no_grad():
        their_success = model(theirs).argmax(1) != y
    their_norms = (theirs - x).flatten(1).norm(dim=1)
    assert ours.success.float().mean() >= their_success.float().mean()
    both = ours.success & their_success
    assert both.float().mean() >= 0.9 * their_success.float().mean()
    torch.testing.assert_close(ours.norms[both], their_norms[both], rtol=2e-2, atol=1e-3)
    assert ours.norms[both].median() <= 1.01 * their_norms[both].median()


def test_matches_adv_lib_on_small_cnn():
    torch.manual_seed(0)
    # In float64 (Float64Compute) both implementations see the same float32 gradients at the same point: with a
    # float32 model, their different batch orders' ~1e-7 noise moved one sample's binary search to another constant
    # on torch 2.14 (its norm 2.9% off), a difference of arithmetic, not of algorithm.
    model = Float64Compute(TinyCNN().eval())
    x, _ = random_batch(16, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)
    _adv_lib_check(model, x, y, binary_search_steps=4, steps=25, step_size=0.05, initial_const=1.0)


@pytest.mark.slow
def test_matches_adv_lib_on_reference_model():
    from _common import reference_model

    from advtrain.models.reference import reference_batch

    model = reference_model()
    x, y = reference_batch(40)
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    _adv_lib_check(model, x[keep][:32], y[keep][:32], binary_search_steps=4, steps=25, step_size=0.1, initial_const=1.0)


def test_constant_search_grows_until_a_success_then_bisects():
    """The one search on c of C&W and StrAttack: ×growth while every run fails, then the midpoint of the bracket
    between the largest failing and the smallest succeeding c; an upper end at or above no_upper / 10 counts as
    unknown (C&W's reference code), so a success there keeps c."""
    from advtrain.engine.search import ConstantSearch

    search = ConstantSearch(torch.tensor([1.0, 1.0, 2e9]), growth=10.0, no_upper=1e10)
    search.update(torch.tensor([False, True, True]))
    assert search.const.tolist() == [10.0, 0.5, 2e9]  # grows; bisects [0, 1]; success beyond 1e9 keeps c
    search.update(torch.tensor([True, False]), index=torch.tensor([0, 1]))
    assert search.const[:2].tolist() == [5.5, 0.75]  # [1, 10] and [0.5, 1]
    assert search.smallest_success()[:2].tolist() == [10.0, 1.0]
    plain = ConstantSearch(torch.tensor([0.5]), growth=5.0)
    plain.update(torch.tensor([False]))
    assert plain.const.tolist() == [2.5] and plain.smallest_success().tolist() == [2.5]
