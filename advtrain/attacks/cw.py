"""Carlini–Wagner L2: Adam in tanh space on ‖δ‖₂² + c·f(x + δ), with a per-sample binary search on c.

References:
    Carlini and Wagner, *Towards Evaluating the Robustness of Neural Networks*, IEEE S&P 2017 (seed 003, the L2
    attack; seed 001, Section 2 and Table 1 for the 9×10 000, 4×25 and 1×100 budgets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.core import AttackCore
from advtrain.engine.losses import is_fooled, margin_loss
from advtrain.engine.result import AttackResult
from advtrain.engine.search import ConstantSearch
from advtrain.engine.state import SampleState, shared
from advtrain.engine.tracking import MinimalNormTracker
from advtrain.threat.geometry import geometry_for

_PAPER = "Carlini and Wagner, Towards Evaluating the Robustness of Neural Networks, IEEE S&P 2017"
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8  # Adam's defaults, as in the reference code
_TANH_SHRINK = 1 - 1e-6  # keeps arctanh finite at pixels equal to 0 or 1 (reference code: 0.999999)
_NO_UPPER = 1e10  # "no successful c yet" (reference code)


def _adam_step(modifier: Tensor, grad: Tensor, m: Tensor, v: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam descent step on w, with ``scalars`` = (lr·√bc2/bc1, ε·√bc2) (bias corrections folded in);
    returns the new modifier and moments. One fusible unit (see :meth:`AttackCore.step`)."""
    m = torch.lerp(grad, m, _BETA1)  # β1·m + (1 − β1)·g
    v = torch.lerp(grad * grad, v, _BETA2)  # β2·v + (1 − β2)·g²
    return modifier - scalars[0] * (m / v.sqrt().add_(scalars[1])), m, v


@dataclass(eq=False)
class _CWState(SampleState):
    w: Tensor  # arctanh((2x − 1)·0.999999): x' = (tanh(w + modifier) + 1) / 2
    x: Tensor
    y: Tensor
    c: Tensor
    modifier: Tensor
    m: Tensor  # Adam's moments
    v: Tensor
    grad: Tensor | None = None
    found: Tensor = shared()  # (B,) success during this search step, the search on c's verdict
    stall: Tensor = shared()  # the loss summed over the search step at the last abort check


class _TanhPoint:
    """x' = (tanh(w + modifier) + 1) / 2 for the rows of a :class:`_CWState`; keeps the last point and its squared L2
    distance to x (the loss's distance term, on the graph)."""

    def __init__(self, s: _CWState) -> None:
        self.s = s

    def __call__(self, modifier: Tensor) -> Tensor:
        adv = (torch.tanh(self.s.w + modifier) + 1.0) * 0.5
        self.l2_sq = (adv - self.s.x).flatten(1).square().sum(1)  # (a norm's backward costs a masked fill)
        self.adv = adv.detach()
        return adv


@register_attack(AttackSpec("cw_l2", AttackKind.MINIMAL, ("l2",), targeted=True, stochastic=False, paper=_PAPER))
class CarliniWagnerL2(Attack):
    """Carlini–Wagner L2 attack (Carlini and Wagner 2017), batched, with a per-sample active set.

    The adversarial point is x' = (tanh(w) + 1) / 2, which keeps it in the [0, 1] box, with w initialised at
    arctanh((2x − 1)·0.999999). For each search step, Adam (learning rate ``step_size``) minimises over w

        ‖x' − x‖₂² + c · max(z_y(x') − max_{j≠y} z_j(x') + κ, 0)        (untargeted, y the label)
        ‖x' − x‖₂² + c · max(max_{j≠t} z_j(x') − z_t(x') + κ, 0)        (targeted, t the target)

    for ``steps`` iterations, with z the logits and κ = ``confidence``; max(m + κ, 0) is the seed's max(m, −κ)
    shifted by the constant κ. Every iterate is checked (with the κ-adjusted decision: the label's logit raised,
    or the target's lowered, by κ), and the successful point of smallest L2 norm over all search steps is kept per
    sample. The constant c starts at ``initial_const`` and is searched per sample: ×10 until a search step
    succeeds, then bisection between the largest failing and the smallest succeeding value. With 10 or more
    search steps the last one reruns at the smallest succeeding c, as in the reference code.

    Early abort (``abort_early``, the reference rule): every ``max(1, steps // 10)`` iterations the loss summed over
    the samples of the search step is compared with its value at the previous check; if it has not decreased by
    at least 0.01% (loss > 0.9999 · previous), the search step ends for all of them. A per-sample version of this
    test (tried in an earlier version) is weaker at small budgets: it compares losses only a few iterations apart
    and fires on the rise that follows a boundary crossing, when Adam's momentum carries w past the boundary, so a
    sample ends with the large norm it had at the crossing (4×25: median L2 +17% against adv-lib).

    Active set: samples are independent and Adam's moments are element-wise, with one step count (hence one bias
    correction) for every sample of a search step, so a sample leaving the batch (stalled, or done under a budget)
    simply has its rows dropped from w and from both moment tensors; the remaining samples follow exactly the
    trajectory they would follow in the full batch. Each iteration costs one forward and one backward pass of the
    samples still active; the iterate after the last Adam step of a search step is not evaluated (as in the
    reference code). With ``eps`` set, samples that succeed within the budget leave the batch at once.

    Deviations from the paper and its reference code: the distance is measured to
    the clean input x itself rather than to tanh(arctanh((2x − 1)·0.999999)) (a difference below 1e-6 per pixel);
    Adam adds its ε to the bias-corrected √v (PyTorch's form) rather than TensorFlow's ε̂ form.

    Args:
        targeted: ``labels`` are targets to reach.
        confidence: κ, the margin by which the decision must be changed.
        step_size: Adam's learning rate on w (``lr`` in the paper's code).
        binary_search_steps: number of search steps on c.
        steps: Adam iterations per search step (so ``binary_search_steps=4, steps=25`` is the 4×25 budget of Rony
            et al. 2019 and ``binary_search_steps=1, steps=100`` the 1×100 one).
        initial_const: the first value of c.
        abort_early: end a search step when its loss stalls (see above).
        eps: optional L2 budget; when set, success means a point with norm ≤ ε, and a sample stops (across search
            steps) as soon as one is found. A per-call ``eps`` (scalar or (B,)) overrides it.
        options: ``autocast``, ``compile``, ``mode``, ``seed``, shared by every attack (see :class:`Attack`; the
            attack is deterministic, the seed is unused).

    Example:
        >>> # Rony et al.'s 4×25 budget, with the step size and c0 that suit it on MNIST:
        >>> attack = CarliniWagnerL2(
        ...     binary_search_steps=4, steps=25, step_size=0.5, initial_const=1.0, abort_early=False
        ... )
        >>> result = attack(model, images, labels)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        targeted: bool = False,
        confidence: float = 0.0,
        step_size: float = 0.01,
        binary_search_steps: int = 9,
        steps: int = 10000,
        initial_const: float = 1e-3,
        abort_early: bool = True,
        eps: float | None = None,
        **options,
    ) -> None:
        super().__init__(**options)
        if steps < 1 or binary_search_steps < 1:
            raise ValueError(f"steps and binary_search_steps must be >= 1, got {steps} and {binary_search_steps}.")
        if step_size <= 0 or initial_const <= 0:
            raise ValueError(f"step_size and initial_const must be > 0, got {step_size} and {initial_const}.")
        if confidence < 0:
            raise ValueError(f"confidence must be >= 0, got {confidence}.")
        self.norm = "l2"
        self.targeted = bool(targeted)
        self.confidence = float(confidence)
        self.step_size = float(step_size)
        self.binary_search_steps = int(binary_search_steps)
        self.steps = int(steps)
        self.initial_const = float(initial_const)
        self.abort_early = bool(abort_early)
        self.eps = self.optional_eps(eps)

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        core = self.core(model, inputs, labels)
        batch, device, x32 = core.batch, core.device, core.x32
        budget_t = self.budget(eps, inputs)
        w0 = torch.atanh((2.0 * x32 - 1.0) * _TANH_SHRINK)
        search = ConstantSearch(torch.full((batch,), self.initial_const, device=device), growth=10.0,
                                no_upper=_NO_UPPER)  # fmt: skip
        tracker = MinimalNormTracker(core.x)
        evaluate, advance = self._iteration(core, tracker, budget_t)
        searching = torch.arange(batch, device=device)  # samples still in the search (all, unless budgeted)
        for search_step in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and search_step == self.binary_search_steps - 1:
                search.const = search.upper.clone()
            if searching.numel() == 0:
                break
            zeros = torch.zeros_like(x32[searching])
            state = core.start(
                _CWState, searching, w=w0[searching], x=x32[searching], y=core.y[searching],
                c=search.const[searching], modifier=zeros, m=zeros.clone(), v=zeros.clone(),
                found=torch.zeros(batch, dtype=torch.bool, device=device), stall=torch.tensor(math.inf, device=device),
            )  # fmt: skip
            core.loop(state, self.steps, evaluate, advance)
            # The search on c follows the decision alone (a success beyond the budget must lower c).
            search.update(state.found[searching], searching)
            if budget_t is not None:
                searching = searching[~tracker.success[searching]]
        return core.result(tracker.best_adv, tracker.success.clone(), geometry_for("l2").measure)

    def _iteration(self, core: AttackCore, tracker: MinimalNormTracker, budget_t: Tensor | None):
        """The two halves of an Adam iteration on the loop contract: ``evaluate`` (the loss, its gradient, the
        decision, the tracking, the early abort) and ``advance`` (the Adam step)."""
        # Untargeted: f = max(z_y − max_{j≠y} z_j + κ, 0) = max(−margin + κ, 0); targeted: max(margin + κ, 0).
        sign = 1.0 if self.targeted else -1.0
        kappa = self.confidence
        check_every = max(1, self.steps // 10)
        adam = core.step(_adam_step)
        # Adam's bias corrections fold into two scalars per iteration: m̂ / (√v̂ + ε) = √bc2 · m / (√v + ε√bc2).
        root_bc2 = [math.sqrt(1 - _BETA2 ** (i + 1)) for i in range(self.steps)]
        adam_scalars = torch.tensor(
            [[self.step_size * r / (1 - _BETA1 ** (i + 1)), _ADAM_EPS * r] for i, r in enumerate(root_bc2)],
            device=core.device,
        )

        def evaluate(i: int, s: _CWState) -> Tensor | None:
            point = _TanhPoint(s)
            objective = lambda z: point.l2_sq + s.c * (sign * margin_loss(z, s.y) + kappa).clamp_min(0.0)  # noqa: E731
            logits, loss, s.grad, _ = core.value_and_grad(s.modifier, point, objective)
            l2 = point.l2_sq.detach().sqrt()
            decided = self._decided(logits, s.y, sign, kappa)
            s.write(s.found, s.found[s.index] | decided)
            success = decided if budget_t is None else decided & (l2 <= budget_t[s.index])
            tracker.offer(s, point.adv, l2, success)
            if self.abort_early and i % check_every == 0:
                total = (loss[s.active] if s.masked else loss).sum()
                if bool(total > s.stall * 0.9999):  # the reference rule, on the whole search step
                    return torch.ones_like(decided)
                s.stall = total
            return None if budget_t is None else tracker.success[s.index]

        def advance(i: int, s: _CWState) -> None:
            s.modifier, s.m, s.v = adam(s.modifier, s.grad, s.m, s.v, adam_scalars[i])
            s.grad = None

        return evaluate, advance

    @staticmethod
    def _decided(logits: Tensor, labels: Tensor, sign: float, kappa: float) -> Tensor:
        """The reference code's success test: the decision changes even with the label's logit raised by κ
        (untargeted), or reaches the target even with the target's logit lowered by κ (targeted)."""
        targeted = sign > 0
        if kappa == 0.0:
            return is_fooled(logits, labels, targeted)
        shifted = logits.scatter_add(1, labels[:, None], torch.full_like(logits[:, :1], -sign * kappa))
        return is_fooled(shifted, labels, targeted)
