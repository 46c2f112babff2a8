"""Norms, projections, steepest-ascent directions and sampling (property tests)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.threat import Norm, as_eps_tensor, geometry_for

NORMS = ["linf", "l2", "l1"]


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


@pytest.mark.parametrize("norm", ["linf", "l2"])  # L1's law is on the sphere: see the L1 tests below
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


# --- the L1 threat model ---------------------------------------------------------------------------------------------


def _greedy_linear_max(g: torch.Tensor, x: torch.Tensor, eps: float) -> float:
    """max ⟨g, z⟩ over {‖z‖₁ ≤ ε, x + z ∈ [0, 1]} (float64): a fractional knapsack, filled greedily by |g_i| up to the
    room the box leaves in sign(g_i)'s direction. An implementation independent of the one under test."""
    room = torch.where(g >= 0, 1 - x, x)
    total, left = 0.0, eps
    for i in g.abs().argsort(descending=True).tolist():
        take = min(float(room[i]), left)
        total += take * float(g[i].abs())
        left -= take
        if left <= 0:
            break
    return total


def _image_like(seed: int, n: int = 6, dims: int = 40):
    """Inputs with many pixels at 0 or 1 (where the box blocks one direction entirely), like digits."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dims, generator=gen)
    x = torch.where(torch.rand(n, dims, generator=gen) < 0.3, torch.zeros_like(x), x)
    x = torch.where(torch.rand(n, dims, generator=gen) < 0.2, torch.ones_like(x), x)
    return x, gen


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 3.0), eps=st.floats(0.0, 6.0))
def test_l1_ball_box_projection_is_the_exact_projection(seed, scale, eps):
    """Optimality of p = Π(δ) over C = ℓ1 ball ∩ box, checked in float64 by the variational inequality
    ⟨δ − p, z − p⟩ ≤ 0 for every z ∈ C, i.e. max_{z ∈ C} ⟨δ − p, z⟩ ≤ ⟨δ − p, p⟩ (the maximum from an independent
    greedy knapsack), plus feasibility. The slack allowed is float32 rounding of p (~1e-7 per coordinate)."""
    geo = geometry_for("l1")
    x, gen = _image_like(seed)
    delta = torch.randn(x.shape, generator=gen) * scale
    p = geo.project_ball_box(x, delta, torch.full((x.shape[0],), eps))
    assert (p.abs().sum(1) <= eps * (1 + 1e-6) + 1e-6).all()
    assert ((x + p) >= 0).all() and ((x + p) <= 1).all()
    for i in range(x.shape[0]):
        g = (delta[i] - p[i]).double()
        lhs = _greedy_linear_max(g, x[i].double(), eps)
        assert lhs <= float(g @ p[i].double()) + 1e-5 * (1 + float(g.abs().sum())), i


def test_l1_ball_box_projection_matches_a_generic_qp_solver():
    """Against scipy's SLSQP on small problems: min ½‖z − δ‖² with z = u − v, u, v ≥ 0, Σ(u + v) ≤ ε, box."""
    optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    geo = geometry_for("l1")
    x, gen = _image_like(3, n=8, dims=6)
    delta = torch.randn(x.shape, generator=gen)
    eps = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 0.0, 0.7, 10.0])
    ours = geo.project_ball_box(x, delta, eps).double().numpy()
    for i in range(x.shape[0]):
        d, xi, e = delta[i].double().numpy(), x[i].double().numpy(), float(eps[i])
        cons = [
            {"type": "ineq", "fun": lambda w, e=e: e - w.sum()},
            {"type": "ineq", "fun": lambda w, xi=xi: w[:6] - w[6:] + xi},
            {"type": "ineq", "fun": lambda w, xi=xi: 1 - xi - (w[:6] - w[6:])},
        ]
        objective = lambda w, d=d: 0.5 * np.sum((w[:6] - w[6:] - d) ** 2)  # noqa: E731
        res = optimize.minimize(objective, np.zeros(12), method="SLSQP", bounds=[(0, None)] * 12, constraints=cons,
                                options={"ftol": 1e-14, "maxiter": 500})  # fmt: skip
        assert res.success
        np.testing.assert_allclose(ours[i], res.x[:6] - res.x[6:], atol=1e-5)


def test_l1_project_then_clip_wastes_the_ball_but_the_exact_projection_does_not():
    """Near the box faces "project onto the ball, then clip" loses the mass the box cuts; the exact projection moves
    it to the coordinates that can still move (the reason Croce & Hein 2021 project onto the intersection)."""
    geo = geometry_for("l1")
    x = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5]])
    delta = torch.tensor([[-2.0, -2.0, -2.0, 1.0, 1.0]])  # the three largest point out of the box
    eps = torch.tensor([1.0])
    naive = (x + geo.project(delta, eps)).clamp(0, 1) - x
    exact = geo.project_ball_box(x, delta, eps)
    assert float(naive.abs().sum()) == 0.0
    torch.testing.assert_close(exact, torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5]]))


def test_l1_project_is_soft_thresholding():
    geo = geometry_for("l1")
    delta = torch.tensor([[3.0, -1.0, 0.5, 0.0], [0.2, -0.1, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    out = geo.project(delta, torch.tensor([2.0, 1.0, 0.0]))
    # Row 0: θ = 1 (3 − θ + 1 − θ = 2); row 1 is inside and stays; ε = 0 leaves nothing.
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.2, -0.1, 0.0, 0.0], [0.0] * 4]))
    # On random points: on the sphere, and the residual is θ·sign on the support (the KKT conditions).
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(50, 30, generator=gen, dtype=torch.float64).float()
    eps = torch.rand(50, generator=gen) * 5
    out = geo.project(delta, eps).double()
    torch.testing.assert_close(out.abs().sum(1), eps.double(), atol=1e-5, rtol=1e-6)
    residual = delta.double() - out
    theta = residual.abs().amax(1, keepdim=True)
    support = out != 0
    torch.testing.assert_close(residual[support].abs(), theta.expand_as(out)[support], atol=1e-5, rtol=0)


def test_l1_ascent_directions():
    geo = geometry_for("l1")
    g = torch.tensor([[0.1, -3.0, 2.0, 0.0], [1.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    u = geo.ascent_direction(g)
    # The vertex of the steepest coordinate; exact ties share it; zero gradient, zero step.
    torch.testing.assert_close(u, torch.tensor([[0.0, -1.0, 0.0, 0.0], [0.5, -0.5, 0.0, 0.0], [0.0] * 4]))
    k = torch.tensor([2, 3, 4])
    sparse = geo.sparse_ascent_direction(g, k)
    expected = torch.tensor([[0.0, -0.5, 0.5, 0.0], [1 / 3, -1 / 3, 1 / 3, 0.0], [0.0] * 4])
    torch.testing.assert_close(sparse, expected)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(20, 50, generator=gen)
    k = torch.randint(1, 51, (20,), generator=gen)
    sparse = geo.sparse_ascent_direction(g, k)
    assert torch.equal((sparse != 0).sum(1), k)  # no ties in continuous gradients
    torch.testing.assert_close(sparse.abs().sum(1), torch.ones(20))
    top_mean = torch.stack([g[i].abs().topk(int(k[i])).values.mean() for i in range(20)])
    torch.testing.assert_close((sparse * g).sum(1), top_mean)
    torch.testing.assert_close(geo.sparse_ascent_direction(g, torch.ones(20)), geo.ascent_direction(g))


def test_l1_samples_are_projected_gaussians_in_the_ball_and_box():
    geo = geometry_for("l1")
    x, _ = _image_like(5, n=500, dims=30)
    eps = torch.full((500,), 2.0)
    s = geo.sample(x, eps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(geo.measure(s), eps)  # ‖z‖₁ ≈ 24 > ε: on the sphere
    assert 1 < float((s != 0).sum(1).float().mean()) < 15  # sparse: soft thresholding keeps the largest |z_i|
    assert abs(float((s > 0).sum() - (s < 0).sum())) < 0.1 * float((s != 0).sum())  # symmetric signs
    inside = geo.sample_ball_box(x, eps, torch.Generator().manual_seed(0))
    assert (geo.measure(inside) <= eps + 1e-5).all() and ((x + inside) >= 0).all() and ((x + inside) <= 1).all()
    # The box cuts blocked directions, yet the exact projection still spends the whole budget.
    torch.testing.assert_close(geo.measure(inside), eps, atol=1e-5, rtol=0)
    # A ball that holds the normal vector leaves it as drawn.
    z = geo.sample(x, torch.full((500,), 1e4), torch.Generator().manual_seed(0))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_l1_is_a_registered_geometry_and_attacks_refuse_norms_they_do_not_declare():
    from advtrain.attacks import PGD, DeepFool
    from advtrain.errors import InvalidConfigError
    from advtrain.threat import L1Geometry

    geo = geometry_for("L1")
    assert isinstance(geo, L1Geometry) and geo.p == 1 and math.isinf(geo.dual_p) and not geo.euclidean
    with pytest.raises(InvalidConfigError, match="PGD does not support norm='l1'; allowed values are 'linf', 'l2'"):
        PGD(norm="l1", eps=1.0)
    with pytest.raises(InvalidConfigError, match="DeepFool does not support norm='l1'"):
        DeepFool(norm="l1")
    assert PGD(norm="L2", eps=1.0).norm == "l2"
