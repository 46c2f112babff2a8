"""Single-step training that does not collapse: N-FGSM (the maximizer) and GradAlign (the objective's regulariser)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LinearNet, TinyCNN, random_batch
from torch import nn

from advtrain.maximizers import NFGSM, PGD, Perturbation
from advtrain.training import AdversarialCE, GradAlignLoss, TRADESLoss
from advtrain.training.grad_align import gradient_alignment


def _linear_ce_input_grad(model: LinearNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇ₓ CE(Wx + b, y) = Wᵀ(softmax(Wx + b) − e_y), per sample, in closed form (no autograd)."""
    w, b = model.fc.weight.detach().to(x.dtype), model.fc.bias.detach().to(x.dtype)
    p = F.softmax(x.flatten(1) @ w.T + b, dim=1)
    return ((p - F.one_hot(y, w.shape[0]).to(x.dtype)) @ w).view_as(x)


# ----------------------------------------------------------------------------------------------------------- N-FGSM


def test_nfgsm_matches_the_algorithm():
    """η ~ U(−2ε, 2ε) clipped to the box, δ = η + ε·sign ∇CE(x + η), x + δ clipped to the box and nothing else."""
    model = LinearNet(64, 10, seed=1)
    x, y = random_batch(16)  # across the whole box: the box clips some coordinates
    eps = 0.05
    torch.manual_seed(3)
    pert = NFGSM(eps=eps)(model, x, y)
    torch.manual_seed(3)
    eta = (2 * torch.rand(x.shape) - 1) * 2 * eps
    eta = (x + eta).clamp(0, 1) - x
    expected = (x + eta + eps * _linear_ce_input_grad(model, x + eta, y).sign()).clamp(0, 1)
    torch.testing.assert_close(pert.adv, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pert.eps, torch.full((16,), eps))


def test_nfgsm_perturbation_is_not_clipped_to_eps():
    """Away from the box, |δ| reaches (k + 1)ε = 3ε and half of the coordinates lie outside the ε-ball
    (P(|η + ε·s| > ε) = 1/2 for η ~ U(−2ε, 2ε), s = ±1); with ``clip=1`` (Fast AT's projection) none do."""
    model = LinearNet(64, 10, seed=2)
    x = torch.full((64, 1, 8, 8), 0.5)
    y = torch.arange(64) % 10
    eps = 0.05
    torch.manual_seed(0)
    delta = NFGSM(eps=eps)(model, x, y).adv - x
    outside = delta.abs() > eps * (1 + 1e-4)
    assert delta.abs().max() > 2.5 * eps
    assert delta.abs().max() <= 3 * eps * (1 + 1e-5)
    assert 0.45 < outside.float().mean() < 0.55  # 4,096 coordinates: the binomial std is 0.008
    torch.manual_seed(0)
    clipped = NFGSM(eps=eps, clip=1.0)(model, x, y).adv - x
    assert clipped.abs().max() <= eps * (1 + 1e-5)


def test_nfgsm_stays_in_the_box_and_restores_the_model():
    model = TinyCNN().eval()
    frozen = model.conv.weight.requires_grad_(False)
    x = torch.cat([torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8)])
    y = torch.arange(8)
    adv = NFGSM(eps=0.3)(model, x, y).adv
    assert adv.min() >= 0 and adv.max() <= 1
    assert not model.training and not model.bn.training  # train-mode step, modes restored
    assert not frozen.requires_grad and model.fc.weight.requires_grad


def test_nfgsm_budget_scaling_scales_noise_and_step():
    model = LinearNet(64, 10, seed=2)
    x = torch.full((32, 1, 8, 8), 0.5)
    y = torch.arange(32) % 10
    maximizer = NFGSM(eps=0.06)
    torch.manual_seed(0)
    with maximizer.budget_scaled(0.5):
        half = maximizer(model, x, y)
    torch.manual_seed(0)
    reference = NFGSM(eps=0.03)(model, x, y)
    torch.testing.assert_close(half.adv, reference.adv)
    assert maximizer.eps == 0.06


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"norm": "l2"}, "norm"),
        ({"noise": -1.0}, "noise"),
        ({"step_size": 0.0}, "step_size"),
        ({"clip": 0.0}, "clip"),
    ],  # fmt: skip
)
def test_nfgsm_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        NFGSM(**kwargs)


# -------------------------------------------------------------------------------------------------------- GradAlign


def test_grad_align_term_equals_a_hand_computation():
    """λ(1 − mean cos(∇ₓCE(x), ∇ₓCE(x + η))) with the gradients in closed form for a linear model, float64."""
    model = LinearNet(64, 10, seed=4).double()
    x, y = random_batch(12, seed=1, dtype=torch.float64)
    eps = torch.full((12,), 0.1, dtype=torch.float64)
    objective = GradAlignLoss(weight=0.7)
    torch.manual_seed(5)
    out = objective(model, x, y, Perturbation(adv=x, eps=eps))
    torch.manual_seed(5)
    eta = (2 * torch.rand(x.shape, dtype=torch.float64) - 1) * 0.1
    g1 = _linear_ce_input_grad(model, x, y).flatten(1)
    g2 = _linear_ce_input_grad(model, (x + eta).clamp(0, 1), y).flatten(1)
    cos = (g1 * g2).sum(1) / (g1.norm(dim=1) * g2.norm(dim=1))
    expected_reg = 0.7 * (1 - cos.mean())
    ce = F.cross_entropy(model(x), y)
    assert 1e-3 < expected_reg < 0.7  # a real term, neither 0 nor saturated
    torch.testing.assert_close(out.loss, ce + expected_reg, atol=1e-12, rtol=0)


def test_grad_align_backpropagates_through_the_gradient():
    """The weights' gradient of the regulariser (double backprop through ∇ₓℓ(x + η); the clean gradient is a constant,
    as in the official code) equals central finite differences of λ(1 − mean cos(g₁, ∇ₓℓ(x + η; W))) with g₁ frozen
    at the current weights, float64, on a smooth network (a ReLU network's second derivatives vanish a.e.)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = random_batch(6, (1, 4, 4), classes=4, seed=2, dtype=torch.float64)
    eps = torch.full((6,), 0.2, dtype=torch.float64)
    torch.manual_seed(9)
    eta = (2 * torch.rand(x.shape, dtype=torch.float64) - 1) * 0.2
    weight = model[1].weight

    def input_grad(point: torch.Tensor) -> torch.Tensor:
        point = point.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(point), y, reduction="sum"), point)
        return grad.flatten(1)

    g1 = input_grad(x)

    def frozen_reg() -> float:
        g2 = input_grad((x + eta).clamp(0, 1))
        return (1 - F.cosine_similarity(g1, g2, dim=1).mean()).item()

    torch.manual_seed(9)  # the same η as above
    (autograd,) = torch.autograd.grad(GradAlignLoss(weight=1.0).regularizer(model, x, y, eps), weight)
    h = 1e-6
    for i, j in [(0, 0), (3, 5), (7, 15)]:
        with torch.no_grad():
            weight[i, j] += h
        up = frozen_reg()
        with torch.no_grad():
            weight[i, j] -= 2 * h
        down = frozen_reg()
        with torch.no_grad():
            weight[i, j] += h
        assert abs(autograd[i, j].item() - (up - down) / (2 * h)) < 1e-8 + 1e-5 * abs(autograd[i, j].item())
    assert autograd.abs().max() > 1e-4  # the check is not vacuous


def test_gradient_alignment_drops_zero_gradients():
    g1 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    g2 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [-3.0, -4.0]], dtype=torch.float64)
    cos, valid = gradient_alignment(g1, g2)
    assert valid.tolist() == [True, False, True]
    torch.testing.assert_close(cos, torch.tensor([2**-0.5, 0.0, -1.0], dtype=torch.float64))


def test_grad_align_eps_sources_and_base():
    model = LinearNet(64, 10, seed=4)
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(ValueError, match="eps"):
        GradAlignLoss()(model, x, y, Perturbation(adv=x))
    assert GradAlignLoss(eps=0.1)(model, x, y, Perturbation(adv=x)).loss.isfinite()
    # λ = 0 leaves the base objective unchanged; the base may be any objective (here TRADES).
    base = TRADESLoss(beta=6.0)
    pert = Perturbation(adv=(x + 0.05).clamp(0, 1), eps=torch.full((4,), 0.1))
    torch.testing.assert_close(
        GradAlignLoss(weight=0.0, base=base)(model, x, y, pert).loss, base(model, x, y, pert).loss
    )
    with pytest.raises(ValueError, match="weight"):
        GradAlignLoss(weight=-1.0)


def test_fgsm_plus_grad_align_trains_one_step():
    """The paper's pairing (FGSM from the clean point, α = ε, train mode) through AdversarialTraining: the loss includes
    the regulariser and the weights receive its gradient."""
    from advtrain.training import AdversarialTraining

    module = AdversarialTraining(
        arch="small_cnn", maximizer=PGD(eps=0.3, steps=1, step_size=0.3, random_start=False, attack_mode="train"),
        objective=GradAlignLoss(weight=1.0), track_clean_train=False, validate_batches=False,
    )  # fmt: skip
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    pert = module.maximizer(module.model, x, y)
    torch.manual_seed(0)
    loss = module.objective(module.model, x, y, pert).loss
    ce = AdversarialCE()(module.model, x, y, pert).loss
    assert loss > ce
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
