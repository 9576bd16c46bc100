"""The adapter's math: exact equality at init, literal Eq. 5-8 == efficient form, gradients, 7B counts."""
import math

import pytest
import torch

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter
from adapterlab.adapter import (
    adapted_layers,
    adapter_state_dict,
    count_trainable,
    gate_values,
    gated_prompt_attention,
    prompt_attention_map,
    remove_adapter,
    zero_init_attention_literal,
)
from adapterlab.model import RMSNorm, apply_rope, init_weights, rope_angles


def small_model(n_kv_heads=None, seed=0, n_layers=4):
    cfg = LlamaConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97,
                      multiple_of=16, max_seq_len=64)
    return init_weights(Llama(cfg), seed=seed)


def open_gates(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for i in adapted_layers(model):
        ap = model.layers[i].attention.adapter
        ap.gate.data = torch.randn(ap.gate.shape, generator=g)


def tokens(B=2, T=11, vocab=97, seed=3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- init equality
@pytest.mark.parametrize("gate", ["head", "layer"])
@pytest.mark.parametrize("n_kv", [None, 2])
def test_zero_init_output_is_exactly_the_base(gate, n_kv):
    model = small_model(n_kv)
    x = tokens()
    with torch.no_grad():
        base = model(x)
        add_adapter(model, AdapterConfig(prompt_len=5, layers=3, gate=gate))
        adapted = model(x)
    assert torch.equal(base, adapted)


def test_random_init_changes_the_output():
    model = small_model()
    x = tokens()
    with torch.no_grad():
        base = model(x)
        add_adapter(model, AdapterConfig(prompt_len=5, layers=3, init="random"))
        assert (model(x) - base).abs().max() > 1e-3


# ---------------------------------------------------------------------------- literal == efficient
def literal_layer_output(attn, x, cos, sin):
    """One adapted attention layer computed with the literal Eq. 5-8 (concatenated scores)."""
    ap = attn.adapter
    q = apply_rope(attn.split_heads(attn.wq(x), attn.n_heads), cos, sin)
    k = apply_rope(attn.split_heads(attn.wk(x), attn.n_kv_heads), cos, sin)
    v = attn.split_heads(attn.wv(x), attn.n_kv_heads)
    pk = attn.split_heads(attn.wk(ap.prompt[None]), attn.n_kv_heads)  # W_k P, no rotary
    pv = attn.split_heads(attn.wv(ap.prompt[None]), attn.n_kv_heads)
    rep = attn.n_heads // attn.n_kv_heads
    k, v, pk, pv = (t.repeat_interleave(rep, dim=1) for t in (k, v, pk, pv))
    gate = ap.gate_value().reshape(1, -1, 1, 1) if ap.gate.numel() > 1 else ap.gate_value()
    out = zero_init_attention_literal(q, k, v, pk, pv, gate)
    B, T = x.shape[:2]
    return attn.wo(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("gate,act", [("head", "tanh"), ("layer", "identity"), ("layer", "tanh"), ("head", "identity")])
@pytest.mark.parametrize("n_kv", [None, 2])
def test_efficient_equals_literal_eq5_8(gate, act, n_kv):
    model = small_model(n_kv)
    add_adapter(model, AdapterConfig(prompt_len=6, layers=2, gate=gate, gate_activation=act))
    open_gates(model)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))
    cos, sin = rope_angles(16, torch.arange(9), 10000.0)
    for i in adapted_layers(model):
        attn = model.layers[i].attention
        with torch.no_grad():
            fast = attn(x, cos, sin)
            slow = literal_layer_output(attn, x, cos, sin)
        assert (fast - slow).abs().max() < 1e-5


def test_literal_function_is_the_paper_not_a_joint_softmax():
    """Eq. 7 uses two separate softmaxes: with gate 1 the prompt part sums to 1 on its own."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    pk, pv = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(2))
    pv_ones = torch.ones_like(pv)
    v_zero = torch.zeros_like(v)
    out = zero_init_attention_literal(q, k, v_zero, pk, pv_ones, torch.tensor(1.0))
    assert torch.allclose(out, torch.ones_like(out))  # softmax over prompts alone sums to 1
    # and the sum form gives the same prompt term
    assert torch.allclose(gated_prompt_attention(q, pk, pv_ones, torch.tensor(1.0)), out)


def test_literal_breaks_if_gate_ignored():
    """Sanity: the comparison above can fail (a wrong gate gives a different answer)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    pk, pv = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(2))
    a = zero_init_attention_literal(q, k, v, pk, pv, torch.tensor(0.3))
    b = zero_init_attention_literal(q, k, v, pk, pv, torch.tensor(0.0)) + gated_prompt_attention(q, pk, pv, torch.tensor(0.3))
    c = zero_init_attention_literal(q, k, v, pk, pv, torch.tensor(0.0)) + gated_prompt_attention(q, pk, pv, torch.tensor(0.4))
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-3)


# ---------------------------------------------------------------------------- gradients / training
def test_gate_opens_first_then_prompts_learn_and_base_is_untouched():
    model = small_model()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2))
    x = tokens(T=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)

    def step():
        opt.zero_grad()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        return loss

    prompts0 = {i: model.layers[i].attention.adapter.prompt.detach().clone() for i in adapted_layers(model)}
    step()
    for i in adapted_layers(model):
        ap = model.layers[i].attention.adapter
        assert torch.count_nonzero(ap.prompt.grad) == 0, "at step 0 the prompts get zero gradient (tanh(0)=0)"
        assert ap.gate.grad.abs().min() > 0, "every head's gate gets a gradient at step 0"
    opt.step()
    for i in adapted_layers(model):
        ap = model.layers[i].attention.adapter
        assert ap.gate.abs().min() > 0, "gates moved after one step"
        assert torch.equal(ap.prompt.detach(), prompts0[i]), "prompts unchanged after one step"
    step()
    opt.step()
    for i in adapted_layers(model):
        ap = model.layers[i].attention.adapter
        assert ap.prompt.grad.abs().sum() > 0
        assert not torch.equal(ap.prompt.detach(), prompts0[i]), "prompts moved after two steps"
    for k, v in model.state_dict().items():
        if ".adapter." not in k:
            assert torch.equal(v, frozen_before[k]), f"frozen tensor {k} changed"


def test_only_adapter_is_trainable_and_frozen_prefix_has_no_graph():
    model = small_model(n_layers=5)
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".adapter." in n for n in names)
    assert model.frozen_prefix() == 3
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)) for layer in model.layers]
    model(tokens())
    for h in hooks:
        h.remove()
    assert seen == [False, False, False, True, True]


def test_prompt_keys_values_are_the_frozen_projections():
    model = small_model(n_kv_heads=2)
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2))
    for i in adapted_layers(model):
        attn = model.layers[i].attention
        pk, pv = attn.adapter.prompt_kv(attn)
        P = attn.adapter.prompt.detach()
        wk_p = (P @ attn.wk.weight.T).reshape(4, 2, 16).transpose(0, 1)  # (H_kv, K, d)
        wv_p = (P @ attn.wv.weight.T).reshape(4, 2, 16).transpose(0, 1)
        assert torch.allclose(pk[0], wk_p, atol=1e-6) and torch.allclose(pv[0], wv_p, atol=1e-6)


def test_prompt_kv_is_shared_across_the_batch():
    model = small_model()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=1))
    attn = model.layers[-1].attention
    pk, _ = attn.adapter.prompt_kv(attn)
    assert pk.shape[0] == 1  # computed once per forward, broadcast over the batch


@pytest.mark.parametrize("gate", ["head", "layer"])
@pytest.mark.parametrize("n_kv", [None, 2])
def test_prompt_attention_map_is_the_gated_prompt_block(gate, n_kv):
    """Rows sum to the heads' gates, and the map times the prompt values is what the adapter added."""
    model = small_model(n_kv_heads=n_kv)
    add_adapter(model, AdapterConfig(prompt_len=5, layers=2, gate=gate))
    open_gates(model)
    x = tokens()
    for layer in adapted_layers(model):
        attn = model.layers[layer].attention
        added = {}
        hook = attn.adapter.register_forward_hook(lambda m, args, out: added.update(out=out))
        block = prompt_attention_map(model, x, layer)  # (B, H, T, K)
        hook.remove()
        assert block.shape == (2, 4, 11, 5)
        gates = attn.adapter.gate_value().detach().reshape(-1).expand(4)
        assert torch.allclose(block.sum(-1), gates[None, :, None].expand(2, 4, 11), atol=1e-6)
        _, pv = attn.adapter.prompt_kv(attn)
        pv = pv.repeat_interleave(4 // pv.shape[1], dim=1)
        assert torch.allclose(block @ pv, added["out"], atol=1e-5)
    assert torch.equal(prompt_attention_map(model, x), prompt_attention_map(model, x, adapted_layers(model)[-1]))
    with pytest.raises(ValueError, match="carries no adapter"):
        prompt_attention_map(model, x, 0)


# ---------------------------------------------------------------------------- shapes and counts at 7B
def test_llama_7b_shape_on_meta_device():
    with torch.device("meta"):
        model = Llama(LlamaConfig())  # Meta's 7B params.json values are the defaults
    assert model.num_params() == 6_738_415_616
    add_adapter(model, AdapterConfig(prompt_len=10, layers=30))
    assert count_trainable(model) == 10 * 30 * 4096 + 30 * 32 == 1_229_760
    assert adapted_layers(model) == list(range(2, 32))
    assert model.layers[2].attention.adapter.gate.shape == (1, 32, 1, 1)


def test_ffn_hidden_rule_matches_meta():
    assert LlamaConfig().ffn_hidden_dim == 11008  # 7B
    assert LlamaConfig(dim=5120, n_heads=40, n_layers=40).ffn_hidden_dim == 13824  # 13B
    assert LlamaConfig(dim=8192, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096).ffn_hidden_dim == 28672  # Llama-2-70B


def test_gate_values_and_state_dict():
    model = small_model()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=3, gate="layer"))
    assert gate_values(model).shape == (3, 4)
    sd = adapter_state_dict(model)
    assert set(sd) == {f"layers.{i}.attention.adapter.{n}" for i in (1, 2, 3) for n in ("prompt", "gate")}
    remove_adapter(model)
    assert adapted_layers(model) == []


def test_rmsnorm_formula():
    n = RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8)
    assert torch.allclose(n(x), x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)


def test_rope_preserves_norm_and_relative_positions():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    def dot(m, n):
        cq, sq = rope_angles(16, torch.tensor([m]), 10000.0)
        ck, sk = rope_angles(16, torch.tensor([n]), 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    assert torch.allclose(dot(7, 3), dot(14, 10), atol=1e-5)  # depends on m - n only
    c, s = rope_angles(16, torch.tensor([5]), 10000.0)
    assert torch.allclose(apply_rope(q, c, s).norm(), q.norm(), atol=1e-5)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,needle", [
    (dict(prompt_len=0), "prompt_len"),
    (dict(layers=0), "layers"),
    (dict(gate="token"), "gate"),
    (dict(gate_activation="relu"), "gate_activation"),
    (dict(init="ones"), "init"),
])
def test_bad_adapter_config(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AdapterConfig(**kwargs)


def test_too_many_layers_is_a_clear_error():
    model = small_model()
    with pytest.raises(ValueError, match=r"layers=9.*n_layers=4"):
        add_adapter(model, AdapterConfig(layers=9))


def test_bad_model_config():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    model = small_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
