"""Continuous batching (tp/engine.py): requests of different lengths and max_tokens joining and leaving
a running batch each get exactly the tokens `generate` gives their prompt alone (float32, greedy), at
TP=1 in this process and at TP=2 over real processes; an aborted request frees its row at the next
step and changes no other answer."""
import os

import torch

from conftest import PROMPTS, free_port
from tp.engine import Engine, Plan, Request, run_plan
from tp.generate import generate
from tp.load import load_model
from tp.tokenizer import Tokenizer


def workload(tok):
    """12 requests: prompts of different lengths, max_tokens from 1 to 40."""
    texts = PROMPTS + [p + "，请回答。" for p in PROMPTS] + [p[:3] for p in PROMPTS]
    return [Request(f"r{i}", tok.encode(t), max_tokens=(1, 40, 7, 23, 3, 31, 12, 5, 40, 2, 17, 9)[i])
            for i, t in enumerate(texts)]


def serve(engine: Engine, requests: list[Request], arrive_every: int = 3) -> int:
    """Submit the first four at once and one more every `arrive_every` steps; step until all ended.
    Returns the steps taken."""
    pending, steps = list(requests), 0
    for r in pending[:4]:
        engine.submit(r)
    pending = pending[4:]
    while pending or engine.has_work():
        if pending and steps % arrive_every == 0:
            engine.submit(pending.pop(0))
        engine.step(engine.plan())
        steps += 1
    return steps


def test_requests_joining_and_leaving_get_their_solo_answers(tiny_ckpt):
    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt)
    stops = model.cfg.stop_ids
    requests = workload(tok)
    for r in requests:
        r.stop_ids = stops
    solo = [generate(model, [r.prompt], r.max_tokens, stops).tokens[0] for r in requests]
    engine = Engine(model, max_batch=3, max_seq=128)
    steps = serve(engine, requests)
    assert all(r.finish in ("stop", "length") for r in requests)
    assert [r.output for r in requests] == solo
    assert steps < sum(r.max_tokens for r in requests), "rows ran side by side"
    assert engine.rows == [None] * 3 and bool(engine.idle.all())


def test_an_aborted_request_frees_its_row_and_changes_no_other(tiny_ckpt):
    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt)
    long_, other, late = (Request(f"r{i}", tok.encode(p), max_tokens=30) for i, p in enumerate(PROMPTS[:3]))
    solo = {r.id: generate(model, [r.prompt], r.max_tokens, -1).tokens[0] for r in (other, late)}
    engine = Engine(model, max_batch=2, max_seq=96)
    engine.submit(long_)
    engine.submit(other)
    engine.submit(late)  # waits: both rows are taken
    for _ in range(5):
        engine.step(engine.plan())
    engine.abort(long_.id)
    plan = engine.plan()
    assert plan.abort == [0] and plan.admit[0][0] == 0 and plan.admit[0][1] is late, "the freed row, at once"
    engine.step(plan)
    assert long_.finish == "abort" and len(long_.output) == 1 + 5, "its prefill token, then one a step"
    while engine.has_work():
        engine.step(engine.plan())
    assert other.output == solo[other.id] and late.output == solo[late.id]
    waiting = Request("w", tok.encode(PROMPTS[0]), max_tokens=3)
    engine.submit(waiting)
    engine.abort("w")
    assert engine.plan().admit == [] and waiting.finish == "abort" and not engine.has_work()


def test_a_prompt_that_leaves_no_room_is_refused(tiny_ckpt):
    engine = Engine(load_model(tiny_ckpt), max_batch=1, max_seq=8)
    try:
        engine.submit(Request("x", list(range(1, 9)), max_tokens=1))
    except ValueError as err:
        assert "a prompt of 8 tokens does not fit a context of 8" in str(err)
    else:
        raise AssertionError("accepted")


def _rank(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from tp.device import init_distributed
    d = init_distributed("cpu", timeout_s=120)
    model = load_model(ckpt, d.rank, d.world_size)
    engine = Engine(model, max_batch=3, max_seq=128)
    requests = workload(Tokenizer(ckpt))
    for r in requests:
        r.stop_ids = model.cfg.stop_ids
    pending, steps, seen = list(requests), 0, {}
    while True:  # rank 0 schedules; every rank runs the plan it broadcasts
        plan = None
        if rank == 0:
            if pending and steps % 2 == 0:
                engine.submit(pending.pop(0))
            plan = engine.plan() if (pending or engine.has_work()) else Plan(stop=True)
        touched = run_plan(engine, plan)
        if touched is None:
            break
        seen.update({r.id: r for r in touched})  # rank 1: its own copies, filled by its own steps
        steps += 1
    torch.save({"outputs": [seen[r.id].output for r in requests], "free": [r is None for r in engine.rows]},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_ranks_serve_the_solo_answers(tiny_ckpt, tmp_path):
    import torch.multiprocessing as mp
    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt)
    solo = [generate(model, [r.prompt], r.max_tokens, model.cfg.stop_ids).tokens[0] for r in workload(tok)]
    mp.start_processes(_rank, args=(2, free_port(), str(tiny_ckpt), str(tmp_path)), nprocs=2, start_method="spawn")
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert result["outputs"] == solo, f"rank {r}"
        assert result["free"] == [True] * 3, f"rank {r} ended every row"


def test_one_client_pays_for_one_row_not_the_whole_batch(tiny_ckpt, monkeypatch):
    """Eagerly (the CPU), a step computes rows up to the last busy one: a lone request decodes as a
    batch of one, whatever max_batch is."""
    tok, model = Tokenizer(tiny_ckpt), load_model(tiny_ckpt)
    engine = Engine(model, max_batch=8, max_seq=64)
    sizes, decode = [], model.decode
    monkeypatch.setattr(model, "decode", lambda step: sizes.append(step.tokens.shape[0]) or decode(step))
    request = Request("r", tok.encode(PROMPTS[0]), max_tokens=6)
    engine.submit(request)
    while engine.has_work():
        engine.step(engine.plan())
    assert sizes == [1] * 5 and request.output == generate(model, [request.prompt], 6, -1).tokens[0]
