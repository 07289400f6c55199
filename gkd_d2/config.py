"""gkd_d2's additions to detectron2's config (``add_gkd_config``), in the style of its projects."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_gkd_config(cfg: CN) -> CN:
    """Add gkd_d2's keys, with their defaults, to a detectron2 config in place; return it.

    Defaults are the paper's / official code's values (../shared/docs/gkd-method.md section 5);
    every deviation from the official code is a switch below. README.md documents every key.
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
    # images per forward during prototype extraction; >1 is faster, but padding to the largest
    # image of the batch changes features near the borders of smaller ones (official: 1)
    g.EXTRACT_BATCH_SIZE = 1
    # ---- RDM: robust distillation
    g.ROBUST_WEIGHTS = True  # False: binary fg mask and unweighted soft labels (local-only KD)
    g.CLAMP_R = True  # clamp r to [0, 1] (official: unclamped, practically never matters)
    g.TEMPERATURE = 2.0
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
    return cfg
