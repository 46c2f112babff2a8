"""Model architectures and their name registry.

Every model is a :class:`Classifier`: it takes images in ``[0, 1]``, normalises them internally, and is
split into ``layer_one`` and ``rest`` for YOPO (Zhang et al., NeurIPS 2019). Importing this package
registers the built-in architectures, so :func:`create_model` works on their names at once.
:func:`build_model` builds a registered model from the dataset's facts and :func:`load_classifier_weights` loads
weights into it (:mod:`advtrain.models.build`). :func:`load_robustbench` builds a RobustBench leaderboard model from
a local weight file (optional ``robustbench`` package; :mod:`advtrain.models.robustbench`).
"""

from advtrain.models.base import Classifier
from advtrain.models.build import build_model, load_classifier_weights
from advtrain.models.madry_lenet import MadryLeNet
from advtrain.models.preact_resnet import PreActResNet18
from advtrain.models.registry import create_model, list_models, register_model
from advtrain.models.robustbench import list_robustbench, load_robustbench
from advtrain.models.small_cnn import SmallCNN
from advtrain.models.wide_resnet import WideResNet

__all__ = [
    "Classifier",
    "MadryLeNet",
    "PreActResNet18",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "create_model",
    "list_models",
    "list_robustbench",
    "load_classifier_weights",
    "load_robustbench",
    "register_model",
]
