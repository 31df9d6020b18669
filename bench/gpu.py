"""Batch-1 decode and prefill of an InternLM-7B-shaped model on one CUDA GPU, in one run (run it through
bench/gpu_check.sh on a lent machine; docs/performance.md has its figures and the card's name).

The model is built on the GPU with random weights, no checkpoint on disk: transformers'
LlamaForCausalLM (attention bias, as InternLM-7B) in bfloat16, and ours filled from the same tensors
through the loader's own `fill` (tp/load.py). Measured, each the best of REPEATS:
  - the HBM read roofline: torch's sum over a 4 GiB buffer, far past the L2 (best of 10);
  - next-token ms at batch 1 (prompt 32, NEW_TOKENS new): ours bfloat16, transformers' `generate`,
    ours int8 weight-only (weights quantized per row here, as `cut_weights quantize=int8` does) and
    int4 (groups of 128, as `quantize=int4`; on sm80+ through torch's `_weight_int4pack_mm`);
  - first-token ms at a 512-token prompt, ours and transformers';
  - how many of the greedy tokens ours and transformers agree on (bfloat16: kernels round differently;
    the float32 token-for-token check is `pytest --device cuda tests/test_tp_equivalence.py`), and the
    logits' error after a 512-token prompt against transformers in float32 on the same
    (bfloat16-valued) weights: ours and transformers' in bfloat16, ours int8, int4 and float32;
  - the GPU's busy time in a decode step (the profiler's kernel time): what a step would take if the
    host never made the GPU wait;
  - ours eagerly (one Python pass over 32 layers a step) and with the step replayed from a CUDA graph
    (tp/graphs.py), bfloat16, int8 and int4, and whether the graph's greedy tokens equal the eager ones;
    bfloat16 with graphs at batch 8 against batch 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from decode import _prompt as prompt  # noqa: E402  the CPU bench's prompts: [BOS] + seeded random ids

SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
            "vocab_size": 103168}
PROMPT_LEN, PREFILL_LEN, NEW_TOKENS, REPEATS = 32, 512, 64, 3


def read_roofline(device: torch.device, nbytes: int = 4 << 30) -> float:
    """GB/s of torch's sum over `nbytes` of float32, best of 10."""
    from tp.device import synchronize
    buf = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(11):
        synchronize(device)
        t0 = time.perf_counter()
        buf.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del buf
    return nbytes / best / 1e9


def build_transformers(config_dir: Path, device: torch.device):
    from reference import reference_config
    from transformers import LlamaForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(reference_config(config_dir)).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None  # never stop early: exactly the tokens asked for
    return model


def build_ours(config_dir: Path, state: dict[str, torch.Tensor], device: torch.device, quantize: str = "none",
               dtype: torch.dtype = torch.bfloat16):
    """Ours from transformers' tensors (the published names), through the loader's fill; int8 rows and
    int4 groups (of 128, as `cut_weights quantize=int4` makes them) quantized here on the GPU."""
    from tp.config import ModelConfig
    from tp.load import expected_names, fill
    from tp.model import InternLM
    from tp.quant import is_quantized, quantize_weight
    cfg = ModelConfig.load(config_dir)
    model = InternLM(cfg, 0, 1, dtype, device, quantize=quantize)
    scales: dict[str, torch.Tensor] = {}

    def local(name: str) -> torch.Tensor:
        if name in scales:
            return scales.pop(name)
        if is_quantized(name, quantize):
            scales.update(quantize_weight(name, state[name], quantize, model.group_size))
            return scales.pop(name)
        return state[name]

    fill(model, local, expected_names(cfg, quantize))
    return model.eval()


@torch.inference_mode()
def last_logits(model, ids: list[int], transformers: bool = False) -> torch.Tensor:
    """Float32 logits of the token after `ids` (one prefill)."""
    from tp.generate import next_token_logits
    if transformers:
        return model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
    return next_token_logits(model, [ids])[0]


def logits_error(y: torch.Tensor, exact: torch.Tensor) -> dict:
    return {"rms_error_over_rms": ((y - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item(),
            "max_error_over_max": ((y - exact).abs().max() / exact.abs().max()).item(),
            "top1_same": bool(y.argmax() == exact.argmax()),
            "top5_overlap": len(set(y.topk(5).indices.tolist()) & set(exact.topk(5).indices.tolist()))}


def gpu_busy_ms(model, vocab: int, steps: int = 16) -> float | None:
    """Kernel time per decode step on the device (the profiler's), None on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    from tp.generate import generate
    if model.device.type != "cuda":
        return None
    short = [prompt(PROMPT_LEN, vocab)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, short, 1, eos_id=-1)
    prefill = sum(e.self_device_time_total for e in prof.key_averages())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, short, 1 + steps, eos_id=-1)
    return (sum(e.self_device_time_total for e in prof.key_averages()) - prefill) / steps / 1e3


def time_ours(model, vocab: int, graphs: bool = False) -> dict:
    """Eager, or with the decode step replayed from a graph (captured at the first step of each cache)."""
    from tp.generate import generate
    from tp.graphs import DecodeGraphs
    model.graphs = DecodeGraphs(model) if graphs else None
    short, long = [prompt(PROMPT_LEN, vocab)], [prompt(PREFILL_LEN, vocab)]
    model.free_cache()  # eager and graph runs decode over the same capacity (not the last prefill's cache)
    generate(model, short, 1 + NEW_TOKENS, eos_id=-1)  # warm-up, and the cache the runs reuse
    runs = [generate(model, short, 1 + NEW_TOKENS, eos_id=-1) for _ in range(REPEATS)]
    generate(model, long, 1, eos_id=-1)
    prefill = min(generate(model, long, 1, eos_id=-1).first_token_ms for _ in range(REPEATS))
    return {"next_token_ms": min(r.next_token_ms for r in runs), "prefill_512_ms": prefill,
            "gpu_busy_ms_per_step": gpu_busy_ms(model, vocab), "tokens": runs[0].tokens[0]}


def batch_step_ms(model, vocab: int, batch: int) -> float:
    """Next-token ms of a batch of `batch` different prompts (best of REPEATS), with whatever
    `model.graphs` is set to."""
    from tp.generate import generate
    prompts = [prompt(PROMPT_LEN, vocab, seed=s) for s in range(batch)]
    model.free_cache()
    generate(model, prompts, 1 + NEW_TOKENS, eos_id=-1)
    return min(generate(model, prompts, 1 + NEW_TOKENS, eos_id=-1).next_token_ms for _ in range(REPEATS))


@torch.inference_mode()
def time_transformers(model, vocab: int, device: torch.device) -> dict:
    from tp.device import synchronize

    def run(length: int, n: int) -> tuple[float, list[int]]:
        ids = torch.tensor([prompt(length, vocab)], device=device)
        synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        synchronize(device)
        assert out.shape[1] == length + n
        return time.perf_counter() - t0, out[0, length:].tolist()

    run(PROMPT_LEN, 4)  # warm-up
    one = min(run(PROMPT_LEN, 1)[0] for _ in range(REPEATS))
    many = [run(PROMPT_LEN, 1 + NEW_TOKENS) for _ in range(REPEATS)]
    run(PREFILL_LEN, 1)
    prefill = min(run(PREFILL_LEN, 1)[0] for _ in range(REPEATS))
    return {"next_token_ms": (min(t for t, _ in many) - one) * 1e3 / NEW_TOKENS, "prefill_512_ms": prefill * 1e3,
            "tokens": many[0][1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model of hidden 256 (MLP 768: whole int4 groups) on the CPU: checks the "
                                                         "script before it spends GPU time")
    args = ap.parse_args()
    from tp.tiny import TINY_CONFIG
    shape = {**SHAPE_7B, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
             "num_hidden_layers": 2, "vocab_size": 1000} if args.smoke else SHAPE_7B
    if args.smoke:
        device, name = torch.device("cpu"), "CPU (smoke run)"
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    result: dict = {"device": name, "torch": torch.__version__, "shape": shape}
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp)
        (config_dir / "config.json").write_text(json.dumps({**TINY_CONFIG, **shape, "torch_dtype": "bfloat16"}))
        vocab = shape["vocab_size"]
        result["roofline_GBps"] = read_roofline(device, (64 << 20) if args.smoke else (4 << 30))
        hf = build_transformers(config_dir, device)
        state = hf.state_dict()
        ours = build_ours(config_dir, state, device)
        result["step_GB"] = ours.decode_weight_bytes(1) / 1e9
        print(f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, bfloat16: {result['step_GB']:.2f} GB "
              f"read a step; read roofline {result['roofline_GBps']:.0f} GB/s", flush=True)
        graphs = device.type == "cuda"
        result["ours_bf16"] = time_ours(ours, vocab)
        print("ours bfloat16:", {k: v for k, v in result["ours_bf16"].items() if k != "tokens"}, flush=True)
        if graphs:
            result["ours_bf16_graphs"] = time_ours(ours, vocab, graphs=True)
            print("ours bfloat16, graphs:", {k: v for k, v in result["ours_bf16_graphs"].items() if k != "tokens"},
                  flush=True)
            result["ours_bf16_graphs_batch8_ms"] = batch_step_ms(ours, vocab, 8)
            ours.graphs = None
        result["transformers_bf16"] = time_transformers(hf, vocab, device)
        print("transformers bfloat16:", {k: v for k, v in result["transformers_bf16"].items() if k != "tokens"}, flush=True)
        int8 = build_ours(config_dir, state, device, "int8")  # the same weights, quantized per row
        q4 = build_ours(config_dir, state, device, "int4")  # and in groups of 128 (CUDA: _weight_int4pack_mm)
        del state
        # logits after a 512-token prompt against transformers in float32 on the same (bfloat16-valued) weights
        ids = prompt(PREFILL_LEN, vocab, seed=1)
        got = {"ours bfloat16": last_logits(ours, ids), "transformers bfloat16": last_logits(hf, ids, True),
               "ours int8": last_logits(int8, ids), "ours int4": last_logits(q4, ids)}
        del ours
        exact = last_logits(hf.float(), ids, True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        f32_bytes = sum(p.numel() * 4 for p in hf.parameters())
        if device.type != "cuda" or torch.cuda.mem_get_info(device)[0] > 1.1 * f32_bytes:
            ours32 = build_ours(config_dir, hf.state_dict(), device, dtype=torch.float32)
            got["ours float32"] = last_logits(ours32, ids)
            del ours32
        result["logits_vs_float32"] = {k: logits_error(v, exact) for k, v in got.items()}
        for k, v in result["logits_vs_float32"].items():
            print(f"logits, {k} against transformers float32: " + ", ".join(f"{m} {x:.3g}" for m, x in v.items()), flush=True)
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["int8_step_GB"] = int8.decode_weight_bytes(1) / 1e9
        result["ours_int8"] = time_ours(int8, vocab)
        if graphs:
            result["ours_int8_graphs"] = time_ours(int8, vocab, graphs=True)
        int8.graphs = None
        del int8
        result["int4_step_GB"] = q4.decode_weight_bytes(1) / 1e9
        result["ours_int4"] = time_ours(q4, vocab)
        if graphs:
            result["ours_int4_graphs"] = time_ours(q4, vocab, graphs=True)
    report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def report(r: dict) -> None:
    roof_ms = r["step_GB"] / r["roofline_GBps"] * 1e3
    ours, hf, int8 = r["ours_bf16"], r["transformers_bf16"], r["ours_int8"]
    agree = next((i for i, (a, b) in enumerate(zip(ours["tokens"], hf["tokens"])) if a != b), len(ours["tokens"]))
    print(f"next token, batch 1: ours bfloat16 {ours['next_token_ms']:.2f} ms "
          f"({roof_ms / ours['next_token_ms']:.0%} of the read roofline's {roof_ms:.2f} ms), "
          f"transformers generate {hf['next_token_ms']:.2f} ms (ours {hf['next_token_ms'] / ours['next_token_ms']:.2f}x), "
          f"ours int8 {int8['next_token_ms']:.2f} ms ({r['int8_step_GB']:.2f} GB a step)")
    q4 = r["ours_int4"]
    print(f"ours int4 {q4['next_token_ms']:.2f} ms ({r['int4_step_GB']:.2f} GB a step; "
          f"{int8['next_token_ms'] / q4['next_token_ms']:.2f}x int8's tokens/s)")
    print(f"first token at {PREFILL_LEN}: ours {ours['prefill_512_ms']:.1f} ms, transformers {hf['prefill_512_ms']:.1f} ms, "
          f"ours int8 {int8['prefill_512_ms']:.1f} ms, ours int4 {q4['prefill_512_ms']:.1f} ms")
    print(f"greedy tokens, ours and transformers in bfloat16: the first {agree} of {len(ours['tokens'])} agree")
    busy = [(name, x["gpu_busy_ms_per_step"]) for name, x in (("bfloat16", ours), ("int8", int8), ("int4", q4))]
    if all(ms is not None for _, ms in busy):
        print("GPU busy per decode step (kernel time): " + ", ".join(f"ours {n} {ms:.2f} ms" for n, ms in busy))
    if "ours_bf16_graphs" not in r:
        print("graphs: not on this device (the CPU runs the step eagerly)")
        return
    g, g8 = r["ours_bf16_graphs"], r["ours_int8_graphs"]
    print(f"with graphs: bfloat16 {g['next_token_ms']:.2f} ms ({roof_ms / g['next_token_ms']:.0%} of the roofline, "
          f"{hf['next_token_ms'] / g['next_token_ms']:.2f}x transformers; bars >= 75% and >= 2.5x), "
          f"int8 {g8['next_token_ms']:.2f} ms ({g['next_token_ms'] / g8['next_token_ms']:.2f}x our bfloat16; bar >= 1.4x)")
    g4 = r["ours_int4_graphs"]
    print(f"with graphs: int4 {g4['next_token_ms']:.2f} ms ({g8['next_token_ms'] / g4['next_token_ms']:.2f}x our int8's tokens/s)")
    print(f"graph tokens equal eager tokens: bfloat16 {g['tokens'] == ours['tokens']}, int8 {g8['tokens'] == int8['tokens']}, "
          f"int4 {g4['tokens'] == q4['tokens']}")
    b8 = r["ours_bf16_graphs_batch8_ms"]
    print(f"batch 8 with graphs, bfloat16: {b8:.2f} ms a step, {8 * g['next_token_ms'] / b8:.2f}x batch 1's tokens/s "
          f"(bar >= 5x)")


if __name__ == "__main__":
    main()
