#!/usr/bin/env python
"""gkd_d2 training and evaluation script, in detectron2's standard shape.

    python train_net.py --config-file configs/quickstart_retinanet_cpu.yaml
    python train_net.py --config-file CONFIG --num-gpus 8
    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS out/model_final.pth
    python train_net.py --config-file CONFIG --resume   # from OUTPUT_DIR/last_checkpoint

On a machine without a GPU, ``--num-gpus N`` runs N CPU processes (gloo). The final evaluation
is also written to ``OUTPUT_DIR/results.json`` (``gkd_d2.engine.results.read_results``).
"""

import argparse

from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import gkd_d2  # noqa: F401  (registers datasets and models)
from gkd_d2.checkpoint import GKDCheckpointer
from gkd_d2.engine import Trainer, launch, setup_cfg
from gkd_d2.engine.results import write_results


def main(args: argparse.Namespace) -> dict | None:
    """Evaluate (``--eval-only``) or train, resuming with ``--resume``; return the results."""
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # weights-only .pth reads; a missing, truncated or corrupt file is named
        GKDCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            write_results(cfg.OUTPUT_DIR, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()
    if res and comm.is_main_process():
        # OUTPUT_DIR/results.json: the final evaluation, for tools to read (read_results)
        write_results(cfg.OUTPUT_DIR, res)
    return res


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
