"""Norm-specific math for gradient attacks, one object per norm (steepest ascent, projection, sampling).

Following the design of "a step/projection object per norm and one loop for all": the attack loop holds a
:class:`Geometry` and calls its methods; it never branches on the norm itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from advtrain.threat.norms import Norm, clip_to_box, flat_norm, view_as_batch

_TINY = 1e-12


class Geometry(ABC):
    """Norm-specific operations on a batch of perturbations ``delta`` of shape (B, ...)."""

    norm: Norm
    p: float
    dual_p: float
    #: Whether the norm comes from an inner product (second-order trust-region steps use a Krylov subspace then).
    euclidean: bool
    #: Radius range of the adaptive trust-region attack (Yao et al. 2019, Alg. 1).
    trust_radius_bounds: tuple[float, float]

    def measure(self, delta: Tensor) -> Tensor:
        """Per-sample size ‖δ‖_p, shape (B,)."""
        return flat_norm(delta, self.p)

    def dual_measure(self, grad: Tensor) -> Tensor:
        """Per-sample dual norm ‖g‖_q with 1/p + 1/q = 1, the rate of the steepest ascent direction."""
        return flat_norm(grad, self.dual_p)

    @abstractmethod
    def ascent_direction(self, grad: Tensor) -> Tensor:
        """Unit-norm (in this geometry) direction u maximising ⟨g, u⟩; zero where the gradient is zero."""

    @abstractmethod
    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        """Euclidean projection of each δ onto its ball {‖δ‖_p ≤ ε}; ``eps`` has shape (B,)."""

    @abstractmethod
    def sample(self, like: Tensor, eps: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random start inside the ball (float32, shape of ``like``); see each geometry for the law."""

    def sample_ball_box(self, inputs: Tensor, eps: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random start inside ball ∩ box around ``inputs``: :meth:`sample` moved into ball ∩ box by
        :meth:`project_ball_box` (a geometry may draw it differently, see :meth:`L1Geometry.sample_ball_box`)."""
        return self.project_ball_box(inputs, self.sample(inputs, eps, generator), eps)

    def project_ball_box(self, inputs: Tensor, delta: Tensor, eps: Tensor) -> Tensor:
        """Projects onto the ball, then clips ``inputs + δ`` to [0, 1].

        Box clipping only shrinks coordinates towards zero, so the result lies in ball ∩ box for every norm
        (for L∞ it is the exact projection onto the intersection; for L2 it is the standard feasible
        approximation used by PGD implementations).
        """
        return clip_to_box(inputs, self.project(delta, eps))


class LinfGeometry(Geometry):
    """L∞ ball: steepest ascent is sign(g); projection is a clamp; dual norm is ℓ1."""

    norm = Norm.LINF
    p = math.inf
    dual_p = 1.0
    euclidean = False
    trust_radius_bounds = (1e-4, 1e-2)

    def ascent_direction(self, grad: Tensor) -> Tensor:
        return grad.sign()

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        bound = view_as_batch(eps, delta)
        return torch.maximum(torch.minimum(delta, bound), -bound)

    def sample(self, like: Tensor, eps: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Uniform in the cube [-ε, ε]^d (Madry et al. random start)."""
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        return (2.0 * u - 1.0) * view_as_batch(eps, like)


class L2Geometry(Geometry):
    """L2 ball: steepest ascent is g/‖g‖₂; projection rescales; the dual norm is ℓ2."""

    norm = Norm.L2
    p = 2.0
    dual_p = 2.0
    euclidean = True
    trust_radius_bounds = (5e-4, 5e-2)

    def ascent_direction(self, grad: Tensor) -> Tensor:
        norms = view_as_batch(flat_norm(grad, 2.0), grad)
        return grad / norms.clamp_min(_TINY)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        norms = flat_norm(delta, 2.0)
        factor = torch.where(norms > eps, eps / norms.clamp_min(_TINY), torch.ones_like(norms))
        return delta * view_as_batch(factor, delta)

    def sample(self, like: Tensor, eps: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A uniformly random direction scaled to U(0, 1)·ε (the Madry L2 recipe).

        This is not uniform in the ball's volume (which would put almost all mass on the sphere in high
        dimension); it spreads starts over radii as the reference implementation does.
        """
        direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        direction = direction / view_as_batch(flat_norm(direction, 2.0).clamp_min(_TINY), like)
        radius = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=torch.float32) * eps
        return direction * view_as_batch(radius, like)


class L1Geometry(Geometry):
    """L1 ball: the steepest ascent direction is 1-sparse (the largest |g_i|); the dual norm is ℓ∞; the projection onto
    ball ∩ box is exact (:meth:`project_ball_box`), as Croce & Hein (2021) show it must be.

    Reference for the box-aware projection and the sparse step: Croce & Hein, *Mind the box: l1-APGD for sparse
    adversarial attacks on image classifiers*, ICML 2021.
    """

    norm = Norm.L1
    p = 1.0
    dual_p = math.inf
    euclidean = False
    # L1 budgets on image benchmarks run about 20× the L2 ones (CIFAR-10: ε₁ = 12 against ε₂ = 0.5), so the trust
    # radii are L2's scaled by 20.
    trust_radius_bounds = (1e-2, 1.0)

    def ascent_direction(self, grad: Tensor) -> Tensor:
        """e_i·sign(g_i) at i = argmax |g_i| (the vertex of the ℓ1 ball that maximises ⟨g, u⟩), the unit split evenly
        over exact ties; zero for a zero gradient."""
        flat = grad.flatten(1)
        magnitude = flat.abs()
        top = magnitude.amax(dim=1, keepdim=True)
        chosen = (magnitude == top) & (top > 0)
        direction = flat.sign() * chosen / chosen.sum(dim=1, keepdim=True).clamp_min(1)
        return direction.view_as(grad)

    def sparse_ascent_direction(self, grad: Tensor, k: Tensor) -> Tensor:
        """The sparse step direction of l1-APGD (Croce & Hein 2021): sign(g_i) on the ``k`` coordinates with the largest
        |g_i| (every coordinate tied with the k-th largest included), divided by their number so that ‖u‖₁ = 1.

        k = 1 is the steepest ascent direction (:meth:`ascent_direction`, up to ties); larger k spreads the step over
        more coordinates, which the box needs: a single coordinate at its box face cannot move at all.

        Args:
            grad: (B, ...) gradients.
            k: (B,) numbers of coordinates, clamped to [1, d].
        """
        flat = grad.flatten(1)
        magnitude = flat.abs()
        rank = (k.long() - 1).clamp(0, flat.shape[1] - 1)
        kth = magnitude.sort(dim=1, descending=True).values.gather(1, rank[:, None])
        signs = flat.sign() * (magnitude >= kth)
        return (signs / signs.abs().sum(dim=1, keepdim=True).clamp_min(1)).view_as(grad)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        """Euclidean projection onto the ℓ1 ball by soft thresholding, sign(δ)·max(|δ| − θ, 0), with θ from the sorted
        magnitudes (Duchi et al. 2008); points already inside are returned unchanged. θ is found in float64."""
        flat = delta.flatten(1)
        magnitude = flat.abs()
        sorted_mag = magnitude.double().sort(dim=1, descending=True).values
        cumulative = sorted_mag.cumsum(dim=1)
        eps64 = eps.double()[:, None]
        ranks = torch.arange(1, flat.shape[1] + 1, device=delta.device, dtype=torch.float64)
        # The support size ρ: how many sorted magnitudes stay above their threshold (cumsum_j − ε)/j (a prefix).
        support = (sorted_mag * ranks > cumulative - eps64).sum(dim=1, keepdim=True).clamp_min(1)
        theta = (cumulative.gather(1, support - 1) - eps64) / support
        outside = cumulative[:, -1:] > eps64
        theta = torch.where(outside, theta.clamp_min(0.0), torch.zeros_like(theta)).to(magnitude.dtype)
        projected = flat.sign() * (magnitude - theta).clamp_min(0.0)
        return torch.where(outside, projected, flat).view_as(delta)

    def project_ball_box(self, inputs: Tensor, delta: Tensor, eps: Tensor) -> Tensor:
        """The exact Euclidean projection of δ onto {‖δ‖₁ ≤ ε} ∩ {inputs + δ ∈ [0, 1]} (Croce & Hein 2021, Sec. 3).

        The problem separates per coordinate once the ℓ1 constraint gets a multiplier λ ≥ 0: coordinate i minimises
        ½(d − δ_i)² + λ|d| over its box interval [−x_i, 1 − x_i], whose minimiser is the soft threshold of δ_i clipped
        to the interval, so |d_i(λ)| = min(max(|δ_i| − λ, 0), r_i) with r_i the room the box leaves in δ_i's
        direction (1 − x_i for δ_i ≥ 0, x_i otherwise). ‖d(λ)‖₁ is continuous, piecewise linear and non-increasing
        in λ with breakpoints max(|δ_i| − r_i, 0) (the coordinate leaves its box face) and |δ_i| (it reaches 0);
        λ = 0 when the clipped δ already lies in the ball, else the root of ‖d(λ)‖₁ = ε, read off the sorted
        breakpoints (no iteration). "Project, then clip" (the base class) is not this projection: the clip can
        leave much of the ball unused.
        """
        shape = delta.shape
        x = inputs.flatten(1).double()
        d = delta.flatten(1).double()
        magnitude = d.abs()
        room = torch.where(d >= 0, 1.0 - x, x).clamp_min(0.0)
        eps64 = eps.double()[:, None]
        at_zero = torch.minimum(magnitude, room).sum(dim=1, keepdim=True)  # ‖d(0)‖₁
        points = torch.cat([(magnitude - room).clamp_min(0.0), magnitude], dim=1)
        change = torch.cat([-torch.ones_like(magnitude), torch.ones_like(magnitude)], dim=1)
        points, order = points.sort(dim=1)
        slope = change.gather(1, order).cumsum(dim=1)  # d‖d(λ)‖₁/dλ just right of each breakpoint
        drops = slope[:, :-1] * (points[:, 1:] - points[:, :-1])
        value = torch.cat([at_zero, at_zero + drops.cumsum(dim=1)], dim=1)  # ‖d(λ)‖₁ at each breakpoint
        # The root lies between the last breakpoint above ε and the next one.
        j = (value > eps64).sum(dim=1, keepdim=True).clamp(1, points.shape[1] - 1) - 1
        left, right = points.gather(1, j), points.gather(1, j + 1)
        rate = -slope.gather(1, j)
        lam = torch.where(rate > 0, left + (value.gather(1, j) - eps64) / rate.clamp_min(1.0), right)
        lam = torch.where(at_zero > eps64, torch.minimum(lam.clamp_min(0.0), right), torch.zeros_like(lam))
        projected = d.sign() * torch.minimum((magnitude - lam).clamp_min(0.0), room)
        return clip_to_box(inputs.float(), projected.to(torch.float32).view(shape))

    def sample(self, like: Tensor, eps: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The projection onto the ball of a standard normal vector (AutoAttack's L1 start, before its box).

        On the sphere unless ‖z‖₁ ≤ ε, and sparse: soft thresholding keeps only the coordinates with the largest |z_i|
        (about as many as ε divided by their typical excess), with independent random signs.
        """
        z = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        return self.project(z, eps)

    def sample_ball_box(self, inputs: Tensor, eps: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The exact projection onto ball ∩ box of a standard normal vector (AutoAttack's L1 start): where the box
        blocks a coordinate's direction, the mass goes to the next largest coordinates instead of being lost, as it is
        when :meth:`sample` is clipped afterwards (on images with many pixels at 0 or 1, about half of it)."""
        z = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=torch.float32)
        return self.project_ball_box(inputs, z, eps)


_GEOMETRIES: dict[Norm, type[Geometry]] = {Norm.LINF: LinfGeometry, Norm.L2: L2Geometry, Norm.L1: L1Geometry}


def geometry_for(norm: str | Norm) -> Geometry:
    """Returns the geometry of a norm given by name or :class:`Norm`.

    Raises:
        ValueError: for an unknown name, or a norm that has no gradient-attack geometry (L0).
    """
    parsed = Norm.parse(norm)
    if parsed not in _GEOMETRIES:
        allowed = ", ".join(repr(n.value) for n in _GEOMETRIES)
        raise ValueError(f"Norm {parsed.value!r} has no gradient-step geometry; allowed values are {allowed}.")
    return _GEOMETRIES[parsed]()
