"""The attack zoo. ``create_attack(name, **hyperparameters)`` builds one; ``list_attacks()`` lists them."""

from advtrain.attacks.anpgd import ANPGD
from advtrain.attacks.apgd import APGD
from advtrain.attacks.base import Attack
from advtrain.attacks.cw import CarliniWagnerL2
from advtrain.attacks.ddn import DDN
from advtrain.attacks.deepfool import DeepFool
from advtrain.attacks.fab import FAB
from advtrain.attacks.gradient import BIM, FGM, FGSM, PGD
from advtrain.attacks.registry import AttackKind, AttackSpec, create_attack, list_attacks, register_attack
from advtrain.attacks.square import Square
from advtrain.attacks.strattack import StrAttack
from advtrain.attacks.transfer import Transfer
from advtrain.attacks.trust_region import TrustRegion

__all__ = [
    "ANPGD",
    "APGD",
    "BIM",
    "FGM",
    "FGSM",
    "PGD",
    "Square",
    "StrAttack",
    "Transfer",
    "TrustRegion",
    "Attack",
    "CarliniWagnerL2",
    "DDN",
    "DeepFool",
    "FAB",
    "AttackKind",
    "AttackSpec",
    "create_attack",
    "list_attacks",
    "register_attack",
]
