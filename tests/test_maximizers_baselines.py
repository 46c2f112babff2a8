"""Fast AT (FGSM-RS), TRADES and bilateral adversarial training: the maximizers and their objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import LinearNet, TinyCNN, random_batch

from advtrain.maximizers import (
    PGD,
    TRADES,
    Bilateral,
    FastFGSM,
    Perturbation,
    SoftLabelPerturbation,
    adversarial_labels,
    smoothed_labels,
)
from advtrain.training import SoftLabelCE, TRADESLoss


def test_adversarial_label_mass_ratio_and_direction():
    gen = torch.Generator().manual_seed(1)
    probs = F.softmax(torch.randn(16, 10, generator=gen) * 3, dim=1)
    labels = torch.randint(0, 10, (16,), generator=gen)
    soft = adversarial_labels(probs, labels, beta=9.0)
    torch.testing.assert_close(soft.sum(1), torch.ones(16))
    true_mass = soft.gather(1, labels[:, None]).squeeze(1)
    off = soft.scatter(1, labels[:, None], 0.0)
    torch.testing.assert_close(true_mass, 9.0 * off.amax(1))
    assert (off.scatter(1, labels[:, None], 1.0) > 0).all()  # every off class keeps some mass (γ > 0)
    # Mass goes to the least likely classes: off-class mass decreases with the clean probability.
    for i in range(16):
        mask = torch.arange(10) != labels[i]
        order = probs[i, mask].argsort()
        assert (off[i, mask][order].diff() <= 1e-7).all()


def test_smoothed_labels():
    soft = smoothed_labels(torch.tensor([2, 0]), 5, smoothing=0.4)
    torch.testing.assert_close(soft[0], torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1]))
    torch.testing.assert_close(soft.sum(1), torch.ones(2))


def test_bilateral_image_step_targets_the_most_confusing_class():
    model = LinearNet(64, 10, seed=2)
    x = torch.full((6, 1, 8, 8), 0.5)
    y = torch.arange(6)
    torch.manual_seed(0)
    pert = Bilateral(eps=0.05)(model, x, y)
    # Reference: same random start, one targeted signed step of α = ε toward t = argmax_{k≠y} logits.
    torch.manual_seed(0)
    start = ((2 * torch.rand(x.shape) - 1) * 0.05).clamp(-0.05, 0.05)
    logits = model(x)
    target = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    w = model.fc.weight.detach()
    x0 = x + start
    p = F.softmax(model(x0), dim=1)
    grad_logits = p - F.one_hot(target, 10)  # ∂CE(f(x0), t)/∂z
    grad = (grad_logits @ w).view_as(x)
    expected = (x0 - 0.05 * grad.sign()).clamp(x - 0.05, x + 0.05).clamp(0, 1)
    torch.testing.assert_close(pert.adv, expected, atol=1e-6, rtol=0)
    assert isinstance(pert, SoftLabelPerturbation) and pert.soft_labels.shape == (6, 10)


def test_soft_label_ce():
    model = TinyCNN().eval()
    x, y = random_batch(8)
    soft = smoothed_labels(y, 10, smoothing=0.3)
    out = SoftLabelCE()(model, x, y, SoftLabelPerturbation(adv=x, soft_labels=soft))
    expected = -(soft * F.log_softmax(model(x), dim=1)).sum(1).mean()
    torch.testing.assert_close(out.loss, expected)
    hard = SoftLabelCE()(model, x, y, Perturbation(adv=x))
    torch.testing.assert_close(hard.loss, F.cross_entropy(model(x), y))


def test_trades_kl_term_matches_hand_computation():
    model = TinyCNN().eval()
    x, y = random_batch(8)
    adv = (x + 0.03).clamp(0, 1)
    out = TRADESLoss(beta=6.0)(model, x, y, Perturbation(adv=adv))
    p = F.softmax(model(x), dim=1)
    q = F.softmax(model(adv), dim=1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y) + 6.0 * kl, rtol=1e-5, atol=1e-6)
    # The reference form: KLDivLoss(sum)(log q, p) / B.
    ref = F.kl_div(F.log_softmax(model(adv), dim=1), p, reduction="sum") / x.shape[0]
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)


def test_trades_maximizer_raises_the_kl_inside_ball_and_box():
    model = TinyCNN().eval()
    x, y = random_batch(8)
    pert = TRADES(eps=0.1, steps=5, step_size=0.03)(model, x, y)
    assert (pert.adv - x).abs().max() <= 0.1 + 1e-6 and pert.adv.min() >= 0 and pert.adv.max() <= 1
    p = F.softmax(model(x), dim=1)

    def kl(z):
        return (p * (p.log() - F.log_softmax(model(z), dim=1))).sum(1)

    assert (kl(pert.adv) > kl((x + 1e-3 * torch.randn_like(x)).clamp(0, 1))).all()


def test_fast_fgsm_is_one_random_start_step_of_1_25_eps():
    x, y = random_batch(8)
    fast = FastFGSM(eps=0.1, attack_mode="eval")
    assert fast.steps == 1 and fast.step_size == 0.125 and fast.random_start
    model = TinyCNN().eval()
    torch.manual_seed(3)
    a = fast(model, x, y).adv
    torch.manual_seed(3)
    b = PGD(eps=0.1, steps=1, step_size=0.125)(model, x, y).adv
    torch.testing.assert_close(a, b)
    assert FastFGSM().attack_mode == "train"  # the reference code's default


def test_trades_maximizer_equals_the_reference_loop():
    """TRADES's inner maximizer runs on the engine's ascent loop; it must be the reference code's loop, written out
    here: x' = x + 0.001·N(0, I), then ``steps`` sign steps on KL(f(x) ‖ f(x')), each clamped to the ε-ball and the
    box, in eval mode, last iterate. Same draws (the global RNG), the same operations: equal to float rounding (the
    engine clamps ball then box as the loop below does)."""
    torch.manual_seed(0)
    model = TinyCNN().train()
    x, _ = random_batch(12, seed=3)
    y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(4))
    eps, alpha = 0.1, 0.03
    torch.manual_seed(7)
    ours = TRADES(eps=eps, steps=5, step_size=alpha)(model, x, y).adv
    assert model.training  # the attack's eval mode was undone
    model.eval()
    torch.manual_seed(7)
    p = F.softmax(model(x), dim=1).detach()
    adv = x + 0.001 * torch.randn_like(x)
    adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
    for _ in range(5):
        adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(adv), dim=1), p, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(ours, adv, rtol=0, atol=1e-6)
