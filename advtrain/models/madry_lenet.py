"""The MNIST network of Madry et al.

Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018 (the model of the MNIST challenge).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from advtrain.models.base import Classifier, check_positive_int, fixed_size_head
from advtrain.models.registry import register_model

__all__ = ["MadryLeNet"]


@register_model("madry_lenet")
class MadryLeNet(Classifier):
    """LeNet-style MNIST model of Madry et al., "Towards Deep Learning Models Resistant to Adversarial
    Attacks", ICLR 2018.

    ``conv5x5(32, same)-ReLU-maxpool2-conv5x5(64, same)-ReLU-maxpool2-flatten-FC(1024)-ReLU-
    FC(num_classes)``; 3,274,634 parameters on MNIST. Layer one (for YOPO) is the first convolution and
    its ReLU.

    Initialisation: as the reference TensorFlow model of the MNIST challenge (MadryLab/mnist_challenge,
    ``model.py``): every weight truncated normal with standard deviation 0.1 (TensorFlow cuts at two standard
    deviations) and every bias 0.1. The initial logits are therefore large; the reference trains it with Adam at
    learning rate 1e-4.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        input_size: Side of the square inputs; fixes the size of the first fully connected layer. At
            least 4 (28 for MNIST).
        mean: Per-channel input mean, see :class:`~advtrain.models.base.Classifier`.
        std: Per-channel input standard deviation, see :class:`~advtrain.models.base.Classifier`.

    Raises:
        ValueError: If a size is not a positive integer or ``input_size`` is below 4.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        check_positive_int(input_size, "input_size")
        # "Same" convolutions keep the size; each 2x2 pool floors it in half (TF "VALID" pooling).
        side = input_size // 2 // 2
        if side < 1:
            raise ValueError(f"MadryLeNet needs input_size >= 4, got {input_size}")
        self.input_size = input_size

        self.first = nn.Sequential(nn.Conv2d(in_channels, 32, kernel_size=5, padding=2), nn.ReLU())
        self.features = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, 1024),
            nn.ReLU(),
            nn.Linear(1024, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.1, a=-0.2, b=0.2)
                # A positive bias keeps the ReLUs alive at the start, as in the reference model.
                nn.init.constant_(module.bias, 0.1)

    def rest(self, h: Tensor) -> Tensor:
        """Maps the output of the first convolution to logits.

        Args:
            h: Output of :meth:`layer_one`, shape ``(B, 32, input_size, input_size)``.

        Returns:
            Logits of shape ``(B, num_classes)``.

        Raises:
            ValueError: If the input did not have the ``input_size`` the model was built for.
        """
        return fixed_size_head(self, h)
