"""The AutoAttack suites: the same attacks, budgets, restarts and target counts as the official code, ``standard``
meaning AutoAttack's standard version, ``full`` a strict superset, and robust accuracy no higher than the official
AutoAttack's on the same model and samples."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import linear_problem, run_cli
from test_inputs import TINY

from advtrain.evaluation import build_suite, evaluate_robustness
from advtrain.evaluation.suites import SUITES, suite_note


def _config(entries):
    return {e.name: e.attack for e in entries}


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5), ("l1", 12.0)])
def test_autoattack_suite_is_configured_as_the_official_code(norm, eps):
    attacks = _config(build_suite("autoattack", norm=norm, eps=eps, seed=0))
    assert list(attacks) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    ce, t, fab, square = attacks.values()
    assert (ce.loss, ce.steps, ce.restarts, ce.eps) == ("ce", 100, 5 if norm == "l1" else 1, eps)
    assert (t.loss, t.steps, t.restarts, t.n_target_classes) == ("dlr-targeted", 100, 1, 5 if norm == "l1" else 9)
    assert ce.use_largereps == t.use_largereps == (norm == "l1")
    assert (fab.steps, fab.restarts, fab.n_target_classes, fab.eps) == (100, 1, 9, eps)
    assert (square.steps, square.p_init, square.restarts, square.rescale_schedule) == (5000, 0.8, 1, False)
    assert {a.norm for a in attacks.values()} == {norm}


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_autoattack_suite_matches_the_official_objects(norm):
    """The official AutoAttack's attack objects, as its ``standard`` version configures them, against the suite."""
    pyautoattack = pytest.importorskip("pyautoattack")
    official = pyautoattack.AutoAttack(torch.nn.Identity(), norm=norm, eps=0.5, version="standard", device="cpu")
    ours = _config(build_suite("autoattack", norm=norm, eps=0.5, seed=0))
    assert official.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"] == list(ours)
    assert (official.apgd.n_iter, official.apgd.n_restarts) == (ours["apgd-ce"].steps, ours["apgd-ce"].restarts)
    assert official.apgd.use_largereps == ours["apgd-ce"].use_largereps
    assert official.apgd.thr_decr == ours["apgd-ce"].rho
    t = official.apgd_targeted
    assert (t.n_iter, t.n_restarts, t.n_target_classes) == (ours["apgd-t"].steps, ours["apgd-t"].restarts,
                                                             ours["apgd-t"].n_target_classes)  # fmt: skip
    assert t.use_largereps == ours["apgd-t"].use_largereps
    assert (official.fab.n_iter, official.fab.n_target_classes) == (ours["fab-t"].steps, ours["fab-t"].n_target_classes)
    sq = official.square
    assert (sq.n_queries, sq.p_init, sq.n_restarts, sq.rescale_schedule) == (
        ours["square"].steps, ours["square"].p_init, ours["square"].restarts, ours["square"].rescale_schedule
    )  # fmt: skip


def test_standard_is_autoattack_and_apgd_is_the_old_standard():
    assert (
        _config(build_suite("standard", norm="linf", eps=0.1)).keys()
        == _config(build_suite("autoattack", norm="linf", eps=0.1)).keys()
    )
    assert [e.label for e in SUITES["apgd"]] == ["apgd-ce", "apgd-dlr"]
    assert "AutoAttack, standard version" in suite_note("standard") and suite_note("standard").startswith("standard =")
    assert "weaker than AutoAttack" in suite_note("apgd")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_full_is_a_strict_superset_of_autoattack(norm):
    """Every attack of ``autoattack`` is in ``full`` with at least its budget, and ``full`` has more."""
    auto = build_suite("autoattack", norm=norm, eps=0.1, seed=0)
    full = {e.name: e for e in build_suite("full", norm=norm, eps=0.1, seed=0)}
    for entry in auto:
        mine = full[entry.name].attack
        assert type(mine) is type(entry.attack)
        for key in ("steps", "loss", "n_target_classes", "p_init", "rescale_schedule", "eps", "norm"):
            assert getattr(mine, key, None) == getattr(entry.attack, key, None), (entry.name, key)
        assert getattr(mine, "restarts", 1) >= getattr(entry.attack, "restarts", 1)
        assert full[entry.name].role == entry.role and full[entry.name].minimal == entry.minimal
    assert len(full) > len(auto)


def test_autoattack_on_a_linear_model_finds_the_exact_robust_accuracy():
    """On a linear classifier the minimal L∞ perturbation is known in closed form: the suite's robust accuracy is
    the fraction of samples whose minimal perturbation exceeds ε, exactly (the attacks are exact there)."""
    model, x, y, per_class = linear_problem(n=60, dim=64)
    eps = 0.045
    truth = float((per_class["linf"].amin(1) > eps).double().mean())
    assert 0.2 < truth < 0.8
    data = torch.utils.data.TensorDataset(x.view(60, 1, 8, 8), y)
    report = evaluate_robustness(model, data, suite="autoattack", norm="linf", eps=eps, eps_grid=[eps],
                                 progress=False, adaptive=False).as_dict()  # fmt: skip
    assert report["robust_accuracy_all"] == pytest.approx(truth, abs=1 / 60 + 1e-9)


def test_cli_standard_suite_reports_autoattack(tmp_path):
    """``--suite standard`` through the CLI runs AutoAttack's attacks and says so in the report."""
    code, out = run_cli("fit", *TINY, "--run_name", "tiny", "--trainer.limit_train_batches", "1", cwd=tmp_path)
    assert code == 0, out[-3000:]
    small = ("{apgd-ce: {steps: 3}, apgd-t: {steps: 3, n_target_classes: 2}, fab-t: {steps: 3, n_target_classes: 2},"
             " square: {steps: 20}}")  # fmt: skip
    code, out = run_cli("evaluate", *TINY, "--ckpt_path", "checkpoints/tiny/last.ckpt", "--max_samples", "8",
                        "--plots", "false", "--suite", "standard", "--overrides", small, "--output", "report",
                        cwd=tmp_path)  # fmt: skip
    assert code == 0, out[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["suite"] == "standard" and "AutoAttack, standard version" in report["suite_note"]
    assert list(report["attacks"])[:4] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert "AutoAttack, standard version" in (tmp_path / "report" / "report.md").read_text()
