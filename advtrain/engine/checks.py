"""Input validation shared by attacks, maximizers and the training module."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from advtrain.errors import InvalidInputError

_BOX_TOLERANCE = 1e-6


def check_inputs(inputs: Tensor) -> None:
    """Raises a clear error unless ``inputs`` is a floating batch of finite images in [0, 1].

    Raises:
        InvalidInputError (a ValueError): naming what is wrong and what to do.
    """
    if not torch.is_floating_point(inputs):
        raise InvalidInputError(f"inputs must be a floating-point tensor in [0, 1], got dtype {inputs.dtype}.")
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise InvalidInputError(f"inputs must be a non-empty batch of shape (B, ...), got shape {tuple(inputs.shape)}.")
    lo, hi = torch.aminmax(inputs.detach())
    lo, hi = float(lo), float(hi)
    if not (lo == lo and hi == hi) or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise InvalidInputError("inputs contain NaN or infinite values.")
    if lo < -_BOX_TOLERANCE or hi > 1 + _BOX_TOLERANCE:
        raise InvalidInputError(
            f"inputs must lie in [0, 1] but range over [{lo:.4g}, {hi:.4g}]: advtrain models take [0, 1] images "
            "and normalise inside the model. Remove any Normalize transform from the data pipeline and pass "
            "the dataset's mean/std to the model instead (advtrain.models.create_model(..., mean=..., std=...))."
        )


def check_model_inputs(model: torch.nn.Module, inputs: Tensor, image_shape: tuple[int, ...] | None = None) -> None:
    """Raises a clear error when ``inputs`` cannot go into ``model``: inputs of a dtype other than float32 (the
    datamodules' dtype) and other than the model's parameters' (float64 images into a float32 model), or a shape
    other than the model's ``image_shape`` (C, H, W) when it is known (3-channel images into a 1-channel model).
    Reads no tensor values.

    Raises:
        InvalidInputError (a ValueError): naming both and what to change.
    """
    param = next((p for p in model.parameters() if torch.is_floating_point(p)), None)
    if param is not None and inputs.dtype not in (torch.float32, param.dtype):
        raise InvalidInputError(
            f"inputs are {inputs.dtype} but the model's parameters are {param.dtype}: convert the images with "
            f"x.to({param.dtype}) (advtrain's datamodules yield float32 in [0, 1])."
        )
    if image_shape is not None and tuple(inputs.shape[1:]) != tuple(image_shape):
        raise InvalidInputError(
            f"inputs have shape (C, H, W) = {tuple(inputs.shape[1:])} but the model was built for "
            f"{tuple(image_shape)} (image_shape, linked from the datamodule): check the dataset's channels and size "
            "(e.g. grayscale versus RGB) or build the model for these images."
        )


def check_logits(outputs: object) -> Tensor:
    """Returns ``outputs`` if it is a logits tensor (B, K); otherwise raises a clear error (a model returning a
    tuple or a dict, as some model zoos do). Reads no tensor values."""
    if not isinstance(outputs, Tensor):
        kind = type(outputs).__name__
        keys = f" with keys {sorted(outputs)}" if isinstance(outputs, dict) else ""
        raise InvalidInputError(
            f"the model returned a {kind}{keys}, not a logits tensor: advtrain needs model(x) -> (B, num_classes) "
            "logits. Wrap the model in a module whose forward returns only the logits."
        )
    if outputs.ndim != 2:
        raise InvalidInputError(f"the model must return logits of shape (B, num_classes), got {tuple(outputs.shape)}.")
    return outputs


def check_labels(labels: Tensor, num_classes: int, batch_size: int | None = None) -> None:
    """Raises a clear error unless ``labels`` are int64 class indices in [0, num_classes).

    Raises:
        InvalidInputError (a ValueError): naming the offending dtype or range and the number of classes.
    """
    if labels.dtype in (torch.bool,) or torch.is_floating_point(labels) or torch.is_complex(labels):
        raise InvalidInputError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if labels.dtype != torch.int64:  # the losses (cross_entropy, gather) take int64 only
        raise InvalidInputError(f"labels must be int64 (torch.long) class indices, got {labels.dtype}: use y.long().")
    if labels.ndim != 1 or (batch_size is not None and labels.shape[0] != batch_size):
        raise InvalidInputError(f"labels must have shape ({batch_size or 'B'},), got {tuple(labels.shape)}.")
    lo, hi = torch.aminmax(labels)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_classes:
        raise InvalidInputError(
            f"labels must lie in [0, {num_classes - 1}] for a {num_classes}-class model, but range over "
            f"[{lo}, {hi}]. Check that the model's num_classes matches the dataset."
        )


class ProbabilitiesWarning(UserWarning):
    """The model seems to return probabilities (softmax outputs) where logits are expected."""


def looks_like_probabilities(outputs: Tensor) -> Tensor | None:
    """The test behind :func:`warn_if_probabilities` without reading its answer: a 0-dim bool tensor on the outputs'
    device (so no host sync), true when every row lies in [0, 1] and sums to 1 (``torch.allclose``'s tolerances,
    atol 1e-4); ``None`` when the shape or dtype already rules probabilities out. The training module keeps the
    answer on the device and reads it with its next divergence check."""
    if outputs.ndim != 2 or outputs.shape[1] < 2 or not torch.is_floating_point(outputs):
        return None
    out = outputs.detach().float()
    sums = out.sum(dim=1)
    in_box = ((out >= 0.0) & (out <= 1.0)).all()
    return in_box & torch.isclose(sums, torch.ones_like(sums), atol=1e-4).all()


def warn_probabilities(stacklevel: int = 2) -> None:
    """Issues the :class:`ProbabilitiesWarning` (see :func:`warn_if_probabilities`)."""
    warnings.warn(
        "The model's outputs lie in [0, 1] and sum to 1 per sample: it seems to return probabilities, not logits. "
        "advtrain's losses and attacks expect logits (the softmax is applied inside the loss); on probabilities "
        "the gradients saturate, attacks look weaker than they are (gradient masking) and cross-entropy is "
        "applied twice. Remove the final softmax from the model (return the pre-softmax scores).",
        ProbabilitiesWarning,
        stacklevel=stacklevel + 1,
    )


def warn_if_probabilities(outputs: Tensor) -> bool:
    """Warns (once per call site) when a model's outputs look like probabilities rather than logits: every row in
    [0, 1] and summing to 1. Attacks and losses then work on a saturated softmax, whose gradients vanish — the
    classic source of gradient masking — and cross-entropy is applied twice. Returns whether it warned.

    A logit vector meets this test only by accident (all K logits in [0, 1] with sum exactly 1), so the check does
    not fire on real classifiers. Reading the answer is one host sync (:func:`looks_like_probabilities` is the
    sync-free half).
    """
    flag = looks_like_probabilities(outputs)
    if flag is None or not bool(flag):
        return False
    warn_probabilities(stacklevel=3)
    return True
