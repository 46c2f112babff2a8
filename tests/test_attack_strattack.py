"""StrAttack (Xu et al., ICLR 2019; seed 002): group structure, the group soft threshold, the ADMM on a linear model
with a closed-form answer, its own results (box, L0/L1/L2/L∞ extras, ε cap, targeted, pass counts), and sparsity
against C&W L2 plus a cross-check with adv-lib on the trained reference SmallCNN. The contract every attack shares
(batch of one, determinism, model state, bad inputs, ...) is tested from the registry."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import LinearNet, TinyCNN, random_batch

from advtrain.attacks.strattack import GroupStructure, StrAttack, group_soft_threshold

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _fast(**kw):
    defaults = dict(steps=20, binary_search_steps=2, refine_steps=10, refine_search_steps=2, initial_const=50.0)
    defaults.update(kw)
    return StrAttack(**defaults)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN().eval()


# --- groups ---------------------------------------------------------------------------------------------------------


def _membership(groups: GroupStructure) -> torch.Tensor:
    """(L, n) count of how often each group holds each flat pixel (built from the group indices, padding dropped)."""
    idx = groups.group_indices()
    c, h, w = groups.shape
    member = torch.zeros(idx.shape[0], c * h * w, dtype=torch.long)
    for g, row in enumerate(idx):
        row = row[row >= 0]
        member[g].index_add_(0, row, torch.ones_like(row))
    return member


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_non_overlapping_groups_partition_the_image(shape):
    c, h, w = shape
    groups = StrAttack().groups_for(shape)
    assert (groups.size, groups.stride, groups.partition) == (2, 2, True)
    assert groups.num_groups == (h // 2) * (w // 2)
    member = _membership(groups)
    assert member.max() == 1 and torch.equal(member.sum(0), torch.ones(c * h * w, dtype=torch.long))
    assert (member.sum(1) == 4 * c).all()  # every group is a full 2x2xC patch
    # Group (p, q) holds exactly the pixels of rows 2p..2p+1 and columns 2q..2q+1, all channels.
    image = torch.arange(c * h * w).view(c, h, w)
    for g in (0, 1, groups.cols, groups.num_groups - 1):
        p, q = divmod(g, groups.cols)
        expected = image[:, 2 * p : 2 * p + 2, 2 * q : 2 * q + 2].flatten().sort().values
        assert torch.equal(member[g].nonzero().squeeze(1), expected)
    torch.testing.assert_close(groups.counts, torch.ones(1, c, h, w))


def test_image_net_size_uses_13x13_groups_and_odd_sizes_are_covered():
    groups = StrAttack().groups_for((3, 299, 299))
    assert (groups.size, groups.stride, groups.num_groups) == (13, 13, 23 * 23)
    groups = StrAttack().groups_for((3, 224, 224))  # 224 = 17·13 + 3: a truncated last row/column of groups
    assert groups.num_groups == 18 * 18
    member = _membership(groups)
    assert torch.equal(member.sum(0), torch.ones(3 * 224 * 224, dtype=torch.long))
    odd = GroupStructure((1, 7, 9), 2, 2)
    assert torch.equal(_membership(odd).sum(0), torch.ones(63, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 9, 12)])
def test_overlapping_groups_cover_the_image(shape):
    c, h, w = shape
    groups = StrAttack(overlap=True).groups_for(shape)
    assert (groups.size, groups.stride, groups.partition) == (3, 2, False)
    member = _membership(groups)
    per_pixel = member.sum(0)
    assert (per_pixel >= 1).all() and per_pixel.max() == 4  # interior pixels on both overlaps lie in 2x2 groups
    torch.testing.assert_close(groups.counts.flatten(), per_pixel.float())
    # The last row and column are covered (a floor-based 3x3/stride-2 grid on 28x28 misses them).
    last = torch.arange(c * h * w).view(c, h, w)[:, -1, :].flatten()
    assert (per_pixel[last] >= 1).all()
    # Windows start at multiples of the stride and are 3x3xC where they fit inside the image.
    image = torch.arange(c * h * w).view(c, h, w)
    expected = image[:, 2:5, 4:7].flatten().sort().values
    assert torch.equal(member[1 * groups.cols + 2].nonzero().squeeze(1), expected)


def test_split_merge_round_trip_and_counts():
    x = torch.rand(2, 3, 11, 10)
    for size, stride in ((2, 2), (3, 2), (4, 4), (3, 1)):
        groups = GroupStructure((3, 11, 10), size, stride)
        torch.testing.assert_close(groups.merge(groups.split(x)), x * groups.counts)


def test_stride_larger_than_group_is_rejected():
    with pytest.raises(ValueError, match="stride"):
        GroupStructure((1, 8, 8), 2, 3)


# --- the y-step: block soft thresholding ----------------------------------------------------------------------------


def test_group_soft_threshold_matches_its_closed_form():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(3, 5, 7, generator=gen)  # 3 samples, groups of 5 entries, 7 groups
    blocks[0, :, 0] = 0.0
    thr = 1.3
    out = group_soft_threshold(blocks, thr)
    norms = blocks.norm(dim=1, keepdim=True)
    for b in range(3):
        for g in range(7):
            c, n = blocks[b, :, g], float(norms[b, 0, g])
            expected = torch.zeros(5) if n <= thr else (1 - thr / n) * c
            torch.testing.assert_close(out[b, :, g], expected)
    # Groups at or below the threshold become exactly zero; the others shrink by exactly thr in norm.
    below = norms <= thr
    assert below.any() and (~below).any()
    assert (out.masked_select(below.expand_as(out)) == 0).all()
    torch.testing.assert_close(out.norm(dim=1, keepdim=True)[~below], norms[~below] - thr)


def test_group_soft_threshold_is_the_prox_of_the_group_l2_norm():
    """Checks the optimality condition of argmin_y thr·‖y‖₂ + ½‖y − c‖² and compares with a numerical solver."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    gen = torch.Generator().manual_seed(1)
    thr = 0.8
    for scale in (0.1, 0.5, 1.0, 3.0):  # from well below to well above the threshold
        c = torch.randn(6, generator=gen, dtype=torch.float64) * scale
        y = group_soft_threshold(c[None, :, None], thr)[0, :, 0]
        if y.norm() > 0:  # gradient condition: y − c + thr·y/‖y‖ = 0
            torch.testing.assert_close(y - c + thr * y / y.norm(), torch.zeros(6, dtype=torch.float64))
        else:  # subgradient condition: ‖c‖ ≤ thr
            assert c.norm() <= thr
        target = c.numpy()

        def objective(v, target=target):
            return thr * np.linalg.norm(v) + 0.5 * np.sum((v - target) ** 2)

        best = scipy_optimize.minimize(objective, c.numpy(), method="Powell", options={"xtol": 1e-10, "ftol": 1e-14})
        assert objective(y.numpy()) <= best.fun + 1e-9
        np.testing.assert_allclose(y.numpy(), best.x, atol=1e-4)


@pytest.mark.parametrize(("size", "stride"), [(2, 2), (3, 2), (13, 13)])
def test_structure_threshold_equals_the_unfold_layout_operator(size, stride):
    x = torch.randn(2, 3, 30, 30)
    groups = GroupStructure((3, 30, 30), size, stride)
    ours = groups.merge(groups.soft_threshold(groups.split(x), 0.9))
    pad = (0, groups.pad_w, 0, groups.pad_h)
    cols = torch.nn.functional.unfold(torch.nn.functional.pad(x, pad), size, stride=stride)
    ref = torch.nn.functional.fold(group_soft_threshold(cols, 0.9), (30 + groups.pad_h, 30 + groups.pad_w), size,
                                   stride=stride)[..., :30, :30]  # fmt: skip
    torch.testing.assert_close(ours, ref)


# --- the attack on a linear model -----------------------------------------------------------------------------------


def _linear_problem(n=6, classes=5):
    model = LinearNet(64, classes, seed=2)
    with torch.no_grad():
        model.fc.weight.mul_(0.3)
    gen = torch.Generator().manual_seed(3)
    x = 0.5 + 0.02 * torch.randn(n, 1, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _closed_form_l2(model, x, y):
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    z = x.flatten(1) @ w.T + b
    out = []
    for i in range(x.shape[0]):
        d = [(z[i, y[i]] - z[i, j]) / (w[y[i]] - w[j]).norm() for j in range(w.shape[0]) if j != y[i]]
        out.append(min(d))
    return torch.stack(out)


@pytest.mark.parametrize("overlap", [False, True])
def test_without_group_penalty_admm_finds_the_minimal_l2_perturbation_of_a_linear_model(overlap):
    """τ = 0 turns StrAttack into ADMM on C&W's L2 problem, whose answer is closed-form for a linear model. With
    overlapping groups the consensus z-step (one copy per group, n_j copies per pixel) must still reach it."""
    model, x, y = _linear_problem()
    expected = _closed_form_l2(model, x, y)
    assert expected.max() < 0.4  # far from the box: 0.5 ± 0.1 per coordinate at most
    result = StrAttack(tau=0.0, steps=100, binary_search_steps=12, refine=False, overlap=overlap)(model, x, y)
    assert result.success.all()
    assert (result.adv.sub(x).abs().max() < 0.3) and (result.adv > 0).all() and (result.adv < 1).all()
    assert (result.norms >= expected * (1 - 1e-4)).all()  # nothing beats the minimum
    assert (result.norms <= expected * 1.03).all()


def test_group_penalty_makes_the_perturbation_group_sparse_on_a_linear_model():
    model, x, y = _linear_problem()
    dense = StrAttack(tau=0.0, steps=100, binary_search_steps=8, refine=False)(model, x, y)
    sparse = StrAttack(tau=0.5, steps=100, binary_search_steps=8, refine=False)(model, x, y)
    assert sparse.success.all()
    assert (dense.extra["l0"] == 64).all()
    assert sparse.extra["l0"].max() < 64 and (sparse.extra["l0"] % 4 == 0).all()  # whole 2x2 groups, box never binds


def test_overlapping_zero_pattern_is_a_union_of_groups():
    """With overlapping groups, a pixel is zero exactly when some group holding it is zero (overlapping group lasso)."""
    model, x, y = _linear_problem()
    attack = StrAttack(tau=0.3, steps=100, binary_search_steps=8, refine=False, overlap=True)
    result = attack(model, x, y)
    assert result.success.all()
    indices = attack.groups_for((1, 8, 8)).group_indices()
    for delta in (result.adv - x).flatten(1):
        zero = delta == 0
        union = torch.zeros_like(zero)
        for row in indices:
            row = row[row >= 0]
            if zero[row].all():
                union[row] = True
        assert 0 < int(zero.sum()) < 64 and torch.equal(zero, union)


def test_refinement_re_optimises_inside_the_found_support():
    """Sec. 4.2: with the sparsity pattern fixed (smallest 3% of the magnitudes dropped), the refined attack removes the
    group penalty's shrinkage, so it finds smaller L2 norms on fewer coordinates and never leaves the support."""
    model, x, y = _linear_problem()
    plain = StrAttack(tau=0.5, steps=100, binary_search_steps=8, refine=False)(model, x, y)
    refined = StrAttack(tau=0.5, steps=100, binary_search_steps=8, refine_steps=50, refine_search_steps=4)(model, x, y)
    assert plain.success.all() and refined.success.all()
    assert (refined.norms < 0.95 * plain.norms).sum() >= 4
    assert (refined.extra["l0"] < plain.extra["l0"]).sum() >= 4
    assert not ((refined.adv != x) & (plain.adv == x)).any()


# --- contract -------------------------------------------------------------------------------------------------------


def _predicted(model, n=6):
    x, _ = random_batch(n)
    with torch.no_grad():
        return x, model(x).argmax(1)


def test_result_box_norms_extra_and_unfooled_samples_unchanged(model):
    x, y = _predicted(model, 8)
    y[:2] = (y[:2] + 1) % 10  # two samples start misclassified: fooled at zero norm
    result = _fast()(model, x, y)
    assert result.adv.shape == x.shape and result.adv.dtype == x.dtype
    assert result.adv.min() >= 0 and result.adv.max() <= 1
    delta = (result.adv - x).flatten(1)
    torch.testing.assert_close(result.norms, delta.norm(dim=1))
    torch.testing.assert_close(result.extra["l2"], result.norms)
    torch.testing.assert_close(result.extra["l1"], delta.abs().sum(1))
    torch.testing.assert_close(result.extra["linf"], delta.abs().amax(1))
    torch.testing.assert_close(result.extra["l0"], (delta != 0).sum(1).float())
    assert result.success.any()
    assert torch.equal(result.adv[~result.success], x[~result.success])
    with torch.no_grad():
        assert (model(result.adv).argmax(1) != y)[result.success].all()


def test_eps_caps_the_linf_norm_per_sample(model):
    x, y = _predicted(model)
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3])
    result = _fast()(model, x, y, eps=eps)
    assert (result.extra["linf"] <= eps + 1e-6).all()
    assert not result.success[0] and torch.equal(result.adv[0], x[0])
    capped = _fast(eps=0.05)(model, x, y)
    assert (capped.extra["linf"] <= 0.05 + 1e-6).all()


def test_targeted_reaches_the_targets(model):
    x, _ = random_batch(6)
    with torch.no_grad():
        pred = model(x).argmax(1)
    targets = (pred + 3) % 10
    result = _fast(targeted=True, steps=40, binary_search_steps=4)(model, x, targets)
    assert result.success.float().mean() >= 0.5
    with torch.no_grad():
        reached = model(result.adv).argmax(1) == targets
    assert reached[result.success].all()
    # Untargeted success is not targeted success: the untargeted attack usually lands on another class.
    untargeted = _fast(steps=40, binary_search_steps=4)(model, x, pred)
    assert untargeted.success.all()


def test_pass_counts_and_refinement_only_on_fooled_samples(model):
    x, y = _predicted(model)
    eps = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the first two samples cannot move, so are never fooled
    plain = _fast(refine=False)(model, x, y, eps=eps)
    assert plain.forward_passes == 2 * 6 * 20 * 2 and plain.backward_passes == 6 * 20 * 2
    refined = _fast()(model, x, y, eps=eps)
    fooled = int(plain.success.sum())
    assert 0 < fooled <= 4 and torch.equal(plain.success, refined.success)
    assert refined.backward_passes - plain.backward_passes == fooled * 10 * 2
    assert refined.forward_passes - plain.forward_passes == fooled * 10 * 2
    # The refinement never makes the kept point worse, and never perturbs more coordinates.
    assert (refined.norms <= plain.norms + 1e-6).all()
    assert (refined.extra["l0"] <= plain.extra["l0"]).all()


def test_unknown_eta_growth_is_refused():
    with pytest.raises(ValueError, match="eta_growth"):
        StrAttack(eta_growth="cubic")


# --- on the trained reference SmallCNN ------------------------------------------------------------------------------


def _reference(n):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _common import reference_model
    finally:
        sys.path.pop(0)
    from advtrain.models.reference import reference_batch

    model = reference_model()
    x, y = reference_batch(n + 8)
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return model, x[keep][:n], y[keep][:n]


def _adv_lib():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _common import import_adv_lib
    finally:
        sys.path.pop(0)
    attacks = import_adv_lib()
    if attacks is None or not hasattr(attacks, "str_attack"):
        pytest.skip("adv-lib (with str_attack) is not installed")
    return attacks


def test_matches_adv_lib_str_attack_on_a_small_cnn(model):
    attacks = _adv_lib()
    x, y = _predicted(model, 8)
    ours = StrAttack(steps=60, binary_search_steps=3, initial_const=5.0, refine=False)(model, x, y)
    peer = attacks.str_attack(model, x, y, binary_search_steps=3, max_iterations=60, initial_const=5.0, retrain=False)
    with torch.no_grad():
        peer_ok = model(peer).argmax(1) != y
    assert torch.equal(ours.success, peer_ok) and ours.success.all()
    peer_delta = (peer - x).flatten(1)
    peer_l2, peer_l0 = peer_delta.norm(dim=1), (peer_delta != 0).sum(1).float()
    assert float(ours.norms.median()) <= 1.1 * float(peer_l2.median())
    assert math.isclose(float(ours.extra["l0"].mean()), float(peer_l0.mean()), rel_tol=0.5)


@pytest.mark.slow
def test_far_sparser_than_cw_l2_at_comparable_l2_on_the_reference_model():
    model, x, y = _reference(16)
    attacks = _adv_lib()
    ours = StrAttack(steps=100, binary_search_steps=4, refine_steps=50, refine_search_steps=2)(model, x, y)
    cw = attacks.carlini_wagner_l2(model, x, y, binary_search_steps=4, max_iterations=100, initial_const=1.0,
                                   learning_rate=0.1)  # fmt: skip
    with torch.no_grad():
        cw_ok = model(cw).argmax(1) != y
    assert ours.success.all() and cw_ok.all()
    cw_delta = (cw - x).flatten(1)
    cw_l0, cw_l2 = (cw_delta != 0).sum(1).float(), cw_delta.norm(dim=1)
    assert ours.extra["l0"].mean() < 0.35 * cw_l0.mean()  # seed 002 Table 1: 73 vs 480 on MNIST
    assert ours.norms.mean() < 1.6 * cw_l2.mean()  # comparable L2 (Table 1: 1.51 vs 1.35)


@pytest.mark.slow
def test_matches_adv_lib_str_attack_on_the_reference_model():
    model, x, y = _reference(16)
    attacks = _adv_lib()
    ours = StrAttack(steps=100, binary_search_steps=4, refine=False)(model, x, y)
    peer = attacks.str_attack(model, x, y, binary_search_steps=4, max_iterations=100, initial_const=0.5, retrain=False)
    with torch.no_grad():
        peer_ok = model(peer).argmax(1) != y
    assert ours.success.all() and peer_ok.all()
    peer_delta = (peer - x).flatten(1)
    peer_l2, peer_l0 = peer_delta.norm(dim=1), (peer_delta != 0).sum(1).float()
    assert ours.norms.median() <= 1.1 * peer_l2.median()
    assert math.isclose(float(ours.extra["l0"].mean()), float(peer_l0.mean()), rel_tol=0.5)
