"""The shared attack engine: the attack core (one batched loop), model-state handling, input checks, losses, results."""

from advtrain.engine.checks import check_inputs, check_labels
from advtrain.engine.core import AttackCore, fused, require_grad_mode
from advtrain.engine.loop import ascent_step, gradient_ascent
from advtrain.engine.losses import LOSSES, cross_entropy, dlr_loss, margin_loss
from advtrain.engine.modes import AttackMode, attack_context
from advtrain.engine.result import AttackResult
from advtrain.engine.search import ConstantSearch
from advtrain.engine.state import ACTIVE_SET_MODES, SampleState, shared
from advtrain.engine.tracking import MaxLossTracker, MinimalNormTracker, PassCounter, logits_of

__all__ = [
    "ACTIVE_SET_MODES",
    "ConstantSearch",
    "MaxLossTracker",
    "SampleState",
    "shared",
    "AttackCore",
    "ascent_step",
    "fused",
    "require_grad_mode",
    "LOSSES",
    "AttackMode",
    "AttackResult",
    "attack_context",
    "check_inputs",
    "check_labels",
    "cross_entropy",
    "dlr_loss",
    "gradient_ascent",
    "margin_loss",
    "MinimalNormTracker",
    "PassCounter",
    "logits_of",
]
