"""gkd_d2's additions to detectron2's config (``add_gkd_config``), in the style of its projects."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_gkd_config(cfg: CN) -> CN:
    """Add gkd_d2's keys, with their defaults, to a detectron2 config in place; return it.

    Keys:
        NUM_THREADS (int, 0): torch intra-op threads per training process on the CPU. 0 keeps
            torch's default for a single process and uses 1 per process when several CPU
            processes are launched (``--num-gpus N`` on a machine without a GPU).
    """
    cfg.NUM_THREADS = 0
    return cfg
