"""One-class splits of the embedded scenes, and a runner that registers them.

    python -m benchmarks.one_class_scenes train_net.py --config-file configs/bench/... [ARGS]

``gkd_scenes_<class>_train`` / ``gkd_scenes_<class>_val`` (e.g. ``gkd_scenes_square_train``,
``gkd_scenes_ring_val``), one pair per shape class, are ``gkd_scenes_train`` (2000 images) and
``gkd_scenes_val`` (300) with the annotations of that class only: the other shapes stay in the
images as unlabelled background, the kept class's ``category_id`` becomes 0 and the metadata names
one class (``thing_classes ["<class>"]``). The class is in the dataset name, so two classes never
share a cache (detectron2's or the distiller's). No ``json_file`` in the metadata: COCOEvaluator
converts the dicts itself (into the run's OUTPUT_DIR). They belong to the one-class soft-label
benchmark (:mod:`benchmarks.bench_one_class`), so ``import gkd_d2`` does not register them; the
runner does, then runs the script in this process as ``__main__``, as
:mod:`benchmarks.with_fashion_data` does (one process only: train_net.py's ``--num-gpus N``
workers would not find its ``main``).
"""

from __future__ import annotations

from detectron2.data import DatasetCatalog, MetadataCatalog

KEEP = "square"  # the class of the first round (and of the configs' DATASETS)
BASE_SPLITS = {"train": "gkd_scenes_train", "val": "gkd_scenes_val"}


def one_class_splits(keep: str = KEEP) -> dict[str, str]:
    """{one-class split name: the registered scenes split it is derived from} of class ``keep``:
    ``gkd_scenes_<keep>_train`` and ``gkd_scenes_<keep>_val``."""
    return {f"gkd_scenes_{keep}_{split}": base for split, base in BASE_SPLITS.items()}


# the first round's splits ("square")
ONE_CLASS_SPLITS = one_class_splits(KEEP)


def one_class_dicts(dicts: list[dict], class_index: int) -> list[dict]:
    """``dicts`` (detectron2's dataset dicts) with only the annotations whose ``category_id`` is
    ``class_index``, remapped to 0; every image kept (one without the class is background only).
    The input is not modified."""
    out = []
    for d in dicts:
        anns = [
            {**a, "category_id": 0}
            for a in d.get("annotations", [])
            if a["category_id"] == class_index
        ]
        out.append({**d, "annotations": anns})
    return out


def register_one_class_split(name: str, base: str, keep: str = KEEP) -> None:
    """Register ``name``: the registered split ``base`` with the annotations of its class
    ``keep`` only (category 0). Loads ``base`` only when ``name`` is loaded; a name that is
    already registered is left as it is, so registering twice is harmless."""
    if name in DatasetCatalog.list():
        return
    classes = MetadataCatalog.get(base).thing_classes
    if keep not in classes:
        raise KeyError(f"{keep!r} is not a class of {base!r}: {classes}")
    index = classes.index(keep)
    DatasetCatalog.register(name, lambda: one_class_dicts(DatasetCatalog.get(base), index))
    MetadataCatalog.get(name).set(thing_classes=[keep], evaluator_type="coco")


def register_one_class_datasets() -> None:
    """Register the one-class splits of every shape class (:func:`one_class_splits`; their bases:
    ``import gkd_d2`` registers them); nothing is generated or read until a split is loaded."""
    import gkd_d2  # noqa: F401  (registers gkd_scenes_*)
    from gkd_d2.data.scenes import SHAPE_CLASSES

    for keep in SHAPE_CLASSES:
        for name, base in one_class_splits(keep).items():
            register_one_class_split(name, base, keep)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.with_fashion_data import run_script

    run_script(argv, register_one_class_datasets)


if __name__ == "__main__":
    main()
