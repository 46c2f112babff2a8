"""Objectives, schedules and the training step of the LightningModule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyCNN, random_batch

from advtrain.maximizers import PGD, Perturbation, Standard
from advtrain.training import AdversarialCE, AdversarialTraining, MixedCE
from advtrain.training.schedules import Cosine, MultiStep, OneCycle, total_steps_context


def test_adversarial_ce_uses_perturbed_inputs_and_mixed_ce_weights_both():
    model = TinyCNN().eval()
    x, y = random_batch(8)
    adv = (x + 0.1).clamp(0, 1)
    out = AdversarialCE()(model, x, y, Perturbation(adv=adv))
    torch.testing.assert_close(out.loss, F.cross_entropy(model(adv), y))
    assert out.adversarial
    clean = AdversarialCE()(model, x, y, Perturbation(adv=None))
    torch.testing.assert_close(clean.loss, F.cross_entropy(model(x), y))
    mixed = MixedCE(clean_weight=0.25)(model, x, y, Perturbation(adv=adv))
    expected = 0.25 * F.cross_entropy(model(x), y) + 0.75 * F.cross_entropy(model(adv), y)
    torch.testing.assert_close(mixed.loss, expected)
    with pytest.raises(ValueError, match="clean_weight"):
        MixedCE(clean_weight=1.5)


def test_standard_maximizer_trains_clean():
    assert Standard()(TinyCNN(), *random_batch(8)).adv is None


def test_pgd_maximizer_returns_points_inside_ball_and_box():
    x, y = random_batch(8)
    pert = PGD(eps=0.1, steps=3, step_size=0.05)(TinyCNN(), x, y)
    assert (pert.adv - x).abs().max() <= 0.1 + 1e-6 and pert.adv.min() >= 0 and pert.adv.max() <= 1
    assert not torch.equal(pert.adv, x)


def _lrs(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_multistep_milestones_are_fractions_of_training():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with total_steps_context(100):
        sched = MultiStep(opt, milestones=[0.5, 0.75], gamma=0.1)
    lrs = _lrs(sched, opt, 100)
    assert lrs[49] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.01)
    assert lrs[74] == pytest.approx(0.01) and lrs[75] == pytest.approx(0.001)
    assert sched.interval == "step"


def test_cosine_and_one_cycle_need_and_use_the_step_count():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        Cosine(opt)
    with total_steps_context(10):
        lrs = _lrs(Cosine(opt, warmup=0.2), opt, 10)
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[-1] < 0.05
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(OneCycle(opt, max_lr=0.2, pct_start=0.4, anneal_strategy="linear", total_steps=50), opt, 50)
    assert max(lrs) == pytest.approx(0.2, rel=1e-3) and lrs.index(max(lrs)) == pytest.approx(20, abs=1)


def test_non_finite_loss_stops_with_a_message():
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
    with torch.no_grad():
        for p in module.model.parameters():
            p.fill_(float("nan"))
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        module.training_step((x, y, torch.arange(4)), 0)


def test_module_builds_registered_models_with_dataset_facts():
    module = AdversarialTraining(arch="preact_resnet18", num_classes=100, image_shape=(3, 32, 32),
                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # fmt: skip
    assert module(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    assert module.model.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(TypeError, match="nope"):
        AdversarialTraining(arch="small_cnn", arch_kwargs={"nope": 1})


def test_epoch_timer_logs_training_time_without_validation(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from advtrain.callbacks import EpochTimer

    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
    data = TensorDataset(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.arange(8))
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert len(timer.epoch_seconds) == 2 and all(s > 0 for s in timer.epoch_seconds)
    assert "time/train_epoch_s" in trainer.callback_metrics
    assert timer.state_dict() == {"epoch_seconds": timer.epoch_seconds}


def test_init_weights_from_a_checkpoint_or_a_plain_state_dict(tmp_path):
    from advtrain.training.checkpoint import CheckpointError

    source = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
    ckpt = tmp_path / "src.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": {}}, ckpt)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.model.state_dict().items()}}, plain)
    x = torch.rand(2, 1, 28, 28)
    for path in (ckpt, plain):
        target = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8}, init_weights=str(path))
        torch.testing.assert_close(target.eval()(x), source.eval()(x))
    with pytest.raises(CheckpointError, match="do not fit"):
        AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 8, "hidden": 8}, init_weights=str(ckpt))
