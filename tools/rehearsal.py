"""Stand-ins for rehearsing the paper configs (``python -m tools.rehearse``,
``python -m benchmarks.bench_refresh --stand-in-data``) without their data and weights: tiny
COCO and PASCAL VOC splits in the layouts detectron2's builtin datasets read, and random-init
weights of the configured architectures in detectron2's checkpoint formats.

Point ``DETECTRON2_DATASETS`` at a folder, write the splits a config names
(``write_builtin_splits``), and detectron2's own registrations (``coco_2017_train``,
``voc_2007_trainval``, ...) load them with their real category sets and id mappings (COCO's 80
non-contiguous ids, VOC's 20 names). Images are COCO-sized (640x480 and similar, so that the
800-px test resize gives 800x1067-class inputs) with one filled, textured box per instance.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) of the images, cycled: COCO's most common sizes
IMAGE_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375)]
# box sides in original pixels: above PGM's MIN_BOX_SIZE (30) so that every instance qualifies
MIN_SIDE, MAX_SIDE = 40, 160


# Caffe2 suffixes: (is a norm, torch name) -> suffix; ResNet block parts
PARAM = {(False, "weight"): "w", (False, "bias"): "b", (True, "weight"): "s", (True, "bias"): "b"}
C2_BRANCH = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}


class RehearsalDataError(RuntimeError):
    """A dataset name whose layout cannot be written (not a COCO or VOC builtin split)."""


def _boxes(rng: np.random.Generator, n: int, width: int, height: int) -> list[list[float]]:
    """``n`` boxes [x0, y0, x1, y1] inside the image, each side in [MIN_SIDE, MAX_SIDE]."""
    out = []
    for _ in range(n):
        w, h = rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2)
        x0 = int(rng.integers(0, width - w))
        y0 = int(rng.integers(0, height - h))
        out.append([float(x0), float(y0), float(x0 + w), float(y0 + h)])
    return out


def _draw(path: Path, rng: np.random.Generator, size, boxes, classes) -> None:
    """A smooth random background with each box filled by its class's colour plus noise."""
    width, height = size
    coarse = rng.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR)).copy()
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        colour = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256], dtype=np.int16)
        patch = colour + rng.integers(-30, 31, size=(int(y1 - y0), int(x1 - x0), 3))
        img[int(y0) : int(y1), int(x0) : int(x1)] = np.clip(patch, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def _layout(num_images: int, num_classes: int, per_image: int, seed: int, every_class: bool):
    """Per image: its size, boxes and contiguous class indices. With ``every_class``, the
    classes are dealt round-robin so that each appears at least once (needs
    num_images * per_image >= num_classes)."""
    if every_class and num_images * per_image < num_classes:
        raise RehearsalDataError(
            f"{num_images} images x {per_image} boxes cannot hold all {num_classes} classes"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_classes)
    images = []
    for i in range(num_images):
        size = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        if every_class:
            classes = [int(order[(i * per_image + j) % num_classes]) for j in range(per_image)]
        else:
            classes = rng.integers(0, num_classes, size=per_image).tolist()
        images.append((size, _boxes(rng, per_image, *size), classes, rng))
    return images


def write_coco_split(
    json_file: str,
    image_root: str,
    categories: list[dict],
    num_images: int,
    per_image: int,
    seed: int,
    every_class: bool = True,
    prefix: str = "rehearsal",
    used_classes: int = 0,
) -> int:
    """Write a COCO instances json and its images; return the number of instances.

    Args:
        categories: COCO ``categories`` entries (``id``, ``name``), in contiguous order; the ids
            are written as they are (COCO's are 1..90 with gaps).
        used_classes: objects only of the first N categories (0: all); all are listed.
    """
    images, annotations = [], []
    drawn = min(used_classes, len(categories)) if used_classes else len(categories)
    layout = _layout(num_images, drawn, per_image, seed, every_class)
    for i, (size, boxes, classes, rng) in enumerate(layout):
        name = f"{prefix}_{seed:03d}_{i:06d}.jpg"
        _draw(Path(image_root) / name, rng, size, boxes, classes)
        images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
        for (x0, y0, x1, y1), c in zip(boxes, classes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": categories[c]["id"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    cats = [
        {"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", "")}
        for c in categories
    ]
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    return len(annotations)


def write_voc_split(
    dirname: str,
    split: str,
    class_names: list[str],
    num_images: int,
    per_image: int,
    seed: int,
    every_class: bool = True,
) -> int:
    """Add ``num_images`` images to a VOCdevkit-layout folder (``JPEGImages/``,
    ``Annotations/`` with the tags detectron2's loader and VOC evaluator read, and
    ``ImageSets/Main/<split>.txt``); return the number of instances."""
    root = Path(dirname)
    ids = []
    count = 0
    for i, (size, boxes, classes, rng) in enumerate(
        _layout(num_images, len(class_names), per_image, seed, every_class)
    ):
        fileid = f"{split}_{seed:03d}_{i:06d}"
        ids.append(fileid)
        _draw(root / "JPEGImages" / f"{fileid}.jpg", rng, size, boxes, classes)
        objects = "".join(
            f"<object><name>{class_names[c]}</name><pose>Unspecified</pose>"
            "<truncated>0</truncated><difficult>0</difficult><bndbox>"
            # VOC boxes are 1-based inclusive pixel indices; detectron2 subtracts 1 from x0/y0
            f"<xmin>{int(x0) + 1}</xmin><ymin>{int(y0) + 1}</ymin>"
            f"<xmax>{int(x1)}</xmax><ymax>{int(y1)}</ymax></bndbox></object>"
            for (x0, y0, x1, y1), c in zip(boxes, classes)
        )
        count += len(boxes)
        xml = (
            f"<annotation><filename>{fileid}.jpg</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{objects}</annotation>"
        )
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{fileid}.xml").write_text(xml)
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return count


def write_builtin_splits(
    train: list[str],
    test: list[str],
    train_images: int,
    test_images: int,
    per_image: int,
    used_classes: int = 0,
) -> dict[str, dict]:
    """Write tiny versions of detectron2 builtin splits, where their metadata says (under
    ``DETECTRON2_DATASETS``, read when detectron2 was imported). Every class appears in the
    training splits taken together; ``train_images`` are shared out over them. With
    ``used_classes`` N (COCO splits), the objects are only of the first N classes (a sample
    with many instances per class at few images).

    Returns:
        {dataset name: {"images": n, "instances": n, "path": where}}.

    Raises:
        RehearsalDataError: a name that is not a COCO-json or PASCAL VOC builtin split.
    """
    from detectron2.data import MetadataCatalog

    written = {}
    names = [(n, True) for n in train] + [(n, False) for n in test]
    per_train = -(-train_images // max(1, len(train)))
    for k, (name, is_train) in enumerate(names):
        meta = MetadataCatalog.get(name)
        n = per_train if is_train else test_images
        seed = 100 + k
        # only detectron2's own splits: never write into a dataset the user registered
        if name.startswith("coco_") and hasattr(meta, "json_file"):
            # the COCO category records (id, name) from the split's public metadata
            ids = meta.thing_dataset_id_to_contiguous_id
            cats = [{"id": i, "name": meta.thing_classes[ids[i]]} for i in sorted(ids, key=ids.get)]
            count = write_coco_split(
                meta.json_file,
                meta.image_root,
                cats,
                n,
                per_image,
                seed,
                every_class=is_train,
                used_classes=used_classes,
            )
            written[name] = {"images": n, "instances": count, "path": meta.json_file}
        elif name.startswith("voc_") and hasattr(meta, "dirname"):
            count = write_voc_split(
                meta.dirname,
                meta.split,
                list(meta.thing_classes),
                n,
                per_image,
                seed,
                every_class=is_train,
            )
            written[name] = {"images": n, "instances": count, "path": meta.dirname}
        else:
            raise RehearsalDataError(
                f"dataset {name!r} (DATASETS.{'TRAIN' if is_train else 'TEST'}) is not one of "
                "detectron2's builtin COCO (coco_*) or PASCAL VOC (voc_*) splits, so the "
                "rehearsal writes no stand-in for it; rehearse with a config of those datasets"
            )
    return written


def c2_name(key: str) -> str | None:
    """detectron2 ResNet name -> MSRA/Caffe2 ImageNet name (the inverse of detectron2's
    ``convert_basic_c2_names``); None for what the ImageNet files do not hold (BN statistics)."""
    m = re.fullmatch(r"stem\.conv1\.(norm\.)?(weight|bias)", key)
    if m:
        return ("res_conv1_bn_" if m.group(1) else "conv1_") + PARAM[bool(m.group(1)), m.group(2)]
    m = re.fullmatch(r"(res\d)\.(\d+)\.(shortcut|conv1|conv2|conv3)\.(norm\.)?(weight|bias)", key)
    if m:
        base = f"{m.group(1)}_{m.group(2)}_{C2_BRANCH[m.group(3)]}_"
        return base + ("bn_" if m.group(4) else "") + PARAM[bool(m.group(4)), m.group(5)]
    return None


def calibrate_frozen_bn(model, images: list[dict]) -> int:
    """Fold the statistics of one forward pass over ``images`` into every FrozenBN's scale and
    bias, layer after layer, so that each normalises its input to zero mean and unit variance
    (as a trained network's frozen statistics do); return how many layers were set.

    detectron2's random init leaves FrozenBN as the identity, and without normalisation a
    ResNet's activations grow through its depth (R101's FPN features reach about 1e7, and the
    imitation losses 1e14 at iteration 0).
    """
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    def normalise(module, args):
        x = args[0]
        var, mean = torch.var_mean(x, dim=(0, 2, 3))
        scale = (var + module.eps).rsqrt() * (module.running_var + module.eps).sqrt()
        module.weight.copy_(scale)
        module.bias.copy_(-mean * (var + module.eps).rsqrt())
        module.running_mean.zero_()

    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(normalise) for m in norms]
    try:
        with torch.no_grad():
            model.backbone(model.preprocess_image(images).tensor)
    finally:
        for h in handles:
            h.remove()
    return len(norms)


def model_inputs(cfg, dataset: str, count: int) -> list[dict]:
    """The first ``count`` images of ``dataset`` through detectron2's test-time mapper."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(dataset)[:count]]


def write_weights(model, shipped: str, out: Path, name: str) -> Path:
    """Random-init weights of ``model`` in the format of the ``shipped`` path."""
    import torch

    state = model.state_dict()
    if shipped.endswith(".pth"):
        path = out / f"{name}.pth"
        torch.save({"model": state, "iteration": 0}, path)
        return path
    path = out / f"{name}.pkl"
    if "ImageNetPretrained/MSRA" in shipped:  # Caffe2 blobs of the bottom-up ResNet only
        blobs = {}
        for k, v in model.backbone.bottom_up.state_dict().items():
            c2 = c2_name(k)
            if c2 is not None:
                blobs[c2] = v.numpy()
        data = blobs
    else:  # detectron2 model zoo: {"model": numpy state dict, "__author__": ...}
        data = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "rehearsal"}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def write_stand_in_weights(cfg, out: Path) -> tuple[Path, Path, dict[str, int]]:
    """Random-init student (the plain meta-architecture of ``cfg``) and teacher
    (``MODEL.TEACHER.CONFIG_FILE``) weights under ``out``, FrozenBN calibrated on two images of
    ``DATASETS.TRAIN[0]``, each in the format of its configured path (:func:`write_weights`).

    Returns:
        (student file, teacher file, {"student": n, "teacher": n} FrozenBN layers set).
    """
    import torch
    from detectron2.modeling import META_ARCH_REGISTRY, build_model

    from gkd_d2.teacher import load_teacher_cfg

    torch.manual_seed(0)
    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"
    plain = cpu.clone()
    plain.MODEL.META_ARCHITECTURE = META_ARCH_REGISTRY.get(
        cfg.MODEL.META_ARCHITECTURE
    ).plain_architecture
    student = build_model(plain)
    teacher_cfg = load_teacher_cfg(cpu)
    teacher_cfg.defrost()
    teacher_cfg.MODEL.DEVICE = "cpu"
    teacher = build_model(teacher_cfg)
    images = model_inputs(cpu, cfg.DATASETS.TRAIN[0], 2)
    calibrated = {
        "student": calibrate_frozen_bn(student, images),
        "teacher": calibrate_frozen_bn(teacher, images),
    }
    out.mkdir(parents=True, exist_ok=True)
    return (
        write_weights(student, cfg.MODEL.WEIGHTS, out, "student"),
        write_weights(teacher, cfg.MODEL.TEACHER.WEIGHTS, out, "teacher"),
        calibrated,
    )
