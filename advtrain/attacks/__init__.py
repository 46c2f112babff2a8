"""The attack zoo. ``create_attack(name, **hyperparameters)`` builds one; ``list_attacks()`` lists them.

Every module of this package is imported here, so an attack added as one new file (a class decorated with
:func:`register_attack`) is registered, exported under its class name, covered by the registry-generated tests and
reachable from configs and ``advtrain evaluate --attacks`` without a line anywhere else.
"""

import importlib
import pkgutil

from advtrain.attacks.anpgd import ANPGD
from advtrain.attacks.apgd import APGD
from advtrain.attacks.base import Attack
from advtrain.attacks.cw import CarliniWagnerL2
from advtrain.attacks.ddn import DDN
from advtrain.attacks.deepfool import DeepFool
from advtrain.attacks.fab import FAB
from advtrain.attacks.gradient import BIM, FGM, FGSM, PGD
from advtrain.attacks.registry import (
    AttackKind,
    AttackSpec,
    attack_class,
    create_attack,
    list_attacks,
    register_attack,
)
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
    "attack_class",
    "create_attack",
    "list_attacks",
    "register_attack",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _name in list_attacks():
    _cls = attack_class(_name)
    if _cls.__name__ not in __all__:
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
