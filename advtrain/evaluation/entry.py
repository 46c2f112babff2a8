"""``advtrain evaluate`` as its own entry point: what the ``evaluate`` subcommand does, outside the Trainer.

:class:`AdvTrainer.evaluate <advtrain.cli.AdvTrainer.evaluate>` only declares the subcommand's flags (LightningCLI
builds them from its signature) and calls :func:`evaluate_checkpoint` with them as :class:`EvaluateOptions`: the model
to evaluate (a checkpoint's weights, a plain state dict in ``--arch``, or a RobustBench model), its threat model
(:func:`~advtrain.evaluation.resolve_threat`), the attacks, :func:`~advtrain.evaluation.evaluate_robustness` on the
split (under multi-process DDP, in every rank), and the report written and logged.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from advtrain.attacks.base import Attack
from advtrain.attacks.registry import create_attack
from advtrain.attacks.suites import DEFAULT_ATTACK
from advtrain.engine.tracking import autocast_dtype
from advtrain.errors import InvalidConfigError
from advtrain.evaluation.report import RobustnessReport, run_metadata, write_report
from advtrain.evaluation.robust import evaluate_robustness
from advtrain.evaluation.suites import EvalAttack, build_suite, suite_note
from advtrain.evaluation.threat_model import parse_norm, resolve_threat
from advtrain.models.build import build_model, load_classifier_weights
from advtrain.training.module import AdversarialTraining

log = logging.getLogger(__name__)

_SUMMARY = """Evaluate a checkpoint: clean accuracy, robust accuracy per attack and per ε, the worst case over all
attacks, success rates, norms, pass counts and the gradient-masking checks; writes ``report.json``,
``report.md``, ``accuracy_vs_eps.png`` and ``minimal_norms.png``."""

_MODEL_ARGS = """model: receives the checkpoint's classifier weights (unless ``arch`` is given); the CLI builds it from
    the config layered over the checkpoint's hyperparameters.
datamodule: provides the evaluation split."""

_NOTE = """The report scalars go to every configured logger (W&B, CSV, ...); ``--trainer.precision`` ``bf16-mixed`` or
``16-mixed`` runs the attacks under autocast, and ``--trainer.enable_progress_bar false`` hides the bar."""


@dataclass(frozen=True)
class EvaluateOptions:
    """The options of ``advtrain evaluate``: every flag of the subcommand but the model and the data, with its help
    text (:meth:`AdvTrainer.evaluate <advtrain.cli.AdvTrainer.evaluate>` takes them as its arguments; its docstring,
    the subcommand's help, is made from this one by :func:`evaluate_docstring`).

    Attributes:
        ckpt_path: an advtrain ``.ckpt`` (through the CLI, architecture and threat model come from it unless
            flags or config files say otherwise), or a plain state dict (RobustBench style, read with
            ``weights_only=True``; ``state_dict``/``model`` wrappers and ``module.`` prefixes are removed) for
            the model given by ``--arch`` or the config.
        split: ``"test"`` or ``"val"``.
        norm: threat model: ``linf``, ``l2`` or ``l1``, any case (``Linf``, ``L2``); default: the checkpoint's
            validation attack.
        eps: main budget (default: the checkpoint's validation attack).
        steps: PGD steps of the default attack (without ``--suite``/``--attacks``).
        restarts: PGD restarts of the default attack.
        attacks: explicit attacks instead of the default PGD.
        max_samples: evaluate only the first samples of the split.
        output: folder for the report (default: next to the checkpoint, ``<ckpt>-eval``).
        trust_checkpoint: allow a checkpoint that needs code execution to load (only for trusted files).
        progress: show a progress bar.
        suite: ``quick`` (PGD-20), ``apgd`` (APGD-CE + APGD-DLR), ``autoattack`` (AutoAttack's standard version:
            APGD-CE, APGD-T, FAB-T, Square-5000; ``standard`` is another name for it), ``autoattack-plus``,
            ``autoattack-rand`` (EOT, for randomized models) or ``full`` (the whole zoo, AutoAttack included).
        eps_grid: budgets of the accuracy-versus-ε curves (default with a suite: ε·(1/4, 1/2, 3/4, 1)).
        overrides: per-attack hyperparameters of the suite, e.g. ``{"square": {"steps": 200}}``.
        cascade: budgeted attacks only attack the samples still robust.
        fuse: run each budgeted attack over the whole ε grid in one call, and APGD-CE with APGD-DLR in one
            call: true, false or auto (on CUDA only, where a larger batch costs little more); see
            ``advtrain.evaluation.attack_batch``.
        max_fused_batch: the most rows of one fused call.
        arch: registered model name for a plain state dict (default: the config's ``model.arch``).
        arch_kwargs: its extra keyword arguments.
        robustbench: a RobustBench model name (``Wong2020Fast``): the architecture is built by the ``robustbench``
            package (``pip install 'advtrain[robustbench]'``) and takes the weights of ``ckpt_path``, a local
            file (nothing is downloaded; :func:`advtrain.models.load_robustbench`). The threat model and ε
            default to the leaderboard's (L∞ 8/255, L2 0.5, L1 12; ImageNet L∞ 4/255), the data to the model's
            dataset, whose datamodule adds no normalisation (the model normalises inside).
        robustbench_dataset: the model's dataset (default: from RobustBench's file layout
            ``<model_dir>/<dataset>/<threat_model>/<name>.pt``, else ``cifar10``).
        robustbench_threat: the model's threat model, ``Linf``, ``L2`` or ``L1`` in any case (default: from the
            file layout, else ``--norm``, else ``Linf``).
        batch_size: attack batch size (default: the datamodule's evaluation batch size).
        seed: seed of the suite's stochastic attacks.
        resume: reuse the per-batch results an interrupted run left in ``<output>/partial``.
        plots: write the PNG plots.
        overwrite: replace the report an earlier run left in ``output`` (without it, such a run is refused).
        adaptive: when a gradient-masking check fires, attack the samples still robust again (more Square
            queries and restarts, a transfer attack from a smoothed surrogate, EOT for random outputs) instead of
            only warning; default: on for ``autoattack``/``standard`` and ``full``. The report says what fired,
            what ran and what it changed.
        interpretability: also score each attack's adversarial examples by the interpretability score IS(ν) from
            the adversarial saliency map and the CAM/Grad-CAM (seed 002, §6; ``interpretability`` in the report)
            and write galleries of examples (``gallery_attacks.png``, ``gallery_<attack>.png``).
        is_percentiles: the percentiles ν of IS(ν) (default ``[30, 40, 50, 60, 70, 80, 90]``).
        gallery_samples: examples per attack in the galleries.
        averaged_weights: a checkpoint written with weight averaging (:class:`advtrain.callbacks.EMA`) holds the
            averaged weights and the live ones: evaluate the averaged (default; the log says so) or, with
            ``false``, the live weights of the last step.
    """

    ckpt_path: str | None = None
    split: Literal["val", "test"] = "test"
    norm: str | None = None
    eps: float | None = None
    steps: int = 50
    restarts: int = 1
    attacks: list[Attack] | None = None
    max_samples: int | None = None
    output: str | None = None
    trust_checkpoint: bool = False
    progress: bool = True
    suite: str | None = None
    eps_grid: list[float] | None = None
    overrides: dict[str, dict[str, Any]] | None = None
    cascade: bool = True
    fuse: bool | Literal["auto"] = "auto"
    max_fused_batch: int = 1024
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    robustbench: str | None = None
    robustbench_dataset: Literal["cifar10", "cifar100", "imagenet"] | None = None
    robustbench_threat: str | None = None
    batch_size: int | None = None
    seed: int = 0
    resume: bool = False
    plots: bool = True
    overwrite: bool = False
    adaptive: bool | None = None
    interpretability: bool = False
    is_percentiles: list[float] | None = None
    gallery_samples: int = 4
    averaged_weights: bool = True


def evaluate_docstring() -> str:
    """The docstring of ``AdvTrainer.evaluate``, from which LightningCLI takes the ``evaluate`` subcommand's help: the
    summary, the model and the data, and every option of :class:`EvaluateOptions` with its help text."""
    options = inspect.cleandoc(EvaluateOptions.__doc__ or "").split("Attributes:\n", 1)[1]
    args = "\n".join("    " + line if line else line for line in _MODEL_ARGS.splitlines())
    return f"{_SUMMARY}\n\nArgs:\n{args}\n{options}\n\n{_NOTE}"


def evaluate_checkpoint(
    trainer: pl.Trainer, model: nn.Module, datamodule: Any, options: EvaluateOptions
) -> dict[str, Any]:
    """Runs ``advtrain evaluate``: evaluates the model (see :class:`EvaluateOptions`) on the datamodule's split,
    writes the report into ``options.output`` and logs its scalars to every logger of ``trainer``.

    Args:
        trainer: the Trainer (its strategy, devices, precision, progress bar and loggers are used).
        model: the module the CLI built (from the config layered over the checkpoint's hyperparameters).
        datamodule: provides the evaluation split.
        options: the subcommand's options.

    Returns:
        The report's numbers (``report.json``), on every rank.
    """
    import torch.distributed as dist

    if trainer.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        # Multi-process (--trainer.strategy ddp --trainer.devices N): Lightning's launcher starts the ranks, each
        # attacks whole batches of the split and the records are gathered exactly (no padded duplicates).
        from pytorch_lightning.trainer import call

        return call._call_and_handle_interrupt(trainer, _evaluate_in_rank, trainer, model, datamodule, options)
    classifier, entry = _evaluation_target(model, datamodule, options)
    # The threat model: flags, else RobustBench's leaderboard, else the validation attack of the checkpoint (whose
    # hyperparameters the CLI layered under the config) or of the config (a plain state dict).
    val_attack = getattr(model, "val_attack", None)
    norm, eps = resolve_threat(options.norm, options.eps, val_attack=val_attack, robustbench=entry, flags=True)
    attacks, eps_grid = _attacks(options, norm, eps)
    _use_trainer_precision(trainer.precision, list(attacks.values()) if isinstance(attacks, dict) else
                           [e.attack for e in attacks])  # fmt: skip
    progress = options.progress and trainer.progress_bar_callback is not None
    output = options.output
    if output is None:
        output = str(Path(options.ckpt_path).with_suffix("")) + "-eval" if options.ckpt_path else "reports/evaluate"
    _check_output_folder(Path(output), overwrite=options.overwrite, resume=options.resume)
    datamodule.prepare_data()
    datamodule.setup("test" if options.split == "test" else "validate")
    loader = datamodule.test_dataloader() if options.split == "test" else datamodule.val_dataloader()
    device = _device(trainer)
    meta = run_metadata(checkpoint=options.ckpt_path, split=options.split, dataset=type(datamodule).__name__,
                        device=device, suite=options.suite, seed=options.seed,
                        robustbench=entry.as_dict() if entry else None)  # fmt: skip
    if options.suite is not None:
        meta["suite_note"] = suite_note(options.suite)
    report = evaluate_robustness(
        classifier.model if isinstance(classifier, AdversarialTraining) else classifier, loader, attacks, norm=norm,
        eps=eps, eps_grid=eps_grid, cascade=options.cascade, fuse=options.fuse, max_fused_batch=options.max_fused_batch,
        batch_size=options.batch_size, device=device, max_samples=options.max_samples, progress=progress,
        seed=options.seed, partial_dir=output, resume=options.resume, meta=meta, adaptive=options.adaptive,
        interpretability=options.interpretability, is_percentiles=options.is_percentiles,
        gallery_samples=options.gallery_samples,
    )  # fmt: skip
    return _publish(trainer, report, output, meta, plots=options.plots)


def _evaluate_in_rank(trainer: pl.Trainer, model: nn.Module, datamodule: Any, options: EvaluateOptions):
    """:func:`evaluate_checkpoint` inside a rank started by Lightning's launcher, once the process group is up."""
    trainer.strategy.setup_environment()
    return evaluate_checkpoint(trainer, model, datamodule, options)


def _evaluation_target(model: nn.Module, datamodule: Any, options: EvaluateOptions) -> tuple[nn.Module, Any]:
    """The model to evaluate and, for ``--robustbench``, its RobustBench entry (else ``None``): a RobustBench model
    with the checkpoint's weights, or :func:`_evaluation_model`'s."""
    norm = parse_norm(options.norm, "evaluate: --norm")
    if options.robustbench is None:
        return _evaluation_model(model, datamodule, options.ckpt_path, options.arch, options.arch_kwargs,
                                 options.trust_checkpoint, options.averaged_weights), None  # fmt: skip
    from advtrain.models.robustbench import robustbench_for_evaluation

    if options.arch is not None:
        raise InvalidConfigError("evaluate: --arch and --robustbench both name the model; pass one of them.")
    entry, classifier = robustbench_for_evaluation(options.robustbench, options.ckpt_path, options.robustbench_dataset,
                                                   options.robustbench_threat, norm=norm, data=datamodule,
                                                   trust=options.trust_checkpoint)  # fmt: skip
    return classifier, entry


def _attacks(
    options: EvaluateOptions, norm: str | None, eps: float | None
) -> tuple[dict[str, Attack] | list[EvalAttack], list[float] | None]:
    """The attacks and the ε grid: ``--attacks`` as given (labelled by :func:`_attack_name`); else ``--suite`` built
    for the threat model, its grid defaulting to ε·(1/4, 1/2, 3/4, 1); else the default attack
    (:data:`~advtrain.attacks.suites.DEFAULT_ATTACK`) with ``--steps`` and ``--restarts``."""
    if options.attacks:
        return {_attack_name(a, i): a for i, a in enumerate(options.attacks)}, options.eps_grid
    if norm is None or eps is None:
        raise InvalidConfigError("evaluate: the checkpoint has no validation attack; pass --norm and --eps.")
    if options.suite is None:
        attack = create_attack(DEFAULT_ATTACK.attack, norm=norm, eps=eps, steps=options.steps,
                               restarts=options.restarts, **DEFAULT_ATTACK.kwargs)  # fmt: skip
        return {_attack_name(attack, 0): attack}, options.eps_grid
    grid = options.eps_grid if options.eps_grid is not None else [eps * k / 4 for k in (1, 2, 3, 4)]
    return build_suite(options.suite, norm=norm, eps=eps, seed=options.seed, overrides=options.overrides), grid


def _publish(trainer: pl.Trainer, report: RobustnessReport, output: str, meta: dict, *, plots: bool) -> dict:
    """Writes the report (rank 0) and logs its scalars to every configured logger (W&B, CSV, TensorBoard, ...);
    returns its numbers."""
    data = report.as_dict()
    if not trainer.is_global_zero:
        return data
    folder = write_report(report, output, meta, plots=plots)
    for logger in trainer.loggers:
        logger.log_metrics(report.scalars(), step=0)
        if isinstance(logger, WandbLogger):
            from advtrain.callbacks.robust import log_report_to_wandb

            log_report_to_wandb(logger, report)
        logger.save()
    log.info(
        "evaluate: clean %.2f%%, robust (worst case) %.2f%% on %d samples in %.1f s; report in %s",
        100 * data["clean_accuracy"], 100 * data["robust_accuracy_all"], data["samples"], data["wall_time_s"], folder,
    )  # fmt: skip
    return data


def _evaluation_model(model, datamodule, ckpt_path, arch, arch_kwargs, trust, averaged_weights=True):
    """The model to evaluate: the checkpoint's weights (an advtrain checkpoint's classifier, or a plain state dict)
    loaded into ``--arch`` or else into the given module's classifier; without a checkpoint, the given (untrained)
    module. Through the CLI the module is built from the config layered over the checkpoint's hyperparameters
    (:class:`~advtrain.cli.AdvTrainCLI`), so flags and config files apply as in validate and test."""
    from advtrain.training.checkpoint import read_checkpoint

    if ckpt_path is None:
        log.warning("evaluate: no --ckpt_path given; evaluating the untrained model built from the config.")
        return model
    ckpt = read_checkpoint(ckpt_path, trust=trust)
    from advtrain.callbacks.averaging import averaged_state

    if averaged_state(ckpt):
        if averaged_weights:
            log.info("evaluate: %s holds weight-averaged (EMA) weights: evaluating the averaged weights "
                     "(--averaged_weights false evaluates the last step's live weights).", ckpt_path)  # fmt: skip
        else:
            log.info("evaluate: %s holds weight-averaged (EMA) weights: evaluating the last step's live weights "
                     "(current_model_state), as --averaged_weights false asks.", ckpt_path)  # fmt: skip
            ckpt = {**ckpt, "state_dict": ckpt["current_model_state"]}
    if arch is not None:
        facts = (datamodule.num_classes, datamodule.image_shape, datamodule.mean, datamodule.std)
        classifier = build_model(arch, arch_kwargs or {}, *facts)
    else:
        classifier = model.model
    what = f"--arch {arch}" if arch is not None else "model.arch (the config's)"
    load_classifier_weights(classifier, ckpt_path, what, ckpt)  # unwraps state_dict/model, model. and module.
    if arch is None:
        return model
    return classifier.eval()


_AUTOCAST_OF_PRECISION = {"bf16-mixed": "bf16", "16-mixed": "fp16"}


def _use_trainer_precision(precision: str, attacks: list[Attack]) -> None:
    """``--trainer.precision`` for ``evaluate``: mixed precision runs every attack (that has no autocast of its own)
    under autocast; the verification forward stays in float32."""
    autocast = _AUTOCAST_OF_PRECISION.get(str(precision))
    if autocast is None:
        if str(precision) not in ("32-true", "32", "64-true", "64"):
            log.warning("evaluate: --trainer.precision %s is not applied (only bf16-mixed and 16-mixed are: attacks "
                        "under autocast); evaluating in float32.", precision)  # fmt: skip
        return
    for attack in attacks:
        if getattr(attack, "autocast", "n/a") is None:
            attack.autocast, attack._autocast = autocast, autocast_dtype(autocast)


def _check_output_folder(output: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuses an ``--output`` that is a file, or that holds an earlier report (unless ``--overwrite true`` or
    ``--resume true``), before any attack runs."""
    if output.exists() and not output.is_dir():
        raise InvalidConfigError(f"evaluate: --output {output} is a file; give a folder for the report.")
    if (output / "report.json").is_file() and not (overwrite or resume):
        raise InvalidConfigError(
            f"evaluate: {output} already holds a report; pass --overwrite true to replace it, or another --output."
        )


def _device(trainer: pl.Trainer):
    try:
        return trainer.strategy.root_device
    except Exception:  # noqa: BLE001 - strategies without a root device before setup
        return "cpu"


def _attack_name(attack: Attack, i: int) -> str:
    spec = getattr(attack, "spec", None)
    name = spec.name if spec else type(attack).__name__.lower()
    steps = getattr(attack, "steps", None)
    return f"{name}{steps if steps and steps > 1 else ''}-{getattr(attack, 'norm', '')}" + (f"#{i}" if i else "")


def _device(trainer: pl.Trainer):
    try:
        return trainer.strategy.root_device
    except Exception:  # noqa: BLE001 - strategies without a root device before setup
        return "cpu"


__all__ = ["EvaluateOptions", "evaluate_checkpoint", "evaluate_docstring"]
