"""Auto-PGD (APGD-CE, APGD-DLR and a targeted variant): PGD with momentum and a checkpointed step-size schedule.

Reference:
    Croce & Hein, *Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks*, ICML 2020 (Algorithm 1, Sec. 3.1-3.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import AttackKind, AttackSpec, register_attack
from advtrain.engine.core import ActiveSet, AttackCore
from advtrain.engine.losses import cross_entropy, dlr_loss
from advtrain.engine.modes import attack_context
from advtrain.engine.result import AttackResult
from advtrain.errors import InvalidInputError
from advtrain.threat.geometry import Geometry, geometry_for
from advtrain.threat.norms import view_as_batch

_PAPER = (
    "Croce & Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free "
    "attacks, ICML 2020"
)


def targeted_dlr_loss(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Targeted DLR loss of Croce & Hein (2020): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12).

    Ascending it raises the target logit over the label's. Needs at least 4 classes.
    """
    logits = logits.float()
    top = logits.topk(4, dim=1).values
    gap = logits.gather(1, labels[:, None]).squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)
    return -gap / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def halving_condition(
    raises: Tensor, window: int, rho: float, reduced_last: Tensor, best_loss: Tensor, best_loss_last: Tensor
) -> Tensor:
    """Which samples halve their step size at a checkpoint (Croce & Hein 2020, Sec. 3.2).

    Args:
        raises: per sample, how many of the ``window`` steps since the last checkpoint raised the loss.
        window: w_j − w_{j−1}.
        rho: ρ.
        reduced_last: whether the sample halved at the last checkpoint.
        best_loss: f_max now.
        best_loss_last: f_max at the last checkpoint.

    Returns:
        Condition 1 (fewer than ρ·window raising steps) or condition 2 (no halving last time and f_max unchanged).
    """
    return (raises < rho * window) | (~reduced_last & (best_loss <= best_loss_last))


def _momentum_step(
    geometry: Geometry, x: Tensor, delta: Tensor, prev: Tensor, grad: Tensor, eta: Tensor, eps: Tensor, a: Tensor
) -> Tensor:
    """APGD's step: z = Π(δ + η·u(∇)), then δ ← Π(δ + a·(z − δ) + (1 − a)·(δ − δ_prev)), Π onto ball ∩ box.
    One fusible unit (see :meth:`~advtrain.engine.core.AttackCore.step`)."""
    z = geometry.project_ball_box(x, delta + view_as_batch(eta, delta) * geometry.ascent_direction(grad), eps)
    moved = delta + a * (z - delta) + (1.0 - a) * (delta - prev)
    return geometry.project_ball_box(x, moved, eps)


def _checkpoint_fractions() -> list[float]:
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06), while p_j ≤ 1 (Sec. 3.2)."""
    fractions = [0.0, 0.22]
    while True:
        nxt = fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06)
        if round(nxt, 9) > 1.0:
            return fractions
        fractions.append(nxt)


@register_attack(AttackSpec("apgd", AttackKind.BUDGETED, ("linf", "l2"), targeted=True, stochastic=True, paper=_PAPER))
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020, Algorithm 1): APGD-CE with ``loss="ce"``, APGD-DLR with ``loss="dlr"``.

    From a random start x⁽⁰⁾ in the ball, each iteration takes a projected step along the geometry's steepest
    ascent direction (sign ∇ for L∞, ∇/‖∇‖₂ for L2) and mixes it with the previous move:

        z⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + η⁽ᵏ⁾ u(∇f(x⁽ᵏ⁾))),
        x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α (z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)),

    with α = 1 on the first step, P the projection onto ball ∩ [0, 1] of the core's geometry, and η⁽⁰⁾ = 2ε. At
    the checkpoints w_j = ⌈p_j N⌉ (:meth:`checkpoints`) each sample halves its step size and restarts from its
    best point so far when (1) fewer than ρ·(w_j − w_{j−1}) of the steps since the last checkpoint raised the
    loss, or (2) its step size was not halved at the last checkpoint and its best loss has not improved since.
    Every quantity is per sample (ε may be a (B,) tensor).

    The returned point per sample is the first point that fooled the model or, failing that, the largest-loss
    point seen over all restarts. Restarts re-attack, from fresh random starts, only the samples still standing.

    Deviations from the paper and from AutoAttack's code (``autopgd_base.py``), and why:

    * Early stopping: a sample leaves the batch as soon as it is fooled, so it stops costing passes. AutoAttack
      steps the whole batch to the end, but a sample's outcome is fixed at its first fooling iterate (it is
      counted as non-robust from then on) and every APGD quantity is per sample, so this changes neither robust
      accuracy nor the trajectory of any other sample; it only changes the cost, and which fooling point is
      returned (the first one instead of the last).
    * Checkpoints follow the paper's formula; AutoAttack's code uses the integer approximation
      (0.22N, then shrinking by 0.03N down to 0.06N). For N = 100 both give 22, 41, 57, 70, 80, 87, 93, 99.
    * Condition 1 uses the paper's strict "fewer than ρ·(w_j − w_{j−1})"; AutoAttack's code halves at equality
      too (≤), which only differs when ρ·(w_j − w_{j−1}) is an integer (for N = 100: the 16-step window).
    * Condition 2 is checked at the first checkpoint too (against f(x⁽⁰⁾)), as the paper states; AutoAttack's
      code starts with "reduced at the last checkpoint" set, which disables it there.
    * After a restart from the best point, the next "did the step raise the loss" comparison is made against the
      loss of that best point (the iterate actually stepped from); AutoAttack compares with the loss recorded
      before the restart.
    * Random start: the core's :meth:`Geometry.sample` (uniform in the L∞ cube; random direction times U(0,1)·ε
      for L2), where AutoAttack starts on the sphere of its norm. Both are valid random inits; the step size 2ε
      makes the first step leave the start behind in either case.
    * Targeted (``targeted=True``, ``labels`` are targets): ``loss="ce"`` descends the cross-entropy to the
      target; ``loss="dlr"`` ascends the paper's targeted DLR loss (:func:`targeted_dlr_loss`), whose true
      class y is taken as the model's clean prediction (one extra forward pass), since the attack contract
      passes targets only. For correctly classified inputs this is the true class. AutoAttack's APGD-T loop
      over the top-9 target classes is left to the caller (one call per target).

    Fused calls: :meth:`call_fused` runs several calls of APGDs that differ only in their loss (APGD-CE and
    APGD-DLR) and ε as one call on their concatenated batches, each row ascending its own call's loss, with one
    model call per iteration for all of them; every row ends exactly as in its own call. The result's ``extra``
    holds the per-sample ``"forward_passes"`` and ``"backward_passes"`` (they sum to the call's counts), so that
    the passes of a fused call can be attributed to its parts.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        eps: budget (a per-call ``eps`` tensor of shape (B,) overrides it).
        steps: iterations N (gradient evaluations per restart).
        restarts: random restarts; later ones attack only the samples not yet fooled.
        loss: ``"ce"`` (APGD-CE) or ``"dlr"`` (APGD-DLR; needs ≥ 3 classes, ≥ 4 when targeted).
        rho: ρ, the fraction of loss-raising steps below which the step size is halved.
        alpha: momentum weight α of the new step (1 − α goes to the previous move).
        targeted: ``labels`` are targets to reach.
        autocast, compile, mode, seed: see :class:`Attack`.

    Example:
        >>> attack = APGD(norm="linf", eps=8 / 255, loss="dlr")  # doctest: +SKIP
        >>> robust = ~attack(model, images, labels).success  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        norm: Literal["linf", "l2"] = "linf",
        eps: float = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        loss: Literal["ce", "dlr"] = "ce",
        rho: float = 0.75,
        alpha: float = 0.75,
        targeted: bool = False,
        autocast: Literal["bf16", "fp16"] | None = None,
        compile: bool = False,
        mode: Literal["eval", "train"] = "eval",
        seed: int | None = None,
    ) -> None:
        super().__init__(mode=mode, seed=seed, autocast=autocast, compile=compile)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}.")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        if not 0.0 <= rho <= 1.0 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"rho must lie in [0, 1] and alpha in (0, 1], got rho={rho}, alpha={alpha}.")
        if loss not in ("ce", "dlr"):
            raise ValueError(f"Unknown loss {loss!r} for APGD; allowed values are 'ce', 'dlr'.")
        self.geometry = geometry_for(norm)
        self.norm = self.geometry.norm.value
        self.eps = float(eps)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.loss = loss
        self.rho = float(rho)
        self.alpha = float(alpha)
        self.targeted = bool(targeted)

    @staticmethod
    def checkpoints(steps: int) -> list[int]:
        """The checkpoints w_j = ⌈p_j·steps⌉ of the paper (Sec. 3.2), duplicates removed, starting at w_0 = 0.

        For 100 steps: ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.
        """
        # Rounding before the ceiling keeps float noise (0.41 * 100 = 41.000000000000007) from adding a step.
        points = [math.ceil(round(p * steps, 6)) for p in _checkpoint_fractions()]
        return sorted(set(points))

    def shares_passes_with(self, other: object) -> bool:
        """Whether ``other`` can run in one :meth:`call_fused` with this attack: an APGD with the same configuration
        except, possibly, its loss and its default ``eps`` (a fused call passes every row's ε)."""
        same = ("norm", "steps", "restarts", "rho", "alpha", "targeted", "autocast", "compile", "mode", "seed")
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in same)

    def _check_classes(self, num_classes: int, loss: str) -> None:
        need = 4 if self.targeted else 3
        if loss == "dlr" and num_classes < need:
            raise InvalidInputError(
                f"APGD-DLR{' (targeted)' if self.targeted else ''} needs at least {need} classes (its denominator "
                f"uses the {'3rd' if need == 3 else '4th'} largest logit), but the model has {num_classes}. Use "
                "loss='ce' instead."
            )

    def _loss(self, logits: Tensor, state: ActiveSet, loss: str) -> Tensor:
        """The per-sample loss to ascend for the active samples in ``state``: ``loss`` is ``"ce"``, ``"dlr"``, or
        ``"mixed"`` (each row's own, DLR where ``state["dlr"]``; the other loss gets a zero gradient on that row)."""
        if loss == "mixed":
            return torch.where(state["dlr"], self._loss(logits, state, "dlr"), self._loss(logits, state, "ce"))
        self._check_classes(logits.shape[1], loss)
        if loss == "ce":
            ce = cross_entropy(logits, state["y"])
            return -ce if self.targeted else ce
        if self.targeted:
            return targeted_dlr_loss(logits, state["clean"], state["y"])
        return dlr_loss(logits, state["y"])

    def run(self, model: nn.Module, inputs: Tensor, labels: Tensor, *, eps=None, generator=None) -> AttackResult:
        return self._run(model, inputs, labels, self.budget(eps, inputs), [(self.loss, inputs.shape[0], generator)])

    def call_fused(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        *,
        segments: Sequence[tuple[APGD, int]],
        eps: float | Tensor | None = None,
    ) -> AttackResult:
        """Runs several APGD calls as one: ``inputs`` is their batches concatenated, ``segments`` says, in order,
        whose call each run of rows is (``(attack, rows)``), and ``eps`` (a (B,) tensor) holds every row's budget.

        Each segment ends exactly as ``attack(model, inputs[rows], labels[rows], eps=eps[rows])`` would: its own
        loss, its own generator seeded with the attack's seed (random starts are drawn per segment, in the same
        order), and APGD's per-sample schedule; only the model sees one batch per iteration instead of one per
        segment. That is what lets the evaluation run APGD-CE and APGD-DLR over a grid of ε with one forward and
        one backward pass per iteration (AutoAttack runs them one after another).

        Args:
            model, inputs, labels: as for a call.
            segments: ``(attack, rows)`` per segment; every attack must :meth:`share passes <shares_passes_with>`
                with this one, and the rows must add up to the batch.
            eps: per-row (or common) budget; default: each segment's attack's ``eps``.

        Returns:
            One :class:`AttackResult` for the whole batch; ``extra["forward_passes"]`` and
            ``extra["backward_passes"]`` give each row's passes, so a segment's cost is the sum over its rows.

        Raises:
            ValueError: if a segment's attack is not a compatible APGD or the rows do not cover the batch.
        """
        sizes = [int(rows) for _, rows in segments]
        if sum(sizes) != inputs.shape[0] or min(sizes, default=0) < 0:
            raise ValueError(f"call_fused: the segments' rows {sizes} must be >= 0 and add up to the batch of "
                             f"{inputs.shape[0]}.")  # fmt: skip
        for attack, _ in segments:
            if not self.shares_passes_with(attack):
                raise ValueError(f"call_fused: {attack!r} cannot share passes with {self!r}; only APGDs that differ "
                                 "in loss and eps can.")  # fmt: skip
        if eps is None:
            eps = torch.cat([torch.full((n,), a.eps) for (a, _), n in zip(segments, sizes, strict=True)])
        # Each segment draws from its own generator, seeded as its own call would be.
        parts = [(a.loss, n, a.generator(inputs.device)) for (a, _), n in zip(segments, sizes, strict=True)]
        with attack_context(model, self.mode):
            return self._run(model, inputs, labels, self.budget(eps, inputs), parts)

    def _run(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        eps_t: Tensor,
        segments: Sequence[tuple[str, int, torch.Generator | None]],
    ) -> AttackResult:
        """The attack on a batch of consecutive segments ``(loss, rows, generator)`` (one for a plain call)."""
        core = self.core(model, inputs, labels)
        x, batch, device = core.x, core.batch, core.device
        bounds = torch.tensor([0, *[n for _, n, _ in segments]], device=device).cumsum(0)
        losses = {loss for loss, n, _ in segments if n > 0}
        kind = losses.pop() if len(losses) == 1 else "mixed"
        dlr = torch.cat([torch.full((n,), loss == "dlr", device=device) for loss, n, _ in segments])
        forward_rows = torch.zeros(batch, dtype=torch.long, device=device)
        backward_rows = torch.zeros_like(forward_rows)

        clean_pred = None
        if self.targeted and kind != "ce" and bool(dlr.any()):
            rows = dlr.nonzero().squeeze(1)
            clean_logits = core.forward(x[rows])
            self._check_classes(clean_logits.shape[1], "dlr")
            clean_pred = core.y.clone()  # CE rows never read it
            clean_pred[rows] = clean_logits.argmax(dim=1)
            forward_rows[rows] += 1

        best_delta = torch.zeros_like(x, dtype=torch.float32)
        best_loss = torch.full((batch,), float("-inf"), device=device)
        success = torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(self.restarts):
            idx = (~success).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            # Each segment draws its random starts from its own generator, as its own call would.
            segment = torch.bucketize(idx, bounds[1:], right=True)
            start = torch.cat([
                self.geometry.sample(core.x32[part], eps_t[part], generator)
                for s, (_, _, generator) in enumerate(segments)
                if (part := idx[segment == s]).numel()
            ])  # fmt: skip
            self._single_run(core, clean_pred, eps_t, idx, start, kind, dlr, best_delta, best_loss, success,
                             (forward_rows, backward_rows))  # fmt: skip
        extra = {"forward_passes": forward_rows, "backward_passes": backward_rows}
        return core.result(x + best_delta.to(x.dtype), success, self.geometry.measure, extra)

    def _single_run(
        self,
        core: AttackCore,
        clean_pred: Tensor | None,
        eps: Tensor,
        idx: Tensor,
        start: Tensor,
        loss_kind: str,
        dlr: Tensor,
        best_delta: Tensor,
        best_loss: Tensor,
        success: Tensor,
        passes: tuple[Tensor, Tensor],
    ) -> None:
        """One APGD run on the samples ``idx`` from the random points ``start``; writes fooled points and best-loss
        points into the outputs, and each sample's forward and backward passes into ``passes``."""
        geometry, steps = self.geometry, self.steps
        checkpoints = [w for w in self.checkpoints(steps)[1:] if w < steps]
        previous_checkpoint = [0]
        momentum = core.step(_momentum_step)
        x = core.x32[idx]
        n = idx.numel()
        delta = geometry.project_ball_box(x, start, eps[idx])
        # Per-sample state of the active samples; the core compacts it whenever samples get fooled.
        s = ActiveSet(
            idx, x=x, y=core.y[idx], eps=eps[idx], delta=delta, prev=delta, eta=2.0 * eps[idx],
            run_best_loss=torch.full((n,), float("-inf"), device=x.device), run_best_delta=delta.clone(),
            run_best_grad=torch.zeros_like(delta), raises=torch.zeros(n, device=x.device),
            reduced=torch.zeros(n, dtype=torch.bool, device=x.device),
        )  # fmt: skip
        if clean_pred is not None:
            s["clean"] = clean_pred[idx]
        if loss_kind == "mixed":
            s["dlr"] = dlr[idx]
        forward_rows, backward_rows = passes

        def body(k: int, s: ActiveSet) -> Tensor | None:
            last = k == steps  # the final iterate is only scored: no gradient, no step
            if last:
                logits = core.forward(s["x"] + s["delta"])
                loss = self._loss(logits, s, loss_kind)
            else:
                logits, loss, s["grad"], _ = core.value_and_grad(
                    s["delta"], lambda d: s["x"] + d, lambda z: self._loss(z, s, loss_kind)
                )
            fooled = core.fooled(logits, s.index)
            # Fooled samples leave with their first fooling point; the one host sync of the iteration.
            if bool(fooled.any()):
                done = s.index[fooled]
                forward_rows[done] += k + 1
                backward_rows[done] += min(k + 1, steps)
                best_delta[done] = s["delta"][fooled]
                best_loss[done] = loss[fooled]
                success[done] = True
                s.keep(~fooled)
                loss = loss[~fooled]
                if len(s) == 0:
                    return None

            # Best point of this run: the restart target of the step-size schedule.
            improved = view_as_batch(loss > s["run_best_loss"], s["delta"])
            s["run_best_delta"] = torch.where(improved, s["delta"], s["run_best_delta"])
            if not last:
                s["run_best_grad"] = torch.where(improved, s["grad"], s["run_best_grad"])
            if k == 0:
                s["checkpoint_best"] = loss
            else:
                s["raises"] = s["raises"] + (loss > s["loss"]).float()
            s["run_best_loss"] = torch.maximum(loss, s["run_best_loss"])
            s["loss"] = loss
            if last:
                return None

            if k in checkpoints:
                halve = halving_condition(
                    s["raises"], k - previous_checkpoint[0], self.rho, s["reduced"], s["run_best_loss"],
                    s["checkpoint_best"],
                )  # fmt: skip
                s["eta"] = torch.where(halve, 0.5 * s["eta"], s["eta"])
                back = view_as_batch(halve, s["delta"])
                s["delta"] = torch.where(back, s["run_best_delta"], s["delta"])
                s["grad"] = torch.where(back, s["run_best_grad"], s["grad"])
                s["loss"] = torch.where(halve, s["run_best_loss"], s["loss"])
                s["reduced"] = halve
                s["checkpoint_best"] = s["run_best_loss"]
                s["raises"] = torch.zeros_like(s["raises"])
                previous_checkpoint[0] = k

            a = torch.tensor(1.0 if k == 0 else self.alpha, device=x.device)
            s["prev"], s["delta"] = (
                s["delta"],
                momentum(geometry, s["x"], s["delta"], s["prev"], s.pop("grad"), s["eta"], s["eps"], a),
            )
            return None

        core.loop(s, steps + 1, body)
        forward_rows[s.index] += steps + 1
        backward_rows[s.index] += steps
        # Samples still standing: keep this run's best-loss point if it beats earlier restarts.
        better = s["run_best_loss"] > best_loss[s.index]
        upd = s.index[better]
        best_delta[upd] = s["run_best_delta"][better]
        best_loss[upd] = s["run_best_loss"][better]
