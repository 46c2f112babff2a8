"""The RobustEvaluation callback in a tiny fit and in validate/test, the ``evaluate`` subcommand on a plain state dict,
and exact numbers under 2-process CPU DDP."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import TensorDataset

from advtrain.callbacks import RobustEvaluation
from advtrain.cli import main
from advtrain.data import MNIST5kDataModule
from advtrain.evaluation import BatchAlignedSampler, SuiteEntry, build_suite, evaluate_robustness
from advtrain.models import create_model
from advtrain.training import AdversarialTraining

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def _callback(**kwargs):
    return RobustEvaluation(suite="quick", norm="linf", eps=0.1, eps_grid=[0.05, 0.1], num_samples=24, batch_size=10,
                            overrides={"pgd20": {"steps": 3}}, **kwargs)  # fmt: skip


def _trainer(tmp_path, callback, **kwargs):
    return pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                      logger=CSVLogger(tmp_path), callbacks=[callback], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def _logged_keys(trainer) -> set[str]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {k for row in rows for k, v in row.items() if v not in ("", None)}


EXPECTED = {
    "robust/clean_acc",
    "robust/All/acc",
    "robust/All/acc@0.05",
    "robust/All/acc@0.1",
    "robust/pgd20/acc@0.05",
    "robust/pgd20/acc@0.1",
    "robust/pgd20/success_rate",
    "robust/pgd20/mean_norm",
    "robust/pgd20/median_norm",
    "robust/pgd20/rho_mean",
    "robust/pgd20/rho_max",
    "robust/pgd20/forward_passes",
    "robust/pgd20/backward_passes",
    "robust/pgd20/seconds",
    "robust/masking/zero_gradients",
    "robust/masking/random_outputs",
    "robust/time_s",
}


def test_callback_logs_the_expected_keys_in_a_tiny_fit(tmp_path):
    torch.manual_seed(0)
    callback = _callback()
    trainer = _trainer(tmp_path, callback)
    trainer.fit(AdversarialTraining(), datamodule=MNIST5kDataModule(batch_size=32, num_workers=0))
    assert EXPECTED <= _logged_keys(trainer)
    report = callback.last_report.as_dict()
    assert report["samples"] == 24 and report["split"] == "val"
    assert report["robust_accuracy_all"] <= report["attacks"]["pgd20"]["robust_accuracy"] <= report["clean_accuracy"]
    assert len(callback.history) == 1


def test_callback_runs_under_inference_mode_in_validate_and_test(tmp_path):
    """Lightning's validate/test default to inference mode; the callback must still get gradients."""
    callback = _callback()
    trainer = _trainer(tmp_path, callback, inference_mode=True)
    module = AdversarialTraining()
    dm = MNIST5kDataModule(batch_size=32, num_workers=0)
    trainer.validate(module, datamodule=dm)
    first = callback.last_report.as_dict()
    assert first["attacks"]["pgd20"]["backward_passes"] > 0 and first["split"] == "val"
    trainer.test(module, datamodule=dm)
    assert callback.last_report.as_dict()["split"] == "test"
    assert "robust/pgd20/acc@0.1" in trainer.callback_metrics


def test_callback_logs_table_and_plot_to_wandb(tmp_path):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    callback = _callback()
    logger = WandbLogger(project="advtrain-test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(limit_val_batches=1, logger=logger, callbacks=[callback], enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    try:
        trainer.validate(AdversarialTraining(), datamodule=MNIST5kDataModule(batch_size=32, num_workers=0))
        summary = dict(logger.experiment.summary)
    finally:
        wandb.finish()
    assert "robust/All/acc@0.1" in summary and "robust/pgd20/acc@0.05" in summary
    assert summary["robust/accuracy_vs_eps_table"]["_type"] == "table-file"
    assert summary["robust/accuracy_vs_eps_figure"]["_type"] == "image-file"


def test_callback_passes_the_fusion_options(tmp_path):
    callback = _callback(fuse=True, max_fused_batch=64)
    datamodule = MNIST5kDataModule(batch_size=32, num_workers=0)
    _trainer(tmp_path, callback).validate(AdversarialTraining(), datamodule=datamodule)
    report = callback.last_report.as_dict()
    assert report["fused"] is True and report["max_fused_batch"] == 64
    assert callback.last_report.data["attacked"].any()


def test_callback_needs_a_threat_model_or_a_val_attack(tmp_path):
    callback = RobustEvaluation(suite="quick", num_samples=4)
    trainer = _trainer(tmp_path, callback)
    with pytest.raises(ValueError, match="needs a threat model"):
        trainer.validate(AdversarialTraining(), datamodule=MNIST5kDataModule(batch_size=32, num_workers=0))


def test_callback_respects_every_n_epochs(tmp_path):
    callback = _callback(every_n_epochs=2)
    trainer = _trainer(tmp_path, callback)
    trainer.fit_loop.max_epochs = 3
    trainer.fit(AdversarialTraining(), datamodule=MNIST5kDataModule(batch_size=32, num_workers=0))
    assert len(callback.history) == 1  # after epoch 2 of 3


def test_evaluate_subcommand_on_a_plain_state_dict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
    path = tmp_path / "robustbench.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    out = tmp_path / "eval"
    args = ["evaluate", "--config", QUICKSTART, "--trainer.logger", "false", "--ckpt_path", str(path), "--arch",
            "small_cnn", "--suite", "quick", "--eps_grid", "[0.1, 0.3]", "--overrides", '{"pgd20": {"steps": 2}}',
            "--max_samples", "20", "--batch_size", "8", "--output", str(out), "--progress", "false"]  # fmt: skip
    main(args)
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 20 and report["eps_grid"] == [0.1, 0.3] and report["suite"] == "quick"
    assert set(report["attacks"]) == {"pgd20"} and report["attacks"]["pgd20"]["config"].startswith("PGD(")
    # The weights are the saved ones: the clean accuracy is the plain model's.
    from advtrain.models.reference import reference_batch

    x, y = reference_batch(20)
    with torch.no_grad():
        assert report["clean_accuracy"] == pytest.approx(float((net.eval()(x).argmax(1) == y).float().mean()))
    for name in ("report.md", "accuracy_vs_eps.png"):
        assert (out / name).is_file()
    assert len(list((out / "partial").glob("batch-*.pt"))) == 3
    main(args + ["--resume", "true"])  # every batch reused
    assert (
        json.loads((out / "report.json").read_text())["robust_accuracy_all_by_eps"]
        == report["robust_accuracy_all_by_eps"]
    )


def test_evaluate_subcommand_passes_the_fusion_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    path = tmp_path / "plain.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_channels=1, input_size=28).state_dict(), path)
    args = ["evaluate", "--config", QUICKSTART, "--trainer.logger", "false", "--ckpt_path", str(path), "--arch",
            "small_cnn", "--suite", "quick", "--eps_grid", "[0.1, 0.3]", "--overrides", '{"pgd20": {"steps": 2}}',
            "--max_samples", "8", "--batch_size", "8", "--progress", "false", "--plots", "false"]  # fmt: skip
    main([*args, "--output", str(tmp_path / "fused"), "--fuse", "true", "--max_fused_batch", "16"])
    report = json.loads((tmp_path / "fused" / "report.json").read_text())
    assert report["fused"] is True and report["max_fused_batch"] == 16
    with pytest.raises(SystemExit):  # jsonargparse names the option and its allowed values
        main([*args, "--output", str(tmp_path / "bad"), "--fuse", "sometimes"])


def test_batch_aligned_sampler_deals_whole_batches_without_padding():
    ranks = [list(BatchAlignedSampler(range(65), 10, rank=r, world_size=2)) for r in range(2)]
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert sorted(seen) == list(range(65))  # 65 samples, none twice (a DistributedSampler would count 66)
    assert ranks[0][0] == list(range(10)) and ranks[1][0] == list(range(10, 20)) and ranks[0][-1] == list(range(60, 65))


# ------------------------------------------------------------------------------------------------- DDP

SUITE = [
    SuiteEntry("deepfool", "deepfool", {"steps": 20}, role="minimal"),
    SuiteEntry("pgd", "pgd", {"steps": 5}),
    SuiteEntry("square", "square", {"steps": 50}, role="black_box"),
]


def _problem():
    from helpers import linear_problem

    model, x, y, _ = linear_problem(n=50, dim=64)
    return model.eval(), TensorDataset(x.view(50, 1, 8, 8), y)


def _run(model, dataset):
    entries = build_suite(SUITE, norm="linf", eps=0.06, seed=0)
    report = evaluate_robustness(model, dataset, entries, norm="linf", eps=0.06, eps_grid=[0.03, 0.06], batch_size=8,
                                 progress=False)  # fmt: skip
    out = report.as_dict()
    for a in out["attacks"].values():
        a.pop("seconds")
    out.pop("wall_time_s")
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, dataset = _problem()
        summary = _run(model, dataset)
        Path(out, f"rank{rank}.json").write_text(json.dumps(summary, default=str))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_gives_the_single_process_numbers(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = json.loads(json.dumps(_run(*_problem()), default=str))
    for rank in range(2):
        ddp = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert ddp == single
    assert single["samples"] == 50 and 0 < single["robust_accuracy_all_by_eps"]["0.03"] < 1


@pytest.mark.slow  # two CLI runs, one of them launching 2 processes: about a minute
def test_evaluate_subcommand_under_two_process_ddp_matches_one_process(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)
    args = [sys.executable, "-m", "advtrain", "evaluate", "--config", QUICKSTART, "--trainer.logger", "false",
            "--ckpt_path", str(path), "--arch", "small_cnn", "--suite", "quick", "--eps", "0.1", "--eps_grid",
            "[0.05, 0.1]", "--overrides", '{"pgd20": {"steps": 3}}', "--max_samples", "45", "--batch_size", "10",
            "--progress", "false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    reports = {}
    for name, extra in {"one": [], "ddp": ["--trainer.strategy", "ddp", "--trainer.devices", "2",
                                           "--trainer.accelerator", "cpu"]}.items():  # fmt: skip
        subprocess.run([*args, *extra, "--output", str(tmp_path / name)], cwd=tmp_path, env=env, check=True)
        report = json.loads((tmp_path / name / "report.json").read_text())
        report.pop("wall_time_s")
        for a in report["attacks"].values():
            a.pop("seconds")
        reports[name] = report
    assert reports["ddp"] == reports["one"] and reports["ddp"]["samples"] == 45
