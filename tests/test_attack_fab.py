"""FAB: exact minimal perturbations of linear classifiers (L∞, L2, L1; untargeted, targeted, FAB-T), FAB-T's target
order, budgets, pass counts, host syncs, and the official AutoAttack code on a small trained CNN. The contract every
attack shares (batch independence in every norm under a budget, determinism, model state, ...) is tested from the
registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LinearNet, TinyCNN, random_batch
from sync_detector import HostSyncDetector
from torch import nn

from advtrain.attacks import FAB, create_attack, list_attacks
from advtrain.threat.norms import flat_norm

NORMS = list_attacks()["fab"].norms
P = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}
DUAL = {"linf": 1.0, "l2": 2.0, "l1": float("inf")}


def _linear(n: int = 100, dim: int = 64, classes: int = 10, seed: int = 0):
    """A random linear classifier in float64, centred at x = 0.5 (bias −W·0.5 + small), inputs 0.5 ± 0.02, labels its
    predictions; per norm the exact (n, C) distances to each class's boundary, (z_y − z_j) / ‖w_y − w_j‖_q (q the
    dual norm, +inf for the label). Every minimal perturbation found is below 0.45 in every coordinate, less than
    the room of 0.48 to the box, so the box never binds (asserted by the tests).

    The attack's iterates are float32, spaced 6e-8 near 0.5: a perturbation of 1e-5 is then resolved to 0.6% only.
    Inputs closer than 1e-4 to a boundary in L∞ (the smallest of the three distances; about 6% of them) are left
    out, so that the spacing stays below 6e-4 of every distance and the tests measure the algorithm, not float32.
    The inputs are float32 numbers (in a float64 tensor), so that the reported norms carry no rounding of them.
    """
    gen = torch.Generator().manual_seed(seed)
    model = LinearNet(dim, classes, seed=seed).double()
    with torch.no_grad():
        model.fc.bias.copy_(-0.5 * model.fc.weight.sum(1) + 0.1 * torch.randn(classes, generator=gen).double())
    x = (0.5 + 0.02 * (2 * torch.rand(2 * n, dim, generator=gen) - 1)).double()
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    w = model.fc.weight.detach()
    margin = logits.gather(1, y[:, None]) - logits
    diff = w[y][:, None, :] - w[None, :, :]
    own = F.one_hot(y, classes).bool()
    exact = {norm: (margin / diff.norm(p=DUAL[norm], dim=2)).masked_fill(own, float("inf")) for norm in NORMS}
    keep = (exact["linf"].min(1).values >= 1e-4).nonzero().squeeze(1)[:n]
    assert keep.numel() == n
    return model, x[keep], y[keep], {norm: per_class[keep] for norm, per_class in exact.items()}


@pytest.mark.parametrize("norm", NORMS)
def test_linear_classifier_exact_minimal_norm(norm):
    """Untargeted FAB lands on the closed-form minimal perturbation min_j |margin_j| / ‖w_y − w_j‖_q within 1%.

    On a linear model every linearisation is exact: the first step reaches η = 1.05 times the minimum, and the
    backward step β and the bias towards x_orig then shrink the overshoot to ≈ 0.5% (the fixed point of the
    iteration for η = 1.05, β = 0.9, α_max = 0.1). The lower bound allows float32 rounding of the iterates."""
    model, x, y, exact = _linear()
    best = exact[norm].min(1).values
    assert best.max() < 0.45
    steps = 100
    result = FAB(norm=norm, steps=steps)(model, x, y)
    assert result.success.all()
    ratio = result.norms.double() / best
    assert ratio.min() >= 1.0 - 1e-4 and ratio.max() <= 1.01, (ratio.min(), ratio.max())
    with torch.no_grad():
        assert (model(result.adv).argmax(1) != y).all()
    # One clean forward, then per iteration a forward with graph, 9 backward passes and one checking forward.
    assert result.forward_passes == x.shape[0] * (1 + 2 * steps)
    assert result.backward_passes == x.shape[0] * 9 * steps


@pytest.mark.parametrize("norm", NORMS)
def test_targeted_and_fab_t_on_a_linear_classifier(norm):
    """targeted=True reaches the runner-up class at the distance to its boundary wherever the projection onto that
    boundary lands in its region (then that distance is the exact minimum: crossing z_t = z_y is necessary). FAB-T
    with one target ends between the untargeted minimum and that distance; FAB-T over all classes finds the
    untargeted minimum."""
    model, x, y, exact = _linear()
    with torch.no_grad():
        logits = model(x)
    runner_up = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    to_target = exact[norm].gather(1, runner_up[:, None]).squeeze(1)
    assert to_target.max() < 0.45
    # Does the point just past the runner-up's boundary, on the minimal path to it, belong to the runner-up?
    w = model.fc.weight.detach()
    v = w[runner_up] - w[y]
    if norm == "l2":
        direction = v / v.norm(dim=1, keepdim=True)
    elif norm == "linf":
        direction = v.sign()
    else:
        direction = F.one_hot(v.abs().argmax(1), v.shape[1]).double() * v.sign()
    with torch.no_grad():
        lands = model(x + 1.001 * to_target[:, None] * direction).argmax(1) == runner_up
    assert lands.sum() >= 50

    targeted = FAB(norm=norm, targeted=True)(model, x, runner_up)
    assert targeted.success[lands].all()
    ratio = targeted.norms.double()[lands] / to_target[lands]
    assert ratio.min() >= 1.0 - 1e-4 and ratio.max() <= 1.01
    with torch.no_grad():
        assert (model(targeted.adv[targeted.success]).argmax(1) == runner_up[targeted.success]).all()

    best = exact[norm].min(1).values
    one = FAB(norm=norm, n_target_classes=1)(model, x, y)
    assert one.success.all() and one.backward_passes == 100 * x.shape[0]
    assert (one.norms.double() >= best * (1 - 1e-4)).all() and (one.norms.double() <= to_target * 1.01).all()
    every = FAB(norm=norm, n_target_classes=9)(model, x, y)
    ratio = every.norms.double() / best
    assert ratio.min() >= 1.0 - 1e-4 and ratio.max() <= 1.01


def _reachable_fourth_class() -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, float]]:
    """A linear 4-class model on 4 inputs at x = 0.5 where class 0 wins and the other classes rank 1, 2, 3 by clean
    logit (margins 1, 1.5, 2). Classes 1 and 2 cannot be reached inside the box (their boundary normals have entries
    ±0.1: at most 0.2 of progress), and the box corners their runs go to do not cross class 3's boundary either;
    class 3 can be reached (normal 3·1), at distance 2 / ‖3·1‖_q."""
    model = nn.Linear(4, 4).double()
    normals = torch.tensor([[0.0] * 4, [-0.1] * 4, [0.1, -0.1, 0.1, -0.1], [3.0] * 4], dtype=torch.float64)
    margins = torch.tensor([0.0, 1.0, 1.5, 2.0], dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(normals)
        model.bias.copy_(-margins - 0.5 * normals.sum(1))
    x = torch.full((2, 4), 0.5, dtype=torch.float64)
    exact = {norm: 2.0 / float(torch.linalg.vector_norm(normals[3], ord=DUAL[norm])) for norm in NORMS}
    return model, x, torch.zeros(2, dtype=torch.long), exact


@pytest.mark.parametrize("norm", NORMS)
def test_fab_t_reaches_a_class_only_when_its_rank_is_covered(norm):
    model, x, y, exact = _reachable_fourth_class()
    with torch.no_grad():
        assert model(x)[0].argsort(descending=True).tolist() == [0, 1, 2, 3]
    short = FAB(norm=norm, n_target_classes=2)(model, x, y)
    assert not short.success.any() and torch.equal(short.adv, x)
    for k in (3, 9):  # 9 > C − 1: all other classes
        covered = FAB(norm=norm, n_target_classes=k)(model, x, y)
        assert covered.success.all()
        ratio = covered.norms.double() / exact[norm]
        assert ratio.min() >= 1.0 - 1e-4 and ratio.max() <= 1.01
        assert covered.backward_passes == 3 * 100 * 2  # every target runs (no budget: each can lower the norm)
        with torch.no_grad():
            assert (model(covered.adv).argmax(1) == 3).all()


def test_budget_per_sample_and_early_stop():
    """With ε, a success counts only within ε: rows whose ε covers the unbudgeted norm succeed (within ε), the others
    fail and come back unchanged; successful rows stop early, so the budgeted call costs fewer passes."""
    model, x, y, exact = _linear(n=40)
    free = FAB(norm="l2")(model, x, y)
    assert free.success.all()
    even = torch.arange(40) % 2 == 0
    eps = torch.where(even, free.norms * 1.001, exact["l2"].min(1).values.float() * 0.9)
    budgeted = FAB(norm="l2")(model, x, y, eps=eps)
    assert torch.equal(budgeted.success, even)
    assert (budgeted.norms[even] <= eps[even]).all()
    assert torch.equal(budgeted.adv[~even], x[~even])
    assert budgeted.backward_passes < free.backward_passes
    # The configured budget applies when the call gives none; a large one makes every sample stop at its first success.
    large = FAB(norm="l2", eps=1.0)(model, x, y)
    assert large.success.all() and large.backward_passes == 9 * 40  # the first step already crosses (η = 1.05)


def test_restarts_only_lower_the_norm_and_respect_the_budget():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, _ = random_batch(12, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    one = FAB(norm="linf", steps=20)(model, x, y)
    three = FAB(norm="linf", steps=20, restarts=3, seed=0)(model, x, y)
    assert (three.success >= one.success).all()
    assert (three.norms[one.success] <= one.norms[one.success]).all()  # the first run is the same, then only better
    eps = 0.8 * float(one.norms[one.success].median())
    budgeted = FAB(norm="linf", steps=20, restarts=3, seed=0, eps=eps)(model, x, y)
    assert (budgeted.norms[budgeted.success] <= eps + 1e-6).all()
    assert torch.equal(budgeted.adv[~budgeted.success], x[~budgeted.success])


def test_samples_fooled_from_the_start_cost_nothing():
    model, x, y, _ = _linear(n=10)
    labels = torch.where(torch.arange(10) < 4, (y + 1) % 10, y)
    result = FAB(norm="linf", steps=7)(model, x, labels)
    assert result.success.all() and (result.norms[:4] == 0).all() and torch.equal(result.adv[:4], x[:4])
    assert result.forward_passes == 10 + 7 * 2 * 6 and result.backward_passes == 7 * 9 * 6
    # Targeted: a sample already at its target is done.
    result = FAB(norm="linf", steps=7, targeted=True)(model, x, torch.where(torch.arange(10) < 3, y, (y + 1) % 10))
    assert torch.equal(result.adv[:3], x[:3]) and result.success[:3].all() and result.backward_passes == 7 * 7


def test_each_sample_is_attacked_as_if_alone_unbudgeted_and_as_fab_t():
    """Without random restarts FAB is deterministic and per sample: the batch equals its two halves. The registry
    checks this in every norm under a budget; here without one, and FAB-T's targets."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, _ = random_batch(8, seed=2)
    with torch.no_grad():
        y = model(x).argmax(1)
    for kwargs in ({"norm": "l2"}, {"norm": "l1", "n_target_classes": 3}):
        attack = FAB(steps=15, **kwargs)
        whole = attack(model, x, y)
        assert whole.success.any()
        halves = [attack(model, x[:4], y[:4]), attack(model, x[4:], y[4:])]
        torch.testing.assert_close(whole.adv, torch.cat([h.adv for h in halves]), atol=1e-5, rtol=0)
        assert torch.equal(whole.success, torch.cat([h.success for h in halves]))


@pytest.mark.parametrize("eps", [None, 0.05])
def test_host_syncs_do_not_grow_with_the_steps_beyond_one_per_step(eps):
    """Without a budget an iteration reads nothing back from the device; with one, the active set shrinks once per
    iteration (one sync): the syncs are per run, not per step."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, _ = random_batch(6, seed=3)
    y = torch.zeros(6, dtype=torch.long)

    def syncs(steps: int) -> int:
        with HostSyncDetector() as detector:
            FAB(norm="l2", steps=steps, eps=eps)(model, x, y)
        return detector.count

    per_step = 0 if eps is None else 1
    assert syncs(9) - syncs(3) <= per_step * 6


def test_validation_names_the_argument():
    for kwargs, match in [
        ({"norm": "l0"}, "allowed values"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"n_target_classes": 0}, "n_target_classes"),
        ({"n_target_classes": 3, "targeted": True}, "exclude each other"),
        ({"alpha_max": 1.5}, "alpha_max"),
        ({"eta": 0.5}, "eta"),
        ({"beta": 0.0}, "beta"),
        ({"eps": -1.0}, "eps"),
        ({"eps": 2.0}, "eps"),  # L∞ above the whole pixel range
    ]:
        with pytest.raises(ValueError, match=match):
            FAB(**kwargs)
    model, x, y, _ = _linear(n=4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FAB()(model, x * 3, y)
    with pytest.raises(ValueError, match="shape"):
        FAB()(model, x, y, eps=torch.ones(3))


def test_defaults_are_the_official_ones():
    attack = create_attack("fab", norm="l1", n_target_classes=9)
    # The official defaults (pyautoattack.FABAttack_PT): 100 iterations, α_max 0.1, η 1.05, β 0.9, one restart.
    assert (attack.steps, attack.alpha_max, attack.eta, attack.beta, attack.restarts) == (100, 0.1, 1.05, 0.9, 1)


# --- the official AutoAttack code ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model():
    """A SmallCNN (width 8, hidden 32) trained for one epoch on the embedded MNIST digits (about 1 s; ~88% accuracy),
    with the correctly classified digits of the first 48 test digits."""
    from advtrain.data.embedded import MNIST5kDataModule
    from advtrain.models.reference import reference_batch
    from advtrain.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn", width=8, hidden=32, dropout=0.0, init="he")
    dm = MNIST5kDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for x, y, _ in dm.train_dataloader():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = reference_batch(48)
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    assert keep.sum() >= 30
    return model, x[keep], y[keep]


def _official(model, x, y, norm, n_target_classes, eps=None):
    """pyautoattack's FABAttack_PT (its defaults) and its per-sample norms (inf where it failed). Without ``eps`` its
    success threshold is set out of reach (every success counts)."""
    fab_pt = pytest.importorskip("pyautoattack.fab_pt")
    name = {"linf": "Linf", "l2": "L2", "l1": "L1"}[norm]
    official = fab_pt.FABAttack_PT(model, norm=name, n_iter=100, eps=1e6 if eps is None else eps, seed=0,
                                   targeted=n_target_classes is not None, n_target_classes=n_target_classes or 9,
                                   device=x.device)  # fmt: skip
    adv = official.perturb(x, y)
    with torch.no_grad():
        success = model(adv).argmax(1) != y
    norms = flat_norm(adv - x, P[norm])
    return success, torch.where(success, norms, torch.full_like(norms, float("inf")))


def _compare(model, x, y, norm, n_target_classes):
    """Ours (no budget) against the official code: success at least theirs, median norm ratio over the samples both
    fool ≤ 1.001. The untargeted run is the same algorithm (equal norms up to float32 rounding of the projection
    and of the gradients, carried over 100 iterations: measured median ratio 1.0000, largest 1.002); FAB-T here
    keeps the best of all 9 targets where the official code stops at the first success, so it is smaller still."""
    ours = FAB(norm=norm, n_target_classes=n_target_classes, seed=0)(model, x, y)
    success, norms = _official(model, x, y, norm, n_target_classes)
    assert ours.success.sum() >= success.sum()
    both = ours.success & success
    ratio = ours.norms[both] / norms[both]
    assert ratio.median() <= 1.001, (norm, n_target_classes, ratio.median())
    return ours, ratio


def test_untargeted_matches_the_official_fab_linf(digits_model):
    model, x, y = digits_model
    _compare(model, x[:16], y[:16], "linf", None)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("n_target_classes", [None, 9])
def test_matches_the_official_fab(digits_model, norm, n_target_classes):
    model, x, y = digits_model
    _compare(model, x, y, norm, n_target_classes)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_robust_accuracy_at_eps_matches_the_official(digits_model, norm):
    """AutoAttack's use: FAB-T-9 at a budget (the median official unbudgeted norm). Success within ε is decided by
    the same trajectories (ours stops a sample at its first success within ε, theirs minimises on), so the robust
    accuracies agree; one sample of slack for a trajectory that float rounding tips over ε."""
    model, x, y = digits_model
    _, norms = _official(model, x, y, norm, 9)
    eps = float(norms.median())
    ours = FAB(norm=norm, n_target_classes=9, eps=eps, seed=0)(model, x, y)
    success, _ = _official(model, x, y, norm, 9, eps=eps)
    assert (ours.norms[ours.success] <= eps).all()
    assert abs(int(ours.success.sum()) - int(success.sum())) <= 1
