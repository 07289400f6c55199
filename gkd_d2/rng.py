"""Python's, NumPy's and torch's global RNG states: saved, restored, or left as they were."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def rng_state() -> dict:
    """The three global RNG states, as tensors and plain numbers only (so that
    ``torch.load(weights_only=True)`` reads them back from a checkpoint)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    """Restore the states that :func:`rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave Python's, NumPy's and torch's global RNGs as they were.

    The test-time resize draws from NumPy's RNG and a data loader from torch's; a refresh or a
    teacher check (which may run only in some processes of a run, e.g. the teacher pass of the
    first refresh) must not shift the draws of training, or a resumed run would differ from
    the original one.
    """
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
