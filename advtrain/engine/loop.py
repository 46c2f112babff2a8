"""The batched projected-gradient loop shared by FGSM, FGM, BIM, PGD and the PGD inner maximizer.

One loop, two uses:

* **attack** (``keep_best=True``, ``early_stop=True``): per-sample active set — a sample stops costing
  passes as soon as it is fooled —, the best point per sample (fooled beats not fooled; otherwise the largest
  loss seen inside the ball), restarts on the samples still standing, and a final forward pass that scores
  the last iterate.
* **training maximizer** (``keep_best=False``, ``early_stop=False``): Madry et al.'s recipe, the last iterate
  of every sample, with no extra forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from advtrain.engine.checks import check_inputs, check_labels
from advtrain.engine.losses import LossFn, is_fooled
from advtrain.engine.result import AttackResult
from advtrain.engine.tracking import PassCounter, logits_of
from advtrain.threat.geometry import Geometry
from advtrain.threat.norms import view_as_batch

_COMPILED: dict[type, object] = {}


def ascent_step(geometry: Geometry, inputs: Tensor, delta: Tensor, grad: Tensor, alpha: Tensor, eps: Tensor) -> Tensor:
    """One projected steepest-ascent step, δ ← Π_{ball ∩ box}(δ + α · u(∇)): all elementwise, one fusible unit."""
    step = view_as_batch(alpha, delta) * geometry.ascent_direction(grad)
    return geometry.project_ball_box(inputs, delta + step, eps)


def compiled_ascent_step(geometry: Geometry):
    """:func:`ascent_step` compiled with ``torch.compile`` (one fused kernel per geometry on GPU), cached per geometry
    class; shapes are dynamic so a shrinking active set does not trigger recompilation."""
    key = type(geometry)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(ascent_step, dynamic=True)
    return _COMPILED[key]


def require_grad_mode() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "Gradient attacks cannot run under torch.inference_mode(). With Lightning, construct the Trainer "
            "with inference_mode=False (advtrain's base config does) or call the attack outside inference mode."
        )


def gradient_ascent(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    geometry: Geometry,
    eps: Tensor,
    step_size: Tensor,
    steps: int,
    loss_fn: LossFn,
    random_start: bool,
    targeted: bool = False,
    restarts: int = 1,
    keep_best: bool = True,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
    autocast: torch.dtype | None = None,
    compile: bool = False,
) -> AttackResult:
    """Projected steepest ascent of ``loss_fn`` in the ε-ball of ``geometry``, intersected with [0, 1].

    Each step: δ ← Π_{ball ∩ box}(δ + α · u(∇_δ L)), with u the geometry's steepest-ascent direction
    (sign for L∞, normalised gradient for L2). Targeted attacks descend the loss towards ``labels``.
    The caller sets the model's mode (see :func:`advtrain.engine.attack_context`).

    Args:
        model: maps [0, 1] inputs to logits.
        inputs: clean batch in [0, 1].
        labels: true labels, or targets when ``targeted``.
        geometry: the norm's geometry.
        eps: (B,) budgets.
        step_size: (B,) step lengths α.
        steps: gradient steps per restart.
        loss_fn: per-sample loss of (logits, labels).
        random_start: start from a random point in the ball (else from δ = 0).
        targeted: make ``labels`` the targets.
        restarts: independent runs; later runs only attack samples not yet fooled.
        keep_best: keep the best point per sample and score the last iterate (attacks); otherwise return the
            last iterate (training).
        early_stop: drop fooled samples from the active set.
        generator: RNG for the random start.
        autocast: run the model under autocast in this dtype (e.g. ``torch.bfloat16``); the perturbation, the
            gradient step and the norms stay in float32.
        compile: use the ``torch.compile``-d step (:func:`compiled_ascent_step`); the eager step is the reference
            it is tested against.

    Returns:
        An :class:`AttackResult`; ``success`` is only meaningful when ``keep_best`` is set.
    """
    require_grad_mode()
    check_inputs(inputs)
    x = inputs.detach()
    y = labels.detach()
    sign = -1.0 if targeted else 1.0
    batch = x.shape[0]
    device = x.device

    best_delta = torch.zeros_like(x, dtype=torch.float32)
    best_loss = torch.full((batch,), float("-inf"), device=device)
    success = torch.zeros(batch, dtype=torch.bool, device=device)
    counter = PassCounter()
    labels_checked = False
    step_fn = compiled_ascent_step(geometry) if compile else ascent_step

    def score(idx: Tensor, delta: Tensor, logits: Tensor) -> None:
        """Records the points ``delta`` of samples ``idx`` when they beat the best so far."""
        loss = sign * loss_fn(logits, y[idx]).detach()
        fooled = is_fooled(logits.detach(), y[idx], targeted)
        # Fooling beats not fooling; between equals the larger loss wins, so a fooled sample is never undone.
        better = (fooled & ~success[idx]) | ((fooled == success[idx]) & (loss > best_loss[idx]))
        upd = idx[better]
        best_delta[upd] = delta[better]
        best_loss[upd] = loss[better]
        success[upd] = fooled[better]

    for _ in range(max(1, restarts)):
        active = torch.arange(batch, device=device) if not early_stop else (~success).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        xa = x[active]
        delta = geometry.sample(xa, eps[active], generator) if random_start else torch.zeros_like(xa)
        delta = geometry.project_ball_box(xa, delta, eps[active])
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = logits_of(model, (xa + delta).to(x.dtype), counter, autocast=autocast)
            if not labels_checked:
                check_labels(y, logits.shape[1], batch)
                labels_checked = True
            loss = loss_fn(logits, y[active])
            grad = torch.autograd.grad(loss.sum() * sign, delta)[0]
            delta = delta.detach()
            counter.backward(active.numel())
            if keep_best:
                score(active, delta, logits)
            if early_stop:
                keep = ~success[active]
                if not bool(keep.all()):
                    active, xa, delta, grad = active[keep], xa[keep], delta[keep], grad[keep]
                    if active.numel() == 0:
                        break
            delta = step_fn(geometry, xa, delta, grad, step_size[active], eps[active])
        if keep_best and active.numel() > 0:
            with torch.no_grad():
                logits = logits_of(model, (xa + delta).to(x.dtype), counter, autocast=autocast)
            score(active, delta, logits)
        if not keep_best:
            best_delta[active] = delta

    adv = (x + best_delta.to(x.dtype)).clamp_(0.0, 1.0)
    return AttackResult(
        adv=adv.detach(),
        success=success,
        norms=geometry.measure((adv - x).float()),
        forward_passes=counter.forward_passes,
        backward_passes=counter.backward_passes,
        model_calls=counter.model_calls,
    )
