"""Inner maximizers for adversarial training, selectable from YAML (``model.maximizer``)."""

from advtrain.maximizers.base import InnerMaximizer, Perturbation, Standard
from advtrain.maximizers.pgd import PGD

__all__ = ["PGD", "InnerMaximizer", "Perturbation", "Standard"]
