"""Robust evaluation: attack a model, verify every claim, report."""

from advtrain.evaluation.robust import RobustnessReport, evaluate_robustness, write_report

__all__ = ["RobustnessReport", "evaluate_robustness", "write_report"]
