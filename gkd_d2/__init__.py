"""gkd_d2: Detectron2 implementation of "Distilling Object Detectors With Global Knowledge".

Importing the package registers its datasets (and, as they land, its meta-architectures) with
detectron2, in the style of detectron2's own projects.
"""

from . import modeling  # noqa: F401  (registers backbones)
from .config import add_gkd_config
from .data import register_embedded_datasets

register_embedded_datasets()

__all__ = ["add_gkd_config", "register_embedded_datasets"]
__version__ = "0.1.0"
