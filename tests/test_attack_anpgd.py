"""AN-PGD (Ding et al. 2020, seed 003 Alg. 1) and the soft logit margin: bisection exactness on linear models,
closed-form minimal norms, already-misclassified and never-fooled samples, pass counts, the search range's top. The
contract every attack shares (determinism, model state, bad inputs, ...) is tested from the registry."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LinearNet, TinyCNN, random_batch

from advtrain.attacks.anpgd import ANPGD
from advtrain.engine.losses import LOSSES, get_loss, margin_loss, soft_logit_margin
from advtrain.threat import geometry_for


def _binary(norm: str, distance: float, n: int = 6):
    """2-class linear model and inputs x = 0.5 (plus a little noise) of class 0 whose exact minimal perturbation
    has size ``distance`` in ``norm`` (the box never binds for the distances used here)."""
    model = LinearNet(64, 2, seed=3)
    x = 0.5 + 0.02 * (2 * random_batch(n)[0] - 1)
    w = model.fc.weight.detach()
    diff = w[0] - w[1]
    dual = diff.abs().sum() if norm == "linf" else diff.norm()
    with torch.no_grad():  # margin z_0 − z_1 = distance·‖w_0 − w_1‖_dual at the mean input
        model.fc.bias.copy_(torch.stack([distance * dual - diff @ x.flatten(1).mean(0), torch.tensor(0.0)]))
    margins = model(x).detach() @ torch.tensor([1.0, -1.0])
    return model, x, torch.zeros(n, dtype=torch.long), margins / dual


def _crossing_along(model, x, adv, y, norm):
    """Exact η* at which x + η·u first leaves class y along u = (adv − x)/‖adv − x‖ for a linear model."""
    geometry = geometry_for(norm)
    delta = adv - x
    u = delta / geometry.measure(delta).view(-1, 1, 1, 1)
    w, z = model.fc.weight.detach(), model(x).detach()
    rate = (u.flatten(1) @ w.T) - (u.flatten(1) @ w.T).gather(1, y[:, None])  # d(z_j − z_y)/dη
    gap = z.gather(1, y[:, None]) - z
    eta = torch.where(rate > 0, gap / rate, torch.full_like(gap, math.inf))
    eta.scatter_(1, y[:, None], math.inf)
    return eta.min(1).values


@pytest.mark.parametrize("norm,distance,eps_init", [("linf", 0.2, 0.1), ("linf", 0.2, 0.3), ("l2", 0.6, 0.3)])
def test_linear_binary_bisection_is_exact_along_the_found_direction(norm, distance, eps_init):
    model, x, y, exact = _binary(norm, distance)
    max_eps = 2.0 * distance
    attack = ANPGD(norm=norm, eps=eps_init, max_eps=max_eps, steps=40, bisection_steps=12, seed=0)
    result = attack(model, x, y)
    assert result.success.all()
    geometry = geometry_for(norm)
    torch.testing.assert_close(result.norms, geometry.measure(result.adv - x))
    along = _crossing_along(model, x, result.adv, y, norm)
    # The returned point fools, sits at most one bisection bracket past the crossing, and 0.99× of it does not fool.
    assert (result.norms >= along - 1e-5).all()
    assert (result.norms <= along * 1.01).all()
    assert (model(result.adv).argmax(1) != y).all()
    assert (model(x + 0.99 * (result.adv - x)).argmax(1) == y).all()
    if eps_init < distance:
        # PGD could not fool at ε_init, so it ran towards the optimal direction: the global minimal norm, within
        # 1% (L∞: sign steps reach the optimal corner) or 3% (L2: what is left of the random start's direction).
        slack = 1.01 if norm == "linf" else 1.03
        assert (result.norms <= exact * slack).all() and (result.norms >= exact * (1 - 1e-5)).all()


def test_bisection_starts_from_the_bracket_the_pgd_point_gives():
    model, x, y, exact = _binary("linf", 0.2)
    # PGD at 0.1 does not fool, so the bracket is [0.1, 1.05·0.3] and the single midpoint is 0.2075 (fooling).
    one = ANPGD(eps=0.1, max_eps=0.3, steps=40, bisection_steps=1, seed=0)(model, x, y)
    assert one.success.all()
    torch.testing.assert_close(one.norms, torch.full_like(one.norms, 0.5 * (0.1 + 1.05 * 0.3)))
    # Without bisection the PGD point is all there is: fooling at ε_init = 0.3, not at 0.1.
    none = ANPGD(eps=0.3, max_eps=0.3, steps=40, bisection_steps=0, seed=0)(model, x, y)
    assert none.success.all() and (none.norms <= 0.3 + 1e-6).all() and (none.norms >= exact - 1e-6).all()
    assert not ANPGD(eps=0.1, max_eps=0.3, steps=40, bisection_steps=0, seed=0)(model, x, y).success.any()


def test_linear_multiclass_returned_point_is_the_boundary_along_its_direction():
    model = LinearNet(64, 10, seed=2)
    x = 0.5 + 0.2 * (2 * random_batch(32, seed=1)[0] - 1)
    y = model(x).argmax(1)
    result = ANPGD(norm="linf", eps=0.02, max_eps=0.1, steps=20, bisection_steps=14, seed=0)(model, x, y)
    assert result.success.float().mean() > 0.9
    ok = result.success
    along = _crossing_along(model, x[ok], result.adv[ok], y[ok], "linf")
    assert (result.norms[ok] >= along - 1e-5).all() and (result.norms[ok] <= along * 1.01).all()
    assert (model(result.adv[ok]).argmax(1) != y[ok]).all()
    assert (model(x[ok] + 0.99 * (result.adv[ok] - x[ok])).argmax(1) == y[ok]).all()
    # Never worse than the global minimum by more than PGD's direction error: at least the exact L∞ margin.
    w, z = model.fc.weight.detach(), model(x).detach()
    d = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).abs().sum(-1)
    d.scatter_(1, y[:, None], math.inf)
    assert (result.norms[ok] >= d.min(1).values[ok] - 1e-5).all()


def test_misclassified_samples_are_fooled_at_norm_zero_and_cost_one_forward():
    model, x, y, _ = _binary("linf", 0.2, n=4)
    y = torch.tensor([1, 1, 0, 0])  # the first two are already misclassified
    steps, bisection = 5, 7
    result = ANPGD(eps=0.1, max_eps=0.4, steps=steps, bisection_steps=bisection, seed=0)(model, x, y)
    assert result.success.tolist() == [True] * 4
    assert torch.equal(result.adv[:2], x[:2]) and result.norms[:2].tolist() == [0.0, 0.0]
    assert (result.norms[2:] > 0.15).all()
    # Clean pass for all 4; PGD (steps backward + 1 scoring forward) and bisection for the 2 correct ones only.
    assert result.backward_passes == 2 * steps
    assert result.forward_passes == 4 + 2 * (steps + 1) + 2 * bisection


def test_never_fooled_within_the_search_range_comes_back_unchanged():
    model, x, y, _ = _binary("linf", 0.3)
    result = ANPGD(eps=0.05, max_eps=0.1, steps=10, seed=0)(model, x, y)
    assert not result.success.any()
    assert torch.equal(result.adv, x) and (result.norms == 0).all()


def test_per_sample_eps_and_batch_of_one():
    model, x, y, exact = _binary("linf", 0.2)
    eps = torch.tensor([0.05, 0.1, 0.15, 0.25, 0.3, 0.35])  # below and above the margin
    result = ANPGD(eps=0.1, max_eps=0.4, steps=40, bisection_steps=12, seed=0)(model, x, y, eps=eps)
    assert result.success.all()
    along = _crossing_along(model, x, result.adv, y, "linf")
    assert (result.norms <= along * 1.01).all() and (result.norms >= along - 1e-5).all()
    below = eps < exact
    assert (result.norms[below] <= exact[below] * 1.01).all()
    one = ANPGD(eps=0.1, max_eps=0.4, steps=10, seed=0)(model, x[:1], y[:1])
    assert one.adv.shape == x[:1].shape and one.success.shape == (1,) and bool(one.success[0])


def test_norms_never_exceed_the_top_of_the_search_range():
    """The bisection's bracket ends at 1.05·max_eps: no successful norm lies above it."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, _ = random_batch(8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample is attacked
    result = ANPGD(eps=0.05, max_eps=0.3, steps=5, seed=3)(model, x, y)
    assert result.success.any() and (result.norms[result.success] <= 1.05 * 0.3 + 1e-6).all()


def test_soft_logit_margin():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 3.0]])
    labels = torch.tensor([0, 1])
    expected = torch.tensor([math.log(math.exp(1.0) + 1.0) - 2.0, math.log(1.0 + math.exp(3.0)) - 3.0])
    torch.testing.assert_close(soft_logit_margin(logits, labels), expected)
    # An upper bound of the hard margin: negative SLM implies correct, but SLM ≥ 0 can still be correct (row 2).
    assert (soft_logit_margin(logits, labels) >= margin_loss(logits, labels)).all()
    assert get_loss("slm") is soft_logit_margin and LOSSES["slm"] is soft_logit_margin
    grad_in = logits.clone().requires_grad_(True)
    soft_logit_margin(grad_in, labels).sum().backward()
    assert torch.isfinite(grad_in.grad).all()
