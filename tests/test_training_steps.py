"""Training-step strategies and maximizer/objective pairing: the module delegates each step to the strategy its
maximizer declares (and names no maximizer), a toy maximizer with its own strategy trains without touching the module,
every advtrain maximizer/objective pair is accepted or refused at construction with one line (through the CLI: exit 2),
and model building sits below training (no import loop)."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import ROOT, random_batch, run_advtrain
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import advtrain.maximizers as maximizers
from advtrain.errors import InvalidConfigError
from advtrain.maximizers import (
    MMA,
    PGD,
    YOPO,
    AdversarialStep,
    Bilateral,
    FreeAT,
    FreeATStep,
    InnerMaximizer,
    ManualStep,
    ManualStepOutput,
    MarginPerturbation,
    Perturbation,
    SoftLabelPerturbation,
    TrainingStep,
    YOPOStep,
)
from advtrain.training import (
    AdversarialCE,
    AdversarialTraining,
    GradAlignLoss,
    MARTLoss,
    MixedCE,
    MMALoss,
    Objective,
    SoftLabelCE,
    TRADESLoss,
)
from advtrain.training.pairing import check_pairing, maximizers_for, objectives_for

MAXIMIZERS = sorted(
    (c for c in map(lambda n: getattr(maximizers, n), maximizers.__all__)
     if isinstance(c, type) and issubclass(c, InnerMaximizer) and c is not InnerMaximizer),
    key=lambda c: c.__name__,
)  # fmt: skip
OBJECTIVES = {
    "AdversarialCE": AdversarialCE,
    "MixedCE": MixedCE,
    "SoftLabelCE": SoftLabelCE,
    "TRADESLoss": TRADESLoss,
    "MARTLoss": MARTLoss,
    "MMALoss": MMALoss,
    "GradAlignLoss": GradAlignLoss,
}
GENERIC = {"AdversarialCE", "MixedCE", "SoftLabelCE", "TRADESLoss", "MARTLoss", "GradAlignLoss"}
# The objectives each maximizer pairs with (the rest are refused at construction).
ALLOWED = {
    "Standard": GENERIC, "PGD": GENERIC, "FastFGSM": GENERIC, "NFGSM": GENERIC, "TRADES": GENERIC, "DDN": GENERIC,
    "TRLinf": GENERIC,
    "MMA": {"MMALoss"},  # its masks: anything else would ignore them (and MMALoss needs them)
    "Bilateral": {"SoftLabelCE"},  # its soft labels: anything else would ignore them
    "YOPO": {"AdversarialCE"},  # a whole step with its own loss: only the default objective, which it does not use
    "FreeAT": {"AdversarialCE"},
}  # fmt: skip


def test_the_pairing_table_covers_every_maximizer_and_objective():
    assert {c.__name__ for c in MAXIMIZERS} == set(ALLOWED)
    known = {c.__name__ for c in Objective.__subclasses__() if c.__module__.startswith("advtrain.")}
    assert known == set(OBJECTIVES)


@pytest.mark.parametrize("maximizer", MAXIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("objective", sorted(OBJECTIVES), ids=str)
def test_every_maximizer_objective_pair_is_accepted_or_refused_naming_both_and_the_partners(maximizer, objective):
    instance = OBJECTIVES[objective]()
    if objective in ALLOWED[maximizer.__name__]:
        check_pairing(maximizer(), instance)
        return
    with pytest.raises(InvalidConfigError) as err:
        check_pairing(maximizer(), instance)
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.objective: ")
    assert maximizer.__name__ in message and objective in message
    if maximizer.produces is not None:  # the partners of both, from the declarations
        partners = message.split(f"{objective} pairs with ")[1]
        assert all(c.__name__ in partners for c in maximizers_for(instance.reads))
        assert all(c.__name__ in partners.split(f"{maximizer.__name__} pairs with ")[1]
                   for c in objectives_for(maximizer.produces))  # fmt: skip


def test_pairs_that_depend_on_the_objectives_arguments():
    # The default objective (None) is AdversarialCE: fine for a plain perturbation and for a whole-step maximizer.
    for maximizer in (PGD(), YOPO(), FreeAT()):
        check_pairing(maximizer, None)
    # Label smoothing would be silently dropped by a step with its own (plain) cross-entropy.
    with pytest.raises(InvalidConfigError, match="YOPO is a whole training step"):
        check_pairing(YOPO(), AdversarialCE(label_smoothing=0.1))
    # GradAlignLoss reads what its base reads.
    check_pairing(Bilateral(), GradAlignLoss(base=SoftLabelCE()))
    check_pairing(MMA(), GradAlignLoss(base=MMALoss()))
    with pytest.raises(InvalidConfigError, match="GradAlignLoss does not pair with model.maximizer PGD"):
        check_pairing(PGD(), GradAlignLoss(base=MMALoss()))


def test_a_wrong_pair_fails_when_the_module_is_built():
    with pytest.raises(InvalidConfigError, match="MMALoss needs correct, use_adv, which PGD does not produce") as err:
        AdversarialTraining(maximizer=PGD(eps=0.3), objective=MMALoss())
    assert "MMALoss pairs with MMA; PGD pairs with AdversarialCE, MARTLoss, MixedCE, SoftLabelCE" in str(err.value)
    with pytest.raises(InvalidConfigError, match="AdversarialCE would ignore MMA's correct, use_adv"):
        AdversarialTraining(maximizer=MMA())  # the default objective
    with pytest.raises(InvalidConfigError, match="TRADESLoss would be ignored"):
        AdversarialTraining(maximizer=YOPO(), objective=TRADESLoss())


@pytest.mark.parametrize(
    ("fragment", "objective", "needle"),
    [
        ("mma_mnist", "advtrain.training.AdversarialCE", "AdversarialCE would ignore MMA's correct, use_adv"),
        ("yopo_mnist", "advtrain.training.MARTLoss", "YOPO is a whole training step with its own loss"),
    ],
)
def test_a_wrong_pair_through_the_cli_exits_2_with_one_line(tmp_path, fragment, objective, needle):
    done = run_advtrain("fit", "--config", ROOT / "recipes" / "quickstart.yaml", "--config",
                        ROOT / "configs" / "maximizer" / f"{fragment}.yaml", "--model.objective", objective,
                        "--trainer.logger", "false", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("[advtrain]")]
    assert len(errors) == 1 and needle in errors[0], done.stderr[-3000:]
    assert "pairs with" in errors[0] or "Remove model.objective" in errors[0]


# ------------------------------------------------------------------------------------------------ the declarations


@pytest.mark.parametrize("cls", MAXIMIZERS, ids=lambda c: c.__name__)
def test_every_maximizer_declares_a_strategy_it_fits_and_a_perturbation_type(cls):
    assert issubclass(cls.step_strategy, TrainingStep)
    cls.step_strategy().check(cls())  # what the strategy calls is there
    if cls.step_strategy is AdversarialStep:
        assert issubclass(cls.produces, Perturbation) and cls.__call__ is not InnerMaximizer.__call__
    else:  # a whole training step: no perturbation, no __call__
        assert cls.produces is None and cls.__call__ is InnerMaximizer.__call__
        with pytest.raises(NotImplementedError, match="AdversarialTraining"):
            cls()(torch.nn.Identity(), torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long))


def test_the_declarations_of_the_methods_with_more_than_inputs():
    assert (MMA.produces, Bilateral.produces, PGD.produces) == (MarginPerturbation, SoftLabelPerturbation, Perturbation)
    assert MMALoss.reads == (MarginPerturbation,) and SoftLabelCE.reads == (SoftLabelPerturbation, Perturbation)
    assert (YOPO.step_strategy, FreeAT.step_strategy, PGD.step_strategy) == (YOPOStep, FreeATStep, AdversarialStep)
    assert YOPOStep.partial_backward and not YOPOStep.automatic_optimization and AdversarialStep.automatic_optimization


def test_a_maximizer_without_call_under_the_default_strategy_is_refused_at_construction():
    class _NoCall(InnerMaximizer):
        pass

    with pytest.raises(InvalidConfigError, match="_NoCall declares the step AdversarialStep.*defines no __call__"):
        AdversarialTraining(maximizer=_NoCall())


def test_the_module_names_no_maximizer():
    """module.py's code (not its docstrings and messages) names no maximizer class and reads no maximizer-specific
    flag: every difference between methods comes from the declared strategy."""
    tree = ast.parse((ROOT / "advtrain" / "training" / "module.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    specific = {c.__name__ for c in MAXIMIZERS} - {"Standard"}  # Standard: the default maximizer, not a branch
    specific |= {"YOPOStep", "FreeATStep", "manual_optimization", "steps_itself", "training_step_of", "_manual_step"}
    assert not names & specific, names & specific
    assert not any("yopo" in n.lower() or "free" in n.lower() for n in names)


# ----------------------------------------------------------------------------------------- a toy custom strategy


class _HalvesStep(ManualStep):
    """Two optimizer steps per batch, one on each half of it, on the clean cross-entropy: a strategy the module has
    never heard of, with partial backward passes declared (for the DDP check below)."""

    partial_backward = True

    def run(self, host, optimizer, inputs, labels):
        half = inputs.shape[0] // 2
        losses, logits = [], []
        for part in (slice(0, half), slice(half, None)):
            logits.append(host.model(inputs[part]))
            loss = F.cross_entropy(logits[-1], labels[part])
            host.manual_backward(loss)
            host.record_loss(loss.detach())
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        host.maximizer.batches += 1
        return ManualStepOutput(torch.stack(losses).mean(), torch.cat(logits).detach())


class _Halves(InnerMaximizer):
    step_strategy = _HalvesStep
    produces = None

    def __init__(self) -> None:
        self.batches = 0

    @property
    def steps_per_batch(self) -> int:
        return 2


def test_a_toy_maximizer_with_its_own_strategy_trains_through_the_module():
    """Through Lightning: 3 batches of 4, two SGD steps per batch on the halves, scheduler stepped per batch; weights
    equal a plain float64 loop doing the same (tolerance 1e-10: summation order; one missed step moves them ≈ 1e-3)."""
    x, y = random_batch(12, (1, 28, 28), dtype=torch.float64)
    torch.manual_seed(0)
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 2, "hidden": 4, "dropout": 0.0},
                                 maximizer=_Halves(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
                                 lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
                                 track_clean_train=False).double()  # fmt: skip
    assert not module.automatic_optimization and isinstance(module.step_strategy, _HalvesStep)
    ref = copy.deepcopy(module.model).train()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="64-true")  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert trainer.global_step == 12 and module.maximizer.batches == 6  # 2 optimizer steps per batch, 2 epochs
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for epoch in range(2):
        for group in opt.param_groups:
            group["lr"] = 0.05 * 0.5**epoch  # StepLR, interval "epoch": stepped once at each epoch's end
        for start in (0, 2, 4, 6, 8, 10):
            opt.zero_grad()
            F.cross_entropy(ref(x[start : start + 2]), y[start : start + 2]).backward()
            opt.step()
    for (name, a), (_, b) in zip(module.model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert module.lr_schedulers().get_last_lr() == [0.05 * 0.5**2]


@pytest.mark.parametrize(
    ("maximizer", "partial"),
    [(lambda: YOPO(), True), (lambda: _Halves(), True), (lambda: FreeAT(), False), (lambda: PGD(), False)],
    ids=["YOPO", "toy", "FreeAT", "PGD"],
)
def test_ddp_looks_for_unused_parameters_exactly_for_strategies_declaring_partial_backward(maximizer, partial):
    module = AdversarialTraining(arch="small_cnn", arch_kwargs={"width": 2, "hidden": 4}, maximizer=maximizer())
    strategy = DDPStrategy()
    module._trainer = SimpleNamespace(strategy=strategy, accumulate_grad_batches=1)
    module.setup("fit")
    assert strategy._ddp_kwargs.get("find_unused_parameters", False) is partial


def test_the_awp_refusal_names_the_strategy():
    from advtrain.training import AWP

    with pytest.raises(InvalidConfigError, match=r"_Halves takes its own optimizer steps \(_HalvesStep\)"):
        AdversarialTraining(maximizer=_Halves(), weight_perturbation=AWP())


# ------------------------------------------------------------------------------------------------ layering


@pytest.mark.parametrize("module", ["advtrain.models.build", "advtrain.maximizers.yopo", "advtrain.training.pairing"])
def test_modules_import_first_in_a_fresh_interpreter(module):
    """No import loop: each of these imported first (model building below training; strategies below the module)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


LAYERED = ["models/build.py", "safe_load.py", "maximizers/steps.py", "maximizers/base.py", "training/module.py",
           "training/pairing.py", "training/checkpoint.py", "training/resume.py"]  # fmt: skip


@pytest.mark.parametrize("path", LAYERED)
def test_no_advtrain_import_hides_inside_a_function(path):
    tree = ast.parse((ROOT / "advtrain" / path).read_text())
    hidden = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("advtrain")
    ]
    assert not hidden, hidden


_PACKAGES = sorted(p.name for p in (ROOT / "advtrain").iterdir() if p.is_dir() and p.name[0] != "_")


@pytest.mark.parametrize("folder", [*_PACKAGES, "."])
def test_no_function_is_longer_than_80_lines(folder):
    """Docstring and decorators included."""
    long = []
    folder_path = ROOT / "advtrain" / folder
    for path in sorted(folder_path.rglob("*.py") if folder != "." else folder_path.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - start + 1})")
    assert not long, long


def test_model_building_is_public_in_models_and_gone_from_training():
    import advtrain.models as models
    import advtrain.training.module as module

    assert models.build_model.__module__ == models.load_classifier_weights.__module__ == "advtrain.models.build"
    assert not hasattr(module, "_build_model") and not hasattr(module, "_load_classifier_weights")
    model = models.build_model("small_cnn", {"width": 2, "hidden": 4}, 10, (1, 28, 28), [0.5], [0.25])
    assert model.mean.flatten().tolist() == [0.5] and model.std.flatten().tolist() == [0.25]


# ------------------------------------------------------------------- a new maximizer: one file plus a config fragment
_MI_FGSM = '''"""Momentum iterative FGSM (Dong et al., CVPR 2018) as a training maximizer, in a user's own file."""
import torch
from advtrain.engine import attack_context
from advtrain.maximizers import InnerMaximizer, Perturbation


class MIFGSM(InnerMaximizer):
    budget_keys = ("eps", "step_size")

    def __init__(self, *, eps: float = 0.3, steps: int = 5, step_size: float = 0.1, decay: float = 1.0,
                 record: str | None = None) -> None:
        self.eps, self.steps, self.step_size, self.decay, self.record = eps, steps, step_size, decay, record

    def __call__(self, model, inputs, labels, index=None):
        x, g = inputs.detach(), torch.zeros_like(inputs)
        adv = x.clone()
        with attack_context(model, "eval"):
            for _ in range(self.steps):
                adv.requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(model(adv), labels)
                (grad,) = torch.autograd.grad(loss, adv)
                g = self.decay * g + grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
                adv = (x + (adv.detach() + self.step_size * g.sign() - x).clamp(-self.eps, self.eps)).clamp(0, 1)
        if self.record:
            with open(self.record, "a") as f:
                f.write(f"{self.eps:.3f}\\n")
        return Perturbation(adv=adv.detach())
'''


def test_a_new_maximizer_is_one_file_plus_a_config_fragment(tmp_path):
    """A maximizer in the user's own module (nothing in advtrain changes) and a config fragment that names it train
    through ``python -m advtrain fit``: the run finishes, called the maximizer on every training batch (under the
    recipe's ε ramp, through its ``budget_keys``), and the saved config names it."""
    (tmp_path / "my_maximizers.py").write_text(_MI_FGSM)
    record = tmp_path / "calls.txt"
    (tmp_path / "mi_fgsm.yaml").write_text(
        "model:\n  maximizer:\n    class_path: my_maximizers.MIFGSM\n"
        f"    init_args: {{eps: 0.3, steps: 3, step_size: 0.1, record: {record}}}\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "tests"), str(ROOT)])}
    done = run_advtrain("fit", "--config", ROOT / "recipes" / "quickstart.yaml", "--config", "mi_fgsm.yaml",
                        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
                        "--trainer.limit_val_batches", "1", "--model.val_attack.init_args.steps", "1",
                        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--run_name", "mi",
                        cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [float(v) for v in record.read_text().split()]
    assert len(calls) == 6  # 2 epochs x 3 batches
    assert calls[0] < calls[-1] <= 0.3  # the recipe's ramp scaled its budget
    assert "my_maximizers.MIFGSM" in (tmp_path / "checkpoints" / "mi" / "config.yaml").read_text()
