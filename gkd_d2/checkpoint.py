"""Reading and writing checkpoints: weights-only ``.pth`` loading with clear errors, atomic
saves, and detectron2's ``DetectionCheckpointer`` built on them (``GKDCheckpointer``)."""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any

import torch
from detectron2.utils import comm

from .compat import FileReadingCheckpointer

logger = logging.getLogger(__name__)


class CheckpointLoadError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or holds more than tensors."""


# torch's own opt-out of weights-only loading; honoured for files that need full unpickling
_TRUST_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


CHECKPOINT_SUFFIXES = (".pth", ".pkl", ".pyth")
# .pth files that a run writes and that are not model checkpoints: detectron2's COCO evaluator's
# predictions and proposals, gkd_d2's teacher feature cache
NOT_CHECKPOINTS = frozenset(
    ("instances_predictions.pth", "box_proposals.pth", "gkd_teacher_features.pth")
)
# how far below the nearest existing folder to look for checkpoints, and how many to name
_NEARBY_DEPTH, _NEARBY_LISTED, _NEARBY_SCANNED = 3, 8, 5000


def nearby_checkpoints(path: str) -> tuple[str, list[str]]:
    """Where to look instead of a missing checkpoint ``path``: the nearest existing folder
    above it and the checkpoint files (``.pth``, ``.pkl``, ``.pyth``) up to three levels
    below that folder, newest first (hidden folders and virtualenvs skipped).

    Returns:
        (the folder searched, up to 8 paths as given relative to the current folder when they
        are under it; empty when the folder is the filesystem root).
    """
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    if folder == os.path.dirname(folder):  # "/": too wide to search
        return folder, []
    found, scanned = [], 0
    base_depth = folder.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "site-packages")
        )
        if root.count(os.sep) - base_depth >= _NEARBY_DEPTH:
            dirs[:] = []
        for f in files:
            scanned += 1
            if f.endswith(CHECKPOINT_SUFFIXES) and f not in NOT_CHECKPOINTS:
                found.append(os.path.join(root, f))
        if scanned > _NEARBY_SCANNED:
            break
    found.sort(key=lambda f: os.path.getmtime(f), reverse=True)
    cwd = os.getcwd()
    shown = [os.path.relpath(f) if f.startswith(cwd + os.sep) else f for f in found]
    return folder, shown[:_NEARBY_LISTED]


def missing_checkpoint_message(path: str, named_by: str = "") -> str:
    """'Checkpoint ... not found' (or 'is a directory') with the nearest existing checkpoints;
    ``named_by`` says where the path came from (e.g. a last_checkpoint file)."""
    name = f"Checkpoint {path!r}" + (f" (named by {named_by!r})" if named_by else "")
    if os.path.isdir(path):
        what = f"{name} is a directory, not a checkpoint file"
    else:
        what = f"{name} not found (no such file)"
    folder, near = nearby_checkpoints(path if not os.path.isdir(path) else os.path.join(path, "x"))
    if near:
        return f"{what}. Nearest existing checkpoints (under {folder!r}, newest first): " + (
            ", ".join(near)
        )
    return f"{what}. No checkpoint file (.pth, .pkl) under {folder!r} either"


def _why_unreadable(path: str, error: BaseException) -> str:
    """A short, user-level reason why torch.load failed on ``path`` (its own messages talk about
    weights_only or miniz internals whatever the cause)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"it cannot be read ({e})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"the zip archive that torch.save writes ends early ({size} bytes, no end record)"
    if zipfile.is_zipfile(path):
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"its zip archive is damaged ({first[:200]})"
    return f"it is not a complete torch.save file ({size} bytes, starting {head!r})"


def _unsafe_globals(path: str) -> list[str]:
    """The Python globals an intact zip-format torch file needs beyond weights_only's allowlist
    (empty for a damaged or non-zip file)."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a damaged archive: reported as corrupt by the caller
        return []


def read_pth(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what is wrong.

    Weights-only loading unpickles tensors and plain containers only, so a file cannot run
    code. A file that needs more (e.g. numpy arrays, custom classes) is refused with the list of
    what it needs, unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (torch's own switch) says the
    user trusts it; a truncated or corrupt file is named as such.

    Raises:
        CheckpointLoadError: the file is missing (named as such, with the nearest existing
            checkpoints), truncated, corrupt, or needs full unpickling.
    """
    if not os.path.isfile(path):
        raise CheckpointLoadError(missing_checkpoint_message(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        error = e
    trusted = os.environ.get(_TRUST_ENV, "0").lower() in ("1", "y", "yes", "true")
    unsafe = _unsafe_globals(path)
    if trusted:
        logger.warning(
            "%s is set: loading %r with full unpickling (it can run code from the file)%s",
            _TRUST_ENV,
            path,
            f"; it needs {', '.join(unsafe)}" if unsafe else "",
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            error = e
    elif unsafe:
        raise CheckpointLoadError(
            f"Checkpoint {path!r} holds Python objects beyond tensors and plain containers "
            f"({', '.join(unsafe)}); gkd_d2 loads .pth files with torch.load(weights_only=True), "
            "which refuses them because unpickling them can run code from the file. If you "
            f"trust the file, rerun with {_TRUST_ENV}=1, or load it once with "
            "weights_only=False and re-save its tensors."
        ) from None
    raise CheckpointLoadError(
        f"Checkpoint {path!r} is truncated or corrupt: {_why_unreadable(path, error)}. It was "
        "probably cut short by a crash, a full disk or an interrupted copy or download."
    ) from None


class AtomicFile:
    """A file opened for writing whose content appears under its name only when it is closed
    without an exception: it is written to ``path.tmp``, synced, then renamed over ``path``, so
    that a crash mid-write leaves the previous file (and no truncated one) under that name."""

    def __init__(self, path: str, mode: str):
        self.path, self.tmp = path, f"{path}.tmp"
        self.file = open(self.tmp, mode)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


class AtomicWrites:
    """A path manager (iopath's interface) that opens local files for writing as
    :class:`AtomicFile`; everything else goes to the wrapped path manager."""

    def __init__(self, path_manager: Any):
        self.path_manager = path_manager

    def open(self, path: str, mode: str = "r", **kwargs: Any) -> Any:
        if "w" in mode and "://" not in path:
            return AtomicFile(path, mode)
        return self.path_manager.open(path, mode, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.path_manager, name)


class GKDCheckpointer(FileReadingCheckpointer):
    """detectron2's DetectionCheckpointer that reads ``.pth`` files weights-only
    (:func:`read_pth`), names a missing, truncated or corrupt file and says what to do, and
    writes checkpoints and ``last_checkpoint`` atomically (local folders; fvcore's own ``save``
    writes through :class:`AtomicWrites`).

    ``.pkl`` (detectron2 and Caffe2 model zoo) and ``.pyth`` (pycls) files are still read by
    detectron2, which unpickles ``.pkl`` files with ``pickle.load``: only load those from
    sources you trust.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.path_manager = AtomicWrites(self.path_manager)

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict:
        # fvcore asserts "Checkpoint ... not found!" itself: name the nearest ones instead
        if path and "://" not in path and comm.is_main_process() and not os.path.isfile(path):
            raise CheckpointLoadError(missing_checkpoint_message(path))
        return super().load(path, checkpointables=checkpointables)

    def read_file(self, filename: str) -> dict:
        if filename.endswith((".pkl", ".pyth")):
            try:
                return super().read_file(filename)
            except Exception as e:
                raise CheckpointLoadError(
                    f"Checkpoint {filename!r} is truncated or corrupt, or not a detectron2/"
                    f"Caffe2/pycls model file: {type(e).__name__}: {e}"
                ) from None
        loaded = read_pth(filename)
        if not isinstance(loaded, dict):
            raise CheckpointLoadError(
                f"Checkpoint {filename!r} holds a {type(loaded).__name__}, not a dict (a state "
                "dict or a {'model': state dict, ...} checkpoint)"
            )
        # DetectionCheckpointer's rule: a bare state dict is the model's
        return loaded if "model" in loaded else {"model": loaded}

    def _other_checkpoints(self, path: str) -> list[str]:
        others = [os.path.basename(f) for f in self.get_all_checkpoint_files()]
        return sorted(f for f in others if f != os.path.basename(path))

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        """As detectron2's, with the file named and a way out when it cannot be read: on resume,
        the checkpoint named by ``OUTPUT_DIR/last_checkpoint``; else ``path`` (MODEL.WEIGHTS)."""
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            tag = os.path.join(self.save_dir, "last_checkpoint")
            try:
                # (only the main process must have the file: detectron2 broadcasts it)
                if comm.is_main_process() and not os.path.isfile(last):
                    raise CheckpointLoadError(missing_checkpoint_message(last, tag))
                return self.load(last)
            except CheckpointLoadError as e:
                others = self._other_checkpoints(last)
                raise CheckpointLoadError(
                    f"{e}\nCannot resume from it. Other checkpoints in {self.save_dir!r}: "
                    f"{', '.join(others) if others else 'none'}. To resume from one, write its "
                    f"file name into {tag!r}; to start over, delete {tag!r}."
                ) from None
        try:
            # (only the main process must have the file: detectron2 broadcasts it; load()
            # names a missing one)
            return self.load(path, checkpointables=[])
        except CheckpointLoadError as e:
            raise CheckpointLoadError(
                f"{e}\nIt is MODEL.WEIGHTS: point MODEL.WEIGHTS at a good copy (or another "
                "checkpoint), or set it to '' to start from scratch."
            ) from None
