"""Train a config but stop before iteration STOP, as if the run were killed after a checkpoint.

python tests/helpers/train_until.py STOP CONFIG [KEY VALUE ...]

(with conftest.TINY_ENV, which registers the tiny test splits)
"""

import sys
from types import SimpleNamespace

from detectron2.engine import HookBase

import gkd_d2  # noqa: F401
from gkd_d2.engine import Trainer, setup_cfg


class Stop(Exception):
    pass


class StopBefore(HookBase):
    def __init__(self, at: int):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            raise Stop()


if __name__ == "__main__":
    stop, config, *opts = sys.argv[1:]
    args = SimpleNamespace(config_file=config, opts=opts, eval_only=False, resume=False)
    trainer = Trainer(setup_cfg(args))
    trainer.register_hooks([StopBefore(int(stop))])
    try:
        trainer.train()
    except Stop:
        print(f"stopped before iteration {stop}")
