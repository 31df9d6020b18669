"""Decode and prefill of this tree against another revision, alternated: is a change faster or slower?

Both trees run bench/decode.py's own `ours` worker (TP=1, 2 threads, batch 1, on the 827M InternLM-shaped
checkpoint it builds), each in a fresh process, in rounds A B A B ...: a host whose bandwidth drifts
moves both alike within a round. Each tree builds its own CPU kernels (its own TORCH_EXTENSIONS_DIR).
Reported per dtype: each side's median and range, and the median and range of the per-round ratios
(this tree's time / the other's: below 1 is faster). The CPU model comes first.

    python bench/ab.py --base REV [--rounds 5] [--dtypes bfloat16,int8] [--new-tokens 32] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from decode import cpu_description  # noqa: E402

METRICS = ("next_token_ms", "prefill_512_ms")


def ours(tree: Path, ckpt: Path, label: str, new_tokens: int, extensions: Path) -> dict:
    dtype, quantize = ("bfloat16", label) if label in ("int8", "int4") else (label, "none")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TORCH_EXTENSIONS_DIR": str(extensions)}
    cmd = [sys.executable, str(tree / "bench" / "decode.py"), "--worker", "ours", str(ckpt), dtype, "2",
           str(new_tokens), quantize]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: ours {label} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision to compare this tree with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="bfloat16,int8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="keeps the checkpoint and both kernel builds between runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ab-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base-tree"
    if base.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                   capture_output=True)
    revision = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    print(f"CPU: {cpu_description()}")
    print(f"this tree ({ROOT}) against {args.base} ({revision}), {args.rounds} rounds, alternated")
    try:
        ckpt = work / "ckpt"
        if not (ckpt / "config.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--worker", "build", str(ckpt)],
                           cwd=ROOT, check=True, capture_output=True)
        trees = {"this": (ROOT, work / "ext-this"), "base": (base, work / "ext-base")}
        results: dict = {label: {side: [] for side in trees} for label in args.dtypes.split(",")}
        for r in range(args.rounds):
            for label, sides in results.items():
                order = list(trees) if r % 2 == 0 else list(trees)[::-1]  # who goes first alternates too
                for side in order:
                    tree, extensions = trees[side]
                    sides[side].append(ours(tree, ckpt, label, args.new_tokens, extensions))
            print(f"round {r + 1}: " + "; ".join(
                f"{label} next token this {s['this'][-1]['next_token_ms']:.2f} / base {s['base'][-1]['next_token_ms']:.2f} ms"
                for label, s in results.items()), flush=True)
        summary = {}
        for label, sides in results.items():
            print(f"\n== {label}, TP=1, 2 threads, batch 1 ==   median [min, max] over {args.rounds} rounds")
            summary[label] = {}
            for metric in METRICS:
                this = [x[metric] for x in sides["this"]]
                other = [x[metric] for x in sides["base"]]
                ratios = [a / b for a, b in zip(this, other)]
                summary[label][metric] = {"this": this, "base": other, "ratio_median": statistics.median(ratios),
                                          "ratio_range": [min(ratios), max(ratios)]}
                print(f"  {metric:16} this {spread(this)}   base {spread(other)}   this/base {spread(ratios)}")
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "base": revision, **summary}, indent=2))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
