"""The project's ``DefaultTrainer`` and config set-up, shared by ``train_net.py`` and the tools."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, TrainerBase, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from torch.utils.data import Sampler

from ..checkpoint import GKDCheckpointer
from ..compat import ddp_for_cpu_modules, inner_trainer, train_sampler_seed
from ..config import check_supported, load_config
from ..modeling import DistilledDetector
from ..rng import rng_state, set_rng_state
from ..schedule import train_dataset_dicts
from .evaluators import build_evaluator
from .gkd_model import unwrap_ddp
from .hooks import build_gkd_hooks
from .training_inputs import TransformRecordingMapper

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training loss term became NaN or infinite (FloatingPointError, as detectron2 raises)."""


# the distillation terms' share of the loss from which the non-finite-loss error puts the KD
# weights first: such a run can go NaN at a learning rate that suits the detector alone; a lower
# rate let one such run train (the README's own-dataset smoke run) and not another, where
# gradient clipping did
KD_DOMINATES = 0.5


def distillation_advice(
    terms: Mapping[str, float], kd_share: float | None, kd_weights: Mapping[str, float]
) -> str:
    """What to turn when the distillation terms (``loss_gkd_*``) are most of the loss: the KD
    weights (named with their values) and gradient clipping; "" when they are not.

    Args:
        terms: the iteration's loss terms (NaN/Inf included).
        kd_share: ``gkd/loss_share_kd`` at the last iteration that logged it, or None; then
            the share of this iteration's finite terms is used.
        kd_weights: ``{"MODEL.GKD.FG_WEIGHT": 1.0, ...}``.
    """
    kd = {k: v for k, v in terms.items() if k.startswith("loss_gkd")}
    if not kd:
        return ""
    finite = {k: v for k, v in terms.items() if math.isfinite(v)}
    where = "at the last logged iteration (gkd/loss_share_kd)"
    if kd_share is None:
        total = sum(finite.values())
        kd_share = sum(v for k, v in finite.items() if k in kd) / total if total else None
        where = "of this iteration's finite terms"
    kd_broken = any(not math.isfinite(v) for v in kd.values())
    if not kd_broken and (kd_share is None or kd_share < KD_DOMINATES):
        return ""
    share = f"{kd_share:.0%} of the loss {where}" if kd_share is not None else "not finite"
    weights = " / ".join(kd_weights) + " (now " + " / ".join(f"{v:g}" for v in kd_weights.values())
    return (
        f"The distillation terms (loss_gkd_*) were {share}: when they dominate, lowering "
        f"SOLVER.BASE_LR alone may not help. Lower {weights}), e.g. tenfold, or set "
        "SOLVER.CLIP_GRADIENTS.ENABLED True; gkd/loss_share_* in metrics.json show each "
        "term's share. A weak teacher (gkd/teacher_ap) makes large distillation terms too. "
    )


def check_finite_losses(
    loss_dict: Mapping[str, torch.Tensor],
    iteration: int | None,
    last_checkpoint: str | Callable[[], str] = "",
    kd_share: float | None | Callable[[], float | None] = None,
    kd_weights: Mapping[str, float] | None = None,
) -> None:
    """Raise :class:`NonFiniteLossError` naming each NaN/Inf term of ``loss_dict``, the
    iteration and the last checkpoint (a path, or a function called only on failure); when
    the distillation terms dominate, the KD weights to turn first (:func:`distillation_advice`;
    ``kd_share`` too may be a function called only on failure).

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
    if callable(kd_share):
        kd_share = kd_share()
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
        + distillation_advice(terms, kd_share, kd_weights or {})
        + "Usual causes: a learning rate too high for the batch (lower SOLVER.BASE_LR, lengthen "
        "SOLVER.WARMUP_ITERS, or set SOLVER.CLIP_GRADIENTS.ENABLED True), or degenerate boxes "
        "in the annotations."
    )


class _FiniteLossHook:
    """Forward hook on the detector: checks its training loss dict before the backward pass
    (detectron2 0.6 checks only the summed loss, after backward, on the main process)."""

    def __init__(self, checkpointer: GKDCheckpointer, cfg: CfgNode):
        self.checkpointer = checkpointer
        gkd = cfg.MODEL.get("GKD")
        self.kd_weights = (
            {f"MODEL.GKD.{k}": getattr(gkd, k) for k in ("FG_WEIGHT", "BG_WEIGHT", "SOFT_WEIGHT")}
            if gkd is not None
            else {}
        )

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not isinstance(output, Mapping):
            return
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside an EventStorage
            storage = None
        iteration = storage.iter if storage is not None else None
        check_finite_losses(
            output,
            iteration,
            self._last_checkpoint,
            functools.partial(self._kd_share, storage),
            self.kd_weights,
        )

    @staticmethod
    def _kd_share(storage) -> float | None:
        """``gkd/loss_share_kd`` at the last iteration that logged it, or None."""
        history = storage.histories().get("gkd/loss_share_kd") if storage is not None else None
        return history.latest() if history is not None else None

    def _last_checkpoint(self) -> str:
        ckpt = self.checkpointer
        return ckpt.get_checkpoint_file() if ckpt.has_checkpoint() else ""


class ResumableTrainingSampler(Sampler):
    """detectron2's ``TrainingSampler`` stream of this rank, started ``skip`` indices in.

    detectron2's sampler restarts its stream on resume, so a resumed run sees other images
    than an uninterrupted one; skipping what was consumed makes the two streams equal.
    """

    def __init__(self, size: int, seed: int | None = None, skip: int = 0):
        self.stream = TrainingSampler(size, shuffle=True, seed=seed)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(iter(self.stream), self.skip, None)


def torch_rng_neutral(iterable) -> Iterator:
    """Iterate ``iterable`` leaving torch's global RNG as it was before each item.

    A torch DataLoader draws its base seed from torch's RNG when its iterator starts, which for
    detectron2's aspect-grouped loader is at the first batch of a process: a resumed run would
    draw it a second time at its first iteration and shift every later torch draw (Faster
    R-CNN samples anchors and RoIs with torch.randperm). Keeping a continued run's data loading
    off torch's RNG makes its steps see the torch RNG of the uninterrupted run.
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

    An uninterrupted run draws from torch's RNG exactly as detectron2's loader does in a
    ``DefaultTrainer`` (the DataLoader's base seed, at the first batch); a continued run's
    loader comes through :func:`torch_rng_neutral`, since the RNG states restored from the
    checkpoint already hold the original run's draw.
    """

    def __init__(self, build: Callable[[int], Any], start_iter: Callable[[], int]):
        self._build = build
        self._start_iter = start_iter
        self.loader = build(0)

    def __iter__(self) -> Iterator:
        start = self._start_iter()
        yield from self.loader if start == 0 else torch_rng_neutral(self._build(start))


class FinishedRunEvalHook(hooks.EvalHook):
    """detectron2's EvalHook that skips the final evaluation of a run that failed.

    TrainerBase sets ``iter = max_iter`` only when the loop completed; an exception in the last
    iteration leaves ``iter = max_iter - 1``, and EvalHook (``iter + 1 >= max_iter``) would
    then evaluate the failed run as if it had finished.
    """

    def after_train(self) -> None:
        if self.trainer.iter >= self.trainer.max_iter:
            super().after_train()


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with what train_net.py adds on top of GKD's hooks
    (``build_gkd_hooks``, which any detectron2 trainer can use):

    - training on CPU processes (gloo): DDP of a CPU module without ``device_ids``;
    - exact resume: the optimizer state, the RNG states and the data stream position are in
      the checkpoint, so a resumed run is the same run;
    - a NaN/Inf loss term stops training before its backward pass, named with the iteration;
    - evaluators by dataset type (COCO, VOC), and the final evaluation returned by ``train``;
    - the teacher built when the trainer is (a bad teacher fails before anything runs).
    """

    def __init__(self, cfg: CfgNode):
        this, cls = weakref.proxy(self), type(self)
        # only detectron2's TrainingSampler can skip (ResumableTrainingSampler); another sampler's
        # stream restarts on resume, as in detectron2, so its loader is not built a second time
        resumable = cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"

        def build_train_loader(scaled_cfg: CfgNode) -> ResumableTrainLoader:
            # the sampler's seed, drawn when DefaultTrainer would draw it and kept in the
            # checkpoint (a resumed run continues the same stream)
            self.sampler_seed = train_sampler_seed(scaled_cfg) if resumable else None
            return ResumableTrainLoader(
                lambda start: cls.build_train_loader(
                    scaled_cfg, start_iter=start, seed=this.sampler_seed
                ),
                lambda: this.start_iter if resumable else 0,
            )

        # DefaultTrainer's constructor builds the loader with self.build_train_loader(cfg): for
        # this trainer, one that continues a resumed data stream (an instance attribute shadows
        # the classmethod)
        self.build_train_loader = build_train_loader
        # (one process: detectron2 builds no DDP at all)
        with ddp_for_cpu_modules(cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() > 1):
            super().__init__(cfg)
        del self.build_train_loader
        model = unwrap_ddp(self.model)
        # a NaN/Inf loss term stops training before its backward pass, named with the iteration
        self.finite_loss_check = model.register_forward_hook(
            _FiniteLossHook(self.checkpointer, cfg)
        )
        if isinstance(model, DistilledDetector):
            # the teacher now, not at the first step: a bad teacher fails when the trainer is built
            model.require_teacher()

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        check_supported(cfg, "the config")
        return super().build_model(cfg)

    def build_hooks(self) -> list:
        # the checkpointer that reads and writes atomically; DefaultTrainer's hooks save with it
        self.checkpointer = GKDCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        ret = [
            FinishedRunEvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate_and_keep)
            if isinstance(h, hooks.EvalHook)
            else h
            for h in super().build_hooks()
        ]
        # before detectron2's hooks, so that IterationTimer does not count a refresh as
        # iteration time and a useless teacher stops the run before anything else
        return build_gkd_hooks(self.cfg, self.build_evaluator) + ret

    def evaluate_and_keep(self) -> dict:
        """Evaluate the model on DATASETS.TEST; the results are kept for ``train`` to return."""
        self.last_eval_results = self.test(self.cfg, self.model)
        return self.last_eval_results

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, start_iter: int = 0, seed: int | None = None):
        """detectron2's train loader; with its TrainingSampler, the stream ``start_iter``
        batches in, sampled with ``seed`` (by default the seed detectron2 would use)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            return super().build_train_loader(cfg)
        dataset = train_dataset_dicts(cfg)
        per_rank = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        if seed is None:
            seed = train_sampler_seed(cfg)
        sampler = ResumableTrainingSampler(len(dataset), seed=seed, skip=start_iter * per_rank)
        # detectron2's mapper, which also hands over the transforms it drew (bank mode places
        # the sampled boxes by them)
        mapper = TransformRecordingMapper(cfg, is_train=True)
        return build_detection_train_loader(cfg, dataset=dataset, sampler=sampler, mapper=mapper)

    def train(self) -> dict | None:
        """Train; return the final evaluation results (detectron2 0.6 returns them only when
        TEST.EXPECTED_RESULTS is set), or None when nothing was evaluated."""
        self.last_eval_results = None
        TrainerBase.train(self, self.start_iter, self.max_iter)
        if self.cfg.TEST.EXPECTED_RESULTS and comm.is_main_process():
            verify_results(self.cfg, self.last_eval_results)
        return self.last_eval_results

    # detectron2 0.6 leaves the optimizer state (SGD momentum, the AMP grad scaler) out of its
    # checkpoints, so --resume restarted momentum from zero; detectron2 main saves it under
    # "_trainer" as done here (and its load_state_dict fails on a checkpoint without it).
    # The RNG states (data augmentation draws from numpy's) make the resumed run the same run.
    def state_dict(self) -> dict:
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = inner_trainer(self).state_dict()
        ret["rng"] = rng_state()
        if self.sampler_seed is not None:
            ret["sampler_seed"] = self.sampler_seed
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        # TrainerBase's (iteration, hooks), then the parts DefaultTrainer adds on main or not on
        # 0.6, read here once so that both versions load the same checkpoints
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            inner_trainer(self).load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: momentum restarts from zero")
        if "rng" in state_dict:
            set_rng_state(state_dict["rng"])
        if "sampler_seed" in state_dict:
            self.sampler_seed = int(state_dict["sampler_seed"])

    build_evaluator = staticmethod(build_evaluator)


def setup_cfg(args) -> CfgNode:
    """Build the frozen config from ``--config-file`` and trailing ``KEY VALUE`` overrides.

    Falls back to the CPU (with a warning) when the config asks for CUDA on a machine without it,
    and applies ``NUM_THREADS``. Calls detectron2's ``default_setup`` (logging, seeding, output
    folder, the config dump).

    Raises:
        ConfigError: a missing config file, an unknown key or a value of the wrong type, named.
    """
    # ConfigError names the file or override and the key, with the closest existing keys
    cfg = load_config(args.config_file, args.opts)
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
