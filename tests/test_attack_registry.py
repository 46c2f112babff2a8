"""Tests generated from the attack registry: registering an attack puts it under these checks.

Every registered attack runs on CPU, keeps the [0, 1] box (and its ball when budgeted), returns a consistent
result, leaves the model as found, is deterministic under a seed, handles a batch of one and per-sample ε.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN

from advtrain.attacks import AttackKind, create_attack, list_attacks
from advtrain.threat import geometry_for

# Small budgets so the whole registry runs in seconds; an attack missing here runs with its defaults.
FAST: dict[str, dict] = {
    "pgd": {"steps": 3},
    "bim": {"steps": 3},
    "apgd": {"steps": 5},
    "anpgd": {"steps": 3, "bisection_steps": 4},
    "deepfool": {"steps": 5},
    "cw_l2": {"steps": 5, "binary_search_steps": 2},
    "ddn": {"steps": 5},
    "fab": {"steps": 5},
    "fmn": {"steps": 10},
    "tr": {"steps": 5},
    "strattack": {"steps": 5, "binary_search_steps": 1, "refine_steps": 5, "refine_search_steps": 1},
    "transfer": {"steps": 5, "samples": 2},
    "square": {"steps": 30},
}
BUDGET = {"linf": 0.1, "l2": 0.5}


def _norm_of(name: str) -> str:
    return list_attacks()[name].norms[0]


def _make(name: str, **extra):
    spec = list_attacks()[name]
    kwargs = dict(FAST.get(name, {}))
    if spec.kind is AttackKind.BUDGETED:
        kwargs["eps"] = BUDGET.get(spec.norms[0], 0.1)
    if spec.stochastic:
        kwargs["seed"] = 0
    kwargs.update(extra)
    return create_attack(name, **kwargs)


def _data(n=6):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN().eval()


ATTACKS = sorted(list_attacks())


@pytest.mark.parametrize("name", ATTACKS)
def test_result_contract(name, model):
    x, y = _data()
    result = _make(name)(model, x, y)
    assert result.adv.shape == x.shape and result.adv.dtype == x.dtype
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    assert result.success.dtype == torch.bool and result.success.shape == (x.shape[0],)
    assert result.norms.shape == (x.shape[0],)
    spec = list_attacks()[name]
    geo_norm = spec.norms[0] if spec.norms[0] in BUDGET else None
    if geo_norm is not None:
        torch.testing.assert_close(result.norms, geometry_for(geo_norm).measure(result.adv - x), atol=1e-5, rtol=1e-4)
    if spec.kind is AttackKind.BUDGETED:
        assert (result.norms <= BUDGET[spec.norms[0]] + 1e-5).all()
    else:
        # Minimal-norm attacks return unfooled samples unchanged.
        assert torch.equal(result.adv[~result.success], x[~result.success])
    # Claimed successes hold on a fresh forward pass.
    with torch.no_grad():
        fooled = model(result.adv).argmax(1) != y
    assert fooled[result.success].all()
    assert result.forward_passes > 0


@pytest.mark.parametrize("name", ATTACKS)
def test_model_left_as_found(name, model):
    model.train()
    model.bn.eval()
    model.fc.bias.requires_grad_(False)
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    _make(name)(model, x, y)
    assert model.training and model.drop.training and not model.bn.training
    assert not model.fc.bias.requires_grad and model.fc.weight.requires_grad
    assert torch.equal(model.conv.weight.grad, torch.ones_like(model.conv.weight)) and model.fc.weight.grad is None
    for k, v in model.state_dict().items():  # eval-mode attack: BatchNorm statistics untouched
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", ATTACKS)
def test_deterministic_under_seed(name, model):
    x, y = _data()
    a = _make(name)(model, x, y)
    b = _make(name)(model, x, y)
    assert torch.equal(a.adv, b.adv) and torch.equal(a.success, b.success)


@pytest.mark.parametrize("name", ATTACKS)
def test_batch_of_one(name, model):
    x, y = _data(1)
    result = _make(name)(model, x, y)
    assert result.adv.shape == (1, 1, 8, 8) and result.success.shape == (1,)


@pytest.mark.parametrize("name", [n for n in ATTACKS if list_attacks()[n].kind is AttackKind.BUDGETED])
def test_per_sample_eps(name, model):
    x, y = _data()
    norm = _norm_of(name)
    eps = torch.linspace(0.0, BUDGET[norm], x.shape[0])
    result = _make(name)(model, x, y, eps=eps)
    assert (geometry_for(norm).measure(result.adv - x) <= eps + 1e-5).all()
    torch.testing.assert_close(result.adv[0], x[0])


def test_registry_specs_are_complete():
    for name, spec in list_attacks().items():
        assert spec.name == name and spec.norms and isinstance(spec.kind, AttackKind)


@pytest.mark.parametrize("name", ATTACKS)
def test_refuses_inference_mode_with_an_actionable_message(name, model):
    x, y = _data()
    with pytest.raises(RuntimeError, match="inference_mode"):
        with torch.inference_mode():
            _make(name)(model, x, y)


def _accepts(name: str, option: str) -> bool:
    return option in type(_make(name)).hyperparameters()


def test_every_attack_accepts_the_shared_options():
    """The options declared once on :class:`Attack` (autocast, compile, mode, seed) are accepted by every attack."""
    for name in ATTACKS:
        assert {"autocast", "compile", "mode", "seed"} <= set(type(_make(name)).hyperparameters()), name


class _ShapeRecorder(torch.nn.Module):
    """Records the batch size of every model call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


# Model calls of a masked run that see a fixed multiple of the batch: Transfer's smoothed surrogate runs the model on
# its ``samples`` noisy copies of the batch at once (and the final verdict on the batch).
CALL_ROWS = {"transfer": {1, FAST["transfer"]["samples"]}}


@pytest.mark.parametrize("name", ATTACKS)
def test_masked_active_set_equals_shrinking(name, model):
    """The masked mode (fixed shapes, finished samples masked) gives the shrinking mode's result: the same points,
    verdicts, norms and pass counts; and every model call of the masked run sees the whole batch (or a fixed multiple
    of it, :data:`CALL_ROWS`)."""
    _assert_masked_equals_shrinking(_make(name, **INDEPENDENT.get(name, {})), model)


# Paths of the masked mode that the settings above miss: the ε-ball variants (project_into_budget's re-check, a
# budget that retires samples), DeepFool's Jacobian on the graph that still holds the rows just fooled, TR's second
# order (both solvers), C&W's abort rule and last search step at the bracket's upper end, StrAttack's dense scoring,
# warm start and overlapping groups.
MASKED_PATHS = [
    ("deepfool", {"steps": 4, "candidates": 1, "eps": 0.2}),
    ("ddn", {"init_norm": 0.3, "eps": 0.2}),
    ("tr", {"steps": 10, "radius": 0.05, "order": 2}),
    ("tr", {"steps": 10, "radius": 0.05, "order": 2, "solver": "steihaug", "eps": 0.1}),
    ("cw_l2", {"steps": 10, "binary_search_steps": 11, "initial_const": 10.0}),
    ("cw_l2", {"steps": 10, "binary_search_steps": 3, "initial_const": 10.0, "eps": 0.2}),
    ("strattack", {"steps": 30, "binary_search_steps": 2, "initial_const": 10.0, "refine_search_steps": 2,
                   "overlap": True}),
    ("strattack", {"steps": 30, "binary_search_steps": 2, "initial_const": 2.0, "refine_search_steps": 2,
                   "scored": "dense", "warm_start": True, "eps": 0.3}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs"), MASKED_PATHS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MASKED_PATHS)])
def test_masked_active_set_equals_shrinking_on_other_paths(name, kwargs, model):
    _assert_masked_equals_shrinking(_make(name, **kwargs), model)


def _assert_masked_equals_shrinking(attack, model):
    x, _ = _data()
    with torch.no_grad():
        y = model(x).argmax(1)
    shrink = attack(model, x, y)
    recorder = _ShapeRecorder(model)
    masked = attack(recorder, x, y, active_set="mask")
    assert shrink.success.any() and not shrink.success.all(), "the problem must retire some samples and not others"
    torch.testing.assert_close(masked.adv, shrink.adv, atol=1e-6, rtol=0)
    assert torch.equal(masked.success, shrink.success)
    torch.testing.assert_close(masked.norms, shrink.norms, atol=1e-6, rtol=0)
    assert (masked.forward_passes, masked.backward_passes) == (shrink.forward_passes, shrink.backward_passes)
    rows = {k * x.shape[0] for k in CALL_ROWS.get(attack.spec.name, {1})}
    assert set(recorder.sizes) == rows, f"model calls on {sorted(set(recorder.sizes))} rows"


def test_unknown_active_set_mode_is_refused(model):
    x, y = _data()
    with pytest.raises(ValueError, match="active_set.*'shrink', 'mask'"):
        _make("pgd")(model, x, y, active_set="masked")


# C&W's reference abort-early test looks at the loss summed over the batch, so it is the one rule that couples
# samples; without it C&W is per-sample too.
# Budgets raised where the FAST ones fool nothing (or lowered where they fool every sample).
INDEPENDENT = {
    "ddn": {"init_norm": 0.3},
    "deepfool": {"steps": 3},
    "cw_l2": {"abort_early": False, "initial_const": 10.0},
    "strattack": {"steps": 30, "binary_search_steps": 2, "initial_const": 10.0, "refine_search_steps": 2},
    "tr": {"steps": 10, "radius": 0.05},
    "fab": {"eps": 0.03},  # unbudgeted, FAB fools every sample here: within ε some retire early and some never
}


@pytest.mark.parametrize("name", [n for n in ATTACKS if not list_attacks()[n].stochastic])
def test_each_sample_is_attacked_as_if_alone(name, model):
    """A sample's result does not depend on the rest of its batch (per-sample constants, radii, active sets):
    the attack on a batch equals the attack on its two halves."""
    x, _ = _data()
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correct, so each result comes from the attack itself
    attack = _make(name, **INDEPENDENT.get(name, {}))
    whole = attack(model, x, y)
    assert whole.success.any()
    first, second = attack(model, x[:3], y[:3]), attack(model, x[3:], y[3:])
    torch.testing.assert_close(whole.adv, torch.cat([first.adv, second.adv]), atol=1e-5, rtol=0)
    assert torch.equal(whole.success, torch.cat([first.success, second.success]))


@pytest.mark.parametrize("name", [n for n in ATTACKS if _accepts(n, "autocast")])
def test_bf16_autocast_keeps_the_attack_in_float32(name, model):
    """Under bf16 autocast the model runs in bf16 while the perturbation, the result and the norms stay float32 and
    every contract holds (box, ball, verified successes)."""
    x, y = _data()
    result = _make(name, autocast="bf16")(model, x, y)
    assert result.adv.dtype == torch.float32 and result.norms.dtype == torch.float32
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    spec = list_attacks()[name]
    if spec.kind is AttackKind.BUDGETED:
        assert (result.norms <= BUDGET[spec.norms[0]] + 1e-5).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fooled = model(result.adv).float().argmax(1) != y
    assert fooled[result.success].all()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ATTACKS if _accepts(n, "compile")])
def test_compiled_step_matches_the_eager_step(name, model):
    """Every attack's fused (``torch.compile``-d) elementwise step gives the eager step's result."""
    x, y = _data()
    eager = _make(name)(model, x, y)
    fused = _make(name, compile=True)(model, x, y)
    torch.testing.assert_close(fused.adv, eager.adv, atol=1e-5, rtol=0)
    assert torch.equal(fused.success, eager.success)
    assert fused.backward_passes == eager.backward_passes


# Attacks with per-sample early stopping and what a sample misclassified from the start still costs in backward
# passes: the gradient loop learns that a sample is fooled from the forward pass whose backward it already takes
# (one pass); TR's index selection looks at every sample once (min(9, K − 1) = 9 gradients).
EARLY_STOPPING = {"bim": 1, "deepfool": 0, "tr": 9}


@pytest.mark.parametrize("name", sorted(EARLY_STOPPING))
def test_samples_fooled_already_cost_no_more_backward_passes(name, model):
    """Early stopping is real: appending already-misclassified copies of a batch adds only the fixed cost above, so a
    half-fooled batch costs about half the passes."""
    x, _ = _data()
    with torch.no_grad():
        y = model(x).argmax(1)
    attack = _make(name, **INDEPENDENT.get(name, {}))
    alone = attack(model, x, y)
    both = attack(model, torch.cat([x, x]), torch.cat([y, (y + 1) % 10]))
    assert both.backward_passes == alone.backward_passes + EARLY_STOPPING[name] * x.shape[0]
    assert alone.backward_passes > 0
    assert torch.equal(both.success[: x.shape[0]], alone.success) and both.success[x.shape[0] :].all()


@pytest.mark.parametrize("name", ATTACKS)
def test_refuses_an_unknown_active_set_naming_the_allowed_ones(name, model):
    x, y = _data()
    with pytest.raises(ValueError, match=r"Unknown active_set 'fixed'; allowed values are \('shrink', 'mask'\)"):
        _make(name)(model, x, y, active_set="fixed")
