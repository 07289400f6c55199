#!/usr/bin/env python
"""Record every scalar of every iteration of a short, fixed-seed GKD run, as JSON.

    python -m tools.record_metrics --detector retinanet --output metrics.json [--iters 30]
    python -m tools.record_metrics --detector retinanet --for-this-machine

The run: the quick-start teacher of the detector trained for ``--teacher-iters`` iterations, then
the quick-start GKD student for ``--iters`` iterations with a prototype refresh at iteration 0
and another at ``--refresh-period``, on the embedded scenes, in this process, through
train_net.py's ``Trainer``, with ``--threads`` torch threads. Two recordings of the same code on
the same machine are equal to the last digit; a refactor that claims to keep behaviour is
checked with them.

Float sums round differently on another detectron2 source, CPU vendor (MKL takes other paths on
AMD and Intel) or instruction set, so ``tests/test_recorded_metrics.py`` compares a run exactly
with the recording of the same detectron2 source and machine kind:
``tests/data/metrics_<detector>.<build>.<machine>.json`` (:func:`recording_path`).
``--for-this-machine`` writes that file for the installed detectron2 and this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from detectron2.engine import HookBase

import gkd_d2  # noqa: F401  (registers datasets and models)
from gkd_d2.engine import Trainer, setup_cfg

REPO = Path(__file__).resolve().parent.parent
RECORDINGS = REPO / "tests" / "data"
THREADS = 2  # the recordings' thread count (reductions split by thread round differently)
# the installer's patches (tools/install_detectron2.py) change no number: the source digest
# leaves the patched model zoo and the build marker out and applies the alias renames
DIGEST_SKIPS = {"_gkd_d2_build.py", "model_zoo/model_zoo.py"}
NP_ALIAS = re.compile(r"\bnp\.(int|float|str|bool)\b(?![\w.])")

CONFIGS = {
    "retinanet": (
        "configs/quickstart_retinanet_cpu.yaml",
        "configs/quickstart_gkd_retinanet_cpu.yaml",
    ),
    "faster_rcnn": (
        "configs/quickstart_faster_rcnn_cpu.yaml",
        "configs/quickstart_gkd_faster_rcnn_cpu.yaml",
    ),
}


class ScalarRecorder(HookBase):
    """Every scalar written during an iteration (losses, r statistics, refresh summaries)."""

    def __init__(self):
        self.rows: list[dict] = []

    def after_step(self) -> None:
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        self.rows.append({"iter": it, **{k: v for k, (v, i) in sorted(latest.items()) if i == it}})


def machine_kind() -> str:
    """``<vendor>-<ISA>``, e.g. "intel-avx512", "amd-avx2": the CPU vendor (MKL's code paths
    differ between AMD and Intel) and the instruction set that torch dispatches to."""
    vendor = "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^vendor_id\s*:\s*(\S+)", Path("/proc/cpuinfo").read_text(), re.M)
        if found:
            vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(found[1], found[1])
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability().lower()}"


def detectron2_source_digest() -> str:
    """sha256 (first 16 hex digits) of the installed detectron2's Python source, however it was
    installed: the same commit gives the same digest from the project's installer or from the
    user's own build (the installer's patches are left out or applied to every tree: they
    change no number)."""
    import detectron2

    root = Path(detectron2.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in DIGEST_SKIPS:
            continue
        # the installer's renames, applied to any tree: patched or not, the text is the same
        text = NP_ALIAS.sub(r"\1", path.read_text()).replace("Image.LINEAR", "Image.BILINEAR")
        digest.update(rel.encode() + b"\0" + text.encode())
    return digest.hexdigest()[:16]


def detectron2_build() -> str:
    """The installed detectron2 build's name: the installer's (e.g. "main-02b5c4e2"), or the
    name of a recording with the same source digest, or "d2-<digest>"."""
    try:
        from detectron2._gkd_d2_build import GKD_D2_BUILD

        return GKD_D2_BUILD["what"].replace(" ", "-")
    except ImportError:
        pass
    digest = detectron2_source_digest()
    for path in sorted(RECORDINGS.glob("metrics_*.json")):
        if json.loads(path.read_text()).get("detectron2_digest") == digest:
            return path.name.split(".")[1]
    return f"d2-{digest}"


def recording_path(detector: str) -> Path:
    """The recording for the installed detectron2 and this machine (it may not exist)."""
    return RECORDINGS / f"metrics_{detector}.{detectron2_build()}.{machine_kind()}.json"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config_file: str, *opts: str) -> Trainer:
    args = SimpleNamespace(config_file=config_file, eval_only=False, resume=False, opts=list(opts))
    cfg = setup_cfg(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def record(
    detector: str,
    output_dir: str,
    iters: int,
    teacher_iters: int,
    period: int,
    threads: int = THREADS,
) -> dict:
    with torch_threads(threads):
        rows = recorded_rows(detector, output_dir, iters, teacher_iters, period)
    return {
        "detector": detector,
        "iters": iters,
        "teacher_iters": teacher_iters,
        "refresh_period": period,
        "threads": threads,
        "torch": torch.__version__,
        "detectron2_digest": detectron2_source_digest(),
        "machine": machine_kind(),
        "rows": rows,
    }


def recorded_rows(
    detector: str, output_dir: str, iters: int, teacher_iters: int, period: int
) -> list[dict]:
    teacher_cfg, student_cfg = CONFIGS[detector]
    teacher_dir = os.path.join(output_dir, "teacher")
    common = ["SEED", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    teacher = train(
        teacher_cfg,
        *common,
        "SOLVER.MAX_ITER",
        str(teacher_iters),
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "OUTPUT_DIR",
        teacher_dir,
    )
    teacher.train()
    del teacher
    student = train(
        student_cfg,
        *common,
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "MODEL.TEACHER.WEIGHTS",
        os.path.join(teacher_dir, "model_final.pth"),
        "MODEL.TEACHER.CHECK_IMAGES",
        "4",
        "MODEL.TEACHER.MIN_AP",
        "0.0",
        "MODEL.GKD.REFRESH_PERIOD",
        str(period),
        "MODEL.GKD.MAX_IMAGES_PER_CLASS",
        "8",
        "OUTPUT_DIR",
        os.path.join(output_dir, "student"),
    )
    recorder = ScalarRecorder()
    student.register_hooks([recorder])
    student.train()
    return recorder.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", choices=sorted(CONFIGS), required=True)
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", help="the JSON file to write")
    out.add_argument(
        "--for-this-machine",
        action="store_true",
        help="write the recording that tests/test_recorded_metrics.py compares with on this "
        "machine and detectron2 build (tests/data/metrics_<detector>.<build>.<machine>.json)",
    )
    parser.add_argument("--work-dir", default="output/record_metrics")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--teacher-iters", type=int, default=30)
    parser.add_argument("--refresh-period", type=int, default=15)
    parser.add_argument("--threads", type=int, default=THREADS)
    a = parser.parse_args()
    output = recording_path(a.detector) if a.for_this_machine else Path(a.output)
    result = record(
        a.detector,
        os.path.join(a.work_dir, a.detector),
        a.iters,
        a.teacher_iters,
        a.refresh_period,
        a.threads,
    )
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"record_metrics: {len(result['rows'])} iterations written to {output}")


if __name__ == "__main__":
    main()
