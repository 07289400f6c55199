"""The project's ``DefaultTrainer`` and config set-up, shared by ``train_net.py`` and the tools."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import random
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_setup,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger

from ..checkpoint import GKDCheckpointer
from ..config import add_gkd_config, check_supported, merge_config
from .prototype_refresh import PrototypeRefresh
from .teacher_check import TeacherCheck

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training loss term became NaN or infinite (FloatingPointError, as detectron2 raises)."""


def check_finite_losses(
    loss_dict: Mapping[str, torch.Tensor],
    iteration: int | None,
    last_checkpoint: str | Callable[[], str] = "",
) -> None:
    """Raise :class:`NonFiniteLossError` naming each NaN/Inf term of ``loss_dict``, the
    iteration and the last checkpoint (a path, or a function called only on failure).

    When all is well this costs one ``isfinite`` over the stacked terms and one device sync
    (detectron2's metrics writer syncs on every term each step anyway).
    """
    if not loss_dict:
        return
    values = torch.stack([torch.as_tensor(v).detach().float().sum() for v in loss_dict.values()])
    if bool(torch.isfinite(values).all()):
        return
    if callable(last_checkpoint):
        last_checkpoint = last_checkpoint()
    terms = dict(zip(loss_dict, values.tolist()))
    bad = ", ".join(f"{k} = {v}" for k, v in terms.items() if not math.isfinite(v))
    good = ", ".join(f"{k} = {v:.4g}" for k, v in terms.items() if math.isfinite(v))
    where = f"iteration {iteration}" if iteration is not None else "a training forward"
    saved = (
        f"The last checkpoint, {last_checkpoint!r}, is intact: after fixing the cause, "
        "continue from it with --resume."
        if last_checkpoint
        else "No checkpoint has been written yet."
    )
    raise NonFiniteLossError(
        f"Loss is not finite at {where}: {bad} (finite: {good or 'none'}). Training stopped "
        f"before the backward pass, so the weights are those of the previous iteration. {saved} "
        "Usual causes: a learning rate too high for the batch (lower SOLVER.BASE_LR, lengthen "
        "SOLVER.WARMUP_ITERS, or set SOLVER.CLIP_GRADIENTS.ENABLED True), or degenerate boxes "
        "in the annotations."
    )


class _FiniteLossHook:
    """Forward hook on the detector: checks its training loss dict before the backward pass
    (detectron2 0.6 checks only the summed loss, after backward, on the main process)."""

    def __init__(self, checkpointer: GKDCheckpointer):
        self.checkpointer = checkpointer

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not isinstance(output, Mapping):
            return
        try:
            iteration = get_event_storage().iter
        except AssertionError:  # called outside an EventStorage
            iteration = None
        check_finite_losses(output, iteration, self._last_checkpoint)

    def _last_checkpoint(self) -> str:
        ckpt = self.checkpointer
        return ckpt.get_checkpoint_file() if ckpt.has_checkpoint() else ""


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler that can start ``skip`` indices into this rank's stream.

    detectron2's sampler restarts its stream on resume, so a resumed run sees other images
    than an uninterrupted one; skipping what was consumed makes the two streams equal.
    """

    def __init__(self, size: int, seed: int | None = None, skip: int = 0):
        super().__init__(size, shuffle=True, seed=seed)
        self._skip = skip

    def __iter__(self):
        start = self._rank + self._skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


def torch_rng_neutral(iterable) -> Iterator:
    """Iterate ``iterable`` leaving torch's global RNG as it was before each item.

    A torch DataLoader draws its base seed from torch's RNG when its iterator starts, which for
    detectron2's aspect-grouped loader is at the first batch of a process: a resumed run would
    draw it at its first iteration and shift every later torch draw (Faster R-CNN samples
    anchors and RoIs with torch.randperm). Keeping data loading off torch's RNG makes the
    training step see the same torch RNG in an uninterrupted and a resumed run.
    """
    it = None
    while True:
        state = torch.get_rng_state()
        try:
            if it is None:
                it = iter(iterable)
            item = next(it)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield item


class ResumableTrainLoader:
    """The training batches, continuing the data stream where a resumed run left it.

    ``build(start_iter)`` makes a loader whose stream starts ``start_iter`` batches in; it is
    called once now with 0 (so that a bad dataset fails when the trainer is built, as in
    detectron2) and again at the first batch when ``start_iter()`` then says that
    ``resume_or_load`` continued a run. Iterating starts nothing until the first batch:
    detectron2 0.6's SimpleTrainer calls ``iter()`` in its constructor, before the resume.
    Batches come through :func:`torch_rng_neutral`.
    """

    def __init__(self, build: Callable[[int], Any], start_iter: Callable[[], int]):
        self._build = build
        self._start_iter = start_iter
        self.loader = build(0)

    def __iter__(self) -> Iterator:
        start = self._start_iter()
        yield from torch_rng_neutral(self.loader if start == 0 else self._build(start))


def train_dataset_dicts(cfg: CfgNode) -> list[dict]:
    """The training set as the loader sees it (detectron2's filtering); loaded once per process."""
    return _train_dataset_dicts(
        tuple(cfg.DATASETS.TRAIN),
        cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        tuple(cfg.DATASETS.PROPOSAL_FILES_TRAIN) if cfg.MODEL.LOAD_PROPOSALS else None,
    )


@functools.lru_cache(maxsize=2)
def _train_dataset_dicts(names, filter_empty, min_keypoints, proposal_files) -> list[dict]:
    return get_detection_dataset_dicts(
        list(names),
        filter_empty=filter_empty,
        min_keypoints=min_keypoints,
        proposal_files=list(proposal_files) if proposal_files else None,
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain numbers only, so that torch.load(weights_only=True) can read it back
    return {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer, runnable on CPU processes, evaluating by dataset type,
    with exact resume (optimizer, RNG and data stream position in the checkpoint) and, for
    GKD meta-architectures, the frozen teacher and the prototype-refresh hook."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer's own constructor, through public seams only: on the CPU DDP needs
        # device_ids=None (DefaultTrainer passes [local_rank], which DDP rejects for a CPU
        # module), the checkpointer is a GKDCheckpointer, and the loader can continue a resumed
        # data stream; everything else is as in detectron2 (0.6 and main alike).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        this = weakref.proxy(self)
        # only detectron2's TrainingSampler can skip (ResumableTrainingSampler); another sampler's
        # stream restarts on resume, as in detectron2, so its loader is not built a second time
        resumable = cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        data_loader = ResumableTrainLoader(
            lambda start: this.build_train_loader(cfg, start_iter=start),
            lambda: this.start_iter if resumable else 0,
        )
        ddp_args = {"device_ids": None} if cfg.MODEL.DEVICE == "cpu" else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_args)
        # positional: main added arguments to AMPTrainer between these and grad_scaler
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = GKDCheckpointer(model, cfg.OUTPUT_DIR, trainer=this)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        model = _unwrap(self.model)
        # a NaN/Inf loss term stops training before its backward pass, named with the iteration
        self._finite_loss_hook = model.register_forward_hook(_FiniteLossHook(self.checkpointer))
        if hasattr(model, "attach_teacher"):
            from ..teacher import build_teacher

            # fails here, before training, on missing weights or mismatching keys/classes
            model.attach_teacher(build_teacher(cfg))
            model.attenuation_schedule = (
                (self.epoch_length(cfg), self.num_epochs(cfg))
                if cfg.MODEL.GKD.ATTENUATION
                else None
            )

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        check_supported(cfg, "the config")
        return super().build_model(cfg)

    @staticmethod
    def epoch_length(cfg: CfgNode) -> int:
        """Iterations of one epoch of the training set (at least 1)."""
        return max(1, len(train_dataset_dicts(cfg)) // cfg.SOLVER.IMS_PER_BATCH)

    @classmethod
    def refresh_period(cls, cfg: CfgNode) -> int:
        """Iterations between prototype refreshes: MODEL.GKD.REFRESH_PERIOD, or one epoch."""
        if cfg.MODEL.GKD.REFRESH_PERIOD > 0:
            return cfg.MODEL.GKD.REFRESH_PERIOD
        return cls.epoch_length(cfg)

    @classmethod
    def num_epochs(cls, cfg: CfgNode) -> int:
        """E of a(e) = 1 - e / E: MODEL.GKD.NUM_EPOCHS, or the epochs that MAX_ITER spans."""
        if cfg.MODEL.GKD.NUM_EPOCHS > 0:
            return cfg.MODEL.GKD.NUM_EPOCHS
        return max(1, -(-cfg.SOLVER.MAX_ITER // cls.epoch_length(cfg)))

    def build_hooks(self) -> list:
        ret = super().build_hooks()
        model = _unwrap(self.model)
        if hasattr(model, "distiller") and model.distiller.needs_prototypes:
            # (the local-only baseline, ROBUST_WEIGHTS False without a global loss, needs none)
            refresh = PrototypeRefresh(
                self.cfg, train_dataset_dicts(self.cfg), self.refresh_period(self.cfg), model
            )
            # first, so that IterationTimer does not count a refresh as iteration time
            ret.insert(0, refresh)
        if hasattr(model, "attach_teacher") and self.cfg.MODEL.TEACHER.CHECK_IMAGES > 0:
            # before anything else: a useless teacher stops the run before iteration 0
            ret.insert(0, TeacherCheck(self.cfg, model, self.build_evaluator))
        return ret

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, start_iter: int = 0):
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            return super().build_train_loader(cfg)
        dataset = train_dataset_dicts(cfg)
        per_rank = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        seed = cfg.SEED if cfg.SEED >= 0 else None
        sampler = ResumableTrainingSampler(len(dataset), seed=seed, skip=start_iter * per_rank)
        return build_detection_train_loader(cfg, dataset=dataset, sampler=sampler)

    def train(self) -> dict | None:
        """Train; return the final evaluation results (detectron2 0.6 returns them only when
        TEST.EXPECTED_RESULTS is set), or None when nothing was evaluated."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    def after_train(self) -> None:
        # TrainerBase sets iter = max_iter only when the loop completed; an exception in the
        # last iteration leaves iter = max_iter - 1, and EvalHook (iter + 1 >= max_iter) would
        # then evaluate the failed run as if it had finished. Skip that evaluation.
        if self.iter >= self.max_iter:
            return super().after_train()
        self.storage.iter = self.iter
        for h in self._hooks:
            if not isinstance(h, hooks.EvalHook):
                h.after_train()

    # detectron2 0.6 leaves the optimizer state (SGD momentum, the AMP grad scaler) out of its
    # checkpoints, so --resume restarted momentum from zero; detectron2 main saves it under
    # "_trainer" as done here (and its load_state_dict fails on a checkpoint without it).
    # The RNG states (data augmentation draws from numpy's) make the resumed run the same run.
    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["rng"] = _rng_state()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        # TrainerBase's (iteration, hooks), then the parts DefaultTrainer adds on main or not on
        # 0.6, read here once so that both versions load the same checkpoints
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: momentum restarts from zero")
        if "rng" in state_dict:
            _set_rng_state(state_dict["rng"])

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "coco":
            output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
            return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(
            f"No evaluator for dataset {dataset_name!r}: its metadata evaluator_type is "
            f"{evaluator_type!r}; gkd_d2 evaluates 'coco' and 'pascal_voc' datasets"
        )


def setup_cfg(args) -> CfgNode:
    """Build the frozen config from ``--config-file`` and trailing ``KEY VALUE`` overrides.

    Falls back to the CPU (with a warning) when the config asks for CUDA on a machine without it,
    and applies ``NUM_THREADS``. Calls detectron2's ``default_setup`` (logging, seeding, output
    folder, the config dump).

    Raises:
        ConfigError: a missing config file, an unknown key or a value of the wrong type, named.
    """
    cfg = get_cfg()
    add_gkd_config(cfg)
    # ConfigError names the file or override and the key, with the closest existing keys
    merge_config(cfg, args.config_file, args.opts)
    cpu_fallback = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if cpu_fallback:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    # detectron2 sets up only its own loggers; gkd_d2's (PGM progress, teacher) go to the same log
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gkd_d2", abbrev_name="gkd")
    if cpu_fallback:
        logger.warning("No CUDA device: MODEL.DEVICE set to 'cpu'")
    if cfg.NUM_THREADS > 0:
        torch.set_num_threads(cfg.NUM_THREADS)
    if cfg.MODEL.DEVICE == "cpu":
        # detectron2's focal loss is TorchScript: after two profiling calls the JIT fuses it,
        # which rounds differently, so iteration k of a resumed process (or of a second run in
        # one process) would not equal iteration k of the original run. Without fusion CPU
        # training is bitwise reproducible (checked by the resume tests).
        with warnings.catch_warnings():  # deprecated in favour of torch.compile, still honoured
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.set_fusion_strategy([("STATIC", 0), ("DYNAMIC", 0)])
    if cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() == 1:
        logger.info("Training on the CPU with %d torch threads", torch.get_num_threads())
    return cfg
