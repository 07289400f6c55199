#!/usr/bin/env python
"""Export the student of a GKD checkpoint for deployment: plain detectron2 weights and config.

    python tools/export_student.py --config-file configs/quickstart_gkd_retinanet_cpu.yaml \\
        --weights output/quickstart_gkd_retinanet_cpu/model_final.pth --output output/student \\
        [KEY VALUE ...]

Writes ``OUTPUT/model_final.pth`` ({"model": state dict}) with detectron2's own key names for the
plain meta-architecture (``RetinaNet`` / ``GeneralizedRCNN``): no teacher, adapters, prototypes,
extra-term parameters or optimizer state; and ``OUTPUT/config.yaml``, the student's config with
that meta-architecture, ``MODEL.WEIGHTS`` pointing at the exported file and gkd_d2's keys
removed, so that stock detectron2 reads it:

    python train_net.py --config-file output/student/config.yaml --eval-only

(or detectron2's own ``DefaultPredictor``). Backbones that gkd_d2 registers (the basic-block
ResNets of the CPU quickstarts) still need ``import gkd_d2`` before ``build_model``; a
MobileNetV2 student's config keeps ``MODEL.MOBILENETV2.*``, so read it with
``gkd_d2.load_config``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


class ExportError(RuntimeError):
    """The checkpoint or config cannot give a plain student."""


def gkd_keys() -> list[tuple[str, ...]]:
    """The keys that ``add_gkd_config`` adds to detectron2's default config, as paths (a node
    that detectron2 lacks, such as ``MODEL.GKD``, is one path): derived, so that a new key of
    gkd_d2 is never left in an exported config."""
    from detectron2.config import CfgNode, get_cfg

    from gkd_d2.config import add_gkd_config

    def added(base: CfgNode, ours: CfgNode, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        out = []
        for k, v in ours.items():
            if k not in base:
                out.append((*path, k))
            elif isinstance(v, CfgNode):
                out.extend(added(base[k], v, (*path, k)))
        return out

    return added(get_cfg(), add_gkd_config(get_cfg()), ())


def load_model_state(path: str) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a gkd_d2 training checkpoint, read with weights_only=True."""
    from gkd_d2.checkpoint import CheckpointLoadError, read_pth

    try:  # a missing file is named with the nearest existing checkpoints
        ckpt = read_pth(path)
    except CheckpointLoadError as e:  # truncated, corrupt, or more than tensors
        raise ExportError(str(e)) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ExportError(f"checkpoint {path!r} has no 'model' state dict")
    return ckpt["model"]


def plain_config(cfg, weights: str):
    """A copy of the GKD config as a stock detectron2 config of the student alone."""
    from detectron2.modeling import META_ARCH_REGISTRY

    arch = cfg.MODEL.META_ARCHITECTURE
    plain = getattr(META_ARCH_REGISTRY.get(arch), "plain_architecture", None)
    if plain is None:
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {arch!r} is not a GKD meta-architecture "
            "(GKDRetinaNet, GKDRCNN): its checkpoint needs no export"
        )
    out = cfg.clone()
    out.defrost()
    mobilenet = "mobilenetv2" in out.MODEL.BACKBONE.NAME
    for path in gkd_keys():
        if mobilenet and path == ("MODEL", "MOBILENETV2"):
            # gkd_d2's backbone: its keys stay (read them with gkd_d2.load_config); the
            # ImageNet start weights are not needed, the exported checkpoint holds all weights
            out.MODEL.MOBILENETV2.PRETRAINED = ""
            continue
        node = out
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    out.MODEL.META_ARCHITECTURE = plain
    out.MODEL.WEIGHTS = weights
    return out


def export_student(cfg, weights: str, output: str) -> tuple[str, str]:
    """Write the plain student's weights and config under ``output``; return their paths.

    The exported state dict is checked to load strictly (same keys and shapes) into the plain
    model built from the exported config.
    """
    from detectron2.modeling import build_model

    os.makedirs(output, exist_ok=True)
    weights_out = os.path.abspath(os.path.join(output, "model_final.pth"))
    config_out = os.path.join(output, "config.yaml")
    plain_cfg = plain_config(cfg, weights_out)
    plain_cfg.MODEL.DEVICE = "cpu"  # for the check below; restored in the written config
    plain_model = build_model(plain_cfg)
    plain_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    expected = plain_model.state_dict()
    state = load_model_state(weights)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ExportError(
            f"checkpoint {weights!r} lacks {len(missing)} keys of the plain "
            f"{plain_cfg.MODEL.META_ARCHITECTURE} student, e.g. {missing[:5]}: is it a checkpoint "
            f"of {cfg.MODEL.META_ARCHITECTURE} with this config?"
        )
    student = {k: state[k] for k in expected}
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, config {tuple(expected[k].shape)}"
        for k, v in student.items()
        if v.shape != expected[k].shape
    ]
    if bad_shapes:
        raise ExportError(
            f"checkpoint {weights!r} does not match the config: " + "; ".join(bad_shapes[:5])
        )
    plain_model.load_state_dict(student, strict=True)
    torch.save({"model": student}, weights_out)
    with open(config_out, "w") as f:
        f.write(plain_cfg.dump())
    dropped = sorted(set(state) - set(expected))
    print(
        f"exported {len(student)} tensors of {plain_cfg.MODEL.META_ARCHITECTURE} to {weights_out} "
        f"and {config_out}; left out {len(dropped)} distillation tensors "
        f"({', '.join(sorted({k.split('.')[0] for k in dropped}))})"
    )
    return weights_out, config_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="the GKD training config")
    parser.add_argument("--weights", required=True, help="a GKD checkpoint (model_final.pth)")
    parser.add_argument("--output", required=True, help="folder for model_final.pth, config.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    ns = parser.parse_args(argv)
    from gkd_d2.config import ConfigError, load_config

    try:
        cfg = load_config(ns.config_file, ns.opts)  # unknown keys named, with the closest ones
        export_student(cfg, ns.weights, ns.output)
    except (ConfigError, ExportError) as e:
        print(f"export_student: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
