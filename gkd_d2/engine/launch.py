"""Multi-process launch on GPUs (detectron2's own ``launch``, NCCL) or on the CPU (gloo).

detectron2 0.6's ``launch`` asserts CUDA and hard-codes NCCL. On a machine without a GPU,
``--num-gpus N`` instead spawns N CPU processes joined by a gloo process group, one torch thread
each, with detectron2's per-machine process group set so that ``comm.get_local_rank()`` works.
Only the bootstrapping is ours; training then runs through torch.distributed as on GPUs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from ..compat import set_local_process_group

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each machine.

    With CUDA available this is detectron2's ``launch`` (NCCL). Without it each "GPU" is a CPU
    process and the backend is gloo. A single process on a single machine runs in this process.

    Raises:
        ValueError: more GPUs requested than this machine has, or a non-positive count.
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus ({num_gpus_per_machine}) and --num-machines ({num_machines}) must be >= 1"
        )
    if torch.cuda.is_available():
        available = torch.cuda.device_count()
        if num_gpus_per_machine > available:
            raise ValueError(
                f"--num-gpus {num_gpus_per_machine} but this machine has {available} CUDA "
                f"device(s): pass --num-gpus {available} or fewer (CUDA_VISIBLE_DEVICES may hide "
                "some)"
            )
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines,
            machine_rank,
            dist_url or "auto",
            args=args,
            timeout=timeout,
        )

    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError(
                "dist_url=auto works on one machine only; give --dist-url tcp://HOST:PORT"
            )
        dist_url = f"tcp://127.0.0.1:{_free_local_port()}"
    cores = os.cpu_count() or 1
    if num_gpus_per_machine > cores:
        logger.warning(
            "Launching %d CPU processes on %d cores: they will contend", num_gpus_per_machine, cores
        )
    mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _cpu_worker(
    local_rank: int,
    main_func: Callable,
    world_size: int,
    num_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
) -> None:
    # N processes on N cores: one thread each, or they oversubscribe the machine.
    torch.set_num_threads(1)
    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(
        "gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    _create_local_process_group(world_size, num_per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _create_local_process_group(world_size: int, num_per_machine: int, machine_rank: int) -> None:
    """detectron2's group of this machine's processes (for ``comm.get_local_rank/size``).

    detectron2 main builds it with the public ``comm.create_local_process_group``; 0.6 has no
    such function (``gkd_d2.compat.set_local_process_group``).
    """
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_per_machine)
        return
    for machine in range(world_size // num_per_machine):
        ranks = list(range(machine * num_per_machine, (machine + 1) * num_per_machine))
        group = dist.new_group(ranks)  # every process creates every group, as torch requires
        if machine == machine_rank:
            set_local_process_group(group)
