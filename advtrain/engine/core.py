"""The attack core: the one batched loop every attack of the zoo runs on.

An attack call builds one :class:`AttackCore`, its per-sample state (a :class:`~advtrain.engine.state.SampleState`
built by :meth:`AttackCore.start`), and hands the core the two halves of an iteration:

* :class:`AttackCore` owns what every attack shares: the input and label checks, the gradient-mode guard, every
  model call (optional autocast with float32 logits, per-sample pass counting), gradients with respect to the
  attack's variable (also Jacobian rows and double-backward graphs), the success test, the optional
  ``torch.compile``-d elementwise step, and the final :class:`AttackResult`.
* the state holds the samples still under attack and their per-sample tensors; when samples finish, all of it
  shrinks together (or, in the masked mode, is masked together), so finished samples cost no more passes
  (per-sample early stopping).
* :meth:`AttackCore.loop` is the loop itself, the one place where samples are evaluated, the finished ones retired
  and the rest advanced: each iteration calls ``evaluate(k, state)`` (model passes at the current iterates, tracking,
  and the (n,) flags of the samples that are done), retires the done samples, and calls ``advance(k, state)`` (the
  step) on the others, until the steps run out or nobody is left.

Best-result tracking is :class:`~advtrain.engine.tracking.MinimalNormTracker` (smallest successful norm) or the
max-loss tracking of :func:`advtrain.engine.loop.gradient_ascent`; the norm-specific math is in
:mod:`advtrain.threat`. What differs between attacks is only the body: which objective is differentiated and how
the iterate moves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from advtrain.engine.checks import check_inputs, check_labels, check_model_inputs, warn_if_probabilities
from advtrain.engine.losses import is_fooled
from advtrain.engine.result import AttackResult
from advtrain.engine.state import ACTIVE_SET_MODES, SampleState
from advtrain.engine.tracking import PassCounter, logits_of
from advtrain.threat.geometry import Geometry

_FUSED: dict[Callable, Callable] = {}


def require_grad_mode() -> None:
    """Raises a clear error inside ``torch.inference_mode()``, where no attack can take a gradient."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Gradient attacks cannot run under torch.inference_mode(). With Lightning, construct the Trainer "
            "with inference_mode=False (advtrain's base config does) or call the attack outside inference mode."
        )


def fused(fn: Callable) -> Callable:
    """``fn`` compiled with ``torch.compile`` (``dynamic=True``, so a shrinking active set does not recompile),
    cached per function. Elementwise steps compile to one or a few fused kernels on GPU. Pass per-iteration
    scalars as tensors so that changing values do not trigger recompilation."""
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True)
    return _FUSED[fn]


class AttackCore:
    """What every attack call shares (see the module docstring).

    Args:
        model: maps [0, 1] inputs to logits (already in the attack's mode, see
            :func:`~advtrain.engine.attack_context`).
        inputs: the clean batch in [0, 1]; checked here.
        labels: true labels, or targets when ``targeted``; checked against the model's first output.
        targeted: success means reaching ``labels`` rather than leaving them.
        autocast: run the model under autocast in this dtype (e.g. ``torch.bfloat16``); logits come back in float32
            and the attack's variables stay float32.
        compile: :meth:`step` returns the ``torch.compile``-d version of an elementwise step (see :func:`fused`).
        checks: check the inputs here and the labels (and for probabilities) at the first model call. Each check
            reads values back from the device (a host sync); trusted callers that validated the batch already — the
            training maximizers, whose batch :class:`~advtrain.training.AdversarialTraining` checks on the host
            before it reaches the device — pass ``False``. Attacks called by users always check.
        active_set: ``"shrink"`` (finished samples leave the state) or ``"mask"`` (fixed shapes, finished samples
            masked), see :mod:`advtrain.engine.state`.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        *,
        targeted: bool = False,
        autocast: torch.dtype | None = None,
        compile: bool = False,
        checks: bool = True,
        active_set: str = "shrink",
    ) -> None:
        require_grad_mode()
        if active_set not in ACTIVE_SET_MODES:
            raise ValueError(f"Unknown active_set {active_set!r}; allowed values are {ACTIVE_SET_MODES}.")
        if checks:
            check_inputs(inputs)
            check_model_inputs(model, inputs)
        self.model = model
        self.x = inputs.detach()
        self.x32 = self.x.float()
        self.y = labels.detach()
        self.batch = self.x.shape[0]
        self.device = self.x.device
        self.dtype = self.x.dtype
        self.targeted = bool(targeted)
        self.autocast = autocast
        self.compile = bool(compile)
        self.counter = PassCounter()
        self.masked = active_set == "mask"
        self._labels_checked = not checks
        self._live: SampleState | None = None  # the masked state whose rows the model calls count

    def start(self, cls: type[SampleState], rows: Tensor | None = None, **fields) -> SampleState:
        """The per-sample state ``cls`` of the samples ``rows`` (positions in the batch; ``None``: every sample), its
        per-sample fields given with one row per sample of ``rows``. In the masked mode the state spans the whole
        batch: the fields are scattered into batch-sized tensors (zeros on the other rows) and ``active`` marks
        ``rows``."""
        index = torch.arange(self.batch, device=self.device) if rows is None else rows
        if not self.masked:
            return cls(index=index, **fields)
        per_sample = set(cls.per_sample_fields())
        full = torch.arange(self.batch, device=self.device)
        active = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        active[index] = True
        for name, value in fields.items():
            if name in per_sample and value is not None:
                spread = value.new_zeros((self.batch, *value.shape[1:]))
                spread[index] = value
                fields[name] = spread
        state = cls(index=full, active=active, count=index.numel(), **fields)
        self._live = state
        return state

    def step(self, fn: Callable) -> Callable:
        """The elementwise step ``fn``, compiled when the core is (the eager ``fn`` is its reference twin)."""
        return fused(fn) if self.compile else fn

    def logits(self, points: Tensor, *, counted: int | None = None) -> Tensor:
        """Float32 logits of ``points`` (one counted forward per row, or ``counted`` forwards: the rows a masked call
        stands for); the first call checks the labels and warns if the model returns probabilities instead of
        logits."""
        logits = logits_of(self.model, points.to(self.dtype), autocast=self.autocast)
        self.counter.forward(self._rows(points.shape[0]) if counted is None else counted)
        if not self._labels_checked:
            check_labels(self.y, logits.shape[1], self.batch)
            warn_if_probabilities(logits)
            self._labels_checked = True
        return logits

    def forward(self, points: Tensor, *, counted: int | None = None) -> Tensor:
        """:meth:`logits` without a graph."""
        with torch.no_grad():
            return self.logits(points, counted=counted)

    def value_and_grad(
        self,
        variable: Tensor,
        points: Callable[[Tensor], Tensor],
        objective: Callable[[Tensor], Tensor],
        *,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One forward and one backward pass: the per-sample ``objective(logits)`` at ``points(variable)`` and its
        gradient with respect to ``variable``.

        Returns:
            ``(logits, value, grad, variable)``, logits and value detached. With ``create_graph`` the gradient keeps
            its graph for Hessian-vector products, and the returned ``variable`` is the leaf it is taken against.
        """
        with torch.enable_grad():
            variable = variable.detach().requires_grad_(True)
            logits = self.logits(points(variable))
            value = objective(logits)
            grad = torch.autograd.grad(value.sum(), variable, create_graph=create_graph)[0]
        self.counter.backward(self._rows(variable.shape[0]))
        if not create_graph:
            grad = grad.detach()
        return logits.detach(), value.detach(), grad, variable

    def jacobian(self, outputs: Tensor, variable: Tensor) -> Tensor:
        """Rows ∂outputs[:, k]/∂variable for every column k of ``outputs`` (n, K) on one shared graph: K backward
        passes per sample, counted. Returns (n, K, *variable.shape[1:])."""
        count = outputs.shape[1]
        rows = [torch.autograd.grad(outputs[:, k].sum(), variable, retain_graph=k + 1 < count)[0] for k in range(count)]
        self.counter.backward(count * self._rows(variable.shape[0]))
        return torch.stack(rows, dim=1)

    def _rows(self, n: int) -> int:
        """The samples a model call on ``n`` rows counts: in the masked mode, a call on the whole masked state counts
        its active rows only (what the shrinking mode would have run)."""
        live = self._live
        return live.count if live is not None and n == live.index.shape[0] else n

    def fooled(self, logits: Tensor, index: Tensor) -> Tensor:
        """Whether each row of ``logits`` fools the model for the samples ``index``."""
        return is_fooled(logits.detach(), self.y[index], self.targeted)

    def loop(
        self,
        state: SampleState,
        steps: int,
        evaluate: Callable[[int, SampleState], Tensor | None],
        advance: Callable[[int, SampleState], None] | None = None,
    ) -> None:
        """The attack loop, the one place where samples are evaluated, retired and advanced: for k = 0..steps−1,
        while samples remain, ``done = evaluate(k, state)`` (a (n,) bool tensor of the samples that are done, or
        ``None`` when all go on), the done samples leave (:meth:`SampleState.retire`: shrunk away or masked), then
        ``advance(k, state)`` moves the others."""
        if state.masked:
            self._live = state
        for k in range(steps):
            if len(state) == 0:
                return
            done = evaluate(k, state)
            if done is not None and state.retire(done) == 0:
                return
            if advance is not None:
                advance(k, state)

    def project_into_budget(self, adv: Tensor, success: Tensor, eps: Tensor, geometry: Geometry) -> AttackResult:
        """The ε-ball variant of a minimal-norm attack: shrinks each found δ = adv − x into its ball (projection only
        ever shrinks) and the box, and re-checks with one forward the successful samples that moved; the others keep
        their verdict. In the masked mode that forward sees the whole batch (and counts the moved rows)."""
        delta = adv.float() - self.x32
        projected = (self.x32 + geometry.project(delta, eps)).clamp_(0.0, 1.0)
        success = success.clone()
        moved = (success & (geometry.measure(delta) > eps)).nonzero().squeeze(1)
        if moved.numel() > 0 and self.masked:  # fixed shapes: the whole batch, counted as the moved rows
            everyone = torch.arange(self.batch, device=self.device)
            refooled = self.fooled(self.forward(projected, counted=moved.numel()), everyone)
            success[moved] = refooled[moved]
        elif moved.numel() > 0:
            success[moved] = self.fooled(self.forward(projected[moved]), moved)
        return self.result(projected, success, geometry.measure)

    def result(
        self, adv: Tensor, success: Tensor, measure: Callable[[Tensor], Tensor], extra: dict | None = None
    ) -> AttackResult:
        """The :class:`AttackResult` of ``adv`` (clipped to the box, cast to the inputs' dtype), with norms from
        ``measure(delta) -> (B,)`` and the pass counts."""
        adv = adv.clamp(0.0, 1.0).to(self.dtype).detach()
        return AttackResult(
            adv=adv,
            success=success,
            norms=measure((adv - self.x).float()),
            forward_passes=self.counter.forward_passes,
            backward_passes=self.counter.backward_passes,
            model_calls=self.counter.model_calls,
            extra=extra or {},
        )
