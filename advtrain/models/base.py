"""Base class shared by every classifier in :mod:`advtrain.models`.

Every model takes inputs in ``[0, 1]`` and normalises them internally, so that threat models (an
``eps`` ball in pixel space, clipping to the image box) are defined in the same space for every model
and data set, whatever the per-channel statistics.

Every model is also split into a first layer ``f0`` and a remainder ``g`` with
``forward(x) == rest(layer_one(x))``, as required by YOPO (Zhang et al., "You Only Propagate Once:
Accelerating Adversarial Training via Maximal Principle", NeurIPS 2019), which updates the adversary
using only the gradient with respect to the output of the first layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Classifier", "check_positive_int"]


def check_positive_int(value: int, name: str) -> None:
    """Validates a size argument.

    Args:
        value: The value to check.
        name: Name of the argument, used in the error message.

    Raises:
        ValueError: If ``value`` is not an ``int`` of at least 1.
    """
    # bool is an int subclass, but True as a size is certainly a configuration mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _channel_statistic(values: Sequence[float] | None, *, name: str, in_channels: int, default: float) -> Tensor:
    """Turns a per-channel statistic into a buffer of shape ``(1, C, 1, 1)``.

    Args:
        values: One value per input channel, or ``None`` for the identity value ``default``.
        name: Name of the argument, used in error messages.
        in_channels: Number of input channels ``C`` the values must cover.
        default: Value used for every channel when ``values`` is ``None``.

    Returns:
        A float32 tensor of shape ``(1, in_channels, 1, 1)``.

    Raises:
        ValueError: If ``values`` does not hold exactly ``in_channels`` finite numbers.
    """
    if values is None:
        return torch.full((1, in_channels, 1, 1), float(default))
    if isinstance(values, str | bytes):
        # A string is a Sequence, but "0.5" would be read character by character.
        raise ValueError(f"{name} must be a sequence of {in_channels} numbers, got the string {values!r}")
    try:
        tensor = torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a sequence of {in_channels} numbers, got {values!r}") from err
    if tensor.dim() != 1 or tensor.numel() != in_channels:
        got = "a scalar" if tensor.dim() == 0 else f"shape {tuple(tensor.shape)}"
        raise ValueError(f"{name} must have one entry per input channel (in_channels={in_channels}), got {got}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite, got {tensor.tolist()}")
    return tensor.view(1, in_channels, 1, 1).clone()


class Classifier(nn.Module):
    """Image classifier taking inputs in ``[0, 1]``, split into ``layer_one`` and ``rest`` for YOPO.

    Subclasses must, in their ``__init__``, call ``super().__init__`` and assign ``self.first`` (the
    module computing the first layer ``f0`` from the normalised input), and must implement
    :meth:`rest` (the remainder ``g``, from the output of ``self.first`` to the logits).

    The YOPO split follows Zhang et al., "You Only Propagate Once: Accelerating Adversarial Training via
    Maximal Principle", NeurIPS 2019: the adversary is updated with the gradient at the output of layer
    one, so ``self.first`` must be exactly the part of the network whose parameters are coupled to the
    adversary.

    Attributes:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        input_size: Spatial side length of the square inputs the model is built for, or ``None`` when
            any size large enough works (fully convolutional models with global pooling).
        mean: Persistent buffer of shape ``(1, C, 1, 1)`` subtracted from the input.
        std: Persistent buffer of shape ``(1, C, 1, 1)`` dividing the centred input.
        first: The layer-one module ``f0``.
    """

    input_size: int | None = None
    first: nn.Module
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Stores the sizes and registers the normalisation buffers.

        Args:
            num_classes: Number of output logits; at least 1.
            in_channels: Number of input channels; at least 1.
            mean: Per-channel mean subtracted from inputs in ``[0, 1]``; ``None`` means 0 (no centring).
            std: Per-channel standard deviation dividing the centred inputs; ``None`` means 1. Every
                entry must be strictly positive.

        Raises:
            ValueError: If a size is not a positive integer, ``mean`` or ``std`` does not have
                ``in_channels`` finite entries, or an entry of ``std`` is not positive.
        """
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        self.num_classes = num_classes
        self.in_channels = in_channels
        mean_t = _channel_statistic(mean, name="mean", in_channels=in_channels, default=0.0)
        std_t = _channel_statistic(std, name="std", in_channels=in_channels, default=1.0)
        if (std_t <= 0).any():
            raise ValueError(f"std must be strictly positive in every channel, got {std_t.flatten().tolist()}")
        # Persistent, so a checkpoint carries the statistics its weights were trained with.
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def normalize(self, x: Tensor) -> Tensor:
        """Maps an input in ``[0, 1]`` to the normalised space the weights operate in.

        Args:
            x: Batch of shape ``(B, C, H, W)`` with values in ``[0, 1]``.

        Returns:
            ``(x - mean) / std``, same shape as ``x``.
        """
        return (x - self.mean) / self.std

    def layer_one(self, x: Tensor) -> Tensor:
        """Computes the first layer ``f0`` (YOPO, Zhang et al. 2019), normalisation included.

        Args:
            x: Batch of shape ``(B, C, H, W)`` with values in ``[0, 1]``.

        Returns:
            The output of ``self.first`` on the normalised input.
        """
        return self.first(self.normalize(x))

    def rest(self, h: Tensor) -> Tensor:
        """Computes the remainder ``g`` of the network (YOPO, Zhang et al. 2019).

        Args:
            h: Output of :meth:`layer_one`.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement rest()")

    def forward(self, x: Tensor) -> Tensor:
        """Classifies a batch of images.

        Args:
            x: Batch of shape ``(B, C, H, W)`` with values in ``[0, 1]``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        return self.rest(self.layer_one(x))

    def layer_one_parameters(self) -> list[nn.Parameter]:
        """Parameters of the first layer ``f0``, the ones YOPO couples to the adversary.

        Returns:
            The parameters of ``self.first``, in registration order.
        """
        return list(self.first.parameters())

    def rest_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the first layer, i.e. those of the remainder ``g``.

        Returns:
            Every parameter of the model not returned by :meth:`layer_one_parameters`, in registration
            order.
        """
        layer_one_ids = {id(p) for p in self.layer_one_parameters()}
        return [p for p in self.parameters() if id(p) not in layer_one_ids]


def fixed_size_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``model.classifier(model.features(h).flatten(1))`` for models whose linear head fixes the input size.

    Raises:
        ValueError: If the input did not have the ``input_size`` the model was built for (instead of an opaque
            matmul shape error deep inside ``nn.Linear``).
    """
    features = model.features(h).flatten(1)
    expected = model.classifier[0].in_features
    if features.shape[1] != expected:
        raise ValueError(
            f"{type(model).__name__} was built for {model.input_size}x{model.input_size} inputs ({expected} "
            f"features), but got {features.shape[1]} features; pass the right input_size"
        )
    return model.classifier(features)
