"""DDN and TR-L∞ maximizers: the minimal-norm point, shrunk into the training ball."""

from __future__ import annotations

import torch
from helpers import LinearNet, TinyCNN

from advtrain.maximizers import DDN, TRLinf


def _binary_linear(scale: float):
    model = LinearNet(64, 2, seed=3)
    with torch.no_grad():
        model.fc.weight.mul_(scale)
    w = model.fc.weight.detach()
    x = (0.5 + 0.02 * (w[torch.arange(8) % 2] - w.mean(0)) / w.std()).view(8, 1, 8, 8)
    y = model(x).argmax(1)
    diff = (w[y] - w[1 - y]).flatten(1)
    margin = (model(x).gather(1, y[:, None]) - model(x).gather(1, (1 - y)[:, None])).squeeze(1)
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


def test_model_mode_restored():
    model = TinyCNN().train()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    DDN(eps=0.5, steps=3)(model, x, y)
    TRLinf(eps=0.1, steps=3)(model, x, y)
    assert model.training and all(p.requires_grad for p in model.parameters())
