"""The LightningModule: any registered classifier, a pluggable inner maximizer and an outer objective."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from advtrain.attacks.base import Attack
from advtrain.engine.checks import check_inputs, check_labels, warn_if_probabilities
from advtrain.engine.modes import attack_context
from advtrain.errors import TrainingDivergedError
from advtrain.maximizers.base import InnerMaximizer, Standard
from advtrain.models import create_model, list_models
from advtrain.training.objectives import AdversarialCE, Objective, ObjectiveOutput
from advtrain.training.schedules import total_steps_context

log = logging.getLogger(__name__)

_COMPONENT_ARGS = ("maximizer", "objective", "optimizer", "lr_scheduler", "val_attack")

# Built from the registry at import so that the CLI rejects an unknown name at parse time, listing the options.
ModelName = Literal[tuple(list_models())]  # type: ignore[valid-type]


class AdversarialTraining(pl.LightningModule):
    """Adversarial training of a registered classifier.

    Each training step asks the inner maximizer for a perturbation of the batch (in attack mode, parameters
    frozen), then minimises the outer objective with the model in train mode. Validation logs clean accuracy
    and, when ``val_attack`` is set, robust accuracy under it, re-checked with a fresh forward pass on the
    returned adversarial inputs.

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
        track_clean_train: also log clean accuracy/loss on the training batches (an extra no-grad forward in
            eval mode, which does not touch BatchNorm statistics).
        validate_batches: check every batch for images outside [0, 1] and labels out of range.
        init_weights: start from the classifier weights of a checkpoint (an advtrain ``.ckpt`` or a plain state dict,
            read without executing code) — e.g. DDN's CIFAR recipe fine-tunes a standard-trained model.
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
        track_clean_train: bool = True,
        validate_batches: bool = True,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        # Through the CLI, Lightning records the components as their config (class_path + init_args), which
        # checkpoints can hold without pickling code; objects passed from Python are left out of the hparams.
        from_config = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if from_config else list(_COMPONENT_ARGS))
        self.model = _build_model(arch, arch_kwargs or {}, num_classes, image_shape, mean, std)
        if init_weights is not None:
            _load_classifier_weights(self.model, init_weights)
        self.num_classes = num_classes
        self.maximizer = maximizer if maximizer is not None else Standard()
        # Maximizers that build the weight gradients themselves (YOPO) need manual optimisation.
        self.automatic_optimization = not self.maximizer.manual_optimization
        self.objective = objective if objective is not None else AdversarialCE()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.val_attack = val_attack
        self.track_clean_train = track_clean_train
        self.validate_batches = validate_batches
        self._checked_outputs = False  # the first training batch's logits are checked for probabilities

        acc = dict(num_classes=num_classes, average="micro")
        self.train_acc = MulticlassAccuracy(**acc)
        self.train_clean_acc = MulticlassAccuracy(**acc)
        self.train_clean_loss = MeanMetric()
        self.val_clean_acc = MulticlassAccuracy(**acc)
        self.val_robust_acc = MulticlassAccuracy(**acc)
        self.val_loss = MeanMetric()
        self.test_clean_acc = MulticlassAccuracy(**acc)
        self.test_robust_acc = MulticlassAccuracy(**acc)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _check(self, x: Tensor, y: Tensor) -> None:
        if self.validate_batches:
            check_inputs(x)
            check_labels(y, self.num_classes, x.shape[0])

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y, index = _unpack(batch)
        self._check(x, y)
        if self.automatic_optimization:
            pert = self.maximizer(self.model, x, y, index)
            out = self.objective(self.model, x, y, pert)
        else:
            out = self._manual_step(x, y)
        if not torch.isfinite(out.loss):
            raise TrainingDivergedError(
                f"The training loss is {float(out.loss.detach())} at epoch {self.current_epoch}, batch {batch_idx}. "
                "Lower the learning rate or check the data; the last checkpoint is intact."
            )
        if not self._checked_outputs:
            self._checked_outputs = True
            warn_if_probabilities(out.logits)
        prefix = "train/adv" if out.adversarial else "train/clean"
        self.train_acc(out.logits.detach(), y)
        self.log(f"{prefix}_loss", out.loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log(f"{prefix}_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True)
        if self.track_clean_train and out.adversarial:
            with torch.no_grad(), attack_context(self.model, "eval"):
                clean_logits = self.model(x)
            self.train_clean_loss(torch.nn.functional.cross_entropy(clean_logits, y))
            self.train_clean_acc(clean_logits, y)
            self.log("train/clean_loss", self.train_clean_loss, on_step=False, on_epoch=True)
            self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True)
        return out.loss

    def setup(self, stage: str) -> None:
        from pytorch_lightning.strategies import DDPStrategy

        strategy = self.trainer.strategy
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if self.maximizer.manual_optimization and isinstance(strategy, DDPStrategy) and isinstance(kwargs, dict):
            # YOPO runs several backward passes per step, some reaching only part of the weights: DDP must look for
            # unused parameters or it stops at the first of them. Set here, before the strategy wraps the model.
            if not kwargs.get("find_unused_parameters"):
                kwargs["find_unused_parameters"] = True
                log.info("%s under DDP: find_unused_parameters=True (several partial backward passes per step).",
                         type(self.maximizer).__name__)  # fmt: skip

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # A finite loss can still give non-finite gradients (a 0/0 in a custom layer, an overflow): stop before the
        # step writes them into the weights, so that the checkpoints on disk stay good. With fp16 loss scaling,
        # inf gradients are expected now and then: the scaler skips those steps itself.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            raise TrainingDivergedError(
                f"Non-finite gradients at epoch {self.current_epoch}, step {self.global_step} (the loss was finite). "
                "Lower the learning rate, clip gradients (--trainer.gradient_clip_val) or check the model; the last "
                "checkpoint is intact and can be resumed with --ckpt_path last."
            )

    def _manual_step(self, x: Tensor, y: Tensor) -> ObjectiveOutput:
        """One optimizer step driven by a maximizer that accumulates its own gradients (YOPO)."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        step = self.maximizer.training_step(self.model, x, y, self.manual_backward)
        if torch.isfinite(step.loss):  # a non-finite loss is reported by the caller, and the weights stay untouched
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None and getattr(scheduler, "interval", "epoch") == "step":
                scheduler.step()
        return ObjectiveOutput(step.loss, step.logits, adversarial=True)

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            scheduler = self.lr_schedulers()
            if scheduler is not None and getattr(scheduler, "interval", "epoch") == "epoch":
                scheduler.step()

    def _evaluate(self, batch: Sequence[Tensor], clean_acc, robust_acc, stage: str) -> None:
        x, y, _ = _unpack(batch)
        self._check(x, y)
        with torch.no_grad():
            logits = self.model(x)
        clean_acc(logits, y)
        self.log(f"{stage}/clean_acc", clean_acc, prog_bar=True)
        if stage == "val":
            self.val_loss(torch.nn.functional.cross_entropy(logits, y))
            self.log("val/loss", self.val_loss)
        if self.val_attack is not None:
            # Lightning runs fit-time validation under no_grad; attacks need input gradients.
            with torch.enable_grad():
                result = self.val_attack(self.model, x, y)
            with torch.no_grad(), attack_context(self.model, "eval"):
                adv_logits = self.model(result.adv)  # the framework, not the attack, decides success
            robust_acc(adv_logits, y)
            self.log(f"{stage}/robust_acc", robust_acc, prog_bar=True)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_clean_acc, self.val_robust_acc, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_clean_acc, self.test_robust_acc, "test")

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


def _unpack(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    if len(batch) == 2:
        return batch[0], batch[1], None
    raise ValueError(f"Batches must be (inputs, labels) or (inputs, labels, index); got {len(batch)} elements.")


def _build_model(arch, arch_kwargs, num_classes, image_shape, mean, std):
    """Builds the classifier, passing the linked dataset facts only to models that take them."""
    from advtrain.models.registry import model_keywords

    accepted = model_keywords(arch)
    linked = {"num_classes": num_classes, "in_channels": image_shape[0], "input_size": image_shape[-1]}
    if mean is not None:
        linked["mean"] = tuple(mean)
    if std is not None:
        linked["std"] = tuple(std)
    kwargs = {k: v for k, v in linked.items() if accepted is None or k in accepted}
    kwargs.update(arch_kwargs)
    return create_model(arch, **kwargs)


def _load_classifier_weights(model: torch.nn.Module, path: str) -> None:
    """Loads classifier weights from an advtrain checkpoint (``model.*`` keys) or a plain state dict
    (RobustBench style: ``state_dict``/``model`` wrappers and DDP's ``module.`` prefixes are unwrapped)."""
    from advtrain.training.checkpoint import CheckpointError, read_checkpoint

    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"init_weights={path}: the weights do not fit the configured model: {err}") from None
