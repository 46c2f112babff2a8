"""Norms, projections, steepest-ascent directions and sampling (property tests)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.threat import Norm, as_eps_tensor, geometry_for

NORMS = ["linf", "l2"]


def _batch(seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 5, 5, generator=gen)
    delta = (torch.rand(4, 3, 5, 5, generator=gen) * 2 - 1) * scale
    eps = torch.rand(4, generator=gen) * scale + 1e-3
    return x, delta, eps


@pytest.mark.parametrize("norm", NORMS)
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 5.0))
def test_projection_inside_ball_and_box_and_idempotent(norm, seed, scale):
    geo = geometry_for(norm)
    x, delta, eps = _batch(seed, scale)
    proj = geo.project_ball_box(x, delta, eps)
    assert (geo.measure(proj) <= eps * (1 + 1e-5) + 1e-6).all()
    assert ((x + proj) >= -1e-6).all() and ((x + proj) <= 1 + 1e-6).all()
    torch.testing.assert_close(geo.project_ball_box(x, proj, eps), proj, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_projection_does_not_move_points_already_inside(norm, seed):
    geo = geometry_for(norm)
    x, delta, eps = _batch(seed, 1.0)
    inside = geo.project(delta, eps) * 0.5  # strictly inside the ball
    torch.testing.assert_close(geo.project(inside, eps), inside)


def test_linf_projection_is_the_exact_clamp():
    geo = geometry_for("linf")
    delta = torch.tensor([[0.5, -0.5, 0.05]])
    torch.testing.assert_close(geo.project(delta, torch.tensor([0.1])), torch.tensor([[0.1, -0.1, 0.05]]))


def test_l2_projection_rescales_onto_the_sphere():
    geo = geometry_for("l2")
    delta = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(geo.project(delta, torch.tensor([1.0])), torch.tensor([[0.6, 0.8]]))


@pytest.mark.parametrize("norm", NORMS)
def test_ascent_direction_is_unit_and_attains_the_dual_norm(norm):
    geo = geometry_for(norm)
    g = torch.randn(6, 10)
    g[0] = 0.0
    u = geo.ascent_direction(g)
    assert torch.all(u[0] == 0)  # a zero gradient gives no step
    torch.testing.assert_close(geo.measure(u[1:]), torch.ones(5))
    torch.testing.assert_close((u * g).sum(1)[1:], geo.dual_measure(g)[1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_samples_lie_in_the_ball_and_fill_it(norm):
    geo = geometry_for(norm)
    like = torch.zeros(2000, 16)
    eps = torch.full((2000,), 0.3)
    s = geo.sample(like, eps, torch.Generator().manual_seed(0))
    sizes = geo.measure(s)
    assert (sizes <= 0.3 + 1e-6).all()
    assert sizes.max() > 0.25 and sizes.min() < (0.3 if norm == "linf" else 0.05)


def test_norm_parse_and_errors():
    assert Norm.parse("Linf") is Norm.LINF and Norm.parse("inf") is Norm.LINF and Norm.parse("L2") is Norm.L2
    with pytest.raises(ValueError, match="allowed values are 'linf', 'l2', 'l1', 'l0'"):
        Norm.parse("l3")
    with pytest.raises(ValueError, match="no gradient-step geometry"):
        geometry_for("l0")
    assert math.isinf(geometry_for("linf").p)


def test_eps_tensor_checks():
    x = torch.zeros(3, 2)
    assert as_eps_tensor(0.1, x).shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        as_eps_tensor(torch.ones(2), x)
    with pytest.raises(ValueError, match="non-negative"):
        as_eps_tensor(-1.0, x)
