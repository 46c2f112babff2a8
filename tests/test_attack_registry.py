"""Tests generated from the attack registry: registering an attack puts it under these checks.

Every registered attack, in every norm it declares, runs on CPU, keeps the [0, 1] box (and its ball when budgeted),
returns a consistent result, attacks each sample as if alone, handles per-sample ε; it leaves the model as found in
every attack mode, is deterministic under a seed, handles a batch of one, refuses bad inputs and inference mode; its
spec (norms, targeted, stochastic) says what it does. Paths its fast settings miss run too (:data:`OTHER_PATHS`).
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import TinyCNN, random_batch

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
BUDGET = {"linf": 0.1, "l2": 0.5, "l1": 2.0}
# Paths that the FAST settings miss, run by the model-state, determinism, batch-of-one and masked-mode tests: the
# ε-ball variants (project_into_budget's re-check, a budget that retires samples), DeepFool's Jacobian on the graph
# that still holds the rows just fooled, TR's second order (both solvers, both norms), C&W's abort rule and last search
# step at the bracket's upper end, StrAttack's dense scoring, warm start and overlapping groups.
OTHER_PATHS = [
    ("deepfool", {"steps": 4, "candidates": 1, "eps": 0.2}),
    ("ddn", {"init_norm": 0.3, "eps": 0.2}),
    ("tr", {"steps": 10, "radius": 0.05, "order": 2}),
    ("tr", {"steps": 10, "radius": 0.05, "order": 2, "solver": "steihaug", "eps": 0.1}),
    ("tr", {"steps": 10, "radius": 0.01, "order": 2, "norm": "linf"}),
    ("cw_l2", {"steps": 10, "binary_search_steps": 11, "initial_const": 10.0}),
    ("cw_l2", {"steps": 10, "binary_search_steps": 3, "initial_const": 10.0, "eps": 0.2}),
    ("strattack", {"steps": 30, "binary_search_steps": 2, "initial_const": 10.0, "refine_search_steps": 2,
                   "overlap": True}),
    ("strattack", {"steps": 30, "binary_search_steps": 2, "initial_const": 2.0, "refine_search_steps": 2,
                   "scored": "dense", "warm_start": True, "eps": 0.3}),
]  # fmt: skip
OTHER_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(OTHER_PATHS)]


def _make(name: str, norm: str | None = None, **extra):
    """Attack ``name`` with its :data:`FAST` settings, its :data:`BUDGET` when budgeted and seed 0 when stochastic.
    ``norm`` (one it declares) is passed on to an attack that takes a norm; without it the attack runs in its default
    norm."""
    spec = list_attacks()[name]
    kwargs = dict(FAST.get(name, {}))
    if norm is not None and len(spec.norms) > 1:  # one declared norm: no norm argument (test_declared_norms_...)
        kwargs["norm"] = norm
    if spec.kind is AttackKind.BUDGETED:
        kwargs["eps"] = BUDGET.get(norm or spec.norms[0], 0.1)
    if spec.stochastic:
        kwargs["seed"] = 0
    kwargs.update(extra)
    return create_attack(name, **kwargs)


def _accepts(name: str, option: str) -> bool:
    return option in type(_make(name)).hyperparameters()


ATTACKS = sorted(list_attacks())


def _norm_cases(keep=lambda spec: True) -> list:
    """``(name, norm)`` for every attack whose spec ``keep`` accepts, in every norm it declares."""
    specs = list_attacks().values()
    return [pytest.param(s.name, norm, id=f"{s.name}-{norm}") for s in specs if keep(s) for norm in s.norms]


def _labels(model, x, misclassified=2):
    """The model's predictions, except for the first ``misclassified`` samples, which start misclassified: every path
    of an attack runs (samples fooled at no cost, samples to attack)."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:misclassified] = (y[:misclassified] + 1) % 10
    return y


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN().eval()


# --- the result ------------------------------------------------------------------------------------------------------


def _assert_contract(result, x, norm, budget, model, reached):
    """Shapes and dtypes, the box, norms measured in ``norm``, the ball ``budget`` (budgeted attacks) or unfooled
    samples unchanged (minimal ones), and claimed successes that a fresh forward pass confirms (``reached``: the
    fresh predictions of the points that fool the model)."""
    assert result.adv.shape == x.shape and result.adv.dtype == x.dtype
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    assert result.success.dtype == torch.bool and result.success.shape == (x.shape[0],)
    assert result.norms.shape == (x.shape[0],)
    assert all(value.shape[0] == x.shape[0] for value in result.extra.values())  # per-sample measurements
    if norm in BUDGET:
        torch.testing.assert_close(result.norms, geometry_for(norm).measure(result.adv - x))
    if budget is not None:
        assert (result.norms <= budget + 1e-5).all()
    else:
        # Minimal-norm attacks return unfooled samples unchanged.
        assert torch.equal(result.adv[~result.success], x[~result.success])
    with torch.no_grad():
        assert reached(model(result.adv).argmax(1))[result.success].all()
    assert result.forward_passes > 0


@pytest.mark.parametrize(("name", "norm"), _norm_cases())
def test_result_contract(name, norm, model):
    x, _ = random_batch()
    y = _labels(model, x)
    result = _make(name, norm)(model, x, y)
    spec = list_attacks()[name]
    budget = BUDGET[norm] if spec.kind is AttackKind.BUDGETED else None
    _assert_contract(result, x, norm, budget, model, lambda pred: pred != y)
    assert result.success[:2].all()  # misclassified from the start: a success


# Settings that reach the runner-up class of some sample where the FAST ones reach none (C&W and StrAttack search
# their constant from too small a value for two search steps).
TARGETED = {
    "cw_l2": {"initial_const": 10.0},
    "strattack": {"steps": 30, "binary_search_steps": 2, "initial_const": 10.0, "refine_search_steps": 2},
}


@pytest.mark.parametrize("name", [n for n in ATTACKS if list_attacks()[n].targeted])
def test_targeted_result_contract(name, model):
    """Targeted mode keeps the contract, and a claimed success reaches its target: the runner-up class (the labels
    are the targets)."""
    x, _ = random_batch()
    with torch.no_grad():
        targets = model(x).topk(2, dim=1).indices[:, 1]
    spec = list_attacks()[name]
    result = _make(name, spec.norms[0], targeted=True, **TARGETED.get(name, {}))(model, x, targets)
    budget = BUDGET[spec.norms[0]] if spec.kind is AttackKind.BUDGETED else None
    _assert_contract(result, x, spec.norms[0], budget, model, lambda pred: pred == targets)
    assert result.success.any()


@pytest.mark.parametrize(("name", "norm"), _norm_cases(lambda spec: spec.kind is AttackKind.BUDGETED))
def test_per_sample_eps(name, norm, model):
    x, _ = random_batch()
    y = _labels(model, x)
    eps = torch.linspace(0.0, BUDGET[norm], x.shape[0])
    result = _make(name, norm)(model, x, y, eps=eps)
    assert (geometry_for(norm).measure(result.adv - x) <= eps + 1e-5).all()
    torch.testing.assert_close(result.adv[0], x[0])


# --- the spec says what the attack does -------------------------------------------------------------------------------


def test_registry_specs_are_complete():
    for name, spec in list_attacks().items():
        assert spec.name == name and spec.norms and isinstance(spec.kind, AttackKind)


NORMS_ANYWHERE = sorted({"linf", "l2", "l1", "l0"}.union(*(spec.norms for spec in list_attacks().values())))


@pytest.mark.parametrize("name", ATTACKS)
def test_declared_norms_are_the_accepted_ones(name):
    """An attack runs in every norm its spec declares (:func:`test_result_contract` measures its norms there) and
    refuses every other one, naming the declared ones; an attack without a ``norm`` argument declares one norm."""
    spec = list_attacks()[name]
    if not _accepts(name, "norm"):
        assert len(spec.norms) == 1
        return
    for norm in [*NORMS_ANYWHERE, "l7"]:
        if norm in spec.norms:
            continue
        with pytest.raises(ValueError, match=f"norm[= ]'{norm}'") as error:
            create_attack(name, norm=norm)
        if norm != "l7":  # a norm the framework knows: the attack lists its own
            allowed = str(error.value).split("allowed values are")[1]
            assert set(re.findall(r"'(\w+)'", allowed)) == set(spec.norms)


def test_targeted_mode_is_declared_and_off_by_default():
    """The attacks with a targeted mode are exactly those whose spec says so (:func:`test_targeted_result_contract`
    runs it), and every attack is untargeted by default (the labels are the true classes)."""
    for name, spec in list_attacks().items():
        assert _accepts(name, "targeted") == spec.targeted, name
        assert not create_attack(name).targeted, name


class _InputRecorder(torch.nn.Module):
    """Records the inputs of every model call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


# Settings under which a stochastic attack draws: FAB draws only for its restarts after the first, which seldom beat
# the first run on this model, so only the points it evaluates tell its seeds apart, not its result.
DRAWING = {"fab": {"restarts": 2}}


@pytest.mark.parametrize("name", ATTACKS)
def test_the_seed_matters_exactly_for_stochastic_attacks(name, model):
    """A stochastic attack evaluates the model at other points under another seed; a deterministic attack evaluates
    it at the same points and returns the same result (every attack takes a seed)."""
    x, _ = random_batch()
    y = _labels(model, x)
    runs = []
    for seed in (0, 1):
        recorder = _InputRecorder(model)
        runs.append((_make(name, seed=seed, **DRAWING.get(name, {}))(recorder, x, y), recorder.inputs))
    (a, seen_a), (b, seen_b) = runs
    same_points = len(seen_a) == len(seen_b) and all(map(torch.equal, seen_a, seen_b))
    if list_attacks()[name].stochastic:
        assert not same_points
        assert name in DRAWING or not torch.equal(a.adv, b.adv)
    else:
        assert same_points and torch.equal(a.adv, b.adv) and torch.equal(a.success, b.success)


def test_every_attack_accepts_the_shared_options():
    """The options declared once on :class:`Attack` (autocast, compile, mode, seed) are accepted by every attack."""
    for name in ATTACKS:
        assert {"autocast", "compile", "mode", "seed"} <= set(type(_make(name)).hyperparameters()), name


@pytest.mark.parametrize("name", ATTACKS)
def test_create_attack_refuses_unknown_names_and_keywords(name):
    with pytest.raises(ValueError, match=rf"registered attacks are \[.*'{name}'"):
        create_attack(name + "x")
    with pytest.raises(ValueError, match=r"does not take \['epz'\]"):
        create_attack(name, epz=0.1)


@pytest.mark.parametrize(
    ("name", "kwargs"), [(n, FAST.get(n, {})) for n in ATTACKS] + OTHER_PATHS, ids=[*ATTACKS, *OTHER_IDS]
)
def test_create_attack_builds_the_registered_class_with_every_setting(name, kwargs):
    attack = _make(name, **kwargs)
    assert type(attack).spec is list_attacks()[name]
    for key, value in kwargs.items():
        assert getattr(getattr(attack, key), "value", getattr(attack, key)) == value, key


# --- the model, the seed, the batch ----------------------------------------------------------------------------------


def _assert_model_left_as_found(attack, model, mode="eval"):
    """A model in mixed modes (training, BatchNorm frozen), with a frozen parameter and a gradient, comes back as it
    was: modes, ``requires_grad`` flags, ``.grad`` buffers, and (unless the attack runs in train mode, where BatchNorm
    statistics move by design) its whole state."""
    x, _ = random_batch()
    y = _labels(model, x)
    model.train()
    model.bn.eval()
    model.fc.bias.requires_grad_(False)
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    attack(model, x, y)
    assert model.training and model.drop.training and not model.bn.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not model.fc.bias.requires_grad and model.fc.weight.requires_grad
    assert torch.equal(model.conv.weight.grad, torch.ones_like(model.conv.weight))
    assert all(p.grad is None for k, p in model.named_parameters() if k != "conv.weight")
    kept = dict(model.named_parameters()) if mode == "train" else model.state_dict()
    for k, v in kept.items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("mode", ["eval", "train", "keep"])
@pytest.mark.parametrize("name", ATTACKS)
def test_model_left_as_found(name, mode, model):
    _assert_model_left_as_found(_make(name, mode=mode), model, mode)


@pytest.mark.parametrize(("name", "kwargs"), OTHER_PATHS, ids=OTHER_IDS)
def test_model_left_as_found_on_other_paths(name, kwargs, model):
    _assert_model_left_as_found(_make(name, **kwargs), model)


def _assert_deterministic(attack, model):
    x, _ = random_batch()
    y = _labels(model, x)
    a, b = attack(model, x, y), attack(model, x, y)
    assert torch.equal(a.adv, b.adv) and torch.equal(a.success, b.success) and torch.equal(a.norms, b.norms)
    assert (a.forward_passes, a.backward_passes) == (b.forward_passes, b.backward_passes)


@pytest.mark.parametrize("name", ATTACKS)
def test_deterministic_under_seed(name, model):
    _assert_deterministic(_make(name), model)


@pytest.mark.parametrize(("name", "kwargs"), OTHER_PATHS, ids=OTHER_IDS)
def test_deterministic_on_other_paths(name, kwargs, model):
    _assert_deterministic(_make(name, **kwargs), model)


def _assert_batch_of_one(attack, model):
    x, _ = random_batch(1)
    y = _labels(model, x, misclassified=0)  # correct: attacked
    result = attack(model, x, y)
    assert result.adv.shape == (1, 1, 8, 8) and result.success.shape == (1,) and result.norms.shape == (1,)
    assert all(value.shape[0] == 1 for value in result.extra.values())


@pytest.mark.parametrize("name", ATTACKS)
def test_batch_of_one(name, model):
    _assert_batch_of_one(_make(name), model)


@pytest.mark.parametrize(("name", "kwargs"), OTHER_PATHS, ids=OTHER_IDS)
def test_batch_of_one_on_other_paths(name, kwargs, model):
    _assert_batch_of_one(_make(name, **kwargs), model)


# --- refusals ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTACKS)
def test_refuses_inference_mode_with_an_actionable_message(name, model):
    x, y = random_batch()
    with pytest.raises(RuntimeError, match="inference_mode"):
        with torch.inference_mode():
            _make(name)(model, x, y)


@pytest.mark.parametrize("name", ATTACKS)
def test_refuses_bad_inputs_naming_the_fix(name, model):
    """Inputs outside [0, 1] (unnormalised images, or normalised outside the model), labels outside the model's
    classes and a per-sample ε of the wrong shape raise a ValueError that says what is wrong."""
    x, y = random_batch()
    attack = _make(name)
    for bad in (x * 255, x - 1):
        with pytest.raises(ValueError, match=r"inputs must lie in \[0, 1\].*normalise inside the model"):
            attack(model, bad, y)
    for bad in (y + 10, y - 10):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
            attack(model, x, bad)
    # An attack without an eps argument refuses any per-call ε; the others one of the wrong shape.
    wrong_shape = r"eps must be a scalar or a tensor of shape \(6,\)" if _accepts(name, "eps") else r"\beps\b"
    with pytest.raises(ValueError, match=wrong_shape):
        attack(model, x, y, eps=torch.full((3,), 0.05))


@pytest.mark.parametrize("name", ATTACKS)
def test_refuses_an_unknown_active_set_naming_the_allowed_ones(name, model):
    x, y = random_batch()
    with pytest.raises(ValueError, match=r"Unknown active_set 'fixed'; allowed values are \('shrink', 'mask'\)"):
        _make(name)(model, x, y, active_set="fixed")


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


@pytest.mark.parametrize(("name", "kwargs"), OTHER_PATHS, ids=OTHER_IDS)
def test_masked_active_set_equals_shrinking_on_other_paths(name, kwargs, model):
    _assert_masked_equals_shrinking(_make(name, **kwargs), model)


def _assert_masked_equals_shrinking(attack, model):
    x, _ = random_batch()
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


# Stochastic attacks whose draws depend on a sample's position in its batch: every draw is one tensor for the rows
# still active (SampleState.rand and the like: random starts, Square's windows, Transfer's APGD start), so a sample
# attacked alone gets the numbers row 0 of the batch got. PGD without its random start draws nothing and is tested
# (RANDOMNESS_OFF); FAB draws only for restarts after the first, so its default is tested as it is.
DRAWS_BY_POSITION = {"anpgd", "apgd", "square", "transfer"}
RANDOMNESS_OFF = {"pgd": {"random_start": False}}
# Where the INDEPENDENT settings fool no sample below: FAB's ε is an L∞ one; C&W's tanh variable saturates at the
# faces of the box, so it needs more and larger steps to move the pixels there (and its search on c then starts low,
# grows and bisects per sample).
ALONE_SETTINGS = {
    ("fab", "l2"): {"eps": 0.3},
    ("fab", "l1"): {"eps": 1.5},
    ("cw_l2", "l2"): {"initial_const": 0.1, "binary_search_steps": 3, "steps": 40, "step_size": 0.05},
}


@pytest.mark.parametrize("inputs", ["uniform", "faces"])
@pytest.mark.parametrize(("name", "norm"), _norm_cases(lambda spec: spec.name not in DRAWS_BY_POSITION))
def test_each_sample_is_attacked_as_if_alone(name, norm, inputs, model):
    """A sample's result does not depend on the rest of its batch (per-sample constants, radii, active sets): the
    attack on a batch equals the attack on each of its samples alone, in every norm, on uniform inputs and on inputs
    whose first two rows lie on the faces of the box (0 or 1, as the borders of digits), where steps are clipped (the
    box and the measured norms are checked there too).
    Float32 sums over a batch of one and of six differ by rounding (measured: at most 4e-7 on a point), hence the
    tolerance on the points; the verdicts must agree exactly."""
    x, _ = random_batch()
    if inputs == "faces":
        x[:, :, :2] = x[:, :, :2].round()
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample starts correct, so each result comes from the attack itself
    settings = {**INDEPENDENT.get(name, {}), **RANDOMNESS_OFF.get(name, {}), **ALONE_SETTINGS.get((name, norm), {})}
    attack = _make(name, norm, **settings)
    whole = attack(model, x, y)
    assert whole.success.any()
    assert whole.adv.min() >= 0 and whole.adv.max() <= 1
    if norm in BUDGET:
        torch.testing.assert_close(whole.norms, geometry_for(norm).measure(whole.adv - x))
    alone = [attack(model, x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]
    torch.testing.assert_close(whole.adv, torch.cat([a.adv for a in alone]), atol=1e-5, rtol=0)
    assert torch.equal(whole.success, torch.cat([a.success for a in alone]))


@pytest.mark.parametrize("name", sorted(DRAWS_BY_POSITION))
def test_the_exempt_attacks_do_draw_by_position(name, model):
    """Keeps :data:`DRAWS_BY_POSITION` honest: each of them, attacking a sample alone, draws what row 0 of a batch
    draws, so its points differ from the batch's (an attack that draws per sample must leave the list, and is then
    tested above)."""
    x, _ = random_batch()
    with torch.no_grad():
        y = model(x).argmax(1)
    attack = _make(name)
    whole = attack(model, x, y)
    alone = torch.cat([attack(model, x[i : i + 1], y[i : i + 1]).adv for i in range(x.shape[0])])
    assert not torch.allclose(whole.adv, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [n for n in ATTACKS if _accepts(n, "autocast")])
def test_bf16_autocast_keeps_the_attack_in_float32(name, model):
    """Under bf16 autocast the model runs in bf16 while the perturbation, the result and the norms stay float32 and
    every contract holds (box, ball, verified successes)."""
    x, y = random_batch()
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
    x, y = random_batch()
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
    x, _ = random_batch()
    with torch.no_grad():
        y = model(x).argmax(1)
    attack = _make(name, **INDEPENDENT.get(name, {}))
    alone = attack(model, x, y)
    both = attack(model, torch.cat([x, x]), torch.cat([y, (y + 1) % 10]))
    assert both.backward_passes == alone.backward_passes + EARLY_STOPPING[name] * x.shape[0]
    assert alone.backward_passes > 0
    assert torch.equal(both.success[: x.shape[0]], alone.success) and both.success[x.shape[0] :].all()
