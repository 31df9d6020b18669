"""The collectives the parallel layers use: all-reduce (sum) and all-gather along the last dim.

Default: torch.distributed on the process group (HCCL, NCCL or gloo). On the CPU with every rank on
one host, gloo's TCP round trips cost ~0.5 ms per all-reduce of one token's hidden state here, 18
times per decode step; `SharedMemoryComm` replaces them for small messages with a copy into a
/dev/shm buffer that all ranks map, a flag per rank, and a sum every rank computes in the same
order (so all ranks hold bit-identical results). Messages larger than a slot (a prefill's
activations) go through it piece by piece. Where the CPU kernels are built, one call of
tp/csrc/shm_comm.cpp does a piece's copy, flag, wait and sum (an all-reduce of one token's hidden
state between 2 ranks on an AMD EPYC: 13 us, against 92-99 us through the Python protocol measured
minutes apart); elsewhere the same protocol runs in Python.
"""
from __future__ import annotations

import os
import platform
import time
import uuid

import torch
import torch.distributed as dist

from tp import cpu_kernels


class DistComm:
    """torch.distributed on the default process group."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)


class SharedMemoryComm(DistComm):
    """Same-host CPU ranks: collectives through shared memory, in pieces of at most `max_bytes`.

    Layout: two slots (alternating between consecutive collectives, so a rank may start the next one
    while a slower rank still reads the last) x world_size rows of `max_bytes`, and one int64
    sequence flag per rank. A rank copies its tensor into its row, publishes the sequence number,
    waits until every rank has published it, then reads all rows. Waiting spins, then yields the
    core, and gives up after `timeout_s` naming the ranks that never arrived.
    """

    def __init__(self, rank: int, world_size: int, max_bytes: int = 4 << 20, timeout_s: float = 300.0):
        self.rank, self.world_size, self.max_bytes, self.timeout_s = rank, world_size, max_bytes, timeout_s
        name = [f"/dev/shm/internlm-tp-{uuid.uuid4().hex}" if rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        path = name[0]
        data_bytes = 2 * world_size * max_bytes
        size = data_bytes + 8 * world_size
        if rank == 0:
            with open(path, "wb") as fh:
                fh.truncate(size)
        dist.barrier()
        storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=size)
        dist.barrier()
        if rank == 0:
            os.unlink(path)  # every rank has mapped it; nothing is left behind in /dev/shm
        raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.data = raw[:data_bytes].view(2, world_size, max_bytes)
        self.flags = raw[data_bytes:].view(torch.int64)
        # The same flags as a numpy array: a read or a store is ~0.1 us there against a few us per
        # torch op, and the wait polls them (an all-reduce of one token: ~39 -> ~35 us, 2 ranks).
        self._flags = self.flags.numpy()
        self.seq = 0
        # tp/csrc/shm_comm.cpp's ops where the CPU kernels are built (None: the Python protocol)
        self.native = cpu_kernels.op("shm_all_reduce")
        self._native_exchange = cpu_kernels.op("shm_exchange")

    def _exchange(self, piece: torch.Tensor) -> torch.Tensor:
        """Publish a flat piece of at most max_bytes; a [world_size, n] view of every rank's copy."""
        self.seq += 1
        rows = self.data[self.seq % 2, :, : piece.numel() * piece.element_size()]
        if self._native_exchange is not None:
            self._native_exchange(piece, self.data, self.flags, self.rank, self.seq, self.timeout_s)
        else:
            rows[self.rank].copy_(piece.view(torch.uint8))
            self._flags[self.rank] = self.seq  # after the copy: x86 keeps stores in order
            self._wait()
        return rows.view(piece.dtype)

    def _pieces(self, flat: torch.Tensor):
        step = self.max_bytes // flat.element_size()
        for a in range(0, flat.numel(), step):
            yield a, flat[a:a + step]

    def _wait(self) -> None:
        deadline, spins = None, 0
        while self._flags.min() < self.seq:
            spins += 1
            if spins > 200:
                os.sched_yield()  # more ranks than cores: let the others run
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > deadline:
                    late = [r for r in range(self.world_size) if self._flags[r] < self.seq]
                    raise RuntimeError(f"rank(s) {late} did not reach collective #{self.seq} within "
                                       f"{self.timeout_s:.0f} s: a peer process died or hangs")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.contiguous().view(-1)
        native = self.native if x.dtype in (torch.float32, torch.bfloat16) else None
        # a decode step's one piece as it is; a prefill's activations slot by slot
        pieces = [flat] if flat.numel() * flat.element_size() <= self.max_bytes else (p for _, p in self._pieces(flat))
        for piece in pieces:
            if native is not None:
                self.seq += 1
                native(piece, self.data, self.flags, self.rank, self.seq, self.timeout_s)
            else:
                torch.sum(self._exchange(piece), dim=0, out=piece)
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view(x.shape))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.contiguous().view(-1)
        out = torch.empty(self.world_size, flat.numel(), dtype=x.dtype, device=x.device)
        for a, piece in self._pieces(flat):
            out[:, a:a + piece.numel()] = self._exchange(piece)
        return torch.cat(list(out.view(self.world_size, *x.shape)), dim=-1)


def shared_memory_possible(kind: str, world_size: int) -> bool:
    """CPU ranks that all share this host (torchrun's LOCAL_WORLD_SIZE), on x86 (whose ordering of
    stores the flag protocol relies on), with /dev/shm present."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return (kind == "cpu" and world_size > 1 and local == world_size and os.path.isdir("/dev/shm")
            and platform.machine().lower() in ("x86_64", "amd64"))


def setup(choice: str, kind: str, rank: int, world_size: int, timeout_s: float) -> DistComm:
    """choice: auto (shared memory where possible), shm (required), dist (torch.distributed only)."""
    if choice not in ("auto", "shm", "dist"):
        raise ValueError(f"comm={choice!r}: expected auto, shm or dist")
    possible = shared_memory_possible(kind, world_size)
    if choice == "shm" and not possible:
        raise ValueError("comm=shm needs CPU ranks on one x86 host with /dev/shm; use comm=auto or dist")
    if not possible or choice == "dist":
        use(DistComm())
        return current()
    # Slots of up to 4 MB, but never more than a quarter of what /dev/shm has free (containers often
    # give it 64 MB); every rank must agree, so rank 0's figure is used.
    free = os.statvfs("/dev/shm")
    size = [min(4 << 20, free.f_bavail * free.f_frsize // (4 * 2 * world_size)) // 4096 * 4096]
    dist.broadcast_object_list(size, src=0)
    if size[0] < 64 << 10:
        if choice == "shm":
            raise ValueError(f"comm=shm: /dev/shm has too little free space ({free.f_bavail * free.f_frsize} bytes)")
        use(DistComm())
    else:
        use(SharedMemoryComm(rank, world_size, max_bytes=size[0], timeout_s=timeout_s))
    return current()


_comm: DistComm | None = None


def use(comm: DistComm | None) -> None:
    """Select the collectives for this process (None: torch.distributed)."""
    global _comm
    _comm = comm


def current() -> DistComm:
    global _comm
    if _comm is None:
        _comm = DistComm()
    return _comm
