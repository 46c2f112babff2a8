"""Interpretability scores (ASM, CAM, Grad-CAM, B(ν), IS(ν); seed 002 §6) and the adversarial-example galleries:
analytic ground truth on linear and GAP networks, the evaluation's bookkeeping, and the CLI end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import LinearNet, random_batch, run_advtrain
from torch import nn
from torch.utils.data import TensorDataset

from advtrain.attacks import create_attack
from advtrain.evaluation import SuiteEntry, build_suite, evaluate_robustness, write_report
from advtrain.evaluation.interpretability import (
    ActivationMaps,
    adversarial_saliency_map,
    boolean_map,
    check_percentiles,
    class_activation_map,
    find_gap_head,
    grad_cam,
    interpretability_score,
    interpretability_scores,
    percentile_thresholds,
)
from advtrain.models import create_model, list_models
from advtrain.models.wide_resnet import WideResNet

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


class GapNet(nn.Module):
    """conv → ReLU → conv → ReLU (the maps) → global average pooling → linear: a CAM network (Zhou et al. 2016)."""

    def __init__(self, channels: int = 1, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                                      nn.ReLU())  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():  # spread logits, so inputs get different classes and small steps change them
            self.fc.weight.normal_(0.0, 3.0)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(4.0 * (x - 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.maps(x)).flatten(1))


# ----------------------------------------------------------------------------------------------------------- ASM
@pytest.mark.parametrize("variant", ["pair", "all"])
def test_asm_is_the_hand_computed_forward_derivative_of_a_linear_model(variant):
    """Z = Wx + b: ∂Z_j/∂x = W_j, so eq. 61 is ASM[i] = W_t[i]·|W_s[i]| where W_t[i] ≥ 0 and W_s[i] ≤ 0, else 0
    (eq. 60: Σ_{j≠t} W_j in place of W_s)."""
    model = LinearNet(64, 5, seed=1).double().eval()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    targets, sources = torch.tensor([1, 2, 3, 4, 0, 1]), torch.tensor([0, 0, 1, 2, 3, 4])
    w = model.fc.weight.detach()
    other = w[sources] if variant == "pair" else w.sum(0) - w[targets]
    expected = torch.where((w[targets] < 0) | (other > 0), 0.0, w[targets] * other.abs()).view(6, 1, 8, 8)
    asm = adversarial_saliency_map(model, x, targets, sources, variant=variant)
    torch.testing.assert_close(asm, expected, rtol=0, atol=0)
    assert 0 < (asm > 0).float().mean() < 1  # both branches of the definition occur
    assert all(p.requires_grad for p in model.parameters()) and model.fc.weight.grad is None  # state left as found


def test_asm_batched_equals_one_sample_at_a_time_on_a_cnn():
    """The batched input gradient is each sample's own (eval mode: no BatchNorm coupling), checked in float64."""
    torch.manual_seed(0)
    model = create_model("small_cnn", width=4, hidden=16).double()
    model.train()  # the ASM runs in eval mode and restores the caller's mode
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    t, s = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 0])
    batched = adversarial_saliency_map(model, x, t, s)
    single = torch.cat([adversarial_saliency_map(model, x[i : i + 1], t[i : i + 1], s[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-14)
    assert model.training


def test_asm_rejects_bad_classes_and_variants():
    model = LinearNet(64, 5).eval()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="targets must lie in"):
        adversarial_saliency_map(model, x, torch.tensor([0, 5]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="one class per sample"):
        adversarial_saliency_map(model, x, torch.tensor([0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="variant must be one of"):
        adversarial_saliency_map(model, x, torch.tensor([0, 1]), torch.tensor([1, 0]), variant="jsma")


# ---------------------------------------------------------------------------------------------- B(ν) and IS(ν)
def test_percentiles_are_numpys_linear_percentiles():
    scores = torch.randn(3, 2, 5, 7, dtype=torch.float64)
    nu = [0, 30, 47.5, 90, 99.9]
    expected = np.stack([np.percentile(s.flatten().numpy(), nu) for s in scores], axis=1)
    np.testing.assert_allclose(percentile_thresholds(scores, nu).numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("channels", [3, 1])  # an ASM (per element) and a CAM (per pixel, for every channel)
def test_is_is_one_inside_the_boolean_map_and_zero_outside(channels):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, channels, 6, 6, generator=gen, dtype=torch.float64)
    nu = [30, 60, 90]
    masks = boolean_map(scores, nu)  # (P, B, c, H, W)
    assert masks.shape == (3, 4, channels, 6, 6)
    assert torch.allclose(masks.flatten(2).double().mean(2), torch.tensor([0.7, 0.4, 0.1]).double()[:, None], atol=0.03)
    for p in range(len(nu)):
        noise = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
        inside = interpretability_score(noise * masks[p], scores, nu)
        outside = interpretability_score(noise * ~masks[p], scores, nu)
        assert torch.equal(inside[:, p], torch.ones(4, dtype=torch.float64))
        assert torch.equal(outside[:, p], torch.zeros(4, dtype=torch.float64))
        # B(ν) shrinks as ν grows: δ inside B(ν_p) lies inside B of a smaller ν too
        assert torch.equal(inside[:, :p], torch.ones(4, p, dtype=torch.float64))
    assert torch.isnan(interpretability_score(torch.zeros(2, 3, 6, 6), scores[:2], nu)).all()


def test_bad_percentiles_are_refused_with_the_allowed_range():
    assert check_percentiles(None) == [30, 40, 50, 60, 70, 80, 90]
    assert check_percentiles([90, 30, 30]) == [30, 90]
    for bad in ([], [100], [-1], [50, 120]):
        with pytest.raises(ValueError, match=r"is_percentiles must be a non-empty list of percentiles in \[0, 100\)"):
            check_percentiles(bad)


# ------------------------------------------------------------------------------------------- CAM and Grad-CAM
def _gap_maps(model, x):
    """The maps each GAP network pools, computed by hand from its modules."""
    if isinstance(model, GapNet):
        return model.maps(x)
    if isinstance(model, WideResNet):
        return F.relu(model.bn(model.block3(model.block2(model.block1(model.layer_one(x))))))
    h = model.layer_one(x)
    return F.relu(model.bn(model.layer4(model.layer3(model.layer2(model.layer1(h))))))


@pytest.mark.parametrize("name", ["gapnet", "preact_resnet18", "wrn10_1"])
def test_cam_is_the_weighted_sum_of_the_last_feature_maps(name):
    """CAM_c = Σ_k w_ck f_k over the maps the head pools (for the pre-activation ResNets: ReLU(BN(...)), a functional
    ReLU found by the head search); its spatial mean plus the bias is the logit (Zhou et al. 2016, eq. 1–2)."""
    torch.manual_seed(0)
    model = {"gapnet": lambda: GapNet(3), "preact_resnet18": lambda: create_model("preact_resnet18"),
             "wrn10_1": lambda: WideResNet(depth=10, widen_factor=1)}[name]().double().eval()  # fmt: skip
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    classes = torch.tensor([0, 3, 4])
    head = find_gap_head(model, x)
    assert head is not None and head.relu == (name != "gapnet")
    with torch.no_grad():
        maps, logits = _gap_maps(model, x), model(x)
    weights = head.linear.weight.detach()[classes]
    expected = (weights[:, :, None, None] * maps).sum(1, keepdim=True)
    cam = class_activation_map(model, x, classes, upsample=False)
    torch.testing.assert_close(cam, expected, rtol=1e-12, atol=1e-12)
    bias = head.linear.bias.detach()[classes]
    torch.testing.assert_close(cam.mean((1, 2, 3)) + bias, logits.gather(1, classes[:, None])[:, 0])
    up = class_activation_map(model, x, classes)
    assert up.shape == (3, 1, 16, 16)
    torch.testing.assert_close(up, F.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False))


def test_grad_cam_is_relu_cam_over_the_map_size_on_a_gap_network():
    """On GAP + linear with the pooled maps as Grad-CAM's layer, α_k = w_ck/(h·w): Grad-CAM = ReLU(CAM)/(h·w), at the
    maps' resolution and after upsampling (ReLU first, as Selvaraju et al.); so B(ν) is the same wherever the ν-th
    percentile of the CAM is ≥ 0."""
    model = GapNet(1).double().eval()
    x = torch.rand(5, 1, 12, 12, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 3, 4])
    cam = class_activation_map(model, x, classes, upsample=False)
    size = cam.shape[2] * cam.shape[3]
    assert size > 1
    torch.testing.assert_close(grad_cam(model, x, classes, upsample=False), F.relu(cam) / size, rtol=1e-12, atol=1e-14)
    up = F.interpolate(F.relu(cam) / size, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(grad_cam(model, x, classes), up, rtol=1e-12, atol=1e-14)
    assert ActivationMaps(model).resolve(x) == "cam"
    assert ActivationMaps(model, method="grad_cam").resolve(x) == "grad_cam"


GAP_HEADS = {"preact_resnet18", "wide_resnet", "wrn28_4", "wrn28_10", "wrn34_10"}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_gets_cam_or_grad_cam(name):
    """Registered models with a GAP head get CAM, the others Grad-CAM (every architecture is covered)."""
    torch.manual_seed(0)
    mnist = name in ("small_cnn", "madry_lenet")
    model = create_model(name, **({} if mnist else {"in_channels": 3}))
    x = torch.rand(2, 1 if mnist else 3, 28 if mnist else 32, 28 if mnist else 32)
    maps = ActivationMaps(model)
    out = maps(x, torch.tensor([0, 1]))
    assert maps.method == ("cam" if name in GAP_HEADS else "grad_cam")
    assert out.shape == (2, 1, *x.shape[2:]) and torch.isfinite(out).all()


def test_a_network_without_feature_maps_has_no_activation_map():
    model = LinearNet(64, 5).eval()
    x = torch.rand(2, 1, 8, 8)
    assert ActivationMaps(model)(x, torch.tensor([0, 1])) is None
    with pytest.raises(ValueError, match="no global-average-pooling"):
        class_activation_map(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="method='cam' needs"):
        ActivationMaps(create_model("small_cnn"), method="cam").resolve(torch.rand(1, 1, 28, 28))


# ----------------------------------------------------------------------------------------- any attack's result
def test_interpretability_scores_of_an_attack_result():
    """Fooled samples get IS in [0, 1] from the ASM of their adversarial class and from the CAM of their true class;
    the others NaN. A targeted attack's targets are its ASM classes."""
    model = GapNet(1).eval()
    x = torch.rand(16, 1, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = create_attack("pgd", norm="linf", eps=0.5, steps=10, seed=0)(model, x, y)
    scores = interpretability_scores(model, x, result, y, percentiles=[30, 90])
    fooled = scores.fooled
    assert fooled.any() and scores.method == "cam"
    finite = scores.asm[fooled]
    assert torch.isfinite(finite).all() and (finite >= 0).all() and (finite <= 1).all()
    assert torch.isnan(scores.asm[~fooled]).all() and torch.isnan(scores.cam[~fooled]).all()
    i = int(fooled.nonzero()[0, 0])
    with torch.no_grad():
        adv_class = model(result.adv[i : i + 1]).argmax(1)
    asm = adversarial_saliency_map(model, x[i : i + 1], adv_class, y[i : i + 1])
    direct = interpretability_score((result.adv[i : i + 1] - x[i : i + 1]).float(), asm, [30, 90])
    torch.testing.assert_close(scores.asm[i], direct[0])
    assert int(scores.adv_class[i]) == int(adv_class)
    means = scores.mean()
    assert len(means["asm"]) == 2 and means["asm"][0] >= means["asm"][1]  # B(30) ⊇ B(90)


# ------------------------------------------------------------------------------------------------- evaluation
SUITE = [  # a one-step DeepFool fails on about half the samples, so BIM is credited with some too
    SuiteEntry("deepfool", "deepfool", {"steps": 1}, role="minimal"),
    SuiteEntry("bim", "bim", {"steps": 5}),
    SuiteEntry("fgsm", "fgsm", role="one_step"),
]


def _problem(n: int = 30):
    model = GapNet(1, classes=5).eval()
    x, _ = random_batch(n, (1, 12, 12), seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::7] = (y[::7] + 1) % 5  # a few misclassified samples: never attacked, never scored
    return model, TensorDataset(x, y)


def _evaluate(model, dataset, **kwargs):
    entries = build_suite(SUITE, norm="linf", eps=0.05, seed=0)
    options = {"eps_grid": [0.025, 0.05], "batch_size": 8, "progress": False, "interpretability": True,
               "is_percentiles": [30, 60, 90], "gallery_samples": 3, **kwargs}  # fmt: skip
    return evaluate_robustness(model, dataset, entries, norm="linf", eps=0.05, **options)


def _close(a: float, b: float) -> bool:
    """Equal to float rounding, NaN (an attack with no credited sample) equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def test_evaluation_scores_the_samples_each_attack_is_credited_with(tmp_path):
    model, dataset = _problem()
    report = _evaluate(model, dataset)
    data, summary = report.data, report.summary["interpretability"]
    assert summary["percentiles"] == [30, 60, 90] and summary["map"] == "cam" and summary["asm_variant"] == "pair"
    result = report.interpretability
    for a, name in enumerate(["deepfool", "bim", "fgsm"]):
        columns = 1 if name == "deepfool" else 2  # budgeted: a break at ε = 0.025 or at the main ε = 0.05
        credited = data["index"][data["fooled"][:, a, :columns].any(1)]
        assert torch.equal(result.scores[name]["index"], credited.sort().values)
        assert summary["attacks"][name]["samples"] == credited.numel()
        gallery = result.gallery[name]
        assert gallery == sorted(credited.tolist())[:3]  # the first samples it broke
        for i in gallery:
            item = result.examples[name][i]
            assert item.adv_class != item.label and item.cam.shape == (1, 12, 12)
            if name != "deepfool":  # budgeted points lie in the main ε-ball and the box
                assert float((item.adv - item.x).abs().max()) <= 0.05 + 1e-6
    assert summary["attacks"]["deepfool"]["samples"] > 0 and summary["attacks"]["bim"]["samples"] > 0
    assert result.comparison == sorted({i for g in result.gallery.values() for i in g})[:3]
    curve = summary["attacks"]["deepfool"]["asm"]
    assert list(curve) == ["30", "60", "90"] and curve["30"] >= curve["60"] >= curve["90"]
    scalars = report.scalars()
    assert {"robust/bim/is_asm@90", "robust/bim/is_cam_mean", "robust/deepfool/is_samples"} <= set(scalars)
    folder = write_report(report, tmp_path / "out")
    saved = json.loads((folder / "report.json").read_text())["interpretability"]
    assert saved["gallery_files"] == ["gallery_attacks.png", "gallery_deepfool.png", "gallery_bim.png",
                                      "gallery_fgsm.png"][: len(saved["gallery_files"])]  # fmt: skip
    assert all((folder / f).is_file() for f in saved["gallery_files"]) and len(saved["gallery_files"]) >= 3
    assert "## Interpretability (seed 002, §6)" in (folder / "report.md").read_text()


def test_fused_evaluation_gives_the_unfused_scores():
    """BIM and FGSM are deterministic: fused over the ε grid they find the same points, and the records credit the
    same samples, so the scores agree (to the float rounding of other batch compositions)."""
    model, dataset = _problem()
    plain, fused = (_evaluate(model, dataset, fuse=f).summary["interpretability"] for f in (False, True))
    for name in ("bim", "fgsm"):
        assert plain["attacks"][name]["samples"] == fused["attacks"][name]["samples"]
        for kind in ("asm", "cam"):
            for key, value in plain["attacks"][name][kind].items():
                assert _close(value, fused["attacks"][name][kind][key])


def test_the_wandb_logger_gets_the_galleries_as_images():
    from pytorch_lightning.loggers import WandbLogger

    from advtrain.callbacks.robust import log_report_to_wandb

    model, dataset = _problem(16)
    report = _evaluate(model, dataset)
    logger = mock.MagicMock(spec=WandbLogger)
    log_report_to_wandb(logger, report, "robust", step=7)
    keys = {c.args[0]: c for c in logger.log_image.call_args_list}
    assert {"robust/gallery/attacks", "robust/gallery/deepfool"} <= set(keys)
    image = keys["robust/gallery/attacks"].args[1][0]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    assert keys["robust/gallery/attacks"].kwargs["step"] == 7


def test_the_callback_logs_is_scalars(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from advtrain.callbacks import RobustEvaluation
    from advtrain.data import MNIST5kDataModule
    from advtrain.training import AdversarialTraining

    with pytest.raises(ValueError, match="is_percentiles"):
        RobustEvaluation(interpretability=True, is_percentiles=[101])
    callback = RobustEvaluation(suite="quick", norm="linf", eps=0.3, num_samples=40, batch_size=20,
                                overrides={"pgd20": {"steps": 5}}, interpretability=True,
                                is_percentiles=[50, 90])  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=CSVLogger(tmp_path),
                         callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    module = AdversarialTraining(arch_kwargs={"width": 8, "hidden": 32})
    module.model.load_state_dict(_briefly_trained_small_cnn().state_dict())  # an untrained one is never fooled
    trainer.validate(module, datamodule=MNIST5kDataModule(batch_size=12, num_workers=0))
    logged = set(callback.history[-1])
    assert {"robust/pgd20/is_asm@50", "robust/pgd20/is_asm@90", "robust/pgd20/is_cam_mean"} <= logged
    summary = callback.last_report.summary["interpretability"]
    assert summary["attacks"]["pgd20"]["samples"] > 0 and summary["map"] == "grad_cam"  # SmallCNN: no GAP head


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        summary = _evaluate(*_problem()).summary["interpretability"]
        Path(out, f"rank{rank}.json").write_text(json.dumps(summary))  # NaN as JSON's NaN, read back as nan
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_gives_the_single_process_scores(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = _evaluate(*_problem()).summary["interpretability"]
    for rank in range(2):
        ddp = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert ddp["gallery_indices"] == single["gallery_indices"]
        for name, entry in single["attacks"].items():
            assert ddp["attacks"][name]["samples"] == entry["samples"]
            for kind in ("asm", "cam"):
                for key, value in entry[kind].items():
                    assert _close(ddp["attacks"][name][kind][key], value if value is not None else math.nan)


# ----------------------------------------------------------------------------------------------------------- CLI
def _briefly_trained_small_cnn() -> nn.Module:
    """A narrow SmallCNN after 20 Adam steps on the embedded digits (about 1 s): most digits right and attackable
    (an untrained one has nearly constant logits that no small attack moves)."""
    from advtrain.data import MNIST5kDataModule

    torch.manual_seed(0)
    net = create_model("small_cnn", width=8, hidden=32)
    dm = MNIST5kDataModule(batch_size=64, num_workers=0)
    dm.setup("fit")
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step, (x, y, _) in enumerate(dm.train_dataloader()):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        if step == 20:
            break
    return net.eval()


def test_evaluate_command_writes_is_fields_and_gallery_pngs(tmp_path):
    """``python -m advtrain evaluate ... --interpretability true`` as a user runs it, on a plain state dict of a
    SmallCNN trained for a few steps (so that some digits are classified correctly and get attacked)."""
    from matplotlib.image import imread

    path = tmp_path / "plain.pt"
    torch.save(_briefly_trained_small_cnn().state_dict(), path)
    out = tmp_path / "eval"
    done = run_advtrain(
        "evaluate", "--config", QUICKSTART, "--trainer.logger", "false", "--ckpt_path", path, "--arch", "small_cnn",
        "--arch_kwargs", '{"width": 8, "hidden": 32}', "--suite", "quick", "--overrides",
        '{"pgd20": {"steps": 3}}', "--max_samples", "24", "--batch_size", "12", "--output", out, "--progress", "false",
        "--interpretability", "true", "--is_percentiles", "[30,50,70,90]", "--gallery_samples", "2", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    interp = report["interpretability"]
    assert interp["percentiles"] == [30, 50, 70, 90] and interp["map"] == "grad_cam"
    entry = interp["attacks"]["pgd20"]
    assert entry["samples"] > 0 and set(entry["asm"]) == {"30", "50", "70", "90"}
    assert all(0 <= v <= 1 for v in [*entry["asm"].values(), *entry["cam"].values()])
    assert interp["gallery_files"] == ["gallery_attacks.png", "gallery_pgd20.png"]
    for name in interp["gallery_files"]:
        image = imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] >= 400 and image.std() > 0  # two images across at least
    assert "IS_ASM(90)" in (out / "report.md").read_text()


@pytest.mark.parametrize(("flag", "value"), [("--is_percentiles", "[30, 100]"), ("--gallery_samples", "-1")])
def test_evaluate_refuses_bad_interpretability_options_in_one_line(tmp_path, monkeypatch, caplog, flag, value):
    from advtrain.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "plain.pt"
    torch.save(create_model("small_cnn", width=8, hidden=32).state_dict(), path)
    args = ["evaluate", "--config", QUICKSTART, "--trainer.logger", "false", "--ckpt_path", str(path), "--arch",
            "small_cnn", "--arch_kwargs", '{"width": 8, "hidden": 32}', "--suite", "quick", "--max_samples", "4",
            "--progress", "false", "--interpretability", "true", flag, value]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert flag.removeprefix("--") in caplog.text and not (tmp_path / "plain-eval" / "report.json").exists()
