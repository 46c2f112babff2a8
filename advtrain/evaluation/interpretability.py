"""What an adversarial perturbation means: adversarial saliency maps, class activation maps and interpretability scores.

Seed 002 (Xu et al., *Structured Adversarial Attack: Towards General Implementation and Better Interpretability*,
ICLR 2019, §6 and Appendix E) scores a perturbation δ of a clean input x0 by how much of it lies where the network is
sensitive:

* the adversarial saliency map (ASM; Papernot et al., *The Limitations of Deep Learning in Adversarial Settings*,
  EuroS&P 2016) of x0 for the target class t against the true class t0, from the forward derivative of the logits Z
  (seed 002, eq. 61): ``ASM[i] = 0`` if ``∂Z_t/∂x_i < 0`` or ``∂Z_t0/∂x_i > 0``, else
  ``∂Z_t/∂x_i · |∂Z_t0/∂x_i|`` (:func:`adversarial_saliency_map`; ``variant="all"`` is Papernot's eq. 60, with the
  sum over every class but t in place of t0);
* the Boolean map ``B(ν)`` of the elements whose score is above its ν-th percentile (:func:`boolean_map`), and the
  interpretability score ``IS(ν) = ‖B(ν) ∘ δ‖₂ / ‖δ‖₂`` (eq. 23, :func:`interpretability_score`): 1 when the
  perturbation lies entirely where the map is high, 0 when it lies entirely elsewhere;
* the same with a class activation map in place of the ASM: CAM (Zhou et al., *Learning Deep Features for
  Discriminative Localization*, CVPR 2016) for networks ending in global average pooling (GAP) + a linear layer
  (:func:`class_activation_map`), Grad-CAM (Selvaraju et al., *Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization*, ICCV 2017) for every other network (:func:`grad_cam`); :class:`ActivationMaps`
  picks one per model. Of the registered models, ``preact_resnet18`` and the Wide ResNets (``wide_resnet``,
  ``wrn28_4``, ``wrn28_10``, ``wrn34_10``) have a GAP head (BatchNorm → ReLU → GAP → linear) and get CAM;
  ``small_cnn`` and ``madry_lenet`` end in fully connected layers on flattened maps and get Grad-CAM.

:func:`interpretability_scores` scores any attack's result; :class:`InterpretabilityCollector` gathers the scores
and a gallery of examples for every attack of an evaluation (``evaluate_robustness(interpretability=True)``).

Choices the paper leaves open, and deviations:

* **Which class.** The paper's attacks are targeted, and ASM is taken for the target. An untargeted attack's
  target is its adversarial class (the fresh-forward prediction at the adversarial point). The CAM-based score uses
  the CAM of the true class at x0: the paper's Fig. 3(c) and A2(b) show "CAM of the original label", and §6 reads IS
  via CAM as how far the perturbation is "mapped to the most discriminative image regions" of x0.
* **Elements.** ASM and δ are compared element by element (colour channels separately: d = C·H·W, as the paper's
  ``ASM ∈ R^d``); a CAM has one value per pixel and its ``B(ν)`` covers every channel of that pixel.
* **Percentiles** are per image, over its d scores, with linear interpolation between order statistics (NumPy's
  default), and ``B = score > percentile`` (strict, as eq. 23's text). The ASM is zero wherever a sign condition
  fails, often on more than a third of the elements: there the low percentiles are 0 and ``B`` is the positive part.
* **CAM** is ``Σ_k w_ck f_k`` without the bias (Zhou et al.), bilinearly upsampled to the input size. **Grad-CAM**
  is ``ReLU(Σ_k α_k A_k)`` with ``α_k`` the spatial mean of ``∂Z_c/∂A_k``, computed at a low resolution and then
  upsampled bilinearly (Selvaraju et al.). On a GAP + linear head whose pooled maps are the Grad-CAM layer's output,
  ``α_k = w_ck / (h·w)``, so Grad-CAM = ReLU(CAM) / (h·w): the same ``B(ν)`` wherever the ν-th percentile of the CAM
  is ≥ 0. The Grad-CAM layer is the last module whose output is a 4-D map of more than one pixel and not a pooling
  layer's output (the rectified maps of the last convolution, before the last pooling, as Selvaraju et al. use for
  VGG: 8×8 in ``small_cnn``, 14×14 in ``madry_lenet`` on MNIST); pass ``layer`` to choose another.
* **Not in the paper:** the GAP head is found generically, by checking on a probe batch that the last linear
  layer's input is the spatial mean of some module's 4-D output (or of its ReLU: pre-activation ResNets apply the
  final ReLU functionally); nothing is hard-coded per architecture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.engine.modes import attack_context
from advtrain.engine.result import AttackResult
from advtrain.errors import InvalidConfigError

log = logging.getLogger(__name__)

__all__ = ["PERCENTILES", "ActivationMaps", "GalleryItem", "GapHead", "InterpretabilityCollector",
           "InterpretabilityResult", "adversarial_saliency_map", "boolean_map", "check_percentiles",
           "class_activation_map", "find_feature_layer", "find_gap_head", "grad_cam", "interpretability_score",
           "interpretability_markdown", "interpretability_scalars", "interpretability_scores",
           "percentile_thresholds"]  # fmt: skip

#: The seed's percentiles ν of Fig. 3(a): the 30th to the 90th.
PERCENTILES = (30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)
ASM_VARIANTS = ("pair", "all")
MAP_METHODS = ("auto", "cam", "grad_cam")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)


def check_percentiles(percentiles: Sequence[float] | None, name: str = "is_percentiles") -> list[float]:
    """The percentiles ν as sorted unique floats in [0, 100); ``None`` gives :data:`PERCENTILES`.

    Raises:
        InvalidConfigError (a ValueError): for an empty list or a value outside [0, 100), naming ``name``.
    """
    if percentiles is None:
        return list(PERCENTILES)
    if isinstance(percentiles, (int, float)):
        percentiles = [percentiles]
    values = [float(p) for p in percentiles]
    bad = [p for p in values if not 0.0 <= p < 100.0 or math.isnan(p)]
    if not values or bad:
        raise InvalidConfigError(f"{name} must be a non-empty list of percentiles in [0, 100) (e.g. [30, 50, 70, 90]), "
                                 f"got "
                         f"{list(percentiles)!r}.")  # fmt: skip
    return sorted(set(values))


def _classes(classes: Tensor | Sequence[int], batch: int, num_classes: int, name: str, device) -> Tensor:
    classes = torch.as_tensor(classes, device=device).long().reshape(-1)
    if classes.numel() != batch:
        raise ValueError(f"{name} must hold one class per sample ({batch}), got {classes.numel()}.")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{int(classes.min())}, "
                         f"{int(classes.max())}].")  # fmt: skip
    return classes


def _check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}.")


# ----------------------------------------------------------------------------------------------------------- ASM
def adversarial_saliency_map(
    model: nn.Module,
    x: Tensor,
    targets: Tensor | Sequence[int],
    sources: Tensor | Sequence[int],
    *,
    variant: Literal["pair", "all"] = "pair",
) -> Tensor:
    """The adversarial saliency map ASM(x, t) of every input element (seed 002, Appendix E; Papernot et al. 2016).

    ``"pair"`` (seed 002, eq. 61): ``ASM[i] = 0`` if ``∂Z_t/∂x_i < 0`` or ``∂Z_s/∂x_i > 0``, else
    ``∂Z_t/∂x_i · |∂Z_s/∂x_i|`` with t the target and s the source (true) class. ``"all"`` (eq. 60, Papernot's
    original): the sum ``Σ_{j≠t} ∂Z_j/∂x_i`` in place of ``∂Z_s/∂x_i``. Z are the logits. Two backward passes, batched
    (the model runs in eval mode, so samples do not interact); the model's mode and flags are restored.

    Args:
        model: classifier on [0, 1] inputs.
        x: (B, C, H, W) inputs (the clean images).
        targets: (B,) target classes t (for an untargeted attack: the adversarial class).
        sources: (B,) true classes t0 (unused by ``"all"`` but for its checks).
        variant: ``"pair"`` or ``"all"``.

    Returns:
        (B, C, H, W) non-negative scores, float32 (or x's dtype if wider).

    Example:
        >>> asm = adversarial_saliency_map(model, x, targets=adv_class, sources=y)  # doctest: +SKIP
    """
    if variant not in ASM_VARIANTS:
        raise ValueError(f"variant must be one of {ASM_VARIANTS}, got {variant!r}.")
    _check_images(x)
    with attack_context(model, "eval"), torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        if logits.dim() != 2:
            raise ValueError(f"the model must return (B, num_classes) logits, got shape {tuple(logits.shape)}.")
        t = _classes(targets, x.shape[0], logits.shape[1], "targets", logits.device)
        s = _classes(sources, x.shape[0], logits.shape[1], "sources", logits.device)
        z_t = logits.gather(1, t[:, None]).sum()
        g_t = torch.autograd.grad(z_t, xg, retain_graph=True)[0]
        other = logits.gather(1, s[:, None]).sum() if variant == "pair" else logits.sum() - z_t
        g_o = torch.autograd.grad(other, xg)[0]
    g_t, g_o = g_t.detach(), g_o.detach()
    dtype = torch.promote_types(g_t.dtype, torch.float32)
    g_t, g_o = g_t.to(dtype), g_o.to(dtype)
    return torch.where((g_t < 0) | (g_o > 0), torch.zeros_like(g_t), g_t * g_o.abs())


# --------------------------------------------------------------------------------------------- B(ν) and IS(ν)
def percentile_thresholds(scores: Tensor, percentiles: Sequence[float]) -> Tensor:
    """The ν-th percentile of each sample's scores, with NumPy's default linear interpolation.

    Args:
        scores: (B, ...) scores.
        percentiles: the ν in [0, 100).

    Returns:
        (P, B) thresholds, in the scores' dtype.
    """
    flat = scores.detach().flatten(1)
    if not flat.is_floating_point():
        flat = flat.float()
    ordered = flat.sort(dim=1).values
    n = ordered.shape[1]
    position = torch.tensor([float(p) for p in percentiles], dtype=torch.float64) / 100.0 * (n - 1)
    low, high = position.floor().long(), position.ceil().long()
    frac = (position - low.double()).to(ordered.dtype).to(ordered.device)
    low, high = low.to(ordered.device), high.to(ordered.device)
    values = ordered[:, low] + frac * (ordered[:, high] - ordered[:, low])
    return values.T.contiguous()


def boolean_map(scores: Tensor, percentiles: Sequence[float]) -> Tensor:
    """``B(ν)``: the elements of each sample whose score exceeds that sample's ν-th percentile (seed 002, §6).

    Returns:
        (P, B, ...) booleans, the shape of ``scores`` behind the percentile axis.
    """
    thresholds = percentile_thresholds(scores, percentiles)
    return scores.detach()[None] > thresholds.view(*thresholds.shape, *([1] * (scores.dim() - 1)))


def interpretability_score(delta: Tensor, scores: Tensor, percentiles: Sequence[float] = PERCENTILES) -> Tensor:
    """``IS(ν) = ‖B(ν) ∘ δ‖₂ / ‖δ‖₂`` per sample and percentile (seed 002, eq. 23).

    Args:
        delta: (B, C, H, W) perturbations.
        scores: (B, C, H, W) element scores (an ASM) or (B, 1, H, W) pixel scores (a CAM, applied to every channel).
        percentiles: the ν in [0, 100).

    Returns:
        (B, P) scores in [0, 1], float32 (float64 for float64 inputs); NaN where δ = 0.
    """
    percentiles = check_percentiles(percentiles, "percentiles")
    _check_images(delta, "delta")
    if scores.dim() != 4 or scores.shape[0] != delta.shape[0] or scores.shape[2:] != delta.shape[2:] or \
            scores.shape[1] not in (1, delta.shape[1]):  # fmt: skip
        raise ValueError(f"scores must have shape (B, C, H, W) or (B, 1, H, W) for delta of shape "
                         f"{tuple(delta.shape)}, got {tuple(scores.shape)}.")  # fmt: skip
    dtype = torch.promote_types(delta.dtype, torch.float32)
    energy = delta.detach().to(dtype).square()
    total = energy.flatten(1).sum(1)
    thresholds = percentile_thresholds(scores, percentiles)
    out = torch.empty(delta.shape[0], len(percentiles), dtype=dtype, device=delta.device)
    for p in range(len(percentiles)):  # one mask at a time: P × d booleans per sample would not fit for ImageNet
        mask = scores.detach() > thresholds[p].view(-1, 1, 1, 1)
        out[:, p] = (energy * mask).flatten(1).sum(1)
    score = (out / total[:, None]).sqrt()
    return torch.where(total[:, None] > 0, score, torch.full_like(score, math.nan))


# ------------------------------------------------------------------------------------------- CAM and Grad-CAM
@dataclass(frozen=True)
class GapHead:
    """Where a network's global-average-pooling + linear head takes its maps.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        layer: the module whose output (after ``relu``) is pooled.
        linear: the last linear layer (its input is the pooled vector).
        relu: the pooled maps are ``ReLU(layer output)`` (a functional ReLU between them, as in pre-activation
            ResNets).
    """

    name: str
    layer: nn.Module
    linear: nn.Linear
    relu: bool


def _trace(model: nn.Module, x: Tensor) -> tuple[Tensor, list[tuple[str, nn.Module, tuple, Any]]]:
    """One eval-mode forward with a hook on every submodule: the logits and ``(name, module, inputs, output)`` in
    the order the modules finished."""
    calls: list[tuple[str, nn.Module, tuple, Any]] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m, i, o)))
        for name, module in model.named_modules()
        if module is not model
    ]
    try:
        with attack_context(model, "eval"), torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, calls


def _maps_of(calls, pooled_ok: bool) -> list[tuple[str, nn.Module, Tensor]]:
    """The 4-D outputs of more than one pixel, last finished first; without ``pooled_ok`` not a pooling layer's."""
    pooled = {id(o) for _, m, _, o in calls if isinstance(m, _POOLS)}
    found = []
    for name, module, _, out in reversed(calls):
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
            if pooled_ok or id(out) not in pooled:
                found.append((name, module, out))
    return found


def find_gap_head(model: nn.Module, x: Tensor) -> GapHead | None:
    """Finds a global-average-pooling + linear head on a probe batch, or returns ``None``.

    The head is the last ``nn.Linear`` whose output is the logits; it is a GAP head when its input equals, to float
    rounding, the spatial mean of the 4-D output of some module (or of its ReLU), the last such module winning.

    Args:
        model: the classifier.
        x: a probe batch (its first two samples are used).
    """
    _check_images(x)
    logits, calls = _trace(model, x[:2])
    linear = None
    for _, module, inputs, out in reversed(calls):
        if isinstance(module, nn.Linear) and isinstance(out, Tensor) and out.shape == logits.shape:
            if torch.allclose(out.to(logits.dtype), logits, rtol=1e-5, atol=1e-6):
                linear, pooled = module, inputs[0]
                break
    if linear is None or pooled.dim() != 2:
        return None
    tol = 1e-5 * (1.0 + float(pooled.abs().max()))
    for name, module, out in _maps_of(calls, pooled_ok=False):
        if out.shape[1] != pooled.shape[1]:
            continue
        for relu in (False, True):
            maps = F.relu(out) if relu else out
            if torch.allclose(maps.mean((2, 3)).to(pooled.dtype), pooled, rtol=1e-4, atol=tol):
                return GapHead(name, module, linear, relu)
    return None


def find_feature_layer(model: nn.Module, x: Tensor) -> tuple[str, nn.Module] | None:
    """Grad-CAM's default layer: the last module whose output is a 4-D map of more than one pixel that is not a
    pooling layer's output (any 4-D map if every one is pooled); ``None`` for a network without one."""
    _check_images(x)
    _, calls = _trace(model, x[:2])
    found = _maps_of(calls, pooled_ok=False) or _maps_of(calls, pooled_ok=True)
    return (found[0][0], found[0][1]) if found else None


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def class_activation_map(
    model: nn.Module, x: Tensor, classes: Tensor | Sequence[int], *, head: GapHead | None = None, upsample: bool = True
) -> Tensor:
    """CAM (Zhou et al. 2016): ``M_c = Σ_k w_ck f_k``, the last linear layer's weights of class c over the maps that
    its global average pooling reduces (no bias, no normalisation).

    Args:
        model: a classifier with a GAP + linear head.
        x: (B, C, H, W) inputs.
        classes: (B,) the class of each map.
        head: the head (default: :func:`find_gap_head`).
        upsample: bilinearly upsample the maps to the input size.

    Returns:
        (B, 1, h, w) maps (h, w = H, W with ``upsample``), float32 or wider.

    Raises:
        ValueError: for a network without a GAP + linear head (use :func:`grad_cam`).
    """
    _check_images(x)
    head = head or find_gap_head(model, x)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no global-average-pooling + linear head, so no CAM; use "
                         "grad_cam (or ActivationMaps(method='auto')).")  # fmt: skip
    captured: list[Tensor] = []
    handle = head.layer.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with attack_context(model, "eval"), torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    maps = captured[-1]
    maps = F.relu(maps) if head.relu else maps
    c = _classes(classes, x.shape[0], logits.shape[1], "classes", maps.device)
    weights = head.linear.weight.detach()[c].to(maps.dtype)
    dtype = torch.promote_types(maps.dtype, torch.float32)
    cam = torch.einsum("bk,bkhw->bhw", weights, maps)[:, None].to(dtype)
    return _upsample(cam, x.shape[2:]) if upsample else cam


def _layer_by_name(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}; its modules are "
                         f"{', '.join(n for n in modules if n)}.")  # fmt: skip
    return modules[layer]


def grad_cam(
    model: nn.Module,
    x: Tensor,
    classes: Tensor | Sequence[int],
    *,
    layer: str | nn.Module | None = None,
    upsample: bool = True,
) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ``ReLU(Σ_k α_k A_k)`` with ``α_k`` the spatial mean of ``∂Z_c/∂A_k``.

    Args:
        model: any classifier with a 4-D intermediate map.
        x: (B, C, H, W) inputs.
        classes: (B,) the class of each map.
        layer: the module (or its name) whose output is A (default: :func:`find_feature_layer`); a module called
            several times in one forward contributes its last call.
        upsample: bilinearly upsample the maps to the input size (after the ReLU, as Selvaraju et al.).

    Returns:
        (B, 1, h, w) non-negative maps, float32 or wider.

    Raises:
        ValueError: for a network without a 4-D intermediate map.
    """
    _check_images(x)
    if layer is None:
        found = find_feature_layer(model, x)
        if found is None:
            raise ValueError(f"{type(model).__name__} has no 4-D feature map for Grad-CAM.")
        layer = found[1]
    module = _layer_by_name(model, layer)
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with attack_context(model, "eval"), torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)  # frozen parameters: the input gives the maps a graph
            logits = model(xg)
            c = _classes(classes, x.shape[0], logits.shape[1], "classes", logits.device)
            maps = captured[-1]
            grads = torch.autograd.grad(logits.gather(1, c[:, None]).sum(), maps)[0]
    finally:
        handle.remove()
    dtype = torch.promote_types(maps.dtype, torch.float32)
    alpha = grads.detach().to(dtype).mean((2, 3), keepdim=True)
    cam = F.relu((alpha * maps.detach().to(dtype)).sum(1, keepdim=True))
    return _upsample(cam, x.shape[2:]) if upsample else cam


class ActivationMaps:
    """Class activation maps of one model: CAM where it ends in GAP + linear, Grad-CAM otherwise (``"auto"``).

    The head (or the Grad-CAM layer) is found once, on the first batch. A network with no 4-D map at all (an MLP)
    has no activation map: :attr:`method` is then ``None`` and calls return ``None``.

    Args:
        model: the classifier.
        method: ``"auto"``, ``"cam"`` or ``"grad_cam"``.
        layer: Grad-CAM's layer (a module or its name; default: :func:`find_feature_layer`).

    Example:
        >>> maps = ActivationMaps(model)(x, y)  # (B, 1, H, W), CAM or Grad-CAM of the true class  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, method: str = "auto", layer: str | nn.Module | None = None) -> None:
        if method not in MAP_METHODS:
            raise ValueError(f"method must be one of {MAP_METHODS}, got {method!r}.")
        self.model, self.requested, self.layer = model, method, layer
        self.method: str | None = None
        self._head: GapHead | None = None
        self._resolved = False

    def resolve(self, x: Tensor) -> str | None:
        """Decides the method on a probe batch (once) and returns it."""
        if self._resolved:
            return self.method
        self._resolved = True
        head = find_gap_head(self.model, x) if self.requested in ("auto", "cam") else None
        if self.requested == "cam" and head is None:
            raise ValueError(f"method='cam' needs a global-average-pooling + linear head, which "
                             f"{type(self.model).__name__} does not have; use 'grad_cam' or 'auto'.")  # fmt: skip
        if head is not None:
            self._head, self.method = head, "cam"
            return self.method
        if self.layer is None:
            found = find_feature_layer(self.model, x)
            if found is None:
                log.warning("%s has no 4-D feature map: no CAM or Grad-CAM, and no CAM-based interpretability score.",
                            type(self.model).__name__)  # fmt: skip
                return None
            self.layer = found[1]
        self.method = "grad_cam"
        return self.method

    def __call__(self, x: Tensor, classes: Tensor | Sequence[int]) -> Tensor | None:
        """(B, 1, H, W) maps of ``classes`` at ``x``, upsampled to the input size (``None`` without a method)."""
        method = self.resolve(x)
        if method == "cam":
            return class_activation_map(self.model, x, classes, head=self._head)
        if method == "grad_cam":
            return grad_cam(self.model, x, classes, layer=self.layer)
        return None


# ----------------------------------------------------------------------------------------- any attack's result
@dataclass
class SampleScores:
    """Interpretability of a batch of adversarial examples (NaN rows where a sample was not fooled).

    Attributes:
        percentiles: the ν.
        adv_class: (B,) the class the ASM is taken for (the target, or the adversarial class); -1 where not fooled.
        fooled: (B,) whether the adversarial point is misclassified (targeted: classified as the target).
        asm: (B, P) IS(ν) from the ASM.
        cam: (B, P) IS(ν) from the CAM (or Grad-CAM) of the true class; NaN without an activation map.
        method: ``"cam"``, ``"grad_cam"`` or ``None``.
    """

    percentiles: list[float]
    adv_class: Tensor
    fooled: Tensor
    asm: Tensor
    cam: Tensor
    method: str | None

    def mean(self) -> dict[str, list[float]]:
        """Per-ν means over the fooled samples: ``{"asm": [...], "cam": [...]}``."""
        return {name: _nanmean(getattr(self, name)[self.fooled]) for name in ("asm", "cam")}


def _nanmean(values: Tensor) -> list[float]:
    if values.numel() == 0:
        return [math.nan] * values.shape[-1]
    finite = torch.isfinite(values)
    counts = finite.sum(0)
    sums = torch.where(finite, values, torch.zeros_like(values)).sum(0)
    return [float(s / c) if c else math.nan for s, c in zip(sums.double(), counts, strict=True)]


def interpretability_scores(
    model: nn.Module,
    x: Tensor,
    adv: Tensor | AttackResult,
    labels: Tensor,
    *,
    targets: Tensor | None = None,
    percentiles: Sequence[float] = PERCENTILES,
    variant: Literal["pair", "all"] = "pair",
    maps: ActivationMaps | None = None,
) -> SampleScores:
    """IS(ν) from the ASM and from the CAM/Grad-CAM for any attack's adversarial examples.

    Args:
        model: the attacked classifier.
        x: (B, C, H, W) clean inputs.
        adv: the adversarial inputs, or the attack's :class:`AttackResult`.
        labels: (B,) true classes.
        targets: (B,) target classes of a targeted attack (``None``: the adversarial class, from a fresh forward).
        percentiles: the ν.
        variant: the ASM's, see :func:`adversarial_saliency_map`.
        maps: the model's :class:`ActivationMaps` (default: a new ``"auto"`` one).

    Returns:
        :class:`SampleScores`; samples that the point does not fool (or, targeted, that do not reach the target) get
        NaN rows.

    Example:
        >>> result = StrAttack(targeted=True)(model, x, targets)  # doctest: +SKIP
        >>> scores = interpretability_scores(model, x, result, y, targets=targets)  # doctest: +SKIP
        >>> scores.mean()["asm"]  # mean IS at the 30th ... 90th percentile  # doctest: +SKIP
    """
    percentiles = check_percentiles(percentiles, "percentiles")
    adv = adv.adv if isinstance(adv, AttackResult) else adv
    _check_images(x)
    if adv.shape != x.shape:
        raise ValueError(f"adv must have the shape of x {tuple(x.shape)}, got {tuple(adv.shape)}.")
    labels = labels.to(x.device).long()
    with attack_context(model, "eval"), torch.no_grad():
        predicted = model(adv).argmax(1)
    fooled = predicted != labels if targets is None else predicted == targets.to(x.device)
    target = predicted if targets is None else targets.to(x.device).long()
    maps = maps or ActivationMaps(model)
    size = (x.shape[0], len(percentiles))
    asm_is = torch.full(size, math.nan, device=x.device)
    cam_is = torch.full(size, math.nan, device=x.device)
    keep = fooled.nonzero().squeeze(1)
    method = maps.resolve(x)
    if keep.numel():
        xs, delta = x[keep], (adv[keep] - x[keep]).float()
        asm = adversarial_saliency_map(model, xs, target[keep], labels[keep], variant=variant)
        asm_is[keep] = interpretability_score(delta, asm, percentiles).float()
        cam = maps(xs, labels[keep])
        if cam is not None:
            cam_is[keep] = interpretability_score(delta, cam, percentiles).float()
    adv_class = torch.where(fooled, target, torch.full_like(target, -1))
    return SampleScores(percentiles, adv_class.cpu(), fooled.cpu(), asm_is.cpu(), cam_is.cpu(), method)


# ------------------------------------------------------------------------------------------------- evaluation
@dataclass
class GalleryItem:
    """One adversarial example of the gallery (CPU tensors).

    Attributes:
        index: the sample's position in the evaluated dataset.
        label: the true class.
        adv_class: the class at the adversarial point.
        x, adv: (C, H, W) clean and adversarial inputs.
        asm: (C, H, W) ASM of x for ``adv_class`` against ``label``.
        cam: (1, H, W) CAM/Grad-CAM of the true class at x, or ``None``.
    """

    index: int
    label: int
    adv_class: int
    x: Tensor
    adv: Tensor
    asm: Tensor
    cam: Tensor | None


@dataclass
class InterpretabilityResult:
    """Interpretability scores and gallery of every attack of an evaluation.

    Attributes:
        percentiles: the ν.
        method: ``"cam"``, ``"grad_cam"`` or ``None`` (the activation map of the CAM-based scores).
        variant: the ASM's variant.
        norm: the threat norm of the evaluation.
        attacks: the attacks' names, in evaluation order.
        scores: per attack, ``{"index": (n,), "asm": (n, P), "cam": (n, P)}`` over the samples it broke.
        examples: per attack, the kept :class:`GalleryItem` by sample index.
        gallery: per attack, the indices of its gallery (up to ``gallery_samples``, the first samples it broke).
        comparison: the indices of the comparison gallery (the first samples of the attacks' galleries).
    """

    percentiles: list[float]
    method: str | None
    variant: str
    norm: str
    attacks: list[str]
    scores: dict[str, dict[str, Tensor]]
    examples: dict[str, dict[int, GalleryItem]] = field(default_factory=dict)
    gallery: dict[str, list[int]] = field(default_factory=dict)
    comparison: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The numbers of ``report.json``: ``percentiles``, ``map`` (``"cam"``, ``"grad_cam"`` or ``None``),
        ``asm_variant``, ``gallery_indices`` (the comparison gallery's samples) and per attack the number of samples
        it broke, the mean IS at each ν (keys as ``"30"``) and the mean over ν, from the ASM (``asm``, ``asm_mean``)
        and from the CAM or Grad-CAM (``cam``, ``cam_mean``)."""
        keys = [f"{p:g}" for p in self.percentiles]
        attacks = {}
        for name in self.attacks:
            s = self.scores[name]
            entry: dict[str, Any] = {"samples": int(s["index"].numel())}
            for kind in ("asm", "cam"):
                curve = _nanmean(s[kind])
                entry[kind] = dict(zip(keys, curve, strict=True))
                finite = [v for v in curve if not math.isnan(v)]
                entry[f"{kind}_mean"] = sum(finite) / len(finite) if finite else math.nan
            attacks[name] = entry
        return {"percentiles": list(self.percentiles), "map": self.method, "asm_variant": self.variant,
                "gallery_indices": self.comparison, "attacks": attacks}  # fmt: skip


class InterpretabilityCollector:
    """Collects IS(ν) and gallery examples from an evaluation, as the ``on_verified`` hook of
    :func:`advtrain.evaluation.attack_batch`.

    Each verified adversarial point an attack finds at a budget up to the main ε (a minimal-norm attack: its one
    point) is scored at once, so no image is kept but the gallery's. :meth:`finish` then keeps, per attack and
    sample, the point that the evaluation's records credit: the one of the smallest ε at which the records say the
    attack broke the sample (every budgeted point lies inside the main ε-ball). With the cascade an attack is credited
    only with the samples that no earlier attack broke, so each attack's IS is over the samples it broke itself.
    Minimal-norm attacks' points are taken as found, whatever their norm (verified, not clipped to ε): IS measures
    where a perturbation lies, not its size, and clipping a minimal point into the ball would undo its success.

    The gallery holds, per attack and ε, the examples of the ``gallery_samples`` smallest sample indices seen there,
    so :meth:`finish` can show the first samples each attack is credited with. In a fused run a cell may hold rows
    that the records credit to an earlier attack, so a gallery can show fewer samples than asked. Under DDP the ranks'
    findings are gathered (``all_gather_object``) and every rank returns the same result.

    Args:
        model: the evaluated classifier.
        attacks: the attacks' names and whether each is minimal-norm, in evaluation order.
        grid: the ε grid (ascending); ``eps``: its main budget.
        percentiles: the ν.
        gallery_samples: examples per attack in the gallery (0: none).
        norm: the threat norm (for the gallery's titles).
        variant: the ASM's.
        method: the activation map's (``"auto"``: CAM or Grad-CAM).
    """

    def __init__(
        self,
        model: nn.Module,
        attacks: Sequence[tuple[str, bool]],
        grid: Sequence[float],
        eps: float,
        *,
        percentiles: Sequence[float] | None = None,
        gallery_samples: int = 4,
        norm: str = "",
        variant: Literal["pair", "all"] = "pair",
        method: str = "auto",
    ) -> None:
        if isinstance(gallery_samples, bool) or not isinstance(gallery_samples, int) or gallery_samples < 0:
            raise InvalidConfigError(f"gallery_samples must be an int >= 0, got {gallery_samples!r}.")
        if variant not in ASM_VARIANTS:
            raise ValueError(f"variant must be one of {ASM_VARIANTS}, got {variant!r}.")
        self.model = model
        self.names = [name for name, _ in attacks]
        self.minimal = [bool(minimal) for _, minimal in attacks]
        self.main = list(grid).index(eps)
        self.percentiles = check_percentiles(percentiles)
        self.gallery_samples = gallery_samples
        self.norm, self.variant = norm, variant
        self.maps = ActivationMaps(model, method=method)
        self._scores: list[list[tuple[Tensor, int, Tensor, Tensor]]] = [[] for _ in self.names]
        self._gallery: list[dict[int, dict[int, GalleryItem]]] = [{} for _ in self.names]

    def __call__(self, attack: int, column: int | None, index: Tensor, x: Tensor, y: Tensor, adv: Tensor,
                 fooled: Tensor) -> None:  # fmt: skip
        """Scores the verified points of one attack call: ``column`` is the ε's position in the grid (``None`` for a
        minimal-norm attack), ``index`` the samples' dataset positions, ``adv`` the verified (clipped) points."""
        column = 0 if column is None else int(column)
        if column > self.main:
            return
        self.maps.resolve(x)  # once, on the first rows attacked: the report names the map even if nothing breaks
        keep = fooled.nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        x, y, adv = x[keep], y[keep], adv[keep]
        index = index.cpu()[keep.cpu()]
        with attack_context(self.model, "eval"), torch.no_grad():
            adv_class = self.model(adv).argmax(1)
        asm = adversarial_saliency_map(self.model, x, adv_class, y, variant=self.variant)
        cam = self.maps(x, y)
        delta = (adv - x).float()
        nan = torch.full((x.shape[0], len(self.percentiles)), math.nan)
        is_asm = interpretability_score(delta, asm, self.percentiles).float().cpu()
        is_cam = interpretability_score(delta, cam, self.percentiles).float().cpu() if cam is not None else nan
        self._scores[attack].append((index, column, is_asm, is_cam))
        if self.gallery_samples:
            held = self._gallery[attack].setdefault(column, {})
            for r, i in enumerate(index.tolist()):
                held[i] = GalleryItem(i, int(y[r]), int(adv_class[r]), x[r].detach().float().cpu(),
                                      adv[r].detach().float().cpu(), asm[r].float().cpu(),
                                      None if cam is None else cam[r].float().cpu())  # fmt: skip
            for i in sorted(held)[self.gallery_samples :]:
                del held[i]

    def _gathered(self) -> tuple[list, list]:
        from advtrain.evaluation.sampling import dist_info

        _, world = dist_info()
        if world == 1:
            return self._scores, self._gallery
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (self._scores, self._gallery))
        scores = [[entry for part in parts for entry in part[0][a]] for a in range(len(self.names))]
        gallery: list[dict[int, dict[int, GalleryItem]]] = [{} for _ in self.names]
        for part in parts:
            for a, columns in enumerate(part[1]):
                for column, items in columns.items():
                    gallery[a].setdefault(column, {}).update(items)
        return scores, gallery

    def finish(self, data: Mapping[str, Tensor]) -> InterpretabilityResult:
        """The scores and gallery that the evaluation's records (``RobustnessReport.data``) credit each attack with.

        A collective call under DDP: every rank must call it."""
        scores, gallery = self._gathered()
        row_of = {int(i): r for r, i in enumerate(data["index"].tolist())}
        width = len(self.percentiles)
        out: dict[str, dict[str, Tensor]] = {}
        examples: dict[str, dict[int, GalleryItem]] = {}
        for a, name in enumerate(self.names):
            fooled = data["fooled"][:, a, : 1 if self.minimal[a] else self.main + 1].bool()
            # The smallest credited ε column per row (-1: not credited); argmax returns the first maximum.
            first = torch.where(fooled.any(1), fooled.float().argmax(1), torch.full((fooled.shape[0],), -1))
            found: dict[int, tuple[Tensor, Tensor]] = {}  # a later entry (an out-of-memory retry's) replaces one
            for index, column, is_asm, is_cam in scores[a]:
                for r, i in enumerate(index.tolist()):
                    if i in row_of and int(first[row_of[i]]) == column:
                        found[i] = (is_asm[r], is_cam[r])
            ordered = sorted(found)
            out[name] = {
                "index": torch.tensor(ordered, dtype=torch.long),
                "asm": torch.stack([found[i][0] for i in ordered]) if ordered else torch.zeros(0, width),
                "cam": torch.stack([found[i][1] for i in ordered]) if ordered else torch.zeros(0, width),
            }
            held = (gallery[a].get(int(first[row_of[i]]), {}).get(i) for i in ordered)
            examples[name] = {item.index: item for item in held if item is not None}
        chosen = {name: sorted(items)[: self.gallery_samples] for name, items in examples.items()}
        comparison = sorted({i for indices in chosen.values() for i in indices})[: self.gallery_samples]
        return InterpretabilityResult(self.percentiles, self.maps.method, self.variant, self.norm, list(self.names),
                                      out, examples, chosen, comparison)  # fmt: skip


def interpretability_scalars(summary: Mapping[str, Any], prefix: str = "robust") -> dict[str, float]:
    """Flat logger keys of ``report.json``'s ``interpretability``: per attack ``{prefix}/{attack}/is_asm@{ν}``,
    ``is_asm_mean``, the same for ``is_cam``, and ``is_samples``."""
    out = {}
    for name, entry in summary["attacks"].items():
        out[f"{prefix}/{name}/is_samples"] = float(entry["samples"])
        for kind in ("asm", "cam"):
            for key, value in entry[kind].items():
                out[f"{prefix}/{name}/is_{kind}@{key}"] = _float(value)
            out[f"{prefix}/{name}/is_{kind}_mean"] = _float(entry[f"{kind}_mean"])
    return out


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _cell(value: Any) -> str:
    value = _float(value)
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def interpretability_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The lines of ``report.md``'s interpretability section (from ``report.json``'s ``interpretability``)."""
    keys = [f"{p:g}" for p in summary["percentiles"]]
    cam = {"cam": "the CAM", "grad_cam": "the Grad-CAM"}.get(summary.get("map") or "", None)
    lines = [
        "",
        "## Interpretability (seed 002, §6)",
        "",
        "IS(ν) = ‖B(ν) ∘ δ‖₂ / ‖δ‖₂: how much of a perturbation lies where a map of the clean image is above its ν-th "
        "percentile (1: all of it, 0: none), averaged over the samples each attack broke (budgeted attacks: at the "
        "smallest ε of the grid up to the main one where they broke it; minimal-norm attacks: their point, whatever "
        "its norm). B from the adversarial saliency map (ASM, for the adversarial class against the true one"
        + (f") and from {cam} of the true class." if cam else "); this model has no map for a CAM-based score."),
        "",
    ]
    kinds = [("asm", "ASM")] + ([("cam", cam.split()[-1])] if cam else [])
    for kind, title in kinds:
        lines += [
            "| attack | samples | " + " | ".join(f"IS_{title}({k})" for k in keys) + " | mean |",
            "|---|---|" + "---|" * (len(keys) + 1),
        ]
        for name, entry in summary["attacks"].items():
            cells = " | ".join(_cell(entry[kind][k]) for k in keys)
            lines.append(f"| {name} | {entry['samples']} | {cells} | {_cell(entry[f'{kind}_mean'])} |")
        lines.append("")
    files = summary.get("gallery_files") or []
    if files:
        lines += ["Galleries: " + ", ".join(f"[{f}]({f})" for f in files)]
    return lines
