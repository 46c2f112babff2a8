"""Escalation instead of a warning: a masking check that fires makes the evaluation attack the samples still robust
again, and the report says what fired, what ran and what it changed."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluation import NoisyInput, RoundInput, _images
from torch.utils.data import TensorDataset

from advtrain.attacks import Transfer
from advtrain.attacks.transfer import SmoothedModel
from advtrain.evaluation import SuiteEntry, build_suite, evaluate_robustness, write_report
from advtrain.evaluation.escalation import RESPONSES
from advtrain.evaluation.report import eps_key

SUITE = [
    SuiteEntry("apgd-ce", "apgd", {"loss": "ce", "steps": 10}),
    SuiteEntry("square", "square", {"steps": 100}, role="black_box"),
]
SMALL = {
    "square-more": {"steps": 200, "restarts": 1},
    "transfer": {"steps": 20, "samples": 4},
    "apgd-ce-eot": {"steps": 10, "eot_iter": 4},
    "apgd-dlr-eot": {"steps": 10, "eot_iter": 4},
}
EPS = 0.08


def _run(model, x, y, **kwargs):
    entries = build_suite(SUITE, norm="linf", eps=EPS, seed=0)
    return evaluate_robustness(model, TensorDataset(x, y), entries, norm="linf", eps=EPS, eps_grid=[EPS / 2, EPS],
                               batch_size=16, progress=False, **{"escalation_options": SMALL, **kwargs})  # fmt: skip


def test_masked_model_escalates_and_the_report_says_what_changed(tmp_path):
    model, x, y = _images()
    masked = RoundInput(model)
    plain = _run(masked, x, y, adaptive=False)
    report = _run(masked, x, y, adaptive=True)
    assert "zero_gradients" in report.fired and "escalation" not in plain.as_dict()
    esc = report.as_dict()["escalation"]
    assert "zero_gradients" in esc["triggered_by"]
    assert [s["attack"] for s in esc["steps"]] == ["square-more", "transfer"]
    # The suite's attacks and numbers are those of the plain run; the escalation only ever lowers the worst case.
    assert esc["robust_accuracy_before"] == plain.as_dict()["robust_accuracy_all"]
    assert esc["robust_accuracy_after"] == report.as_dict()["robust_accuracy_all"]
    assert esc["robust_accuracy_after"] <= esc["robust_accuracy_before"]
    steps = esc["steps"]
    assert steps[0]["robust_before"] == esc["robust_accuracy_before"]
    assert steps[1]["robust_before"] == steps[0]["robust_after"]
    assert steps[-1]["robust_after"] == esc["robust_accuracy_after"]
    # At the first ε, the escalation attacks exactly the samples the suite left standing there (at the main ε, minus
    # what it broke at the smaller one).
    small = eps_key(EPS / 2)
    standing = round(plain.as_dict()["robust_accuracy_all_by_eps"][small] * x.shape[0])
    assert report.as_dict()["attacks"]["square-more"]["attacked_by_eps"][small] == standing
    # The smoothed surrogate finds what the zero gradients hide: the escalation breaks samples.
    assert esc["robust_accuracy_after"] < esc["robust_accuracy_before"]
    assert report.as_dict()["attacks"]["transfer"]["role"] == "escalation"
    folder = write_report(report, tmp_path, plots=False)
    assert "## Escalation" in (folder / "report.md").read_text()
    assert json.loads((folder / "report.json").read_text())["escalation"]["triggered_by"] == esc["triggered_by"]


def test_no_check_fired_means_no_escalation():
    model, x, y = _images()
    report = _run(model, x, y, adaptive=True)
    assert not set(report.fired) & set(RESPONSES)
    assert "escalation" not in report.as_dict()
    assert set(report.as_dict()["attacks"]) == {"apgd-ce", "square"}


def test_escalation_records_equal_a_direct_run_on_the_standing_samples():
    """The escalation's square-more is the same attack as a direct run on the samples the suite left standing."""
    model, x, y = _images()
    masked = RoundInput(model)
    report = _run(masked, x, y, adaptive=True)
    data = report.data
    names = list(report.as_dict()["attacks"])
    a = names.index("square-more")
    attacked = data["attacked"][:, a, 1]
    suite_broken = ~data["robust"][:, : len(SUITE), 1].all(1) | ~data["correct"]
    assert not bool((attacked & suite_broken).any())  # never re-attacks what the suite broke


def test_smoothed_model_is_the_noise_average_and_transfer_is_judged_on_the_model():
    model, x, y = _images(8)
    noise = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    smooth = SmoothedModel(model, 0.05, noise)
    expected = torch.stack([model(x + 0.05 * n) for n in noise]).mean(0)
    torch.testing.assert_close(smooth(x), expected)
    result = Transfer(norm="linf", eps=EPS, steps=10, samples=3, seed=0)(model, x, y)
    with torch.no_grad():
        verdict = model(result.adv).argmax(1) != y
    assert torch.equal(result.success, verdict)
    assert float((result.adv - x).abs().max()) <= EPS + 1e-6


def test_random_outputs_escalate_with_eot():
    model, x, y = _images(16)
    torch.manual_seed(0)
    report = _run(NoisyInput(model), x, y, adaptive=True)
    esc = report.as_dict()["escalation"]
    assert "random_outputs" in esc["triggered_by"]
    assert {"apgd-ce-eot", "apgd-dlr-eot"} <= {s["attack"] for s in esc["steps"]}
    assert report.as_dict()["attacks"]["apgd-ce-eot"]["config"].count("eot_iter=4") == 1


def test_unknown_escalation_option_names_the_attacks():
    model, x, y = _images()
    with pytest.raises(ValueError, match="'square-mor' is not an escalation attack; they are apgd-ce-eot"):
        _run(RoundInput(model), x, y, adaptive=True, escalation_options={"square-mor": {"steps": 1}})
