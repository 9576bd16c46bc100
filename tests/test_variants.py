"""Ungated prompts (studies.variants): one softmax over [P; T], the literal form, the KV cache, and how
the variant plugs into the model (the layer's weights shared, the core untouched)."""
import math

import pytest
import torch

from adapterlab import AdapterConfig, add_adapter
from adapterlab.adapter import adapted_layers, adapter_state_dict, count_trainable, gate_values, remove_adapter
from adapterlab.model import Attention, KVCache, apply_rope, rope_angles
from adapterlab.studies.variants import (
    UngatedAttention,
    UngatedPrompt,
    add_ungated_prompts,
    is_ungated,
    joint_attention_literal,
    joint_prompt_attention,
)

from test_adapter import small_model  # one small LLaMA for the adapter and its variants


def tokens(B=2, T=11, vocab=97, seed=3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the math
def literal_joint_layer_output(attn, x, cos, sin):
    """One ungated attention layer computed literally: keys/values [P; T], one softmax."""
    ap = attn.adapter
    q = apply_rope(attn.split_heads(attn.wq(x), attn.n_heads), cos, sin)
    k = apply_rope(attn.split_heads(attn.wk(x), attn.n_kv_heads), cos, sin)
    v = attn.split_heads(attn.wv(x), attn.n_kv_heads)
    pk = attn.split_heads(attn.wk(ap.prompt[None]), attn.n_kv_heads)
    pv = attn.split_heads(attn.wv(ap.prompt[None]), attn.n_kv_heads)
    rep = attn.n_heads // attn.n_kv_heads
    k, v, pk, pv = (t.repeat_interleave(rep, dim=1) for t in (k, v, pk, pv))
    out = joint_attention_literal(q, k, v, pk, pv)
    B, T = x.shape[:2]
    return attn.wo(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("n_kv", [None, 2])
def test_ungated_efficient_equals_literal_one_softmax(n_kv):
    model = add_ungated_prompts(small_model(n_kv), AdapterConfig(prompt_len=6, layers=2))
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    cos, sin = rope_angles(16, torch.arange(9), 10000.0)
    for i in adapted_layers(model):
        attn = model.layers[i].attention
        assert isinstance(attn, UngatedAttention) and attn.adapter.gate is None
        with torch.no_grad():
            fast = attn(x, cos, sin)
            slow = literal_joint_layer_output(attn, x, cos, sin)
        assert (fast - slow).abs().max() < 1e-5


def test_joint_literal_is_one_softmax_not_two():
    """With token values 0 and prompt values 1, the output is the prompts' share of ONE softmax:
    strictly between 0 and 1 (Eq. 7's separate prompt softmax would give exactly the gate)."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(2))
    pk = torch.randn(1, 2, 3, 8, generator=g)
    out = joint_attention_literal(q, k, torch.zeros_like(q), pk, torch.ones(1, 2, 3, 8))
    assert (out > 0.01).all() and (out < 0.99).all()
    S = torch.cat([q @ pk.transpose(-2, -1), (q @ k.transpose(-2, -1)).masked_fill(
        ~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))], -1) / math.sqrt(8)
    share = S.softmax(-1)[..., :3].sum(-1, keepdim=True)  # the mass the prompts take
    assert torch.allclose(out, share.expand_as(out), atol=1e-6)
    token_out = torch.zeros_like(q)  # attention over tokens whose values are 0
    assert torch.allclose(joint_prompt_attention(q, pk, torch.ones(1, 2, 3, 8), k, token_out), out, atol=1e-6)


# ---------------------------------------------------------------------------- in the model
@pytest.mark.parametrize("n_kv", [None, 2])
def test_ungated_changes_the_output_at_step_0_and_prompts_get_gradients(n_kv):
    model = small_model(n_kv)
    x = tokens()
    with torch.no_grad():
        base = model(x)
    add_ungated_prompts(model, AdapterConfig(prompt_len=5, layers=2))
    assert count_trainable(model) == 2 * 5 * 64  # prompts only: no gate parameter
    logits = model(x)
    assert (logits.detach() - base).abs().max() > 1e-3, "the prompts take attention from the tokens at step 0"
    logits.logsumexp(-1).mean().backward()
    for i in adapted_layers(model):
        assert model.layers[i].attention.adapter.prompt.grad.abs().min() > 0, "every prompt value gets a gradient"


@pytest.mark.parametrize("n_kv", [None, 2])
def test_ungated_kv_cache_decoding_equals_the_full_forward(n_kv):
    model = add_ungated_prompts(small_model(n_kv).eval(), AdapterConfig(prompt_len=5, layers=3))
    x = tokens(T=12)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 2, 16)
        parts = [model(x[:, :6], 0, cache), model(x[:, 6:9], 6, cache), model(x[:, 9:10], 9, cache),
                 model(x[:, 10:], 10, cache)]  # prefill, a shifted prefill, then single tokens
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_the_variant_shares_the_layers_weights_and_draws_the_papers_prompts():
    """Same names and tensors as the base (plus the prompts); the same seed draws the same prompts as
    the paper's adapter (a fair comparison); the core's attention stays model.Attention below."""
    model = small_model()
    weights = {n: p for n, p in model.named_parameters()}
    add_ungated_prompts(model, AdapterConfig(prompt_len=4, layers=2), seed=7)
    gated = add_adapter(small_model(), AdapterConfig(prompt_len=4, layers=2), seed=7)
    assert is_ungated(model) and not is_ungated(gated)
    for name, p in model.named_parameters():
        if ".adapter." in name:
            assert torch.equal(p, gated.get_parameter(name)) and name.endswith("prompt")
        else:
            assert p is weights[name] and not p.requires_grad  # the same tensor, frozen
    assert set(model.state_dict()) == set(gated.state_dict()) - {f"layers.{i}.attention.adapter.gate" for i in (2, 3)}
    assert [type(l.attention) for l in model.layers] == [Attention, Attention, UngatedAttention, UngatedAttention]


def test_ungated_prompts_have_no_gate_and_need_the_token_attention():
    model = add_ungated_prompts(small_model(), AdapterConfig(prompt_len=4, layers=2))
    assert gate_values(model).shape == (0, 4)
    assert set(adapter_state_dict(model)) == {f"layers.{i}.attention.adapter.prompt" for i in (2, 3)}
    ap = model.layers[3].attention.adapter
    assert isinstance(ap, UngatedPrompt)
    with pytest.raises(ValueError, match="ungated"):
        ap.gate_value()
    with pytest.raises(ValueError, match="token keys"):
        ap(torch.zeros(1, 4, 3, 16), model.layers[3].attention)
    with pytest.raises(ValueError, match="add_ungated_prompts"):
        AdapterConfig(gate="none")  # the core's config holds the paper's gates only
    with pytest.raises(ValueError, match="no gate"):
        add_ungated_prompts(small_model(), AdapterConfig(init="random"))


def test_removing_the_prompts_gives_the_base_back_and_a_gated_adapter_fits_after():
    model = small_model()
    x = tokens()
    with torch.no_grad():
        base = model(x)
        add_ungated_prompts(model, AdapterConfig(prompt_len=4, layers=2))
        remove_adapter(model)
        assert torch.equal(model(x), base)
        add_adapter(model, AdapterConfig(prompt_len=4, layers=2))  # zero-init: exactly the base again
        assert torch.equal(model(x), base)


# ---------------------------------------------------------------------------- files
def test_ungated_prompts_round_trip_in_our_format(tmp_path):
    from adapterlab import load_adapter, save_adapter

    model = add_ungated_prompts(small_model(), AdapterConfig(prompt_len=4, layers=2), seed=3)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    save_adapter(model, tmp_path / "ungated")
    fresh = add_ungated_prompts(small_model(), AdapterConfig(prompt_len=4, layers=2), seed=9)  # other prompts
    load_adapter(fresh, tmp_path / "ungated")
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    with pytest.raises(ValueError):  # a model without the variant would need gates the file does not hold
        load_adapter(small_model(), tmp_path / "ungated")


def test_a_gated_file_into_ungated_prompts_is_refused(tmp_path):
    """Official files are gated; ungated prompts have no gate to fill."""
    from adapterlab import load_adapter

    model = add_ungated_prompts(small_model(), AdapterConfig(prompt_len=10, layers=2))
    sd = {"adapter_query.weight": torch.randn(10 * 2, 64)}
    sd.update({f"layers.{i}.attention.gate": torch.zeros(1, 4, 1, 1) for i in range(4)})
    torch.save(sd, tmp_path / "official.pth")
    with pytest.raises(ValueError, match="gate"):
        load_adapter(model, tmp_path / "official.pth")
