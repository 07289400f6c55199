#!/usr/bin/env python
"""The README's "Your own dataset" recipe, its commands timed as printed, on the CPU.

    python -m benchmarks.bench_own_dataset [--json F] [--keep DIR]

Its code blocks are read from README.md: the registration goes into a copy of train_net.py
(``my_train_net.py``), a COCO-format dataset of 5 classes (8 training and 4 validation images of
160 px, 3 objects of 36-70 px each) is written to a work folder, and the commands run with the
README's own small-run overrides (``SMALL``), each timed. The control arm is the distillation
command as the recipe wrote it before (``before_distil``): the teacher rebuilt from the template
(``configs/voc/retinanet_R_101_FPN.yaml`` with ``MODEL.TEACHER.OPTS`` giving the number of
classes and the norm that the small run trained with) instead of its own run config, so that
it is checked and extracted at the template's 800 px while it was trained at 160 px.
tests/test_own_dataset.py runs the same recipe with these helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.harness import report

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["disc", "box", "bar", "ring", "cross"]
COLOURS = [(230, 60, 60), (60, 200, 60), (60, 60, 230), (230, 200, 40), (200, 60, 220)]


def readme_section(title: str) -> str:
    """The README's section ``## title``, up to the next one."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def code_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order."""
    return re.findall(r"```(\w*)\n(.*?)```", section, re.S)


def the_block(blocks: list[tuple[str, str]], lang: str, marker: str) -> str:
    """The one block of ``lang`` ("" for a plain shell block) that holds ``marker``."""
    found = [code for lng, code in blocks if lng == lang and marker in code]
    if len(found) != 1:
        raise ValueError(f"{len(found)} {lang or 'shell'} blocks hold {marker!r}, not one")
    return found[0]


def draw_shape(draw: ImageDraw.ImageDraw, cls: int, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    colour = COLOURS[cls]
    if cls == 0:
        draw.ellipse(box, fill=colour)
    elif cls == 1:
        draw.rectangle(box, fill=colour)
    elif cls == 2:
        draw.rectangle((x0, (y0 + y1) // 2 - 6, x1, (y0 + y1) // 2 + 6), fill=colour)
        draw.rectangle(box, outline=colour, width=2)
    elif cls == 3:
        draw.ellipse(box, outline=colour, width=7)
    else:
        draw.line((x0, y0, x1, y1), fill=colour, width=8)
        draw.line((x0, y1, x1, y0), fill=colour, width=8)


def write_coco_dataset(root: Path, split: str, num_images: int, seed: int) -> list[str]:
    """``root/<split>.json`` and its images in ``root/images``: 160 px, 3 objects of 36-70 px
    each; returns the image file names."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, names = [], [], []
    for i in range(num_images):
        name = f"{split}_{i:04d}.jpg"
        img = Image.new("RGB", (160, 160), tuple(int(v) for v in rng.integers(0, 60, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            cls = int(rng.integers(0, len(CLASSES)))
            w, h = (int(v) for v in rng.integers(36, 71, 2))
            x, y = int(rng.integers(0, 160 - w)), int(rng.integers(0, 160 - h))
            draw_shape(draw, cls, (x, y, x + w, y + h))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        img.save(root / "images" / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "width": 160, "height": 160})
        names.append(name)
    categories = [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)]
    with open(root / f"{split}.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return names


def my_train_net(registration: str) -> str:
    """train_net.py with the README's registration right after its ``import gkd_d2``."""
    lines = (REPO / "train_net.py").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("import gkd_d2"))
    return "".join(lines[: at + 1]) + registration + "".join(lines[at + 1 :])


def recipe() -> dict[str, str]:
    """The section's blocks: "registration", "small", "commands", "exporter"."""
    blocks = code_blocks(readme_section("Your own dataset"))
    return {
        "registration": the_block(blocks, "python", "register_coco_instances"),
        "small": the_block(blocks, "", "SMALL="),
        "commands": the_block(blocks, "", "my_train_net.py"),
        "exporter": the_block(blocks, "", "export_model.py"),
    }


def prepare_workspace(work: Path) -> list[str]:
    """A user's folder: configs/ and tools/ of the clone, my_train_net.py, mine/ (the data);
    returns the validation images' file names."""
    work.mkdir(parents=True, exist_ok=True)
    for folder in ("configs", "tools"):
        (work / folder).symlink_to(REPO / folder)
    (work / "my_train_net.py").write_text(my_train_net(recipe()["registration"]))
    write_coco_dataset(work / "mine", "train", 8, seed=0)
    return write_coco_dataset(work / "mine", "val", 4, seed=1)


def user_env() -> dict[str, str]:
    """This environment, its ``python`` first on PATH."""
    return {
        **os.environ,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "PYTHONWARNINGS": "ignore",
    }


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [re.sub(r"\s+#.*$", "", c).strip() for c in joined.splitlines() if c.strip()]


def run_timed(work: Path, prelude: str, command: str, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + prelude + command],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise RuntimeError(f"{command}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="work folder (default: a temporary one)")
    ns = parser.parse_args(argv)
    work = ns.keep or Path(tempfile.mkdtemp()) / "work"
    prepare_workspace(work)
    env = user_env()
    blocks = recipe()
    commands = [c for c in shell_commands(blocks["commands"]) if c.startswith("python")]
    data_line = next(c for c in shell_commands(blocks["commands"]) if c.startswith("DATA="))
    prelude = blocks["small"] + data_line + "\n"
    names = ["teacher", "distil", "eval_only", "export"]
    result: dict = {"commands": dict(zip(names, commands)), "seconds": {}}
    for name, command in zip(names, commands):
        result["seconds"][name] = run_timed(work, prelude, command, env)
    # the control: step 2 as the recipe wrote it before (the template and OPTS as the teacher)
    before = (
        commands[1]
        .replace(
            "MODEL.TEACHER.CONFIG_FILE output/mine_teacher/config.yaml",
            "MODEL.TEACHER.CONFIG_FILE configs/voc/retinanet_R_101_FPN.yaml "
            'MODEL.TEACHER.OPTS \'["MODEL.RETINANET.NUM_CLASSES", "5", '
            '"MODEL.RESNETS.NORM", "BN"]\'',
        )
        .replace("output/mine_gkd", "output/mine_gkd_before")
    )
    result["commands"]["before_distil"] = before
    result["seconds"]["before_distil"] = run_timed(work, prelude, before, env)
    for arm in ("mine_gkd", "mine_gkd_before"):
        log = (work / "output" / arm / "log.txt").read_text()
        check = re.search(r"Teacher check: .*?\(([\d.]+)s\)", log)
        refresh = re.search(r"PGM refresh at iteration 0 \(full\).*?; ([\d.]+)s", log)
        result[f"{arm}_teacher_check_s"] = float(check[1]) if check else None
        result[f"{arm}_first_refresh_s"] = float(refresh[1]) if refresh else None
    result["total_s"] = round(sum(result["seconds"][n] for n in names), 1)
    result["work"] = str(work)
    report(result, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
