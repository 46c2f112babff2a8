"""Faults injected into training and evaluation: each is met with an actionable message, and nothing is lost.

Out of memory during an attack (the batch is retried in halves), a full disk while saving (the previous checkpoint
stays intact), W&B unreachable with an API key (one short probe, then offline, not a 2-minute hang), NaN/inf in the
loss or the gradients (training stops, no checkpoint holds the bad weights, the last good one loads), a model returning
probabilities (one warning).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import linear_problem, random_batch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain.attacks import PGD
from advtrain.cli import AdvTrainer
from advtrain.engine.checks import ProbabilitiesWarning
from advtrain.errors import InvalidConfigError, TrainingDivergedError, UserError
from advtrain.evaluation import evaluate_robustness
from advtrain.training import AdversarialTraining
from advtrain.training.checkpoint import CheckpointSaveError, load_training_module, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- out of memory in evaluation


class _RunsOutAbove(nn.Module):
    """Raises torch.OutOfMemoryError for batches larger than ``limit`` (as a GPU would), and counts the calls."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]} (fake).")
        return self.model(x)


def _evaluate(model: nn.Module, batch_size: int) -> dict:
    _, x, y, _ = linear_problem(n=40, dim=64)
    attack = PGD(norm="linf", eps=0.045, steps=5, step_size=0.015, random_start=False)  # deterministic
    report = evaluate_robustness(model, TensorDataset(x.view(40, 1, 8, 8), y), {"pgd": attack}, norm="linf",
                                 eps=0.045, batch_size=batch_size, progress=False)  # fmt: skip
    out = report.as_dict()
    out.pop("wall_time_s")
    for entry in out["attacks"].values():
        entry.pop("seconds")
    return out


def test_out_of_memory_in_an_attack_retries_the_batch_in_halves(caplog):
    base = linear_problem(n=40, dim=64)[0].eval()
    reference = _evaluate(base, batch_size=5)
    oom = _RunsOutAbove(base, limit=5)
    with caplog.at_level(logging.WARNING, logger="advtrain"):
        got = _evaluate(oom, batch_size=20)  # 20 -> 10 + 10 -> 5 + 5 each
    assert got == reference  # the same samples, the same verified numbers
    assert 0 < reference["robust_accuracy_all"] < reference["clean_accuracy"]
    assert max(s for s in oom.sizes if s <= 5) == 5 and 20 in oom.sizes
    assert "out of memory on a batch of 20 samples; retrying it as 10 + 10" in caplog.text
    with pytest.raises(torch.OutOfMemoryError, match="one sample does not fit"):
        _evaluate(_RunsOutAbove(base, limit=0), batch_size=4)


# ------------------------------------------------------------------------------------------- training helpers


def _tiny_fit(
    folder: Path, callbacks: list, *, steps: int = 4, model_hook=None, samples: int = 32, checkpoint_every: int = 1,
    plugins: list | None = None, **module_kwargs,
) -> tuple[AdvTrainer, AdversarialTraining]:  # fmt: skip
    data = TensorDataset(*random_batch(samples, (1, 28, 28)), torch.arange(samples))
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8}, **module_kwargs)
    if model_hook is not None:
        model_hook(module)
    checkpoints = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=checkpoint_every, save_top_k=0)
    trainer = AdvTrainer(max_steps=steps, max_epochs=10, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=folder, callbacks=[checkpoints, *callbacks],
                         plugins=plugins)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer, module


# ------------------------------------------------------------------------------------------------ full disk


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import io

    import lightning_fabric.plugins.io.torch_io as torch_io

    real_save = torch_io._atomic_save
    calls = {"n": 0}

    def write_until_full(checkpoint, path):
        calls["n"] += 1
        if calls["n"] <= 2:
            return real_save(checkpoint, path)
        # The third checkpoint: half of its bytes reach the file, then the disk is full.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch_io, "_atomic_save", write_until_full)
    with pytest.raises(CheckpointSaveError) as exc:
        _tiny_fit(tmp_path, [])
    message = str(exc.value)
    assert isinstance(exc.value, UserError)  # the CLI prints it without a traceback and exits with status 2
    assert "No space left on device" in message and "the previous last.ckpt is intact" in message
    assert "--ckpt_path last" in message
    # The checkpoint of step 2 is whole and loads; no temporary file is left behind.
    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 2
    load_training_module(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["last.ckpt"]


# --------------------------------------------------------------------------------------------- non-finite values


class _PoisonAt(pl.Callback):
    """Fills the weights with NaN before training step ``at``: the loss of that step is NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                for p in pl_module.model.parameters():
                    p.fill_(float("nan"))


class _InfGradientsFrom(pl.Callback):
    """Multiplies the first layer's gradient by inf from training step ``at`` on (the loss stays finite)."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, 0

    def on_fit_start(self, trainer, pl_module) -> None:
        weight = next(pl_module.model.parameters())
        weight.register_hook(lambda g: g * float("inf") if self.steps >= self.at else g)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


class _SavedWeights(pl.Callback):
    """Records, for every checkpoint written, its global step and whether all of its weights are finite."""

    def __init__(self) -> None:
        self.saved: list[tuple[int, bool]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        io = trainer.strategy.checkpoint_io
        real = io.save_checkpoint

        def save(checkpoint, path, storage_options=None):
            weights = [v for v in checkpoint["state_dict"].values() if v.is_floating_point()]
            self.saved.append((checkpoint["global_step"], all(bool(torch.isfinite(v).all()) for v in weights)))
            return real(checkpoint, path, storage_options)

        io.save_checkpoint = save


def test_nan_loss_stops_and_the_last_good_checkpoint_loads(tmp_path):
    # A UserError: the CLI prints it without a traceback and exits with status 2. The loss is read back from the
    # device every log_every_n_steps steps, but always before a checkpoint is written: the one of step 4 (after the
    # NaN step 3) is refused, so the step-3 checkpoint stays the last.
    saved = _SavedWeights()
    with pytest.raises(TrainingDivergedError, match=r"training loss is nan at epoch 0, batch 3.*checkpoint is intact"):
        _tiny_fit(tmp_path, [_PoisonAt(3), saved])
    assert issubclass(TrainingDivergedError, UserError) and issubclass(TrainingDivergedError, FloatingPointError)
    assert saved.saved == [(1, True), (2, True), (3, True)]
    module = load_training_module(tmp_path / "last.ckpt")
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3  # saved after the last good step
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert torch.isfinite(module(torch.rand(2, 1, 28, 28))).all()


def test_nan_loss_is_reported_within_n_steps_naming_its_step(tmp_path):
    with pytest.raises(TrainingDivergedError) as exc:
        _tiny_fit(tmp_path, [_PoisonAt(5)], steps=16, samples=128, checkpoint_every=100, divergence_check_every=4)
    message = str(exc.value)
    assert "The training loss is nan at epoch 0, batch 5. Lower the learning rate" in message
    assert "Found at step 8: non-finite values are read back every 4 steps" in message  # the first read after 5
    assert not list(tmp_path.glob("*.ckpt"))


def test_no_checkpoint_ever_holds_weights_of_a_non_finite_step(tmp_path):
    # Read every 50 steps, checkpoints every 2: the checkpoint of step 6, after the bad step 5, is refused.
    saved = _SavedWeights()
    with pytest.raises(TrainingDivergedError, match=r"training loss is nan at epoch 0, batch 5\..* Found at step 6"):
        _tiny_fit(tmp_path, [_PoisonAt(5), saved], steps=16, samples=128, checkpoint_every=2,
                  divergence_check_every=50)  # fmt: skip
    assert saved.saved == [(2, True), (4, True)]
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 4


def test_non_finite_gradients_stop_before_a_checkpoint_holds_them(tmp_path):
    saved = _SavedWeights()
    with pytest.raises(TrainingDivergedError, match=r"Non-finite gradients at epoch 0, step 2 \(the loss was finite\)"):
        _tiny_fit(tmp_path, [_InfGradientsFrom(2), saved])
    assert saved.saved == [(1, True), (2, True)]
    module = load_training_module(tmp_path / "last.ckpt")
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the bad step never reached a checkpoint


def test_reading_every_step_stops_before_the_weights_move(tmp_path):
    holder = {}
    with pytest.raises(TrainingDivergedError, match=r"Non-finite gradients at epoch 0, step 2 \(the loss was finite\)"
                       r"[^F]*$"):  # fmt: skip
        _tiny_fit(tmp_path, [_InfGradientsFrom(2)], model_hook=lambda m: holder.update(module=m),
                  divergence_check_every=1)  # fmt: skip
    assert all(torch.isfinite(p).all() for p in holder["module"].parameters())  # not even in memory


def test_fp16_loss_scaling_skips_inf_gradients_itself(tmp_path):
    from pytorch_lightning.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    trainer, module = _tiny_fit(tmp_path, [_InfGradientsFrom(2)], plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                                divergence_check_every=1)  # fmt: skip
    assert trainer.global_step == 4 and scaler.get_scale() < 2.0**4  # the scaler met the infs and skipped those steps
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_divergence_check_every_is_validated_and_follows_the_logging_interval():
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(InvalidConfigError, match="divergence_check_every must be a positive number of steps"):
            AdversarialTraining(divergence_check_every=bad)
    for log_every, option, expected in ((7, None, 7), (0, None, 50), (7, 3, 3), (7, 1, 1)):
        module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 4, "hidden": 8},
                                     divergence_check_every=option)  # fmt: skip
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", log_every_n_steps=log_every)  # fmt: skip
        trainer.fit(module, DataLoader(TensorDataset(torch.rand(8, 1, 28, 28), torch.arange(8)), batch_size=8))
        assert module._divergence.every == expected


def test_nan_loss_through_the_cli_exits_with_status_2_and_writes_no_checkpoint(tmp_path, monkeypatch, caplog):
    from advtrain.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--config",
            str(ROOT / "configs" / "trainer" / "smoke.yaml"), "--run_name", "nan", "--trainer.enable_progress_bar",
            "false", "--model.maximizer.init_args.steps", "1", "--model.optimizer.init_args.lr", "1e30"]  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="advtrain"), pytest.raises(SystemExit) as exc:
        main(args)  # Adam at lr 1e30: the weights overflow after the first step, the second loss is NaN
    assert exc.value.code == 2
    assert "The training loss is nan at epoch 0, batch 1. Lower the learning rate" in caplog.text
    assert not list((tmp_path / "checkpoints" / "nan").glob("*.ckpt"))  # the epoch-end checkpoint was refused


# ------------------------------------------------------------------------------------------------- probabilities


def test_a_model_returning_probabilities_warns_once_in_training(tmp_path):
    def softmax_head(module):
        module.model = nn.Sequential(module.model, nn.Softmax(dim=1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tiny_fit(tmp_path, [], steps=3, model_hook=softmax_head)
    found = [w for w in caught if issubclass(w.category, ProbabilitiesWarning)]
    assert len(found) == 1 and "Remove the final softmax" in str(found[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tiny_fit(tmp_path / "logits", [], steps=3)
    assert not [w for w in caught if issubclass(w.category, ProbabilitiesWarning)]


# ------------------------------------------------------------------------------------------------ W&B unreachable


def test_wandb_unreachable_with_an_api_key_falls_back_to_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_API_KEY="0" * 40,  # a syntactically valid, fake key
        WANDB_BASE_URL="http://10.255.255.1:9",  # unroutable: a connection attempt hangs until its timeout
        WANDB_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path),
        WANDB_DATA_DIR=str(tmp_path), HOME=str(tmp_path), OMP_NUM_THREADS="1", WANDB_SILENT="true",
    )  # fmt: skip
    args = [sys.executable, "-m", "advtrain", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--run_name", "wb", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--model.val_attack.init_args.steps", "1", "--model.maximizer.init_args.steps", "1",
            "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8",
            "--data.init_args.num_workers", "0", "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    # The timeout only guards the test suite against a hang; what the test checks is below, not the wall time.
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # without the fallback, wandb.init fails and the run exits 1
    assert "http://10.255.255.1:9" in done.stderr and "logging to W&B offline" in done.stderr
    # wandb.init ran in offline mode (an online attempt leaves a run-* folder): no network retry loop was entered.
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # the run is kept, to sync later
    assert not list((tmp_path / "wandb").glob("run-*"))


def test_an_api_key_without_a_route_costs_one_probe_of_3_seconds_then_offline(monkeypatch):
    """The bounded cost of the fallback: one GET /healthz with a 3-second timeout (wandb.init's own retries last about
    2 minutes), after which W&B runs offline; nothing else touches the network."""
    import urllib.error
    import urllib.request

    from advtrain import cli

    calls = []

    def unroutable(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", unroutable)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://10.255.255.1:9")
    cli._configure_wandb()
    assert calls == [("http://10.255.255.1:9/healthz", 3.0)]
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_probe_reports_refused_and_non_wandb_servers(monkeypatch):
    import http.server
    import socket
    import threading

    from advtrain.cli import _wandb_unreachable

    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # the probe goes through proxies, as wandb does; not to localhost

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    assert "cannot be reached" in _wandb_unreachable(f"http://127.0.0.1:{port}", timeout=1.0)

    class NotWandb(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert "answered HTTP 404, not a W&B server" in _wandb_unreachable(url, timeout=1.0)
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------------ soak


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live_tensors() -> tuple[int, int]:
    """(tensors alive, tensors alive that hold an autograd graph)."""
    import gc

    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.grad_fn is not None for t in tensors)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the resident set size from /proc")
def test_robust_evaluation_soak_keeps_memory_flat():
    """12 evaluations of 64 batches each (768 batches: a minimal-norm, a gradient and a black-box attack): after two
    warm-up rounds the resident memory, Python's traced allocations and the live tensors stay flat, and no autograd
    graph outlives a batch."""
    import tracemalloc

    from helpers import TinyCNN

    from advtrain.evaluation import SuiteEntry, build_suite

    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = TensorDataset(torch.rand(1024, 1, 8, 8), torch.randint(0, 10, (1024,)))
    suite = [SuiteEntry("deepfool", "deepfool", {"steps": 10}, role="minimal"), SuiteEntry("pgd", "pgd", {"steps": 5}),
             SuiteEntry("square", "square", {"steps": 20}, role="black_box")]  # fmt: skip
    entries = build_suite(suite, norm="linf", eps=0.03, seed=0)
    rss, traced, live = [], [], []
    tracemalloc.start()
    try:
        for _ in range(12):
            report = evaluate_robustness(model, data, entries, norm="linf", eps=0.03, batch_size=16, progress=False)
            assert report.as_dict()["samples"] == 1024
            del report
            count, with_graph = _live_tensors()
            assert with_graph == 0, f"{with_graph} tensors still hold an autograd graph after an evaluation"
            live.append(count)
            rss.append(_rss_mb())
            traced.append(tracemalloc.get_traced_memory()[0] / 2**20)
    finally:
        tracemalloc.stop()
    after_warmup = slice(2, None)
    assert max(rss[after_warmup]) - rss[2] < 16, f"resident memory grew: {[round(r, 1) for r in rss]} MB"
    assert max(traced[after_warmup]) - traced[2] < 1, f"Python allocations grew: {[round(t, 2) for t in traced]} MB"
    assert max(live[after_warmup]) == min(live[after_warmup]), f"live tensors changed: {live}"
