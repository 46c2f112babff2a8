"""The Carlini-Wagner MNIST network ("SmallCNN").

Carlini and Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017 (MNIST model);
called SmallCNN by Rony et al., "Decoupling Direction and Norm for Efficient Gradient-Based L2
Adversarial Attacks and Defenses" (DDN), CVPR 2019, and by Zhang et al., "You Only Propagate Once"
(YOPO), NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from advtrain.models.base import Classifier, check_positive_int, fixed_size_head
from advtrain.models.registry import register_model

__all__ = ["SmallCNN"]

# The initialisation SmallCNN uses when none is asked for: changing the default is this one line.
DEFAULT_INIT = "torch"


@register_model("small_cnn")
class SmallCNN(Classifier):
    """Carlini-Wagner MNIST CNN (Carlini and Wagner 2017; "SmallCNN" in DDN and YOPO).

    ``conv3x3(w)-ReLU-conv3x3(w)-ReLU-maxpool2-conv3x3(2w)-ReLU-conv3x3(2w)-ReLU-maxpool2-flatten-
    FC(hidden)-ReLU-dropout-FC(hidden)-ReLU-FC(num_classes)``, unpadded convolutions. The defaults
    (``width=32, hidden=200, dropout=0.5``) are the published model (312,202 parameters on MNIST);
    smaller values give a cheap variant for CPU runs. Layer one (for YOPO) is the first convolution and
    its ReLU.

    Initialisation (``init``), none of which is the reference code's exactly unless stated:

    * ``"torch"`` (the default, ``DEFAULT_INIT``): PyTorch's default layer initialisation (Kaiming-uniform with
      ``a = sqrt(5)``, biases uniform in ±1/sqrt(fan_in)), i.e. no re-initialisation at all, as a plain PyTorch
      definition of this network gets.
    * ``"he"``: He-normal ``fan_in`` weights (He et al., "Delving Deep into Rectifiers", ICCV 2015) and zero biases
      for every convolution and the two hidden fully connected layers; the last layer keeps PyTorch's default weights
      and gets a zero bias. advtrain's default until 2026-12: PGD adversarial training at the quickstart's settings
      (``benchmarks/train_quality.py``, seed 0, 10 epochs, 200 test digits) reached 91.5% clean / 44.0% worst case
      under the ``full`` suite with it, against 94.5% / 79.5% with ``"torch"`` and 96.5% / 78.0% for an independent
      plain PyTorch loop with PyTorch's initialisation: the training step was not the cause, the initialisation was.
    * ``"reference"``: the initialisation of the reference PyTorch code of DDN (``fast_adv/models/mnist/
      small_cnn.py``), TRADES (``models/small_cnn.py``) and YOPO (``experiments/MNIST/YOPO-5-10/network.py``), which
      is the same in all three: He-normal ``fan_in`` convolution weights with zero biases, PyTorch's default for the
      two hidden fully connected layers, and a last layer with zero weights and zero bias (all logits 0 at the
      start). Carlini and Wagner's original Keras model used Keras's defaults (Glorot-uniform, zero biases).

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        input_size: Side of the square inputs; fixes the size of the first fully connected layer. At
            least 16 (28 for MNIST, 32 for CIFAR).
        width: Channels of the first two convolutions; the last two have ``2 * width``.
        hidden: Units of each of the two hidden fully connected layers.
        dropout: Dropout probability after the first hidden fully connected layer.
        activation: ``"relu"`` (the published model) or a smooth ``"softplus"``/``"silu"`` variant, whose
            Hessian does not vanish almost everywhere (second-order attacks, Yao et al. 2019).
        init: ``"he"``, ``"torch"`` or ``"reference"`` (above); ``None`` gives ``DEFAULT_INIT``.
        mean: Per-channel input mean, see :class:`~advtrain.models.base.Classifier`.
        std: Per-channel input standard deviation, see :class:`~advtrain.models.base.Classifier`.

    Raises:
        ValueError: If a size is not a positive integer, ``input_size`` is below 16 or ``dropout`` is
            outside ``[0, 1)``.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        width: int = 32,
        hidden: int = 200,
        dropout: float = 0.5,
        activation: Literal["relu", "softplus", "silu"] = "relu",
        init: Literal["he", "torch", "reference"] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
        for value, name in ((input_size, "input_size"), (width, "width"), (hidden, "hidden")):
            check_positive_int(value, name)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        # Two unpadded 3x3 convs (-4) then a 2x2 pool, twice.
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"SmallCNN needs input_size >= 16, got {input_size}")
        self.input_size = input_size
        acts = {"relu": nn.ReLU, "softplus": nn.Softplus, "silu": nn.SiLU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        act = acts[activation]
        init = DEFAULT_INIT if init is None else init
        if init not in ("he", "torch", "reference"):
            raise ValueError(f"init must be 'he', 'torch' or 'reference', got {init!r}")
        self.init = init

        self.first = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=3), act())
        self.features = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3),
            act(),
            nn.Conv2d(2 * width, 2 * width, kernel_size=3),
            act(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * width * side * side, hidden),
            act(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, num_classes),
        )
        self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        """Re-initialises the layers built with PyTorch's defaults (see the class docstring).

        ``"he"``: every layer but the last feeds a ReLU, for which He's ``fan_in`` scaling keeps the activation
        variance constant; the last layer keeps PyTorch's default weights so the initial logits stay small.
        """
        if init == "torch":
            return
        last = self.classifier[-1]
        for module in self.modules():
            if module is last or not isinstance(module, nn.Conv2d | nn.Linear):
                continue
            if init == "he" or isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        if init == "reference":
            nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def rest(self, h: Tensor) -> Tensor:
        """Maps the output of the first convolution to logits.

        Args:
            h: Output of :meth:`layer_one`, shape ``(B, width, input_size - 2, input_size - 2)``.

        Returns:
            Logits of shape ``(B, num_classes)``.

        Raises:
            ValueError: If the input did not have the ``input_size`` the model was built for.
        """
        return fixed_size_head(self, h)
