"""The RobustBench bridge: leaderboard models built by the ``robustbench`` package from local files in RobustBench's
own layout give the logits of ``robustbench.utils.load_model`` on the same file (Python and ``python -m advtrain
evaluate --robustbench``); RobustBench's WideResNet layout loads into advtrain's ``wide_resnet``; plain state dicts
load without ``mean``/``std``; bad input is one line (exit 2). Tests that build RobustBench models are skipped without
the package; the weights are random (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, random_batch, run_advtrain, sitecustomize_env

from advtrain.errors import UserError
from advtrain.models import WideResNet, create_model, load_robustbench
from advtrain.models.build import load_classifier_weights
from advtrain.models.robustbench import (
    RobustBenchEntry,
    RobustBenchError,
    RobustBenchMissingError,
    default_eps,
    robustbench_entry,
    robustbench_layout,
    robustbench_wrn_state_dict,
    threat_model_name,
)
from advtrain.threat.norms import Norm
from advtrain.training.checkpoint import CheckpointError

HAVE_ROBUSTBENCH = importlib.util.find_spec("robustbench") is not None
needs_robustbench = pytest.mark.skipif(not HAVE_ROBUSTBENCH, reason="robustbench is not installed")


def _zoo_model(dataset: str, threat: str, name: str) -> torch.nn.Module:
    """A fresh model of the zoo, built by robustbench, with randomised weights and BatchNorm statistics (so that a
    misplaced tensor changes the logits), in eval mode."""
    from advtrain.models.robustbench import _zoo_models

    torch.manual_seed(0)
    model = _zoo_models(dataset, threat)[name]["model"]()
    _randomise(model)
    return model.eval()


def _randomise(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            last = key.rsplit(".", 1)[-1]
            if not value.is_floating_point() or last in ("mu", "sigma", "mean", "std"):
                continue
            if last == "running_var":
                value.copy_(0.5 + torch.rand(value.shape, generator=gen))
            else:
                value.add_(0.05 * torch.randn(value.shape, generator=gen))


def _save(model: torch.nn.Module, root: Path, dataset: str, threat: str, name: str, wrapping: str) -> Path:
    """Writes the model's state dict at RobustBench's place ``<root>/<dataset>/<threat>/<name>.pt``, wrapped as the
    leaderboard's files are: ``plain``; ``no-normalisation`` (plain, without the ``mu``/``sigma`` buffers the
    constructor sets, as Wong2020Fast's file); ``state_dict+module`` (DataParallel's prefix inside a ``state_dict``
    entry, as Carmon2019Unlabeled's); ``model`` (a ``model.`` prefix, as Chen2020Efficient's)."""
    state = model.state_dict()
    if wrapping == "no-normalisation":
        state = {k: v for k, v in state.items() if k not in ("mu", "sigma")}
        assert len(state) < len(model.state_dict())
    elif wrapping == "state_dict+module":
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 100}
    elif wrapping == "model":
        state = {f"model.{k}": v for k, v in state.items()}
    path = root / dataset / threat / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _robustbench_load_model():
    """``robustbench.utils.load_model`` (robustbench 1.1.1's package ``__init__`` needs ``pkg_resources`` and
    ``autoattack``, which this environment may lack; see :mod:`advtrain.models.robustbench`)."""
    from advtrain.models.robustbench import bare_robustbench_package

    with bare_robustbench_package():
        from robustbench.utils import load_model
    return load_model


@needs_robustbench
def test_importing_the_model_zoo_leaves_robustbench_as_it_was():
    from advtrain.models import robustbench as bridge

    before = {name: sys.modules.get(name) for name in ("robustbench", "pkg_resources")}
    bridge._ZOO = None
    assert bridge._model_zoo()
    assert {name: sys.modules.get(name) for name in ("robustbench", "pkg_resources")} == before


ENTRIES = [
    # PreActResNet-18 with mu/sigma buffers that the file lacks (RobustBench loads it non-strictly).
    pytest.param("cifar10", "Linf", "Wong2020Fast", "no-normalisation", id="Wong2020Fast-PreActResNet18"),
    # The WRN layout (conv1, block1.layer.N, convShortcut, fc), WRN-28-4 with a per-image normalisation inside.
    pytest.param("cifar10", "Linf", "Ding2020MMA", "state_dict+module", id="Ding2020MMA-WRN28-4"),
    # DeepMind's PreActResNet-18 (Swish) with a normalisation layer inside (mean/std as plain attributes).
    pytest.param("cifar10", "Linf", "Rebuffi2021Fixing_R18_ddpm", "model", id="Rebuffi2021Fixing_R18_ddpm"),
    # An L2 entry, its file holding its normalisation buffers.
    pytest.param("cifar10", "L2", "Rice2020Overfitting", "plain", id="L2-Rice2020Overfitting"),
    pytest.param("cifar100", "Linf", "Rebuffi2021Fixing_R18_ddpm", "state_dict+module", id="cifar100-Rebuffi-R18"),
    # WRN-28-10 with the TRADES-era sub_block1 (a 150 MB file; about 4 s here on one core).
    pytest.param("cifar10", "Linf", "Carmon2019Unlabeled", "state_dict+module", id="Carmon2019Unlabeled-WRN28-10"),
]


@needs_robustbench
@pytest.mark.parametrize(("dataset", "threat", "name", "wrapping"), ENTRIES)
def test_load_robustbench_gives_robustbenchs_own_logits(tmp_path, dataset, threat, name, wrapping):
    source = _zoo_model(dataset, threat, name)
    path = _save(source, tmp_path / "models", dataset, threat, name, wrapping)
    ours = load_robustbench(name, path)  # dataset and threat model from RobustBench's file layout
    theirs = _robustbench_load_model()(name, model_dir=tmp_path / "models", dataset=dataset, threat_model=threat)
    assert not ours.training and type(ours) is type(source)
    x, _ = random_batch(3, (3, 32, 32), seed=2)
    with torch.no_grad():
        logits = ours(x)
        # The same architecture class and the same weights on the same inputs in one process: the same kernels, so
        # the logits are equal to the bit.
        torch.testing.assert_close(logits, theirs.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(logits, source(x), rtol=0, atol=0)  # the file's weights, not a fresh init
    assert logits.shape == (3, 100 if dataset == "cifar100" else 10)


@needs_robustbench
def test_the_dataset_and_threat_model_can_be_named_instead_of_the_layout(tmp_path):
    source = _zoo_model("cifar10", "L2", "Rice2020Overfitting")
    path = tmp_path / "anywhere.pt"
    torch.save(source.state_dict(), path)
    model = load_robustbench("Rice2020Overfitting", path, dataset="cifar10", threat_model="l2")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    # Without the layout or the names: CIFAR-10 L∞ (whose Rice2020Overfitting is another architecture, a WRN-34-20).
    assert robustbench_entry("Rice2020Overfitting", path) == RobustBenchEntry("Rice2020Overfitting", "cifar10", "Linf")


def test_robustbench_names_and_budgets():
    assert [threat_model_name(n) for n in ("linf", "LINF", "Linf", "inf", "l2", "L2", "L1")] == [
        "Linf", "Linf", "Linf", "Linf", "L2", "L2", "L1"]  # fmt: skip
    with pytest.raises(RobustBenchError, match="allowed: Linf, L2, L1"):
        threat_model_name("l0")
    assert default_eps("cifar10", "Linf") == 8 / 255 and default_eps("cifar100", "linf") == 8 / 255
    assert default_eps("cifar10", "L2") == 0.5 and default_eps("cifar10", "l1") == 12.0
    assert default_eps("imagenet", "Linf") == 4 / 255
    with pytest.raises(RobustBenchError, match="no imagenet/L2 leaderboard"):
        default_eps("imagenet", "L2")
    assert robustbench_layout("models/cifar10/Linf/Standard.pt") == ("cifar10", "Linf")
    assert robustbench_layout("m/cifar100/l2/x.pt") == ("cifar100", "L2")
    assert robustbench_layout("weights/Standard.pt") == (None, None)
    assert robustbench_layout("cifar10/other/x.pt") == (None, None)


@needs_robustbench
def test_unknown_names_and_unsupported_entries_are_one_clear_error():
    with pytest.raises(RobustBenchError, match=r"Unknown RobustBench model 'Wong2020Fst' for cifar10/Linf.*: Wong"):
        robustbench_entry("Wong2020Fst")
    # A name of another threat model says where it is.
    with pytest.raises(RobustBenchError, match=r"Augustin2020Adversarial exists under cifar10/L2"):
        robustbench_entry("Augustin2020Adversarial", threat_model="Linf")
    with pytest.raises(RobustBenchError, match="ensemble stored as 3 files"):
        robustbench_entry("Chen2020Adversarial")
    with pytest.raises(RobustBenchError, match="no cifar10/L1 models"):
        robustbench_entry("Standard", threat_model="L1")


@needs_robustbench
def test_a_file_that_does_not_fit_names_the_keys(tmp_path):
    source = _zoo_model("cifar10", "Linf", "Wong2020Fast")
    state = {k: v for k, v in source.state_dict().items() if k != "linear.weight"}
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "Wong2020Fast.pt"
    torch.save(state, path)
    with pytest.raises(RobustBenchError, match=r"1 missing \(e.g. linear.weight\), 1 unexpected keys \(e.g. extra"):
        load_robustbench("Wong2020Fast", path)
    state = dict(source.state_dict(), **{"linear.weight": torch.zeros(3, 512)})
    torch.save(state, path)
    with pytest.raises(RobustBenchError, match="size mismatch for linear.weight"):
        load_robustbench("Wong2020Fast", path)
    torch.save({"net": source.state_dict(), "x": torch.nn.Linear(2, 2)}, path)  # a pickled module: code to run
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        load_robustbench("Wong2020Fast", path)


def test_an_entry_that_downloads_while_building_is_refused(monkeypatch, tmp_path):
    """A constructor that fetches pretrained weights (ImageNet's Standard_R50: ``resnet50(pretrained=True)``) meets a
    refused connection and the entry is refused; nothing leaves the machine (192.0.2.1 is TEST-NET-1)."""
    import socket

    from advtrain.models import robustbench as bridge

    def downloading_builder():
        with socket.create_connection(("192.0.2.1", 443), timeout=1):
            raise AssertionError("the connection must be refused before it is made")

    entries = {"Downloads": {"model": downloading_builder, "gdrive_id": "x"}}
    monkeypatch.setattr(bridge, "_zoo_models", lambda dataset, threat: entries)
    path = tmp_path / "Downloads.pt"
    torch.save({}, path)
    with pytest.raises(RobustBenchError, match=r"by downloading pretrained weights \(192.0.2.1\).*never downloads"):
        load_robustbench("Downloads", path)
    # Local connections (a W&B service, a debugger) still work while an architecture is built.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def local_builder():
        socket.create_connection(server.getsockname(), timeout=1).close()
        return torch.nn.Linear(1, 1)

    entries["Local"] = {"model": local_builder, "gdrive_id": "x"}
    torch.save(torch.nn.Linear(1, 1).state_dict(), tmp_path / "Local.pt")
    assert isinstance(load_robustbench("Local", tmp_path / "Local.pt"), torch.nn.Linear)
    server.close()


def test_without_robustbench_the_message_says_what_to_install(monkeypatch):
    from advtrain.models import robustbench as bridge

    monkeypatch.setattr(bridge, "_ZOO", None)
    monkeypatch.setitem(sys.modules, "robustbench", None)  # import robustbench -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "robustbench.model_zoo", raising=False)
    with pytest.raises(RobustBenchMissingError, match=r"pip install 'advtrain\[robustbench\]'") as caught:
        robustbench_entry("Standard")
    assert isinstance(caught.value, UserError)


# ----------------------------------------------------------------------------------------------- advtrain's own


def test_a_plain_state_dict_without_mean_and_std_takes_the_datasets_normalisation(tmp_path):
    cifar = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
    torch.manual_seed(0)
    trained = create_model("preact_resnet18", num_classes=10, **cifar).eval()
    _randomise(trained)
    path = tmp_path / "plain.pt"
    torch.save({k: v for k, v in trained.state_dict().items() if k not in ("mean", "std")}, path)
    torch.manual_seed(1)
    fresh = create_model("preact_resnet18", num_classes=10, **cifar)
    load_classifier_weights(fresh, str(path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), trained(x), rtol=0, atol=0)
    # Another missing key is still refused.
    torch.save({k: v for k, v in trained.state_dict().items() if k not in ("mean", "linear.bias")}, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. linear.bias\)"):
        load_classifier_weights(fresh, str(path))


@needs_robustbench
def test_robustbench_wide_resnet_layout_loads_into_advtrains_wide_resnet(tmp_path):
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet as RobustBenchWRN

    torch.manual_seed(0)
    theirs = RobustBenchWRN(depth=16, widen_factor=2, sub_block1=True)  # convShortcut in every group's first block
    _randomise(theirs)
    state = theirs.state_dict()
    assert any(k.startswith("sub_block1.") for k in state) and any("convShortcut" in k for k in state)
    path = tmp_path / "rb-wrn.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    ours = WideResNet(depth=16, widen_factor=2)  # no mean/std: RobustBench's WideResNet has no normalisation
    load_classifier_weights(ours, str(path))
    x, _ = random_batch(3, (3, 32, 32), seed=3, dtype=torch.float64)
    with torch.no_grad():
        # The same function; only the pooling's summation order differs (8x8 average pooling against global average
        # pooling), so in float64 the logits agree to rounding (~1e-16 relative).
        torch.testing.assert_close(ours.double().eval()(x), theirs.double().eval()(x), rtol=1e-12, atol=1e-12)
    # A WRN of another depth does not fit after the map: the usual error, naming the original keys.
    with pytest.raises(CheckpointError, match="do not fit the WideResNet model"):
        load_classifier_weights(WideResNet(depth=22, widen_factor=2), str(path))


def test_the_wide_resnet_key_map():
    state = {"conv1.weight": 1, "block1.layer.0.bn1.weight": 2, "block1.layer.0.convShortcut.weight": 3,
             "block3.layer.3.conv2.weight": 4, "sub_block1.layer.0.bn1.weight": 5, "bn1.running_mean": 6,
             "fc.weight": 7, "fc.bias": 8, "mean": 9}  # fmt: skip
    assert robustbench_wrn_state_dict(state) == {
        "first.weight": 1, "block1.0.bn1.weight": 2, "block1.0.shortcut.weight": 3, "block3.3.conv2.weight": 4,
        "bn.running_mean": 6, "linear.weight": 7, "linear.bias": 8, "mean": 9}  # fmt: skip
    assert robustbench_wrn_state_dict({"first.weight": 1, "block1.0.bn1.weight": 2}) is None


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize(("given", "stored"), [("Linf", "linf"), ("L2", "l2"), ("LINF", "linf"), ("l2", "l2")])
def test_threat_norm_takes_robustbench_names(given, stored):
    from advtrain.cli import build_cli

    args = ["--config", ROOT / "recipes" / "quickstart.yaml", "--trainer.logger", "false", "--threat.norm", given]
    cli = build_cli([str(a) for a in args], run=False)
    # Stored in advtrain's spelling, so ${threat.norm} fits the components' Literal["linf", "l2"] norms.
    assert cli.config.threat.norm == stored
    assert Norm.parse(cli.model.val_attack.norm) is Norm.parse(cli.model.maximizer.norm) is Norm(stored)


def test_threat_norm_refuses_an_unknown_name_listing_the_allowed_ones(capsys):
    from advtrain.cli import build_cli

    with pytest.raises(SystemExit) as caught:
        build_cli(["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--threat.norm", "l3"], run=False)
    assert caught.value.code == 2 and "allowed: linf, l2, l1" in capsys.readouterr().err


def fake_cifar10_for(root: Path, labels_from: torch.nn.Module | None = None, n: int = 8) -> dict[str, str]:
    """Fake CIFAR-10 files under ``root/data`` (test labels: ``labels_from``'s predictions on the images in [0, 1],
    else random); returns the ``env`` that makes a subprocess's torchvision accept their checksums."""
    from fake_datasets import checksums_sitecustomize, write_fake_cifar10

    fake = write_fake_cifar10(root / "data", n_train=10, n_test=n, seed=4)
    if labels_from is not None:
        with torch.no_grad():
            labels = labels_from(torch.from_numpy(fake.test_images).float() / 255).argmax(1)
        batch = fake.folder / "test_batch"
        content = pickle.loads(batch.read_bytes())
        batch.write_bytes(pickle.dumps({**content, "labels": labels.tolist()}, protocol=2))
        md5 = {**fake.md5, "test_batch": hashlib.md5(batch.read_bytes(), usedforsecurity=False).hexdigest()}
        fake = dataclasses.replace(fake, test_labels=labels.numpy(), md5=md5)
    return sitecustomize_env(root / "site", checksums_sitecustomize(fake))


#: Test-sized evaluation: a few samples, two PGD steps, no logger, no plots.
SMALL = ["--data.init_args.root", "data", "--data.init_args.download", "false", "--data.init_args.num_workers", "0",
         "--trainer.logger", "false", "--progress", "false", "--plots", "false", "--max_samples", "6",
         "--suite", "quick", "--overrides", '{"pgd20": {"steps": 2}}']  # fmt: skip


@needs_robustbench
def test_cli_evaluates_a_robustbench_file_and_reports_what_a_leaderboard_entry_carries(tmp_path):
    from fake_datasets import write_fake_cifar10

    source = _zoo_model("cifar10", "L2", "Rice2020Overfitting")
    x = torch.from_numpy(write_fake_cifar10(tmp_path / "x", n_train=10, n_test=8, seed=4).test_images).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    with torch.no_grad():
        # Random weights predict one class for every image; centring the logits over the images spreads them.
        source.linear.bias -= source(x).mean(0)
        # Precondition that makes the accuracy check below discriminative: normalising the [0, 1] images once more
        # (a datamodule normalising on top of the model) would change some predictions.
        assert (source(x[:6]).argmax(1) != source((x[:6] - mean) / std).argmax(1)).any()
    path = _save(source, tmp_path / "models", "cifar10", "L2", "Rice2020Overfitting", "state_dict+module")
    env = fake_cifar10_for(tmp_path, labels_from=source)
    done = run_advtrain("evaluate", "--robustbench", "Rice2020Overfitting", "--ckpt_path", path.relative_to(tmp_path),
                        "--norm", "L2", "--output", "out", *SMALL, cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # The labels are the model's own predictions on [0, 1] inputs: CIFAR-10 by default, the file's weights, and no
    # normalisation added by the data pipeline.
    assert report["clean_accuracy"] == 1.0 and report["dataset"] == "CIFAR10DataModule"
    assert report["robustbench"] == {"model": "Rice2020Overfitting", "dataset": "cifar10", "threat_model": "L2",
                                     "version": report["versions"]["robustbench"]}  # fmt: skip
    assert report["threat_model"] == "L2" and report["norm"] == "l2" and report["eps"] == 0.5
    assert report["eps_fraction"] is None  # 0.5 is not k/255
    assert report["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["sample_selection"] == {"split": "test", "first": 0, "count": 6, "contiguous": True,
                                          "sha256": hashlib.sha256(b"0,1,2,3,4,5").hexdigest()}  # fmt: skip
    assert report["seed"] == 0 and report["suite"] == "quick" and report["device"] == "cpu"
    assert report["attacks"]["pgd20"]["config"].startswith("PGD(") and "steps=2" in report["attacks"]["pgd20"]["config"]
    assert set(report["versions"]) >= {"advtrain", "torch", "python", "robustbench"}
    header = (tmp_path / "out" / "report.md").read_text().split("## Robust accuracy per ε")[0]
    for needle in ("RobustBench `Rice2020Overfitting` (cifar10, L2", report["checkpoint_sha256"], "positions 0–5",
                   "L2, ε = 0.5", "suite quick: pgd20; seed 0", "clean accuracy | 100.00%"):  # fmt: skip
        assert needle in header, header


def _one_line_error(done, *needles: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("[advtrain]")]
    assert all(needle in errors[-1] for needle in needles), done.stderr[-3000:]


@pytest.mark.parametrize("case", ["not installed", "unknown name", "misfit file"])
def test_cli_bad_robustbench_input_is_one_line(tmp_path, case):
    if case != "not installed" and not HAVE_ROBUSTBENCH:
        pytest.skip("robustbench is not installed")
    path = tmp_path / "models" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(1)}, path)  # a file of another architecture
    env = None
    name = "Wong2020Fast"
    needles = ["do not fit RobustBench's Wong2020Fast", "missing (e.g. conv1.weight), 1 unexpected keys (e.g. fc"]
    if case == "not installed":  # as if robustbench were absent, whether or not it is installed here
        env = sitecustomize_env(tmp_path / "site", "import sys\nsys.modules['robustbench'] = None\n")
        needles = ["pip install 'advtrain[robustbench]'"]
    elif case == "unknown name":
        name, needles = "Wong2020Fst", ["Unknown RobustBench model 'Wong2020Fst' for cifar10/Linf", "Wong2020Fast"]
    done = run_advtrain("evaluate", "--robustbench", name, "--ckpt_path", path, "--trainer.logger", "false",
                        cwd=tmp_path, env=env)  # fmt: skip
    _one_line_error(done, *needles)
