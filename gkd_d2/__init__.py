"""gkd_d2: Detectron2 implementation of "Distilling Object Detectors With Global Knowledge".

Importing the package registers, in the style of detectron2's own projects, the GKD
meta-architectures, the backbones and the quick-start datasets (``gkd_scenes_train``,
``gkd_scenes_val``: names only, nothing is read or generated until a split is loaded).
"""

from . import modeling  # noqa: F401  (registers the meta-architectures and backbones)
from .config import add_gkd_config, load_config
from .data import register_quickstart_datasets

register_quickstart_datasets()

__all__ = ["add_gkd_config", "load_config", "register_quickstart_datasets"]
__version__ = "0.1.0"
