"""Grouped-query attention: KV cache bytes per rank and decode time, against the same model with every
kv head materialised (each kv head's weights repeated for its query heads: the same outputs).

A LLaMA-layout random model (hidden 2048, 16 query heads, 2 kv heads, 4 layers, vocab 32000), batch 4,
a 1024-token prompt, so reading the cache is a real part of each decode step. Each figure is the best
of 3 runs, TP=1 with 2 threads, in this one process; the CPU model is printed first.

    python bench/gqa.py [--kv-heads 2] [--prompt 1024] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode import cpu_description  # noqa: E402
from tp.generate import generate  # noqa: E402
from tp.load import load_model  # noqa: E402
from tp.tiny import write_llama_checkpoint  # noqa: E402

SHAPE = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_hidden_layers": 4,
         "vocab_size": 32000}


def materialise(src: Path, dst: Path, heads: int, kv: int) -> None:
    """The same checkpoint with num_key_value_heads = heads: k/v rows repeated per query head."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    for name in list(sd):
        if ".k_proj." in name or ".v_proj." in name:
            w = sd[name]
            sd[name] = w.view(kv, -1, w.shape[-1]).repeat_interleave(heads // kv, dim=0).reshape(-1, w.shape[-1])
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": heads}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_description()}")
    heads = SHAPE["num_attention_heads"]
    with tempfile.TemporaryDirectory(prefix="bench-gqa-") as work:
        gqa = write_llama_checkpoint(Path(work) / "gqa", kv_heads=args.kv_heads, tie=False, **SHAPE)
        full = Path(work) / "mha"
        materialise(gqa, full, heads, args.kv_heads)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, SHAPE["vocab_size"], (args.batch, args.prompt), generator=g).tolist()
        rows = {}
        for label, path in ((f"GQA, {args.kv_heads} kv heads", gqa), (f"every kv head materialised ({heads})", full)):
            model = load_model(path, dtype="bfloat16")
            generate(model, prompts, 2, eos_id=-1)
            runs = [generate(model, prompts, 1 + args.new_tokens, eos_id=-1) for _ in range(3)]
            rows[label] = (model.cache_bytes(), min(r.next_token_ms for r in runs), runs[0].tokens)
            del model
        print(f"\nbfloat16, batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, TP=1, 2 threads")
        print(f"{'':38}{'KV cache MB / rank':>20}{'next token ms':>15}")
        for label, (nbytes, ms, _) in rows.items():
            print(f"{label:38}{nbytes / 1e6:20.1f}{ms:15.2f}")
        (g_bytes, g_ms, g_tok), (f_bytes, f_ms, f_tok) = rows.values()
        print(f"  cache bytes GQA / materialised: {g_bytes / f_bytes:.3f} (kv heads {args.kv_heads}/{heads} = "
              f"{args.kv_heads / heads:.3f}); decode time GQA / materialised: {g_ms / f_ms:.3f}")
        same = sum(a == b for a, b in zip(g_tok, f_tok))
        print(f"  greedy tokens equal in {same}/{len(g_tok)} sequences (bfloat16: near-ties may differ)")


if __name__ == "__main__":
    main()
