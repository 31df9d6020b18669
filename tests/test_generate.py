"""The generation loop: EOS handling per sequence, left padding inputs, sampling controls."""
import torch

from conftest import ScriptedModel
from tp.generate import Sampling, choose, generate, prefill_inputs
from tp.load import load_model
from tp.tokenizer import Tokenizer

EOS = 2


def test_each_sequence_stops_at_its_own_eos():
    model = ScriptedModel([[5, EOS, 6, 6], [4, 4, 4, 4, 4, EOS]])
    out = generate(model, [[1, 3], [1]], max_new_tokens=5, eos_id=EOS)
    assert out.tokens == [[5, EOS], [4, 4, 4, 4, 4]]
    assert out.decode_steps == 4


def test_generation_ends_when_every_sequence_has_stopped():
    model = ScriptedModel([[EOS], [3, EOS]])
    out = generate(model, [[1], [1]], max_new_tokens=50, eos_id=EOS)
    assert out.tokens == [[EOS], [3, EOS]] and out.decode_steps == 1 and model.calls == 2


def test_prefill_inputs_left_pad_positions_and_mask():
    ids, valid, positions, mask, lengths = prefill_inputs([[1, 5, 6], [1]], pad_id=0, capacity=5, device="cpu")
    assert ids.tolist() == [[1, 5, 6], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3 + [False] * 2, [False, False, True, False, False]]
    assert mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert lengths.tolist() == [3, 1]
    assert prefill_inputs([[1, 5], [1, 6]], pad_id=0, capacity=4, device="cpu")[3] is None, \
        "no padding: no mask, SDPA's causal path"


def test_sampling_filters_and_seed():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    assert choose(logits, Sampling(), None).item() == 1
    assert choose(logits, Sampling(temperature=1.0, top_k=1), torch.Generator().manual_seed(0)).item() == 1
    picks = {choose(logits, Sampling(temperature=1.0, top_p=0.5), torch.Generator().manual_seed(s)).item()
             for s in range(20)}
    assert picks == {1}, "top_p=0.5 keeps only the most likely token here"
    picks = {choose(logits, Sampling(temperature=1.0, top_k=2), torch.Generator().manual_seed(s)).item()
             for s in range(40)}
    assert picks == {1, 2}


def test_sampled_generation_is_reproducible_with_a_seed(tiny_ckpt):
    model, tok = load_model(tiny_ckpt), Tokenizer(tiny_ckpt)
    prompt = [tok.encode("你好")]
    runs = [generate(model, prompt, 12, EOS, sampling=Sampling(temperature=1.5),
                     generator=torch.Generator().manual_seed(seed)).tokens for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    greedy = generate(model, prompt, 12, EOS).tokens
    assert generate(model, prompt, 12, EOS, sampling=Sampling(temperature=1.0, top_k=1),
                    generator=torch.Generator().manual_seed(3)).tokens == greedy


def test_tokenizer_conventions(tiny_ckpt):
    tok = Tokenizer(tiny_ckpt)
    ids = tok.encode("答案：A")
    assert ids[0] == 1 and 2 not in ids and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.piece_id("<unk>") == 0
    assert tok.decode(ids) == "答案：A"
    assert all(tok.piece_id(letter) is not None for letter in "ABCD")
    assert tok.piece_id("no-such-piece-✗✗") is None


def test_dynamic_rope_changes_only_positions_past_the_context_and_keeps_no_history(tiny_ckpt, tmp_path):
    import json
    import shutil

    from tp.config import ModelConfig
    from tp.model import rope_tables
    cfg = ModelConfig.from_dict({**json.loads((tiny_ckpt / "config.json").read_text()),
                                 "max_position_embeddings": 16, "rotary": {"base": 10000, "type": "dynamic"}})
    plain = ModelConfig.from_dict({**json.loads((tiny_ckpt / "config.json").read_text()), "max_position_embeddings": 16})
    short, long_ = rope_tables(cfg, 16), rope_tables(cfg, 40)
    assert torch.equal(long_[0][:16], short[0]) and torch.equal(short[0], rope_tables(plain, 16)[0])
    assert not torch.allclose(long_[0][16:], rope_tables(plain, 40)[0][16:]), "past the context: rescaled"

    ckpt = tmp_path / "dyn"
    shutil.copytree(tiny_ckpt, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "max_position_embeddings": 16,
                                                 "rotary": {"base": 10000, "type": "dynamic"}}))
    model, prompt = load_model(ckpt), [[1, 100, 200, 300]]
    first = generate(model, prompt, 5, EOS).tokens
    generate(model, prompt, 40, EOS)  # a request past the context
    assert generate(model, prompt, 5, EOS).tokens == first, "an earlier long request leaves no trace"
