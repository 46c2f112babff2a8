"""Pre-activation ResNet-18, CIFAR variant.

He, Zhang, Ren and Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016. The CIFAR variant
(3x3 stem without pooling, four stages of basic blocks) is the standard backbone of adversarial-training
papers, e.g. Rice, Wong and Kolter, "Overfitting in adversarially robust deep learning", ICML 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.models._init import init_resnet_weights
from advtrain.models.base import Classifier
from advtrain.models.registry import register_model

__all__ = ["PreActBlock", "PreActResNet18"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` plus the shortcut.

    Follows He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (full pre-activation).
    When the shape changes, the shortcut is a 1x1 projection of the pre-activated input, so that both
    branches see the same normalised signal.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution and of the projection.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
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
        # The identity path must stay un-normalised (the point of identity mappings); only a projection
        # consumes the pre-activated signal.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


@register_model("preact_resnet18")
class PreActResNet18(Classifier):
    """PreActResNet-18 for 32x32 images (He et al., "Identity Mappings in Deep Residual Networks", 2016).

    3x3 stem convolution with 64 channels, four stages of two :class:`PreActBlock` with 64/128/256/512
    channels and strides 1/2/2/2, final BN-ReLU, global average pooling and a linear classifier. Layer
    one (for YOPO) is the stem convolution alone. Global pooling makes any input side of at least 8
    pixels work (e.g. 28x28 MNIST with ``in_channels=1``).

    Initialisation: ``init="he"`` (the default) is advtrain's residual-network init (He-normal ``fan_out``
    convolutions, BatchNorm weight 1 and bias 0, linear bias 0, linear weight PyTorch's default), the convention of
    the WideResNet reference code, not of this network's: the PreActResNet-18 of Rice et al.'s reference code
    (locuslab/robust_overfitting, ``preactresnet.py``) re-initialises nothing, i.e. PyTorch's default layer init,
    which ``init="torch"`` gives.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        init: ``"he"`` or ``"torch"`` (above).
        mean: Per-channel input mean, see :class:`~advtrain.models.base.Classifier`.
        std: Per-channel input standard deviation, see :class:`~advtrain.models.base.Classifier`.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        init: Literal["he", "torch"] = "he",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        if init not in ("he", "torch"):
            raise ValueError(f"init must be 'he' or 'torch', got {init!r}")
        self.init = init
        self.first = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # Pre-activation blocks end on a convolution, so the head needs its own BN-ReLU.
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)
        if init == "he":
            init_resnet_weights(self)

    def rest(self, h: Tensor) -> Tensor:
        """Maps the stem output to logits.

        Args:
            h: Output of :meth:`layer_one`, shape ``(B, 64, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        out = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
