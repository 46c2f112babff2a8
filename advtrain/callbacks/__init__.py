"""Lightning callbacks of advtrain."""

from advtrain.callbacks.timing import EpochTimer

__all__ = ["EpochTimer"]
