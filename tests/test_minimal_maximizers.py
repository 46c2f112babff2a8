"""DDN and TR-L∞ maximizers: the minimal-norm point, shrunk into the training ball."""

from __future__ import annotations

import torch
from helpers import LinearNet, TinyCNN, never_fooled_binary

from advtrain.attacks import TrustRegion
from advtrain.maximizers import DDN, TRLinf


def _binary_linear(scale: float):
    model = LinearNet(64, 2, seed=3)
    with torch.no_grad():
        model.fc.weight.mul_(scale)
    w = model.fc.weight.detach()
    x = (0.5 + 0.02 * (w[torch.arange(8) % 2] - w.mean(0)) / w.std()).view(8, 1, 8, 8)
    y = model(x).argmax(1)
    diff = (w[y] - w[1 - y]).flatten(1)
    margin = (model(x).gather(1, y[:, None]) - model(x).gather(1, (1 - y)[:, None])).squeeze(1).detach()
    return model, x, y, margin, diff


def test_ddn_output_is_the_minimal_norm_when_it_is_inside_the_ball():
    model, x, y, margin, diff = _binary_linear(1.0)
    exact = margin / diff.norm(dim=1)
    eps = float(exact.max()) * 2
    pert = DDN(eps=eps, steps=100, levels=None)(model, x, y)
    norms = (pert.adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-5).all()
    torch.testing.assert_close(norms, exact, rtol=0.02, atol=1e-4)


def test_ddn_output_is_shrunk_into_a_small_ball():
    model, x, y, margin, diff = _binary_linear(1.0)
    eps = float((margin / diff.norm(dim=1)).min()) / 2
    pert = DDN(eps=eps, steps=30, levels=None)(model, x, y)
    norms = (pert.adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, eps), rtol=1e-4, atol=1e-6)  # shrunk, never grown


def test_trlinf_stays_in_the_ball_and_moves_toward_the_boundary():
    model, x, y, margin, diff = _binary_linear(1.0)
    exact = margin / diff.abs().sum(dim=1)
    eps = float(exact.max()) * 2
    pert = TRLinf(eps=eps, steps=200, radius=1e-2)(model, x, y)
    sizes = (pert.adv - x).flatten(1).abs().amax(dim=1)
    assert (sizes <= eps + 1e-6).all()
    fooled = model(pert.adv).argmax(1) != y
    assert fooled.all()
    assert (sizes <= exact * 1.1 + 1e-4).all()


def test_trlinf_trains_an_unfooled_sample_on_its_last_iterate_clipped_to_the_ball():
    """The budget reaches past ε without fooling (the model keeps a margin of 3 over the 0.1-ball): the training point
    is the last iterate clipped to the ball, x + ε·sign(w₁ − w₀), not the clean input a minimal-norm attack returns."""
    model, x, y = never_fooled_binary()
    direction = torch.sign(model.fc.weight[1] - model.fc.weight[0]).detach().view(1, 1, 8, 8)
    pert = TRLinf(eps=0.02, steps=3, radius=0.01, radius_bounds=(1e-4, 0.05))(model, x, y)
    torch.testing.assert_close(pert.adv, (x + 0.02 * direction).expand_as(x), rtol=0, atol=1e-6)
    assert (model(pert.adv).argmax(1) == y).all()


def test_trlinf_keeps_a_last_iterate_inside_the_ball():
    """Two first-order L∞ steps of about 1.02·r each along sign(∇margin), r = 0.01 growing ×1.2 on a linear model
    (actual = predicted change): δ = c·sign(w₁ − w₀) with c ≈ 0.023 < ε, kept as is."""
    model, x, y = never_fooled_binary()
    direction = torch.sign(model.fc.weight[1] - model.fc.weight[0]).detach().view(1, 1, 8, 8)
    pert = TRLinf(eps=0.1, steps=2, radius=0.01, radius_bounds=(1e-4, 0.05))(model, x, y)
    expected = 1.02 * (0.01 + 1e-4) + 1.02 * (0.012 + 1e-4)
    torch.testing.assert_close(pert.adv, (x + expected * direction).expand_as(x), rtol=0, atol=1e-5)


def test_trust_region_reports_its_last_iterate_and_the_first_fooling_point():
    """extra["last_iterate"]: where the budget left an unfooled sample (adv stays the clean input there), and the
    returned adversarial point of a fooled one."""
    model, x, y = never_fooled_binary()
    unfooled = TrustRegion(norm="linf", steps=2, radius=0.01)(model, x, y)
    assert not unfooled.success.any() and torch.equal(unfooled.adv, x)
    assert (unfooled.extra["last_iterate"] - x).abs().amax() > 0.02
    lin, xs, ys, _, _ = _binary_linear(1.0)
    fooled = TrustRegion(norm="linf", steps=200, radius=1e-2)(lin, xs, ys)
    assert fooled.success.all()
    torch.testing.assert_close(fooled.extra["last_iterate"], fooled.adv)


def test_ddn_trains_a_never_fooled_sample_clean():
    """The official DDN training: a sample DDN never fools comes back unchanged, whatever its last
    iterate. The bias keeps class 0 ahead everywhere in the box."""
    model = LinearNet(64, 2, seed=3)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([1000.0, 0.0]))
    x = torch.full((4, 1, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    pert = DDN(eps=1.0, steps=20, levels=None)(model, x, y)
    assert torch.equal(pert.adv, x)


def test_model_mode_restored():
    model = TinyCNN().train()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    DDN(eps=0.5, steps=3)(model, x, y)
    TRLinf(eps=0.1, steps=3)(model, x, y)
    assert model.training and all(p.requires_grad for p in model.parameters())
