"""The evaluator of a dataset, chosen by its metadata's ``evaluator_type``."""

from __future__ import annotations

import os

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: str | None = None
) -> DatasetEvaluator:
    """COCO box AP for ``evaluator_type`` "coco", VOC AP for "pascal_voc".

    Raises:
        ValueError: another evaluator type, named with the dataset.
    """
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
