"""PGM in training: the hook that refreshes the prototype bank (paper section 3.2).

As the official code's PGM hook (hikvision-research/DAVAR-Lab-ML, ECCV22 GKD project,
pgm_hook.py): a refresh before iteration 0 and then every epoch, each a sequence of steps from
the modules named for them: the fixed instance sample (``refresh_sample``), the student's and
the teacher's features of it (``refresh_extract``: test-time images read by loader workers,
sharded over ranks; the teacher's extracted once and kept in ``OUTPUT_DIR`` by
``teacher_cache``, so a resumed run pays no teacher pass), the (class, level) selections, shared
out over the ranks (``refresh_select``), the bank they replace (the distiller, a
``PrototypeBank``: model state, so a resumed run skips the refresh that produced the bank it
loaded), and the scalars (``refresh_report``). The steps that exchange data between ranks say
so in their names (``gather_*``): every rank runs them, in the same order, and holds the same
bank.

MODEL.GKD.REFRESH_MODE "full" (official) extracts the student's features of the whole sample at
each refresh. "bank" takes them from the epoch's training forwards (``feature_harvest``),
extracts only the instances not harvested, selects, and re-extracts the picked instances with
the current student, so the prototypes themselves are as in full mode. The harvest is merged
over ranks before each checkpoint and saved with the hook's state: a resumed run continues it.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from detectron2.data import DatasetMapper
from detectron2.engine import HookBase
from detectron2.structures import ImageList
from torch import Tensor

from ..distill import select_prototypes
from ..modeling import DistilledDetector
from ..modeling.prototype_bank import PrototypeBank
from ..rng import preserved_rng
from ..schedule import refresh_period, train_dataset_dicts
from .feature_harvest import FeatureHarvest
from .gkd_model import gkd_model_of
from .refresh_extract import SampleExtraction, SampleFeatures, evaluating
from .refresh_report import (
    RefreshRecord,
    class_names,
    log_refresh,
    metric_class_names,
    refresh_scalars,
)
from .refresh_sample import configured_sample
from .refresh_select import paired_teacher_rows, select_bank
from .teacher_cache import FILE_NAME, TeacherFeatureCache

logger = logging.getLogger(__name__)

REFRESH_MODES = ("full", "bank")
BANK_TEACHER_ROWS = ("test_pipeline", "training_forward")


class PrototypeRefresh(HookBase):
    """Refresh the prototype bank before iteration 0 and then every ``period`` iterations
    (the module's docstring). The bank's instance sample is saved with the hook's checkpoint
    state (``instances``), with bank mode's harvest (``harvest``)."""

    def __init__(self, cfg, model: DistilledDetector | None = None):
        self.cfg = cfg
        # the GKD student itself, not its DDP wrapper; None: the trainer's, at before_train
        self.model = model
        self.dataset_dicts = train_dataset_dicts(cfg)
        self.period = refresh_period(cfg)
        self.mode = cfg.MODEL.GKD.REFRESH_MODE
        if self.mode not in REFRESH_MODES:
            raise ValueError(
                f"MODEL.GKD.REFRESH_MODE must be one of {REFRESH_MODES}, not {self.mode!r}"
            )
        if cfg.MODEL.GKD.BANK_TEACHER_ROWS not in BANK_TEACHER_ROWS:
            raise ValueError(
                f"MODEL.GKD.BANK_TEACHER_ROWS must be one of {BANK_TEACHER_ROWS}, not "
                f"{cfg.MODEL.GKD.BANK_TEACHER_ROWS!r}"
            )
        self._teacher_features: list[Tensor] | None = None
        self.teacher_cache = TeacherFeatureCache(
            os.path.join(cfg.OUTPUT_DIR, FILE_NAME) if cfg.MODEL.GKD.TEACHER_CACHE else None
        )
        self.harvest: FeatureHarvest | None = None
        self._harvest_state: dict | None = None  # loaded before the harvest exists
        self._mapper = DatasetMapper(cfg, is_train=False)
        # per refresh, by this process: images forwarded by each model, harvested rows
        self.last_counts: dict[str, int] = {}

    def student(self) -> DistilledDetector:
        """The GKD student: the one given, else the trainer's (unwrapped from DDP)."""
        if self.model is None:
            self.model = gkd_model_of(self.trainer)
        return self.model

    def bank(self) -> PrototypeBank:
        """The bank this hook refreshes: the student's distiller."""
        return self.student().distiller

    @property
    def instances(self) -> dict[str, Tensor] | None:
        """The bank's instance sample (:attr:`PrototypeBank.instances`)."""
        return self.bank().instances

    @instances.setter
    def instances(self, instances: dict[str, Tensor] | None) -> None:
        self.bank().instances = instances

    def forget_teacher_features(self) -> None:
        """Drop the in-memory teacher features: the next refresh reads the cache file, whose
        key is checked against the teacher as it is then, or extracts them again."""
        self._teacher_features = None

    def before_train(self) -> None:
        if self.instances is not None:  # a resumed run goes on harvesting
            self._install_harvest()

    def before_step(self) -> None:
        it = self.trainer.iter
        if it % self.period == 0 and int(self.bank().bank_iter) != it:
            self.refresh(it)

    def after_step(self) -> None:
        # every rank's harvest into the one detectron2's PeriodicCheckpointer (a later hook)
        # saves from the main process, at the iterations it saves at
        if self.harvest is None:
            return
        it, period = self.trainer.iter, self.cfg.SOLVER.CHECKPOINT_PERIOD
        if (period > 0 and (it + 1) % period == 0) or it >= self.trainer.max_iter - 1:
            self.harvest.merge()

    def refresh(self, iteration: int) -> None:
        """Replace the bank with the prototypes picked from the sample's features as the
        student is now. The ``gather_*`` steps exchange data with the other ranks."""
        start = time.perf_counter()
        model, bank = self.student(), self.bank()
        self.last_counts = {"student_images": 0, "teacher_images": 0, "harvested": 0}
        if bank.instances is None:
            bank.instances = configured_sample(self.cfg, self.dataset_dicts, bank.num_classes)
        self._install_harvest()
        inst = bank.instances
        if len(inst["cls"]) == 0:
            logger.warning(
                f"PGM: no training box is larger than {self.cfg.MODEL.GKD.MIN_BOX_SIZE} px: no "
                "prototypes, every instance gets r = 1 (unweighted knowledge)"
            )
            bank.bank_iter.fill_(iteration)
            picked = [[] for _ in range(bank.num_classes)]
            self._put_scalars(self._record(iteration, time.perf_counter() - start, picked))
            return
        images = sorted(set(inst["image"].tolist()))
        # the student's features of the whole sample: harvested rows (bank mode, since the
        # bank now in use), the rest extracted in the test pipeline
        student = SampleFeatures(len(inst["cls"]))
        harvested = self.gather_harvest(int(bank.bank_iter))
        if harvested is not None:
            student.fill(*harvested[:2], current=False)
        with evaluating(model), preserved_rng():
            self.gather_student_features(student, ~student.have)
            teacher = self.gather_teacher_features(images)
            # BANK_TEACHER_ROWS "training_forward": a harvested instance is selected on the
            # teacher's row of the same training input as its student row
            paired = teacher if harvested is None else paired_teacher_rows(teacher, harvested)
            picked = self.gather_picks(student.levels, paired)
            # the prototypes themselves from the current student (bank mode: the picks
            # came from harvested features up to a period old)
            rows = torch.cat([p for per_class in picked for p in per_class])
            self.gather_student_features(student, rows[~student.current[rows]])
        bank.store_picks(picked, student.levels, teacher, iteration)
        if self.harvest is not None:
            self.harvest.reset(iteration)
        record = self._record(iteration, time.perf_counter() - start, picked, len(images))
        log_refresh(
            record,
            self.cfg.MODEL.GKD.MIN_BOX_SIZE,
            class_names(self.cfg, len(record.picked)),
        )
        self._put_scalars(record)

    # ---- the refresh's steps -------------------------------------------------------------------
    def gather_harvest(self, bank_iter: int) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
        """Bank mode: the rows every rank harvested since the refresh of the bank in use,
        merged over the ranks (all-gather): (n,) rows, per level their student features and
        their teacher features (empty unless BANK_TEACHER_ROWS "training_forward"); or None."""
        if self.harvest is None:
            return None
        self.harvest.merge()
        rows, feats = self.harvest.rows()
        self.last_counts["unplaced"] = self.harvest.unplaced
        if self.harvest.since != bank_iter or len(rows) == 0:
            return None
        self.last_counts["harvested"] = len(rows)
        return rows, feats, self.harvest.teacher_rows_of()

    def gather_student_features(self, table: SampleFeatures, rows: Tensor) -> None:
        """Fill ``table`` with the student's features of the images that hold the sample's
        ``rows`` (a mask or indices): this rank's share extracted, every rank's all-gathered.
        Nothing when ``rows`` is empty."""
        images = sorted(set(self.instances["image"][rows].tolist()))
        if images:
            table.fill(*self._extraction().gather(self._student_maps, images, "student"))

    def gather_teacher_features(self, images: list[int]) -> list[Tensor]:
        """The teacher's features of the whole sample: in memory, else from the cache file or
        extracted from ``images``, with every rank (:meth:`SampleExtraction.gather_teacher`)."""
        if self._teacher_features is None:
            teacher = self.student().require_teacher()
            extraction = self._extraction()
            self._teacher_features = extraction.gather_teacher(teacher, images, self.teacher_cache)
        return self._teacher_features

    # the name benchmarks call it by
    teacher_features = gather_teacher_features

    def gather_picks(self, feats_s: list[Tensor], feats_t: list[Tensor]) -> list[list[Tensor]]:
        """The prototypes of every (class, level) (density filter, then joint matching
        pursuit: ``select_prototypes``), each selection solved by one rank on the model's
        device and the picks all-gathered (:func:`select_bank`).

        Returns:
            picked[c][level]: (m,) int64 sample rows of the prototypes.
        """
        g = self.cfg.MODEL.GKD
        settings = (
            g.NUM_PROTOTYPES,
            g.ALPHA,
            g.DENSITY_KERNEL,
            g.DENSITY_QUANTILE,
            g.EXCLUDE_PICKED,
        )
        cls, num_classes = self.instances["cls"], self.bank().num_classes

        def select(xs: Tensor, xt: Tensor) -> Tensor:
            return select_prototypes(xs, xt, *settings)

        return select_bank(feats_s, feats_t, cls, num_classes, select, self.student().device)

    # ---- what the steps need -------------------------------------------------------------------
    def _install_harvest(self) -> None:
        if self.mode != "bank" or self.harvest is not None:
            return
        model = self.student()
        self.harvest = FeatureHarvest.of_model(model, self.instances, self.dataset_dicts, self.cfg)
        if self._harvest_state is not None:
            self.harvest.load_state_dict(self._harvest_state)
            self._harvest_state = None
        model.feature_harvest = self.harvest

    def _student_maps(self, inputs: list[dict]) -> tuple[dict[str, Tensor], ImageList]:
        """The student's backbone features of test-time inputs (a ``FeatureFn``)."""
        model = self.student()
        images = model.preprocess_image(inputs)
        return model.backbone(images.tensor), images

    def _extraction(self) -> SampleExtraction:
        # made at each use: the extraction reads the config as it is then
        return SampleExtraction(
            self.cfg,
            self.student(),
            self.dataset_dicts,
            self._mapper,
            self.instances,
            self.last_counts,
        )

    # ---- what a refresh reports ----------------------------------------------------------------
    def _record(
        self, iteration: int, seconds: float, picked: list[list[Tensor]], num_images: int = 0
    ) -> RefreshRecord:
        return RefreshRecord(
            iteration=iteration,
            mode=self.mode,
            instances=self.instances,
            picked=picked,
            counts=self.last_counts,
            seconds=seconds,
            harvesting=self.harvest is not None,
            num_images=num_images,
        )

    def _put_scalars(self, record: RefreshRecord) -> None:
        names = metric_class_names(self.cfg, len(record.picked))
        self.trainer.storage.put_scalars(**refresh_scalars(record, names), smoothing_hint=False)

    # the checkpoint's hook state, as always: the bank's instance sample and the harvest
    def state_dict(self) -> dict:
        ret = {} if self.instances is None else {"instances": self.instances}
        if self.harvest is not None:  # merged over ranks in after_step, before the save
            ret["harvest"] = self.harvest.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        if "instances" in state_dict:
            self.instances = state_dict["instances"]
        if "harvest" in state_dict:
            if self.harvest is not None:
                self.harvest.load_state_dict(state_dict["harvest"])
            else:
                self._harvest_state = state_dict["harvest"]
