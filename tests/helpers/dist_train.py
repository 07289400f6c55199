"""Train the tiny config in N CPU processes via gkd_d2's launcher; each rank saves its weights.

python tests/helpers/dist_train.py OUT_DIR NUM_PROCS [KEY VALUE ...]

(with conftest.TINY_ENV, which registers the tiny test splits in every process)
"""

import sys
from types import SimpleNamespace

import torch
from detectron2.utils import comm

import gkd_d2  # noqa: F401
from gkd_d2.engine import Trainer, launch, setup_cfg

CONFIG = __file__.rsplit("/helpers/", 1)[0] + "/configs/tiny_retinanet.yaml"


def main(out_dir, config, opts):
    args = SimpleNamespace(
        config_file=config, opts=["OUTPUT_DIR", out_dir, *opts], eval_only=False, resume=False
    )
    cfg = setup_cfg(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS, when given
    model = trainer.model.module if comm.get_world_size() > 1 else trainer.model
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    torch.save(
        {
            "rank": comm.get_rank(),
            "local_rank": comm.get_local_rank(),
            "world_size": comm.get_world_size(),
            "threads": torch.get_num_threads(),
            "ddp": type(trainer.model).__name__,
            "initial": initial,
            "final": {k: v.detach().clone() for k, v in model.named_parameters()},
            "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
            # this rank's gkd/ statistics: [(value, iteration), ...]
            "history": {
                k: h.values()
                for k, h in trainer.storage.histories().items()
                if k.startswith("gkd/")
            },
        },
        f"{out_dir}/rank{comm.get_rank()}.pt",
    )


if __name__ == "__main__":
    out, n, *opts = sys.argv[1:]
    config = CONFIG
    if opts[:1] == ["--config"]:
        config, opts = opts[1], opts[2:]
    launch(main, int(n), dist_url="auto", args=(out, config, opts))
