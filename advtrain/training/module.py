"""The LightningModule: any registered classifier, a pluggable inner maximizer and an outer objective."""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from advtrain.attacks.base import Attack
from advtrain.engine.checks import check_inputs, check_labels, check_model_inputs
from advtrain.engine.modes import attack_context
from advtrain.errors import InvalidConfigError
from advtrain.maximizers.base import InnerMaximizer, Standard
from advtrain.maximizers.steps import StepOutput, TrainingStep
from advtrain.models import list_models
from advtrain.models.build import build_model, load_classifier_weights
from advtrain.training.awp import AWP, PerturbedWeights
from advtrain.training.divergence import DivergenceWatch, check_every_option
from advtrain.training.objectives import AdversarialCE, Objective
from advtrain.training.pairing import check_pairing
from advtrain.training.schedules import BudgetSchedule, total_steps_context

log = logging.getLogger(__name__)

# Lightning notes, on every fit with a datamodule, that the module's batch-transfer hooks are the ones it will call:
# they are meant to be (the host-side batch checks); a datamodule overriding them takes over, and the step then
# checks the batch itself.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_(before|after)_batch_transfer` in `LightningModule` but have passed in"
)

_COMPONENT_ARGS = (
    "maximizer", "objective", "optimizer", "lr_scheduler", "val_attack", "budget_schedule", "weight_perturbation"
)  # fmt: skip

# Built from the registry at import so that the CLI rejects an unknown name at parse time, listing the options.
ModelName = Literal[tuple(list_models())]  # type: ignore[valid-type]


class AdversarialTraining(pl.LightningModule):
    """Adversarial training of a registered classifier.

    Each training step is delegated to the step strategy the maximizer declares
    (:attr:`~advtrain.maximizers.InnerMaximizer.step_strategy`; the module names no maximizer): by default
    (:class:`~advtrain.maximizers.AdversarialStep`) the inner maximizer perturbs the batch (in attack mode, parameters
    frozen), then the outer objective is minimised with the model in train mode under Lightning's automatic
    optimisation; a maximizer that is a whole training step (YOPO, Free AT) brings a strategy in manual optimisation.
    The maximizer and the objective must pair (:func:`~advtrain.training.pairing.check_pairing`): a wrong pair stops at
    construction. Validation logs clean accuracy and, when ``val_attack`` is set, robust accuracy under it,
    re-checked with a fresh forward pass on the returned adversarial inputs.

    A training step never makes the host wait for the device (PGD, Fast AT, TRADES, bilateral; MMA, DDN and TR-L∞
    keep the syncs of their algorithms, YOPO none of its own): the batch is validated on the host before it is moved
    to the device (:meth:`on_before_batch_transfer`), so the maximizers skip their per-call checks; a non-finite loss
    or gradient is recorded on the device and read back every ``divergence_check_every`` steps, at epoch ends and
    before every checkpoint (:mod:`advtrain.training.divergence`); the step loss goes to the logger, which Lightning
    converts every ``log_every_n_steps`` steps, and not to the progress bar, which Lightning 2.6 converts after every
    batch whatever its refresh rate (the progress bar shows the epoch accuracy).

    Args:
        arch: registered model name (see :func:`advtrain.models.list_models`).
        arch_kwargs: extra keyword arguments for the model (e.g. ``{"width": 16}``).
        num_classes: number of classes (linked from the datamodule by the CLI).
        image_shape: (C, H, W) of the inputs (linked from the datamodule).
        mean: per-channel normalisation mean applied inside the model (linked from the datamodule).
        std: per-channel normalisation std (linked from the datamodule).
        maximizer: inner maximizer; :class:`~advtrain.maximizers.Standard` (clean training) by default.
        objective: outer objective; :class:`~advtrain.training.objectives.AdversarialCE` by default.
        optimizer: optimizer factory; SGD(lr=0.1, momentum=0.9, weight_decay=5e-4) by default.
        lr_scheduler: optional schedule factory; advtrain's schedules (``MultiStep``, ``Cosine``, ``OneCycle``)
            step every batch and take fractions of training; PyTorch schedulers step every epoch.
        val_attack: attack for robust validation accuracy (``None``: clean accuracy only).
        budget_schedule: optional schedule of the maximizer's budgets (:class:`~advtrain.training.BudgetRamp`): each
            training step runs the maximizer with every budget (ε and the step sizes measured against it) multiplied
            by the schedule's factor at the current global step, and logs ``train/eps`` (the scaled first budget) and
            ``train/budget_factor``; ``val_attack`` always attacks at the full budget.
        track_clean_train: also log clean accuracy/loss on the training batches (an extra no-grad forward in
            eval mode, which does not touch BatchNorm statistics).
        validate_batches: check every batch for images outside [0, 1] and labels out of range: on the host, before
            the batch moves to the device (no host sync, and a bad label never reaches CUDA, where it would be an
            unrecoverable device-side assert); a batch that is already on the device (a loader producing GPU tensors)
            is checked in the step instead, at the cost of a few host syncs. ``False`` skips both, and the
            maximizers do not re-check either.
        divergence_check_every: read the device-side record of non-finite losses and gradients every this many
            steps (and at epoch ends and before every checkpoint, whatever the value); training stops at most this
            many steps after the first bad step, and no checkpoint ever holds its weights. ``None`` (default):
            ``trainer.log_every_n_steps`` (50 when logging is off). ``1``: at once, before the bad step changes the
            weights in memory, at one host sync per step.
        init_weights: start from the classifier weights of a checkpoint (an advtrain ``.ckpt`` or a plain state dict,
            read without executing code) — e.g. DDN's CIFAR recipe fine-tunes a standard-trained model.
        weight_perturbation: adversarial weight perturbation (:class:`~advtrain.training.AWP`, Wu et al. 2020): each
            step's gradient is taken at weights moved up the objective's loss, and the perturbation is removed after
            the optimizer step (:meth:`optimizer_step`). ``None`` (default): no change to the step.
    """

    def __init__(
        self,
        *,
        arch: ModelName = "small_cnn",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        maximizer: InnerMaximizer | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        val_attack: Attack | None = None,
        budget_schedule: BudgetSchedule | None = None,
        track_clean_train: bool = True,
        validate_batches: bool = True,
        divergence_check_every: int | None = None,
        init_weights: str | None = None,
        weight_perturbation: AWP | None = None,
    ) -> None:
        super().__init__()
        # Through the CLI, Lightning records the components as their config (class_path + init_args), which
        # checkpoints can hold without pickling code; objects passed from Python are left out of the hparams.
        from_config = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if from_config else list(_COMPONENT_ARGS))
        self.model = build_model(arch, arch_kwargs or {}, num_classes, image_shape, mean, std)
        if init_weights is not None:
            load_classifier_weights(self.model, init_weights)
        self.num_classes = num_classes
        self.maximizer = maximizer if maximizer is not None else Standard()
        check_pairing(self.maximizer, objective)
        self.objective = objective if objective is not None else AdversarialCE()
        self.step_strategy: TrainingStep = self.maximizer.step_strategy()
        self.step_strategy.check(self.maximizer)
        self.automatic_optimization = self.step_strategy.automatic_optimization
        _check_weight_perturbation(weight_perturbation, self.step_strategy, self.maximizer)
        self.weight_perturbation = weight_perturbation
        self._perturbed: PerturbedWeights | None = None  # the current step's weight perturbation, until its removal
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        _try_scheduler(lr_scheduler)
        _check_val_attack(val_attack)
        self.val_attack = val_attack
        self.image_shape = tuple(image_shape)
        self.budget_schedule = budget_schedule
        if budget_schedule is not None:
            budget_schedule.check(self.maximizer.budget)
        self.track_clean_train = track_clean_train
        self.validate_batches = validate_batches
        self.divergence_check_every = check_every_option(divergence_check_every)
        self._divergence = DivergenceWatch()
        self._checked_outputs = False  # the first training batch's logits are checked for probabilities
        self._host_checked = False  # on_before_batch_transfer checked the batch now being moved to the device
        self._checked_inputs: weakref.ref | None = None  # the device-side inputs of that batch
        self._where = dict(epoch=0, batch=0, step=0)  # the current training step, for the divergence record

        # The labels are checked with the batch (on the host): the metrics' own argument checks would read them back
        # from the device every step. The training loss's NaN check is off for the same reason (a NaN stops training).
        acc = dict(num_classes=num_classes, average="micro", validate_args=False)
        self.train_acc = MulticlassAccuracy(**acc)
        self.train_clean_acc = MulticlassAccuracy(**acc)
        self.train_clean_loss = MeanMetric(nan_strategy="disable")
        self.val_clean_acc = MulticlassAccuracy(**acc)
        self.val_robust_acc = MulticlassAccuracy(**acc)
        self.val_loss = MeanMetric()
        self.test_clean_acc = MulticlassAccuracy(**acc)
        self.test_robust_acc = MulticlassAccuracy(**acc)

    #: ``predict`` also predicts on the validation attack's adversarial inputs (``predict --adversarial true``).
    predict_adversarial: bool = False

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _check(self, x: Tensor, y: Tensor) -> None:
        if self.validate_batches:
            check_inputs(x)
            check_model_inputs(self.model, x, self.image_shape)
            check_labels(y, self.num_classes, x.shape[0])

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Validates the batch on the host, before Lightning moves it to the device: reading host tensors costs no
        device sync, and bad labels are stopped before they reach CUDA. A batch already on the device is left to
        the step's own check."""
        self._host_checked = False
        if self.validate_batches and _is_host_batch(batch):
            x, y, _ = _unpack(batch)
            self._check(x, y)
            self._host_checked = True
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Remembers which device tensor was checked on the host: the step then skips its own check of it.
        self._checked_inputs = weakref.ref(batch[0]) if self._host_checked else None
        self._host_checked = False
        return batch

    def _check_unless_checked_on_host(self, x: Tensor, y: Tensor) -> None:
        if self._checked_inputs is None or self._checked_inputs() is not x:
            self._check(x, y)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y, index = _unpack(batch)
        self._check_unless_checked_on_host(x, y)
        self._where = dict(epoch=self.current_epoch, batch=batch_idx, step=self.global_step)
        factor = self.budget_factor()
        with self.maximizer.budget_scaled(factor):
            out = self.step_strategy(self, x, y, index)
        if not self._checked_outputs:
            self._checked_outputs = True
            self._divergence.outputs(out.logits)
        self._log_training_step(out, x, y, factor)
        return out.loss

    # ------------------------------------------------------------------------ what a step strategy calls (StepHost)

    def record_loss(self, loss: Tensor) -> None:
        """Records a loss of the current step in the device-side divergence record (read every
        ``divergence_check_every`` steps; with 1, a non-finite loss raises here, before its optimizer step)."""
        self._divergence.loss(loss, **self._where)

    def perturb_weights(self, loss: Callable[[], Tensor]) -> None:
        """Applies ``weight_perturbation`` (AWP) for the current step, when it is active, with ``loss()`` for its
        ascent; :meth:`optimizer_step` removes it right after the step (or at once if the step raises)."""
        awp = self.weight_perturbation
        if awp is not None and awp.active(self.current_epoch):
            self._perturbed = awp.perturb(self.model, loss)

    # ------------------------------------------------------------------------ training metrics

    def _log_training_step(self, out: StepOutput, x: Tensor, y: Tensor, factor: float) -> None:
        prefix = "train/adv" if out.adversarial else "train/clean"
        self.train_acc.update(out.logits.detach(), y)
        # Not in the progress bar: Lightning would convert the step value to a Python number after every batch.
        # sync_dist: the epoch mean of a plain tensor is this rank's own unless reduced over the DDP ranks (Metric
        # objects, such as train_acc, reduce themselves).
        self.log(f"{prefix}_loss", out.loss.detach(), on_step=True, on_epoch=True, sync_dist=True)
        self.log(f"{prefix}_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        # A Python number would go to the device as a blocking copy from host memory (Lightning's torch.tensor(lr,
        # device=...)); torch.full passes it to a fill kernel instead. Same float32 value, same epoch mean.
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self._log_epoch_mean("train/lr", lr, x.device)
        if self.budget_schedule is not None and self.maximizer.budget is not None:
            self._log_epoch_mean("train/eps", factor * self.maximizer.budget, x.device)
            self._log_epoch_mean("train/budget_factor", factor, x.device)
        if self.track_clean_train and out.adversarial:
            with torch.no_grad(), attack_context(self.model, "eval"):
                clean_logits = self.model(x)
            self.train_clean_loss.update(torch.nn.functional.cross_entropy(clean_logits, y))
            self.train_clean_acc.update(clean_logits, y)
            self.log("train/clean_loss", self.train_clean_loss, on_step=False, on_epoch=True)
            self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True)

    def _log_epoch_mean(self, name: str, value: float, device: torch.device) -> None:
        self.log(name, torch.full((), value, device=device), on_step=False, on_epoch=True, sync_dist=True)

    def setup(self, stage: str) -> None:
        if self.weight_perturbation is not None and stage == "fit" and self.trainer.accumulate_grad_batches > 1:
            raise InvalidConfigError(
                "model.weight_perturbation (AWP) is removed after every optimizer step and cannot span the batches of "
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}: set it to 1."
            )

        strategy = self.trainer.strategy
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        partial = self.step_strategy.partial_backward
        if partial and isinstance(strategy, DDPStrategy) and isinstance(kwargs, dict):
            # A step with several backward passes, some reaching only part of the weights (YOPO): DDP must look for
            # unused parameters or it stops at the first of them. Set here, before the strategy wraps the model.
            if not kwargs.get("find_unused_parameters"):
                kwargs["find_unused_parameters"] = True
                log.info("%s under DDP: find_unused_parameters=True (several partial backward passes per step).",
                         type(self.maximizer).__name__)  # fmt: skip

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Lightning's step (the closure runs the training step and the backward pass inside it); then the weight
        perturbation of that step, if any, is removed, keeping the optimizer's update (:class:`AWP`)."""
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            if self._perturbed is not None:
                AWP.restore(self._perturbed)
                self._perturbed = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A finite loss can still give non-finite gradients (a 0/0 in a custom layer, an overflow): recorded here, and
        # read before any checkpoint is written, so that the checkpoints on disk stay good (with
        # divergence_check_every=1, before this step writes them into the weights). With fp16 loss scaling, inf
        # gradients are expected now and then: the scaler skips those steps itself.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._divergence.gradients(grads, epoch=self.current_epoch, batch=self._where["batch"], step=self.global_step)

    def budget_factor(self) -> float:
        """The budget schedule's factor at the current global step (1.0 without a schedule): a Python float from the
        Trainer's step counters, so it costs no device work and a resumed run continues where it stopped."""
        if self.budget_schedule is None:
            return 1.0
        batches = self.trainer.num_training_batches
        per_epoch = None if math.isinf(batches) else max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        # Counted in batches: a maximizer taking several optimizer steps per batch (Free AT) moves global_step faster.
        step = self.global_step // self.maximizer.steps_per_batch
        return self.budget_schedule.factor(step, steps_per_epoch=per_epoch, budget=self.maximizer.budget)

    # ------------------------------------------------------------------------ reading the divergence record

    def on_train_start(self) -> None:
        every = self.divergence_check_every
        if every is None:
            every = self.trainer.log_every_n_steps or 50
        self._divergence.every = every

    def _read_divergence(self) -> None:
        self._divergence.check(now=self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._divergence.step_done():
            self._read_divergence()

    def on_validation_start(self) -> None:
        self._read_divergence()  # no validation (nor a checkpoint it would trigger) on diverged weights

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called while Lightning builds the checkpoint, before the file is written: raising here keeps the previous
        # checkpoint as the last one on disk.
        self._read_divergence()

    def on_train_end(self) -> None:
        self._read_divergence()

    def on_train_epoch_end(self) -> None:
        self._read_divergence()
        self.step_strategy.on_train_epoch_end(self)  # manual optimisation: epoch-wise schedulers step here

    def _evaluate(self, batch: Sequence[Tensor], clean_acc, robust_acc, stage: str) -> None:
        x, y, _ = _unpack(batch)
        self._check_unless_checked_on_host(x, y)
        with torch.no_grad():
            logits = self.model(x)
        clean_acc(logits, y)
        self.log(f"{stage}/clean_acc", clean_acc, prog_bar=True)
        if stage == "val":
            self.val_loss(torch.nn.functional.cross_entropy(logits, y))
            self.log("val/loss", self.val_loss)
        if self.val_attack is not None:
            robust_acc(self._val_attack_logits(x, y), y)
            self.log(f"{stage}/robust_acc", robust_acc, prog_bar=True)

    def _val_attack_logits(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits on ``val_attack``'s adversarial inputs, from a fresh forward pass in eval mode: the framework, not the
        attack, decides success. Lightning runs validation and prediction under no_grad; attacks need input
        gradients."""
        with torch.enable_grad():
            result = self.val_attack(self.model, x, y)
        with torch.no_grad(), attack_context(self.model, "eval"):
            return self.model(result.adv)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_clean_acc, self.val_robust_acc, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_clean_acc, self.test_robust_acc, "test")

    def predict_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-sample predictions: ``index`` (position in the split; -1 for batches without one), ``label``,
        ``pred`` (the predicted class), ``probs`` (softmax) and, with :attr:`predict_adversarial`, ``adv_pred``: the
        prediction on the validation attack's adversarial input (re-checked with a fresh forward pass)."""
        x, y, index = _unpack(batch)
        self._check_unless_checked_on_host(x, y)
        with torch.no_grad():
            probs = self.model(x).float().softmax(dim=1)
        out = {"index": index if index is not None else torch.full_like(y, -1), "label": y, "pred": probs.argmax(1),
               "probs": probs}  # fmt: skip
        if self.predict_adversarial:
            if self.val_attack is None:
                raise InvalidConfigError("predict --adversarial true needs model.val_attack; the model has none.")
            out["adv_pred"] = self._val_attack_logits(x, y).argmax(1)
        return out

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        with total_steps_context(int(self.trainer.estimated_stepping_batches)):
            scheduler = self.scheduler_factory(optimizer)
        interval = getattr(scheduler, "interval", "epoch")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def _is_host_batch(batch: Any) -> bool:
    """Whether ``batch`` is an ``(inputs, labels[, index])`` sequence whose inputs and labels are host tensors."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        return False
    return all(isinstance(t, Tensor) and t.device.type == "cpu" for t in batch[:2])


def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    if len(batch) == 2:
        return batch[0], batch[1], None
    raise ValueError(f"Batches must be (inputs, labels) or (inputs, labels, index); got {len(batch)} elements.")


def _try_scheduler(factory: LRSchedulerCallable | None) -> None:
    """Builds the learning-rate schedule once on a throwaway optimizer, so that a bad argument (a MultiStep milestone
    outside (0, 1)) stops the run at instantiation, before loggers and checkpoint folders are created."""
    if factory is None:
        return
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with total_steps_context(100):
        factory(optimizer)


def _check_weight_perturbation(awp: AWP | None, strategy: TrainingStep, maximizer: InnerMaximizer) -> None:
    if awp is not None and not strategy.automatic_optimization:
        raise InvalidConfigError(
            f"model.weight_perturbation: AWP perturbs the weights around the optimizer step Lightning takes; "
            f"{type(maximizer).__name__} takes its own optimizer steps ({type(strategy).__name__}). Use AWP with an "
            "automatic-optimisation maximizer (PGD, FastFGSM, TRADES, ...) or set weight_perturbation: null."
        )


def _check_val_attack(val_attack: Attack | None) -> None:
    if getattr(val_attack, "targeted", False):
        raise InvalidConfigError(
            "model.val_attack: a targeted attack (targeted=True) would take the true labels as its targets "
            "(already reached: nothing is attacked); use targeted=False."
        )
