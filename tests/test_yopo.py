"""YOPO-m-n: the gradients it accumulates are exactly the sums the paper defines."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import random_batch
from torch.utils.data import DataLoader, TensorDataset

from advtrain.maximizers import YOPO
from advtrain.models import create_model
from advtrain.threat import geometry_for
from advtrain.training import AdversarialTraining


def _setup():
    torch.manual_seed(0)
    model = create_model("small_cnn", width=4, hidden=16, dropout=0.0, input_size=16).train()
    return model, *random_batch(6, (1, 16, 16), seed=1)


def _reference(model, x, y, m, n, sigma, eps, eta):
    """Independent autograd reference: per round, ∂L/∂θ_g of the full loss, the costate from autograd.grad, n signed
    Hamiltonian steps, and ∂⟨f0(x+η'), p⟩/∂θ_0."""
    first = list(model.first.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    g_first = [torch.zeros_like(p) for p in first]
    g_rest = [torch.zeros_like(p) for p in rest]
    geo = geometry_for("linf")
    e = torch.full((x.shape[0],), eps)
    for _ in range(m):
        h = model.layer_one(x + eta)
        loss = F.cross_entropy(model.rest(h), y)
        grads = torch.autograd.grad(loss, rest + [h])
        for acc, g in zip(g_rest, grads[:-1], strict=True):
            acc += g
        p = grads[-1]
        for _ in range(n):
            eta = eta.detach().requires_grad_(True)
            (g_eta,) = torch.autograd.grad((model.layer_one(x + eta) * p).sum(), eta)
            eta = geo.project_ball_box(x, eta.detach() + sigma * g_eta.sign(), e)
        for acc, g in zip(g_first, torch.autograd.grad((model.layer_one(x + eta) * p).sum(), first), strict=True):
            acc += g
    return g_first, g_rest, rest


@pytest.mark.parametrize("m,n", [(1, 0), (3, 2), (5, 3)])
def test_gradients_are_the_sums_of_hamiltonian_and_full_backward_terms(m, n):
    model, x, y = _setup()
    yopo = YOPO(eps=0.1, m=m, n=n, sigma=0.02)
    torch.manual_seed(42)
    out = yopo.training_step(model, x, y, backward=lambda t: t.backward())
    got_first = [p.grad.clone() for p in model.first.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(42)
    e = torch.full((6,), 0.1)
    eta0 = geometry_for("linf").project_ball_box(x, geometry_for("linf").sample(x, e), e)
    ref_first, ref_rest, rest = _reference(model, x, y, m, n, 0.02, 0.1, eta0)
    for g, r in zip(got_first, ref_first, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    torch.manual_seed(42)
    yopo.training_step(model, x, y, backward=lambda t: t.backward())
    for p, r in zip(rest, ref_rest, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)
    assert out.logits.shape == (6, 10) and torch.isfinite(out.loss)


def test_first_layer_is_not_double_counted():
    """With n = 0 the Hamiltonian gradient at η equals the full backward's layer-one gradient, so YOPO-1-0 gives
    exactly one plain adversarial gradient for layer one (not two)."""
    model, x, y = _setup()
    torch.manual_seed(5)
    YOPO(eps=0.1, m=1, n=0, sigma=0.02).training_step(model, x, y, backward=lambda t: t.backward())
    yopo_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    e = torch.full((6,), 0.1)
    eta = geometry_for("linf").project_ball_box(x, geometry_for("linf").sample(x, e), e)
    F.cross_entropy(model(x + eta), y).backward()
    for g, p in zip(yopo_grad, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_module_trains_with_yopo_in_manual_optimisation(tmp_path):
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 16},
                                 maximizer=YOPO(eps=0.1, m=2, n=2, sigma=0.02))  # fmt: skip
    assert not module.automatic_optimization
    data = TensorDataset(*random_batch(16, (1, 28, 28)), torch.arange(16))
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 2  # one optimizer step per batch, whatever m
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert "train/adv_loss" in trainer.callback_metrics


def test_yopo_cannot_be_used_as_a_plain_perturbation():
    model, x, y = _setup()
    with pytest.raises(RuntimeError, match="manual optimisation"):
        YOPO()(model, x, y)
