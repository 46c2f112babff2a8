"""EMA of the weights (advtrain.callbacks.EMA on Lightning's WeightAveraging): the closed-form average, BatchNorm
statistics, validation and checkpoints on the averaged weights, exact resume, evaluate's choice of weights."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from helpers import random_batch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from advtrain.callbacks import EMA


class _Holder(nn.Module):
    """A stand-in LightningModule state: the classifier under ``model.`` (linear + BN) and other state beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
        self.register_buffer("other", torch.zeros(4, dtype=torch.float64))


def test_decay_ramp_and_warmup():
    ema = EMA(decay=0.999, warmup_steps=3)
    assert [ema.decay_at(t) for t in range(3)] == [0.0, 0.0, 0.0]
    assert [ema.decay_at(t) for t in (3, 4, 5)] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert ema.decay_at(10**6) == 0.999
    assert EMA(decay=0.9, ramp=False).decay_at(0) == 0.9
    for bad in (dict(decay=1.0), dict(decay=0.0), dict(warmup_steps=-1), dict(buffers="mean")):
        with pytest.raises(ValueError):
            EMA(**bad)


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_ema_equals_the_closed_form_average(buffers):
    """After T updates with decays d_t: avg = Π d_t · θ_init + Σ_t (1 − d_t) Π_{j>t} d_j · θ_t, in float64 (tolerance
    1e-12); BN running statistics the same (``average``) or the live ones (``copy``); counters and state beside the
    classifier copied."""
    torch.manual_seed(0)
    holder = _Holder()
    ema = EMA(decay=0.3, warmup_steps=2, buffers=buffers)
    ema._average_model = AveragedModel(holder, use_buffers=True)
    init = {k: v.clone() for k, v in holder.state_dict().items()}
    seen = []
    for t in range(7):
        with torch.no_grad():
            for tensor in holder.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn_like(tensor))
            holder.model[1].num_batches_tracked += 1
        seen.append({k: v.clone() for k, v in holder.state_dict().items()})
        ema.update(holder, t)
    decays = [ema.decay_at(t) for t in range(7)]
    assert decays == pytest.approx([0.0, 0.0, 0.1, 2 / 11, 0.25, 0.3, 0.3], rel=1e-15)  # ramp, then τ
    averaged = ema._average_model.module.state_dict()
    for key, value in averaged.items():
        is_stat = key.startswith("model.1.running")
        if key.startswith("model.") and value.is_floating_point() and not (is_stat and buffers == "copy"):
            expected = init[key] * torch.tensor(decays, dtype=torch.float64).prod()
            for t, weights in enumerate(seen):
                expected = (
                    expected
                    + (1 - decays[t]) * torch.tensor(decays[t + 1 :], dtype=torch.float64).prod() * weights[key]
                )
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-12, msg=key)
            assert not torch.equal(value, seen[-1][key])
        else:
            assert torch.equal(value, seen[-1][key]), key  # copied: counters, "copy" statistics, state beside the model
    assert int(ema._average_model.n_averaged) == 7


# ------------------------------------------------------------------------------------------- through Lightning


class _Crash(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def _fit(folder, *, crash_at=None, ckpt_path=None, epochs=3):
    """PGD with random starts on a SmallCNN with dropout (RNG every step), EMA from step 2, a checkpoint every step."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from advtrain.cli import AdvTrainer
    from advtrain.maximizers import PGD
    from advtrain.training import AdversarialTraining

    pl.seed_everything(0, verbose=False)
    data = TensorDataset(*random_batch(40, (1, 28, 28), seed=1), torch.arange(40))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(data.tensors[0][:16], data.tensors[1][:16]), batch_size=8)
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8},
                                 maximizer=PGD(eps=0.1, steps=2, step_size=0.05))  # fmt: skip
    ema = EMA(decay=0.9, warmup_steps=2)
    callbacks = [ema, ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1, save_top_k=0)]
    callbacks += [_Crash(crash_at)] if crash_at is not None else []
    trainer = AdvTrainer(max_epochs=epochs, deterministic=True, logger=False, callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                         num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, loader, val, ckpt_path=ckpt_path)
    return trainer, module, ema


def test_validation_and_checkpoints_use_the_averaged_weights(tmp_path):
    trainer, module, ema = _fit(tmp_path, epochs=1)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    averaged = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    live = {k[len("model.") :]: v for k, v in ckpt["current_model_state"].items() if k.startswith("model.")}
    assert any(not torch.equal(averaged[k], live[k]) for k in averaged)
    # After fit the module holds the averaged weights (Lightning's behaviour), = the checkpoint's state_dict.
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, averaged[key]), key
    # val/clean_acc was measured on the averaged weights.
    x, y = trainer.val_dataloaders.dataset.tensors
    with torch.no_grad():
        acc = (module.model.eval()(x).argmax(1) == y).float().mean()
    assert float(trainer.callback_metrics["val/clean_acc"]) == pytest.approx(float(acc))


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """3 epochs of 5 batches; a crash at step 7 (mid epoch 2), resumed from the step-7 checkpoint: the averaged and
    the live weights, the optimizer and the callback's state equal the uninterrupted run's, bit for bit."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _fit(straight)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(broken, crash_at=7)
    assert torch.load(broken / "last.ckpt", weights_only=True)["global_step"] == 7
    _fit(broken, ckpt_path=str(broken / "last.ckpt"))
    a = torch.load(straight / "last.ckpt", weights_only=True)
    b = torch.load(broken / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 15
    for part in ("state_dict", "current_model_state", "averaging_state"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resuming"
    callback_state = next(v for k, v in a["callbacks"].items() if k.startswith("EMA"))
    assert callback_state == next(v for k, v in b["callbacks"].items() if k.startswith("EMA"))


def test_evaluate_uses_the_averaged_weights_and_says_so(tmp_path, caplog):
    from advtrain.evaluation.entry import _evaluation_model
    from advtrain.training import AdversarialTraining

    _fit(tmp_path, epochs=1)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    for averaged, key in ((True, "state_dict"), (False, "current_model_state")):
        target = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8})
        with caplog.at_level(logging.INFO, logger="advtrain"):
            _evaluation_model(target, None, str(tmp_path / "last.ckpt"), None, None, False, averaged)
        assert "weight-averaged (EMA)" in caplog.text
        assert ("evaluating the averaged weights" in caplog.text) is averaged
        for name, value in target.model.state_dict().items():
            assert torch.equal(value, ckpt[key][f"model.{name}"]), name
        caplog.clear()
