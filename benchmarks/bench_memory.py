#!/usr/bin/env python
"""Peak memory of GKD training vs student training + teacher inference (CPU, peak RSS).

    python -m benchmarks.bench_memory [--detector retinanet] [--size 320] [--batch 2] [--steps 5]

The models and inputs of benchmarks/bench_step.py (teacher R50-FPN, student R18-FPN, 80
classes). Three fresh processes, one after the other, each building only what it runs and
reporting its peak resident set size above its own baseline (python + torch + detectron2
imported): --steps student training steps; --steps teacher forwards under no_grad; --steps GKD
training steps. Prints the GKD peak increase against the sum of the other two (1.0 = GKD costs
what running the two separately costs) and checks that the teacher's outputs carry no autograd
graph (its activations are never kept for backward).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import in_fresh_process, report


def _run(mode: str, args: dict, queue) -> None:
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from benchmarks import bench_step
    from gkd_d2.teacher import FrozenTeacher

    torch.set_num_threads(args["threads"])
    tmp = tempfile.mkdtemp()
    teacher_path = str(Path(tmp) / "teacher.yaml")
    teacher_cfg, student_cfg, gkd_cfg = bench_step.build_cfgs(args["detector"], teacher_path)
    Path(teacher_path).write_text(teacher_cfg.dump())
    batch = bench_step.make_batch(student_cfg, args["size"], args["batch"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    no_graph = None
    with EventStorage(0):
        if mode == "teacher":
            teacher = FrozenTeacher(build_model(teacher_cfg), teacher_cfg, "BGR")
            for _ in range(args["steps"]):
                feats, _ = teacher.features(batch)
                no_graph = all(f.grad_fn is None and not f.requires_grad for f in feats.values())
        else:
            model = build_model(student_cfg if mode == "student" else gkd_cfg)
            if mode == "gkd":
                model.attach_teacher(FrozenTeacher(build_model(teacher_cfg), teacher_cfg, "BGR"))
                d = model.distiller
                with torch.no_grad():
                    d.protos_s.uniform_()
                    d.protos_t.uniform_()
                    d.proto_counts.fill_(d.protos_s.shape[2])
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
            for _ in range(args["steps"]):
                bench_step.train_step(model, opt, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"peak_increase_mib": (peak - base) / 1024, "teacher_no_graph": no_graph})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", choices=["retinanet", "faster_rcnn"], default="retinanet")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = vars(parser.parse_args(argv))
    res = {mode: in_fresh_process(_run, mode, args) for mode in ("student", "teacher", "gkd")}
    s, t, g = (res[m]["peak_increase_mib"] for m in ("student", "teacher", "gkd"))
    result = {
        "detector": args["detector"],
        "size": args["size"],
        "batch": args["batch"],
        "student_training_mib": round(s, 1),
        "teacher_inference_mib": round(t, 1),
        "gkd_training_mib": round(g, 1),
        "ratio_gkd_to_sum": round(g / (s + t), 3),
        "teacher_outputs_without_graph": res["teacher"]["teacher_no_graph"],
    }
    report(result, args["json"])
    return 0 if result["teacher_outputs_without_graph"] else 1


if __name__ == "__main__":
    sys.exit(main())
