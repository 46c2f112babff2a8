"""Errors that mean "the user must change something", shown without a traceback by the CLI."""

from __future__ import annotations


class UserError(Exception):
    """Mixin for errors caused by the user's input or files; the CLI prints the message and exits with code 2."""


class InvalidInputError(UserError, ValueError):
    """Inputs or labels that break the contract (images in [0, 1], integer labels in range)."""


class InvalidConfigError(UserError, ValueError):
    """A configuration value that cannot work (an empty split, a negative size, ...)."""


class TrainingDivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the last checkpoint is intact (the CLI exits with code 2)."""
