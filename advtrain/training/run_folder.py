"""Run folders, ``checkpoints/<run_name>/``: a valid name, one run per folder, one process at a time, and
``--ckpt_path last`` meaning this run's own ``last.ckpt``."""

from __future__ import annotations

import difflib
import logging
import os
import socket
from pathlib import Path

from advtrain.errors import UserError

log = logging.getLogger(__name__)

RUNS_ROOT = Path("checkpoints")
LOCK_NAME = ".lock"
# What makes a folder a run's: a later fit under the same name would overwrite or mix these.
_RUN_FILES = ("*.ckpt", "config.yaml")


class RunFolderError(UserError, ValueError):
    """An invalid run name, a run folder already holding another run or in use, or no run to resume."""


def run_folder(run_name: str, root: Path = RUNS_ROOT) -> Path:
    """The folder of the run ``run_name``, after checking that the name stays inside ``root``.

    Raises:
        RunFolderError: for an empty name, a path separator or ``..`` in it.
    """
    name = str(run_name)
    bad = not name.strip() or "/" in name or "\\" in name or ".." in name or (os.altsep and os.altsep in name)
    if bad or name.startswith("."):
        raise RunFolderError(
            f"Invalid --run_name {name!r}: a run name must be non-empty, without '/', '\\' or '..', and not start "
            f"with '.' (the run is saved in {root}/<run_name>/)."
        )
    return root / name


def resolve_checkpoint(ckpt_path: str | Path | None, folder: Path) -> Path | None:
    """The file that ``--ckpt_path`` names: ``last`` is ``<folder>/last.ckpt`` (this run's, never another file);
    Lightning's other keywords (``best``, ``hpc``, ``registry``) and ``None`` give ``None``.

    Raises:
        RunFolderError: for ``last`` when the run folder or its ``last.ckpt`` does not exist.
    """
    if ckpt_path is None or str(ckpt_path) in ("best", "hpc", "registry"):
        return None
    if str(ckpt_path) != "last":
        return Path(ckpt_path)
    path = folder / "last.ckpt"
    if path.is_file():
        return path
    if not folder.is_dir():
        runs = sorted(p.name for p in folder.parent.glob("*") if p.is_dir()) if folder.parent.is_dir() else []
        close = difflib.get_close_matches(folder.name, runs, n=3)
        listed = f"Runs in {folder.parent}/: {', '.join(runs) or 'none'}."
        hint = f"Did you mean: {', '.join(close)}?" if close else listed
        raise RunFolderError(f"--ckpt_path last: there is no run {folder.name!r} to resume (no {folder}/). {hint}")
    raise RunFolderError(
        f"--ckpt_path last: {folder}/ holds no last.ckpt (the run stopped before the end of its first epoch?). "
        "Start it again under another --run_name, or pass the file to resume with --ckpt_path FILE."
    )


def unwritable_folder(folder: Path, err: OSError) -> RunFolderError:
    """The one-line error for a run folder that cannot be created or written to."""
    return RunFolderError(
        f"Cannot write to the checkpoint folder {folder} ({os.strerror(err.errno) if err.errno else err}): make it "
        "writable, or point the ModelCheckpoint dirpath (or --run_name) elsewhere."
    )


class RunLock:
    """The run folder of a ``fit``, held by one process: refused while another live process holds it, or when the
    folder holds another run (checkpoints or a ``config.yaml``) that this one does not resume.

    The lock is ``<folder>/.lock`` (created atomically, holding the process id and host); :meth:`release` removes
    it. A lock left by a process that no longer runs on this host (a killed run) is taken over, with one line.

    Args:
        folder: the run folder.
        resuming: the run continues from a checkpoint inside ``folder`` (``--ckpt_path last``).
    """

    def __init__(self, folder: Path, *, resuming: bool) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        # The folders this lock creates, deepest first: removed again by release() if the run leaves them empty (a
        # run refused at instantiation, e.g. for a bad config value, leaves nothing behind).
        self._created = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file where a folder should be, a read-only or full disk
            raise unwritable_folder(folder, err) from None
        self._take()
        try:
            held = sorted({p.name for pattern in _RUN_FILES for p in folder.glob(pattern)})
            if held and not resuming:
                raise RunFolderError(
                    f"{folder}/ already holds a run ({', '.join(held)}). Pass --ckpt_path last to resume it, or "
                    "choose another --run_name."
                )
        except BaseException:
            self.release()
            raise

    def _take(self) -> None:
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="ignore").split()
                if not _stale(owner):
                    who = f"process {owner[0]} on {owner[1]}" if len(owner) == 2 else "another process"
                    raise RunFolderError(
                        f"{self.folder}/ is in use by {who} (lock file {self.path}). Wait for that run to end or "
                        "choose another --run_name; if no run is using it, delete the lock file."
                    ) from None
                log.info("Taking over %s, left by process %s, which no longer runs.", self.path, owner[0])
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as out:
                out.write(me)
            return
        raise RunFolderError(f"{self.path}: another process took the lock at the same time; try again.")

    def release(self) -> None:
        """Removes the lock file if this process holds it, and the folders it created if they are left empty."""
        try:
            if self.path.read_text().split()[0] == str(os.getpid()):
                self.path.unlink()
        except (OSError, IndexError):
            pass
        for created in self._created:
            try:
                created.rmdir()  # only succeeds while empty
            except OSError:
                break


def _stale(owner: list[str]) -> bool:
    """A lock of a process that no longer runs on this host (other hosts' processes cannot be checked)."""
    if len(owner) != 2 or not owner[0].isdigit() or owner[1] != socket.gethostname():
        return False
    try:
        os.kill(int(owner[0]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
