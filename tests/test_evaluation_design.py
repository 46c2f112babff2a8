"""The evaluation's structure: the attacks' capabilities live in their specs (``advtrain/evaluation/`` names no attack),
one record schema drives every record, one threat-model resolution serves the CLI and the callback, and
``AdvTrainer.evaluate`` is a thin wrapper that keeps every flag and its help text."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import linear_problem

from advtrain.attacks import APGD, PGD, AttackKind, AttackSpec, create_attack, list_attacks
from advtrain.attacks.registry import SUITE_ROLES, EpsMeaning, register_attack
from advtrain.callbacks import RobustEvaluation
from advtrain.cli import AdvTrainer
from advtrain.errors import InvalidConfigError
from advtrain.evaluation import (
    EvalAttack,
    RobustnessRecords,
    SuiteEntry,
    attack_batch,
    build_suite,
    resolve_threat,
    wrap_attacks,
)
from advtrain.evaluation.batch import _fusion_groups
from advtrain.evaluation.entry import EvaluateOptions
from advtrain.evaluation.metrics import PER_ATTACK, PER_SAMPLE
from advtrain.evaluation.records import RECORD, join_attacks, join_samples, select_attacks
from advtrain.models.robustbench import RobustBenchEntry
from advtrain.threat.geometry import geometry_for
from advtrain.threat.norms import Norm

EVALUATION = Path(__file__).resolve().parents[1] / "advtrain" / "evaluation"


# Capabilities in the spec: the evaluation names no attack ----------------------------------------------------------


def test_evaluation_code_names_no_registered_attack():
    """Every string constant in ``advtrain/evaluation/*.py`` is checked against the registered names: the suite
    tables are data in ``advtrain/attacks/suites.py``, and the evaluation reads what it needs from the specs."""
    names = set(list_attacks())
    found = [
        f"{path.name}:{node.lineno} {node.value!r}"
        for path in sorted(EVALUATION.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert len(names) >= 14 and not found, found


def test_specs_declare_what_the_evaluation_needs():
    specs = list_attacks()
    roles = {name: spec.role for name, spec in specs.items()}
    assert roles["square"] == "black_box" and roles["fgsm"] == roles["fgm"] == "one_step"
    assert {roles[n] for n in ("pgd", "bim", "apgd", "transfer")} == {"iterative"}
    assert all(
        (spec.role == "minimal") == (spec.kind is AttackKind.MINIMAL) and spec.role in SUITE_ROLES
        for spec in specs.values()
    )
    meaning = {name: spec.eps_meaning for name, spec in specs.items()}
    assert meaning["anpgd"] is EpsMeaning.INITIAL and meaning["fab"] is EpsMeaning.OPTIONAL_BUDGET
    assert {meaning[n] for n in ("deepfool", "cw_l2", "ddn", "tr", "strattack")} == {EpsMeaning.NONE}
    assert all(meaning[n] is EpsMeaning.BUDGET for n, s in specs.items() if s.kind is AttackKind.BUDGETED)
    assert [n for n, s in specs.items() if s.fusable] == ["apgd"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": AttackKind.MINIMAL, "role": "iterative"}, "role must be one of"),
        ({"kind": AttackKind.BUDGETED, "role": "minimal"}, "role must be one of"),
        ({"kind": AttackKind.BUDGETED, "role": "sideways"}, "role must be one of"),
        ({"kind": AttackKind.BUDGETED, "eps_meaning": "initial"}, "eps_meaning must be one of"),
        ({"kind": AttackKind.MINIMAL, "eps_meaning": "budget"}, "eps_meaning must be one of"),
        ({"kind": AttackKind.MINIMAL, "eps_meaning": "radius"}, "radius"),
    ],
)
def test_spec_refuses_inconsistent_capabilities(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackSpec("x", norms=("linf",), targeted=False, stochastic=False, **kwargs)


def test_a_fusable_spec_needs_the_fused_call():
    class NotFusable(PGD):
        pass

    with pytest.raises(TypeError, match="call_fused or shares_passes_with"):
        register_attack(AttackSpec("not-fusable", AttackKind.BUDGETED, ("linf",), False, False, fusable=True))(
            NotFusable
        )
    assert "not-fusable" not in list_attacks()


def test_fusion_groups_come_from_the_spec_not_from_the_methods():
    """APGD-CE and APGD-DLR of one configuration share a call; an attack with ``call_fused`` and
    ``shares_passes_with`` methods but a spec that does not declare it fusable is a group of its own."""

    class Lookalike(PGD):  # inherits PGD's spec (fusable=False)
        def shares_passes_with(self, other):
            return True

        def call_fused(self, *args, **kwargs):
            raise AssertionError("never called: the spec says it does not fuse")

    ce, dlr = APGD(eps=0.1, steps=5, loss="ce"), APGD(eps=0.1, steps=5, loss="dlr")
    targeted = APGD(eps=0.1, steps=5, loss="dlr-targeted")
    attacks = [EvalAttack(f"a{i}", a, "iterative", False) for i, a in enumerate([ce, dlr, targeted])]
    attacks += [EvalAttack(f"l{i}", Lookalike(eps=0.1, steps=2), "iterative", False) for i in range(2)]
    assert [a.fusable for a in attacks] == [True, True, True, False, False]
    assert _fusion_groups(attacks, range(5)) == [[0, 1], [2], [3], [4]]


def test_suite_entries_take_their_role_and_budget_from_the_spec():
    entries = [
        SuiteEntry("sq", "square", {"steps": 5}),
        SuiteEntry("one", "fgsm"),
        SuiteEntry("fab", "fab", {"steps": 5}),
        SuiteEntry("fab-b", "fab", {"steps": 5}, budgeted=True),
        SuiteEntry("an", "anpgd", {"steps": 2, "bisection_steps": 2}),
        SuiteEntry("df", "deepfool", {"steps": 5}),
        SuiteEntry("df-off", "deepfool", {"steps": 5}, unbounded=False),
    ]
    built = {e.name: e for e in build_suite(entries, norm="linf", eps=0.05)}
    facts = {name: (e.role, e.minimal, e.unbounded) for name, e in built.items()}
    assert facts == {
        "sq": ("black_box", False, False),
        "one": ("one_step", False, False),
        "fab": ("minimal", True, True),
        "fab-b": ("iterative", False, False),
        "an": ("minimal", True, False),  # AN-PGD's eps is its initial radius: never unbounded
        "df": ("minimal", True, True),
        "df-off": ("minimal", True, False),
    }
    assert built["an"].attack.eps == 0.05 and built["fab-b"].attack.eps == 0.05 and built["fab"].attack.eps is None
    wrapped = {e.name: (e.role, e.unbounded) for e in wrap_attacks({k: e.attack for k, e in built.items()})}
    assert wrapped["sq"] == ("black_box", False) and wrapped["an"] == ("minimal", False)
    assert wrapped["fab"] == ("minimal", True) and wrapped["one"] == ("one_step", False)


# One record schema ---------------------------------------------------------------------------------------------------


def _batch_record(**kwargs):
    model, x, y, _ = linear_problem(n=12, dim=16, classes=5)
    x, y[::4] = x.view(12, 1, 4, 4), (y[::4] + 1) % 5  # images; some samples misclassified
    suite = [SuiteEntry("df", "deepfool", {"steps": 10}), SuiteEntry("pgd", "pgd", {"steps": 3}),
             SuiteEntry("sq", "square", {"steps": 5})]  # fmt: skip
    attacks = build_suite(suite, norm="linf", eps=0.05, seed=0)
    grid = [0.01, 0.05]
    return attacks, grid, attack_batch(model.eval(), x, y, torch.arange(12), attacks, grid,
                                       geometry=geometry_for(Norm.LINF), **kwargs)  # fmt: skip


def test_batch_record_follows_the_schema():
    attacks, grid, record = _batch_record()
    shapes = {"B": (12,), "BAG": (12, len(attacks), len(grid)), "A": (len(attacks),)}
    assert list(record) == [f.name for f in RECORD]
    for f in RECORD:
        value = record[f.name]
        assert value.device.type == "cpu" and value.dtype == f.dtype and tuple(value.shape) == shapes[f.shape], f
    assert not (record["attacked"] & ~record["correct"][:, None, None]).any()  # fill where not attacked
    assert torch.isinf(record["norms"][~record["fooled"]]).all()
    assert PER_SAMPLE == {f.name: "ag" if f.shape == "BAG" else "" for f in RECORD if f.shape != "A"}
    assert PER_ATTACK == tuple(f.name for f in RECORD if f.shape == "A")


def test_records_metric_reduces_as_the_schema_declares():
    attacks, grid, record = _batch_record()
    metric = RobustnessRecords(len(attacks), len(grid))
    assert {f.name: metric._reductions[f.name].__name__ for f in RECORD} == {
        f.name: {"cat": "dim_zero_cat", "sum": "dim_zero_sum"}[f.reduce] for f in RECORD
    }
    metric.update({name: value[6:] if name in PER_SAMPLE else value for name, value in record.items()})
    metric.update({name: value[:6] if name in PER_SAMPLE else value for name, value in record.items()})
    out = metric.results()
    for f in RECORD:  # rows sorted back by index, sums of the two updates; integer and bool fields in their dtype
        expected = record[f.name] * 2 if f.reduce == "sum" else record[f.name]
        assert out[f.name].dtype == (f.dtype if not f.dtype.is_floating_point else torch.float64), f
        torch.testing.assert_close(out[f.name].to(expected.dtype), expected, rtol=0, atol=0)


def test_record_joins_follow_the_schema():
    attacks, grid, record = _batch_record()
    first = {k: v[:5] if k in PER_SAMPLE else v for k, v in record.items()}
    second = {k: v[5:] if k in PER_SAMPLE else v for k, v in record.items()}
    joined = join_samples(first, second)
    for f in RECORD:
        torch.testing.assert_close(joined[f.name], record[f.name] * 2 if f.reduce == "sum" else record[f.name])
    both = join_attacks(record, select_attacks(record, [2]))
    assert both["norms"].shape[1] == len(attacks) + 1 and both["seconds"].shape == (len(attacks) + 1,)
    assert torch.equal(both["fooled"][:, -1], record["fooled"][:, 2]) and torch.equal(both["index"], record["index"])
    assert torch.equal(select_attacks(both, slice(0, len(attacks)))["robust"], record["robust"])


# One threat-model resolution -----------------------------------------------------------------------------------------


def test_threat_resolution_order():
    val = PGD(norm="l2", eps=0.5)
    assert resolve_threat(None, None, val_attack=val) == ("l2", 0.5)
    assert resolve_threat("L2", 0.25, val_attack=val) == ("l2", 0.25)
    assert resolve_threat("Linf", 0.1, val_attack=val) == ("linf", 0.1)  # both given: the validation attack is not read
    assert resolve_threat(None, 0.25, val_attack=val) == ("l2", 0.25)
    assert resolve_threat(None, None) == (None, None)
    entry = RobustBenchEntry("Some2020Model", "cifar10", "L2")
    assert resolve_threat(None, None, val_attack=PGD(norm="linf", eps=0.1), robustbench=entry) == ("l2", 0.5)
    assert resolve_threat("linf", None, robustbench=entry) == ("linf", pytest.approx(8 / 255))
    with pytest.raises(InvalidConfigError, match="evaluate: --norm l2 differs from the checkpoint's validation attack"):
        resolve_threat("l2", None, val_attack=PGD(norm="linf", eps=0.1), flags=True)
    with pytest.raises(InvalidConfigError, match="evaluate: --norm: .*l7"):
        resolve_threat("l7", None, flags=True)


def test_callback_and_cli_resolve_the_threat_alike():
    """The callback's threat model is the same function's: a norm without ε that differs from the val_attack's is
    refused instead of taking the val_attack's ε for another norm."""
    module = SimpleNamespace(val_attack=PGD(norm="linf", eps=0.1))
    assert RobustEvaluation(suite="quick")._threat(module) == ("linf", 0.1)
    assert RobustEvaluation(suite="quick", eps=0.2)._threat(module) == ("linf", 0.2)
    assert RobustEvaluation(suite="quick", norm="L2", eps=0.5)._threat(module) == ("l2", 0.5)
    with pytest.raises(InvalidConfigError, match="RobustEvaluation: norm l2 differs from the val_attack"):
        RobustEvaluation(suite="quick", norm="l2")._threat(module)
    with pytest.raises(ValueError, match="needs a threat model"):
        RobustEvaluation(suite="quick", norm="l2")._threat(SimpleNamespace(val_attack=None))


# evaluate: a thin wrapper over its own entry point -------------------------------------------------------------------


def test_evaluate_wrapper_keeps_every_flag_and_its_help():
    """AdvTrainer.evaluate's parameters are EvaluateOptions' fields (same defaults) plus the model and the data, and
    each has the help text EvaluateOptions documents (LightningCLI reads the flags' help from the docstring)."""
    parameters = dict(inspect.signature(AdvTrainer.evaluate).parameters)
    assert list(parameters)[:3] == ["self", "model", "datamodule"]
    options = {f.name: f.default for f in dataclasses.fields(EvaluateOptions)}
    assert {k: p.default for k, p in list(parameters.items())[3:]} == options
    docstring_parser = pytest.importorskip("docstring_parser")
    parse = docstring_parser.google.parse
    helps = {p.arg_name: p.description for p in parse(AdvTrainer.evaluate.__doc__).params}
    documented = {p.arg_name: p.description for p in parse(EvaluateOptions.__doc__).params}
    assert set(helps) == set(parameters) - {"self"} and all(helps.values())
    assert {k: helps[k] for k in options} == documented
    assert "Wong2020Fast" in helps["robustbench"] and "the checkpoint's hyperparameters" in helps["model"]
    assert parse(AdvTrainer.evaluate.__doc__).short_description.startswith("Evaluate a checkpoint")


def test_default_attack_is_pgd_with_the_steps_and_restarts_flags():
    from advtrain.attacks.suites import DEFAULT_ATTACK
    from advtrain.evaluation.entry import _attacks

    options = EvaluateOptions(steps=7, restarts=2)
    attacks, grid = _attacks(options, "linf", 0.1)
    [(name, attack)] = list(attacks.items())
    assert name == "pgd7-linf" and grid is None
    assert repr(attack) == repr(create_attack(DEFAULT_ATTACK.attack, norm="linf", eps=0.1, steps=7, restarts=2, seed=0))
    suite, grid = _attacks(EvaluateOptions(suite="quick"), "linf", 0.2)
    assert [e.name for e in suite] == ["pgd20"] and grid == pytest.approx([0.05, 0.1, 0.15, 0.2])
    with pytest.raises(InvalidConfigError, match="has no validation attack"):
        _attacks(EvaluateOptions(), None, None)
