"""Trust-region (TR) attack, first and second order, L2 and L∞.

Reference:
    Yao, Gholami, Xu, Keutzer and Mahoney, *Trust Region Based Adversarial Attack on Neural Networks*, CVPR 2019
    (seed 000: Algorithm 1, Sec. 3, Sec. 4.1 index selection, Sec. 4.4 second order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.core import AttackCore
from advtrain.engine.result import AttackResult
from advtrain.engine.state import SampleState
from advtrain.threat.geometry import Geometry, geometry_for
from advtrain.threat.norms import clip_to_box, flat_norm, view_as_batch

_PAPER = "Yao et al., Trust Region Based Adversarial Attack on Neural Networks, CVPR 2019"
_TINY = 1e-12
# Adaptive-radius bounds of the reference code, per norm.
# The reference overshoot: a step of length 1.02·(ℓ + 1e-4) where the model says ℓ reaches the boundary.
_OVERSHOOT, _OVERSHOOT_ADD = 1.02, 1e-4


def _margin(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """φ = z_target − z_label, negative while the sample is correctly classified."""
    return (logits.gather(1, targets[:, None]) - logits.gather(1, labels[:, None])).squeeze(1)


def select_targets(core: AttackCore, geometry: Geometry, *, num_classes_considered: int, hardest: bool) -> Tensor:
    """TR index selection (seed 000, Sec. 4.1), once on the clean inputs of ``core``.

    Among the ``num_classes_considered`` classes ranked right after the predicted one, the linearised distance to
    each boundary is d_i = (z_top − z_i) / ‖∇z_i − ∇z_top‖_q, with q the dual norm of the geometry (1 for L∞, 2 for
    L2). The best class minimises d (negative distances set to 0); the hardest maximises it. Costs one forward and
    ``num_classes_considered`` backward passes per sample.

    Returns:
        (B,) target class per sample and the clean logits (B, K).
    """
    with torch.enable_grad():
        x = core.x32.clone().requires_grad_(True)
        logits = core.logits(x)
        ranked = logits.detach().argsort(dim=1, descending=True)
        c = min(num_classes_considered, logits.shape[1] - 1)
        diffs = logits.gather(1, ranked[:, :1]) - logits.gather(1, ranked[:, 1 : c + 1])
        rows = core.jacobian(diffs, x)
    n = x.shape[0]
    d = diffs.detach() / geometry.dual_measure(rows.flatten(0, 1)).view(n, c).clamp_min(_TINY)
    pick = d.argmax(dim=1) if hardest else d.clamp_min(0.0).argmin(dim=1)
    return ranked.gather(1, pick[:, None] + 1).squeeze(1), logits.detach()


def hessian_vector_product(grad: Tensor, delta: Tensor, rows: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """v ↦ H·v by double backward, H the per-sample Hessian of the margin w.r.t. the perturbation.

    Args:
        grad: ∇_δ Σφ, computed with ``create_graph=True`` (samples are independent, so the Hessian of the sum is
            block-diagonal and each block is one sample's Hessian).
        delta: the perturbation the gradient was taken with respect to.
        rows: optional subset of samples; ``v`` then has ``len(rows)`` rows and the other samples get a zero
            direction (they still ride along in the backward pass).

    Returns:
        The product function; it returns zeros where the gradient does not depend on δ (a linear model).
    """

    def product(v: Tensor) -> Tensor:
        if not grad.requires_grad:
            return torch.zeros_like(v)
        padded = v if rows is None else torch.zeros_like(delta).index_copy_(0, rows, v)
        hv = torch.autograd.grad(grad, delta, grad_outputs=padded, retain_graph=True, allow_unused=True)[0]
        if hv is None:
            return torch.zeros_like(v)
        return hv if rows is None else hv[rows]

    return product


@dataclass
class _Step:
    """A proposed step δ (before box clipping) and, for the second-order model, H·δ."""

    delta: Tensor
    hessian_delta: Tensor | None


def _first_order_delta(geometry: Geometry, phi: Tensor, grad: Tensor, radius: Tensor) -> Tensor:
    """Linear model: the steepest-ascent direction, length 1.02·(min(per, r) + 1e-4), per = −φ/‖∇φ‖_q. One fusible
    unit (see :meth:`~advtrain.engine.core.AttackCore.step`)."""
    per = -phi / geometry.dual_measure(grad).clamp_min(_TINY)
    length = _OVERSHOOT * (torch.minimum(per, radius) + _OVERSHOOT_ADD)
    return view_as_batch(length, grad) * geometry.ascent_direction(grad)


def _first_root(c: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """Smallest τ > 0 with c + b·τ + a·τ² = 0 for c < 0 < b (``inf`` where there is none); cancellation-free."""
    disc = b * b - 4.0 * a * c
    root = -2.0 * c / (b + disc.clamp_min(0.0).sqrt()).clamp_min(_TINY)
    return torch.where(disc >= 0, root, torch.full_like(root, float("inf")))


def _to_sphere(z: Tensor, d: Tensor, radius: Tensor) -> Tensor:
    """τ ≥ 0 with ‖z + τd‖₂ = r (z inside the ball)."""
    zd = (z * d).flatten(1).sum(1)
    dd = (d * d).flatten(1).sum(1).clamp_min(_TINY)
    zz = (z * z).flatten(1).sum(1)
    return (-zd + (zd * zd + dd * (radius * radius - zz)).clamp_min(0.0).sqrt()) / dd


def _steihaug_step(geometry: Geometry, phi: Tensor, grad: Tensor, radius: Tensor, hvp, cg_steps: int) -> _Step:
    """Quadratic model q(s) = φ + ⟨g, s⟩ + ½⟨s, Hs⟩ of the margin, followed inside the trust region.

    The first segment runs along the geometry's steepest-ascent direction u (g/‖g‖₂ for L2, sign g for L∞). With
    ``cg_steps > 1`` (L2 only) the path continues as Steihaug's truncated conjugate gradient for max q(s) s.t.
    ‖s‖₂ ≤ r (Steihaug 1983, the paper's ref. [24]; Nocedal & Wright Alg. 7.2). Along every segment q is a scalar
    quadratic, known exactly from one Hessian-vector product, so the step is the first point of the path where
    the model reaches the boundary (q = 0), else the point where the path leaves the region (or a direction of
    non-negative curvature of q reaches it), else CG's interior maximiser. Steihaug iterates grow monotonically in
    norm, so this is the shortest boundary crossing along the path. The step is then lengthened by the reference
    overshoot 1.02·(‖s‖ + 1e-4). With H = 0 it is exactly the first-order step. In practice the model crosses the
    boundary on the first segment (the gradient direction) for almost every sample, so this solver mostly
    corrects the first-order step length; :func:`_krylov_step` also turns the direction and finds shorter steps.

    Args:
        geometry: the norm's geometry (the shape of the region and the first direction).
        phi: (B,) margins φ < 0.
        grad: ∇φ, shape of the inputs.
        radius: (B,) trust-region radii.
        hvp: v ↦ H·v for a batch of directions v (one double-backward pass per call).
        cg_steps: maximum number of segments.

    Returns:
        The step s and H·s.
    """
    batch_view = lambda t: view_as_batch(t, grad)  # noqa: E731
    dot = lambda a, b: (a * b).flatten(1).sum(1)  # noqa: E731
    n = grad.shape[0]
    s = torch.zeros_like(grad)
    hs = torch.zeros_like(grad)
    q = phi.clone()
    done = torch.zeros(n, dtype=torch.bool, device=grad.device)
    # Segment 0: steepest ascent of the geometry, of unit length in its norm, so the region's edge is at τ = r.
    first = d = geometry.ascent_direction(grad)
    for j in range(cg_steps):
        hd = hvp(d)
        slope = dot(grad + hs, d)  # dq/dτ at τ = 0 along d (= ‖∇q(s)‖² up to d's scale: CG keeps it > 0)
        curv = dot(d, hd)  # d²q/dτ²
        edge = radius / geometry.measure(d).clamp_min(_TINY) if j == 0 else _to_sphere(s, d, radius)
        cross = _first_root(q, slope, 0.5 * curv)
        # Where q is concave along d its maximum lies at τ* = slope/(−curv), which is CG's step length.
        peak = torch.where(curv < 0, slope / (-curv).clamp_min(_TINY), torch.full_like(slope, float("inf")))
        tau = torch.minimum(torch.minimum(cross, edge), peak)
        tau = torch.where(done | (slope <= 0), torch.zeros_like(tau), tau)
        s = s + batch_view(tau) * d
        hs = hs + batch_view(tau) * hd
        q = q + tau * slope + 0.5 * tau * tau * curv
        # Only a sample that stopped at CG's interior maximiser goes on to the next conjugate direction.
        done = done | (tau >= cross) | (tau >= edge) | (slope <= 0)
        if j + 1 == cg_steps or bool(done.all()):
            break
        # Next direction: the gradient of q at s made H-conjugate to d (Hestenes-Stiefel form, which does not
        # depend on the scale of d; curv < 0 for every sample still going).
        ascent = grad + hs
        beta = dot(ascent, hd) / curv.clamp_max(-_TINY)
        d = torch.where(batch_view(done), torch.zeros_like(d), ascent - batch_view(beta) * d)
    length = geometry.measure(s)
    target = _OVERSHOOT * (length + _OVERSHOOT_ADD)
    has_length = length > _TINY
    direction = torch.where(batch_view(has_length), s / batch_view(length.clamp_min(_TINY)), first)
    scale = torch.where(has_length, target / length.clamp_min(_TINY), torch.zeros_like(length))
    return _Step(batch_view(target) * direction, batch_view(scale) * hs)


def _lanczos(first: Tensor, hvp, dim: int) -> tuple[list[Tensor], list[Tensor]]:
    """Up to ``dim`` orthonormal Lanczos vectors started from the unit vector ``first``, and their Hessian products
    (one HVP each); stops early once the subspace is invariant for every sample."""
    batch_view = lambda t: view_as_batch(t, first)  # noqa: E731
    dot = lambda a, b: (a * b).flatten(1).sum(1)  # noqa: E731
    basis = [first]
    products = []
    for j in range(dim):
        products.append(hvp(basis[j]))
        if j + 1 == dim:
            break
        w = products[j]
        for v in basis:  # full reorthogonalisation: m is small and it keeps Q orthonormal in float32
            w = w - batch_view(dot(w, v)) * v
        beta = flat_norm(w, 2.0)
        grows = beta > _TINY
        if not bool(grows.any()):  # an invariant subspace for every sample (e.g. H = 0 for ReLU networks)
            break
        basis.append(torch.where(batch_view(grows), w / batch_view(beta.clamp_min(_TINY)), 0.0))
    return basis, products


def _krylov_step(geometry: Geometry, phi: Tensor, grad: Tensor, radius: Tensor, hvp, dim: int) -> _Step:
    """Minimal-norm boundary crossing of the quadratic margin model inside the trust region, in a Krylov subspace.

    The quadratic model q(s) = φ + ⟨g, s⟩ + ½⟨s, Hs⟩ is restricted to the subspace spanned by Lanczos vectors
    Q = [q_1, …, q_m] started from the geometry's steepest-ascent direction (q_1 ∥ g for L2: the Krylov space
    span{g, Hg, …, H^{m−1}g}, the paper's Lanczos approach; for L∞ ``dim`` is 1 and the subspace is sign g).
    With s = Qt the model becomes q(t) = φ + ⟨b, t⟩ + ½ tᵀTt, T = QᵀHQ. The trust-region solutions
    t(λ) = (λI − T)⁻¹ b, λ > max(λ_max(T), 0), trace the maximisers of q over balls of growing radius
    (Moré–Sorensen), along which both ‖t‖ and q increase as λ decreases; a bisection on λ finds the first point
    where the model reaches the boundary (q = 0) or the path reaches the radius r, whichever comes first, i.e. the
    minimal-norm crossing of the model within the region (or the region's best point when the model cannot
    cross). Lengthened by the reference overshoot 1.02·(‖s‖ + 1e-4). With H = 0 it is exactly the first-order
    step.

    Args:
        geometry: the norm's geometry (first direction and the size of the region).
        phi: (B,) margins φ ≤ 0.
        grad: ∇φ, shape of the inputs.
        radius: (B,) trust-region radii.
        hvp: v ↦ H·v for a batch of directions v (one double-backward pass per call).
        dim: number of Lanczos vectors (Hessian-vector products).

    Returns:
        The step s and H·s.
    """
    batch_view = lambda t: view_as_batch(t, grad)  # noqa: E731
    dot = lambda a, b: (a * b).flatten(1).sum(1)  # noqa: E731
    u = geometry.ascent_direction(grad)
    u_norm = flat_norm(u, 2.0).clamp_min(_TINY)
    # The region in subspace coordinates: exact for L2, and for L∞ along the single direction u (‖τu‖∞ = τ).
    sub_radius = radius * u_norm / geometry.measure(u).clamp_min(_TINY)
    basis, products = _lanczos(u / batch_view(u_norm), hvp, dim)
    m = len(basis)
    # The projected model: T = QᵀHQ (tridiagonal in exact arithmetic; formed in full from the products, and
    # symmetrised) and b = Qᵀg (= ‖g‖e_1 for L2).
    T = torch.stack([torch.stack([dot(basis[i], products[j]) for j in range(m)], dim=1) for i in range(m)], dim=1)
    T = 0.5 * (T + T.transpose(1, 2)).double()
    b = torch.stack([dot(grad, v) for v in basis], dim=1).double()
    evals, evecs = torch.linalg.eigh(T)
    c = (evecs.transpose(1, 2) @ b[:, :, None]).squeeze(2)  # b in the eigenbasis
    phi64, r64 = phi.double(), sub_radius.double()
    low = evals[:, -1].clamp_min(0.0)

    def path(mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gap = (low + mu)[:, None] - evals
        coef = c / gap
        norm = coef.norm(dim=1)
        value = phi64 + (c * coef).sum(1) + 0.5 * (evals * coef * coef).sum(1)
        return coef, norm, value

    c_norm = c.norm(dim=1)
    scale = c_norm * c_norm / phi64.abs().clamp_min(1e-30) + c_norm / r64.clamp_min(1e-30) + evals.abs().amax(1)
    log_hi = torch.log(1e6 * scale + 1e-30)
    log_lo = log_hi - 60.0
    for _ in range(50):  # bisection on log μ, μ = λ − max(λ_max, 0): reached(μ) is true for small μ only
        mid = 0.5 * (log_lo + log_hi)
        _, norm, value = path(mid.exp())
        reached = (value >= 0) | (norm >= r64)
        log_lo = torch.where(reached, mid, log_lo)
        log_hi = torch.where(reached, log_hi, mid)
    coef, _, _ = path(log_hi.exp())
    t = (evecs @ coef[:, :, None]).squeeze(2).to(grad.dtype)  # back from the eigenbasis to Lanczos coordinates
    s = sum(batch_view(t[:, i]) * basis[i] for i in range(m))
    hs = sum(batch_view(t[:, i]) * products[i] for i in range(m))
    length = geometry.measure(s)
    target = _OVERSHOOT * (length + _OVERSHOOT_ADD)
    has_length = length > _TINY
    direction = torch.where(batch_view(has_length), s / batch_view(length.clamp_min(_TINY)), u)
    factor = torch.where(has_length, target / length.clamp_min(_TINY), torch.zeros_like(length))
    return _Step(batch_view(target) * direction, batch_view(factor) * hs)


@dataclass(eq=False)
class _TRState(SampleState):
    x: Tensor
    y: Tensor
    target: Tensor  # the class of index selection
    delta: Tensor
    radius: Tensor
    phi: Tensor | None = None  # the margin at x + δ
    grad: Tensor | None = None  # its gradient
    prev_phi: Tensor | None = None  # the margin before the last step
    predicted: Tensor | None = None  # the change of the margin the model predicted for the last step
    step: Tensor | None = None  # order 2: the model's step (before box clipping)
    hessian_step: Tensor | None = None  # order 2: H times that step


@register_attack(AttackSpec("tr", AttackKind.MINIMAL, ("linf", "l2"), targeted=False, stochastic=False, paper=_PAPER))
class TrustRegion(Attack):
    """Trust-region attack (Yao et al., CVPR 2019, Algorithm 1): a minimal-norm L2 or L∞ attack.

    **Index selection** (Sec. 4.1), once on the clean input: among the ``num_classes_considered`` runners-up of the
    predicted class, the linearised boundary distance d_i = (z_top − z_i)/‖∇z_i − ∇z_top‖_q (q the dual norm: 1 for
    L∞, 2 for L2); ``target="best"`` attacks argmin d (negatives set to 0), ``"hardest"`` argmax d. The target is
    fixed afterwards.

    **Iteration** on the margin φ = z_target − z_true, for the samples still correctly classified only (a fooled
    sample stops at once and costs nothing more; its first fooling point is returned):

    * ``order=1``: per = −φ/‖∇φ‖_q is the linearised distance to the boundary; the step has length
      1.02·(min(per, r) + 1e-4) along sign ∇φ (L∞) or ∇φ/‖∇φ‖₂ (L2), then x is clipped to the box (the reference
      rule).
    * ``order=2`` (Sec. 3): the quadratic model q(s) = φ + ⟨∇φ, s⟩ + ½⟨s, Hs⟩ with Hessian-vector products (double
      backward) is solved inside the region of radius r for its minimal-norm boundary crossing, then lengthened
      by the same overshoot 1.02·(‖s‖ + 1e-4). L2: in the Krylov subspace of ``krylov_dim`` Lanczos vectors
      (``solver="lanczos"``, the paper's choice, see :func:`_krylov_step`) or along the Steihaug-CG path
      (``solver="steihaug"``, see :func:`_steihaug_step`). L∞: a one-dimensional model along sign ∇φ (the
      box-shaped region makes Euclidean Krylov directions meaningless), i.e. a curvature-corrected first-order
      step length, one HVP per iteration. With H = 0 (linear models, ReLU networks almost everywhere) order 2 is
      exactly order 1.
    * ``adaptive=True`` (Alg. 1): after each step, ρ = (φ(x_new) − φ(x)) / m(Δx), the actual over the
      model-predicted change of the margin; ρ > σ1 → r ← η·r, ρ < σ2 → r ← r/η (σ1 = 0.9, σ2 = 0.5, η = 1.2); r is
      clipped to [1e-4, 1e-2] (L∞) or [5e-4, 5e-2] (L2) (``radius_bounds`` overrides). ``adaptive=False`` keeps
      r = ``radius`` fixed ("TR Non-Adap").

    Cost: one forward and one backward pass per iteration per still-correct sample (the forward that computes the
    gradient also decides whether the sample is fooled and scores the previous step for the adaptive radius), one
    forward and ``num_classes_considered`` backward passes for index selection, and one forward for the samples
    still standing after the last step; order 2 adds its Hessian-vector products, each counted as a backward
    pass. Samples stop as soon as they are fooled, the batch once all are.

    Deviations (and why):

    * Adaptive ratio: the paper's ratio of the margin's actual to predicted change is implemented. The official
      code (and adv-lib) instead divide the drop of the *true* logit by the step length and first set
      r ← min(per, r); neither quirk is reproduced, so ``adaptive=True`` differs from theirs (``adaptive=False`` is
      step-for-step the reference). The predicted change is evaluated on the step actually taken (after box
      clipping: ⟨∇φ, Δx⟩, plus ½⟨Δx, Hs⟩ for order 2 with s the unclipped step), because on images with
      saturated pixels the unclipped prediction overstates the change and would shrink r for no reason. The
      signed ratio of Alg. 1 is used, not the |·| of the text, so a step that lowers the margin shrinks r, and
      Alg. 1's "min{ε/η, ε_min}" is read as max (the radius has a floor). Consequence: with σ1 = 0.9 the radius
      only grows where the linear model predicts ≥ 90% of the change; on the ReLU reference SmallCNN the L∞ sign
      steps score ρ ≈ 0.85, so the L∞ radius stays near its initial value and a few percent of the digits need
      more than 100 iterations (σ1, σ2 and η are arguments).
    * Second order: the paper's QCQP maximises the model in the region; advtrain looks for the model's
      minimal-norm boundary crossing in the region instead, the second-order analogue of the first-order rule
      min(per, r), so that both orders are minimal-norm attacks and coincide when H = 0. The paper gives no code
      for it (nor does any public implementation). Lanczos is the default because the Steihaug-CG path almost
      always meets the model's boundary on its first segment, the gradient direction, and so only corrects the
      first-order step length. Measured on the softplus SmallCNN (100 digits, fixed radius 0.5, 50 iterations):
      mean L2 norm 1.629 (Lanczos, 3 HVPs) and 1.649 (Steihaug) vs 1.649 (first order), at 3.7× and 1.7× the
      time; with the adaptive radius (r ≤ 0.05) curvature does not matter and order 2 gains nothing.
    * ``eps`` (minimal-norm contract): the found δ is projected onto the ε-ball (L∞: clamped to [−ε, ε]; L2:
      rescaled), and ``success`` holds only where the projected point still fools the model (one verification
      forward for the samples that moved). This is the projection advtrain's TR-L∞ training maximizer uses.
      Samples never fooled come back unchanged.
    * Untargeted only, as in the paper (the target class is chosen by index selection).

    ``result.extra["last_iterate"]`` holds every sample's last iterate (its first fooling point where it was fooled),
    in the box and before any ε projection; :class:`advtrain.maximizers.TRLinf` trains unfooled samples on it.

    Args:
        norm: ``"l2"`` or ``"linf"``.
        steps: iteration budget.
        adaptive: adapt the radius (Alg. 1) or keep it fixed.
        radius: initial (adaptive) or fixed radius r (the reference code's 1e-3 by default).
        target: ``"best"`` (closest linearised boundary) or ``"hardest"`` (farthest) class.
        num_classes_considered: c, the runner-up classes index selection looks at (9 in the paper on CIFAR-10).
        order: 1 (linear model) or 2 (quadratic model with Hessian-vector products).
        krylov_dim: Hessian-vector products per iteration for ``order=2`` with L2 (Lanczos vectors, or at most
            that many Steihaug-CG segments); L∞ always uses one.
        solver: ``"lanczos"`` or ``"steihaug"``, the L2 second-order subproblem solver.
        radius_bounds: (min, max) radius for ``adaptive``; ``None`` uses the reference values of the norm.
        sigma1, sigma2, eta: the adaptive radius' thresholds σ1 > σ2 and factor η > 1.
        eps: optional ε-ball variant, see above (a per-call ``eps`` overrides it).
        options: ``autocast``, ``compile``, ``mode``, ``seed``, shared by every attack (see
            :class:`~advtrain.attacks.base.Attack`; the attack is deterministic, the seed is unused).

    Example:
        >>> attack = TrustRegion(norm="linf", steps=100)  # doctest: +SKIP
        >>> result = attack(model, images, labels)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        norm: Literal["l2", "linf"] = "l2",
        steps: int = 100,
        adaptive: bool = True,
        radius: float = 1e-3,
        target: Literal["best", "hardest"] = "best",
        num_classes_considered: int = 9,
        order: Literal[1, 2] = 1,
        krylov_dim: int = 3,
        solver: Literal["lanczos", "steihaug"] = "lanczos",
        radius_bounds: tuple[float, float] | None = None,
        sigma1: float = 0.9,
        sigma2: float = 0.5,
        eta: float = 1.2,
        eps: float | None = None,
        **options,
    ) -> None:
        super().__init__(**options)
        if steps < 1 or num_classes_considered < 1 or krylov_dim < 1:
            raise ValueError(
                f"steps, num_classes_considered and krylov_dim must be >= 1, got {steps}, {num_classes_considered}, "
                f"{krylov_dim}."
            )
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius}.")
        if target not in ("best", "hardest"):
            raise ValueError(f"Unknown target {target!r}; allowed values are 'best', 'hardest'.")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}.")
        if solver not in ("lanczos", "steihaug"):
            raise ValueError(f"Unknown solver {solver!r}; allowed values are 'lanczos', 'steihaug'.")
        if not (0 < sigma2 <= sigma1 and eta > 1):
            raise ValueError(f"Need 0 < sigma2 <= sigma1 and eta > 1, got {sigma1}, {sigma2}, {eta}.")
        self.geometry = geometry_for(norm)
        self.norm = self.geometry.norm.value
        bounds = self.geometry.trust_radius_bounds if radius_bounds is None else tuple(radius_bounds)
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"radius_bounds must satisfy 0 < min <= max, got {bounds}.")
        self.steps = int(steps)
        self.adaptive = bool(adaptive)
        self.radius = float(radius)
        self.target = target
        self.num_classes_considered = int(num_classes_considered)
        self.order = int(order)
        self.krylov_dim = int(krylov_dim)
        self.solver = solver
        self.radius_bounds = (float(bounds[0]), float(bounds[1]))
        self.sigma1, self.sigma2, self.eta = float(sigma1), float(sigma2), float(eta)
        self.eps = self.optional_eps(eps)
        # Krylov directions are Euclidean: in the L∞ box only the first, steepest-ascent direction is meaningful.
        self._subspace_dim = self.krylov_dim if self.geometry.euclidean else 1

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        core = self.core(model, inputs, labels)
        xf, y = core.x32, core.y
        eps_t = self.budget(eps, inputs)
        # One forward and c backward passes: the clean decision and the target class of every sample. Samples
        # misclassified from the start are fooled at norm 0 and never attacked.
        targets, clean_logits = select_targets(
            core, self.geometry, num_classes_considered=self.num_classes_considered, hardest=self.target == "hardest"
        )
        success = core.fooled(clean_logits, torch.arange(core.batch, device=core.device))
        best = xf.clone()
        index = (~success).nonzero().squeeze(1)
        state = core.start(
            _TRState, index, x=xf[index], y=y[index], target=targets[index], delta=torch.zeros_like(xf[index]),
            radius=torch.full((index.numel(),), self.radius, device=core.device),
        )  # fmt: skip

        def record(s: _TRState, fooled: Tensor) -> None:
            """The first fooling point of each sample (it stops there)."""
            point = (s.x + s.delta).clamp(0.0, 1.0)
            s.write(best, torch.where(view_as_batch(fooled, point), point, best[s.index]))
            s.write(success, success[s.index] | fooled)

        core.loop(state, self.steps, *self._iteration(core, record))
        # Samples still correct after the last step: one forward decides whether that step fooled them.
        if len(state) > 0:
            record(state, core.fooled(core.forward(state.x + state.delta), state.index))
        result = (
            core.project_into_budget(best, success, eps_t, self.geometry)
            if eps_t is not None
            else core.result(best, success, self.geometry.measure)
        )
        # extra["last_iterate"]: every sample's last iterate (its first fooling point where it was fooled), in the box,
        # before any ε projection. advtrain.maximizers.TRLinf trains the samples left unfooled on it.
        last = best.clone()
        if len(state) > 0:
            state.write(last, (state.x + state.delta).clamp(0.0, 1.0))
        result.extra["last_iterate"] = last.to(result.adv.dtype)
        return result

    def _iteration(self, core: AttackCore, record: Callable[[_TRState, Tensor], None]):
        """The two halves of a TR iteration on the loop contract: ``evaluate`` (the margin and its gradient at the
        current iterate, the first fooling points, the adaptive radius and, for order 2, the model's step, whose
        Hessian-vector products need this iterate's graph) and ``advance`` (the step and its predicted change)."""
        low, high = self.radius_bounds
        second = self.order == 2
        first_order = core.step(_first_order_delta)

        def evaluate(k: int, s: _TRState) -> Tensor:
            margin = lambda z: _margin(z, s.y, s.target)  # noqa: E731
            logits, phi, grad, leaf = core.value_and_grad(s.delta, lambda d: s.x + d, margin, create_graph=second)
            fooled = core.fooled(logits, s.index)
            record(s, fooled)
            if self.adaptive and s.prev_phi is not None:
                ratio = torch.where(s.predicted > _TINY, (phi - s.prev_phi) / s.predicted.clamp_min(_TINY), 0.0)
                r = s.radius
                r = torch.where(ratio > self.sigma1, r * self.eta, torch.where(ratio < self.sigma2, r / self.eta, r))
                s.radius = r.clamp(low, high)
            s.phi, s.grad = phi, grad.detach()
            if second:
                self._model_step(core, s, grad, leaf, ~fooled if s.active is None else s.active & ~fooled)
            return fooled

        def advance(k: int, s: _TRState) -> None:
            if second:
                step, hessian_step = s.step, s.hessian_step
            else:
                step, hessian_step = first_order(self.geometry, s.phi, s.grad, s.radius), None
            with torch.no_grad():
                base = s.delta
                new_delta = clip_to_box(s.x, base + step)
                moved = new_delta - base
                predicted = (s.grad * moved).flatten(1).sum(1)
                if hessian_step is not None:
                    predicted = predicted + 0.5 * (moved * hessian_step).flatten(1).sum(1)
            s.prev_phi, s.predicted, s.delta = s.phi, predicted, new_delta

        return evaluate, advance

    def _model_step(self, core: AttackCore, s: _TRState, graph_grad: Tensor, leaf: Tensor, going: Tensor) -> None:
        """Order 2: the quadratic model's step (``s.step``, ``s.hessian_step``) of the samples ``going`` (those this
        iterate did not fool; zeros elsewhere), from Hessian-vector products by double backward through the
        gradient ``graph_grad`` of every row of ``s`` with respect to ``leaf``."""
        rows = going.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        product = hessian_vector_product(graph_grad, leaf, rows)

        def hvp(v: Tensor) -> Tensor:
            core.counter.backward(len(s))  # the double backward runs over every active row of the graph
            return product(v)

        solver = _steihaug_step if self.solver == "steihaug" else _krylov_step
        step = solver(self.geometry, s.phi[rows], s.grad[rows], s.radius[rows], hvp, self._subspace_dim)
        s.step = torch.zeros_like(s.grad).index_copy_(0, rows, step.delta)
        s.hessian_step = torch.zeros_like(s.grad).index_copy_(0, rows, step.hessian_delta)
