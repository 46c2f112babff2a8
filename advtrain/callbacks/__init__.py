"""Lightning callbacks of advtrain."""

from advtrain.callbacks.averaging import EMA
from advtrain.callbacks.checkpoint import LastCheckpoint
from advtrain.callbacks.robust import RobustEvaluation
from advtrain.callbacks.timing import EpochTimer

__all__ = ["EMA", "EpochTimer", "LastCheckpoint", "RobustEvaluation"]
