"""Batch-1 decode against the host's read roofline and transformers, in one run.

On an InternLM-shaped model of >= 500M parameters (hidden 2048, 8 layers, 16 heads, intermediate
5504, vocab 103168: 827M) this measures, each in a fresh process so none inherits another's memory:
  - the read roofline: the bandwidth of a plain multi-threaded float32 sum over 1 GiB (far beyond the
    caches), best of 5, on ordinary and on huge pages (as our weights: tp/hugepages.py), and of the
    same buffer read in the kernels' pattern, 4 streams a thread (bench/stream_read.cpp: a host may
    serve several streams faster than torch's one, and the roofline must not be the easier read);
    measured before everything else, between the two passes of ours and after (the best kept: the
    host drifts);
    a step's roofline time is the bytes it must read (every weight once; int8 + scales; int4 + group scales and zeros) / that;
  - a GEMV probe: torch's F.linear and torch.mv at batch 1 over matrices of the model's own shapes;
  - transformers' `generate` (LlamaForCausalLM, attention_bias=True) on the same checkpoint;
  - ours at TP=1 (2 threads), TP=1 with torch's matmuls only (INTERNLM_TP_GEMV=torch), and TP=2
    (2 processes, 1 thread each); ours at TP=1 and TP=2 and transformers once more at the end, the
    better pass of each kept, for next token and prefill alike (as for the roofline: the host's
    bandwidth drifts over a run, and a bar comparing two contenders measured minutes apart would
    otherwise measure the drift);
in float32, bfloat16, weight-only int8 and int4 (groups of 128; bfloat16 activations), plus the first-token
time at input 512.
Bars (issue 11, SPEC §4): ours TP=1 within 1.3x of the read roofline (goal 1.1x) in every dtype;
bfloat16 tokens/s >= 1.5x transformers'; int8 >= 2.0x transformers' float32 and >= 1.25x our bfloat16;
TP=2 >= 0.9x TP=1; prefill at 512 no slower than transformers; int4 (issue 25) within 1.3x of its roofline
(packed weights, scales and zeros) and >= 1.6x our int8's tokens/s, its partition <= 0.16 of float32's.
The CPU model and flags come first.

    python bench/decode.py [--dtypes float32,bfloat16] [--no-int8] [--no-int4] [--new-tokens 32] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
REPEATS = 3  # every timed figure is the best of this many runs (the GEMV probe: best of 5 sweeps)


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
    """GB/s of a plain float32 sum over 1 GiB with `threads` threads, best of 5, and of the same
    buffer read in the kernels' own pattern, 4 sequential streams a thread (bench/stream_read.cpp;
    some hosts serve several streams faster than one), each on ordinary pages and on pages advised
    huge as our weights are (tp.hugepages): the best of them is kept, the strictest roofline."""
    import torch

    from tp import hugepages
    _threads(threads)
    result = {}

    def best_of_5(read, nbytes: int) -> float:
        best = float("inf")
        for _ in range(5):
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
        result[f"sum, {label} pages"] = best_of_5(buf.sum, buf.numel() * 4)
        if op is not None:
            assert op(buf) == buf.numel(), "the stream read must read every value once"
            result[f"4 streams a thread, {label} pages"] = best_of_5(lambda: op(buf), buf.numel() * 4)
        del buf
    return {"GBps": max(result.values()), **result}


def worker_probe(ckpt: str, dtype: str, threads: int) -> dict:
    """GB/s of a batch-1 GEMV (F.linear and torch.mv) over every weight matrix of the model, in the
    checkpoint's shapes (q, k, v, gate, up apart) and fused (qkv, gate_up) as we run them; the best
    of the four is the roofline."""
    import torch
    import torch.nn.functional as F
    _threads(threads)
    h, inter, v, layers = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    dt = getattr(torch, dtype)
    variants = {"checkpoint shapes": [(h, h)] * 4 + [(inter, h)] * 2 + [(h, inter)],
                "fused shapes": [(3 * h, h), (h, h), (2 * inter, h), (h, inter)]}
    result = {}
    for label, per_layer in variants.items():
        mats = [torch.randn(o, i).to(dt) for _ in range(layers) for o, i in per_layer] + [torch.randn(v, h).to(dt)]
        xs = {i: torch.randn(1, i).to(dt) for i in (h, inter)}
        total = sum(m.numel() * m.element_size() for m in mats)
        for op, f in (("F.linear", lambda m: F.linear(xs[m.shape[1]], m)), ("torch.mv", lambda m: torch.mv(m, xs[m.shape[1]][0]))):
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for m in mats:
                    f(m)
                best = min(best, time.perf_counter() - t0)
            result[f"{op}, {label}"] = total / best / 1e9
        del mats
    return result


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
    one = min(run(PROMPT_LEN, 1) for _ in range(REPEATS))
    many = min(run(PROMPT_LEN, 1 + new_tokens) for _ in range(REPEATS))
    prefill = min(run(PREFILL_LEN, 1) for _ in range(REPEATS))
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
    generate(model, prompt, 4, eos_id=-1)  # warm-up
    nxt = min(generate(model, prompt, 1 + new_tokens, eos_id=-1).next_token_ms for _ in range(REPEATS))
    long_prompt = [_prompt(PREFILL_LEN, SHAPE["vocab_size"])]
    generate(model, long_prompt, 1, eos_id=-1)
    prefill = min(generate(model, long_prompt, 1, eos_id=-1).first_token_ms for _ in range(REPEATS))
    times = torch.tensor([nxt, prefill], dtype=torch.float64)
    if d.world_size > 1:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    rss = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024
    return {"next_token_ms": times[0].item(), "prefill_512_ms": times[1].item(), "rank_rss": rss,
            "rank_weights": model.weight_bytes(), "rank_cache": model.cache_bytes(),
            "decode_bytes": model.decode_weight_bytes(1) * d.world_size}


def worker_cut_bytes(ckpt: str, out: str) -> dict:
    """Partition bytes on disk of a float32 cut, an int8 cut (bfloat16 for what stays float) and an int4
    cut (groups of 128)."""
    from cut_weights import CutOptions, cut
    sizes = {}
    for label, opts in (("float32", {}), ("int8", {"quantize": "int8", "dtype": "bfloat16"}),
                        ("int4", {"quantize": "int4", "dtype": "bfloat16"})):
        target = Path(out) / label
        cut(CutOptions(ckpt, str(target), 1, overwrite=True, progress=False, **opts))
        sizes[label] = sum(p.stat().st_size for p in target.glob("rank_*/*.safetensors"))
        shutil.rmtree(target)
    return sizes


WORKERS = {"build": worker_build, "read": worker_read, "probe": worker_probe, "hf": worker_hf, "ours": worker_ours,
           "cut_bytes": worker_cut_bytes}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--no-int4", action="store_true")
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

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-decode-"))
    ckpt = work / "ckpt"
    print(f"CPU: {cpu_description()}")
    try:
        if not (ckpt / "config.json").is_file():
            built = call("build", ckpt)
            print(f"checkpoint: InternLM-shaped {SHAPE}, {built['bytes'] / 1e9:.2f} GB float32")
        reads = [call("read", 2)]
        runs = {}  # label -> (activations dtype, quantize)
        variants = [(d, d, "none") for d in args.dtypes.split(",") if d]
        if not args.no_int8:
            variants.append(("int8", "bfloat16", "int8"))
        if not args.no_int4:
            variants.append(("int4", "bfloat16", "int4"))
        for label, dtype, quantize in variants:
            r = {"ours": call("ours", ckpt, dtype, 2, args.new_tokens, quantize),
                 "torch": call("ours", ckpt, dtype, 2, args.new_tokens, quantize, env={"INTERNLM_TP_GEMV": "torch"})}
            if quantize != "int4":  # int4: 5504 MLP channels are 43 groups of 128, which 2 ranks cannot share
                r["tp2"] = call("ours", ckpt, dtype, 1, args.new_tokens, quantize, world_size=2, threads=1)
            if quantize == "none":
                r["probe"] = call("probe", ckpt, dtype, 2)
                r["hf"] = call("hf", ckpt, dtype, 2, args.new_tokens)
            runs[label] = r
        reads.append(call("read", 2))  # the host drifts: read between the passes too
        for label, dtype, quantize in variants:  # a second pass of each contender, as the roofline is read again
            again = {"ours": call("ours", ckpt, dtype, 2, args.new_tokens, quantize)}
            if "tp2" in runs[label]:
                again["tp2"] = call("ours", ckpt, dtype, 1, args.new_tokens, quantize, world_size=2, threads=1)
            if quantize == "none":
                again["hf"] = call("hf", ckpt, dtype, 2, args.new_tokens)
            for key, second in again.items():
                first = runs[label][key]
                runs[label][f"{key}_passes"] = [(p["next_token_ms"], p["prefill_512_ms"]) for p in (first, second)]
                runs[label][key] = {**first, **{m: min(first[m], second[m]) for m in ("next_token_ms", "prefill_512_ms")}}
        reads.append(call("read", 2))
        report(runs, max(r["GBps"] for r in reads), reads, args.new_tokens)
        if not (args.no_int8 and args.no_int4):
            sizes = call("cut_bytes", ckpt, work / "cuts")
            for label, bar in (("int8", 0.3), ("int4", 0.16)):
                ratio = sizes[label] / sizes["float32"]
                print(f"  partition bytes {label} / float32: {sizes[label] / 1e9:.2f} / {sizes['float32'] / 1e9:.2f} GB = "
                      f"{ratio:.3f}  (bar <= {bar})  {'PASS' if ratio <= bar else 'FAIL'}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def report(runs: dict, bw: float, reads: list[float], new_tokens: int) -> None:
    print("\nread roofline: float32 over 1 GiB, 2 threads, GB/s (before the runs / between the passes / after):")
    for key in reads[0]:
        if key != "GBps":
            print(f"  {key:32}" + " / ".join(f"{r[key]:.1f}" if key in r else "-" for r in reads))
    print(f"  {bw:.1f} GB/s kept (the best)")
    checks = []
    for label, r in runs.items():
        ours, step_bytes = r["ours"], r["ours"]["decode_bytes"]
        roof_ms = step_bytes / bw / 1e6
        print(f"\n== {label}, batch 1, prompt {PROMPT_LEN}, {new_tokens} new tokens, 2 cores: "
              f"{step_bytes / 1e9:.3f} GB read per step, roofline {roof_ms:.2f} ms ==")
        if "probe" in r:
            print("GEMV probe (torch): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in r["probe"].items()))
        print(f"{'':40}{'next token ms':>14}{'tokens/s':>10}{'x roofline':>12}{'GB/s':>8}")
        rows = [("read roofline", {"next_token_ms": roof_ms})]
        if "hf" in r:
            rows.append(("transformers generate", r["hf"]))
        rows += [("ours TP=1 (2 threads), best pass", ours), ("ours TP=1, torch's matmuls only", r["torch"])]
        if "tp2" in r:
            rows.append(("ours TP=2 (1 thread each), best pass", r["tp2"]))
        for name, x in rows:
            ms = x["next_token_ms"]
            print(f"{name:40}{ms:14.2f}{1e3 / ms:10.2f}{ms / roof_ms:12.3f}{step_bytes / ms / 1e6:8.1f}")
        checks.append((f"{label}: ours TP=1 / read roofline time", ours["next_token_ms"] / roof_ms, "<=", 1.3))
        if "tp2" in r:
            checks.append((f"{label}: ours TP=2 / TP=1 tokens/s", ours["next_token_ms"] / r["tp2"]["next_token_ms"], ">=", 0.9))
        if "hf" in r:
            if label == "bfloat16":
                checks.append(("bfloat16: ours / transformers tokens/s", r["hf"]["next_token_ms"] / ours["next_token_ms"], ">=", 1.5))
            checks.append((f"{label}: transformers / ours prefill@512 time", r["hf"]["prefill_512_ms"] / ours["prefill_512_ms"],
                           ">=", 1.0))
        names = (("ours", "TP=1"), ("tp2", "TP=2"), ("hf", "transformers"))
        for i, what in ((0, "next token"), (1, "prefill@512")):
            print(f"  {what} in the first / second pass: " + ", ".join(
                f"{name} {' / '.join(f'{p[i]:.{2 - i}f}' for p in r[f'{key}_passes'])} ms"
                for key, name in names if f"{key}_passes" in r))
        prefill = f"prefill@512, the better pass: ours TP=1 {ours['prefill_512_ms']:.1f} ms" + (
            f", TP=2 {r['tp2']['prefill_512_ms']:.1f} ms" if "tp2" in r else "")
        print("  " + prefill + (f", transformers {r['hf']['prefill_512_ms']:.1f} ms" if "hf" in r else ""))
        print(f"  memory TP=1 rank 0: RSS {ours['rank_rss'] / 1e9:.2f} GB vs weights {ours['rank_weights'] / 1e9:.2f} GB"
              f" + KV cache {ours['rank_cache'] / 1e6:.1f} MB")
    if "int8" in runs:
        ms = runs["int8"]["ours"]["next_token_ms"]
        if "float32" in runs:
            checks.append(("int8: ours / transformers float32 tokens/s", runs["float32"]["hf"]["next_token_ms"] / ms, ">=", 2.0))
        if "bfloat16" in runs:
            checks.append(("int8: ours / ours bfloat16 tokens/s", runs["bfloat16"]["ours"]["next_token_ms"] / ms, ">=", 1.25))
    if "int4" in runs and "int8" in runs:
        checks.append(("int4: ours / ours int8 tokens/s", runs["int8"]["ours"]["next_token_ms"] / runs["int4"]["ours"]["next_token_ms"],
                       ">=", 1.6))
    print()
    for name, value, op, limit in checks:
        ok = value <= limit if op == "<=" else value >= limit
        print(f"  {name:48} {value:6.3f}  (bar {op} {limit})  {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
