"""Training: the LightningModule, outer objectives, learning-rate schedules and checkpoint loading."""

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

__all__ = [
    "AdversarialCE",
    "AdversarialTraining",
    "MixedCE",
    "MMALoss",
    "Objective",
    "ObjectiveOutput",
    "SoftLabelCE",
    "TRADESLoss",
]
