"""What a report carries besides its numbers, so that two evaluations can be compared and one reproduced: ε as a number
and as k/255, the threat model in RobustBench's spelling, which samples, the seed, every attack's configuration, the
versions, the device, the checkpoint's SHA-256 (``report.json`` and the header of ``report.md``); and
:func:`compare_reports`."""

from __future__ import annotations

import hashlib
import json
import platform

import pytest
import torch
from helpers import linear_problem
from torch.utils.data import TensorDataset

from advtrain.evaluation import SuiteEntry, build_suite, compare_reports, evaluate_robustness, write_report
from advtrain.evaluation.report import eps_fraction, file_sha256, run_metadata, sample_selection


def test_eps_fraction_names_pixel_levels_only():
    assert [eps_fraction(k / 255) for k in (1, 4, 8, 16, 128)] == ["1/255", "4/255", "8/255", "16/255", "128/255"]
    assert [eps_fraction(e) for e in (0.0, 0.03, 0.3, 0.5, 1.0, 12.0)] == [None] * 6
    assert eps_fraction(0.031372549) == "8/255"  # 8/255 written with 9 digits (1e-8 of a level off)


def test_sample_selection_says_which_samples():
    first = sample_selection(torch.tensor([2, 0, 1, 3]), "test")  # gathered in any order
    assert first == {"split": "test", "first": 0, "count": 4, "contiguous": True,
                     "sha256": hashlib.sha256(b"0,1,2,3").hexdigest()}  # fmt: skip
    picked = sample_selection(torch.tensor([7, 3, 10]))
    assert picked["first"] == 3 and not picked["contiguous"]
    assert picked["sha256"] == hashlib.sha256(b"3,7,10").hexdigest()


def _report(folder, n, *, steps=5, eps=8 / 255):
    """A PGD evaluation of the linear problem's first ``n`` samples, with the metadata the CLI records."""
    model, x, y, _ = linear_problem(n=40, dim=64)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    toy = {"model": "Toy", "dataset": "cifar10", "threat_model": "Linf", "version": "1"}
    meta = run_metadata(checkpoint=weights, split="test", dataset="Linear", device="cpu", suite="custom", seed=0,
                        robustbench=toy)  # fmt: skip
    entries = build_suite([SuiteEntry("pgd", "pgd", {"steps": steps})], norm="Linf", eps=eps, seed=0)
    report = evaluate_robustness(model.eval(), TensorDataset(x.view(40, 1, 8, 8), y), entries, norm="Linf", eps=eps,
                                 batch_size=16, max_samples=n, progress=False, seed=0, meta=meta)  # fmt: skip
    return report, meta, weights


def test_report_json_and_md_carry_what_a_leaderboard_entry_needs(tmp_path):
    report, meta, weights = _report(tmp_path, 20)
    folder = write_report(report, tmp_path / "out", meta, plots=False)
    data = json.loads((folder / "report.json").read_text())
    assert data["eps"] == 8 / 255 and data["eps_fraction"] == "8/255"
    assert data["norm"] == "linf" and data["threat_model"] == "Linf"
    digest = hashlib.sha256(",".join(map(str, range(20))).encode()).hexdigest()
    assert data["sample_selection"] == {"split": "test", "first": 0, "count": 20, "contiguous": True, "sha256": digest}
    assert data["seed"] == 0 and data["suite"] == "custom" and data["samples"] == 20
    assert data["attacks"]["pgd"]["config"].startswith("PGD(") and "steps=5" in data["attacks"]["pgd"]["config"]
    assert data["checkpoint"] == str(weights)
    assert data["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert data["device"] == "cpu" and data["device_name"] == (platform.processor() or platform.machine() or "cpu")
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["python"] == platform.python_version()
    assert data["robustbench"]["model"] == "Toy"
    text = (folder / "report.md").read_text()
    header = text.split("## Robust accuracy per ε")[0]
    for needle in ("| model | RobustBench `Toy` (cifar10, Linf; robustbench 1) |", data["checkpoint_sha256"],
                   "20 of Linear, test split: positions 0–19", "| threat model | Linf, ε = 0.0313725 (8/255) |",
                   "suite custom: pgd; seed 0", f"torch {torch.__version__}", "| device | cpu ("):  # fmt: skip
        assert needle in header, header


def test_file_sha256_is_sha256sum(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (3 << 20))  # three 1 MiB chunks
    assert file_sha256(path) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_compare_reports_separates_setup_environment_and_results(tmp_path):
    first, _, _ = _report(tmp_path / "a", 20)
    same = compare_reports(first.as_dict(), json.loads(json.dumps(first.as_dict())))
    assert same["same_setup"] and not same["setup"] and not same["environment"]
    assert same["results"]["robust_accuracy_all"][2] == 0
    other, _, _ = _report(tmp_path / "b", 30, steps=1)
    write_report(other, tmp_path / "b" / "out", plots=False)
    diff = compare_reports(first.as_dict(), tmp_path / "b" / "out" / "report.json")  # a dict and a file
    assert not diff["same_setup"]
    assert set(diff["setup"]) == {"sample_selection", "attacks.pgd"}  # the same weights: the same SHA-256
    assert "steps=5" in diff["setup"]["attacks.pgd"][0] and "steps=1" in diff["setup"]["attacks.pgd"][1]
    a, b, delta = diff["results"]["clean_accuracy"]
    assert delta == pytest.approx(b - a)
