"""One rank of a real multi-process TP run (gloo on the CPU, NCCL on CUDA), started by
torch.multiprocessing from tests."""
import os

import torch


def run_rank(rank: int, world_size: int, port: int, ckpt: str, prompts: list[list[int]],
             max_new_tokens: int, out_dir: str, dtype: str = "float32", quantize: str = "auto",
             device: str = "cpu") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
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
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def spawn(world_size: int, ckpt, prompts, max_new_tokens, out_dir, dtype="float32", quantize="auto",
          device="cpu") -> list[dict]:
    import torch.multiprocessing as mp

    from conftest import free_port
    mp.start_processes(run_rank, args=(world_size, free_port(), str(ckpt), prompts, max_new_tokens,
                                       str(out_dir), dtype, quantize, device), nprocs=world_size, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
