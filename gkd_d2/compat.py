"""The private or unexported detectron2 and fvcore names that gkd_d2 still needs, each with its
reason.

Everything else in the package, the benchmarks, the tools and train_net.py uses detectron2 and
fvcore through their public API: ``tests/test_public_api.py`` fails when a private name, a
private module, a name detectron2 does not export (that test's docstring defines "exported") or
a replaced module attribute is used outside this module, and when an entry here uses only the
public API. Each entry says why no public way exists and for which detectron2 version it is
written; when detectron2 changes one of them, this is the one file to mend.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.modeling import poolers
from detectron2.modeling.backbone import fpn
from detectron2.modeling.meta_arch import dense_detector, retinanet
from detectron2.structures import Boxes
from detectron2.utils import comm
from torch import Tensor, nn


class FileReadingCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` whose file reading and model loading can be customised and
    whose key report can be read.

    fvcore's ``Checkpointer`` reads a file in ``_load_file`` (the extension point its own
    docstring names; detectron2 0.6 and main override it for ``.pkl``) and loads the weights in
    ``_load_model``, which returns the missing, unexpected and wrong-shape keys that ``load``
    only logs. Both are private in fvcore 0.1.5 (the version detectron2 0.6 and main pin).
    """

    def read_file(self, filename: str) -> dict:
        """The checkpoint dict of ``filename``; by default detectron2's reading."""
        return super()._load_file(filename)

    def _load_file(self, filename: str) -> dict:
        return self.read_file(filename)

    def load_model_weights(self, checkpoint: dict) -> Any:
        """Load ``checkpoint["model"]`` into the model non-strictly, as ``load`` does (with
        detectron2's name matching for model-zoo files); return fvcore's incompatible keys
        (``missing_keys``, ``unexpected_keys``, ``incorrect_shapes``)."""
        return self._load_model(checkpoint)


def set_local_process_group(group: dist.ProcessGroup) -> None:
    """Make ``group`` detectron2's group of this machine's processes.

    detectron2 main has the public ``comm.create_local_process_group``; 0.6 has none, and its
    own launcher assigns the module's ``_LOCAL_PROCESS_GROUP``, as done here (0.6 only).
    """
    comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def ddp_for_cpu_modules(enabled: bool) -> Iterator[None]:
    """While ``DefaultTrainer``'s constructor runs: DDP without ``device_ids`` (a CPU module).

    ``DefaultTrainer.__init__`` (0.6 and main) calls ``create_ddp_model(model,
    broadcast_buffers=False)``, which passes ``device_ids=[local_rank]``; DDP rejects that for
    a CPU module, so CPU processes (gloo) could not train. The constructor looks the function
    up in its module, so it is swapped there for the duration of the call.
    """
    if not enabled:
        yield
        return
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def inner_trainer(trainer: DefaultTrainer) -> SimpleTrainer:
    """The ``SimpleTrainer``/``AMPTrainer`` that runs ``trainer``'s steps.

    Its state (optimizer, AMP grad scaler) belongs in a checkpoint: main saves it under
    "_trainer", 0.6 leaves it out; both keep the object private (``_trainer``).
    """
    return trainer._trainer


def registered_hooks(trainer: TrainerBase) -> list[HookBase]:
    """The hooks registered on ``trainer`` (``register_hooks``), in the order they run.

    ``TrainerBase`` (0.6 and main) keeps them in its private ``_hooks`` list and has no public
    way to read them back; the benchmarks find the trainer's own ``PrototypeRefresh`` there.
    """
    return trainer._hooks


def train_sampler_seed(cfg: CfgNode) -> int:
    """The seed that detectron2's ``build_detection_train_loader(cfg)`` gives its
    ``TrainingSampler``, so that train_net.py's trainer samples the images that a plain
    ``DefaultTrainer`` would.

    detectron2 main passes ``seed=cfg.SEED``; 0.6 passes none, so the sampler draws one shared
    by all processes (``comm.shared_random_seed()``, from NumPy's RNG). The rule is read from
    the private ``_train_loader_from_config`` that decides it.
    """
    from detectron2.data import build

    if "seed=cfg.SEED" in inspect.getsource(build._train_loader_from_config):
        return cfg.SEED
    return comm.shared_random_seed()


def assign_boxes_to_levels(
    box_lists: list[Boxes],
    min_level: int,
    max_level: int,
    canonical_box_size: int,
    canonical_level: int,
) -> Tensor:
    """The FPN level (0 for ``min_level``) that detectron2's ``ROIPooler`` pools each box of
    ``box_lists`` from (the images' boxes in one column, in order): the pooler's own rule.

    GKD takes the soft label r at the level each RoI was pooled from, so it needs the rule of
    the pooler itself. ``detectron2.modeling.poolers`` exports only ``ROIPooler`` (its
    ``__all__``, 0.6 and main), which computes the levels inside ``forward`` and does not
    return them; the function it calls is not exported.
    """
    return poolers.assign_boxes_to_levels(
        box_lists, min_level, max_level, canonical_box_size, canonical_level
    )


def permute_to_N_HWA_K(tensor: Tensor, K: int) -> Tensor:
    """A dense head's (N, A*K, H, W) output as (N, H*W*A, K): the row order of detectron2's
    anchors, in which RetinaNet labels them (``label_anchors``) and reads its predictions.

    GKD reads the student's and the teacher's logits at the labelled anchors, so it needs
    exactly this order. The function is defined in
    ``detectron2.modeling.meta_arch.dense_detector`` (0.6 and main), which has no ``__all__``,
    is not in detectron2's API documentation and is re-exported by no package.
    """
    return dense_detector.permute_to_N_HWA_K(tensor, K)


def last_level_max_pool() -> nn.Module:
    """detectron2's FPN top block that makes P6 by max-pooling P5 (``LastLevelMaxPool``), the one
    its ``build_resnet_fpn_backbone`` (Faster R-CNN) passes.

    ``FPN``'s ``top_block`` argument is public, but ``detectron2.modeling.backbone.fpn`` exports
    only ``FPN`` and its two builders (``__all__``, 0.6 and main), not the top blocks the
    builders pass; the builders take detectron2's fixed-width ResNet, so gkd_d2's narrow
    backbones build their FPN themselves, with the same top blocks.
    """
    return fpn.LastLevelMaxPool()


def last_level_p6p7(in_channels: int, out_channels: int, in_feature: str = "res5") -> nn.Module:
    """detectron2's FPN top block that makes P6 and P7 by strided convs from ``in_feature``
    (``LastLevelP6P7``), the one its ``build_retinanet_resnet_fpn_backbone`` passes.

    Not exported, like :func:`last_level_max_pool` (``detectron2.modeling.backbone.fpn``'s
    ``__all__``, 0.6 and main); the same reason.
    """
    return fpn.LastLevelP6P7(in_channels, out_channels, in_feature=in_feature)


def retinanet_head(**kwargs: Any) -> nn.Module:
    """detectron2's ``RetinaNetHead`` built from its ``@configurable`` arguments
    (``input_shape``, ``num_classes``, ``num_anchors``, ``conv_dims``, ``norm``, ...).

    ``RetinaNet`` builds its head from the config, and only a whole model can be built through
    the public API; ``detectron2.modeling.meta_arch.retinanet`` exports only ``RetinaNet``
    (``__all__``, 0.6 and main) and no package re-exports the head. The config check builds a
    tiny head alone to ask the installed version whether GroupNorm heads work.
    """
    return retinanet.RetinaNetHead(**kwargs)
