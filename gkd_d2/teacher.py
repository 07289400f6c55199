"""The frozen teacher detector: its own config, strictly checked weights, and feature extraction.

The teacher is a trained detectron2 model described by ``MODEL.TEACHER.*`` (see
``gkd_d2.config``). ``build_teacher`` loads it before any training starts, so a wrong checkpoint
stops the run at once instead of silently distilling from randomly initialised layers.
``FrozenTeacher`` is deliberately not an ``nn.Module``: stored on a student it stays out of the
student's parameters, state_dict, optimizer and DDP wrapper.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList
from detectron2.utils.file_io import PathManager
from torch import Tensor, nn

from .checkpoint import CheckpointLoadError, GKDCheckpointer, nearby_checkpoints
from .config import PROJECT_CONFIGS, ConfigError, check_supported, load_config, shipped_config

logger = logging.getLogger(__name__)

# Keys listed per category in a load error; the rest are counted.
_MAX_LISTED_KEYS = 20
# Channel orders that differ only by reversal, so a flip converts between them.
_FLIPPABLE_FORMATS = {"BGR", "RGB"}


class TeacherLoadError(RuntimeError):
    """The teacher's weights are absent, unreadable or do not match the teacher's config."""


def _resolve_config_file(name: str) -> str:
    """The teacher's config file of ``name``: a yaml path as is (``load_config`` has already
    made a path that a yaml names relative to that yaml), else a config of this project's
    ``configs/`` folder of that name, else a detectron2 model-zoo config of that name.

    The project folder makes detectron2's own idiom (``get_cfg(); add_gkd_config(cfg);
    cfg.merge_from_file(f)``, which does not resolve the name against ``f``) work on the
    shipped configs from any current folder.
    """
    if os.path.isfile(name):
        return name
    shipped = shipped_config(name)
    if shipped:
        return shipped
    # imported here: model_zoo imports pkg_resources, which setuptools >= 81 lacks, and a
    # teacher config given as a path never needs it
    from detectron2.model_zoo import get_config_file

    try:
        return get_config_file(name)
    except RuntimeError:
        # get_config_file raises RuntimeError for an unknown name; a missing path is the
        # user's real problem, so say that.
        raise FileNotFoundError(
            f"MODEL.TEACHER.CONFIG_FILE={name!r} is neither a file (a path relative to the yaml "
            f"that names it, or to the current folder {os.getcwd()!r}), nor a config of "
            f"gkd_d2's configs folder ({PROJECT_CONFIGS!r}), nor a detectron2 model-zoo config "
            "(e.g. 'COCO-Detection/retinanet_R_101_FPN_3x.yaml')"
        ) from None


def load_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """Build the teacher's own frozen config from the student's ``MODEL.TEACHER.*`` keys.

    The teacher runs on the student's ``MODEL.DEVICE``, and its ``MODEL.WEIGHTS`` is
    ``MODEL.TEACHER.WEIGHTS``.
    """
    name = cfg.MODEL.TEACHER.CONFIG_FILE
    if not name:
        raise ValueError(
            "MODEL.TEACHER.CONFIG_FILE is empty: set it to the teacher's detectron2 config "
            "(a yaml path or a model-zoo name)"
        )
    try:
        tcfg = load_config(_resolve_config_file(name), list(cfg.MODEL.TEACHER.OPTS))
    except ConfigError as e:
        # say it is the teacher's config, not the student's
        raise ConfigError(f"Teacher config (MODEL.TEACHER.CONFIG_FILE / OPTS): {e}") from None
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.MODEL.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


def _check_weights_path(weights: str, config_file: str = "") -> None:
    """Fail early on an empty or non-existent local weights path (URLs are checked on load)."""
    if not weights:
        raise TeacherLoadError(
            "MODEL.TEACHER.WEIGHTS is empty: a teacher needs trained weights "
            "(a local .pth/.pkl or a detectron2:// URL)"
        )
    if "://" not in weights and not os.path.isfile(weights):
        train = f"python train_net.py --config-file {config_file or 'TEACHER_CONFIG'}"
        _, near = nearby_checkpoints(weights)
        raise TeacherLoadError(
            f"Teacher weights file {weights!r} (MODEL.TEACHER.WEIGHTS) not found: train the "
            f"teacher first ({train}) and set MODEL.TEACHER.WEIGHTS to its model_final.pth"
            + (f"; nearest existing checkpoints: {', '.join(near)}" if near else "")
        )


def _format_keys(title: str, keys: Sequence[str]) -> str:
    listed = "\n".join(f"    {k}" for k in keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    if more > 0:
        listed += f"\n    ... and {more} more"
    return f"  {title} ({len(keys)}):\n{listed}"


def _describe_incompatible(incompatible) -> str:
    """List the missing, unexpected and wrong-shape keys of a checkpoint load, non-empty ones."""
    parts = []
    # fvcore drops a wrong-shape tensor before loading, so its key also comes back as missing;
    # list it once, under its shapes
    wrong = {k for k, _, _ in incompatible.incorrect_shapes}
    missing = [k for k in incompatible.missing_keys if k not in wrong]
    if missing:
        parts.append(_format_keys("missing in the checkpoint", missing))
    if incompatible.unexpected_keys:
        parts.append(_format_keys("unexpected in the checkpoint", incompatible.unexpected_keys))
    if incompatible.incorrect_shapes:
        shapes = [
            f"{k}: {tuple(ckpt)} in the checkpoint, {tuple(model)} in the model"
            for k, ckpt, model in incompatible.incorrect_shapes
        ]
        parts.append(_format_keys("wrong shape", shapes))
    return "\n".join(parts)


def load_teacher_weights(model: nn.Module, weights: str, allow_partial: bool) -> None:
    """Load ``weights`` into ``model``; any missing, unexpected or wrong-shape key is an error.

    With ``allow_partial`` the mismatches are logged as a warning instead. Handles detectron2
    ``.pth`` checkpoints (read weights-only), model-zoo ``.pkl`` files (unpickled by
    detectron2: trusted sources only) and ``detectron2://`` (or other) URLs.
    """
    _check_weights_path(weights)
    checkpointer = GKDCheckpointer(model, save_to_disk=False)
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:  # undownloadable: say which file, keep the cause
        raise TeacherLoadError(f"Cannot fetch teacher weights {weights!r}: {e}") from e
    try:
        checkpoint = checkpointer.read_file(local)
    except CheckpointLoadError as e:  # truncated, corrupt or unsafe: the message says which
        raise TeacherLoadError(
            f"{e}\nIt is MODEL.TEACHER.WEIGHTS: point it at a good copy of the teacher's "
            "weights (or train the teacher again)."
        ) from None
    # The load_state_dict below is non-strict (fvcore drops wrong-shape tensors before it), so the
    # strictness a teacher needs is enforced on the returned key lists.
    incompatible = checkpointer.load_model_weights(checkpoint)
    if not (
        incompatible.missing_keys or incompatible.unexpected_keys or incompatible.incorrect_shapes
    ):
        return
    listing = _describe_incompatible(incompatible)
    if not allow_partial:
        raise TeacherLoadError(
            f"Teacher weights {weights!r} do not match the teacher model:\n{listing}\n"
            "Check MODEL.TEACHER.CONFIG_FILE / OPTS against the checkpoint, or set "
            "MODEL.TEACHER.ALLOW_PARTIAL_LOAD True to accept a partial load."
        )
    logger.warning(
        "Teacher weights %r load partially (MODEL.TEACHER.ALLOW_PARTIAL_LOAD):\n%s",
        weights,
        listing,
    )


def _num_classes_key(meta_architecture: str) -> str | None:
    """The config key holding the class count for a meta-architecture family, if known."""
    name = meta_architecture.lower()
    if "retinanet" in name:  # RetinaNet, GKDRetinaNet
        return "MODEL.RETINANET.NUM_CLASSES"
    if "rcnn" in name:  # GeneralizedRCNN, GKDRCNN
        return "MODEL.ROI_HEADS.NUM_CLASSES"
    return None


def _cfg_get(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_num_classes(cfg: CfgNode, tcfg: CfgNode) -> None:
    """Teacher and student must predict the same classes, or distilled logits mean nothing."""
    skey = _num_classes_key(cfg.MODEL.META_ARCHITECTURE)
    tkey = _num_classes_key(tcfg.MODEL.META_ARCHITECTURE)
    if skey is None or tkey is None:
        logger.warning(
            "Cannot compare class counts of student %s and teacher %s: unknown meta-architecture",
            cfg.MODEL.META_ARCHITECTURE,
            tcfg.MODEL.META_ARCHITECTURE,
        )
        return
    s_num, t_num = _cfg_get(cfg, skey), _cfg_get(tcfg, tkey)
    if s_num != t_num:
        raise ValueError(
            f"The teacher predicts {t_num} classes (teacher {tkey}) but the student {s_num} "
            f"(student {skey}); they must be equal: distil from a teacher trained on the "
            "student's classes (same dataset), or fix the NUM_CLASSES that is wrong"
        )


class FrozenTeacher:
    """A detectron2 model in eval mode with no trainable parameters, used only for inference.

    Not an ``nn.Module`` on purpose: as an attribute of a student it is invisible to the
    student's ``parameters()``, ``state_dict()``, ``train()``/``eval()``, optimizer and DDP.

    Attributes:
        model: the detectron2 model (e.g. ``RetinaNet``), frozen.
        cfg: the teacher's own config (``load_teacher_cfg``).
    """

    def __init__(self, model: nn.Module, cfg: CfgNode, student_input_format: str):
        teacher_format = cfg.INPUT.FORMAT
        self.flip_channels = teacher_format != student_input_format
        if self.flip_channels and {teacher_format, student_input_format} != _FLIPPABLE_FORMATS:
            raise ValueError(
                f"Teacher INPUT.FORMAT {teacher_format!r} and student INPUT.FORMAT "
                f"{student_input_format!r} differ and are not an RGB/BGR pair"
            )
        self.model = model
        self.cfg = cfg
        self._freeze()

    def _freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def features(self, batched_inputs: list[dict]) -> tuple[dict[str, Tensor], ImageList]:
        """Run the teacher's backbone on detectron2-style inputs.

        Args:
            batched_inputs: N dicts whose "image" is a (3, H_i, W_i) uint8/float tensor in the
                student's INPUT.FORMAT.

        Returns:
            The backbone's feature dict (e.g. "p3".."p7", each (N, C, H_l, W_l)) and the
            normalised, padded ImageList ((N, 3, H, W) tensor, padded to the teacher's size
            divisibility).
        """
        # Something may have called model.train() since the last call; BN must use running stats.
        self.model.eval()
        if self.flip_channels:
            batched_inputs = [{**x, "image": x["image"].flip(0)} for x in batched_inputs]
        images = self.model.preprocess_image(batched_inputs)
        return self.model.backbone(images.tensor), images

    @torch.no_grad()
    def head_logits(self, features: list[Tensor]) -> list[Tensor]:
        """Classification logits of a RetinaNet teacher's head.

        Args:
            features: per-level features, each (N, C, H_l, W_l), in the head's level order.

        Returns:
            Per-level logits, each (N, A*K, H_l, W_l) (A anchors per location, K classes).
        """
        self.model.eval()
        return self.model.head(features)[0]

    @torch.no_grad()
    def roi_logits(self, features: dict[str, Tensor], boxes: list[Boxes]) -> tuple[Tensor, Tensor]:
        """Box-head classification logits and mean RoI features of a Faster R-CNN teacher on
        given boxes (the student's positive proposals), from the teacher's own FPN.

        Args:
            features: the teacher backbone's feature dict (:meth:`features`).
            boxes: per image, the (n_i) boxes in input pixels.

        Returns:
            logits: (N, K + 1), N = sum n_i, image-major (background last);
            pooled: (N, C) the box pooler's output averaged over its grid.
        """
        self.model.eval()
        heads = self.model.roi_heads
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
        logits = heads.box_predictor(heads.box_head(pooled))[0]
        return logits, pooled.mean(dim=(2, 3))

    def to(self, device: torch.device | str) -> FrozenTeacher:
        """Move the model to ``device``; return self."""
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        # The default nn.Module repr of a whole detector would flood logs.
        return f"FrozenTeacher({type(self.model).__name__}, format={self.cfg.INPUT.FORMAT})"


def build_teacher(cfg: CfgNode) -> FrozenTeacher:
    """Build, load and freeze the teacher described by the student's ``MODEL.TEACHER.*`` keys.

    Raises ``TeacherLoadError`` for absent or mismatching weights and ``ValueError`` when the
    teacher's class count differs from the student's.
    """
    tcfg = load_teacher_cfg(cfg)
    # Cheap checks before building a possibly large model.
    _check_num_classes(cfg, tcfg)
    _check_weights_path(tcfg.MODEL.WEIGHTS, cfg.MODEL.TEACHER.CONFIG_FILE)
    check_supported(tcfg, f"the teacher config {cfg.MODEL.TEACHER.CONFIG_FILE!r}")
    model = build_model(tcfg)
    load_teacher_weights(model, tcfg.MODEL.WEIGHTS, cfg.MODEL.TEACHER.ALLOW_PARTIAL_LOAD)
    teacher = FrozenTeacher(model, tcfg, cfg.INPUT.FORMAT)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Teacher %s from %s, weights %s: %.2fM parameters, frozen",
        tcfg.MODEL.META_ARCHITECTURE,
        cfg.MODEL.TEACHER.CONFIG_FILE,
        tcfg.MODEL.WEIGHTS,
        num_params / 1e6,
    )
    return teacher
