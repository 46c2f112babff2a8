"""Inner maximizers for adversarial training, selectable from YAML (``model.maximizer``)."""

from advtrain.maximizers.base import InnerMaximizer, Perturbation, Standard
from advtrain.maximizers.bilateral import Bilateral, adversarial_labels, smoothed_labels
from advtrain.maximizers.fast import FastFGSM
from advtrain.maximizers.free import FreeAT
from advtrain.maximizers.minimal import DDN, TRLinf
from advtrain.maximizers.mma import MMA
from advtrain.maximizers.nfgsm import NFGSM
from advtrain.maximizers.pgd import PGD
from advtrain.maximizers.trades import TRADES, kl_to_clean
from advtrain.maximizers.yopo import YOPO

__all__ = [
    "DDN",
    "TRLinf",
    "MMA",
    "NFGSM",
    "PGD",
    "TRADES",
    "YOPO",
    "Bilateral",
    "FastFGSM",
    "FreeAT",
    "InnerMaximizer",
    "Perturbation",
    "Standard",
    "adversarial_labels",
    "kl_to_clean",
    "smoothed_labels",
]
