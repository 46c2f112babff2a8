"""Minimal-norm steps onto a hyperplane inside the [0, 1] box, one object per norm (FAB's subproblem).

Given points t ∈ [0, 1]^d, the value f of an affine function at t and its normal w, the step of smallest p-norm that
reaches the hyperplane without leaving the box solves

    min ‖δ‖_p  subject to  f + ⟨w, δ⟩ = 0,  0 ≤ t + δ ≤ 1.

This is the projection of the fast adaptive boundary attack (Croce & Hein, *Minimally distorted adversarial examples
with a fast adaptive boundary attack*, ICML 2020, Sec. 3.1). Every solution moves each coordinate only in the
direction that brings f towards 0, i.e. δ_i = s_i u_i with s_i = −sign(f)·sign(w_i) and 0 ≤ u_i ≤ room_i, where
room_i is the distance from t_i to the face of the box in direction s_i (and 0 where w_i = 0). With a_i = |w_i| the
constraint reads Σ a_i u_i = |f|, and the three norms give:

* L2: u_i = min(λ a_i, room_i), the Euclidean projection clipped coordinate by coordinate (KKT), with λ ≥ 0 the
  root of the piecewise linear, non-decreasing h(λ) = Σ a_i min(λ a_i, room_i);
* L∞: u_i = min(λ, room_i), the same with a flat profile: every free coordinate moves by the same λ;
* L1: the coordinates in decreasing order of a_i (most progress per unit of ℓ1) are filled to their room until
  |f| is reached; the last one only partly (the exchange argument of the fractional knapsack).

The roots are found exactly, not by bisection: after sorting the breakpoints, h at every breakpoint is a cumulative
sum and the segment holding |f| is a count, so the whole batch is solved with one sort, a few cumulative sums and a
gather: no host sync, no data-dependent shape. Where the hyperplane does not meet the box (the most the box allows,
Σ a_i room_i, is below |f|), the step goes as far as the box allows towards it: u_i = room_i, the box point of
largest progress, as in the official FAB code (``fab_projections.py``).

The same objects carry the rest of FAB's norm-specific math: the p-norm of a step, the distance |f| / ‖w‖_q to a
linearised boundary (q the dual norm), and the law of FAB's random restarts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from advtrain.threat.norms import Norm, flat_norm, view_as_batch

_TINY = 1e-12


def _moves(points: Tensor, normals: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reduced problem of every norm: per coordinate the direction s_i, the weight a_i = |w_i| and the room_i
    (flattened to (n, d)), and the progress |f| to make."""
    t, w = points.flatten(1), normals.flatten(1)
    direction = -torch.sign(values)[:, None] * torch.sign(w)
    room = torch.where(direction > 0, 1.0 - t, t).clamp_min(0.0) * (direction != 0)
    return direction, w.abs(), room, values.abs()


def _water_fill(weight: Tensor, slope: Tensor, room: Tensor, target: Tensor) -> Tensor:
    """u_i = min(λ·slope_i, room_i) with λ ≥ 0 the smallest root of h(λ) = Σ weight_i·u_i(λ) = target, or u = room where
    h never reaches the target. All (n, d) but ``target`` (n,); ``slope`` must be positive where ``room`` is.

    With the breakpoints β_i = room_i / slope_i sorted, h(β_(k)) = Σ_{j≤k} weight·room + β_(k) Σ_{j>k} weight·slope
    (the prefix saturated, the rest still growing), and h is linear with slope Σ_{j>k} weight·slope in between.
    """
    slope = slope * (room > 0)  # a coordinate without room is saturated from the start
    breaks = torch.where(room > 0, room / slope.clamp_min(_TINY), torch.zeros_like(room))
    breaks, order = breaks.sort(dim=1)
    full = (weight * room).gather(1, order).cumsum(dim=1)  # Σ_{j≤k} weight·room
    rate = (weight * slope).gather(1, order)
    rest = rate.sum(dim=1, keepdim=True) - rate.cumsum(dim=1)  # Σ_{j>k} weight·slope
    h = full + breaks * rest
    below = (h < target[:, None]).sum(dim=1)  # breakpoints with h < target: λ lies after the last of them
    k = (below - 1).clamp_min(0)[:, None]
    start = torch.where(below[:, None] > 0, breaks.gather(1, k), torch.zeros_like(k, dtype=breaks.dtype))
    h_start = torch.where(below[:, None] > 0, h.gather(1, k), torch.zeros_like(start))
    slope_here = torch.where(below[:, None] > 0, rest.gather(1, k), rate.sum(dim=1, keepdim=True))
    lam = start + (target[:, None] - h_start).clamp_min(0.0) / slope_here.clamp_min(_TINY)
    reachable = (below < h.shape[1])[:, None]
    return torch.where(reachable, torch.minimum(lam * slope, room), room)


class HyperplaneProjection(ABC):
    """FAB's norm-specific operations: the minimal step onto a hyperplane in the box, the distance to a linearised
    boundary, the norm of a step and the random restarts. One object per norm (:func:`hyperplane_projection`)."""

    norm: Norm
    p: float
    dual_p: float

    def measure(self, delta: Tensor) -> Tensor:
        """Per-sample ‖δ‖_p, shape (B,)."""
        return flat_norm(delta, self.p)

    def distance(self, values: Tensor, normals: Tensor) -> Tensor:
        """|f| / ‖w‖_q, the p-distance from the point to the hyperplane f + ⟨w, δ⟩ = 0 ignoring the box.

        Args:
            values: f, shape (n, K).
            normals: w, shape (n, K, *shape).

        Returns:
            (n, K) distances (|f| / 1e-12 where w = 0, as in the official code).
        """
        dual = torch.linalg.vector_norm(normals.flatten(2), ord=self.dual_p, dim=2)
        return values.abs() / (dual + _TINY)

    def project(self, points: Tensor, normals: Tensor, values: Tensor) -> Tensor:
        """The step δ of least p-norm with ``values + ⟨normals, δ⟩ = 0`` and ``points + δ`` in [0, 1], or, where the
        hyperplane misses the box, the box step of largest progress towards it (see the module docstring).

        Args:
            points: t in [0, 1], shape (n, *shape).
            normals: w, same shape.
            values: f, shape (n,).

        Returns:
            δ with the shape of ``points``.
        """
        direction, weight, room, target = _moves(points, normals, values)
        return (direction * self._amounts(weight, room, target)).view_as(points)

    @abstractmethod
    def _amounts(self, weight: Tensor, room: Tensor, target: Tensor) -> Tensor:
        """The |δ_i| of the reduced problem min ‖u‖_p, Σ weight_i u_i = target, 0 ≤ u ≤ room; u = room if infeasible."""

    @abstractmethod
    def sphere(self, like: Tensor, radius: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random point on the p-sphere of per-sample ``radius`` (shape (B,)), FAB's restart law (float32)."""


class LinfHyperplane(HyperplaneProjection):
    """L∞: every coordinate that can move moves by the same amount λ, up to its room."""

    norm = Norm.LINF
    p = math.inf
    dual_p = 1.0

    def _amounts(self, weight: Tensor, room: Tensor, target: Tensor) -> Tensor:
        return _water_fill(weight, (room > 0).to(room.dtype), room, target)

    def sphere(self, like: Tensor, radius: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Uniform in [−1, 1]^d, rescaled to ‖·‖_∞ = radius (the official code's law)."""
        t = 2.0 * torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32) - 1.0
        return t * view_as_batch(radius / flat_norm(t, math.inf).clamp_min(_TINY), t)


class L2Hyperplane(HyperplaneProjection):
    """L2: the Euclidean projection with each coordinate clipped at its room, u_i = min(λ|w_i|, room_i)."""

    norm = Norm.L2
    p = 2.0
    dual_p = 2.0

    def _amounts(self, weight: Tensor, room: Tensor, target: Tensor) -> Tensor:
        return _water_fill(weight, weight, room, target)

    def sphere(self, like: Tensor, radius: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A Gaussian direction rescaled to ‖·‖₂ = radius (uniform on the sphere)."""
        t = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        return t * view_as_batch(radius / flat_norm(t, 2.0).clamp_min(_TINY), t)


class L1Hyperplane(HyperplaneProjection):
    """L1: fill the coordinates of largest |w_i| first (greedy, exact for a linear objective with box constraints)."""

    norm = Norm.L1
    p = 1.0
    dual_p = math.inf

    def _amounts(self, weight: Tensor, room: Tensor, target: Tensor) -> Tensor:
        weight = weight * (room > 0)  # a coordinate without room contributes nothing
        sorted_weight, order = weight.sort(dim=1, descending=True)
        sorted_room = room.gather(1, order)
        filled = (sorted_weight * sorted_room).cumsum(dim=1)
        below = (filled < target[:, None]).sum(dim=1, keepdim=True)  # coordinates filled completely
        rank = torch.arange(room.shape[1], device=room.device)[None, :]
        last = below.clamp_max(room.shape[1] - 1)
        before = torch.where(below > 0, filled.gather(1, (below - 1).clamp_min(0)), torch.zeros_like(target[:, None]))
        partial = (target[:, None] - before).clamp_min(0.0) / sorted_weight.gather(1, last).clamp_min(_TINY)
        partial = torch.minimum(partial, sorted_room.gather(1, last))
        amounts = torch.where(rank < below, sorted_room, torch.where(rank == below, partial, 0.0))
        return torch.zeros_like(amounts).scatter(1, order, amounts)

    def sphere(self, like: Tensor, radius: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A Gaussian direction rescaled to ‖·‖₁ = radius (the official code's law)."""
        t = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        return t * view_as_batch(radius / flat_norm(t, 1.0).clamp_min(_TINY), t)


_PROJECTIONS: dict[Norm, type[HyperplaneProjection]] = {
    Norm.LINF: LinfHyperplane,
    Norm.L2: L2Hyperplane,
    Norm.L1: L1Hyperplane,
}


def hyperplane_projection(norm: str | Norm) -> HyperplaneProjection:
    """The :class:`HyperplaneProjection` of a norm given by name or :class:`Norm`.

    Raises:
        ValueError: for an unknown name or L0, naming the allowed values.
    """
    parsed = Norm.parse(norm)
    if parsed not in _PROJECTIONS:
        allowed = ", ".join(repr(n.value) for n in _PROJECTIONS)
        raise ValueError(f"Norm {parsed.value!r} has no hyperplane projection; allowed values are {allowed}.")
    return _PROJECTIONS[parsed]()
