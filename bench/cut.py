"""Cutting a >= 2 GB checkpoint: peak resident memory and wall time against `cp -r`, in one run.

Builds a synthetic checkpoint in the published `.bin` layout with InternLM-7B's real shapes
(hidden 4096, intermediate 11008, vocab 103168, float16) and a few layers, then alternates
`cp -r` of the checkpoint and `python -m cut_weights ... world_size=2` (the cut's wall time includes
starting Python and importing torch, ~1.4 s here, which a real 14.5 GB checkpoint amortises better
than this 4.7 GB one). Bars (SPEC §4): peak RSS < 25% of the checkpoint, time < 2x cp.

    python bench/cut.py [--layers 8] [--repeats 5] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tp.tiny import TINY_CONFIG, train_tokenizer  # noqa: E402

SHAPES = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 103168}


def layer_tensors(i: int, h: int, inter: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    sd = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        sd[p + f"self_attn.{proj}.weight"] = w(h, h)
        sd[p + f"self_attn.{proj}.bias"] = w(h)
    sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))
    sd[p + "mlp.gate_proj.weight"] = w(inter, h)
    sd[p + "mlp.down_proj.weight"] = w(h, inter)
    sd[p + "mlp.up_proj.weight"] = w(inter, h)
    sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    return sd


def build_checkpoint(out: Path, layers: int) -> int:
    """One shard for the embedding, one per two layers, one for norm + LM head; returns bytes."""
    out.mkdir(parents=True)
    cfg = {**TINY_CONFIG, **SHAPES, "num_hidden_layers": layers, "torch_dtype": "float16"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.model").write_bytes(train_tokenizer(4999))
    g = torch.Generator().manual_seed(0)
    h, inter, vocab = SHAPES["hidden_size"], SHAPES["intermediate_size"], SHAPES["vocab_size"]
    groups = [lambda: {"model.embed_tokens.weight": (torch.randn(vocab, h, generator=g) * 0.02).half()}]
    for first in range(0, layers, 2):
        groups.append(lambda first=first: {k: v for i in range(first, min(first + 2, layers))
                                           for k, v in layer_tensors(i, h, inter, g).items()})
    groups.append(lambda: {"model.norm.weight": torch.ones(h, dtype=torch.float16),
                           "lm_head.weight": (torch.randn(vocab, h, generator=g) * 0.02).half()})
    weight_map = {}
    for k, make in enumerate(groups):
        file = f"pytorch_model-{k + 1:05d}-of-{len(groups):05d}.bin"
        part = make()
        torch.save(part, out / file)
        weight_map.update({n: file for n in part})
        del part
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(p.stat().st_size for p in out.iterdir())


def timed(cmd: list[str]) -> float:
    """Wall seconds of one child process, started after dirty pages are flushed (`sync`), so a run
    does not pay for the previous run's write-back."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def timed_cut(ckpt: Path, out: Path, peak_file: Path) -> tuple[float, int]:
    """(wall seconds, the cut process's own peak RSS in bytes, read from its /proc VmHWM at exit)."""
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: open({str(peak_file)!r}, 'w').write("
            "next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]))\n"
            "sys.argv = ['cut_weights', *sys.argv[1:]]\n"
            "runpy.run_module('cut_weights', run_name='__main__')\n")
    wall = timed([sys.executable, "-c", code, f"input_dir={ckpt}", f"output_dir={out}", "world_size=2",
                  "progress=false"])
    return wall, int(peak_file.read_text()) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        print(build_checkpoint(Path(args.build_only), args.layers))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cut-"))
    try:
        ckpt = work / "ckpt"
        t0 = time.perf_counter()
        # Built in a child process: this one stays small, so the timed runs share the machine with
        # nothing but the page cache.
        size = int(subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--build-only", str(ckpt)],
                                  check=True, capture_output=True, text=True).stdout)
        print(f"synthetic checkpoint: {args.layers} layers of InternLM-7B shape, float16, {size / 2**30:.2f} GiB "
              f"in {len(list(ckpt.glob('*.bin')))} .bin shards (built in {time.perf_counter() - t0:.0f} s)")
        cps, cuts = [], []
        for _ in range(args.repeats):
            shutil.rmtree(work / "copy", ignore_errors=True)
            cps.append(timed(["cp", "-r", str(ckpt), str(work / "copy")]))
            shutil.rmtree(work / "cut", ignore_errors=True)
            cuts.append(timed_cut(ckpt, work / "cut", work / "peak"))
        # This machine's write path is noisy (the same cp varies 2-3x run to run): compare medians
        # of interleaved runs rather than one lucky run of either.
        cp_s, cut_s = statistics.median(cps), statistics.median(c[0] for c in cuts)
        peak = max(c[1] for c in cuts)
        print(f"cp -r      : {', '.join(f'{c:.2f}' for c in cps)} s")
        print(f"cut (TP=2) : {', '.join(f'{c[0]:.2f}' for c in cuts)} s, peak RSS {peak / 2**20:.0f} MiB")
        print(f"peak RSS / checkpoint size : {peak / size:.3f}   (bar < 0.25)  {'PASS' if peak / size < 0.25 else 'FAIL'}")
        print(f"cut time / cp time (median): {cut_s / cp_s:.2f}    (bar < 2.0)   {'PASS' if cut_s / cp_s < 2 else 'FAIL'}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
