"""Batch-1 decode against the host's read roofline, transformers and each other, in alternated rounds.

On an InternLM-shaped model of >= 500M parameters (hidden 2048, 8 layers, 16 heads, intermediate
5504, vocab 103168: 827M), every contender in its own fresh process, so none inherits another's
memory, in K rounds (--rounds, default 5). A round runs them all once, in an order that reverses from
one round to the next, so a host whose bandwidth drifts over minutes moves every contender of a round
alike:
  - the read roofline: the bandwidth of a plain multi-threaded float32 sum over 1 GiB (far beyond the
    caches), best of 3, on ordinary and on huge pages (as our weights: tp/hugepages.py), and of the
    same buffer read in the kernels' pattern, 4 streams a thread (bench/stream_read.cpp: a host may
    serve several streams faster than torch's one, and the roofline must not be the easier read);
    the best of those is the round's read rate; a step's roofline time is the bytes it must read
    (every weight once; int8 + scales; int4 + group scales and zeros) / that rate;
  - ours at TP=1 (2 threads) in float32, bfloat16, weight-only int8 and int4 (groups of 128; both with
    bfloat16 activations, loaded from cuts made once before the rounds), and at TP=2 (2 processes, 1
    thread each) for the --tp2 variants (default bfloat16 and int8; not int4: the 5504 MLP channels are
    43 groups of 128, which 2 ranks cannot share);
  - transformers' `generate` (LlamaForCausalLM, attention_bias=True) on the same checkpoint, float32
    and bfloat16;
  - with --torch-matmuls, ours with torch's matmuls only (INTERNLM_TP_GEMV=torch).
Each process times one generation of 1 + --new-tokens tokens after a warm-up (next token: the
difference from a 1-token generation; ours reports it itself) and then one first token at input 512
(no warm-up at that length, for either side: a transformers prefill in bfloat16 takes ~20 s on a CPU
without bfloat16 dot products, and one per process keeps 5 rounds under 15 minutes on 2 cores).
Ours at TP=1 then times its step again with every matmul's output computed once and handed back:
the step's part outside its matmuls (Python, attention, norms), which no read roofline counts.
Reported: per figure the median and the range over the rounds, per ratio the median and the range of
the per-round ratios (each ratio's two sides from the same round), against the bars (issue 11, SPEC §4;
issue 25): ours TP=1 within 1.3x of the read roofline in every dtype; bfloat16 tokens/s >= 1.5x
transformers'; int8 >= 2.0x transformers' float32 and >= 1.25x our bfloat16; TP=2 >= 0.9x TP=1; prefill
at 512 no slower than transformers; int4 >= 1.6x our int8's tokens/s; partition bytes int8 / float32
<= 0.3 and int4 / float32 <= 0.16. The CPU model and flags come first; --json FILE writes every
figure of every round, the medians, ranges and bars.

    python bench/decode.py [--rounds 5] [--dtypes float32,bfloat16,int8,int4] [--tp2 bfloat16,int8]
                           [--new-tokens 32] [--torch-matmuls] [--workdir DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_hidden_layers": 8,
         "vocab_size": 103168}
PROMPT_LEN = 32
PREFILL_LEN = 512


# -- workers (each run in its own process) ---------------------------------------------------------
def _threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def _prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    import torch
    return [1] + torch.randint(3, vocab, (length - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def worker_build(out: str) -> dict:
    import torch

    from tp.tiny import write_tiny_checkpoint
    write_tiny_checkpoint(out, shards=4, dtype=torch.float32, **SHAPE)
    return {"bytes": sum(p.stat().st_size for p in Path(out).glob("*.bin"))}


def cpu_description() -> str:
    """The CPU model and the flags that decide which kernels run here."""
    model, flags = "unknown CPU", set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores; flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"


def _stream_read():
    """bench/stream_read.cpp, built once (as the project's kernels are, with torch's OpenMP runtime)."""
    from torch.utils.cpp_extension import load

    from tp import cpu_kernels
    return load(name="bench_stream_read", sources=[str(ROOT / "bench" / "stream_read.cpp")],
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=cpu_kernels._openmp_runtime())


def worker_read(threads: int) -> dict:
    """GB/s of a plain float32 sum over 1 GiB with `threads` threads, best of 3, and of the same
    buffer read in the kernels' own pattern, 4 sequential streams a thread (bench/stream_read.cpp;
    some hosts serve several streams faster than one), each on ordinary pages and on pages advised
    huge as our weights are (tp.hugepages): the best of them is kept, the strictest roofline."""
    import torch

    from tp import hugepages
    _threads(threads)
    result = {}

    def best_of_3(read, nbytes: int) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    try:
        op = _stream_read().stream_sum
    except Exception as e:  # vec.h needs AVX2 + FMA (or AVX-512); no compiler: the sums alone
        print(f"stream read not built ({type(e).__name__}: {e})", file=sys.stderr)
        op = None
    for label in ("4k", "huge"):
        buf = torch.empty(1 << 28)
        if label == "huge" and not hugepages.advise([buf]):
            continue
        buf.fill_(1.0)
        result[f"sum, {label} pages"] = best_of_3(buf.sum, buf.numel() * 4)
        if op is not None:
            assert op(buf) == buf.numel(), "the stream read must read every value once"
            result[f"4 streams a thread, {label} pages"] = best_of_3(lambda: op(buf), buf.numel() * 4)
        del buf
    return {"GBps": max(result.values()), **result}


def worker_hf(ckpt: str, dtype: str, threads: int, new_tokens: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import reference_config
    from tp.checkpoint import CheckpointReader
    _threads(threads)
    with torch.device("meta"):
        model = LlamaForCausalLM(reference_config(Path(ckpt)))
    reader = CheckpointReader(ckpt)
    model.load_state_dict({n: reader.read(n).to(getattr(torch, dtype)) for n in reader.names()}, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its buffer was left on meta
    model.eval()
    model.generation_config.eos_token_id = None  # never stop early: exactly the tokens asked for

    def run(prompt_len: int, n: int) -> float:
        ids = torch.tensor([_prompt(prompt_len, SHAPE["vocab_size"])])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t0

    run(PROMPT_LEN, 4)  # warm-up
    one = run(PROMPT_LEN, 1)
    many = run(PROMPT_LEN, 1 + new_tokens)
    prefill = run(PREFILL_LEN, 1)
    return {"next_token_ms": (many - one) * 1e3 / new_tokens, "prefill_512_ms": prefill * 1e3}


def worker_ours(ckpt: str, dtype: str, threads: int, new_tokens: int, quantize: str = "none") -> dict:
    import torch
    import torch.distributed as dist

    from tp.device import init_distributed
    from tp.generate import generate
    from tp.load import load_model
    _threads(threads)
    d = init_distributed("cpu", timeout_s=600)
    model = load_model(ckpt, d.rank, d.world_size, d.device, dtype, quantize)
    prompt = [_prompt(PROMPT_LEN, SHAPE["vocab_size"])]
    nxt = _next_token_ms(model, prompt, new_tokens)
    prefill = generate(model, [_prompt(PREFILL_LEN, SHAPE["vocab_size"])], 1, eos_id=-1).first_token_ms
    times = torch.tensor([nxt, prefill], dtype=torch.float64)
    if d.world_size > 1:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    rss = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024
    outside = _outside_matmuls_ms(model, prompt, new_tokens) if d.world_size == 1 else None
    if d.world_size > 1:  # gloo's threads joined now: one still dropping the all-reduce's tensors while
        dist.destroy_process_group()  # the interpreter shut down aborted ~1 exit in 6 (std::terminate)
    return {"next_token_ms": times[0].item(), "prefill_512_ms": times[1].item(), "rank_rss": rss,
            "outside_matmuls_ms": outside,
            "rank_weights": model.weight_bytes(), "rank_cache": model.cache_bytes(),
            "decode_bytes": model.decode_weight_bytes(1) * d.world_size}


def _next_token_ms(model, prompt: list[list[int]], new_tokens: int) -> float:
    """Ours' next-token ms over 1 + new_tokens tokens, after a warm-up generation."""
    from tp.generate import generate
    generate(model, prompt, 4, eos_id=-1)
    return generate(model, prompt, 1 + new_tokens, eos_id=-1).next_token_ms


def _outside_matmuls_ms(model, prompt: list[list[int]], new_tokens: int) -> float:
    """Next-token ms with every matmul's output computed once and then handed back as it is: what a
    step costs besides its matmuls (Python, attention, norms, the small ops). The tokens are
    meaningless; only the time is read."""
    from tp.layers import _Weight
    real, real_call, outputs = _Weight.matmul, _Weight.decode_call, {}

    def once(key, compute):
        if key not in outputs:
            outputs[key] = compute()
        return outputs[key]

    def cached(self, x, bias=None):  # the eager step's matmuls
        return once((id(self), tuple(x.shape)), lambda: real(self, x, bias))

    def cached_call(self, bias=None):  # the bound step's (tp/cpu_step.py), bound when a request starts
        call = real_call(self, bias)
        return None if call is None else lambda x: once((id(self), tuple(x.shape)), lambda: call(x))

    _Weight.matmul, _Weight.decode_call = cached, cached_call
    try:
        return _next_token_ms(model, prompt, new_tokens)
    finally:
        _Weight.matmul, _Weight.decode_call = real, real_call


def worker_cut(ckpt: str, out: str, world_size: int, quantize: str) -> dict:
    """A cut of the checkpoint (quantized weights, bfloat16 for what stays float, or float32 as it is),
    and its partition bytes on disk."""
    from cut_weights import CutOptions, cut
    opts = {} if quantize == "none" else {"quantize": quantize, "dtype": "bfloat16"}
    cut(CutOptions(ckpt, out, world_size, overwrite=True, progress=False, **opts))
    return {"bytes": sum(p.stat().st_size for p in Path(out).glob("rank_*/*.safetensors"))}


WORKERS = {"build": worker_build, "read": worker_read, "hf": worker_hf, "ours": worker_ours, "cut": worker_cut}


# -- driver ---------------------------------------------------------------------------------------
def call(worker: str, *args, world_size: int = 1, threads: int = 2, env: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    cmd = [__file__, "--worker", worker, *map(str, args)]
    if world_size > 1:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(world_size), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{worker} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# label -> (activations dtype, quantize); int8 and int4 keep bfloat16 activations
VARIANTS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
            "int4": ("bfloat16", "int4")}
BARS = {  # a ratio's name after its "variant: " -> (op, limit); every ratio is taken within one round
    "ours TP=1 / read roofline time": ("<=", 1.3),
    "ours TP=2 / TP=1 tokens/s": (">=", 0.9),
    "ours / transformers tokens/s": (">=", 1.5),
    "transformers / ours prefill@512 time": (">=", 1.0),
    "ours / transformers float32 tokens/s": (">=", 2.0),
    "ours / ours bfloat16 tokens/s": (">=", 1.25),
    "ours / ours int8 tokens/s": (">=", 1.6),
}


def contenders(labels: list[str], tp2: list[str], torch_matmuls: bool) -> list[tuple[str, str, str]]:
    """(key, kind, variant): the processes of one round."""
    out = [("read", "read", "")]
    for v in labels:
        out.append((f"{v}/ours", "ours", v))
        if v in tp2 and v != "int4":
            out.append((f"{v}/tp2", "tp2", v))
        if v in ("float32", "bfloat16"):
            out.append((f"{v}/hf", "hf", v))
        if torch_matmuls:
            out.append((f"{v}/torch", "torch", v))
    return out


def run_one(kind: str, variant: str, ckpt: Path, cuts: dict, new_tokens: int) -> dict:
    if kind == "read":
        return call("read", 2)
    dtype, quantize = VARIANTS[variant]
    if kind == "hf":
        return call("hf", ckpt, dtype, 2, new_tokens)
    path = cuts.get((quantize, 2 if kind == "tp2" else 1), ckpt)
    quant = "auto" if path != ckpt else quantize
    if kind == "tp2":
        return call("ours", path, dtype, 1, new_tokens, quant, world_size=2, threads=1)
    return call("ours", path, dtype, 2, new_tokens, quant, env={"INTERNLM_TP_GEMV": "torch"} if kind == "torch" else None)


def round_ratios(r: dict, labels: list[str]) -> dict:
    """The bars' ratios within one round r (key -> result)."""
    bw = r["read"]["GBps"]
    nt = {k: v["next_token_ms"] for k, v in r.items() if k != "read"}
    out = {}
    for v in labels:
        ours = r[f"{v}/ours"]
        out[f"{v}: ours TP=1 / read roofline time"] = ours["next_token_ms"] / (ours["decode_bytes"] / bw / 1e6)
        if f"{v}/tp2" in r:
            out[f"{v}: ours TP=2 / TP=1 tokens/s"] = ours["next_token_ms"] / nt[f"{v}/tp2"]
        if f"{v}/hf" in r:
            out[f"{v}: transformers / ours prefill@512 time"] = r[f"{v}/hf"]["prefill_512_ms"] / ours["prefill_512_ms"]
    pairs = {"bfloat16: ours / transformers tokens/s": ("bfloat16/hf", "bfloat16/ours"),
             "int8: ours / transformers float32 tokens/s": ("float32/hf", "int8/ours"),
             "int8: ours / ours bfloat16 tokens/s": ("bfloat16/ours", "int8/ours"),
             "int4: ours / ours int8 tokens/s": ("int8/ours", "int4/ours")}
    for name, (slow, fast) in pairs.items():
        if slow in nt and fast in nt:
            out[name] = nt[slow] / nt[fast]
    return out


def spread(values: list[float], digits: int = 2) -> dict:
    return {"median": round(statistics.median(values), digits + 2), "min": round(min(values), digits + 2),
            "max": round(max(values), digits + 2)}


def shown(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def bar_of(name: str) -> tuple[str, float]:
    return BARS[name.split(": ", 1)[1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int4", help="any of " + ",".join(VARIANTS))
    ap.add_argument("--tp2", default="bfloat16,int8", help="the variants also run at TP=2")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--torch-matmuls", action="store_true", help="also ours with torch's matmuls only, each round")
    ap.add_argument("--workdir", default=None, help="keeps the checkpoint and the cuts between runs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = WORKERS[args.worker]
        typed = [int(a) if a.isdigit() else a for a in args.args]
        result = fn(*typed)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return

    labels = [d for d in args.dtypes.split(",") if d]
    unknown = set(labels) - set(VARIANTS)
    if unknown:
        ap.error(f"--dtypes: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-decode-"))
    ckpt = work / "ckpt"
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    started = time.perf_counter()
    try:
        if not (ckpt / "config.json").is_file():
            built = call("build", ckpt)
            print(f"checkpoint: InternLM-shaped {SHAPE}, {built['bytes'] / 1e9:.2f} GB float32")
        cuts, partition = {}, {}  # (quantize, world size) -> cut directory; quantize -> TP=1 partition bytes
        wanted = [("none", 1)] + [(VARIANTS[v][1], w) for v in labels if v in ("int8", "int4") for w in (1, 2)
                                  if not (v == "int4" and w == 2)]
        for quantize, world_size in wanted:
            target = work / f"cut-{quantize}-tp{world_size}"
            partition[(quantize, world_size)] = call("cut", ckpt, target, world_size, quantize)["bytes"]
            if quantize == "none":
                shutil.rmtree(target)  # float32 is read from the checkpoint itself: its cut only gives the bytes
            else:
                cuts[(quantize, world_size)] = target
        tp2 = args.tp2.split(",")
        print(f"cuts made in {time.perf_counter() - started:.0f} s; {args.rounds} rounds of "
              f"{len(contenders(labels, tp2, args.torch_matmuls))} processes, alternated", flush=True)
        rounds = []
        for i in range(args.rounds):
            order = contenders(labels, tp2, args.torch_matmuls)
            if i % 2:
                order = order[::-1]
            r = {}
            for key, kind, v in order:
                t0 = time.perf_counter()
                r[key] = {**run_one(kind, v, ckpt, cuts, args.new_tokens), "wall_s": time.perf_counter() - t0}
            rounds.append(r)
            print(f"round {i + 1} ({time.perf_counter() - started:.0f} s): read {r['read']['GBps']:.1f} GB/s; "
                  + ", ".join(f"{k} {x['next_token_ms']:.1f}" for k, x in r.items() if k != "read") + " ms a token",
                  flush=True)
        summary = report(rounds, labels, partition, args.new_tokens)
        print(f"\n{args.rounds} rounds in {time.perf_counter() - started:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu, "commit": _commit(), "rounds": rounds, **summary}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip()


def report(rounds: list[dict], labels: list[str], partition: dict, new_tokens: int) -> dict:
    """Prints the medians and ranges; returns them with the bars for --json."""
    n = len(rounds)
    reads = [r["read"]["GBps"] for r in rounds]
    print(f"\nmedian [min-max] over {n} rounds; batch 1, prompt {PROMPT_LEN}, {new_tokens} new tokens, 2 cores")
    print(f"read roofline, the best of the round's reads (float32 over 1 GiB, 2 threads): {shown(reads, 1)} GB/s")
    names = {"ours": "ours TP=1 (2 threads)", "tp2": "ours TP=2 (1 thread each)", "hf": "transformers generate",
             "torch": "ours TP=1, torch's matmuls only"}
    figures = {"read_GBps": spread(reads)}
    print(f"{'':12}{'':34}{'next token ms':>24}{'first token @512 ms':>26}")
    for v in labels:
        step_bytes = rounds[0][f"{v}/ours"]["decode_bytes"]
        roof = [step_bytes / r["read"]["GBps"] / 1e6 for r in rounds]
        print(f"{v:12}{'read roofline':34}{shown(roof):>24}{'':>26}   ({step_bytes / 1e9:.3f} GB a step)")
        for kind, name in names.items():
            key = f"{v}/{kind}"
            if key not in rounds[0]:
                continue
            nt = [r[key]["next_token_ms"] for r in rounds]
            pf = [r[key]["prefill_512_ms"] for r in rounds]
            figures[key] = {"next_token_ms": spread(nt), "prefill_512_ms": spread(pf)}
            print(f"{'':12}{name:34}{shown(nt):>24}{shown(pf, 0):>26}")
        outside = [r[f"{v}/ours"]["outside_matmuls_ms"] for r in rounds]
        figures[f"{v}/ours"]["outside_matmuls_ms"] = spread(outside)
        print(f"{'':12}{'ours TP=1, outside its matmuls':34}{shown(outside):>24}")
        ours = rounds[-1][f"{v}/ours"]
        print(f"{'':12}memory TP=1 rank 0: RSS {ours['rank_rss'] / 1e9:.2f} GB vs weights {ours['rank_weights'] / 1e9:.2f} GB"
              f" + KV cache {ours['rank_cache'] / 1e6:.1f} MB")
    per_round = [round_ratios(r, labels) for r in rounds]
    ratios = {}
    print()
    for name in per_round[0]:
        values = [p[name] for p in per_round]
        op, limit = bar_of(name)
        median = statistics.median(values)
        ok = median <= limit if op == "<=" else median >= limit
        ratios[name] = {**spread(values), "bar": f"{op} {limit}", "pass": ok}
        print(f"  {name:46} {shown(values, 3):>22}  (bar {op} {limit})  {'PASS' if ok else 'FAIL'}")
    for quantize, bar in (("int8", 0.3), ("int4", 0.16)):
        if (quantize, 1) in partition:
            ratio = partition[(quantize, 1)] / partition[("none", 1)]
            ratios[f"partition bytes {quantize} / float32"] = {"value": ratio, "bar": f"<= {bar}", "pass": ratio <= bar}
            print(f"  {'partition bytes ' + quantize + ' / float32':46} {ratio:>22.3f}  (bar <= {bar})  "
                  f"{'PASS' if ratio <= bar else 'FAIL'}   ({partition[(quantize, 1)] / 1e9:.2f} / "
                  f"{partition[('none', 1)] / 1e9:.2f} GB)")
    return {"figures": figures, "ratios": ratios}


if __name__ == "__main__":
    main()
