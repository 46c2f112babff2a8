"""Robust evaluation during training and at ``validate``/``test``: a suite of attacks on a fixed, seeded subset."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from typing_extensions import override

from advtrain.errors import InvalidConfigError
from advtrain.evaluation.interpretability import check_percentiles
from advtrain.evaluation.report import RobustnessReport, accuracy_figure
from advtrain.evaluation.robust import evaluate_robustness, fusion_enabled, prepare_attacks
from advtrain.evaluation.sampling import seeded_subset
from advtrain.evaluation.suites import build_suite
from advtrain.evaluation.threat_model import resolve_threat

log = logging.getLogger(__name__)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, positions: torch.Tensor) -> None:
        self.dataset, self.positions = dataset, positions.tolist()

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.dataset[self.positions[i]]


class RobustEvaluation(pl.Callback):
    """Runs an evaluation suite every ``every_n_epochs`` validation epochs during ``fit``, and at every ``validate``
    and ``test``, on a fixed seeded subset of the validation (or test) split.

    Everything goes through :func:`advtrain.evaluation.evaluate_robustness`: minimal-norm attacks once, budgeted
    attacks as a cascade at every ε of the grid, every claim verified, the gradient-masking checks run (a fired
    check is a warning in the log and a ``robust/masking/<check>`` flag of 1). Logged to every Lightning logger
    (``robust/...`` keys, see :meth:`RobustnessReport.scalars`): clean accuracy; robust accuracy per attack and per
    ε; the worst case ``All``; success rates; mean and median norms; ρ mean and worst case; pass counts; time. A
    :class:`~pytorch_lightning.loggers.WandbLogger` also gets an accuracy-versus-ε table, line plot and figure.

    Under DDP each rank attacks whole batches of the subset (no sample twice) and the per-sample records are gathered
    once at the end (torchmetrics cat/sum states), so the numbers equal a single process's. Validation runs under
    ``no_grad`` (and ``validate``/``test`` maybe under inference mode): the callback re-enables gradients.

    Args:
        suite: ``"quick"`` (PGD-20), ``"apgd"`` (APGD-CE + APGD-DLR), ``"autoattack"`` (alias ``"standard"``) or
            ``"full"`` (the zoo), see :data:`advtrain.evaluation.SUITES` (no escalation during training).
        norm: threat norm (default: the module's ``val_attack``'s).
        eps: main budget (default: the module's ``val_attack``'s, which does not carry over to another ``norm``).
        eps_grid: budgets of the accuracy-versus-ε curves (``eps`` is always included).
        num_samples: size of the fixed subset (``None``: the whole split).
        batch_size: attack batch size.
        every_n_epochs: during ``fit``, evaluate after every n-th validation epoch (0: never during fit).
        seed: seeds the subset and the stochastic attacks.
        cascade: see :func:`advtrain.evaluation.attack_batch`.
        fuse: ``"auto"`` (fuse on CUDA only), ``True`` or ``False``: run each budgeted attack over the whole ε grid,
            and APGD-CE with APGD-DLR, in one call on a concatenated batch. Fewer, larger model calls for more
            per-sample passes: it pays where the subset's batches underfill the GPU and costs on a CPU (see
            :func:`advtrain.evaluation.attack_batch`).
        max_fused_batch: the most rows of one fused call.
        overrides: per-attack hyperparameters replacing the suite's, e.g. ``{"square": {"steps": 100}}``.
        tolerance: fraction of samples above which a masking check fires.
        prefix: prefix of the logged keys.
        interpretability: also score the attacks' adversarial examples by IS(ν) from the adversarial saliency map and
            the CAM/Grad-CAM (seed 002, §6): logged as ``{prefix}/<attack>/is_asm@<ν>``, ``is_asm_mean``,
            ``is_cam@<ν>``, ``is_cam_mean``; a W&B logger also gets the galleries of examples as images.
        is_percentiles: the percentiles ν of IS(ν) (default 30, 40, ..., 90).
        gallery_samples: examples per attack in the galleries.

    Example:
        >>> trainer = pl.Trainer(callbacks=[RobustEvaluation(suite="quick", num_samples=200)])  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        suite: str = "quick",
        norm: str | None = None,
        eps: float | None = None,
        eps_grid: Sequence[float] | None = None,
        num_samples: int | None = 500,
        batch_size: int = 100,
        every_n_epochs: int = 1,
        seed: int = 0,
        cascade: bool = True,
        fuse: str | bool = "auto",
        max_fused_batch: int = 1024,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        tolerance: float = 0.01,
        prefix: str = "robust",
        interpretability: bool = False,
        is_percentiles: Sequence[float] | None = None,
        gallery_samples: int = 4,
    ) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}.")
        self.suite, self.norm, self.eps = suite, norm, eps
        self.eps_grid = list(eps_grid) if eps_grid is not None else None
        self.num_samples, self.batch_size = num_samples, int(batch_size)
        self.every_n_epochs, self.seed, self.cascade = int(every_n_epochs), int(seed), bool(cascade)
        fusion_enabled(fuse, max_fused_batch, "cpu")  # validates both now, not at the first evaluation
        self.fuse, self.max_fused_batch = fuse, max_fused_batch
        self.overrides = dict(overrides or {})
        self.tolerance, self.prefix = float(tolerance), prefix
        self.interpretability = bool(interpretability)
        self.is_percentiles = check_percentiles(is_percentiles) if interpretability else is_percentiles
        if isinstance(gallery_samples, bool) or not isinstance(gallery_samples, int) or gallery_samples < 0:
            raise InvalidConfigError(f"gallery_samples must be an int >= 0, got {gallery_samples!r}.")
        self.gallery_samples = gallery_samples
        self.last_report: RobustnessReport | None = None
        self.history: list[dict[str, float]] = []
        if norm is not None and eps is not None:
            build_suite(suite, norm=norm, eps=eps, overrides=self.overrides)  # fail at construction, not at epoch 10

    def should_run(self, trainer: pl.Trainer) -> bool:
        """During ``fit``: every ``every_n_epochs``-th epoch, never in the sanity check; always in ``validate``."""
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.should_run(trainer):
            self.run(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run(trainer, pl_module, "test")

    def _threat(self, pl_module: pl.LightningModule) -> tuple[str, float]:
        """``norm`` and ``eps``, else the module's ``val_attack``'s (:func:`~advtrain.evaluation.resolve_threat`)."""
        val_attack = getattr(pl_module, "val_attack", None)
        norm, eps = resolve_threat(self.norm, self.eps, val_attack=val_attack, who="RobustEvaluation")
        if norm is None or eps is None:
            raise ValueError(
                "RobustEvaluation needs a threat model: pass norm and eps, or give the module a val_attack."
            )
        return norm, eps

    def _dataset(self, trainer: pl.Trainer, split: str):
        dm = trainer.datamodule
        dataset = getattr(dm, f"{split}_dataset", None) if dm is not None else None
        if dataset is None and split == "val" and dm is not None:
            dataset = getattr(dm, "test_dataset", None)  # val_size = 0: validation runs on the test split
        if dataset is None:
            loaders = trainer.val_dataloaders if split == "val" else trainer.test_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError(f"RobustEvaluation found no {split} dataset: use a datamodule with {split}_dataset.")
        return _Subset(dataset, seeded_subset(len(dataset), self.num_samples, self.seed))

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> RobustnessReport:
        """Evaluates ``pl_module.model`` (or the module itself) on the subset and logs the results."""
        norm, eps = self._threat(pl_module)
        entries = build_suite(self.suite, norm=norm, eps=eps, seed=self.seed, overrides=self.overrides)
        entries, _, _, _ = prepare_attacks(entries, norm=norm, eps=eps, eps_grid=self.eps_grid)
        model = getattr(pl_module, "model", pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            report = evaluate_robustness(
                model, self._dataset(trainer, split), entries, norm=norm, eps=eps, eps_grid=self.eps_grid,
                cascade=self.cascade, fuse=self.fuse, max_fused_batch=self.max_fused_batch,
                batch_size=self.batch_size, device=pl_module.device, progress=False,
                tolerance=self.tolerance, meta={"split": split, "epoch": trainer.current_epoch},
                interpretability=self.interpretability, is_percentiles=self.is_percentiles,
                gallery_samples=self.gallery_samples,
            )  # fmt: skip
        scalars = report.scalars(self.prefix)
        for key, value in scalars.items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=False)
        self.history.append(scalars)
        self.last_report = report
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    log_report_to_wandb(logger, report, self.prefix, trainer.global_step)
        return report

    @override
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def log_report_to_wandb(logger: WandbLogger, report: RobustnessReport, prefix: str = "robust", step: int = 0) -> None:
    """Logs an evaluation's accuracy-versus-ε table, line plot and figure to a W&B run, and the galleries of an
    evaluation with interpretability (``{prefix}/gallery/<name>``, through ``log_image``).

    Args:
        logger: the Lightning W&B logger.
        report: the evaluation report.
        prefix: key prefix.
        step: the step to log at (``trainer.global_step``).
    """
    import wandb

    rows = [
        [name, float(e), float(acc)]
        for name, (xs, ys) in report.curves().items()
        for e, acc in zip(xs, ys, strict=True)
    ]
    table = wandb.Table(data=rows, columns=["attack", "eps", "robust_acc"])
    fig = accuracy_figure(report)
    plot = wandb.plot.line(table, "eps", "robust_acc", stroke="attack", title="robust accuracy vs eps")
    logger.experiment.log(
        {
            f"{prefix}/accuracy_vs_eps_table": table,
            f"{prefix}/accuracy_vs_eps": plot,
            f"{prefix}/accuracy_vs_eps_figure": wandb.Image(fig),
            "trainer/global_step": step,
        }
    )
    if report.interpretability is not None:
        from advtrain.evaluation.gallery import figure_array, gallery_figures

        for stem, figure in gallery_figures(report.interpretability).items():
            logger.log_image(f"{prefix}/gallery/{stem.removeprefix('gallery_')}", [figure_array(figure)], step=step)


__all__ = ["RobustEvaluation", "log_report_to_wandb"]
