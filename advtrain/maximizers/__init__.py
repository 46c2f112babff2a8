"""Inner maximizers for adversarial training, selectable from YAML (``model.maximizer``), with the perturbation types
they hand to the outer objective and the training-step strategies they declare (:mod:`advtrain.maximizers.steps`)."""

from advtrain.maximizers.base import AdversarialStep, InnerMaximizer, Perturbation, Standard
from advtrain.maximizers.bilateral import Bilateral, SoftLabelPerturbation, adversarial_labels, smoothed_labels
from advtrain.maximizers.fast import FastFGSM
from advtrain.maximizers.free import FreeAT, FreeATStep
from advtrain.maximizers.minimal import DDN, TRLinf
from advtrain.maximizers.mma import MMA, MarginPerturbation
from advtrain.maximizers.nfgsm import NFGSM
from advtrain.maximizers.pgd import PGD
from advtrain.maximizers.steps import ManualStep, ManualStepOutput, StepHost, StepOutput, TrainingStep
from advtrain.maximizers.trades import TRADES, kl_to_clean
from advtrain.maximizers.yopo import YOPO, YOPOStep

__all__ = [
    "DDN",
    "TRLinf",
    "MMA",
    "NFGSM",
    "PGD",
    "TRADES",
    "YOPO",
    "AdversarialStep",
    "Bilateral",
    "FastFGSM",
    "FreeAT",
    "FreeATStep",
    "InnerMaximizer",
    "ManualStep",
    "ManualStepOutput",
    "MarginPerturbation",
    "Perturbation",
    "SoftLabelPerturbation",
    "Standard",
    "StepHost",
    "StepOutput",
    "TrainingStep",
    "YOPOStep",
    "adversarial_labels",
    "kl_to_clean",
    "smoothed_labels",
]
