"""Recorders: what GKD needs from detectron2's own forward, taken while it runs.

Rather than copying a detector's forward to keep its intermediate tensors, the GKD detectors
call ``super().forward()`` and record those tensors with forward hooks on named modules and by
wrapping a public method for the duration of one step (the recorder pattern of d2go's
``record_layers`` and mmrazor's recorders).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def forward_inputs(module: nn.Module, sink: Callable[[tuple], None]) -> Iterator[None]:
    """Call ``sink(args)`` with the positional inputs of every forward of ``module``."""
    handle = module.register_forward_pre_hook(lambda m, args: sink(args))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def forward_outputs(module: nn.Module, sink: Callable[[Any], None]) -> Iterator[None]:
    """Call ``sink(output)`` with the output of every forward of ``module``."""
    handle = module.register_forward_hook(lambda m, args, output: sink(output))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def method_outputs(obj: Any, name: str, sink: Callable[[Any], None]) -> Iterator[None]:
    """Call ``sink(result)`` with the result of every call of ``obj.name`` (a public method).

    The wrapper is an attribute of ``obj`` alone (its class is untouched) and is removed on
    exit, so the object pickles, copies and behaves as before outside the context.
    """
    method = getattr(obj, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        sink(result)
        return result

    object.__setattr__(obj, name, recorded)
    try:
        yield
    finally:
        del obj.__dict__[name]
