"""Reading checkpoint and weight files without executing code from them (unless the user says they trust the file).

Below both :mod:`advtrain.models` (which loads classifier weights) and :mod:`advtrain.training` (which resumes runs):
it imports nothing else of advtrain but its errors. :mod:`advtrain.training.checkpoint` re-exports its names.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from advtrain.errors import UserError

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
