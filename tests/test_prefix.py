"""A shared prompt prefix run once and its KV cache reused (tp.generate's Prefix): the same tokens and
logits as the whole prompts, and C-Eval predictions identical with and without it."""
import csv
import json
import re

import pytest
import torch

from conftest import PROMPTS, SUBJECTS, torchrun
from tp.generate import compute_prefix, generate, next_token_logits, prefill_inputs, shared_prefix
from tp.load import load_model
from tp.tokenizer import Tokenizer


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2, "the shorter prompt keeps its last token"
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 9]], minimum=3) == 0, "too short to be worth a pass"
    assert shared_prefix([[7, 8, 9]]) == 2 and shared_prefix([]) == 0


def test_prefill_inputs_after_a_prefix():
    ids, valid, positions, mask, lengths = prefill_inputs([[5, 6], [7]], pad_id=0, capacity=7, device="cpu",
                                                          prefix_len=3)
    assert ids.tolist() == [[5, 6], [0, 7]]
    assert positions.tolist()[0] == [3, 4] and positions.tolist()[1][1] == 3, "positions continue the prefix"
    assert valid.tolist() == [[True] * 5 + [False] * 2, [True, True, True, False, True, False, False]]
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert mask[1, 0].tolist() == [[True, True, True, True, False], [True, True, True, False, True]], \
        "no query sees a padding key but its own; every row sees the prefix"


@pytest.fixture(scope="module")
def prompts_with_a_system_prompt(tiny_ckpt):
    tok = Tokenizer(tiny_ckpt)
    system = "以下是中国关于会计考试的单项选择题，请选出其中的正确答案。" * 3
    whole = [tok.encode(system + p) for p in PROMPTS]
    return whole, shared_prefix(whole, 16)


def test_prefix_reuse_gives_the_whole_prompts_tokens_and_logits(tiny_ckpt, prompts_with_a_system_prompt):
    whole, P = prompts_with_a_system_prompt
    assert P > 40
    model = load_model(tiny_ckpt)
    prefix = compute_prefix(model, whole[0][:P])
    rest = [ids[P:] for ids in whole]
    plain = next_token_logits(model, whole)
    reused = next_token_logits(model, rest, prefix=prefix)
    torch.testing.assert_close(reused, plain, rtol=0, atol=1e-4)
    assert generate(model, rest, 12, 2, prefix=prefix).tokens == generate(model, whole, 12, 2).tokens
    one = generate(model, rest[:1], 12, 2, prefix=prefix).tokens
    assert one == generate(model, whole[:1], 12, 2).tokens, "a single row, no padding"


def read_cache(run_dir):
    with open(run_dir / "test_result" / "cache0.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("world_size,protocol", [(1, "official"), (2, "official"), (2, "atb")])
def test_precision_predictions_identical_with_and_without_prefix_reuse(world_size, protocol, tiny_ckpt, ceval_dir,
                                                                       tmp_path):
    args = ["task=precision", f"model.path={tiny_ckpt}", f"task.data_dir={ceval_dir}",
            f"task.subjects=[{','.join(SUBJECTS)}]", "task.batch_size=5", f"task.protocol={protocol}"]
    runs = {}
    for reuse in ("true", "false"):
        proc = torchrun(world_size, *args, f"task.prefix_cache={reuse}", f"hydra.run.dir={tmp_path / reuse}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[reuse] = (read_cache(tmp_path / reuse), proc.stdout + proc.stderr)
    assert runs["true"][0] == runs["false"][0], "the same predictions, row for row"
    with_reuse = re.search(r"prompt tokens through the layers: (\d+) with prefix reuse on, (\d+) without", runs["true"][1])
    assert with_reuse and int(with_reuse.group(2)) > 2 * int(with_reuse.group(1)), "the shots are run once per subject"


def test_system_prompt_in_inference_is_reused_and_changes_nothing(tiny_ckpt, tmp_path):
    system = "你是一个乐于助人的助手。请用中文回答下面的问题，回答要简短。" * 2
    prompts = json.dumps(PROMPTS[:3], ensure_ascii=False)
    outs = {}
    for label, extra in (("reused", [f"task.system_prompt='{system}'"]), ("plain", [])):
        texts = prompts if label == "reused" else json.dumps([system + p for p in PROMPTS[:3]], ensure_ascii=False)
        proc = torchrun(1, "task=inference", f"model.path={tiny_ckpt}", f"task.prompts={texts}", "task.batch_size=2",
                        "task.max_new_tokens=8", *extra, f"hydra.run.dir={tmp_path / label}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outs[label] = [json.loads(line)["output_ids"] for line in (tmp_path / label / "inference.jsonl").read_text().splitlines()]
    assert outs["reused"] == outs["plain"]
