"""task=serve under load: N concurrent clients over real HTTP (the official `openai` client, streaming)
against the 827M InternLM-shaped model of bench/decode.py, at concurrency 1, 4 and 16, in rounds that
alternate the levels (1 4 16 1 4 16 ...) on one running server, so the host's fast and slow spells
fall on every level alike.

A fourth level, "16s", is 16 clients sampling (temperature 0.8, top-p 0.9) instead of greedy.

Per level: requests/s, generated tokens/s, time to first token and time per output token (p50, p99),
and the host time a decode step spent choosing its tokens (the server's own counters,
internlm_tp:token_choice_seconds / internlm_tp:decode_steps), median over the rounds with their range.
Bars: tokens/s at 16 >= 4x at 1 (goal 6x); p99 time per output token at 16 <= 4x at 1's; the time per
output token (p50) sampled at 16 <= 1.5x greedy's at 16: what sampling adds to a step, one batched
sampler call (tp/sampler.py). The choice time itself is printed beside it: greedy's argmax is a few
hundred microseconds, so a ratio of choice times alone would compare a sort-free draw over 16 x V
logits with one pass over them.
Concurrency 1 is one-at-a-time serving of the same prompts.

    python bench/serve.py [--rounds 5] [--ranks 1] [--dtype bfloat16] [--max-tokens 32] [--workdir DIR] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decode import cpu_description  # noqa: E402

LEVELS = (1, 4, 16, "16s")  # "16s": 16 clients, sampled
PROMPTS = ["请介绍一下上海人工智能实验室。", "中华人民共和国的首都是哪里？", "以下是中国关于会计考试的单项选择题，请选出其中的正确答案。",
           "你好", "A. 1 B. 2 C. 3 D. 4 答案：", "一年有几个月？", "春天的天气怎么样？", "计算 12 加 30 等于多少。"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(client, prompt: str, max_tokens: int, sampled: bool = False) -> dict:
    """One streamed request: time to its first token, time per output token after it. Chunks carry their
    token ids (`return_token_ids`): a random model's tokens are often pieces of a character, whose
    text the server holds back until it is whole, so text alone would time the characters."""
    t0 = time.perf_counter()
    times, n = [], 0
    settings = {"temperature": 0.8, "top_p": 0.9} if sampled else {"temperature": 0}
    for chunk in client.completions.create(model="ckpt", prompt=prompt, max_tokens=max_tokens, **settings,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"return_token_ids": True}):
        if chunk.choices and chunk.choices[0].model_extra.get("token_ids"):
            times.append(time.perf_counter())
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return {"ttft": times[0] - t0 if times else float("nan"), "tokens": n,
            "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 and times else float("nan")}


def counters(base: str) -> dict:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    values = dict(line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {k: float(values[f"internlm_tp:{k}_total"]) for k in ("decode_steps", "token_choice_seconds")}


def level(client, base: str, name, per_client: int, max_tokens: int) -> dict:
    clients, sampled = (16, True) if name == "16s" else (name, False)

    def worker(c: int) -> list[dict]:
        return [one_request(client, PROMPTS[(c + i) % len(PROMPTS)], max_tokens, sampled) for i in range(per_client)]
    before = counters(base)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    after = counters(base)
    steps = after["decode_steps"] - before["decode_steps"]

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in results if r[key] == r[key])
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")
    return {"requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": pct("ttft", 0.5), "ttft_p99": pct("ttft", 0.99), "tpot_p50": pct("tpot", 0.5),
            "tpot_p99": pct("tpot", 0.99),
            "choice_ms_per_step": (after["token_choice_seconds"] - before["token_choice_seconds"]) * 1e3 / max(steps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="keeps the checkpoint between runs (bench/decode.py's too)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from openai import OpenAI
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--worker", "build", str(ckpt)], check=True,
                       capture_output=True)
    print(f"CPU: {cpu_description()}")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // args.ranks))}
    log = open(work / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(args.ranks),
                               "--master-port", str(free_port()), str(ROOT / "launch" / "run.py"), "task=serve",
                               f"model.path={ckpt}", f"dtype={args.dtype}", f"task.port={port}", "task.max_batch=16",
                               "task.max_seq=512", f"hydra.run.dir={work / 'run'}"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while True:
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not come up: see {work / 'server.log'}")
                time.sleep(1)
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        level(client, base, 2, 1, 8)  # warm-up
        level(client, base, "16s", 1, 8)
        print(f"server: TP={args.ranks}, {args.dtype}, 16 rows; prompts of 4-30 tokens, {args.max_tokens} new tokens "
              f"each (greedy; 16s: sampled); {args.rounds} rounds alternating concurrency {', '.join(map(str, LEVELS))}")
        rounds: dict[int, list[dict]] = {c: [] for c in LEVELS}
        for r in range(args.rounds):
            for c in LEVELS:
                rounds[c].append(level(client, base, c, 4 if c == 1 else 2, args.max_tokens))
            print(f"round {r + 1}: " + ", ".join(f"c={c} {rounds[c][-1]['tokens_per_s']:.1f} tok/s" for c in LEVELS),
                  flush=True)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    summary = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for c, rs in rounds.items()}
    print(f"\n{'concurrency':>12}{'req/s':>9}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
          f"{'choice/step':>13}   (medians over rounds; times in ms)")
    for c, s in summary.items():
        print(f"{c:>12}{s['requests_per_s']:9.2f}{s['tokens_per_s']:9.1f}{s['ttft_p50'] * 1e3:10.1f}"
              f"{s['ttft_p99'] * 1e3:10.1f}{s['tpot_p50'] * 1e3:10.1f}{s['tpot_p99'] * 1e3:10.1f}"
              f"{s['choice_ms_per_step']:13.3f}")
    speedups = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rounds[16], rounds[1])]
    slowdowns = [a["tpot_p99"] / b["tpot_p99"] for a, b in zip(rounds[16], rounds[1])]
    sampling = [a["tpot_p50"] / b["tpot_p50"] for a, b in zip(rounds["16s"], rounds[16])]
    choice = [a["choice_ms_per_step"] - b["choice_ms_per_step"] for a, b in zip(rounds["16s"], rounds[16])]
    print(f"  choice time a step, sampled - greedy at 16: {statistics.median(choice):.2f} ms "
          f"[{min(choice):.2f}, {max(choice):.2f}]")
    for name, values, op, bar in (("tokens/s at 16 / at 1", speedups, ">=", 4.0),
                                  ("p99 time per output token at 16 / at 1", slowdowns, "<=", 4.0),
                                  ("time per output token p50, sampled / greedy at 16", sampling, "<=", 1.5)):
        med = statistics.median(values)
        ok = med >= bar if op == ">=" else med <= bar
        print(f"  {name}: {med:.2f} [{min(values):.2f}, {max(values):.2f}] (bar {op} {bar})  {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "levels": rounds, "speedups": speedups,
                                               "tpot_p99_ratios": slowdowns,
                                               "sampled_choice_ratios": sampling}, indent=1))


if __name__ == "__main__":
    main()
