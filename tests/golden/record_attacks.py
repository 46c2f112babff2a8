"""Records every registered attack's outputs on fixed seeded problems into ``attacks.pt`` (the golden file).

The golden file pins the attacks' behaviour across refactors of the engine: ``tests/test_golden_attacks.py`` reruns
every case and compares. It was recorded before the engine-contract refactor; rerun this script only when an attack's
behaviour is meant to change, and say why in the commit.

    python tests/golden/record_attacks.py
"""

from __future__ import annotations

import sys
from collections.abc import Container
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import LinearNet, TinyCNN  # noqa: E402

from advtrain.attacks import AttackKind, create_attack, list_attacks  # noqa: E402

GOLDEN = HERE / "attacks.pt"
EPS = {"linf": 0.1, "l2": 0.5, "l1": 2.0}
# Budgets small enough to run the whole registry in well under a minute, large enough that every loop turns.
BASE: dict[str, dict] = {
    "pgd": {"steps": 10},
    "bim": {"steps": 10},
    "apgd": {"steps": 20},
    "anpgd": {"steps": 5, "bisection_steps": 5},
    "deepfool": {"steps": 10},
    "cw_l2": {"steps": 20, "binary_search_steps": 3},
    "ddn": {"steps": 20},
    "fab": {"steps": 10},
    "tr": {"steps": 10},
    "strattack": {"steps": 10, "binary_search_steps": 2, "refine_steps": 5, "refine_search_steps": 1},
    "transfer": {"steps": 5, "samples": 2},
    "square": {"steps": 100},
}
# Further configurations that take other paths through the attacks: (label, attack, hyperparameters, norms).
VARIANTS: list[tuple[str, str, dict, tuple[str, ...] | None]] = [
    ("pgd-restarts", "pgd", {"steps": 5, "restarts": 3}, None),
    ("pgd-dlr", "pgd", {"steps": 10, "loss": "dlr"}, ("linf",)),
    ("apgd-dlr", "apgd", {"steps": 20, "loss": "dlr"}, None),
    ("apgd-t", "apgd", {"steps": 10, "loss": "dlr-targeted", "n_target_classes": 3}, None),
    ("apgd-eot", "apgd", {"steps": 10, "eot_iter": 2}, ("linf",)),
    ("apgd-largereps", "apgd", {"steps": 20, "use_largereps": True}, ("l1",)),
    ("fab-t", "fab", {"steps": 10, "n_target_classes": 3}, None),
    ("fab-eps", "fab", {"steps": 10}, None),
    ("deepfool-eps", "deepfool", {"steps": 10}, None),
    ("ddn-eps", "ddn", {"steps": 20}, None),
    ("cw-eps", "cw_l2", {"steps": 20, "binary_search_steps": 3}, None),
    ("tr-adaptive", "tr", {"steps": 10, "adaptive": True}, None),
    ("square-restarts", "square", {"steps": 50, "restarts": 2}, ("linf",)),
]
BUDGETED_VARIANTS = {"fab-eps", "deepfool-eps", "ddn-eps", "cw-eps"}


def problems() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """A random linear classifier and a small CNN (eval mode), 8 inputs each, labels = the model's predictions."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    linear = LinearNet(36, 10, seed=0).eval()
    x = 0.5 + 0.1 * (2 * torch.rand(8, 1, 6, 6, generator=gen) - 1)
    out["linear"] = (linear, x)
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    out["cnn"] = (cnn, torch.rand(8, 1, 8, 8, generator=gen))
    return {name: (model, x, model(x).argmax(1).detach()) for name, (model, x) in out.items()}


def cases():
    """Every (key, attack, hyperparameters) of the golden file: each attack in each norm it supports, then the
    variants."""
    specs = list_attacks()
    for name, spec in specs.items():
        for norm in spec.norms:
            yield f"{name}|{norm}", name, norm, dict(BASE.get(name, {}))
    for label, name, kwargs, norms in VARIANTS:
        for norm in norms or specs[name].norms:
            yield f"{label}|{norm}", name, norm, dict(kwargs)


def build(key: str, name: str, norm: str, kwargs: dict):
    import inspect

    from advtrain.attacks.registry import _REGISTRY

    spec = list_attacks()[name]
    cls = _REGISTRY[name][1]
    accepted = cls.hyperparameters() if hasattr(cls, "hyperparameters") else inspect.signature(cls.__init__).parameters
    if "norm" in accepted:
        kwargs["norm"] = norm
    if spec.kind is AttackKind.BUDGETED or key.split("|")[0] in BUDGETED_VARIANTS:
        kwargs["eps"] = EPS[norm]
    if "seed" in accepted:
        kwargs["seed"] = 0
    return create_attack(name, **kwargs)


def run_case(key: str, name: str, norm: str, kwargs: dict, problem) -> dict:
    model, x, y = problem
    result = build(key, name, norm, kwargs)(model, x, y)
    return {
        "adv": result.adv.detach().clone(),
        "success": result.success.clone(),
        "norms": result.norms.detach().clone(),
        "passes": torch.tensor([result.forward_passes, result.backward_passes, result.model_calls]),
    }


def record(known: Container[str] = ()) -> dict:
    """Runs every case on both problems, except the ``known`` keys (``"<case>|<problem>"``)."""
    torch.use_deterministic_algorithms(True)
    probs = problems()
    out = {}
    for key, name, norm, kwargs in cases():
        for pname, problem in probs.items():
            if f"{key}|{pname}" not in known:
                out[f"{key}|{pname}"] = run_case(key, name, norm, dict(kwargs), problem)
    return out


def add_new() -> list[str]:
    """Records the cases of attacks registered since the file was written (a new attack's own golden cases), leaving
    every stored case untouched; refuses under another torch version than the file's."""
    stored = torch.load(GOLDEN, weights_only=True)
    if stored["torch"].split("+")[0] != torch.__version__.split("+")[0]:
        raise SystemExit(f"{GOLDEN} was recorded under torch {stored['torch']}; this is {torch.__version__}.")
    added = record(known=stored["cases"])
    stored["cases"].update(added)
    torch.save(stored, GOLDEN)
    return list(added)


if __name__ == "__main__":
    # python tests/golden/record_attacks.py --add-new: only the cases of newly registered attacks (the others stay as
    # recorded before the engine refactor). Without it: rerecord everything (never, unless a change is intended).
    if "--add-new" in sys.argv:
        print(f"added {add_new()} to {GOLDEN} (torch {torch.__version__})")
    else:
        data = record()
        torch.save({"torch": str(torch.__version__), "cases": data}, GOLDEN)
        print(f"{len(data)} cases written to {GOLDEN} (torch {torch.__version__})")
