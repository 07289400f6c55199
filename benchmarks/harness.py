"""What the benchmark scripts share: running a measurement in a fresh process, and reporting
its figures (printed, and written as JSON for docs/perf/)."""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable
from pathlib import Path


def in_fresh_process(target: Callable, *args) -> dict:
    """``target(*args, queue)`` in a new spawned process; return what it put on the queue.

    A fresh process has its own peak RSS and allocator state, so what it measures is its own.
    ``target`` must be importable by name (a module-level function).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def report(result: dict, json_path: Path | None) -> None:
    """Print the figures as JSON and, if asked, write them to ``json_path``."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
