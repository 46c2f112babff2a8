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


_GEOMETRIES: dict[Norm, type[Geometry]] = {Norm.LINF: LinfGeometry, Norm.L2: L2Geometry}


def geometry_for(norm: str | Norm) -> Geometry:
    """Returns the geometry of a norm given by name or :class:`Norm`.

    Raises:
        ValueError: for an unknown name, or a norm that has no gradient-attack geometry yet (L1, L0).
    """
    parsed = Norm.parse(norm)
    if parsed not in _GEOMETRIES:
        allowed = ", ".join(repr(n.value) for n in _GEOMETRIES)
        raise ValueError(f"Norm {parsed.value!r} has no gradient-step geometry; allowed values are {allowed}.")
    return _GEOMETRIES[parsed]()
