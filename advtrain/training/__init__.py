"""Training: the LightningModule, outer objectives, learning-rate schedules and checkpoint loading."""

from advtrain.training.awp import AWP
from advtrain.training.grad_align import GradAlignLoss
from advtrain.training.module import AdversarialTraining
from advtrain.training.objectives import (
    AdversarialCE,
    MARTLoss,
    MixedCE,
    MMALoss,
    Objective,
    ObjectiveOutput,
    SoftLabelCE,
    TRADESLoss,
)
from advtrain.training.schedules import BudgetRamp, BudgetSchedule

__all__ = [
    "AWP",
    "AdversarialCE",
    "AdversarialTraining",
    "BudgetRamp",
    "BudgetSchedule",
    "MARTLoss",
    "GradAlignLoss",
    "MixedCE",
    "MMALoss",
    "Objective",
    "ObjectiveOutput",
    "SoftLabelCE",
    "TRADESLoss",
]
