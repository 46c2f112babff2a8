"""Robust evaluation: attack a model with a suite, verify every claim, check for gradient masking, report."""

from advtrain.evaluation.masking import MaskingCheck, run_checks
from advtrain.evaluation.metrics import RobustnessRecords
from advtrain.evaluation.report import RobustnessReport, compare_reports, summarize, write_report
from advtrain.evaluation.robust import attack_batch, evaluate_robustness, prepare_attacks, verify
from advtrain.evaluation.sampling import BatchAlignedSampler, seeded_subset
from advtrain.evaluation.suites import (
    SUITES,
    EvalAttack,
    SuiteEntry,
    build_suite,
    list_suites,
    suite_note,
    wrap_attacks,
)
from advtrain.evaluation.threat_model import resolve_threat

__all__ = [
    "SUITES",
    "BatchAlignedSampler",
    "EvalAttack",
    "MaskingCheck",
    "RobustnessRecords",
    "RobustnessReport",
    "SuiteEntry",
    "attack_batch",
    "build_suite",
    "compare_reports",
    "evaluate_robustness",
    "list_suites",
    "prepare_attacks",
    "resolve_threat",
    "run_checks",
    "seeded_subset",
    "suite_note",
    "summarize",
    "verify",
    "wrap_attacks",
    "write_report",
]
