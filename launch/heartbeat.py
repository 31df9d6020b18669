"""task=serve's liveness, apart from its load: each rank's heartbeat thread joins a small all-reduce
over a gloo group of its own once a second, whatever the serving loop is doing (a 15 s step holds the
loop, not the thread), so rank 0 knows every rank's loop is alive. A rank whose process died makes the
all-reduce fail, and /health turns 503 (the serving loop's own collective then ends the server)."""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("internlm_tp")
PERIOD_S = 1.0
STALE_S = 10.0  # no round of every rank for this long: not healthy


class Heartbeat:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.loop_alive = False  # this rank's serving loop: set by it on entry, cleared on exit
        self.last_round = time.monotonic()
        self.failed: str | None = None
        self._stop = threading.Event()
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60)) if world > 1 else None
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True) if world > 1 else None
        if self._thread is not None:
            self._thread.start()

    def healthy(self) -> bool:
        if self.world == 1:
            return self.loop_alive
        return self.loop_alive and self.failed is None and time.monotonic() - self.last_round < STALE_S

    def _run(self) -> None:
        """One round a period: [loops alive, stop] summed over the ranks; rank 0 alone says stop, and
        every rank leaves after the same round."""
        while True:
            beat = torch.tensor([float(self.loop_alive), float(self.rank == 0 and self._stop.is_set())])
            try:
                dist.all_reduce(beat, group=self._group)
            except Exception as err:  # noqa: BLE001 -- a rank gone: say so, and beat no more
                self.failed = f"{type(err).__name__}: {err}"
                log.error("heartbeat: a rank stopped answering (%s)", self.failed)
                return
            if beat[1] > 0:
                return
            if int(beat[0]) == self.world:
                self.last_round = time.monotonic()
            time.sleep(PERIOD_S)

    def close(self) -> None:
        """Rank 0: tell every rank's thread to stop; others: wait for that word. Before the process group goes."""
        self.loop_alive = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STALE_S + 60)
