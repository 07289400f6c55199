"""GKD in a user's own detectron2 trainer: the README's my_trainer.py, run exactly as printed
there, trains a shipped GKD config from another folder with gkd_d2's log lines in its log.txt
and an evaluation at its end, and its trainer trains the same losses at every iteration as
train_net.py's Trainer."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_ENV, setup_test_cfg
from detectron2.engine import HookBase
from detectron2.modeling import build_model

from gkd_d2 import load_config
from gkd_d2.engine import Trainer, build_gkd_hooks

TIMINGS = re.compile(r"time|seconds")


def readme_trainer_code() -> str:
    """The README's python block that defines ``MyTrainer``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if "class MyTrainer(DefaultTrainer)" in b]
    assert len(found) == 1, "the README shows one MyTrainer snippet"
    return found[0]


class ScalarRecorder(HookBase):
    """Every scalar written in each iteration (losses, r statistics, refresh summaries),
    timings aside."""

    def __init__(self):
        self.rows = []

    def after_step(self):
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        self.rows.append(
            {k: v for k, (v, i) in latest.items() if i == it and not TIMINGS.search(k)}
        )


def teacher_weights(tmp_path, teacher_config) -> str:
    torch.manual_seed(123)
    path = tmp_path / "teacher.pth"
    torch.save({"model": build_model(load_config(str(teacher_config))).state_dict()}, path)
    return str(path)


def train(trainer_cls, config, out, weights, iters=6):
    cfg = setup_test_cfg(
        config,
        "OUTPUT_DIR",
        str(out),
        "MODEL.TEACHER.WEIGHTS",
        weights,
        "MODEL.TEACHER.CHECK_IMAGES",
        "2",
        "SOLVER.MAX_ITER",
        str(iters),
        "DATASETS.TEST",
        "()",
    )
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=False)
    recorder = ScalarRecorder()
    trainer.register_hooks([recorder])
    trainer.train()
    return recorder.rows


def test_readme_trainer_script_runs_as_printed(tmp_path):
    """my_trainer.py, the README's block written to a file as is, on the shipped quick-start
    GKD config with detectron2's config idiom, from a folder that holds no config; only the
    data and the run's length are overridden, as a user's KEY VALUE pairs."""
    (tmp_path / "my_trainer.py").write_text(readme_trainer_code())
    torch.manual_seed(0)
    teacher_cfg = load_config(str(REPO / "configs" / "quickstart_retinanet_cpu.yaml"))
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": build_model(teacher_cfg).state_dict()}, teacher)
    out = tmp_path / "run"
    argv = [
        "--config-file",
        str(REPO / "configs" / "quickstart_gkd_retinanet_cpu.yaml"),
        "DATASETS.TRAIN",
        '("gkd_scenes_tiny_train",)',
        "DATASETS.TEST",
        '("gkd_scenes_tiny_val",)',
        "MODEL.TEACHER.WEIGHTS",
        str(teacher),
        # a random teacher scores about 0 AP: the check logs it and lets the run go on
        "MODEL.TEACHER.MIN_AP",
        "0.0",
        "MODEL.TEACHER.CHECK_IMAGES",
        "4",
        "MODEL.GKD.MAX_IMAGES_PER_CLASS",
        "4",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.MAX_ITER",
        "3",
        "OUTPUT_DIR",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, "my_trainer.py", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **TINY_ENV},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = (out / "log.txt").read_text()
    # gkd_d2's own lines reach log.txt: the teacher check and the refresh
    assert re.search(r"gkd_d2\.engine\.teacher_check INFO: Teacher check: teacher RetinaNet", log)
    assert re.search(
        r"gkd_d2\.engine\.refresh_report INFO: PGM refresh at iteration 0 \(full\)", log
    )
    # the distillation trained, and the evaluator ran at the end
    assert "loss_gkd_fg" in log and "Evaluation results for gkd_scenes_tiny_val" in log
    assert (out / "model_final.pth").is_file()


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_readme_trainer_trains_the_losses_of_train_net(tmp_path, detector):
    namespace = {}
    exec(compile(readme_trainer_code(), "README.md", "exec"), namespace)
    my_trainer = namespace["MyTrainer"]
    configs = REPO / "tests" / "configs"
    weights = teacher_weights(tmp_path, configs / f"tiny_{detector}.yaml")
    config = configs / f"tiny_gkd_{detector}.yaml"
    mine = train(my_trainer, config, tmp_path / "mine", weights)
    ours = train(Trainer, config, tmp_path / "ours", weights)
    assert len(mine) == len(ours) == 6
    # a refresh inside the run (REFRESH_PERIOD 3), the teacher check, the distillation terms
    assert "gkd/pgm_instances" in mine[3] and "gkd/teacher_ap" in mine[0]
    assert {"loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "gkd/r_mean"} <= set(mine[5])
    for it, (a, b) in enumerate(zip(mine, ours)):
        assert a == b, f"iteration {it}: " + ", ".join(
            f"{k} {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        )


def test_gkd_hooks_are_empty_for_a_plain_detector():
    """One trainer serves the teacher's training too: no GKD hooks for a plain RetinaNet."""
    cfg = load_config(str(REPO / "tests" / "configs" / "tiny_retinanet.yaml"))
    assert build_gkd_hooks(cfg) == []
    gkd = load_config(str(REPO / "tests" / "configs" / "tiny_gkd_retinanet.yaml"))
    names = ["TeacherCheck", "PrototypeRefresh", "LossShares"]
    assert [type(h).__name__ for h in build_gkd_hooks(gkd)] == names
    gkd.MODEL.GKD.ROBUST_WEIGHTS = False  # local-only KD: no prototypes
    gkd.MODEL.TEACHER.CHECK_IMAGES = 0
    assert [type(h).__name__ for h in build_gkd_hooks(gkd)] == ["LossShares"]


def test_gkd_hooks_name_a_trainer_whose_model_is_not_gkd():
    """GKD hooks put on a trainer of a plain detector stop with the class and the key to set."""
    from types import SimpleNamespace

    from gkd_d2.engine.hooks import gkd_model_of

    plain = build_model(load_config(str(REPO / "tests" / "configs" / "tiny_retinanet.yaml")))
    with pytest.raises(TypeError, match=r"trains a RetinaNet: set MODEL\.META_ARCHITECTURE"):
        gkd_model_of(SimpleNamespace(model=plain))
    # a DDP-style wrapper is looked through
    gkd = build_model(load_config(str(REPO / "tests" / "configs" / "tiny_gkd_retinanet.yaml")))
    assert gkd_model_of(SimpleNamespace(model=SimpleNamespace(module=gkd))) is gkd
