"""``python -m advtrain {fit,validate,test,evaluate}``: the LightningCLI of advtrain.

Recipes compose (``--config a.yaml --config b.yaml``, later files override key by key), use OmegaConf
``${...}`` interpolation across files and flags (parser mode ``omegaconf+``), and take overrides from the command
line (``--model.maximizer.eps 0.1``). ``advtrain/defaults.yaml`` is applied first to every subcommand.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
import yaml
from jsonargparse import set_parsing_settings
from omegaconf import OmegaConf
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from advtrain.attacks.base import Attack
from advtrain.data.base import AdvDataModule
from advtrain.errors import InvalidConfigError, UserError
from advtrain.evaluation.entry import EvaluateOptions, evaluate_checkpoint, evaluate_docstring
from advtrain.maximizers.base import InnerMaximizer
from advtrain.runtime import tune_cpu_allocator
from advtrain.threat.norms import Norm
from advtrain.training.checkpoint import read_checkpoint, stored_hyperparameters
from advtrain.training.module import AdversarialTraining
from advtrain.training.objectives import Objective
from advtrain.training.run_folder import RunLock, resolve_checkpoint, run_folder, unwritable_folder

log = logging.getLogger("advtrain")

DEFAULTS = Path(__file__).with_name("defaults.yaml")
_STAMP_ENV = "ADVTRAIN_RUN_STAMP"

# Keys whose value names a class: an unknown name gets the list of known ones.
_COMPONENT_KEYS: dict[str, type] = {
    "model.maximizer": InnerMaximizer,
    "model.objective": Objective,
    "model.val_attack": Attack,
    "data": AdvDataModule,
}


def _stamp() -> str:
    """One timestamp per run, shared with DDP workers through the environment (they re-parse the CLI)."""
    if _STAMP_ENV not in os.environ:
        os.environ[_STAMP_ENV] = time.strftime("%Y%m%d-%H%M%S")
    return os.environ[_STAMP_ENV]


if not OmegaConf.has_resolver("stamp"):
    with warnings.catch_warnings():  # omegaconf 2.4 renames it; 2.3 (also supported) has only this name
        warnings.simplefilter("ignore", UserWarning)
        OmegaConf.register_new_resolver("stamp", _stamp)


def _public_path(cls: type) -> str:
    """The shortest import path of a class, e.g. ``advtrain.maximizers.PGD`` rather than its defining module."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f"{module.__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _subclass_names(base: type) -> list[str]:
    found, stack = set(), [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            if not sub.__name__.startswith("_") and not getattr(sub, "__abstractmethods__", None):
                found.add(_public_path(sub))
    return sorted(found)


class AdvArgumentParser(LightningArgumentParser):
    """Adds what a user needs to fix a bad config: close matches for a misspelled key, the known classes for an
    unknown component name. Abbreviated keys are refused (``allow_abbrev=False``): argparse's prefix matching would
    take ``--trainer.max_epoch`` as ``--trainer.max_epochs`` and a misspelled key would pass silently."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    #: The command line being parsed (set by :func:`build_cli`), to name the ``--config`` file of a YAML error.
    cli_args: ClassVar[list[str]] = []

    def print_usage(self, file: Any = None) -> None:
        """One line instead of argparse's usage, which for these commands lists every option over some 70 lines and
        buries the error printed after it; ``--help`` still gives them all."""
        (file or sys.stderr).write(f"usage: {self.prog.replace(' [options]', '')} [-c CONFIG] [--KEY VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if "<unicode string>" in message:
            message = message.replace('"<unicode string>"', _broken_config_file(self.cli_args))
        message = _without_the_none_branch(message)
        return super().error(message + self._hint(message), ex)

    def _hint(self, message: str) -> str:
        bad = re.search(r"Option '([^']+)' is not accepted", message)
        cls_path = re.search(r"class_path '([\w.]+)'", message)
        if bad and cls_path:
            try:
                module, name = cls_path.group(1).rsplit(".", 1)
                cls = getattr(importlib.import_module(module), name)
                accepted = list(cls.hyperparameters()) if hasattr(cls, "hyperparameters") else [
                    p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")
                ]  # fmt: skip
            except (ImportError, AttributeError, ValueError):
                accepted = []
            if accepted:
                close = difflib.get_close_matches(bad.group(1), accepted, n=1)
                guess = f" Did you mean {close[0]!r}?" if close else ""
                return f"\n  {name} accepts: {', '.join(accepted)}.{guess}"
        for key, base in _COMPONENT_KEYS.items():
            if f'"{key}"' in message and ("import path" in message or "subclass" in message):
                return f"\n  Known values for {key}: " + ", ".join(_subclass_names(base))
        words = message.replace("'", " ").replace('"', " ").split()
        candidates = [w.lstrip("-").split("=")[0] for w in words if w.startswith("--") or "." in w]
        known = sorted({a.dest for a in self._actions if a.dest})
        for word in candidates:
            close = difflib.get_close_matches(word, known, n=3, cutoff=0.75)
            if close and word not in known:
                return f"\n  Did you mean: {', '.join(close)}?"
        return ""


def _without_the_none_branch(message: str) -> str:
    """jsonargparse's error for a bad value of an optional key (``X | None``) lists both branches of the union, the
    types and what was given in seven lines; this keeps what the user needs: the key, what ``X`` expects (nested
    errors of a component's arguments included), and the given value. Other messages pass unchanged."""
    lines = message.splitlines()
    if len(lines) < 4 or "Does not validate against any of the Union subtypes" not in lines[1]:
        return message
    try:
        first = next(i for i, line in enumerate(lines) if line.strip() == "Errors:") + 1
        given = next(i for i, line in enumerate(lines) if line.strip().startswith("Given value type:"))
    except StopIteration:
        return message
    branches: list[list[str]] = []
    for line in lines[first:given]:
        if line.strip().startswith("- "):
            branches.append([line.strip()[2:]])
        elif branches:
            branches[-1].append(line)
    kept = [b for b in branches if not b[0].startswith("Expected a <class 'NoneType'>")]
    if len(kept) != 1 or len(branches) != 2:
        return message  # not ``X | None``: every branch's error stays
    value = next((line.strip() for line in lines[given:] if line.strip().startswith("Given value:")), "")
    head, *nested = kept[0]
    dedent = min((len(n) - len(n.lstrip()) for n in nested if n.strip()), default=0)
    body = "".join(f"\n  {n[dedent:]}" for n in nested)
    return f"{lines[0]} {head}{body}\n  {value} (null is allowed too)"


def threat_norm(value: str) -> str:
    """The type of ``--threat.norm``: ``linf``, ``l2`` or ``l1`` in any spelling :meth:`Norm.parse` accepts (``Linf``,
    ``L2``, ``inf``), stored in advtrain's spelling so that ``${threat.norm}`` fits every component's ``norm``."""
    try:
        norm = Norm.parse(value)
    except ValueError:
        norm = None
    if norm not in (Norm.LINF, Norm.L2, Norm.L1):
        raise argparse.ArgumentTypeError(f"unknown threat norm {value!r}; allowed: linf, l2, l1 (any case: Linf, L2)")
    return norm.value


def _broken_config_file(args: list[str]) -> str:
    """The first ``--config`` file of ``args`` that is not valid YAML (quoted), for jsonargparse's YAML errors, which
    name only ``<unicode string>``."""
    import yaml

    files = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    files += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    for name in files:
        path = Path(name)
        if path.is_file():
            try:
                yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                return f'"{path}"'
    return '"<unicode string>"'


class AdvTrainer(pl.Trainer):
    """Lightning's Trainer with advtrain's ``evaluate`` subcommand and exact resume (a stateful training loader, RNG
    streams, running metrics and the W&B run id saved in checkpoints: :mod:`advtrain.training.resume`)."""

    def __init__(
        self,
        *args: Any,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        # Lightning annotates these ``float | int | None``: the CLI would parse ``--trainer.limit_val_batches 1`` (one
        # batch) as the float 1.0, i.e. every batch. Declared int first, ``1`` stays one batch and ``0.5`` a fraction.
        limits = {"limit_train_batches": limit_train_batches, "limit_val_batches": limit_val_batches,
                  "limit_test_batches": limit_test_batches, "limit_predict_batches": limit_predict_batches}  # fmt: skip
        super().__init__(*args, **limits, **kwargs)
        from advtrain.training.resume import ExactResume, install_resumable_fit_loop

        install_resumable_fit_loop(self)
        from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

        from advtrain.training.checkpoint import AtomicCheckpointIO

        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO plugin is kept
            self.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(cb, ExactResume) for cb in self.callbacks):
            # First: its state must be complete before ModelCheckpoint (always last) writes a checkpoint.
            self.callbacks.insert(0, ExactResume())

    def evaluate(
        self,
        model: AdversarialTraining,
        datamodule: AdvDataModule,
        ckpt_path: str | None = None,
        split: Literal["val", "test"] = "test",
        norm: str | None = None,
        eps: float | None = None,
        steps: int = 50,
        restarts: int = 1,
        attacks: list[Attack] | None = None,
        max_samples: int | None = None,
        output: str | None = None,
        trust_checkpoint: bool = False,
        progress: bool = True,
        suite: Literal["quick", "apgd", "autoattack", "standard", "autoattack-plus", "autoattack-rand", "full"]
        | None = None,
        eps_grid: list[float] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        cascade: bool = True,
        fuse: bool | Literal["auto"] = "auto",
        max_fused_batch: int = 1024,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        robustbench: str | None = None,
        robustbench_dataset: Literal["cifar10", "cifar100", "imagenet"] | None = None,
        robustbench_threat: str | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        resume: bool = False,
        plots: bool = True,
        overwrite: bool = False,
        adaptive: bool | None = None,
        interpretability: bool = False,
        is_percentiles: list[float] | None = None,
        gallery_samples: int = 4,
        averaged_weights: bool = True,
    ) -> dict[str, Any]:
        # The docstring, from which LightningCLI takes every flag's help, is EvaluateOptions's (set below).
        options = {k: v for k, v in locals().items() if k not in ("self", "model", "datamodule")}
        return evaluate_checkpoint(self, model, datamodule, EvaluateOptions(**options))

    evaluate.__doc__ = evaluate_docstring()

    def predict(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | Path | None = None,
        weights_only: bool | None = None,
        output: str | None = None,
        adversarial: bool = False,
        overwrite: bool = False,
    ) -> list[Any] | None:
        """Lightning's ``predict`` on the test split, writing per-sample predictions to a CSV file: ``index``,
        ``label``, ``pred`` (the predicted class), ``prob_0``... (softmax) and, with ``adversarial``, ``adv_pred``
        (the prediction on the validation attack's adversarial input).

        Args:
            output: the CSV file (default: next to the checkpoint, ``<ckpt>-predictions.csv``; without a checkpoint
                and without ``output`` nothing is written).
            adversarial: also predict on the validation attack's adversarial inputs.
            overwrite: replace an existing ``output`` file (without it, such a run is refused).

        The other arguments are Lightning's.
        """
        if output is None and ckpt_path is not None and str(ckpt_path) not in ("last", "best", "hpc", "registry"):
            output = str(Path(ckpt_path).with_suffix("")) + "-predictions.csv"
        if output is not None:
            _check_output_file(Path(output), overwrite=overwrite)
            if self.world_size > 1:
                raise InvalidConfigError("predict writes its file from one process: run it with --trainer.devices 1.")
        target = model if model is not None else self.lightning_module
        if adversarial and not isinstance(target, AdversarialTraining):
            raise InvalidConfigError("predict --adversarial true needs an advtrain model (AdversarialTraining).")
        if isinstance(target, AdversarialTraining):
            target.predict_adversarial = adversarial
        keep = output is not None or return_predictions is None or return_predictions
        batches = super().predict(model, dataloaders, datamodule, keep, ckpt_path, weights_only)
        if output is not None and batches:
            _write_predictions(batches, Path(output))
            log.info("predict: %d predictions written to %s", sum(len(b["pred"]) for b in batches), output)
        return batches if return_predictions is not False else None


def _check_output_file(output: Path, *, overwrite: bool) -> None:
    """Refuses a ``predict --output`` that is a folder, or an existing file unless ``--overwrite true``."""
    if output.is_dir():
        raise InvalidConfigError(f"predict: --output {output} is a folder; give a file name, e.g. {output}/preds.csv.")
    if output.exists() and not overwrite:
        raise InvalidConfigError(
            f"predict: {output} already exists; pass --overwrite true to replace it, or another --output."
        )


def _write_predictions(batches: list[dict[str, Any]], path: Path) -> None:
    """Writes :meth:`AdversarialTraining.predict_step`'s outputs as one CSV row per sample."""
    import csv

    import torch

    columns = {name: torch.cat([b[name].detach().cpu() for b in batches]) for name in batches[0]}
    probs = columns.pop("probs")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        names = [n for n in ("index", "label", "pred", "adv_pred") if n in columns]
        writer.writerow([*names, *(f"prob_{k}" for k in range(probs.shape[1]))])
        for i in range(probs.shape[0]):
            writer.writerow([int(columns[n][i]) for n in names] + [f"{float(p):.6g}" for p in probs[i]])


class AdvSaveConfig(SaveConfigCallback):
    """Saves the fully resolved config next to the checkpoints (``fit``) and into the W&B run (every subcommand).
    Lightning adds no such callback in a ``fast_dev_run``."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        if stage == "fit":  # the run folder is a fit's: validate/test/evaluate must not overwrite its config.yaml
            ckpt = trainer.checkpoint_callback
            folder = Path(getattr(ckpt, "dirpath", None) or trainer.default_root_dir)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "config.yaml").write_text(text)
            except OSError as err:  # a read-only or full checkpoints folder: stop before training, in one line
                raise unwritable_folder(folder, err) from None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.config.update({"cli": self.config.as_dict()}, allow_val_change=True)
                Path(run.dir, "config.yaml").write_text(text)


class AdvTrainCLI(LightningCLI):
    """LightningCLI with advtrain's defaults, links and error messages, one precedence rule and safe checkpoints.

    For every subcommand given ``--ckpt_path``, values come from, highest first: explicit flags, ``--config`` files,
    the checkpoint's stored hyperparameters, advtrain's defaults. The checkpoint is read by
    :func:`~advtrain.training.checkpoint.read_checkpoint` (whole, no code unless ``--trust_checkpoint true``, only
    allowed class paths) before any of its values is parsed. ``--ckpt_path last`` is
    ``checkpoints/<run_name>/last.ckpt``. ``fit`` holds its run folder while it runs
    (:class:`~advtrain.training.run_folder.RunLock`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._run_lock: RunLock | None = None
        self._args: list[str] | None = None
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self._run_lock is not None:
                self._run_lock.release()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # evaluate's trust_checkpoint is the top-level --trust_checkpoint of every subcommand (add_arguments_to_parser)
        return {**LightningCLI.subcommands(), "evaluate": {"model", "datamodule", "trust_checkpoint"}}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("parser_mode", "omegaconf+")
        # ``python -m advtrain`` in usage lines and tips, not ``__main__.py`` (argv[0] of a ``-m`` run)
        if os.path.basename(sys.argv[0]) == "__main__.py":
            kwargs.setdefault("prog", "python -m advtrain")
        return super().init_parser(**kwargs)

    def instantiate_classes(self) -> None:
        """Instantiation errors are config errors (an impossible split size, a bad value): reported as such."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            if os.environ.get("ADVTRAIN_DEBUG"):
                raise
            raise InvalidConfigError(f"The configuration could not be instantiated: {_one_line(err)}") from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default="advtrain-${stamp:}",
                            help="Name of the run: W&B run name and checkpoints/<run_name>/ folder.")  # fmt: skip
        parser.add_argument("--trust_checkpoint", type=bool, default=False,
                            help="Allow a --ckpt_path file that needs code execution to load, or names classes "
                            "outside advtrain/torch/Lightning (only for files from a source you trust).")  # fmt: skip
        # The threat model as variables: recipes interpolate ${threat.eps} into the maximizer and the validation
        # attack, so one override (--threat.eps 0.1) moves both, and swapping the maximizer keeps the evaluation.
        parser.add_argument("--threat.norm", type=threat_norm, default="linf",
                            help="Norm of the threat model, for interpolation as ${threat.norm}: linf, l2 or l1, any "
                            "case (Linf, L2, L1); stored as linf/l2/l1.")  # fmt: skip
        parser.add_argument("--threat.eps", type=float, default=8 / 255,
                            help="Budget of the threat model, for interpolation as ${threat.eps}.")  # fmt: skip
        for key in ("num_classes", "image_shape", "mean", "std"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, (list, tuple)):  # kept to re-parse with the checkpoint's layer
            self._args = list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's private hook (run between parsing and instantiation), which loads ``--ckpt_path``
        with ``torch.load`` and merges its hyperparameters *over* the parsed config (so they beat explicit flags, and
        a foreign ``class_path`` is imported before any check). Here the file is checked first, then the command line
        is parsed again with the checkpoint's hyperparameters as a config layer right after the defaults: the user's
        ``--config`` files and flags (an explicit ``null`` too) override it key by key."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if subcommand == "evaluate" and config.get("robustbench"):
            self._use_robustbench_dataset(config)  # a plain state dict: no hyperparameters to layer
            return
        folder = run_folder(config.run_name)
        path = resolve_checkpoint(config.get("ckpt_path"), folder)
        if path is None:
            return
        checkpoint = read_checkpoint(path, trust=bool(config.get("trust_checkpoint")))
        layer = stored_hyperparameters(checkpoint)
        if layer:
            if self._args is None or subcommand not in self._args:
                raise InvalidConfigError("--ckpt_path with hyperparameters needs the arguments as a list of strings.")
            at = self._args.index(subcommand) + 1
            text = yaml.safe_dump({"model": layer}, sort_keys=False)
            try:
                self.config = self.parser.parse_args([*self._args[:at], "--config", text, *self._args[at:]])
            except SystemExit:
                log.error("(The hyperparameters stored in %s were parsed as a config layer under yours.)", path)
                raise
        self.config[subcommand].ckpt_path = str(path)
        if subcommand == "fit":
            log.info("Resuming from %s, saved at epoch %s (global step %s).", path, checkpoint.get("epoch", "?"),
                     checkpoint.get("global_step", "?"))  # fmt: skip

    def _use_robustbench_dataset(self, config: Any) -> None:
        """``evaluate --robustbench``: the model's dataset (``--robustbench_dataset``, else the file's RobustBench
        layout, else CIFAR-10) becomes the data, as a config layer right after the defaults, so ``--config`` files
        and ``--data`` flags still choose otherwise (and ``--data.init_args.root`` applies to it)."""
        from advtrain.models.robustbench import robustbench_layout

        dataset = config.get("robustbench_dataset") or robustbench_layout(config.get("ckpt_path"))[0] or "cifar10"
        datamodule = {"cifar10": "advtrain.data.CIFAR10DataModule", "cifar100": "advtrain.data.CIFAR100DataModule"}
        if dataset not in datamodule or self._args is None or "evaluate" not in self._args:
            return  # ImageNet: advtrain has no datamodule for it; the user's --data
        at = self._args.index("evaluate") + 1
        text = yaml.safe_dump({"data": {"class_path": datamodule[dataset]}})
        self.config = self.parser.parse_args([*self._args[:at], "--config", text, *self._args[at:]])

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        # A private LightningCLI method (as _parse_ckpt_path; both checked with pytorch-lightning 2.6, and exercised
        # by tests/test_checkpoint_cli.py): it passes a subcommand only its method's own arguments. The top-level
        # --trust_checkpoint reaches evaluate as its argument, and Lightning's own loader in fit/validate/test/predict
        # as weights_only=False (the file was checked by _parse_ckpt_path already).
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        trust = bool(self.config_init[subcommand].get("trust_checkpoint"))
        if subcommand == "evaluate":
            kwargs["trust_checkpoint"] = trust
        elif trust and "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = False
        return kwargs

    def before_instantiate_classes(self) -> None:
        """``fit`` (rank 0, not a ``fast_dev_run``, which writes nothing) takes its run folder: refused while another
        process holds it, or when it holds another run that this one does not resume."""
        if self.subcommand != "fit" or rank_zero_only.rank != 0:
            return
        config = self.config.fit
        if config.trainer.get("fast_dev_run"):
            return
        folder = run_folder(config.run_name)
        ckpt_path = config.get("ckpt_path")
        resuming = ckpt_path is not None and Path(ckpt_path).resolve().parent == folder.resolve()
        self._run_lock = RunLock(folder, resuming=resuming)

    def _after(self) -> None:
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and self.trainer.is_global_zero and logger._experiment is not None:
                run = logger.experiment
                if getattr(run.settings, "_offline", False) or os.environ.get("WANDB_MODE") == "offline":
                    log.info("W&B run saved offline in %s; upload it later with: wandb sync %s", run.dir,
                             Path(run.dir).parent)  # fmt: skip

    after_fit = after_validate = after_test = after_predict = _after

    def before_fit(self) -> None:
        """On resume (``--ckpt_path``), the W&B logger continues the checkpoint's run instead of starting a new one."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None:
            return
        from advtrain.training.resume import resume_wandb_run

        resume_wandb_run(self.trainer, ckpt_path)  # the file itself: _parse_ckpt_path resolved "last"


def _one_line(err: Exception) -> str:
    """A jsonargparse instantiation error in one line: a class that failed inside a Union (``maximizer: PGD | None``)
    is reported as the class and its own message, without the alternatives that were also tried."""
    text = str(err)
    if "Does not validate against any of the Union subtypes" not in text:
        return text
    reasons = [line[4:] for line in text.splitlines() if line.startswith("  - ") and "Expected a <class" not in line]
    cls = re.search(r"class_path='([\w.]+)'", text)
    return f"{cls.group(1) if cls else 'a component'}: {'; '.join(reasons) or text.splitlines()[0]}"


_WANDB_PROBE_TIMEOUT_S = 3.0


def _configure_wandb() -> None:
    """Without an API key W&B runs offline instead of prompting; with a key but no route to the W&B server it runs
    offline with a warning instead of blocking about 2 minutes in ``wandb.init``."""
    if os.environ.get("WANDB_MODE"):
        return
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if os.environ.get("WANDB_API_KEY") or _netrc_has_key(base_url):
        unreachable = _wandb_unreachable(base_url)
        if unreachable:
            os.environ["WANDB_MODE"] = "offline"
            log.warning("W&B API key found, but %s; logging to W&B offline (WANDB_MODE=offline). Upload the run "
                        "later with `wandb sync <run folder>` (printed at the end).", unreachable)  # fmt: skip
        return
    os.environ["WANDB_MODE"] = "offline"
    log.info("No W&B API key found: logging to W&B in offline mode (WANDB_MODE=offline).")


def _netrc_has_key(base_url: str) -> bool:
    """Whether the netrc file (``$NETRC``, else ``~/.netrc``, as ``wandb login`` writes it) holds a login for the
    W&B server's host (``api.wandb.ai`` or a self-hosted ``WANDB_BASE_URL``)."""
    import netrc
    from urllib.parse import urlparse

    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    host = urlparse(base_url if "://" in base_url else f"https://{base_url}").hostname or base_url
    if not path.is_file():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return host in path.read_text(errors="ignore")


def _wandb_unreachable(base_url: str, timeout: float = _WANDB_PROBE_TIMEOUT_S) -> str | None:
    """Why the W&B server at ``base_url`` does not answer (``GET /healthz`` with a 2xx within ``timeout`` seconds,
    through the environment's proxies as wandb itself goes), or ``None`` when it does."""
    import urllib.error
    import urllib.request

    url = (base_url if "://" in base_url else f"https://{base_url}").rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - the user's W&B URL
            if 200 <= response.status < 300:
                return None
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (OSError, ValueError) as err:  # URLError, timeouts, refused or reset connections, a malformed URL
        reason = getattr(err, "reason", err)
        return f"the W&B server {base_url} cannot be reached ({reason or err.__class__.__name__})"
    return f"{url} answered HTTP {status}, not a W&B server (set WANDB_MODE=online to skip this check)"


def build_cli(args: list[str] | None = None, *, run: bool = True) -> AdvTrainCLI:
    """Builds (and with ``run`` runs) the CLI; ``run=False`` parses a config without a subcommand and instantiates
    the trainer, model and data, as the tests of every recipe do."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    AdvArgumentParser.cli_args = list(sys.argv[1:] if args is None else args)
    kwargs = {"default_config_files": [str(DEFAULTS)], "parser_mode": "omegaconf+"}
    parser_kwargs = {name: dict(kwargs) for name in AdvTrainCLI.subcommands()} if run else kwargs
    return AdvTrainCLI(
        AdversarialTraining,
        AdvDataModule,
        subclass_mode_data=True,
        trainer_class=AdvTrainer,
        save_config_callback=AdvSaveConfig,
        save_config_kwargs={"save_to_log_dir": False},
        auto_configure_optimizers=False,
        parser_kwargs=parser_kwargs,
        parser_class=AdvArgumentParser,
        args=args,
        run=run,
    )


def _subcommand(args: list[str] | None) -> str:
    """The subcommand of a command line (``fit``, ``evaluate``, ...), or ``""``."""
    words = sys.argv[1:] if args is None else args
    return next((w for w in words if w in AdvTrainCLI.subcommands()), "")


def main(args: list[str] | None = None) -> AdvTrainCLI:
    """Entry point of ``python -m advtrain`` and the ``advtrain`` script.

    Errors caused by the user's input (a dataset not on disk, a bad checkpoint, images outside [0, 1], labels out
    of range) are printed as one message, without a traceback, and exit with status 2.
    """
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        # Nobody configured logging (plain CLI use): print advtrain's messages; otherwise (an application or pytest
        # configured the root logger) they propagate there.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[advtrain] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    _configure_wandb()
    tune_cpu_allocator()  # freed activations stay in the heap: no page faults per step on CPU (advtrain.runtime)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning's own calls, not actionable
    # The resolved config.yaml is written into the checkpoint folder before ModelCheckpoint looks at it.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    from omegaconf.errors import OmegaConfBaseException

    try:
        return build_cli(args)
    except UserError as err:
        log.error("%s", err)
        raise SystemExit(2) from None
    except OmegaConfBaseException as err:  # raised by jsonargparse's omegaconf+ mode past its own error handling
        key = getattr(err, "full_key", None)
        where = f" in {key.removeprefix(f'{_subcommand(args)}.')}" if key else ""
        log.error("Config error%s: %s. Fix the ${...} reference or define the key it names.", where,
                  str(err).splitlines()[0])  # fmt: skip
        raise SystemExit(2) from None
