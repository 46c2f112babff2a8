"""The adversarial training step keeps the device busy: no host syncs per step (issue 6).

Every test runs real Lightning training steps on CPU under :class:`sync_detector.HostSyncDetector`, which records
the operations that would make the host wait for a GPU. Maximizers whose algorithm needs syncs (MMA's per-example ε
search, DDN's and TR's bookkeeping) list them, site by site, with their largest count per step: a new sync anywhere
fails a test. Also here: the batch checks that moved to the host, the deferred divergence check (no checkpoint ever
holds weights of a non-finite step), Lightning's own conversions, and the data loaders' transfer settings.
"""

from __future__ import annotations

from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from helpers import random_batch
from pytorch_lightning.accelerators import CUDAAccelerator
from sync_detector import HostSyncDetector, fit_counting_syncs
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from advtrain.attacks import create_attack
from advtrain.engine.core import AttackCore
from advtrain.engine.loop import gradient_ascent
from advtrain.engine.losses import cross_entropy
from advtrain.errors import InvalidInputError
from advtrain.maximizers import DDN, MMA, NFGSM, PGD, TRADES, YOPO, Bilateral, FastFGSM, Standard, TRLinf
from advtrain.threat.geometry import geometry_for
from advtrain.training import AdversarialTraining, BudgetRamp, GradAlignLoss
from advtrain.training.objectives import MMALoss, SoftLabelCE, TRADESLoss

HOST_HOOKS = ("on_before_batch_transfer",)  # the batch checks run there, on host tensors: not device syncs
K = 2  # attack steps: the counts below are per step of the maximizer's loop


def _module(maximizer=None, objective=None, **kwargs) -> AdversarialTraining:
    torch.manual_seed(0)
    return AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8}, maximizer=maximizer,
                               objective=objective, **kwargs)  # fmt: skip


def _dataset(n: int = 24, *, model: torch.nn.Module | None = None) -> TensorDataset:
    """Random images; labels random, or ``model``'s own (confident) predictions so that attacks have work to do."""
    x, y = random_batch(n, (1, 28, 28))
    if model is not None:
        with torch.no_grad():
            y = model.eval()(x).argmax(1)
        model.train()
    return TensorDataset(x, y, torch.arange(n))


def _confident(module: AdversarialTraining) -> AdversarialTraining:
    """Scales the last layer so that the model is confident on its own predictions (SLM < 0: MMA attacks them)."""
    with torch.no_grad():
        list(module.model.parameters())[-2].mul_(300.0)
    return module


def _fit(module, data, *, steps: int = 3, **trainer_kwargs):
    trainer_kwargs.setdefault("log_every_n_steps", 50)
    return fit_counting_syncs(module, DataLoader(data, batch_size=8), host_hooks=HOST_HOOKS,
                              trainer_kwargs=dict(max_steps=steps, **trainer_kwargs))  # fmt: skip


def _site(event) -> str:
    """``op file (function)``: line numbers left out, so that edits elsewhere in a file do not matter."""
    path, rest = event.where.split(":", 1)
    return f"{event.op} {path} ({rest.rsplit('(', 1)[-1].rstrip(')')})"


def _over_budget(step_events, budget: dict[str, int]) -> dict[str, int]:
    counts = Counter(_site(e) for e in step_events)
    return {site: n for site, n in counts.items() if n > budget.get(site, 0)}


# ---------------------------------------------------------------------------------------- zero syncs per step


SYNC_FREE = {
    "pgd_linf": lambda: (PGD(eps=0.3, steps=K, step_size=0.1), None),
    "pgd_l2": lambda: (PGD(norm="l2", eps=1.0, steps=K, step_size=0.5), None),
    "fast_fgsm": lambda: (FastFGSM(eps=0.3), None),
    "nfgsm": lambda: (NFGSM(eps=0.3), None),
    "fgsm_gradalign": lambda: (PGD(eps=0.3, steps=1, step_size=0.3, random_start=False), GradAlignLoss(weight=0.2)),
    "trades": lambda: (TRADES(eps=0.3, steps=K, step_size=0.1), TRADESLoss()),
    "bilateral": lambda: (Bilateral(eps=0.3), SoftLabelCE()),
    "yopo": lambda: (YOPO(eps=0.3, m=2, n=2, sigma=0.05), None),
    "standard": lambda: (Standard(), None),
}


@pytest.mark.parametrize("name", sorted(SYNC_FREE))
def test_training_steps_make_no_host_sync(name):
    result = _fit(_module(*SYNC_FREE[name]()), _dataset())
    assert result.counts() == [0, 0, 0], result.report()
    # The divergence record is read at the end of the epoch and of training; nothing else of advtrain syncs there.
    ours = Counter(_site(e) for e in result.end if e.where.startswith("advtrain/"))
    assert ours == {"tolist advtrain/training/divergence.py (check)": 2}, result.report()


@pytest.mark.parametrize("name", ["pgd_linf", "yopo"])
def test_a_budget_schedule_adds_no_host_sync(name):
    maximizer, objective = SYNC_FREE[name]()
    module = _module(maximizer, objective, budget_schedule=BudgetRamp(start=0.5, steps=2))
    result = _fit(module, _dataset())
    assert result.counts() == [0, 0, 0], result.report()


# Per-step budgets of the maximizers whose algorithm syncs: site -> the most it may occur in one training step (K
# attack steps). Sites in advtrain/attacks and advtrain/engine belong to the attacks these maximizers run.
# The loop contract's typed state (advtrain/engine/state.py): a count per retirement, then the index and each
# per-sample field when samples leave.
_STATE_RETIRE, _STATE_KEEP = "__int__ advtrain/engine/state.py (retire)", "__getitem__ advtrain/engine/state.py (keep)"
BUDGETS = {
    # DDN-K on CPU: the zero-gradient test every iteration (on an accelerator the noise is drawn every step instead,
    # see test_ddn_on_an_accelerator_makes_no_host_sync).
    "ddn": (lambda: (DDN(eps=2.0, steps=K), None), False, {
        "__bool__ advtrain/attacks/ddn.py (advance)": K,
    }),
    # TR-L∞: the clean decision's active set, then one count per iteration (adaptive radius, per-sample stopping)
    # and, when samples finish, the boolean masks that shrink the active set (index + 9 state tensors: x, y, target,
    # δ, radius, φ, ∇φ, the previous φ and the predicted change).
    "trlinf": (lambda: (TRLinf(eps=0.3, steps=K), None), True, {
        "nonzero advtrain/attacks/trust_region.py (run)": 1,
        _STATE_RETIRE: K, _STATE_KEEP: 10 * K,
    }),
    # MMA: the margin buffer's size, the correct examples, the adversarially trained ones (MMALoss); then AN-PGD:
    # its correct examples, its inner PGD (ε validation of its own, the
    # best-point scoring masks, per-step active-set counts and shrinking), its bisection tracker.
    "mma": (lambda: (MMA(max_eps=0.45, min_eps=0.1, steps=K, bisection_steps=2), MMALoss()), True, {
        "__int__ advtrain/maximizers/mma.py (__call__)": 1,
        "nonzero advtrain/maximizers/mma.py (__call__)": 1,
        "nonzero advtrain/training/objectives.py (__call__)": 1,
        "nonzero advtrain/attacks/anpgd.py (run)": 1,
        "nonzero advtrain/engine/loop.py (gradient_ascent)": 1,
        "__bool__ advtrain/threat/norms.py (as_eps_tensor)": 2,
        "__getitem__ advtrain/engine/tracking.py (offer)": 4 * (K + 1),
        "__getitem__ advtrain/engine/tracking.py (update)": 6,
        _STATE_RETIRE: K, _STATE_KEEP: 6 * K,  # PGD's index and x, ε, α, δ, ∇
    }),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_algorithms_that_need_syncs_make_only_theirs(name):
    factory, confident, budget = BUDGETS[name]
    module = _module(*factory())
    if confident:
        _confident(module)
    result = _fit(module, _dataset(model=module.model if confident else None))
    for events in result.steps:
        assert not _over_budget(events, budget), result.report()
    assert max(result.counts()) > 0  # the attack did run (and its syncs were seen)
    assert not any(e.where.startswith("advtrain/training/module.py") for s in result.steps for e in s)


def test_ddn_on_an_accelerator_makes_no_host_sync(monkeypatch):
    import advtrain.attacks.ddn as ddn_module

    monkeypatch.setattr(ddn_module, "_noise_every_step", lambda device: True)  # what it answers off the CPU
    result = _fit(_module(DDN(eps=2.0, steps=K)), _dataset())
    assert result.counts() == [0, 0, 0], result.report()


def test_a_new_sync_in_the_step_is_caught():
    class Chatty(PGD):
        def __call__(self, model, inputs, labels, index=None):
            if labels.max() >= 0:  # a Python `if` on a device value
                pass
            return super().__call__(model, inputs, labels, index)

    result = _fit(_module(Chatty(eps=0.3, steps=1, step_size=0.1)), _dataset())
    assert result.counts() == [1, 1, 1]
    assert _site(result.steps[0][0]) == "__bool__ tests/test_host_syncs.py (__call__)"


# ------------------------------------------------------------------------------------ batch checks on the host


def test_batches_are_checked_once_on_the_host_and_not_again_in_the_step(monkeypatch):
    calls = []
    real = AdversarialTraining._check
    monkeypatch.setattr(AdversarialTraining, "_check", lambda self, x, y: calls.append(x.device) or real(self, x, y))
    result = _fit(_module(PGD(eps=0.3, steps=1, step_size=0.1)), _dataset())
    assert result.counts() == [0, 0, 0]
    assert len(calls) == 3  # one per batch, in on_before_batch_transfer (whose syncs are host-side, not recorded)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda x, y: (x * 255 - 128, y), r"inputs must lie in \[0, 1\] but range over .*Remove any Normalize"),
        (lambda x, y: (x, y + 20), r"labels must lie in \[0, 9\] for a 10-class model, but range over \[2\d, 29\]"),
        (lambda x, y: (x.clone().fill_(float("nan")), y), r"inputs contain NaN or infinite values"),
    ],
    ids=["pixels", "labels", "nan"],
)
def test_bad_batches_are_rejected_on_the_host_with_the_same_messages(corrupt, message):
    data = _dataset(16)
    x, y = corrupt(*data.tensors[:2])
    module = _module(PGD(eps=0.3, steps=1, step_size=0.1))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with pytest.raises(InvalidInputError, match=message) as exc:
        trainer.fit(module, DataLoader(TensorDataset(x, y, data.tensors[2]), batch_size=8))
    assert any(entry.name == "on_before_batch_transfer" for entry in exc.traceback)  # before it reached the device
    assert trainer.global_step == 0


def test_a_batch_already_on_the_device_is_checked_in_the_step(monkeypatch):
    import advtrain.training.module as module_file

    monkeypatch.setattr(module_file, "_is_host_batch", lambda batch: False)  # as for a loader yielding GPU tensors
    data = _dataset(16)
    module = _module(PGD(eps=0.3, steps=1, step_size=0.1))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    bad = TensorDataset(data.tensors[0], data.tensors[1] + 20, data.tensors[2])
    with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 9\]") as exc:
        trainer.fit(module, DataLoader(bad, batch_size=8))
    assert any(entry.name == "training_step" for entry in exc.traceback)


def test_attacks_called_by_users_still_check_and_trusted_cores_do_not():
    model = _module().model.eval()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    attack = create_attack("pgd", eps=0.1, steps=2)
    with pytest.raises(InvalidInputError, match=r"must lie in \[0, 1\]"):
        attack(model, x * 2, y)
    with pytest.raises(InvalidInputError, match=r"labels must lie in \[0, 9\]"):
        attack(model, x, y + 10)
    with pytest.raises(InvalidInputError, match=r"must lie in \[0, 1\]"):
        AttackCore(model, x * 2, y)
    with HostSyncDetector() as syncs:
        AttackCore(model, x * 2, y, checks=False).logits(x)  # the caller vouches for its batch: nothing is read
        eps = torch.full((4,), 0.1)
        gradient_ascent(
            model,
            x,
            y,
            geometry=geometry_for("linf"),
            eps=eps,
            step_size=eps / 2,
            steps=2,
            loss_fn=cross_entropy,
            random_start=True,
            keep_best=False,
            early_stop=False,
            checks=False,
        )
        PGD(eps=0.1, steps=2, step_size=0.05)(model, x, y)  # fmt: skip
    assert syncs.count == 0, syncs.report()


# ------------------------------------------------------------------------------------ reads at the logging steps


def test_reads_happen_only_every_n_steps_and_with_lightnings_logging(tmp_path):
    """As the CLI runs (a logger, the progress bar): Lightning converts the logged step values every
    ``log_every_n_steps`` steps; the divergence record is read on the same steps (its default interval); the progress
    bar shows epoch values only. Every other step is sync-free."""
    from pytorch_lightning.loggers import CSVLogger

    result = _fit(_module(PGD(eps=0.3, steps=1, step_size=0.1)), _dataset(56), steps=7, log_every_n_steps=3,
                  logger=CSVLogger(tmp_path), enable_progress_bar=True)  # fmt: skip
    assert [k for k, n in enumerate(result.counts()) if n] == [2, 5], result.report()
    for k in (2, 5):
        sites = Counter(_site(e) for e in result.steps[k])
        assert sites["tolist advtrain/training/divergence.py (check)"] == 1
        assert all(site.startswith(("item lightning_fabric", "tolist advtrain/training/divergence")) for site in sites)


def test_lightning_converts_progress_bar_step_values_after_every_batch():
    """Why the step loss is not in the progress bar: Lightning 2.6 turns every ``prog_bar=True, on_step=True`` value
    into a Python number at the end of every batch (LoggerConnector.on_batch_end), whatever the refresh rate."""

    class Logs(pl.LightningModule):
        def __init__(self, prog_bar: bool) -> None:
            super().__init__()
            self.layer, self.prog_bar = torch.nn.Linear(4, 1), prog_bar

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).square().mean()
            self.log("loss", loss, on_step=True, prog_bar=self.prog_bar)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = TensorDataset(torch.rand(32, 4))
    counts = {}
    for prog_bar in (True, False):
        result = fit_counting_syncs(Logs(prog_bar), DataLoader(data, batch_size=8),
                                    trainer_kwargs=dict(max_steps=4, log_every_n_steps=50))  # fmt: skip
        counts[prog_bar] = result.counts()
    assert counts == {True: [1, 1, 1, 1], False: [0, 0, 0, 0]}


# ----------------------------------------------------------------------------------------------- data loading


def _mnist5k(**kwargs):
    from advtrain.data import MNIST5kDataModule

    dm = MNIST5kDataModule(batch_size=16, **kwargs)
    dm.setup("fit")
    return dm


def test_loaders_pin_memory_when_the_trainer_runs_on_cuda():
    from types import SimpleNamespace

    dm = _mnist5k(num_workers=2)
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())  # what a Trainer(accelerator="cuda") holds
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        assert loader.pin_memory and loader.num_workers == 2 and loader.persistent_workers
    dm.trainer = pl.Trainer(accelerator="cpu", logger=False)
    assert not dm.train_dataloader().pin_memory
    dm = _mnist5k(pin_memory=False)
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    assert not dm.train_dataloader().pin_memory  # an explicit choice wins
    assert not _mnist5k().train_dataloader().persistent_workers  # no workers (in-memory digits): nothing to keep


def test_lightning_moves_batches_to_cuda_without_blocking():
    """The copy Lightning issues for each batch; with pinned memory it overlaps the previous step's kernels."""
    from lightning_fabric.utilities.apply_func import move_data_to_device

    class RecordTo(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "to":
                self.calls.append((args[1:], kwargs or {}))
                return args[0]  # no CUDA here: record the request instead of moving
            return func(*args, **(kwargs or {}))

    batch = [torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), torch.tensor([0, 1])]
    with RecordTo() as mode:
        move_data_to_device(batch, torch.device("cuda", 0))
    assert len(mode.calls) == 3 and all(kw.get("non_blocking") is True for _, kw in mode.calls)
