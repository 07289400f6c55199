"""Train the tiny config in N CPU processes via gkd_d2's launcher; each rank saves its weights,
and what the CPU-DDP patch (gkd_d2.compat.ddp_for_cpu_modules) did to detectron2's modules.

python tests/helpers/dist_train.py OUT_DIR NUM_PROCS [KEY VALUE ...]

(with conftest.TINY_ENV, which registers the tiny test splits in every process)
"""

import functools
import sys
from types import SimpleNamespace

import torch
from detectron2.engine import defaults, train_loop
from detectron2.utils import comm

import gkd_d2  # noqa: F401
from gkd_d2.engine import Trainer, launch, setup_cfg

CONFIG = __file__.rsplit("/helpers/", 1)[0] + "/configs/tiny_retinanet.yaml"


def main(out_dir, config, opts):
    # one thread in every process, as launch gives each of N processes: 1 and N processes then
    # do the same float operations on an image
    torch.set_num_threads(1)
    args = SimpleNamespace(
        config_file=config, opts=["OUTPUT_DIR", out_dir, *opts], eval_only=False, resume=False
    )
    cfg = setup_cfg(args)
    before = {m.__name__: dict(vars(m)) for m in (defaults, train_loop)}
    in_init = {}

    class Spy(Trainer):
        def build_hooks(self):  # inside DefaultTrainer's constructor, after its DDP is built
            in_init["create_ddp_model"] = defaults.create_ddp_model
            return super().build_hooks()

    trainer = Spy(cfg)
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS, when given
    model = trainer.model.module if comm.get_world_size() > 1 else trainer.model
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    # names of detectron2.engine.defaults / train_loop that no longer hold their own object
    changed = [
        f"{m.__name__}.{k}"
        for m in (defaults, train_loop)
        for k, v in before[m.__name__].items()
        if vars(m).get(k) is not v
    ]
    patched = in_init["create_ddp_model"]
    torch.save(
        {
            "rank": comm.get_rank(),
            "local_rank": comm.get_local_rank(),
            "world_size": comm.get_world_size(),
            "threads": torch.get_num_threads(),
            "ddp": type(trainer.model).__name__,
            "ddp_device_ids": trainer.model.device_ids if comm.get_world_size() > 1 else None,
            "patch_in_init": isinstance(patched, functools.partial)
            and patched.func is before[defaults.__name__]["create_ddp_model"]
            and patched.keywords == {"device_ids": None},
            "detectron2_changed": changed,
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
