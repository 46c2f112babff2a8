"""FGSM / BIM / PGD and the PGD maximizer: ball and box, closed-form optima, naive reference loop, the maximizer's
model state. The contract every attack shares (determinism, model state, bad inputs, registration, ...) is tested from
the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LinearNet, TinyCNN, never_fooled_binary, random_batch

from advtrain.attacks import BIM, FGM, FGSM, PGD
from advtrain.maximizers import PGD as PGDMaximizer
from advtrain.threat import geometry_for


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pgd_stays_in_ball_and_box(norm, eps, per_sample):
    model = TinyCNN().eval()
    x, y = random_batch(16)
    eps_arg = torch.linspace(0.0, eps, x.shape[0]) if per_sample else None
    result = PGD(norm=norm, eps=eps, steps=7, restarts=2, seed=1)(model, x, y, eps=eps_arg)
    budget = eps_arg if per_sample else torch.full((x.shape[0],), eps)
    assert (geometry_for(norm).measure(result.adv - x) <= budget + 1e-6).all()
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    torch.testing.assert_close(result.norms, geometry_for(norm).measure(result.adv - x))
    # A zero budget is no attack at all.
    if per_sample:
        torch.testing.assert_close(result.adv[0], x[0])


def test_pgd_linf_reaches_closed_form_maximum_of_linear_loss():
    model, x, y = never_fooled_binary()
    eps = 0.1  # x = 0.5 keeps the box inactive
    result = PGD(norm="linf", eps=eps, steps=10, step_size=eps / 4, seed=0)(model, x, y)
    w = model.fc.weight.detach()
    optimum = eps * torch.sign(w[1] - w[0]).view(1, 1, 8, 8).expand_as(x)
    torch.testing.assert_close(result.adv - x, optimum, atol=1e-6, rtol=0)
    assert not result.success.any()
    loss = F.cross_entropy(model(result.adv), y, reduction="none")
    best = F.cross_entropy(model(x + optimum), y, reduction="none")
    torch.testing.assert_close(loss, best)


def test_pgd_l2_reaches_closed_form_maximum_of_linear_loss():
    model, x, y = never_fooled_binary()
    eps = 0.5
    result = PGD(norm="l2", eps=eps, steps=20, step_size=eps, seed=0)(model, x, y)
    w = model.fc.weight.detach()
    direction = (w[1] - w[0]) / (w[1] - w[0]).norm()
    optimum = (eps * direction).view(1, 1, 8, 8).expand_as(x)
    # Near the optimum float32 losses tie, so best-loss tracking may keep an iterate a hair before the last one.
    torch.testing.assert_close(result.adv - x, optimum, atol=5e-4, rtol=0)
    margin = lambda z: z[:, 1] - z[:, 0]  # noqa: E731
    torch.testing.assert_close(margin(model(result.adv)), margin(model(x + optimum)), atol=1e-4, rtol=0)


def _naive_pgd(model, x, y, eps, alpha, steps, start):
    """Deliberately naive reference: one sample at a time, plain Python loop."""
    out = []
    for i in range(x.shape[0]):
        xi, yi, delta = x[i : i + 1], y[i : i + 1], start[i : i + 1].clone()
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(xi + delta), yi)
            (g,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
            delta = (xi + delta).clamp(0, 1) - xi
        out.append(xi + delta)
    return torch.cat(out)


def test_pgd_maximizer_matches_naive_reference_loop():
    model = TinyCNN().eval()
    x, y = random_batch(16)
    eps, alpha, steps = 0.1, 0.02, 5
    torch.manual_seed(123)
    adv = PGDMaximizer(norm="linf", eps=eps, steps=steps, step_size=alpha)(model, x, y).adv
    torch.manual_seed(123)
    start = (2 * torch.rand(x.shape) - 1) * eps
    start = (x + start).clamp(0, 1) - x
    torch.testing.assert_close(adv, _naive_pgd(model, x, y, eps, alpha, steps, start), atol=1e-6, rtol=0)


def test_attack_keeps_best_point_and_matches_naive_when_nothing_is_fooled():
    model, x, y = never_fooled_binary()
    gen_start = torch.Generator().manual_seed(5)
    start = (2 * torch.rand(x.shape, generator=gen_start) - 1) * 0.05
    result = PGD(norm="linf", eps=0.05, steps=3, step_size=0.01, seed=5)(model, x, y)
    naive = _naive_pgd(model, x, y, 0.05, 0.01, 3, (x + start).clamp(0, 1) - x)
    torch.testing.assert_close(result.adv, naive, atol=1e-6, rtol=0)


def test_early_stopping_spends_passes_only_on_samples_still_standing():
    model = LinearNet(64, 2, seed=0)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([50.0, 0.0]))  # everything is predicted as class 0, by a wide margin
    x, _ = random_batch(8)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # half already misclassified, half never fooled
    steps = 10
    result = BIM(eps=0.1, steps=steps)(model, x, y)
    assert result.success.tolist() == [False] * 4 + [True] * 4
    # Step 1 sees all 8 samples; the 4 fooled ones then drop out of the remaining steps.
    assert result.backward_passes == 8 + (steps - 1) * 4
    assert result.backward_passes < 0.6 * steps * 8


def test_pgd_maximizer_restores_the_model_state():
    """The registry checks every attack; the PGD maximizer is no attack."""
    model = TinyCNN()
    model.train()
    model.bn.eval()  # mixed modes must survive
    model.conv.bias.requires_grad_(False)
    x, y = random_batch(16)
    PGDMaximizer(eps=0.1, steps=2)(model, x, y)
    assert model.training and not model.bn.training and not model.conv.bias.requires_grad


def test_maximizer_attack_mode_controls_batchnorm_statistics():
    x, y = random_batch(16)
    for mode, moves in (("eval", False), ("train", True)):
        model = TinyCNN().train()
        before = model.bn.running_mean.clone()
        PGDMaximizer(eps=0.1, steps=2, attack_mode=mode)(model, x, y)
        assert (not torch.equal(before, model.bn.running_mean)) == moves
        assert model.training


def test_fgsm_and_fgm_closed_form():
    model, x, y = never_fooled_binary()
    w = model.fc.weight.detach()
    adv = FGSM(eps=0.1)(model, x, y).adv
    torch.testing.assert_close(adv - x, (0.1 * torch.sign(w[1] - w[0])).view(1, 1, 8, 8).expand_as(x))
    adv = FGM(eps=0.5)(model, x, y).adv
    unit = ((w[1] - w[0]) / (w[1] - w[0]).norm()).view(1, 1, 8, 8)
    torch.testing.assert_close(adv - x, (0.5 * unit).expand_as(x), atol=1e-5, rtol=0)


def test_targeted_pgd_reaches_targets():
    model = LinearNet(64, 10, seed=1)
    x, _ = random_batch(32)
    targets = (model(x).argmax(1) + 1) % 10
    result = PGD(eps=1.0, steps=20, targeted=True, seed=0)(model, x, targets)
    assert (model(result.adv).argmax(1) == targets)[result.success].all()
    assert result.success.float().mean() > 0.9
