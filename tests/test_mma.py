"""MMA: per-example margins by dataset index, AN-PGD refreshes, the loss mix, checkpointed state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LinearNet, TinyCNN, random_batch

from advtrain.maximizers import MMA, MarginPerturbation, Perturbation
from advtrain.training import AdversarialTraining, MMALoss
from advtrain.training.schedules import MultiStep, total_steps_context


def _linear_case():
    """A linear model and inputs pushed toward class i % 10, so the correct ones win by a few logits (SLM < 0)."""
    model = LinearNet(64, 10, seed=4)
    w = model.fc.weight.detach()
    classes = torch.arange(12) % 10
    x = (0.5 + 0.08 * (w[classes] - w.mean(0))).view(12, 1, 8, 8).clamp(0, 1)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # three misclassified examples
    return model, x, y


def _exact_linf_margin(model, x, y):
    w = model.fc.weight.detach()
    z = model(x).detach()
    gaps = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).abs().sum(-1).squeeze(0)
    gaps = gaps.scatter(1, y[:, None], float("inf"))
    return gaps.amin(1)


def test_margins_move_to_the_true_margin_and_misclassified_store_zero():
    model, x, y = _linear_case()
    mma = MMA(norm="linf", max_eps=0.5, min_eps=0.005, steps=10, bisection_steps=20)
    index = torch.arange(100, 112)
    pert = mma(model, x, y, index)
    assert mma.margins.numel() == 112 and torch.all(mma.margins[:100] == 0)
    stored = mma.margins[index]
    correct = pert.correct  # SLM < 0: the true logit beats the log-sum-exp of the others
    assert not correct[:3].any() and correct.sum() >= 6
    assert torch.all(stored[~correct] == 0)
    exact = _exact_linf_margin(model, x[correct], y[correct])
    # AN-PGD's margin is an upper bound of the exact L∞ margin: the point it returns fools the model. On a
    # multi-class model the SLM gradient mixes the other classes, so the direction (and the bound) is not tight.
    ratio = stored[correct] / exact
    assert torch.all(ratio >= 1 - 1e-3) and torch.all(ratio <= 1.3) and ratio.median() <= 1.1
    # Those within d_max train on x + δ*; δ* has the stored size.
    used = pert.use_adv
    assert torch.equal(used, correct)
    sizes = (pert.adv - x).flatten(1).abs().amax(1)
    torch.testing.assert_close(sizes[correct], stored[correct], atol=1e-5, rtol=1e-4)


def test_binary_margins_are_exact():
    """With two classes the SLM gradient sign is the optimal L∞ direction, so AN-PGD's margin is the exact one."""
    model = LinearNet(64, 2, seed=7)
    w = model.fc.weight.detach()
    x = (0.5 + 0.05 * (w[torch.arange(8) % 2] - w.mean(0))).view(8, 1, 8, 8)
    y = model(x).argmax(1)
    mma = MMA(norm="linf", max_eps=0.5, min_eps=0.005, steps=10, bisection_steps=25)
    pert = mma(model, x, y, torch.arange(8))
    c = pert.correct
    assert c.sum() >= 4
    torch.testing.assert_close(mma.margins[:8][c], _exact_linf_margin(model, x[c], y[c]), rtol=1e-2, atol=1e-5)


def test_hinge_excludes_examples_beyond_dmax():
    model, x, y = _linear_case()
    mma = MMA(norm="linf", max_eps=1e-3, min_eps=1e-3, steps=3)
    pert = mma(model, x, y, torch.arange(12))
    assert not pert.use_adv.any()
    assert torch.equal(pert.adv, x)


def test_mma_loss_matches_hand_computation():
    model = TinyCNN().eval()
    x, y = random_batch(6)
    adv = (x + 0.05).clamp(0, 1)
    correct = torch.tensor([True, True, True, False, False, True])
    use_adv = torch.tensor([True, False, True, False, False, True])
    out = MMALoss()(model, x, y, MarginPerturbation(adv=adv, correct=correct, use_adv=use_adv))
    clean = F.cross_entropy(model(x), y, reduction="none")
    advl = F.cross_entropy(model(adv), y, reduction="none")
    expected = (
        sum((clean[i] if not correct[i] else clean[i] / 3 + (2 / 3 * advl[i] if use_adv[i] else 0.0)) for i in range(6))
        / 6
    )
    torch.testing.assert_close(out.loss, expected)
    # Without MMA's masks the loss refuses to run: it never falls back to clean training in silence.
    for plain in (Perturbation(adv=adv), Perturbation(adv=None)):
        with pytest.raises(TypeError, match="MarginPerturbation"):
            MMALoss()(model, x, y, plain)


def test_margins_are_saved_and_restored_with_the_module():
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8}, maximizer=MMA(),
                                 objective=MMALoss())  # fmt: skip
    module.maximizer.margin_of(torch.tensor([9]))
    module.maximizer.margins[:] = torch.linspace(0, 1, 10)
    state = module.state_dict()
    assert "maximizer.margins" in state
    fresh = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8}, maximizer=MMA(),
                                objective=MMALoss())  # fmt: skip
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.maximizer.margins, torch.linspace(0, 1, 10))


def test_multistep_accepts_one_factor_per_milestone():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    with total_steps_context(10):
        sched = MultiStep(opt, milestones=[0.4, 0.6, 0.8], gamma=[0.3, 1 / 3, 0.3])
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [round(v, 4) for v in (lrs[0], lrs[4], lrs[6], lrs[8])] == [0.3, 0.09, 0.03, 0.009]
