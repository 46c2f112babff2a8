"""Robust evaluation: attack a model with a suite, verify every claim, check for gradient masking, report."""

from advtrain.evaluation.masking import MaskingCheck, run_checks
from advtrain.evaluation.metrics import RobustnessRecords
from advtrain.evaluation.report import RobustnessReport, compare_reports, summarize, write_report
from advtrain.evaluation.robust import attack_batch, evaluate_robustness, prepare_attacks, verify
from advtrain.evaluation.sampling import BatchAlignedSampler, seeded_subset
from advtrain.evaluation.suites import SUITES, EvalAttack, SuiteEntry, build_suite, list_suites, wrap_attacks

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
    "run_checks",
    "seeded_subset",
    "summarize",
    "verify",
    "wrap_attacks",
    "write_report",
]
