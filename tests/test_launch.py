"""launch/run.py through torchrun, as a user runs it."""
import json

from conftest import torchrun
from tp.generate import generate
from tp.load import load_model
from tp.tokenizer import Tokenizer

PROMPTS = ["你好", "中华人民共和国的首都是哪里？", "以下是中国关于会计考试的单项选择题"]


def test_inference_over_two_processes_writes_jsonl(tiny_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun(2, "task=inference", f"model.path={tiny_ckpt}", f"hydra.run.dir={run_dir}",
                    "task.prompts=" + json.dumps(PROMPTS, ensure_ascii=False), "task.batch_size=2",
                    "task.max_new_tokens=10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run_dir / "inference.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    model, tok = load_model(tiny_ckpt), Tokenizer(tiny_ckpt)
    expected = generate(model, [tok.encode(p) for p in PROMPTS], 10, tok.eos_id).tokens
    for row, ids in zip(rows, expected):
        assert set(row) == {"prompt", "output", "output_ids", "first_token_ms", "next_token_ms"}
        assert row["output_ids"] == ids, "TP=2 launcher output differs from TP=1 greedy"
        assert row["output"] == tok.decode(ids)
        assert row["first_token_ms"] > 0 and row["next_token_ms"] > 0
    # rank 0 alone prints results and writes the run dir
    assert proc.stdout.count("### prompt:") == len(PROMPTS)
    log = (run_dir / "run.log").read_text()
    assert "[rank 0]" in log and "[rank 1]" not in log
    assert "[rank 1]" in proc.stdout, "rank 1 still logs, to its console, with its rank"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "inference.jsonl", "run.log"]


def test_tp_size_that_does_not_divide_heads_is_refused_at_start(tiny_ckpt, tmp_path):
    proc = torchrun(5, "task=inference", f"model.path={tiny_ckpt}", f"hydra.run.dir={tmp_path}",
                    "task.max_new_tokens=2")
    assert proc.returncode != 0
    assert "tensor parallel size 5 does not divide num_attention_heads=12" in proc.stdout
    assert not (tmp_path / "inference.jsonl").exists()


def test_bad_batch_size_and_missing_checkpoint_are_clear_errors(tiny_ckpt, tmp_path):
    proc = torchrun(1, f"model.path={tiny_ckpt}", f"hydra.run.dir={tmp_path}", "task.batch_size=0")
    assert proc.returncode != 0 and "task.batch_size must be an integer >= 1, got 0" in proc.stdout
    proc = torchrun(1, f"model.path={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "nowhere/config.json: not found" in proc.stdout
