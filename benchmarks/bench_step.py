#!/usr/bin/env python
"""Training-step cost of GKD: a GKD step vs a student step + a teacher no-grad forward.

    python -m benchmarks.bench_step [--size 320] [--batch 2] [--steps 10] [--rounds 3]
                                    [--detector retinanet|faster_rcnn] [--norm BN]
                                    [--device cuda] [--teacher-depth 101] [--student-depth 50]
                                    [--json FILE] [KEY VALUE ...]   (GKD config overrides)

RetinaNet (default): teacher R50-FPN (detectron2's bottleneck ResNet, 256-channel FPN), student
R18-FPN (gkd_d2's basic-block ResNet at detectron2's R18 width; depths 50+ are detectron2's ResNet:
the paper's R101 -> R50 is ``--teacher-depth 101 --student-depth 50``), 80 classes, random weights,
a full prototype bank (80 classes x 10 prototypes x 5 levels). Faster R-CNN: the same backbones
with detectron2's Faster R-CNN heads. The GKD model's student starts from the plain student's
weights (with random weights the proposals, hence the RoI heads' cost, depend on the weights).
Images: the embedded scenes' validation split resized to --size, with their boxes; the same --batch
images every step (data loading is not what is measured). The student's backbone and FPN norms are
detectron2's defaults (FrozenBN, none) unless ``--norm`` sets both, in the plain and the GKD
student alike: with a train-mode BN ("BN") GKD adds one eval-mode student backbone pass per step
for r (``DistilledDetector.descriptor_features``), which this measures.

Per round, one after the other on the same inputs: --steps student training steps (forward,
backward, SGD step; learning rate 0, so that random weights stay finite: the same cost), --steps
teacher forwards under no_grad (the backbone, and for RetinaNet the head whose logits GKD uses; for
Faster R-CNN the backbone only, its box head on the few positive RoIs being small), and --steps GKD
steps (student + teacher + distillation). Figures are medians over rounds of the per-round mean
step time, so the three are measured side by side under the same load (on CUDA, synchronised before
and after each timed loop). Prints the ratio GKD / (student + teacher) (target <= 1.10 on the CPU),
the time of the distiller's forward (pooling + RDM + losses) as a share of the GKD step, and the
top operators of one GKD step from torch.profiler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import report

REPO = Path(__file__).resolve().parent.parent

COMMON = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.WEIGHTS",
    "",
    "MODEL.GKD.NUM_PROTOTYPES",
    "10",
]
DETECTORS = {
    "retinanet": {
        "base": "configs/Base-RetinaNet.yaml",
        "gkd": "GKDRetinaNet",
        "student_backbone": "build_retinanet_basic_resnet_fpn_backbone",
        "classes": "MODEL.RETINANET.NUM_CLASSES",
    },
    "faster_rcnn": {
        "base": "configs/Base-RCNN-FPN.yaml",
        "gkd": "GKDRCNN",
        "student_backbone": "build_basic_resnet_fpn_backbone",
        "classes": "MODEL.ROI_HEADS.NUM_CLASSES",
    },
}


def build_cfgs(
    detector: str,
    teacher_path: str,
    gkd_opts: list[str] | None = None,
    norm: str | None = None,
    device: str = "cpu",
    depths: tuple[int, int] = (50, 18),
):
    from gkd_d2.config import load_config

    d = DETECTORS[detector]
    teacher = load_config(
        str(REPO / d["base"]), COMMON + ["MODEL.RESNETS.DEPTH", str(depths[0]), d["classes"], "80"]
    )
    teacher.MODEL.DEVICE = device
    student = teacher.clone()
    student.merge_from_list(["MODEL.RESNETS.DEPTH", str(depths[1])])
    if depths[1] < 50:  # R18/R34: gkd_d2's basic-block ResNet at detectron2's width
        student.merge_from_list(
            ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.BACKBONE.NAME", d["student_backbone"]]
        )
    if norm is not None:
        student.merge_from_list(["MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm])
    gkd = student.clone()
    gkd.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE",
            d["gkd"],
            "MODEL.TEACHER.CONFIG_FILE",
            teacher_path,
            *(gkd_opts or []),
        ]
    )
    return teacher, student, gkd


def make_batch(cfg, size: int, batch: int) -> list[dict]:
    """``batch`` validation images of the embedded scenes at ``size`` px with their boxes."""
    import torch.nn.functional as F
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import annotations_to_instances, read_image

    import gkd_d2  # noqa: F401  (registers the embedded scenes)

    out = []
    for d in DatasetCatalog.get("gkd_scenes_val")[:batch]:
        img = torch.from_numpy(read_image(d["file_name"], format="BGR").copy()).permute(2, 0, 1)
        scale = size / img.shape[1]
        img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear")[0]
        anns = [
            {**a, "bbox": [v * scale for v in a["bbox"]]}
            for a in d["annotations"]
            if not a.get("iscrowd", 0)
        ]
        out.append(
            {
                "image": img,
                "height": size,
                "width": size,
                "instances": annotations_to_instances(anns, (size, size)),
            }
        )
    return out


def train_step(model, optimizer, batch) -> None:
    losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()


def mean_time(fn, steps: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()  # CUDA runs asynchronously: time the work, not its launch
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", choices=sorted(DETECTORS), default="retinanet")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--norm", help="the student's RESNETS.NORM and FPN.NORM (e.g. BN)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--teacher-depth", type=int, default=50, choices=[50, 101, 152])
    parser.add_argument("--student-depth", type=int, default=18, choices=[18, 34, 50, 101])
    parser.add_argument("--json", type=Path)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE for the GKD config")
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from gkd_d2.teacher import FrozenTeacher

    tmp = tempfile.mkdtemp()
    teacher_cfg, student_cfg, gkd_cfg = build_cfgs(
        ns.detector,
        str(Path(tmp) / "teacher.yaml"),
        ns.opts,
        ns.norm,
        ns.device,
        (ns.teacher_depth, ns.student_depth),
    )
    (Path(tmp) / "teacher.yaml").write_text(teacher_cfg.dump())
    torch.manual_seed(0)
    teacher_model = build_model(teacher_cfg)
    teacher = FrozenTeacher(teacher_model, teacher_cfg, student_cfg.INPUT.FORMAT)
    student = build_model(student_cfg)
    gkd = build_model(gkd_cfg)
    # the same student weights in both: with random weights the RPN's proposals, hence the RoI
    # heads' cost (RoIAlign samples per bin grow with the box), depend on the weights
    missing, unexpected = gkd.load_state_dict(student.state_dict(), strict=False)
    gkd_only = [k for k in missing if not k.startswith("distiller.")]
    assert not unexpected and gkd_only in ([], ["loss_normalizer_ema"]), (missing, unexpected)
    gkd.attach_teacher(teacher)
    g = torch.Generator().manual_seed(1)
    d = gkd.distiller
    with torch.no_grad():  # a full bank: every class has its 10 prototypes at every level
        d.protos_s.copy_(torch.rand(d.protos_s.shape, generator=g))
        d.protos_t.copy_(torch.rand(d.protos_t.shape, generator=g))
        d.proto_counts.fill_(d.protos_s.shape[2])
    batch = make_batch(student_cfg, ns.size, ns.batch)

    opt_s = torch.optim.SGD(student.parameters(), lr=0.0, momentum=0.9)
    opt_g = torch.optim.SGD(gkd.parameters(), lr=0.0, momentum=0.9)
    student.train()
    gkd.train()
    rpn = ns.detector == "faster_rcnn"

    def teacher_forward():
        feats, _ = teacher.features(batch)
        if rpn:
            return feats
        return teacher.head_logits([feats[f] for f in gkd.distill_in_features])

    distill_seconds = []
    original = d.forward

    def timed_distiller(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        distill_seconds.append(time.perf_counter() - start)
        return out

    d.forward = timed_distiller
    rounds = {"student": [], "teacher": [], "gkd": [], "distiller_fwd": []}
    with EventStorage(0):
        for fn in (
            lambda: train_step(student, opt_s, batch),
            teacher_forward,
            lambda: train_step(gkd, opt_g, batch),
        ):
            fn()  # warm-up
        for r in range(ns.rounds):
            rounds["student"].append(mean_time(lambda: train_step(student, opt_s, batch), ns.steps))
            rounds["teacher"].append(mean_time(teacher_forward, ns.steps))
            distill_seconds.clear()
            rounds["gkd"].append(mean_time(lambda: train_step(gkd, opt_g, batch), ns.steps))
            rounds["distiller_fwd"].append(sum(distill_seconds) / len(distill_seconds))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in rounds.items()))
        d.forward = original
        from torch.profiler import ProfilerActivity, profile, record_function

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("gkd_step"):
                train_step(gkd, opt_g, batch)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    result = {
        "detector": ns.detector,
        "device": ns.device,
        "depths": f"R{ns.teacher_depth} -> R{ns.student_depth}",
        "size": ns.size,
        "batch": ns.batch,
        "threads": ns.threads,
        "gkd_opts": " ".join(ns.opts),
        "student_norm": student_cfg.MODEL.RESNETS.NORM,
        "descriptor_pass": gkd.needs_descriptor_pass(),
        "student_step_s": round(med["student"], 4),
        "teacher_forward_s": round(med["teacher"], 4),
        "gkd_step_s": round(med["gkd"], 4),
        "ratio_gkd_to_student_plus_teacher": round(
            med["gkd"] / (med["student"] + med["teacher"]), 3
        ),
        "distiller_forward_s": round(med["distiller_fwd"], 4),
        "distiller_forward_share": round(med["distiller_fwd"] / med["gkd"], 3),
        "overhead_share": round((med["gkd"] - med["student"] - med["teacher"]) / med["gkd"], 3),
    }
    report(result, ns.json)
    print(
        "top operators of one GKD step (self CPU time):\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
