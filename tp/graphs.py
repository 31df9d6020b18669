"""The decode step captured once as a graph on an accelerator and replayed every step after.

Eager, a step on a GPU is mostly the host: on an H200 the InternLM-7B-shaped bfloat16 step took
13.4 ms of which the GPU was busy 5.3 ms (docs/performance.md). The step is static (tp.model.DecodeStep: fixed
shapes, inputs written in place, nothing read back), so its kernels, the all-reduces included, can
be recorded once and launched as one: CUDA graphs (torch.cuda), and NPU graphs (torch_npu's
torch.npu.NPUGraph, the same interface) where tp.routing.graphs_route allows.

One graph for the DecodeStep the model allocated with its KV cache: a batch that keeps its size and
fits its cache replays it; a new cache drops it (`reset`), and the next step captures anew, in the
same memory pool. Before capture, two eager steps run on a side stream (the documented warm-up: lazy
initialisations and allocator state), and every rank passes a barrier, so that no rank records its
collectives while another is still eager. The warm-up's writes are undone (positions, slots and key
validity restored; the keys and values it wrote are those the replayed step writes again).

Attention in the graph reads the whole cache under the validity mask. generate sizes the cache to the
request (prompt + new tokens), so a step reads on average about twice the keys it needs: for
InternLM-7B at 1024 positions, batch 1, ~0.5 GB against 13.8 GB of weights. Capture per capacity
bucket is not built.
"""
from __future__ import annotations

import logging
import weakref

import torch
import torch.distributed as dist

from tp.routing import graphs_route

log = logging.getLogger("internlm_tp")


def backend(device_type: str):
    """torch.cuda, or torch.npu once torch_npu is imported (tp.device imports it for device=npu)."""
    return getattr(torch, device_type)


def enabled(setting: str, device_type: str) -> bool:
    npu = device_type == "npu" and hasattr(getattr(torch, "npu", None), "NPUGraph")
    on, why = graphs_route(setting, device_type, npu)
    if not on and setting != "off" and device_type != "cpu":
        log.warning("decode graphs off on %s: %s", device_type, why)
    return on


class DecodeGraphs:
    """Replays the graph captured for the model's current DecodeStep (capturing it on first use)."""

    def __init__(self, model):
        self._model = weakref.ref(model)  # the model holds its graphs: no cycle keeping 14 GB on the device
        self.api = backend(model.device.type)
        self.pool = self.api.graph_pool_handle()
        self.captured: tuple | None = None  # (step, graph, logits)

    @property
    def model(self):
        return self._model()

    def reset(self) -> None:
        self.captured = None

    def prepare(self, step) -> None:
        """Capture the graph for `step` now if it is not yet (before a timed loop, not inside it)."""
        if self.captured is None or self.captured[0] is not step:
            self.captured = None  # its memory back to the pool before the next capture
            self.captured = self._capture(step)

    def __call__(self, step) -> torch.Tensor:
        self.prepare(step)
        self.captured[1].replay()
        return self.captured[2]

    def _capture(self, step) -> tuple:
        api, model = self.api, self.model
        saved = [t.clone() for t in (step.positions, step.slots, step.valid)]

        def restore():
            for t, s in zip((step.positions, step.slots, step.valid), saved):
                t.copy_(s)
        side = api.Stream()
        side.wait_stream(api.current_stream())
        with api.stream(side):
            for _ in range(2):
                model.decode_eager(step)
                restore()
        api.current_stream().wait_stream(side)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        graph = (api.CUDAGraph if model.device.type == "cuda" else api.NPUGraph)()
        with api.graph(graph, pool=self.pool):
            logits = model.decode_eager(step)
        log.info("decode step captured as a graph on %s: batch %d, %d cache slots", model.device,
                 step.tokens.shape[0], step.valid.shape[1])
        return step, graph, logits
