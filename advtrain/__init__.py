"""advtrain: adversarial training and robust evaluation on PyTorch Lightning."""

__version__ = "0.1.0"
