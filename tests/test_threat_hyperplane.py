"""FAB's projection onto a hyperplane inside the [0, 1] box: hand-computed cases, scipy's optimum, the official code,
and properties (feasible, in the box, no better feasible point along the corner direction, idempotent)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advtrain.threat.hyperplane import hyperplane_projection
from advtrain.threat.norms import flat_norm

NORMS = ("linf", "l2", "l1")
P = {"linf": math.inf, "l2": 2.0, "l1": 1.0}


def _problem(n=60, d=6, seed=0, scale=1.0):
    """Random points in the box, normals and values (float64); ``scale`` makes more of the hyperplanes miss the box."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    f = scale * torch.randn(n, generator=gen, dtype=torch.float64)
    return t, w, f


def _corner(t, w, f):
    """The box step of largest progress towards f + ⟨w, δ⟩ = 0 and that progress, Σ|w_i|·room_i (independent code)."""
    down = (f[:, None] * w) > 0  # moving coordinate i down lowers |f|
    up = (f[:, None] * w) < 0
    step = torch.where(down, -t, torch.where(up, 1.0 - t, torch.zeros_like(t)))
    return step, (w * step).sum(1).abs()


# (t, w, f) -> expected δ per norm, worked out by hand. t = (0.5, 0.5), w = (1, 2): room 0.5 on both coordinates
# (both move down). f = 1: nothing binds. f = 1.4: L2's clipped projection saturates the heavier coordinate
# (u = min(λ|w|, 0.5): λ + 1 = 1.4), L1 fills it first then 0.4 of the other, L∞ moves both by 1.4/3. f = 1.6:
# the most the box allows is 1.5, so every norm goes to the corner.
HAND = [
    (1.0, {"l2": (-0.2, -0.4), "linf": (-1 / 3, -1 / 3), "l1": (0.0, -0.5)}),
    (1.4, {"l2": (-0.4, -0.5), "linf": (-1.4 / 3, -1.4 / 3), "l1": (-0.4, -0.5)}),
    (1.6, {"l2": (-0.5, -0.5), "linf": (-0.5, -0.5), "l1": (-0.5, -0.5)}),
    (-1.0, {"l2": (0.2, 0.4), "linf": (1 / 3, 1 / 3), "l1": (0.0, 0.5)}),
    (0.0, {"l2": (0.0, 0.0), "linf": (0.0, 0.0), "l1": (0.0, 0.0)}),
]


@pytest.mark.parametrize("norm", NORMS)
def test_hand_computed_cases(norm):
    proj = hyperplane_projection(norm)
    t = torch.full((len(HAND), 2), 0.5, dtype=torch.float64)
    w = torch.tensor([[1.0, 2.0]] * len(HAND), dtype=torch.float64)
    f = torch.tensor([value for value, _ in HAND], dtype=torch.float64)
    expected = torch.tensor([cases[norm] for _, cases in HAND], dtype=torch.float64)
    torch.testing.assert_close(proj.project(t, w, f), expected, rtol=0, atol=1e-12)


def _scipy_optimum(optimize, norm, t, w, f):
    """scipy's solution of min ‖δ‖_p s.t. f + ⟨w, δ⟩ = 0, 0 ≤ t + δ ≤ 1: SLSQP for L2; for L1 and L∞ a linear
    program in (δ, s) minimising Σ s (L1) or s (L∞) with −s ≤ δ ≤ s. Returns (scipy's result, the optimal norm)."""
    d = t.shape[0]
    bounds = list(zip(-t, 1 - t, strict=True))
    if norm == "l2":
        constraint = {"type": "eq", "fun": lambda x: f + w @ x, "jac": lambda x: w}
        res = optimize.minimize(lambda x: x @ x, np.zeros(d), jac=lambda x: 2 * x, method="SLSQP", bounds=bounds,
                                constraints=[constraint], options={"ftol": 1e-15, "maxiter": 1000})  # fmt: skip
        return res, math.sqrt(res.fun)
    k = d if norm == "l1" else 1
    spread = np.eye(d) if norm == "l1" else np.ones((d, 1))
    res = optimize.linprog(
        np.concatenate([np.zeros(d), np.ones(k)]),
        A_ub=np.block([[np.eye(d), -spread], [-np.eye(d), -spread]]),
        b_ub=np.zeros(2 * d),
        A_eq=np.concatenate([w, np.zeros(k)])[None],
        b_eq=[-f],
        bounds=bounds + [(0, None)] * k,
    )
    return res, res.fun


@pytest.mark.parametrize("norm", NORMS)
def test_matches_scipy_optimum(norm):
    """On 6-dimensional problems the step's norm is the optimum of the same program solved by scipy (linprog for L1
    and L∞, SLSQP for L2), the constraint holds and the point stays in the box; where the hyperplane misses the box the
    step is the corner of largest progress."""
    optimize = pytest.importorskip("scipy.optimize")
    t, w, f = _problem(scale=1.5)
    proj = hyperplane_projection(norm)
    delta = proj.project(t, w, f)
    assert delta.dtype == torch.float64
    assert (t + delta).min() >= 0 and (t + delta).max() <= 1
    corner, most = _corner(t, w, f)
    feasible = most >= f.abs()
    assert 10 <= int(feasible.sum()) < len(f)  # both cases are exercised
    torch.testing.assert_close(delta[~feasible], corner[~feasible], rtol=0, atol=0)
    residual = f + (w * delta).sum(1)
    assert residual[feasible].abs().max() < 1e-12
    for i in feasible.nonzero().squeeze(1).tolist():
        res, optimum = _scipy_optimum(optimize, norm, t[i].numpy(), w[i].numpy(), float(f[i]))
        assert res.success
        # scipy's solvers stop at ~1e-9 relative; the exact solution must not be worse than theirs.
        assert float(proj.measure(delta[i : i + 1])) == pytest.approx(optimum, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("norm", NORMS)
def test_matches_the_official_projection(norm):
    """The official ``fab_projections.py`` (hyperplane ⟨w, z⟩ = b) on 784-dimensional float32 problems: the same
    norm where the hyperplane meets the box (float32 rounding of sums over 784 terms), the same step where it does
    not."""
    projections = pytest.importorskip("pyautoattack.fab_projections")
    official = {"linf": projections.projection_linf, "l2": projections.projection_l2, "l1": projections.projection_l1}
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(300, 784, generator=gen)
    w = torch.randn(300, 784, generator=gen) * (torch.rand(300, 784, generator=gen) < 0.9)  # some w_i = 0
    f = torch.randn(300, generator=gen) * torch.rand(300, generator=gen) * 400  # the box allows about 280
    proj = hyperplane_projection(norm)
    ours = proj.project(t, w, f)
    theirs = official[norm](t, w, (w * t).sum(1) - f)
    _, most = _corner(t.double(), w.double(), f.double())
    feasible = most >= f.abs().double()
    assert 30 <= int(feasible.sum()) <= 290
    torch.testing.assert_close(proj.measure(ours)[feasible], proj.measure(theirs)[feasible], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[~feasible], theirs[~feasible], rtol=0, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    binary=st.booleans(),
)
def test_properties(d, seed, scale, binary):
    """For any problem: the point stays in the box; the constraint holds where the box allows; the step is no longer
    than the feasible rescaled corner step; projecting again does not move (idempotent); zero value, zero step."""
    t, w, f = _problem(n=8, d=d, seed=seed, scale=scale)
    if binary:  # points on the faces of the box: many coordinates have no room
        t = t.round()
    corner, most = _corner(t, w, f)
    feasible = most >= f.abs() * (1 + 1e-9)
    for norm in NORMS:
        proj = hyperplane_projection(norm)
        delta = proj.project(t, w, f)
        point = t + delta
        assert point.min() >= 0 and point.max() <= 1, norm
        residual = f + (w * delta).sum(1)
        assert (residual[feasible].abs() <= 1e-9 * (1 + f[feasible].abs())).all(), norm
        # The corner step scaled by |f| / most reaches the hyperplane inside the box: the optimum is no longer.
        scaled = corner * (f.abs() / most.clamp_min(1e-300))[:, None]
        assert (proj.measure(delta)[feasible] <= proj.measure(scaled)[feasible] * (1 + 1e-9) + 1e-12).all(), norm
        again = proj.project(point, w, residual.masked_fill(~feasible, 0.0))
        assert again.abs().max() <= 1e-9, norm
        assert torch.equal(proj.project(t, w, torch.zeros_like(f)), torch.zeros_like(t)), norm


@pytest.mark.parametrize("norm", NORMS)
def test_batched_images_and_rows_are_independent(norm):
    """Image-shaped batches are projected row by row: the batched result equals each row alone, in float32."""
    gen = torch.Generator().manual_seed(2)
    t = torch.rand(5, 1, 4, 4, generator=gen)
    w = torch.randn(5, 1, 4, 4, generator=gen)
    f = torch.randn(5, generator=gen)
    proj = hyperplane_projection(norm)
    batched = proj.project(t, w, f)
    assert batched.shape == t.shape and batched.dtype == torch.float32
    for i in range(5):
        torch.testing.assert_close(batched[i : i + 1], proj.project(t[i : i + 1], w[i : i + 1], f[i : i + 1]))


@pytest.mark.parametrize("norm", NORMS)
def test_distance_and_sphere(norm):
    gen = torch.Generator().manual_seed(3)
    proj = hyperplane_projection(norm)
    f, w = torch.randn(4, 3, generator=gen), torch.randn(4, 3, 2, 5, generator=gen)
    dual = {"linf": 1.0, "l2": 2.0, "l1": math.inf}[norm]
    expected = f.abs() / (torch.linalg.vector_norm(w.flatten(2), ord=dual, dim=2) + 1e-12)
    torch.testing.assert_close(proj.distance(f, w), expected)
    radius = torch.tensor([0.0, 0.1, 0.5, 2.0])
    draw = proj.sphere(torch.zeros(4, 1, 6, 6), radius, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flat_norm(draw, P[norm]), radius)
    again = proj.sphere(torch.zeros(4, 1, 6, 6), radius, torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)


def test_unknown_norm_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="'linf', 'l2', 'l1'"):
        hyperplane_projection("l0")
    with pytest.raises(ValueError, match="Unknown norm"):
        hyperplane_projection("l3")
