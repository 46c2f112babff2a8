"""Square attack: a score-based black-box attack by random search with square-shaped updates.

Reference:
    Andriushchenko, Croce, Flammarion and Hein, *Square Attack: a query-efficient black-box adversarial attack via
    random search*, ECCV 2020 (Algorithm 1; Algorithm 2 and Sec. 3.1 for L∞; Algorithm 3, Eq. (5) and Sec. 3.2 for L2).
    Croce & Hein, *Mind the box: l1-APGD for sparse adversarial attacks on image classifiers*, ICML 2021 (the L1
    version).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.core import AttackCore
from advtrain.engine.losses import margin_loss
from advtrain.engine.result import AttackResult
from advtrain.engine.state import SampleState
from advtrain.engine.tracking import MaxLossTracker
from advtrain.threat.geometry import geometry_for
from advtrain.threat.norms import Norm, clip_to_box, flat_norm, view_as_batch

_PAPER = (
    "Andriushchenko et al., Square Attack: a query-efficient black-box adversarial attack via random search, ECCV 2020"
)
_TINY = 1e-12
# Iterations (of a 10,000-query run) after which the fraction p of pixels changed per update is halved (Sec. 4).
_HALVING_POINTS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def centre_pattern(rows: int, cols: int, device=None) -> Tensor:
    """The L2 update pattern of Eq. (5): nested concentric rectangles around the centre, ring k adding 1/(k+1)².

    A pixel at Chebyshev distance d from the centre lies inside every ring k ≥ d, so its value is
    Σ_{k=d}^{n−1} 1/(k+1)² with n = max(⌈rows/2⌉, ⌈cols/2⌉): largest at the centre, decaying towards the border.
    """
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, device=device)
    n = max((rows + 1) // 2, (cols + 1) // 2)
    ring = torch.maximum(
        (torch.arange(rows, device=device) - rows // 2).abs()[:, None],
        (torch.arange(cols, device=device) - cols // 2).abs()[None, :],
    )
    weights = 1.0 / torch.arange(1, n + 1, device=device, dtype=torch.float32) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k ≥ d} 1/(k+1)²
    return tail[ring.clamp_max(n - 1)]


def square_pattern(side: int, transpose: bool, device=None) -> Tensor:
    """η* of Algorithm 3: a side × side window whose halves carry the centre pattern with opposite signs, optionally
    transposed, normalised to unit L2 norm."""
    left = side // 2
    eta = torch.cat([centre_pattern(side, left, device), -centre_pattern(side, side - left, device)], dim=1)
    if transpose:
        eta = eta.T
    return eta / eta.norm().clamp_min(_TINY)


@dataclass(eq=False)
class _SquareState(SampleState):
    """Per-sample state of a Square run (the samples still under attack, or, masked, all with a mask)."""

    x: Tensor
    eps: Tensor
    delta: Tensor  # the accepted perturbation
    candidate: Tensor  # the perturbation queried next
    loss: Tensor  # the margin loss of delta (+inf before the first query)


class _Draws:
    """The random integers of a run's updates, one row per row of ``state``, from the call's generator. In the
    masked mode the active rows get exactly what shrinking draws (see :meth:`SampleState.randint`)."""

    def __init__(self, state: SampleState, generator: torch.Generator | None) -> None:
        self.state, self.generator = state, generator

    def ints(self, high: int, *shape: int) -> Tensor:
        """Uniform integers in [0, high), shape (rows, *shape)."""
        return self.state.randint(high, *shape, generator=self.generator)

    def signs(self, *shape: int) -> Tensor:
        """Random ±1 (float), shape (rows, *shape)."""
        return self.ints(2, *shape).float() * 2.0 - 1.0

    def flag(self) -> bool:
        """One fair coin for the whole batch (a host read)."""
        return bool(torch.randint(0, 2, (1,), device=self.state.index.device, generator=self.generator))


@register_attack(
    AttackSpec("square", AttackKind.BUDGETED, ("linf", "l2", "l1"), targeted=True, stochastic=True, paper=_PAPER,
               role="black_box")
)  # fmt: skip
class Square(Attack):
    """Square attack (Andriushchenko et al. 2020): gradient-free random search on the margin loss.

    The only access to the model is its output scores, so the attack is blind to gradient masking: a model that
    resists gradient attacks but not this one masks its gradients (Athalye et al. 2018's "black-box beats
    white-box" warning sign). Per sample, with the margin loss L = z_y − max_{j≠y} z_j (targeted: max_{j≠t} z_j − z_t),
    lower is better and the sample is fooled once the prediction changes:

    * **Initialisation.** L∞: vertical stripes, every (channel, column) of δ set to ±ε at random. L2: a grid of
      tiles of side ⌊w/5⌋ each holding the centre pattern of Eq. (5) with a random sign per channel, scaled to
      ‖δ‖₂ = ε. Then x + δ is clipped to [0, 1].
    * **Iteration i.** A square window of side h(i) = round(√(p(i)·h·w)) at a uniformly random position; p(i)
      starts at ``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (the
      paper's schedule for 10,000 queries; AutoAttack keeps these points for its 5,000 queries, and so does this
      attack by default; ``rescale_schedule=True`` stretches them to ``steps`` instead). L∞ (Algorithm 2): every
      channel of the window is set to ±ε, one random sign per channel. L2 (Algorithm 3): a second window W2 is
      drawn; per channel, the mass of δ on W1 ∪ W2 plus an equal share of the unused budget ε² − ‖δ‖² is moved
      onto W1, along ±η* plus W1's current content (normalised), and W2 is zeroed, so ‖δ‖₂ = ε after every update
      (before box clipping). The candidate is clipped to [0, 1] and accepted if it lowers the margin loss (or
      fools the model).
    * **Early stopping per sample**: a fooled sample stops costing queries; restarts re-attack, from a fresh
      initialisation, only the samples still standing.

    Deviations from the paper: a candidate whose window does not change after box clipping is not resampled (it
    simply costs a query); the L2 window side is at least 2 so that both halves of η* exist. Differences from the
    reference code (AutoAttack's ``square.py``): the window position and the signs are drawn per sample (it draws one
    window per batch); the corner is uniform on {0, …, w − h} as in Algorithm 2 (it draws from {0, …, w − h − 1}, so
    its windows never reach the last row and column).

    L1 (Croce & Hein 2021's version for l1-AutoAttack) has its own initialisation and update, with windows of odd side
    ≥ 3 and the exact projection onto ℓ1 ball ∩ box: see :meth:`_l1_init` and :meth:`_l1_update`.

    Cost: one forward pass per active sample per iteration (plus the initial one), no backward pass.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (see :meth:`_l1_update`).
        eps: budget (a per-call ``eps`` tensor of shape (B,) overrides it).
        steps: random-search iterations (queries after the initial one) per restart; AutoAttack uses 5000.
        p_init: initial fraction of pixels changed per update (0.8 in AutoAttack; the paper uses 0.05 on ImageNet).
        rescale_schedule: place the halving points at the same fractions of ``steps`` as of 10,000 (the reference
            code's option); ``False`` (AutoAttack's setting) keeps them at their iteration numbers.
        restarts: independent runs; later runs only attack samples not yet fooled.
        targeted: ``labels`` are targets to reach.
        options: ``autocast``, ``compile`` (the ``torch.compile``-d box clipping of the candidates), ``mode``,
            ``seed``, shared by every attack (see :class:`Attack`).

    Example:
        >>> attack = Square(norm="linf", eps=8 / 255, steps=1000, seed=0)  # doctest: +SKIP
        >>> result = attack(model, images, labels)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2", "l1"] = "linf",
        eps: float = 8 / 255,
        steps: int = 5000,
        p_init: float = 0.8,
        rescale_schedule: bool = False,
        restarts: int = 1,
        targeted: bool = False,
        **options,
    ) -> None:
        super().__init__(**options)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}.")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must lie in (0, 1], got {p_init}.")
        self.geometry = geometry_for(norm)
        self.norm = self.geometry.norm.value
        self.eps = float(eps)
        self.steps = int(steps)
        self.p_init = float(p_init)
        self.rescale_schedule = bool(rescale_schedule)
        self.restarts = int(restarts)
        self.targeted = bool(targeted)

    def side(self, i: int, height: int, width: int) -> int:
        """Window side h(i) at iteration ``i``: round(√(p(i)·h·w)), clamped to the image."""
        scaled = int(i / self.steps * 10000) if self.rescale_schedule else i
        p = self.p_init / 2 ** sum(scaled > point for point in _HALVING_POINTS)
        smallest = 2 if self.geometry.norm is Norm.L2 else 1
        return max(min(round((p * height * width) ** 0.5), height, width), min(smallest, height, width))

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        core = self.core(model, inputs, labels)
        if core.x.ndim != 4:
            raise ValueError(f"Square attack needs image batches of shape (B, C, H, W), got {tuple(inputs.shape)}.")
        eps_t = self.budget(eps, core.x)
        # Per sample a fooling point, else the lowest margin loss over the restarts: the tracker maximises −loss.
        tracker = MaxLossTracker(core.x)
        for _ in range(self.restarts):
            idx = (~tracker.success).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            self._single_run(core, tracker, idx, eps_t[idx], generator)
        return core.result(core.x32 + tracker.best_delta, tracker.success, self.geometry.measure)

    def _single_run(
        self, core: AttackCore, tracker: MaxLossTracker, idx: Tensor, eps: Tensor, generator: torch.Generator | None
    ) -> None:
        """One run on the samples ``idx``: the initial query, then ``steps`` candidates, each queried and accepted
        if it lowers the margin loss (or fools). Iteration 0 of the loop queries the initialisation; iteration k > 0
        the candidate drawn after iteration k − 1."""
        clip = core.step(clip_to_box)
        xs = core.x32[idx]
        delta = clip(xs, self._init(xs, eps, generator))
        state = core.start(_SquareState, idx, x=xs, eps=eps, delta=delta, candidate=delta,
                           loss=torch.full_like(eps, float("inf")))  # fmt: skip
        draws, (height, width) = _Draws(state, generator), xs.shape[-2:]
        update = {Norm.LINF: self._linf_update, Norm.L2: self._l2_update, Norm.L1: self._l1_update}[self.geometry.norm]

        def evaluate(k: int, s: _SquareState) -> Tensor:
            loss, fooled = self._query(core, s.x + s.candidate, s.index)
            accept = torch.ones_like(fooled) if k == 0 else (loss < s.loss) | fooled
            s.delta = torch.where(view_as_batch(accept, s.candidate), s.candidate, s.delta)
            s.loss = torch.where(accept, loss, s.loss)
            # The initial points all compete for the best point; later only the fooling ones (the rest is scored
            # at the end of the run: the loss only falls within a run).
            offered = -s.loss if k == 0 else torch.where(fooled, -s.loss, float("-inf"))
            tracker.offer(s, s.delta, offered, fooled)
            return fooled

        def advance(k: int, s: _SquareState) -> None:
            if k < self.steps:
                s.candidate = clip(s.x, update(s, self.side(k, height, width), draws))

        core.loop(state, self.steps + 1, evaluate, advance)
        if len(state):
            tracker.offer(state, state.delta, -state.loss, torch.zeros_like(state.loss, dtype=torch.bool))

    def _query(self, core: AttackCore, points: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Margin loss to lower (z_y − max_{j≠y} z_j; targeted: max_{j≠t} z_j − z_t) and success, one forward each."""
        logits = core.forward(points)
        margin = margin_loss(logits, core.y[index])
        return (margin if self.targeted else -margin), core.fooled(logits, index)

    def _init(self, xs: Tensor, eps: Tensor, generator) -> Tensor:
        if self.geometry.norm is Norm.L1:
            return self._l1_init(xs, eps, generator)
        n, channels, height, width = xs.shape
        if self.geometry.norm is Norm.LINF:
            signs = self._signs((n, channels, 1, width), xs.device, generator)
            return signs.expand(n, channels, height, width) * view_as_batch(eps, xs)
        tile = max(height // 5, 1)
        pattern = centre_pattern(tile, tile, xs.device)
        rows, cols = -(-height // tile), -(-width // tile)
        signs = self._signs((n, channels, rows, cols), xs.device, generator)
        delta = torch.kron(signs, pattern)[..., :height, :width]
        delta = delta / view_as_batch(flat_norm(delta, 2.0).clamp_min(_TINY), delta)
        return delta * view_as_batch(eps, delta)

    @staticmethod
    def _signs(shape, device, generator) -> Tensor:
        return torch.randint(0, 2, shape, device=device, generator=generator).float() * 2.0 - 1.0

    @staticmethod
    def _window(draws: _Draws, h: int, height: int, width: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample random h × h windows: their (n, 1, H, W) mask and top-left corners."""
        r = draws.ints(height - h + 1)
        s = draws.ints(width - h + 1)
        rows = torch.arange(height, device=device)[None]
        cols = torch.arange(width, device=device)[None]
        in_r = (rows >= r[:, None]) & (rows < r[:, None] + h)
        in_c = (cols >= s[:, None]) & (cols < s[:, None] + h)
        return (in_r[:, :, None] & in_c[:, None, :])[:, None], r, s

    def _linf_update(self, state: _SquareState, h: int, draws: _Draws) -> Tensor:
        delta, eps = state.delta, state.eps
        n, channels, height, width = delta.shape
        mask, _, _ = self._window(draws, h, height, width, delta.device)
        values = draws.signs(channels, 1, 1) * view_as_batch(eps, delta)
        return torch.where(mask, values, delta)

    def _l2_update(self, state: _SquareState, h: int, draws: _Draws) -> Tensor:
        delta, eps = state.delta, state.eps
        n, channels, height, width = delta.shape
        device = delta.device
        w1, r, s = self._window(draws, h, height, width, device)
        w2, _, _ = self._window(draws, h, height, width, device)
        transpose = draws.flag()
        eta = square_pattern(h, transpose, device)
        # η* placed at each sample's W1, times a random sign per channel.
        canvas = torch.zeros(n, height, width, device=device)
        span = torch.arange(h, device=device)
        canvas[torch.arange(n, device=device)[:, None, None], (r[:, None] + span)[:, :, None],
               (s[:, None] + span)[:, None, :]] = eta  # fmt: skip
        rho = draws.signs(channels, 1, 1)
        unused = (eps**2 - flat_norm(delta, 2.0) ** 2).clamp_min(0.0)
        union = w1 | w2
        per_channel = lambda t: t.flatten(2).norm(dim=2)[..., None, None]  # noqa: E731 - (n, C, 1, 1) norms
        on_w1 = delta * w1
        direction = rho * canvas[:, None] + on_w1 / per_channel(on_w1).clamp_min(_TINY)
        available = (per_channel(delta * union) ** 2 + view_as_batch(unused, delta) / channels).sqrt()
        moved = direction / per_channel(direction).clamp_min(_TINY) * available
        return torch.where(union, torch.where(w1, moved, torch.zeros_like(delta)), delta)

    # --- L1 (Croce & Hein 2021, Sec. 5: the Square Attack adapted to ℓ1 ∩ box for l1-AutoAttack) --------------------

    def _l1_init(self, xs: Tensor, eps: Tensor, generator) -> Tensor:
        """L1 start: tiles of side ⌊h/5⌋ from the offset ⌊(h − 5⌊h/5⌋)/2⌋, each the ℓ1 pattern
        (:func:`l1_square_pattern`) with a random sign per (tile, channel), projected exactly onto ℓ1 ball ∩ box
        (AutoAttack's L1 init)."""
        n, channels, height, width = xs.shape
        tile = max(height // 5, 1)
        offset = (height - 5 * tile) // 2
        rows = torch.arange(height, device=xs.device) - offset
        cols = torch.arange(width, device=xs.device) - offset
        inside = ((rows >= 0) & (rows < (height // tile) * tile))[:, None] & (
            (cols >= 0) & (cols < (width // tile) * tile)
        )
        pattern = l1_square_pattern(tile, False, xs.device)
        values = pattern[rows.remainder(tile)[:, None], cols.remainder(tile)[None, :]]
        signs = self._signs((n, channels, height // tile, width // tile), xs.device, generator)
        tile_r = rows.div(tile, rounding_mode="floor").clamp(0, height // tile - 1)
        tile_c = cols.div(tile, rounding_mode="floor").clamp(0, width // tile - 1)
        delta = signs[:, :, tile_r[:, None], tile_c[None, :]] * torch.where(inside, values, torch.zeros_like(values))
        return self.geometry.project_ball_box(xs, delta, eps)

    def _l1_update(self, state: _SquareState, h: int, draws: _Draws) -> Tensor:
        """The L1 update (Croce & Hein 2021; details from AutoAttack's ``square.py``): an odd window side of at least 3;
        windows W1 and W2; per channel, δ on W1 becomes ±η_ℓ1 (:func:`l1_square_pattern`, random sign per channel) plus
        W1's current content (each of unit ℓ1 norm), rescaled to the channel's ℓ1 mass on W1 ∪ W2 plus its share of the
        unused budget, times the number of channels as AutoAttack's code has it; W2 is zeroed; then the exact projection
        onto ℓ1 ball ∩ box (the over-full window is shrunk back with everything else). AutoAttack projects onto the ball
        of radius ε·(1 − 10⁻⁶); here onto ε, which the projection meets up to float rounding."""
        x, delta, eps = state.x, state.delta, state.eps
        n, channels, height, width = delta.shape
        device = delta.device
        side = max(h, 3)
        side = min(side + 1 if side % 2 == 0 else side, height, width)
        w1, r, s = self._window(draws, side, height, width, device)
        w2, _, _ = self._window(draws, side, height, width, device)
        transpose = draws.flag()
        canvas = torch.zeros(n, height, width, device=device)
        span = torch.arange(side, device=device)
        canvas[torch.arange(n, device=device)[:, None, None], (r[:, None] + span)[:, :, None],
               (s[:, None] + span)[:, None, :]] = l1_square_pattern(side, transpose, device)  # fmt: skip
        rho = draws.signs(channels, 1, 1)
        l1 = lambda t: t.abs().flatten(2).sum(dim=2)[..., None, None]  # noqa: E731 - (n, C, 1, 1) per-channel ℓ1
        on_w1 = delta * w1
        direction = rho * canvas[:, None] + on_w1 / (l1(on_w1) + _TINY)
        unused = (eps - flat_norm(delta, 1.0)).clamp_min(0.0)
        mass = (view_as_batch(unused, delta) / channels + l1(delta * (w1 | w2))) * channels
        moved = direction / (l1(direction) + _TINY) * mass
        candidate = torch.where(w1 | w2, torch.where(w1, moved, torch.zeros_like(delta)), delta)
        return self.geometry.project_ball_box(x, candidate, eps)


def l1_square_pattern(side: int, transpose: bool, device=None) -> Tensor:
    """η of the L1 Square Attack (AutoAttack's ``eta`` for L1): the top ⌊side/2⌋ rows and the other rows carry
    concentric rectangles around their centres, ring k adding 1/(k+1)⁴ (sharper than L2's 1/(k+1)²), with opposite
    signs; optionally transposed; unit ℓ1 norm."""

    def rings(rows: int, cols: int) -> Tensor:
        if rows == 0 or cols == 0:
            return torch.zeros(rows, cols, device=device)
        count = max(rows // 2 + 1, cols // 2 + 1)
        ring = torch.maximum(
            (torch.arange(rows, device=device) - rows // 2).abs()[:, None],
            (torch.arange(cols, device=device) - cols // 2).abs()[None, :],
        )
        weights = 1.0 / torch.arange(1, count + 1, device=device, dtype=torch.float32) ** 4
        return weights.flip(0).cumsum(0).flip(0)[ring.clamp_max(count - 1)]

    eta = torch.cat([rings(side // 2, side), -rings(side - side // 2, side)], dim=0)
    if transpose:
        eta = eta.T
    return eta / eta.abs().sum().clamp_min(_TINY)
