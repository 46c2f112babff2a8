"""Loading checkpoints without executing code from them (unless the user says they trust the file)."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from advtrain.errors import UserError

log = logging.getLogger(__name__)

# Class paths a checkpoint of this project may name; anything else is refused unless trusted.
TRUSTED_PREFIXES = ("advtrain.", "torch.", "pytorch_lightning.", "lightning.", "torchmetrics.")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: truncated, corrupt, or asking to run untrusted code."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No file at the checkpoint path."""


def read_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Reads a checkpoint file into a dict on the CPU.

    Without ``trust`` the file is read with ``torch.load(weights_only=True)``, which refuses any pickled object
    that would need arbitrary code to rebuild, and every ``class_path`` it names must belong to advtrain,
    torch, Lightning or torchmetrics.

    Args:
        path: the checkpoint file.
        trust: allow full unpickling and any class path (only for files from a source you trust).

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): if there is no such file.
        CheckpointError: if the file is truncated/corrupt or would execute code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"No checkpoint at {path.resolve()}: check --ckpt_path (runs save theirs under "
                                      "checkpoints/<run_name>/).")  # fmt: skip
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} contains pickled objects that would run code when loaded ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0]}). It was not loaded. If you trust its source, pass trust_checkpoint=True "
            "(CLI: --trust_checkpoint true)."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}). Use another checkpoint, e.g. last.ckpt."
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(ckpt).__name__}).")
    if not trust:
        untrusted = sorted(
            {p for p in _class_paths(ckpt.get("hyper_parameters", {})) if not p.startswith(TRUSTED_PREFIXES)}
        )
        if untrusted:
            raise CheckpointError(
                f"{path} asks to import {untrusted}, outside advtrain/torch/Lightning. It was not loaded. If you trust "
                "its source, pass trust_checkpoint=True (CLI: --trust_checkpoint true)."
            )
    return ckpt


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


def _class_paths(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("class_path", "_class_path", "_instantiator") and isinstance(value, str):
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _class_paths(value)


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
    from advtrain.training.module import AdversarialTraining

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
