"""AWP, MART, label smoothing and Free AT (issue 16): each algorithm pinned against an independent computation."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import random_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain.errors import InvalidConfigError
from advtrain.maximizers import PGD, TRADES, YOPO, FreeAT, FreeATStep, InnerMaximizer, Perturbation
from advtrain.training import AWP, AdversarialCE, AdversarialTraining, MARTLoss, MixedCE, TRADESLoss


class _Net(nn.Module):
    """Conv + BatchNorm + linear, in float64: weights of several shapes, biases and BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _batch(n: int = 6, classes: int = 4, seed: int = 1):
    return random_batch(n, classes=classes, seed=seed, dtype=torch.float64)


class _Shift(InnerMaximizer):
    """A fixed perturbation (+0.05, clipped to the box): a maximizer that works in float64 and draws no RNG."""

    def __call__(self, model, inputs, labels, index=None):
        return Perturbation(adv=(inputs + 0.05).clamp(0, 1))


def _trainer(**kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      **kwargs)  # fmt: skip


def _digits(n: int = 24) -> TensorDataset:
    return TensorDataset(*random_batch(n, (1, 28, 28)), torch.arange(n))


# ------------------------------------------------------------------------------------------------------------ AWP


def test_awp_offsets_have_the_per_layer_relative_size_and_ascend():
    model = _Net().double().train()
    x, y = _batch()
    awp = AWP(gamma=0.02)
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    loss0 = loss_fn().item()  # (moves the BN statistics once, before the snapshot)
    before = copy.deepcopy(model.state_dict())
    state = awp.perturb(model, loss_fn)
    # Only the multi-dimensional weights move (conv, linear), each by exactly γ·‖w_l‖ along +∇L; biases and BN do not.
    assert [p is q for p, q in zip(state.params, [model.conv.weight, model.fc.weight], strict=True)] == [True, True]
    for name, value in model.state_dict().items():
        if name in ("conv.weight", "fc.weight"):
            offset = value - before[name]
            torch.testing.assert_close(offset.norm(), 0.02 * before[name].norm(), rtol=1e-12, atol=0)
        else:
            assert torch.equal(value, before[name]), f"{name} moved"  # BN running stats restored after the ascent
    # The direction is the gradient's: a first-order increase of the loss.
    assert loss_fn().item() > loss0
    AWP.restore(state)
    for name, value in model.named_parameters():
        assert torch.equal(value, before[name])  # no step taken: the weights are back bit for bit


def test_awp_step_is_the_update_at_the_perturbed_point_applied_to_the_unperturbed_weights():
    """Weights after one AdversarialTraining step with AWP = weights before + the SGD (momentum, weight decay) update
    computed independently on a copy at w + v, with v computed by hand: float64, tolerance 1e-12."""
    torch.manual_seed(0)
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 2, "hidden": 4, "dropout": 0.0},
                                 maximizer=_Shift(), weight_perturbation=AWP(gamma=0.05),
                                 optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.01),
                                 track_clean_train=False).double()  # fmt: skip
    x, y = random_batch(8, (1, 28, 28), dtype=torch.float64)
    start = copy.deepcopy(module.model)

    # Independent computation: the loss at w on the perturbed inputs, the per-layer offsets by hand, then one SGD
    # step at w + v on a copy, and its update.
    ref = copy.deepcopy(start).train()
    adv = (x + 0.05).clamp(0, 1)
    weights = [p for p in ref.parameters() if p.dim() > 1]
    grads = torch.autograd.grad(F.cross_entropy(ref(adv), y), weights)
    with torch.no_grad():
        offsets = [0.05 * w.norm() * gw / gw.norm() for w, gw in zip(weights, grads, strict=True)]
        originals = [w.clone() for w in weights]
        for w, v in zip(weights, offsets, strict=True):
            w.add_(v)
    perturbed = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    opt.zero_grad()
    F.cross_entropy(ref(adv), y).backward()
    opt.step()
    update = {n: p.detach() - perturbed[n] for n, p in ref.named_parameters()}
    assert any(u.abs().max() > 1e-3 for u in update.values())
    del originals

    _trainer(max_steps=1, precision="64-true").fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    for (name, w0), (_, w1) in zip(start.named_parameters(), module.model.named_parameters(), strict=True):
        torch.testing.assert_close(w1, w0 + update[name], rtol=0, atol=1e-12, msg=name)


def test_awp_warmup_epochs_and_refusals():
    awp = AWP(gamma=0.01, warmup_epochs=2)
    assert [awp.active(e) for e in range(4)] == [False, False, True, True]
    assert not AWP(gamma=0.0).active(5)
    for bad in (dict(gamma=-1.0), dict(warmup_epochs=-1), dict(warmup_epochs=1.5)):
        with pytest.raises(ValueError):
            AWP(**bad)
    with pytest.raises(InvalidConfigError, match="weight_perturbation"):
        AdversarialTraining(maximizer=YOPO(eps=0.3), weight_perturbation=AWP())
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 2, "hidden": 4},
                                 maximizer=PGD(eps=0.1, steps=1), weight_perturbation=AWP())  # fmt: skip
    with pytest.raises(InvalidConfigError, match="accumulate_grad_batches"):
        _trainer(max_steps=1, accumulate_grad_batches=2).fit(module, DataLoader(_digits(8), batch_size=4))


def test_awp_with_trades_trains_and_before_warmup_changes_nothing():
    """A warm-up epoch with AWP gives the same weights as the same run without AWP (no RNG drawn, no buffer moved)."""
    runs = []
    for awp in (None, AWP(gamma=0.005, warmup_epochs=1)):
        torch.manual_seed(0)
        module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 2, "hidden": 4},
                                     maximizer=TRADES(eps=0.3, steps=1, step_size=0.1), objective=TRADESLoss(),
                                     weight_perturbation=awp)  # fmt: skip
        _trainer().fit(module, DataLoader(_digits(16), batch_size=8))
        runs.append(module.model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


# ----------------------------------------------------------------------------------------------------------- MART


def _hand_mart(clean_logits, adv_logits, y, beta):
    """MART's loss written per sample in float64 (Wang et al. 2020, Eq. 9, with the official code's guards)."""
    total_bce, total_kl = 0.0, 0.0
    n, k = clean_logits.shape
    for i in range(n):
        p_adv = torch.softmax(adv_logits[i], 0)
        p_nat = torch.softmax(clean_logits[i], 0)
        others = [j for j in range(k) if j != int(y[i])]
        wrong = max(others, key=lambda j: float(p_adv[j]))
        total_bce += -torch.log(p_adv[y[i]]) - torch.log(1.0001 - p_adv[wrong] + 1e-12)
        kl = sum(p_nat[j] * (torch.log(p_nat[j]) - torch.log(p_adv[j] + 1e-12)) for j in range(k))
        total_kl += kl * (1.0000001 - p_nat[y[i]])
    return total_bce / n + beta * total_kl / n


def test_mart_loss_equals_a_hand_computation():
    model = _Net().double().train()
    x, y = _batch(n=7)
    adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    out = MARTLoss(beta=6.0)(model, x, y, Perturbation(adv=adv))
    with torch.no_grad():
        expected = _hand_mart(model(x), model(adv), y, 6.0)
    torch.testing.assert_close(out.loss.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert out.adversarial
    # The loss is float32 inside (guards below bf16 resolution): 1e-6 relative is float32's precision on a sum.
    # The gradient flows through both forwards (clean and adversarial), as in the official code.
    out.loss.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="beta"):
        MARTLoss(beta=-1)


def test_mart_margin_term_uses_the_runner_up_when_the_label_is_on_top():
    clean = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[3.0, 2.0, 0.0]], dtype=torch.float64)  # class 0 on top
    fixed = type("M", (), {})
    for label, wrong in ((0, 1), (2, 0)):
        y = torch.tensor([label])
        loss = MARTLoss(beta=0.0)(lambda z, a=adv: a if z is fixed else clean, clean, y, Perturbation(adv=fixed)).loss
        p = torch.softmax(adv[0], 0)
        expected = -torch.log(p[label]) - torch.log(1.0001 - p[wrong] + 1e-12)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------ label smoothing


def test_label_smoothing_in_the_ce_objectives_equals_the_smoothed_target():
    model = _Net().double().train()
    x, y = _batch()
    adv = (x + 0.05).clamp(0, 1)
    s = 0.2

    def smoothed_ce(logits):
        target = (1 - s) * F.one_hot(y, 4).double() + s / 4
        return -(target * torch.log_softmax(logits, 1)).sum(1).mean()

    with torch.no_grad():
        z, z_adv = model(x), model(adv)
        ce = AdversarialCE(label_smoothing=s)(model, x, y, Perturbation(adv=adv)).loss
        torch.testing.assert_close(ce, smoothed_ce(z_adv), rtol=1e-12, atol=0)
        mixed = MixedCE(clean_weight=0.3, label_smoothing=s)(model, x, y, Perturbation(adv=adv)).loss
        torch.testing.assert_close(mixed, 0.3 * smoothed_ce(z) + 0.7 * smoothed_ce(z_adv), rtol=1e-12, atol=0)
        trades = TRADESLoss(beta=0.0, label_smoothing=s)(model, x, y, Perturbation(adv=adv)).loss
        torch.testing.assert_close(trades, smoothed_ce(z), rtol=1e-12, atol=0)
        assert AdversarialCE()(model, x, y, Perturbation(adv=adv)).loss != ce  # 0 is the plain CE
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            AdversarialCE(label_smoothing=bad)


# -------------------------------------------------------------------------------------------------------- Free AT


def _reference_free(model, batches, *, m, eps, lr):
    """Free AT written from the paper (Alg. 1) with a plain SGD loop: δ = 0 once, m replays per minibatch, one
    optimizer step and one δ step per replay, δ carried to the next minibatch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    delta = torch.zeros_like(batches[0][0])
    steps = 0
    for x, y in batches:
        d = delta[: x.shape[0]]
        for _ in range(m):
            d = d.detach().requires_grad_(True)
            loss = F.cross_entropy(model((x + d).clamp(0, 1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            d = (d + eps * d.grad.sign()).clamp(-eps, eps)
        delta = torch.cat([d.detach(), delta[x.shape[0] :]])
    return delta, steps


def test_free_at_replays_m_times_with_the_carried_perturbation_and_m_optimizer_steps():
    """Through Lightning (manual optimisation): 3 minibatches (the last one smaller), m = 4: 12 optimizer steps, and
    weights and carried δ equal the paper's loop, float64. Tolerance 1e-10: the two paths sum in different orders
    (≈ 1e-12 after 12 steps here); skipping the carry or a replay changes the weights by ≈ 1e-3."""
    x, y = random_batch(10, (1, 28, 28), dtype=torch.float64)
    torch.manual_seed(0)
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 2, "hidden": 4, "dropout": 0.0},
                                 maximizer=FreeAT(eps=0.1, m=4), optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
                                 track_clean_train=False).double()  # fmt: skip
    ref = copy.deepcopy(module.model).train()
    trainer = _trainer(precision="64-true")
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert trainer.global_step == 12  # m optimizer steps per minibatch
    delta, steps = _reference_free(ref, [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])], m=4, eps=0.1, lr=0.05)
    assert steps == 12
    for (name, a), (_, b) in zip(module.model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    # δ is a sum of ±ε steps with ε held as float32 (the maximizers' budget tensors): 0.1 to within 1.5e-9.
    torch.testing.assert_close(module.maximizer.delta, delta, rtol=0, atol=1e-8)
    assert delta.abs().max() == pytest.approx(0.1) and delta[2:].abs().max() > 0  # carried: rows 2-3 from batch 2


def test_free_at_state_is_saved_and_its_settings_are_checked():
    free = FreeAT(eps=0.1, m=2)
    free.delta = torch.ones(3, 1, 2, 2)
    loaded = FreeAT(eps=0.1, m=2)
    loaded.load_state_dict(free.state_dict())
    assert torch.equal(loaded.delta, free.delta)
    assert free.steps_per_batch == 2 and free.step_strategy is FreeATStep and free.produces is None
    assert not FreeATStep.automatic_optimization and not FreeATStep.partial_backward  # full backward passes only
    for bad in (dict(m=0), dict(m=1.5), dict(step_size=0.0), dict(eps=-1.0)):
        with pytest.raises(ValueError):
            FreeAT(**bad)
    with pytest.raises(RuntimeError, match="AdversarialTraining"):
        free(nn.Identity(), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))
