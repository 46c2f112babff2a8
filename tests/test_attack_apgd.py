"""APGD (Croce & Hein 2020): checkpoint schedule, step-size halving, closed-form optima, ball and box, targeted
mode, early stopping, errors, and cross-checks against torchattacks and the reference model. The contract every attack
shares (determinism, model state, bad inputs, ...) is tested from the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import Float64Compute, LinearNet, TinyCNN, never_fooled_binary, random_batch
from torch import nn

from advtrain.attacks.apgd import APGD, halving_condition, targeted_dlr_loss
from advtrain.attacks.gradient import PGD
from advtrain.threat import geometry_for

# --- the step-size schedule -----------------------------------------------------------------------------------------


def test_checkpoints_follow_the_papers_formula():
    assert APGD.checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    # Independent evaluation of p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) in exact rational arithmetic.
    from fractions import Fraction

    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    for steps in (10, 37, 100, 250, 1000):
        assert APGD.checkpoints(steps) == sorted({math.ceil(q * steps) for q in p})
    assert APGD.checkpoints(1) == [0, 1]


def test_halving_conditions():
    # window 20, rho 0.75: condition 1 needs fewer than 15 raising steps.
    raises = torch.tensor([14.0, 15.0, 15.0, 15.0, 20.0])
    reduced = torch.tensor([False, False, True, False, False])
    best = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0])
    best_last = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.5])
    # 0: condition 1; 1: condition 2 (not reduced, no progress); 2: no progress but reduced last time;
    # 3: progress; 4: f_max below its last value cannot happen within a run, but counts as no progress.
    expected = [True, True, False, False, True]
    assert halving_condition(raises, 20, 0.75, reduced, best, best_last).tolist() == expected


class _Peak(nn.Module):
    """Two classes on a 1-D input: the CE of class 0 is largest at x = 0.6, inside the ball around 0.5, and the model
    is never fooled. A fixed step size bounces around the peak; APGD's halving homes in on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(1)[:, 0]
        return torch.stack([torch.ones_like(t), -50.0 * (t - 0.6) ** 2], dim=1)


def test_step_size_halving_converges_to_an_interior_maximum():
    x = torch.full((8, 1), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    result = APGD(eps=0.3, steps=100, seed=0)(_Peak(), x, y)
    assert not result.success.any()
    # Eight checkpoints halve 2ε = 0.6 down to 0.6 / 256 ≈ 0.0023 at most.
    torch.testing.assert_close(result.adv, torch.full_like(x, 0.6), atol=4e-3, rtol=0)
    # Without halving, the initial step 2ε only ever visits 0.5 (the start) and the ball's ends 0.2 and 0.8.
    pgd = PGD(eps=0.3, steps=100, step_size=0.6, random_start=False)(_Peak(), x, y)
    torch.testing.assert_close(pgd.adv, x)


def _naive_apgd(model, x, y, eps, steps, start, geometry, rho=0.75, alpha=0.75):
    """Deliberately naive reference of Algorithm 1: one sample at a time, plain Python control flow."""
    checkpoints = set(APGD.checkpoints(steps)[1:])
    out = []
    for i in range(x.shape[0]):
        xi, yi = x[i : i + 1], y[i : i + 1]
        eps_i = torch.tensor([eps])

        def evaluate(delta, xi=xi, yi=yi):
            delta = delta.clone().requires_grad_(True)
            logits = model(xi + delta)
            loss = F.cross_entropy(logits, yi)
            (grad,) = torch.autograd.grad(loss, delta)
            return float(loss.detach()), grad, bool(logits.argmax(1) != yi)

        project = lambda d, xi=xi, eps_i=eps_i: geometry.project_ball_box(xi, d, eps_i)  # noqa: E731
        cur = prev = start[i : i + 1].clone()
        eta = 2 * eps
        f_cur, g_cur, fooled = evaluate(cur)
        best_f, best_x, best_g = f_cur, cur, g_cur
        f_at_checkpoint, reduced, raises, last_checkpoint = f_cur, False, 0, 0
        for k in range(1, steps + 1):
            if fooled:
                break
            z = project(cur + eta * geometry.ascent_direction(g_cur))
            a = 1.0 if k == 1 else alpha
            nxt = project(cur + a * (z - cur) + (1 - a) * (cur - prev))
            prev, cur = cur, nxt
            f_new, g_new, fooled = evaluate(cur)
            raises += f_new > f_cur
            f_cur, g_cur = f_new, g_new
            if f_cur > best_f:
                best_f, best_x, best_g = f_cur, cur, g_cur
            if k in checkpoints and k < steps and not fooled:
                halve = raises < rho * (k - last_checkpoint) or (not reduced and best_f <= f_at_checkpoint)
                if halve:
                    eta, cur, g_cur, f_cur = eta / 2, best_x, best_g, best_f
                reduced, f_at_checkpoint, raises, last_checkpoint = halve, best_f, 0, k
        out.append(xi + (cur if fooled else best_x))
    return torch.cat(out)


class _SmoothNet(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.w1 = nn.Parameter(torch.randn(64, 32, generator=gen) / 4)
        self.w2 = nn.Parameter(torch.randn(32, 10, generator=gen))

    def forward(self, x):
        return torch.tanh(x.flatten(1) @ self.w1) @ self.w2


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.4)])
def test_matches_naive_reference_loop(norm, eps):
    # The model computes in float64 (Float64Compute): the batched attack and the one-sample reference then see the
    # same float32 gradients, so no L∞ sign step can flip on a component within float32 summation noise of 0 (on
    # torch 2.14 one of 768 coordinates did, by 2η, with a float32 model), and the two loops must agree to rounding.
    model = Float64Compute(_SmoothNet())
    x, _ = random_batch(12)
    y = model(x).argmax(1)
    geometry = geometry_for(norm)
    steps = 40
    result = APGD(norm=norm, eps=eps, steps=steps, seed=3)(model, x, y)
    assert 0 < result.success.sum() < x.shape[0]  # both early stopping and the schedule are exercised
    start = geometry.sample(x, torch.full((x.shape[0],), eps), torch.Generator().manual_seed(3))
    start = geometry.project_ball_box(x, start, torch.full((x.shape[0],), eps))
    naive = _naive_apgd(model, x, y, eps, steps, start, geometry)
    torch.testing.assert_close(result.adv, naive, atol=1e-6, rtol=0)


# --- closed-form optima, ball and box ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_linf_reaches_closed_form_maximum_of_linear_loss(loss):
    model, x, y = never_fooled_binary()
    if loss == "dlr":
        # DLR needs 3 classes: a third one parallel to class 0, 100 below it, keeps DLR's denominator z_0 − z_2
        # constant, so DLR = (z_1 − z_0)/100 and its maximum is the CE one.
        two = model
        model = LinearNet(64, 3, seed=3)
        with torch.no_grad():
            model.fc.weight[:2] = two.fc.weight
            model.fc.bias[:2] = two.fc.bias
            model.fc.weight[2] = two.fc.weight[0]
            model.fc.bias[2] = two.fc.bias[0] - 100.0
    eps = 0.1
    result = APGD(norm="linf", eps=eps, steps=30, loss=loss, seed=0)(model, x, y)
    w = model.fc.weight.detach()
    optimum = eps * torch.sign(w[1] - w[0]).view(1, 1, 8, 8).expand_as(x)
    torch.testing.assert_close(result.adv - x, optimum, atol=1e-6, rtol=0)
    assert not result.success.any()


def test_l2_reaches_closed_form_maximum_of_linear_loss():
    model, x, y = never_fooled_binary()
    eps = 0.5
    result = APGD(norm="l2", eps=eps, steps=50, seed=0)(model, x, y)
    w = model.fc.weight.detach()
    optimum = (eps * (w[1] - w[0]) / (w[1] - w[0]).norm()).view(1, 1, 8, 8).expand_as(x)
    torch.testing.assert_close(result.adv - x, optimum, atol=1e-3, rtol=0)
    margin = lambda z: z[:, 1] - z[:, 0]  # noqa: E731
    torch.testing.assert_close(margin(model(result.adv)), margin(model(x + optimum)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_stays_in_ball_and_box_with_per_sample_eps(norm, eps, loss):
    model = TinyCNN().eval()
    x, y = random_batch(16)
    eps_arg = torch.linspace(0.0, eps, x.shape[0])
    result = APGD(norm=norm, eps=eps, steps=12, restarts=2, loss=loss, seed=1)(model, x, y, eps=eps_arg)
    measured = geometry_for(norm).measure(result.adv - x)
    assert (measured <= eps_arg + 1e-6).all()
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    torch.testing.assert_close(result.norms, measured)
    torch.testing.assert_close(result.adv[0], x[0])  # ε = 0 is no attack at all
    fooled = model(result.adv).argmax(1) != y
    assert torch.equal(fooled, result.success)


def test_linear_multiclass_success_matches_closed_form_and_peer():
    """On a linear model the L∞ robust set is known in closed form (the box does not bind around x = 0.5): sample i
    is fooled within ε iff min_j (z_y − z_j) − ε‖w_y − w_j‖₁ < 0."""
    model = LinearNet(64, 10, seed=2)
    x = 0.5 + 0.2 * (2 * random_batch(64, seed=1)[0] - 1)
    y = model(x).argmax(1)
    eps = 0.03
    w = model.fc.weight.detach()
    z = model(x).detach()
    slack = (z.gather(1, y[:, None]) - z) - eps * (w[y][:, None, :] - w[None]).abs().sum(-1)
    slack.scatter_(1, y[:, None], float("inf"))
    exact = slack.min(1).values < 0
    assert 0.2 < exact.float().mean() < 0.8
    for loss in ("ce", "dlr"):
        result = APGD(eps=eps, steps=100, loss=loss, seed=0)(model, x, y)
        assert not (result.success & ~exact).any()  # nothing robust is reported fooled
        assert (result.success == exact).float().mean() >= 0.95, loss
    torchattacks = pytest.importorskip("torchattacks")
    for loss in ("ce", "dlr"):
        peer = torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, loss=loss, seed=0)(x, y)
        peer_fooled = model(peer).argmax(1) != y
        ours = APGD(eps=eps, steps=100, loss=loss, seed=0)(model, x, y).success
        assert ours.float().sum() >= peer_fooled.float().sum() - 1, loss


# --- losses, targeted mode ------------------------------------------------------------------------------------------


def test_targeted_dlr_loss_formula():
    logits = torch.tensor([[5.0, 3.0, 1.0, 0.0, -2.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    expected = -(5.0 - 1.0) / (5.0 - 0.5 * (1.0 + 0.0))
    torch.testing.assert_close(targeted_dlr_loss(logits, y, t), torch.tensor([expected]))


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_targeted_reaches_targets(loss):
    model = LinearNet(64, 10, seed=1)
    x, _ = random_batch(32)
    targets = (model(x).argmax(1) + 1) % 10
    result = APGD(eps=0.3, steps=30, targeted=True, loss=loss, seed=0)(model, x, targets)
    reached = model(result.adv).argmax(1) == targets
    assert torch.equal(reached, result.success)
    assert result.success.float().mean() > 0.9
    assert (geometry_for("linf").measure(result.adv - x) <= 0.3 + 1e-6).all()


def test_dlr_needs_enough_classes():
    model, x, y = never_fooled_binary()
    with pytest.raises(ValueError, match="needs at least 3 classes.*loss='ce'"):
        APGD(eps=0.1, steps=2, loss="dlr")(model, x, y)
    three = LinearNet(64, 3)
    with pytest.raises(ValueError, match="needs at least 4 classes"):
        APGD(eps=0.1, steps=2, loss="dlr", targeted=True)(three, x, y + 1)
    with pytest.raises(ValueError, match="allowed values are 'ce', 'dlr'"):
        APGD(loss="margin")


# --- cost -----------------------------------------------------------------------------------------------------------


def test_early_stopping_spends_passes_only_on_samples_still_standing():
    model = LinearNet(64, 3, seed=0)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([50.0, 0.0, -1.0]))  # everything is class 0, by a wide margin
    x, _ = random_batch(8)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # half already misclassified, half never fooled
    steps = 10
    result = APGD(eps=0.1, steps=steps, loss="dlr", seed=0)(model, x, y)
    assert result.success.tolist() == [False] * 4 + [True] * 4
    # Step 0 sees all 8 samples; the 4 fooled ones then drop out; the final iterate costs a forward only.
    assert result.backward_passes == 8 + (steps - 1) * 4
    assert result.forward_passes == 8 + steps * 4
    # A restart only re-attacks the 4 samples still standing.
    again = APGD(eps=0.1, steps=steps, loss="dlr", restarts=2, seed=0)(model, x, y)
    assert again.backward_passes == result.backward_passes + steps * 4


def test_restarts_keep_the_best_loss_per_sample():
    model, x, y = never_fooled_binary()
    one = APGD(norm="l2", eps=0.5, steps=3, seed=0)(model, x, y)
    three = APGD(norm="l2", eps=0.5, steps=3, restarts=3, seed=0)(model, x, y)
    ce = lambda a: F.cross_entropy(model(a), y, reduction="none")  # noqa: E731
    assert (ce(three.adv) >= ce(one.adv) - 1e-6).all()


# --- the reference model ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_apgd_ce_is_at_least_as_strong_as_pgd_on_the_reference_model(tmp_path):
    """MNIST SmallCNN (standard training): APGD-CE robust accuracy ≤ PGD's at the same number of steps."""
    from pathlib import Path

    from advtrain.models.reference import reference_batch, train_reference_model

    cache = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cache"
    model = train_reference_model(cache_dir=cache)
    x, y = reference_batch(100)
    keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    for eps in (0.1, 0.3):
        apgd = APGD(eps=eps, steps=100, seed=0)(model, x, y)
        pgd = PGD(eps=eps, steps=100, seed=0)(model, x, y)
        assert apgd.success.float().mean() >= pgd.success.float().mean(), eps
