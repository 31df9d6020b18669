"""TP = 1, 2, 3 over gloo, as real processes, against transformers' LlamaForCausalLM (float32, CPU).
`pytest --device cuda` runs our ranks on GPUs over NCCL instead (one per GPU, up to 3)."""
import pytest
import torch

from conftest import PROMPTS, read_full_state
from reference import reference_greedy, reference_model
from tp.tokenizer import Tokenizer
from tp_worker import spawn

MAX_NEW = 16


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    tok = Tokenizer(tiny_ckpt)
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length (left padding)"
    model = reference_model(tiny_ckpt, read_full_state(tiny_ckpt))
    results = [reference_greedy(model, p, MAX_NEW) for p in prompts]
    return prompts, [r[0] for r in results], torch.stack([r[1] for r in results])


def test_reference_outputs_differ_between_prompts(reference):
    """Guards the fixture: a model that answers every prompt alike would prove nothing below."""
    _, tokens, _ = reference
    assert len({tuple(t) for t in tokens}) == len(tokens)
    assert all(len(set(t)) > 3 for t in tokens)


def test_tp_matches_reference(world_size, tp_device, tiny_ckpt, reference, tmp_path):
    """world_size: 1, 2, 3 (conftest.pytest_generate_tests; on CUDA, as many as there are GPUs)."""
    prompts, ref_tokens, ref_logits = reference
    ranks = spawn(world_size, tiny_ckpt, prompts, MAX_NEW, tmp_path, device=tp_device)
    for r, result in enumerate(ranks):
        assert result["device"] == (f"cuda:{r}" if tp_device == "cuda" else "cpu"), result["device"]
        assert result["alone"] == ref_tokens, f"rank {r}: prompt run alone differs from transformers"
        assert result["batched"] == ref_tokens, f"rank {r}: left-padded batch differs from transformers"
        torch.testing.assert_close(result["logits"], ref_logits, rtol=0, atol=1e-4)
