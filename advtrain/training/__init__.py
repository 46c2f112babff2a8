"""Training: the LightningModule, outer objectives, learning-rate schedules and checkpoint loading."""

from advtrain.training.grad_align import GradAlignLoss
from advtrain.training.module import AdversarialTraining
from advtrain.training.objectives import (
    AdversarialCE,
    MixedCE,
    MMALoss,
    Objective,
    ObjectiveOutput,
    SoftLabelCE,
    TRADESLoss,
)
from advtrain.training.schedules import BudgetRamp, BudgetSchedule

__all__ = [
    "AdversarialCE",
    "AdversarialTraining",
    "BudgetRamp",
    "BudgetSchedule",
    "GradAlignLoss",
    "MixedCE",
    "MMALoss",
    "Objective",
    "ObjectiveOutput",
    "SoftLabelCE",
    "TRADESLoss",
]
