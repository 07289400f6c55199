"""The teacher's features of the PGM sample, kept on disk so that a restart pays no teacher pass.

The teacher is frozen and the sample is fixed, so its box-crop features are extracted once per
run; the official code (DAVAR-Lab-ML, ``pgm_hook.py``) keeps them on disk too. The file holds a
key of everything the features depend on: the teacher's weights (a digest of its state dict as
loaded), the sample (its instances and their images' file names), the test-time input (size,
format, normalisation), the levels and strides, and the extraction's precision. A file whose
key differs, or that cannot be read, is named in a warning and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

FILE_NAME = "gkd_teacher_features.pth"
FORMAT = 1


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and values (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_cache_key(
    teacher_model: torch.nn.Module,
    instances: dict[str, Tensor],
    file_names: list[str],
    input_settings: dict,
    level_names: list[str],
    strides: list[int],
    autocast: bool,
) -> dict:
    """What the cached teacher features depend on, as a JSON-like dict.

    Args:
        teacher_model: the frozen teacher as it extracts (its buffers included).
        instances: the PGM sample (``sample_instances``).
        file_names: the file name of every sampled image, in sample order of first appearance.
        input_settings: the test-time input (sizes, format, pixel mean and std).
    """
    state = dict(teacher_model.state_dict())
    state.update({f"buffer:{k}": v for k, v in teacher_model.named_buffers()})
    sample = dict(instances)
    sample_digest = tensor_digest(sample)
    sample_digest = hashlib.sha256((sample_digest + "\0" + "\0".join(file_names)).encode())
    return {
        "format": FORMAT,
        "teacher_weights": tensor_digest(state),
        "sample": sample_digest.hexdigest(),
        "instances": len(instances["cls"]),
        "input": dict(input_settings),
        "levels": list(level_names),
        "strides": [int(s) for s in strides],
        "autocast": bool(autocast),
    }


class TeacherFeatureCache:
    """One cache file (``OUTPUT_DIR/gkd_teacher_features.pth``); ``path`` None: no file."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)

    def load(self, key: dict) -> list[Tensor] | None:
        """The cached features per level ((N, C) float32) when the file's key equals ``key``;
        None (with a warning that names the file and the reason) otherwise."""
        if self.path is None or not self.path.exists():
            return None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
            stored, feats = data["key"], data["features"]
            if not isinstance(feats, list) or not all(isinstance(f, Tensor) for f in feats):
                raise ValueError("'features' is not a list of tensors")
        except Exception as e:  # any unreadable file is rebuilt, whatever the reason
            logger.warning(
                f"PGM teacher cache {self.path} cannot be read ({type(e).__name__}: {e}); "
                "extracting the teacher's features again and rewriting it"
            )
            return None
        differ = sorted(k for k in set(key) | set(stored) if key.get(k) != stored.get(k))
        if not differ and (
            len(feats) != len(key["levels"])
            or any(f.ndim != 2 or f.shape[0] != key["instances"] for f in feats)
        ):
            differ = ["features' shapes " + str([tuple(f.shape) for f in feats])]
        if differ:
            logger.warning(
                f"PGM teacher cache {self.path} was written for another "
                f"{', '.join(differ)} than this run's; extracting the teacher's features again "
                "and rewriting it"
            )
            return None
        logger.info(f"PGM: the teacher's features of the sample are read from {self.path}")
        return feats

    def save(self, key: dict, feats: list[Tensor]) -> None:
        """Write atomically: to a temporary file beside it, then renamed over it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            torch.save({"key": key, "features": [f.contiguous() for f in feats]}, tmp)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        logger.info(f"PGM: the teacher's features of the sample are cached in {self.path}")
