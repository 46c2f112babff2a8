"""Lightning callbacks of advtrain."""

from advtrain.callbacks.checkpoint import LastCheckpoint
from advtrain.callbacks.robust import RobustEvaluation
from advtrain.callbacks.timing import EpochTimer

__all__ = ["EpochTimer", "LastCheckpoint", "RobustEvaluation"]
