"""Lightning callbacks of advtrain."""

from advtrain.callbacks.robust import RobustEvaluation
from advtrain.callbacks.timing import EpochTimer

__all__ = ["EpochTimer", "RobustEvaluation"]
