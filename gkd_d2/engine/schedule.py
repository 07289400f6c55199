"""The training schedule in epochs, importable from the engine as before: it lives in
:mod:`gkd_d2.schedule`, since the model's a(e) needs it too and the model imports nothing from
the engine (whose package imports the model)."""

from ..schedule import (
    attenuation_schedule,
    epoch_length,
    num_epochs,
    refresh_period,
    train_dataset_dicts,
)

__all__ = [
    "attenuation_schedule",
    "epoch_length",
    "num_epochs",
    "refresh_period",
    "train_dataset_dicts",
]
