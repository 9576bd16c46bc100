"""generate.py: the KV-cached loop gives the tokens of recomputing everything at each step,
prompt K/V are computed once per generation, EOS stops each row, sampling is top-p."""
import pytest
import torch

from conftest import make_tiny_model, open_gates_

from adapterlab import AdapterConfig, add_adapter
from adapterlab.adapter import adapted_layers
from adapterlab.generate import generate, generate_tokens, sample_top_p
from adapterlab.tokenizer import Tokenizer

PROMPTS = [[1, 17, 42], [1, 5, 9, 33, 60, 61, 99], [1, 8, 8, 70, 3]]  # different lengths


def adapted_model(n_kv_heads=None, seed=0):
    model = make_tiny_model(seed=seed, n_kv_heads=n_kv_heads)
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2))
    return open_gates_(model, seed=seed + 1, scale=2.0)


def greedy_from_scratch(model, prompt, n, visual=None):
    """No cache: feed the whole sequence again at every step and take the argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), visual=visual)[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_cached_greedy_equals_recomputing_from_scratch(n_kv_heads):
    model = adapted_model(n_kv_heads)
    with torch.no_grad():  # the adapter really changes the next token distribution
        x = torch.tensor([PROMPTS[1]])
        base = model(x)
        for i in adapted_layers(model):
            model.layers[i].attention.adapter.gate.mul_(0)
        assert (model(x) - base).abs().max() > 1e-2
    model = adapted_model(n_kv_heads)
    ours = generate_tokens(model, PROMPTS, max_new_tokens=10, greedy=True, stop_at_eos=False)
    reference = [greedy_from_scratch(model, p, 10) for p in PROMPTS]
    print(f"\n[generate kv={n_kv_heads}] cached {ours}\n                 scratch {reference}")
    assert ours == reference
    assert all(len(t) == 10 for t in ours)


def test_cached_generation_with_an_image_token():
    model = adapted_model()
    visual = torch.randn(len(PROMPTS), model.config.dim, generator=torch.Generator().manual_seed(4))
    ours = generate_tokens(model, PROMPTS, max_new_tokens=6, greedy=True, stop_at_eos=False, visual=visual)
    reference = [greedy_from_scratch(model, p, 6, visual=visual[i:i + 1]) for i, p in enumerate(PROMPTS)]
    assert ours == reference
    assert ours != generate_tokens(model, PROMPTS, max_new_tokens=6, greedy=True, stop_at_eos=False)


def test_prompt_kv_is_computed_once_per_generation():
    model = adapted_model()
    adapted = adapted_layers(model)
    prompt_kv_calls = {i: 0 for i in adapted}
    wk_calls = {i: 0 for i in range(model.config.n_layers)}
    for i in adapted:
        ap = model.layers[i].attention.adapter
        original = ap.prompt_kv

        def counted(*args, _i=i, _original=original, **kwargs):
            prompt_kv_calls[_i] += 1
            return _original(*args, **kwargs)

        ap.prompt_kv = counted
    for i, layer in enumerate(model.layers):
        layer.attention.wk.register_forward_hook(lambda *_, _i=i: wk_calls.__setitem__(_i, wk_calls[_i] + 1))

    n_new = 7
    generate_tokens(model, PROMPTS, max_new_tokens=n_new, greedy=True, stop_at_eos=False)
    steps = max(map(len, PROMPTS)) + n_new - min(map(len, PROMPTS))  # forward passes of the loop
    assert prompt_kv_calls == {i: 1 for i in adapted}
    assert wk_calls == {i: steps + (1 if i in adapted else 0) for i in wk_calls}  # prompts once, tokens each step
    # a second generation computes them again (once): the prompts may have changed in between
    generate_tokens(model, PROMPTS, max_new_tokens=2, greedy=True)
    assert prompt_kv_calls == {i: 2 for i in adapted}


def test_each_row_stops_at_its_own_eos():
    model = adapted_model()
    free = generate_tokens(model, PROMPTS, max_new_tokens=8, greedy=True, stop_at_eos=False)
    # Declare the 4th token of row 0 to be EOS: row 0 must stop there, the others not before theirs.
    eos = free[0][3]
    stopped = generate_tokens(model, PROMPTS, max_new_tokens=8, greedy=True, eos_id=eos)
    for row_free, row_stopped in zip(free, stopped):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row_stopped == row_free[:cut]
    assert len(stopped[0]) <= 3


def test_sampling_is_seeded_and_top_p_limits_the_candidates():
    model = adapted_model()
    a = generate_tokens(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123, stop_at_eos=False)
    b = generate_tokens(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123, stop_at_eos=False)
    assert a == b
    greedy = generate_tokens(model, PROMPTS, max_new_tokens=8, greedy=True, stop_at_eos=False)
    assert generate_tokens(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-9, seed=0,
                           stop_at_eos=False) == greedy  # only the most likely token survives
    assert generate_tokens(model, PROMPTS, max_new_tokens=8, temperature=0.0, stop_at_eos=False) == greedy


def test_sample_top_p_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, -1)
    gen = torch.Generator().manual_seed(0)
    full = torch.bincount(sample_top_p(logits, 1.0, 1.0, gen), minlength=4) / 20000
    assert torch.allclose(full, probs, atol=0.015)
    # top_p = 0.6: tokens 0 (mass before 0) and 1 (mass before 0.5) stay; 2 (0.8) and 3 go.
    nucleus = torch.bincount(sample_top_p(logits, 1.0, 0.6, gen), minlength=4) / 20000
    assert nucleus[2] == 0 and nucleus[3] == 0
    assert torch.allclose(nucleus[:2], torch.tensor([0.625, 0.375]), atol=0.015)


def test_generate_text_with_a_tokenizer():
    texts = [f"alice has {i} red apples and bob has {i + 2} blue pears" for i in range(30)]
    tok = Tokenizer.train(texts, vocab_size=64)
    model = make_tiny_model(vocab_size=tok.n_words)
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2))
    model.train()
    out = generate(model, tok, ["alice has", "bob has 3 blue"], max_new_tokens=5, greedy=True, stop_at_eos=False)
    assert model.training  # the caller's mode is restored
    ids = generate_tokens(model, [tok.encode("alice has"), tok.encode("bob has 3 blue")], max_new_tokens=5,
                          greedy=True, stop_at_eos=False)
    assert out == [tok.decode(t) for t in ids]
    model.tokenizer = tok  # tokenizer=None falls back to model.tokenizer
    assert generate(model, None, ["alice has", "bob has 3 blue"], max_new_tokens=5, greedy=True, stop_at_eos=False) == out


def test_bad_generation_requests():
    model = make_tiny_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[1, 2], []])
    with pytest.raises(ValueError, match="max_seq_len=128"):
        generate_tokens(model, [[1] * 128])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate(model, None, ["hi"])
    assert generate_tokens(model, [[1, 2]], max_new_tokens=0) == [[]]
