"""Decode graphs (tp/graphs.py): where they are used (tp.routing.graphs_route, a pure function, so the
CPU suite decides it for cuda and npu too), and DecodeGraphs' bookkeeping run on the CPU through a
stand-in for torch.cuda's graph API whose "capture" runs the step and whose "replay" runs it again
into the captured output: one capture per cache, the warm-up's writes undone, the tokens of the eager
step. What a real capture does on a GPU or an NPU is not run here (no accelerator)."""
import logging
from contextlib import contextmanager

import pytest
import torch

from conftest import PROMPTS
from tp import graphs
from tp.generate import generate
from tp.load import load_model
from tp.routing import graphs_route
from tp.tokenizer import Tokenizer


@pytest.mark.parametrize("setting,device,npu_has_graphs,on", [
    ("auto", "cuda", False, True), ("auto", "npu", True, True), ("auto", "npu", False, False),
    ("auto", "cpu", False, False), ("off", "cuda", False, False), ("off", "npu", True, False),
])
def test_where_the_step_is_captured(setting, device, npu_has_graphs, on):
    captured, why = graphs_route(setting, device, npu_has_graphs)
    assert captured is on and (why == "") is on
    if device == "npu" and setting == "auto" and not on:
        assert why == "this torch_npu has no torch.npu.NPUGraph"


def test_a_bad_setting_is_refused_before_any_weight_is_read(tiny_ckpt, monkeypatch):
    with pytest.raises(ValueError, match="graphs='sometimes': expected one of auto, off"):
        graphs_route("sometimes", "cuda")
    monkeypatch.setattr("tp.load.CheckpointReader", lambda *a: pytest.fail("read the checkpoint"))
    with pytest.raises(ValueError, match="graphs='on'"):
        load_model(tiny_ckpt, graphs="on")


class StandInGraphs:
    """torch.cuda's graph interface over the CPU: capture runs the step once (a real capture runs
    nothing, so the step's inputs are put back after it) and keeps it; replay runs it again and
    writes into the captured logits, as a replayed graph writes into its static output."""

    def __init__(self):
        self.captures, self.replays, self.pools = 0, 0, []
        api = self

        class Graph:
            def replay(self):
                api.replays += 1
                self.output.copy_(self.model.decode_eager(self.step))

        self.NPUGraph = self.CUDAGraph = Graph

    def graph_pool_handle(self):
        self.pools.append(object())
        return self.pools[-1]

    def Stream(self):
        return self

    def wait_stream(self, other):
        pass

    def current_stream(self):
        return self

    @contextmanager
    def stream(self, s):
        yield

    @contextmanager
    def graph(self, graph, pool):
        assert pool is self.pools[-1], "every capture in the one pool"
        self.captures += 1
        model = self.model
        state = model.step
        saved = [t.clone() for t in (state.positions, state.slots, state.valid)]
        graph.model, graph.step = model, state
        original = model.decode_eager

        def capture(step):
            graph.output = original(step)
            return graph.output
        model.decode_eager = capture
        try:
            yield
        finally:
            model.decode_eager = original
            for t, s in zip((state.positions, state.slots, state.valid), saved):
                t.copy_(s)


def test_graph_bookkeeping_gives_the_eager_tokens(tiny_ckpt, monkeypatch, caplog):
    tok = Tokenizer(tiny_ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    model = load_model(tiny_ckpt)
    assert model.graphs is None, "graphs=auto is off on the CPU"
    eager = generate(model, prompts, 12, eos_id=-1).tokens
    api = StandInGraphs()
    api.model = model
    monkeypatch.setattr(graphs, "backend", lambda device_type: api)
    model.graphs = graphs.DecodeGraphs(model)
    with caplog.at_level(logging.INFO, logger="internlm_tp"):
        assert generate(model, prompts, 12, eos_id=-1).tokens == eager
    assert (api.captures, api.replays) == (1, 11), "captured once, replayed every step after"
    assert "decode step captured as a graph on cpu: batch 4" in caplog.text
    assert generate(model, prompts, 12, eos_id=-1).tokens == eager
    assert api.captures == 1, "the same cache and step: the same graph"
    assert generate(model, prompts[:2], 12, eos_id=-1).tokens == eager[:2]
    assert api.captures == 2, "a new cache (another batch size): captured anew"
    longer = generate(model, prompts[:2], 40, eos_id=-1).tokens
    assert api.captures == 3 and [t[:12] for t in longer] == eager[:2], "a larger cache: captured anew"


def test_npu_without_graphs_says_why(monkeypatch, caplog):
    monkeypatch.setattr(torch, "npu", object(), raising=False)  # a torch_npu without NPUGraph
    with caplog.at_level(logging.WARNING, logger="internlm_tp"):
        assert graphs.enabled("auto", "cpu") is False
        assert not caplog.text, "the CPU is eager by design, nothing to warn about"
        assert graphs.enabled("auto", "npu") is False
    assert "decode graphs off on npu: this torch_npu has no torch.npu.NPUGraph" in caplog.text
    monkeypatch.setattr(torch, "npu", type("NPU", (), {"NPUGraph": object}), raising=False)
    assert graphs.enabled("auto", "npu") is True and graphs.enabled("off", "npu") is False


def test_the_graph_is_captured_before_the_decode_clock_starts(tiny_ckpt, monkeypatch):
    """generate's timed decode loop times replays only: the capture and its warm-up steps come before."""
    import tp.generate as gen
    model = load_model(tiny_ckpt)
    api = StandInGraphs()
    api.model = model
    monkeypatch.setattr(graphs, "backend", lambda device_type: api)
    model.graphs = graphs.DecodeGraphs(model)
    events, clock, capture = [], gen.time.perf_counter, graphs.DecodeGraphs._capture
    monkeypatch.setattr(gen.time, "perf_counter", lambda: events.append("clock") or clock())
    monkeypatch.setattr(graphs.DecodeGraphs, "_capture", lambda self, step: events.append("capture") or capture(self, step))
    out = generate(model, [Tokenizer(tiny_ckpt).encode(PROMPTS[0])], 6, eos_id=-1)
    assert events.count("capture") == 1 and events.index("capture") == 2, \
        "after the clocks around the first token, before the decode loop's first clock (t1)"
    assert out.decode_steps == 5 and (api.captures, api.replays) == (1, 5)


def test_rotary_tables_change_in_place_and_graphs_do_not_keep_the_model(tiny_ckpt, monkeypatch):
    import dataclasses
    import gc
    import weakref
    from tp.model import rope_tables
    model = load_model(tiny_ckpt)
    model.cfg = dataclasses.replace(model.cfg, rope_scaling="dynamic", rope_factor=2.0)  # NTK past the context
    limit = model.cfg.max_position_embeddings
    model.setup_cache(1, limit + 64)
    table = model.rope_cos.data_ptr()
    model.setup_cache(1, limit + 32)  # the same cache, a shorter request past the context: rescaled values
    cos, sin = rope_tables(model.cfg, limit + 32)
    assert model.rope_cos.data_ptr() == table, "a captured graph would still read the old tables"
    assert torch.equal(model.rope_cos[:limit + 32], cos) and torch.equal(model.rope_sin[:limit + 32], sin)
    assert not torch.equal(cos[limit:], rope_tables(model.cfg, limit + 64)[0][limit:limit + 32]), "rescaled"
    api = StandInGraphs()
    monkeypatch.setattr(graphs, "backend", lambda device_type: api)
    model.graphs = graphs.DecodeGraphs(model)
    assert model.graphs.model is model
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None, "freed by its reference count, not left for the cyclic collector"
    finally:
        gc.enable()
