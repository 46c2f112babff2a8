"""Building a registered classifier from the dataset's facts, and loading classifier weights into it.

Used by the LightningModule (:class:`advtrain.training.AdversarialTraining`: ``arch``, ``init_weights``) and by the
CLI's ``evaluate`` (``--arch``, ``--ckpt_path``). It sits below both: it reads weight files with
:func:`advtrain.safe_load.read_checkpoint` and imports nothing of :mod:`advtrain.training`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from advtrain.models.base import Classifier
from advtrain.models.registry import create_model, model_keywords
from advtrain.models.robustbench import describe_key_mismatch, robustbench_wrn_state_dict
from advtrain.models.wide_resnet import WideResNet
from advtrain.safe_load import CheckpointError, read_checkpoint

__all__ = ["build_model", "load_classifier_weights"]

log = logging.getLogger(__name__)


def build_model(
    arch: str,
    arch_kwargs: dict[str, Any],
    num_classes: int,
    image_shape: Sequence[int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Classifier:
    """Builds the classifier registered as ``arch``, passing the linked dataset facts only to models that take them.

    Args:
        arch: registered model name (:func:`advtrain.models.list_models`).
        arch_kwargs: extra keyword arguments for the model; they override the linked facts.
        num_classes: number of classes (``num_classes``).
        image_shape: (C, H, W) of the inputs (``in_channels`` = C, ``input_size`` = W).
        mean: per-channel normalisation mean applied inside the model, or ``None`` for the model's default.
        std: per-channel normalisation std, or ``None``.

    Returns:
        The model, as :func:`advtrain.models.create_model` builds it.
    """
    accepted = model_keywords(arch)
    linked: dict[str, Any] = {"num_classes": num_classes, "in_channels": image_shape[0], "input_size": image_shape[-1]}
    if mean is not None:
        linked["mean"] = tuple(mean)
    if std is not None:
        linked["std"] = tuple(std)
    kwargs = {k: v for k, v in linked.items() if accepted is None or k in accepted}
    kwargs.update(arch_kwargs)
    return create_model(arch, **kwargs)


def load_classifier_weights(
    model: nn.Module, path: str, what: str = "init_weights", ckpt: dict[str, Any] | None = None
) -> None:
    """Loads classifier weights from an advtrain checkpoint (``model.*`` keys) or a plain state dict
    (RobustBench style: ``state_dict``/``model`` wrappers and DDP's ``module.`` prefixes are unwrapped).

    A plain state dict may lack the model's ``mean``/``std`` buffers: the normalisation then stays the one the model
    was built with (from the dataset). A state dict in RobustBench's WideResNet layout (``conv1``,
    ``block1.layer.N``, ``convShortcut``, ``bn1``, ``fc``) loads into advtrain's ``wide_resnet`` through
    :func:`~advtrain.models.robustbench.robustbench_wrn_state_dict`, when the renamed keys fit exactly.

    Args:
        model: the classifier to load into (in place).
        path: the file, read without executing code (:func:`~advtrain.safe_load.read_checkpoint`).
        what: the option that chose the model, for the message when the weights do not fit (``init_weights``, or
            ``--arch`` for ``evaluate``).
        ckpt: the file's content when already read (by ``read_checkpoint``).

    Raises:
        CheckpointError: the weights do not fit the model (the message names ``what`` and the mismatched keys).
    """
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state, kept = _fit_known_layouts(model, state, path)
    try:
        model.load_state_dict(state, strict=not kept)
    except RuntimeError as err:
        raise CheckpointError(
            f"{what}: the weights in {path} do not fit the {type(model).__name__} model it names "
            f"({describe_key_mismatch(model.state_dict(), state, {'mean', 'std'})}): pass the architecture they were "
            f"trained with ({str(err).splitlines()[0]})"
        ) from None
    if kept:
        log.info("%s: the weights in %s hold no %s; the model keeps the normalisation of its dataset.", what, path,
                 "/".join(kept))  # fmt: skip


def _fit_known_layouts(model: nn.Module, state: dict[str, Any], path: str) -> tuple[dict[str, Any], list[str]]:
    """``state`` as it fits ``model``, and the normalisation buffers (``mean``/``std``) it lacks, which keep the
    model's own values: unchanged, or renamed from RobustBench's WideResNet layout when that makes the keys fit
    exactly. Anything else is returned unchanged (with no buffer to keep), for the strict load to refuse."""
    expected = set(model.state_dict())
    normalisation = expected & {"mean", "std"}  # a Classifier's own buffers, set from the dataset when built

    def fit(candidate: dict[str, Any]) -> list[str] | None:
        missing = expected - set(candidate)
        return sorted(missing) if set(candidate) <= expected and missing <= normalisation else None

    kept = fit(state)
    if kept is not None:
        return state, kept
    if isinstance(model, WideResNet):
        mapped = robustbench_wrn_state_dict(state)
        kept = fit(mapped) if mapped is not None else None
        if kept is not None:
            log.info("%s: RobustBench's WideResNet layout (conv1, block*.layer.*, convShortcut, fc) mapped onto "
                     "advtrain's wide_resnet.", path)  # fmt: skip
            return mapped, kept
    return state, []
