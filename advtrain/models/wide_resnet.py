"""Wide residual networks.

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016. WRN-34-10 is the standard robust CIFAR
model since Madry et al. 2018 and Zhang et al. 2019 (TRADES); WRN-28-10 is used by Rice et al. 2020 and
most RobustBench entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.models._init import init_resnet_weights
from advtrain.models.base import Classifier, check_positive_int
from advtrain.models.registry import register_model

__all__ = ["WideBasicBlock", "WideResNet", "wrn28_4", "wrn28_10", "wrn34_10"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide block ``BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3`` plus the shortcut.

    As in the official WRN code (Zagoruyko and Komodakis 2016): dropout sits between the two
    convolutions, and when the shape changes the shortcut is a 1x1 projection of the pre-activated input.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution and of the projection.
        dropout: Dropout probability between the two convolutions.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block.

        Args:
            x: Input of shape ``(B, in_planes, H, W)``.

        Returns:
            Output of shape ``(B, planes, H / stride, W / stride)``.
        """
        out = F.relu(self.bn1(x))
        # Only a projection consumes the pre-activated signal; the identity path stays untouched.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


@register_model("wide_resnet")
class WideResNet(Classifier):
    """WRN-``depth``-``widen_factor`` (Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016).

    A 3x3 stem convolution with 16 channels, then three groups of ``n = (depth - 4) / 6``
    :class:`WideBasicBlock` with ``16k``, ``32k`` and ``64k`` channels (``k = widen_factor``) and
    strides 1/2/2, final BN-ReLU, global average pooling and a linear classifier. Layer one (for YOPO) is
    the stem convolution alone.

    Initialisation: He-normal ``fan_out`` convolutions, BatchNorm weight 1 and bias 0, linear bias 0 and linear
    weight PyTorch's default (:func:`~advtrain.models._init.init_resnet_weights`), as in the WideResNet of the
    TRADES reference code (yaodongyu/TRADES, ``models/wideresnet.py``: normal with std sqrt(2 / (k·k·out_channels)))
    and of Rice et al.'s (locuslab/robust_overfitting, ``wideresnet.py``).

    Args:
        depth: Total depth, of the form ``6n + 4`` with ``n >= 1`` (28, 34, 40, ...).
        widen_factor: Width multiplier ``k``.
        dropout: Dropout probability inside each block; 0 disables it.
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        mean: Per-channel input mean, see :class:`~advtrain.models.base.Classifier`.
        std: Per-channel input standard deviation, see :class:`~advtrain.models.base.Classifier`.

    Raises:
        ValueError: If ``depth`` is not ``6n + 4``, ``widen_factor`` is not a positive integer or
            ``dropout`` is outside ``[0, 1)``.
    """

    def __init__(
        self,
        *,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth!r}")
        check_positive_int(widen_factor, "widen_factor")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.depth = depth
        self.widen_factor = widen_factor
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.first = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        groups = []
        in_planes = 16
        for planes, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [WideBasicBlock(in_planes, planes, stride, dropout)]
            blocks += [WideBasicBlock(planes, planes, 1, dropout) for _ in range(blocks_per_group - 1)]
            groups.append(nn.Sequential(*blocks))
            in_planes = planes
        self.block1, self.block2, self.block3 = groups
        # Pre-activation blocks end on a convolution, so the head needs its own BN-ReLU.
        self.bn = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], num_classes)
        init_resnet_weights(self)

    def rest(self, h: Tensor) -> Tensor:
        """Maps the stem output to logits.

        Args:
            h: Output of :meth:`layer_one`, shape ``(B, 16, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        out = self.block3(self.block2(self.block1(h)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _preset(name: str, depth: int, widen_factor: int, summary: str):
    """Registers a fixed-size WideResNet under ``name``; its depth and width cannot be overridden."""

    def build(
        *,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> WideResNet:
        return WideResNet(
            depth=depth, widen_factor=widen_factor, dropout=dropout, num_classes=num_classes,
            in_channels=in_channels, mean=mean, std=std,
        )  # fmt: skip

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"""{summary}

    Initialisation: as :class:`WideResNet` (He-normal ``fan_out`` convolutions, as the TRADES reference code).

    Args:
        dropout: Dropout probability inside each block.
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        mean: Per-channel input mean.
        std: Per-channel input standard deviation.

    Returns:
        A freshly initialised :class:`WideResNet` with ``depth={depth}, widen_factor={widen_factor}``.
    """
    return register_model(name)(build)


wrn28_10 = _preset("wrn28_10", 28, 10, "WRN-28-10 (Zagoruyko and Komodakis 2016), about 36.5 M parameters.")
wrn34_10 = _preset("wrn34_10", 34, 10, "WRN-34-10 (Zagoruyko and Komodakis 2016; Madry et al. 2018), about 46.2 M.")
wrn28_4 = _preset("wrn28_4", 28, 4, "WRN-28-4 (Zagoruyko and Komodakis 2016), a cheaper wide network of about 5.8 M.")
