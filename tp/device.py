"""Which device and collective backend a rank uses, and the process group around it.

npu -> torch_npu + HCCL, cuda -> NCCL, cpu -> gloo; `auto` takes the first available in that
order. torch_npu is imported only when an NPU is asked for or probed, never at module import.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from tp import comm
from tp.routing import hccl_environment

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
AUTO_ORDER = ("npu", "cuda", "cpu")


class DeviceError(RuntimeError):
    """The requested device is not present, or there are more processes than devices."""


def _npu_count() -> int:
    try:
        importlib.import_module("torch_npu")  # registers torch.npu
    except ImportError:
        return 0
    npu = getattr(torch, "npu", None)
    return npu.device_count() if npu is not None and npu.is_available() else 0


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


DEVICE_COUNTS: dict[str, Callable[[], int]] = {"npu": _npu_count, "cuda": _cuda_count, "cpu": lambda: 1}


def resolve_device(requested: str, counts: dict[str, Callable[[], int]] | None = None) -> str:
    """'auto' -> the first of npu, cuda, cpu with a device; a named one is checked to exist."""
    counts = counts or DEVICE_COUNTS
    if requested == "auto":
        return next(kind for kind in AUTO_ORDER if counts[kind]() > 0)
    if requested not in BACKENDS:
        raise DeviceError(f"device={requested!r}: expected one of auto, {', '.join(BACKENDS)}")
    if counts[requested]() == 0:
        hint = " (is torch_npu installed? pip install 'internlm-tp[npu]')" if requested == "npu" else ""
        raise DeviceError(f"device={requested} requested but no {requested} device is present{hint}")
    return requested


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    kind: str                      # "npu" | "cuda" | "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, or a single process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(requested: str = "auto", timeout_s: float = 300.0,
                     counts: dict[str, Callable[[], int]] | None = None, comm_choice: str = "auto") -> Dist:
    """Pin this process to its device (LOCAL_RANK), join the process group (once per process) and
    pick the collectives the layers use (`tp.comm`: shared memory for same-host CPU ranks).

    The collective timeout is what turns a dead peer into an error instead of a hang.
    """
    kind = resolve_device(requested, counts)
    rank, world_size, local_rank = env_ranks()
    if kind == "npu":
        os.environ.update(hccl_environment(timeout_s, dict(os.environ)))
    if kind == "cpu":
        device = torch.device("cpu")
    else:
        available = (counts or DEVICE_COUNTS)[kind]()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world > available:
            raise DeviceError(f"{local_world} processes per node but only {available} {kind} device(s)")
        device = torch.device(kind, local_rank)
        getattr(torch, kind).set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(BACKENDS[kind], rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if kind != "cpu" else {}))
        comm.setup(comm_choice, kind, rank, world_size, timeout_s)
    return Dist(rank, world_size, local_rank, device, kind)


def cpu_threads(choice: str | int, local_world_size: int, cores: int | None = None) -> int:
    """Threads for one CPU rank: `auto` shares the cores this process may run on among the ranks on this
    host; an integer is taken as given. torchrun's OMP_NUM_THREADS=1 for several processes is its
    default, not the user's choice, so it does not count."""
    if isinstance(choice, str) and choice != "auto":
        choice = int(choice) if choice.isdigit() else choice
    if choice == "auto":
        cores = cores if cores is not None else len(os.sched_getaffinity(0))
        return max(1, cores // max(1, local_world_size))
    if isinstance(choice, bool) or not isinstance(choice, int) or choice < 1:
        raise ValueError(f"threads={choice!r}: expected auto or an integer >= 1")
    return choice


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a clock read after it measures finished work."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)
