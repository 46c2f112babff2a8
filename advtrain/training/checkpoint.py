"""Checkpoints of training runs: rebuilding the module from one, and writing them atomically. The safe reader
(:func:`read_checkpoint`, :class:`CheckpointError`) lives in :mod:`advtrain.safe_load`, below the models that also
read weight files, and is re-exported here."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from advtrain.errors import UserError
from advtrain.safe_load import TRUSTED_PREFIXES, CheckpointError, CheckpointNotFoundError, read_checkpoint
from advtrain.training.module import AdversarialTraining

__all__ = [
    "TRUSTED_PREFIXES",
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "load_training_module",
    "read_checkpoint",
    "stored_hyperparameters",
]

log = logging.getLogger(__name__)


def stored_hyperparameters(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The module's hyperparameters a checkpoint (read by :func:`read_checkpoint`) holds, as the ``model`` section
    of a config: plain dicts and lists, without Lightning's ``_instantiator`` key; a module saved under its own class
    (``_class_path``) becomes ``class_path`` + ``dict_kwargs``. Empty for a plain state dict."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    hparams = plain(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if "_class_path" in hparams:
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    return hparams


def load_training_module(path: str | Path, *, trust: bool = False, map_location: str | torch.device = "cpu"):
    """Rebuilds an :class:`~advtrain.training.AdversarialTraining` module (architecture, maximizer, validation
    attack) from one of its checkpoints, after :func:`read_checkpoint`'s safety checks.

    Args:
        path: a ``.ckpt`` written by advtrain.
        trust: see :func:`read_checkpoint`.
        map_location: where to put the weights.

    Returns:
        The module in eval mode.
    """
    ckpt = read_checkpoint(path, trust=trust)
    if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of advtrain (no state_dict/hyper_parameters). For a plain state "
            "dict, build the model with advtrain.models.create_model and load it with load_state_dict."
        )
    module = AdversarialTraining.load_from_checkpoint(path, map_location=map_location, weights_only=not trust)
    return module.eval()


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written (full disk, quota, permissions); the previous one is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it over the target: a write that
    fails (a full disk: ``ENOSPC``, a quota, a crash) never leaves a truncated ``last.ckpt`` behind, the previous
    checkpoint stays intact and the run stops with a message saying what to do."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: no rename there, Lightning's own write
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)  # a read-only parent fails here, with the same message
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            reason = os.strerror(err.errno) if err.errno else str(err)
            kept = f"the previous {target.name} is intact" if target.is_file() else f"no earlier {target.name} existed"
            raise CheckpointSaveError(
                f"Could not write the checkpoint {target} ({reason}); {kept}. Free space in {target.parent} (or point "
                "the checkpoint dirpath elsewhere) and resume with --ckpt_path last."
            ) from None
