"""Weight initialisation shared by the residual architectures."""

from __future__ import annotations

from torch import nn

__all__ = ["init_resnet_weights"]


def init_resnet_weights(model: nn.Module) -> None:
    """He initialisation for convolutions, unit/zero batch norm, zero linear bias, in place.

    He, Zhang, Ren and Sun, "Delving Deep into Rectifiers", ICCV 2015. ``fan_out`` mode keeps the
    variance of the backward signal constant through ReLU networks; it is the convention of the ResNet
    (He et al. 2016) and WideResNet (Zagoruyko and Komodakis 2016) reference code.

    Args:
        model: Model whose ``Conv2d``, ``BatchNorm2d`` and ``Linear`` submodules are initialised.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # The weight keeps PyTorch's default uniform init; a zero bias starts from unbiased logits.
            nn.init.zeros_(module.bias)
