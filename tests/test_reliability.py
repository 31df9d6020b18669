"""Faults a user meets on a shared cluster, each done for real: a killed rank, a killed evaluation,
a rank on another "node", bad devices and configs, a long soak, fuzzed configs."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, SUBJECTS, TORCHRUN, free_port, torchrun
from tp.config import ConfigError, ModelConfig
from tp.tiny import TINY_CONFIG


def start(nproc: int, *overrides: str, extra: tuple = ()) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), *extra, str(ROOT / "launch" / "run.py"), *overrides]
    if not extra:
        cmd[3:3] = ["--master-port", str(free_port())]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> tuple[str, re.Match]:
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        match = re.search(pattern, seen)
        if match:
            return seen, match
    raise AssertionError(f"never saw {pattern!r}:\n{seen}")


def test_a_rank_killed_mid_decode_ends_the_run_naming_it(tiny_ckpt, tmp_path):
    # 8 prompts of 1900 tokens one after the other: tens of seconds of decoding on any machine
    proc = start(2, f"model.path={tiny_ckpt}", f"hydra.run.dir={tmp_path}", "task.max_new_tokens=1900",
                 "task.warmup_tokens=0", "task.prompts=" + json.dumps(["你好", "中国"] * 4, ensure_ascii=False),
                 "task.batch_size=1")
    try:
        seen, match = read_until(proc, r"rank 1/2 on cpu \(pid (\d+)")
        read_until(proc, r"rank 1\]\[INFO\] loaded")
        time.sleep(3)  # well into the decoding
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(int(match.group(1)), signal.SIGKILL)
        killed_at = time.time()
        rest, _ = proc.communicate(timeout=60)
        assert time.time() - killed_at < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", rest), rest[-3000:]
    assert not (tmp_path / "inference.jsonl").exists()


def test_precision_killed_and_rerun_gives_the_uninterrupted_cache(tiny_ckpt, ceval_dir, tmp_path):
    args = [f"model.path={tiny_ckpt}", "task=precision", f"task.subjects=[{','.join(SUBJECTS)}]",
            "task.batch_size=1", f"task.data_dir={ceval_dir}"]
    whole = tmp_path / "whole"
    assert torchrun(2, *args, f"hydra.run.dir={whole}").returncode == 0
    killed = tmp_path / "killed"
    cache = killed / "test_result" / "cache0.csv"
    proc = start(2, *args, f"hydra.run.dir={killed}")
    deadline = time.time() + 120
    while time.time() < deadline and (not cache.exists() or cache.read_bytes().count(b"\n") < 6):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job at once, as a node failure would
    proc.wait()
    answered = cache.read_bytes().count(b"\n") - 1
    assert 0 < answered < 28, f"killed part-way, after {answered} answers"
    rerun = torchrun(2, *args, f"hydra.run.dir={killed}")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert cache.read_bytes() == (whole / "test_result" / "cache0.csv").read_bytes()


def test_two_nodes_through_torchrun_rendezvous_equal_one_node(tiny_ckpt, tmp_path):
    prompts = 'task.prompts=["你好","中华人民共和国的首都是哪里？"]'
    common = [f"model.path={tiny_ckpt}", prompts, "task.batch_size=2", "task.max_new_tokens=12"]
    one = torchrun(2, *common, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stdout + one.stderr
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start(1, *common, f"hydra.run.dir={tmp_path / 'two'}",
                   extra=("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                          "--rdzv-id", "reliability-test")) for _ in range(2)]
    outputs = [n.communicate(timeout=180)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(outputs)
    assert "collectives: DistComm" in "".join(outputs), "ranks on different nodes use gloo, not shared memory"
    rows = lambda d: [json.loads(x)["output_ids"] for x in (d / "inference.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "two") == rows(tmp_path / "one")


@pytest.mark.parametrize("override,message", [
    ("device=cuda", "device=cuda requested but no cuda device is present"),
    ("device=npu", "device=npu requested but no npu device is present"),
])
def test_absent_device_refused_through_the_launcher(tiny_ckpt, tmp_path, override, message):
    proc = torchrun(1, f"model.path={tiny_ckpt}", f"hydra.run.dir={tmp_path}", override)
    assert proc.returncode != 0 and message in proc.stdout


def test_corrupted_partition_header_named(tiny_ckpt, tmp_path):
    from cut_weights import CutOptions, cut
    out = cut(CutOptions(str(tiny_ckpt), str(tmp_path / "tp2"), 2, progress=False))
    data = out / "rank_1" / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[10:20] = b"##########"  # same size, broken header
    data.write_bytes(bytes(raw))
    proc = torchrun(2, f"model.path={out}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "rank_1/model.safetensors: cannot be read as safetensors" in proc.stdout


def test_soak_200_prompts_memory_flat(tiny_ckpt):
    import torch

    from tp.generate import generate
    from tp.load import load_model
    from tp.tokenizer import Tokenizer
    torch.set_num_threads(1)
    model, tok = load_model(tiny_ckpt), Tokenizer(tiny_ckpt)
    texts = ["你好", "中华人民共和国的首都是哪里？", "以下是中国关于会计考试的单项选择题", "A. 1 B. 2"]
    rng = torch.Generator().manual_seed(0)

    def rss() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

    def serve(count: int) -> None:
        done = 0
        while done < count:
            batch = int(torch.randint(1, 9, (1,), generator=rng))
            prompts = [tok.encode(texts[(done + i) % 4] * int(torch.randint(1, 4, (1,), generator=rng)))
                       for i in range(min(batch, count - done))]
            generate(model, prompts, 12, tok.eos_id)
            done += len(prompts)

    serve(40)  # warm-up: every batch size has been allocated once
    before = rss()
    serve(200)
    assert rss() <= before * 1.05, f"resident memory grew from {before} kB to {rss()} kB"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*TINY_CONFIG, "rotary", "rope_theta", "rope_scaling", "rope_parameters",
                                        "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias",
                                        "sliding_window", "use_sliding_window", "partial_rotary_factor"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                                 st.text(max_size=5), st.lists(st.integers(), max_size=2),
                                 st.sampled_from(["llama", "internlm2", ["LlamaForCausalLM"], ["InternLM2ForCausalLM"]]),
                                 st.dictionaries(st.sampled_from(["base", "type", "rope_type", "factor", "rope_theta",
                                                                  "scaling_factor", "partial_rotary_factor"]),
                                                 st.one_of(st.integers(), st.text(max_size=4), st.floats(),
                                                           st.sampled_from(["dynamic", "linear"]))))))
def test_fuzzed_configs_load_or_fail_clearly(raw):
    try:
        cfg = ModelConfig.from_dict({**TINY_CONFIG, **raw})
    except ConfigError:
        return
    assert cfg.num_attention_heads % cfg.kv_heads == 0 and cfg.head_dim > 0 and cfg.rope_theta > 0
    assert cfg.layout in ("internlm", "internlm2", "llama") and cfg.rope_factor > 0
