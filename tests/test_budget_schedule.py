"""The budget schedule (``model.budget_schedule``): the ramp's factor, every maximizer's budgets scaled during its call
and restored after it, a ramped PGD equal to PGD built with the scaled budgets, the validation attack at the full
budget, a resumed run continuing the ramp, and the CLI logging ``train/eps``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import random_batch
from torch.utils.data import DataLoader, TensorDataset

import advtrain.maximizers as maximizers
from advtrain.attacks import PGD as PGDAttack
from advtrain.errors import InvalidConfigError
from advtrain.maximizers import MMA, NFGSM, PGD, TRADES, YOPO, FastFGSM, FreeAT, InnerMaximizer
from advtrain.models import create_model
from advtrain.threat.geometry import geometry_for
from advtrain.training import AdversarialTraining, BudgetRamp
from advtrain.training.checkpoint import load_training_module

ROOT = Path(__file__).resolve().parents[1]
MAXIMIZERS = sorted(
    (c for c in map(lambda n: getattr(maximizers, n), maximizers.__all__)
     if isinstance(c, type) and issubclass(c, InnerMaximizer) and c is not InnerMaximizer),
    key=lambda c: c.__name__,
)  # fmt: skip
# Hyperparameter names that are lengths in input space: a maximizer holding one must declare it a budget.
LENGTHS = ("eps", "step_size", "sigma", "max_eps", "min_eps", "radius", "radius_bounds")


# ------------------------------------------------------------------------------------------------- the factor


def test_ramp_factor_at_chosen_steps_is_exact():
    ramp = BudgetRamp(start=0.25, epochs=4)  # 4 epochs of 10 optimizer steps
    got = [ramp.factor(t, steps_per_epoch=10) for t in (0, 10, 20, 30, 39, 40, 41, 1000)]
    assert got == [0.25, 0.4375, 0.625, 0.8125, 0.25 + 0.75 * 39 / 40, 1.0, 1.0, 1.0]
    assert BudgetRamp(start=0.5, steps=8).factor(4) == 0.75 and BudgetRamp(start=0.5, steps=8).factor(8) == 1.0
    assert BudgetRamp(start=0.5, epochs=2.5).factor(25, steps_per_epoch=10) == 1.0  # fractional epochs
    assert BudgetRamp(start=0.5, epochs=0).factor(0, steps_per_epoch=10) == 1.0  # length 0: no ramp
    assert BudgetRamp(start=1.0, steps=10).factor(0) == 1.0
    start_eps = BudgetRamp(start_eps=0.1, steps=4)
    start_eps.check(0.4)
    assert start_eps.factor(0, budget=0.4) == 0.25 and start_eps.factor(2, budget=0.4) == 0.625
    with pytest.raises(InvalidConfigError, match="steps instead"):
        BudgetRamp(start=0.5, epochs=1).factor(0, steps_per_epoch=None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(start=0.0, epochs=4), "budget_schedule.start must be in"),
        (dict(start=1.5, epochs=4), "budget_schedule.start must be in"),
        (dict(start=float("nan"), epochs=4), "budget_schedule.start must be in"),
        (dict(start=0.5, epochs=-1), "budget_schedule.epochs must be >= 0"),
        (dict(start=0.5, steps=-3), "budget_schedule.steps must be an integer >= 0"),
        (dict(start=0.5, epochs=4, steps=10), "exactly one of epochs and steps"),
        (dict(start=0.5), "exactly one of epochs and steps"),
        (dict(epochs=4), "exactly one of start"),
        (dict(start=0.5, start_eps=0.1, epochs=4), "exactly one of start"),
        (dict(start_eps=-0.1, epochs=4), "budget_schedule.start_eps must be > 0"),
    ],
)
def test_ramp_refuses_bad_values_naming_the_key(kwargs, message):
    with pytest.raises(InvalidConfigError, match=message):
        BudgetRamp(**kwargs)


def test_start_eps_must_fit_the_maximizers_budget():
    with pytest.raises(InvalidConfigError, match=r"start_eps=0.5 must lie in \(0, the maximizer's budget 0.3\]"):
        AdversarialTraining(maximizer=PGD(eps=0.3), budget_schedule=BudgetRamp(start_eps=0.5, steps=4))
    with pytest.raises(InvalidConfigError, match="budget None"):
        AdversarialTraining(budget_schedule=BudgetRamp(start_eps=0.1, steps=4))  # Standard has no budget
    AdversarialTraining(budget_schedule=BudgetRamp(start=0.5, steps=4))  # a fraction composes with any maximizer


# ------------------------------------------------------------------------------ every maximizer, from the package


def _budgets(maximizer):
    from advtrain.maximizers.base import _get

    return {key: _get(maximizer, key) for key in maximizer.budget_keys}


@pytest.mark.parametrize("cls", MAXIMIZERS, ids=lambda c: c.__name__)
def test_every_maximizer_declares_its_budgets_and_restores_them_exactly(cls):
    maximizer = cls()
    undeclared = [k for k in LENGTHS if vars(maximizer).get(k) is not None and k not in maximizer.budget_keys]
    assert not undeclared, f"{cls.__name__} holds budgets it does not declare in budget_keys: {undeclared}"
    before = _budgets(maximizer)
    with maximizer.budget_scaled(0.3):
        for key, value in _budgets(maximizer).items():
            full = before[key]
            expected = (
                None if full is None else (tuple(0.3 * v for v in full) if isinstance(full, tuple) else 0.3 * full)
            )
            assert value == expected, key
    assert all(_budgets(maximizer)[k] is v for k, v in before.items())  # the same objects: bit for bit
    with pytest.raises(RuntimeError, match="inside"), maximizer.budget_scaled(0.5):
        raise RuntimeError("inside")
    assert all(_budgets(maximizer)[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match="budget factor"), maximizer.budget_scaled(0.0):
        pass


def _digits(n=6):
    return *random_batch(n, (1, 28, 28)), torch.arange(n)


@pytest.mark.parametrize("cls", [c for c in MAXIMIZERS if c.budget_keys], ids=lambda c: c.__name__)
def test_every_maximizer_perturbs_within_the_scaled_budget(cls):
    torch.manual_seed(0)
    model = create_model("small_cnn", width=4, hidden=8, init="he")  # the init these scales were chosen for
    with torch.no_grad():  # confident on its own predictions, so that MMA attacks the examples
        model.classifier[-1].weight.mul_(50.0)
    x, y, index = _digits()
    y = model.eval()(x).argmax(1)
    maximizer, factor = cls(), 0.5
    measure = geometry_for(maximizer.norm).measure
    bound = factor * maximizer.budget
    if isinstance(maximizer, NFGSM) and maximizer.clip is None:  # noise kε, then a step ε, no projection
        bound = factor * (maximizer.noise * maximizer.eps + (maximizer.step_size or maximizer.eps))
    if isinstance(maximizer, YOPO):  # a whole training step: every point it feeds layer one is x + η
        seen = []
        layer_one = model.layer_one
        model.layer_one = lambda z: (seen.append(measure((z - x).detach()).max()), layer_one(z))[1]
        with maximizer.budget_scaled(factor):
            maximizer.training_step(model.train(), x, y, torch.Tensor.backward)
        largest = max(seen)
    elif isinstance(maximizer, FreeAT):  # Free AT, a whole training step: every input it trains on is clamp01(x + δ)
        seen = []
        forward = model.forward
        model.forward = lambda z: (seen.append(measure((z - x).detach()).max()), forward(z))[1]
        with maximizer.budget_scaled(factor):
            maximizer.training_step(model.train(), x, y, torch.Tensor.backward, lambda loss: None)
        largest = max(seen)
    else:
        with maximizer.budget_scaled(factor):
            largest = measure(maximizer(model, x, y, index).adv - x).max()
    assert 0 < largest <= bound * (1 + 1e-6), (largest, bound)


@pytest.mark.parametrize(
    ("cls", "kwargs", "scaled"),
    [
        (PGD, dict(eps=0.3, steps=5, step_size=0.05), ("eps", "step_size")),
        (FastFGSM, dict(eps=0.3, step_size=0.375), ("eps", "step_size")),
        (TRADES, dict(eps=0.3, steps=10, step_size=0.05), ("eps", "step_size")),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_a_ramped_step_equals_the_maximizer_built_with_the_scaled_budgets(cls, kwargs, scaled):
    torch.manual_seed(0)
    model = create_model("small_cnn", width=4, hidden=8).eval()
    x, y, _ = _digits()
    factor = 0.4
    torch.manual_seed(1)
    with (ramped := cls(**kwargs)).budget_scaled(factor):
        adv = ramped(model, x, y).adv
    torch.manual_seed(1)
    built = cls(**{**kwargs, **{k: factor * kwargs[k] for k in scaled}})(model, x, y).adv
    assert torch.equal(adv, built)
    largest = (adv - x).abs().max()
    assert factor * 0.3 * 0.9 < largest <= factor * 0.3 * (1 + 1e-6)  # at the scaled ball's edge, not beyond
    assert ramped.eps == 0.3 and ramped.step_size == kwargs["step_size"]


# --------------------------------------------------------------------------------------------- in training


class _SpyPGD(PGD):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[float, float]] = []

    def __call__(self, model, inputs, labels, index=None):
        self.seen.append((self.eps, self.step_size))
        return super().__call__(model, inputs, labels, index)


class _SpyYOPO(YOPO):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[float, float]] = []

    def training_step(self, model, inputs, labels, backward):
        self.seen.append((self.eps, self.sigma))
        return super().training_step(model, inputs, labels, backward)


class _SpyAttack(PGDAttack):
    """The validation attack, recording its own budget and the maximizer's while validation runs."""

    maximizer: InnerMaximizer

    def __call__(self, model, inputs, labels, **kwargs):
        self.seen.append((self.eps, self.maximizer.eps))
        return super().__call__(model, inputs, labels, **kwargs)


def _ramped_module(maximizer, ramp=None):
    torch.manual_seed(0)
    val_attack = _SpyAttack(eps=0.3, steps=1, seed=0)
    val_attack.seen, val_attack.maximizer = [], maximizer
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8}, maximizer=maximizer,
                                 val_attack=val_attack, budget_schedule=ramp or BudgetRamp(start=0.25, epochs=1),
                                 optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))  # fmt: skip
    return module


def _loader(n=16):
    x, _, index = _digits(n)
    return DataLoader(TensorDataset(x, torch.arange(n) % 10, index), batch_size=4)


def _trainer(tmp_path, **kwargs):
    kwargs.setdefault("max_epochs", 2)
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=1, **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    ("maximizer", "second"),
    [(lambda: _SpyPGD(eps=0.3, steps=1, step_size=0.1), 0.1), (lambda: _SpyYOPO(eps=0.3, m=1, n=1, sigma=0.1), 0.1)],
    ids=["automatic", "manual (YOPO)"],
)
def test_training_steps_run_the_maximizer_ramped_and_validation_at_the_full_budget(tmp_path, maximizer, second):
    module = _ramped_module(maximizer())
    trainer = _trainer(tmp_path)
    trainer.fit(module, _loader(), _loader(4))
    factors = [0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0, 1.0, 1.0]  # 4 steps per epoch, ramp over epoch 0
    assert module.maximizer.seen == [(f * 0.3, f * second) for f in factors]
    assert (module.maximizer.eps, getattr(module.maximizer, "step_size", None) or module.maximizer.sigma) == (0.3, 0.1)
    assert module.val_attack.seen == [(0.3, 0.3), (0.3, 0.3)]  # one validation batch per epoch, both at full ε
    assert trainer.callback_metrics["train/eps"].item() == pytest.approx(0.3)  # epoch 1: constant at the full ε
    assert trainer.callback_metrics["train/budget_factor"].item() == 1.0


def test_a_resumed_run_continues_the_ramp_from_the_global_step(tmp_path):
    ramp = BudgetRamp(start=0.2, steps=6)
    whole = _ramped_module(_SpyPGD(eps=0.3, steps=1, step_size=0.1), ramp)
    _trainer(tmp_path, max_epochs=3).fit(whole, _loader(), _loader(4))
    first = _ramped_module(_SpyPGD(eps=0.3, steps=1, step_size=0.1), ramp)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(first, _loader(), _loader(4))
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed = _ramped_module(_SpyPGD(eps=0.3, steps=1, step_size=0.1), ramp)
    _trainer(tmp_path, max_epochs=3).fit(resumed, _loader(), _loader(4), ckpt_path=tmp_path / "epoch0.ckpt")
    assert first.maximizer.seen + resumed.maximizer.seen == whole.maximizer.seen
    assert resumed.maximizer.seen[0] == (ramp.factor(4) * 0.3, ramp.factor(4) * 0.1)  # not the ramp's start again
    assert whole.maximizer.seen[6:] == [(0.3, 0.1)] * 6


def test_mma_keeps_its_stored_margins_unscaled_and_caps_new_ones_at_the_scaled_hinge():
    torch.manual_seed(0)
    model = create_model("small_cnn", width=4, hidden=8)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(50.0)
    x, _, index = _digits()
    y = model.eval()(x).argmax(1)
    mma = MMA(max_eps=0.45, min_eps=0.1, steps=3, bisection_steps=4)
    with mma.budget_scaled(0.5):
        pert = mma(model, x, y, index)
        assert mma._attack.max_eps == 0.225 and mma.min_eps == 0.05
    # New margins are measured up to the scaled cap (1.05 · f · d_max), and stored as measured.
    assert (pert.eps <= 1.05 * 0.225 + 1e-6).all() and torch.equal(mma.margins[index], pert.eps)
    stored = mma.margins.clone()
    with mma.budget_scaled(0.8):
        assert torch.equal(mma.margins, stored)  # a factor change leaves the measurements alone
    assert mma.max_eps == 0.45 and mma._attack.max_eps == 0.45 and mma._attack.eps == 0.1


# ----------------------------------------------------------------------------------------------------- the CLI


def test_cli_ramp_runs_and_logs_train_eps(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "advtrain", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--config", str(ROOT / "configs" / "logger" / "csv.yaml"), "--run_name", "ramp",
            "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--model.val_attack.init_args.steps", "1",
            "--model.maximizer.init_args.steps", "1", "--data.init_args.batch_size", "8",
            "--model.budget_schedule", "advtrain.training.BudgetRamp", "--model.budget_schedule.start", "0.5",
            "--model.budget_schedule.epochs", "null", "--model.budget_schedule.steps", "4"]  # fmt: skip
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = (tmp_path / "logs" / "ramp").glob("version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/eps")]
    eps = [float(r["train/eps"]) for r in rows]
    # Steps 0, 1 at factors 0.5, 0.625 (epoch mean 0.5625), steps 2, 3 at 0.75, 0.875 (0.8125); ε = 0.3.
    assert eps == pytest.approx([0.5625 * 0.3, 0.8125 * 0.3], rel=1e-6)
    module = load_training_module(tmp_path / "checkpoints" / "ramp" / "last.ckpt")  # the schedule is in the hparams
    assert isinstance(module.budget_schedule, BudgetRamp) and module.budget_schedule.steps == 4
    bad_args = [*args, "--model.budget_schedule.start", "1.5", "--run_name", "ramp-bad"]
    bad = subprocess.run(bad_args, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "budget_schedule.start must be in (0, 1]" in bad.stderr + bad.stdout
    assert not (tmp_path / "checkpoints" / "ramp-bad").exists()  # a refused run leaves no folder behind
