"""One rank of a real multi-process TP run (gloo on the CPU, NCCL on CUDA), started by
torch.multiprocessing from tests."""
import os

import torch


def _join(rank: int, world_size: int, port: int) -> None:
    """A rank's torchrun environment, one thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _leave(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _start(target, world_size: int, out_dir, *args) -> list[dict]:
    """target(rank, world_size, port, *args) in world_size spawned processes; what each saved in out_dir."""
    import torch.multiprocessing as mp

    from conftest import free_port
    mp.start_processes(target, args=(world_size, free_port(), *args), nprocs=world_size, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]


def run_rank(rank: int, world_size: int, port: int, ckpt: str, prompts: list[list[int]],
             max_new_tokens: int, out_dir: str, dtype: str = "float32", quantize: str = "auto",
             device: str = "cpu") -> None:
    _join(rank, world_size, port)
    from tp.device import init_distributed
    from tp.generate import generate, next_token_logits
    from tp.load import load_model

    d = init_distributed(device, timeout_s=120)
    model = load_model(ckpt, d.rank, d.world_size, d.device, dtype, quantize)
    stops = model.cfg.stop_ids
    batched = generate(model, prompts, max_new_tokens, eos_id=stops)
    alone = [generate(model, [p], max_new_tokens, eos_id=stops).tokens[0] for p in prompts]
    logits = next_token_logits(model, prompts)
    torch.save({"batched": batched.tokens, "alone": alone, "logits": logits.cpu(), "device": str(d.device)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    _leave(world_size)


def spawn(world_size: int, ckpt, prompts, max_new_tokens, out_dir, dtype="float32", quantize="auto",
          device="cpu") -> list[dict]:
    return _start(run_rank, world_size, out_dir, str(ckpt), prompts, max_new_tokens, str(out_dir), dtype, quantize,
                  device)


def steps_both_ways(model, prompts: list[list[int]], n: int, rows: int | None = None):
    """n decode steps from one state (a batch generate() set up), first through decode_eager, then
    through decode (on the CPU the bound step, tp/cpu_step.py): for each way, per step, the logits and
    every layer's keys and values. rows: steps over rows [0, rows) of the cache only, as the serving
    engine runs them (InternLM.cache_rows)."""
    from tp.generate import generate
    model.setup_cache(len(prompts), max(len(p) for p in prompts) + 4 + n)
    generate(model, prompts, 4, eos_id=-1)
    state = model.step

    def live():
        return [*state.tensors(), *(t for a in model.attentions() for t in (a.cache.k, a.cache.v))]

    with torch.inference_mode():
        saved = [t.clone() for t in live()]

        def run(decode):
            for t, s in zip(live(), saved):
                t.copy_(s)
            out = []
            for _ in range(n):
                if rows is None:
                    logits = decode(state).clone()
                else:
                    with model.cache_rows(0, rows):
                        logits = decode(state.first_rows(rows)).clone()
                state.tokens[:logits.shape[0]] = logits[:, -1].argmax(-1)
                out.append((logits, [t.clone() for t in live()[5:]]))
            return out
        return run(model.decode_eager), run(model.decode)


def run_rank_steps(rank: int, world_size: int, port: int, ckpt: str, prompts: list[list[int]], n: int,
                   out_dir: str, dtype: str, quantize: str) -> None:
    _join(rank, world_size, port)
    from tp.device import init_distributed
    from tp.load import load_model

    d = init_distributed("cpu", timeout_s=120)
    model = load_model(ckpt, d.rank, d.world_size, d.device, dtype, quantize, group_size=32)
    eager, bound = steps_both_ways(model, prompts, n)
    torch.save({"bound": type(model.bound_step).__name__, "eager": [e[0] for e in eager],
                "bound_logits": [b[0] for b in bound]}, os.path.join(out_dir, f"rank{rank}.pt"))
    _leave(world_size)


def spawn_steps(world_size: int, ckpt, prompts, n: int, out_dir, dtype: str, quantize: str) -> list[dict]:
    return _start(run_rank_steps, world_size, out_dir, str(ckpt), prompts, n, str(out_dir), dtype, quantize)
