"""The ViT and the text encoder with zero-init attention: exact at init, Eq. 7 == its literal form
with a bidirectional (padding) mask, ungated == one literal softmax, gradients, input prompts, files."""
import json

import pytest
import torch

from adapterlab.adapter import (
    AdapterConfig,
    add_adapter,
    adapted_layers,
    count_trainable,
    gate_values,
    zero_init_attention_literal,
)
from adapterlab.encoders.transformer import (
    TextEncoder,
    TextEncoderConfig,
    ViT,
    ViTConfig,
    add_input_prompts,
    init_encoder_weights,
    load_encoder,
    save_encoder,
    set_head,
)
from adapterlab.studies.variants import add_ungated_prompts, joint_attention_literal, joint_prompt_attention
from conftest import open_gates_, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50


def attach(model, gate: str, **config):
    """gate "none": the ungated study variant (studies.variants); otherwise the paper's adapter."""
    if gate == "none":
        return add_ungated_prompts(model, AdapterConfig(**config))
    return add_adapter(model, AdapterConfig(gate=gate, **config))


def tiny_vit(seed: int = 0) -> ViT:
    """dim 32, 3 layers, 4 heads, 16x16 pictures in 4x4 patches: 16 patches + CLS."""
    config = ViTConfig(dim=32, n_layers=3, n_heads=4, mlp_hidden=64, image_size=16, patch_size=4, n_classes=5)
    return randomize_(ViT(config), seed).eval()


def tiny_text(seed: int = 0) -> TextEncoder:
    config = TextEncoderConfig(dim=32, n_layers=3, n_heads=4, mlp_hidden=64, vocab_size=VOCAB, max_seq_len=16)
    return randomize_(TextEncoder(config), seed).eval()


def images(batch: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def tokens_and_mask(padded: bool, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """3 sequences of 10 random tokens; padded: the last two end with 3 and 6 padding positions
    (holding random ids too, so a model that looked at them would notice)."""
    tokens = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(seed))
    if not padded:
        return tokens, None
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    return tokens, mask


def run(model, padded: bool = False):
    """The model's output on fixed inputs: class scores (ViT) or per-token outputs (text)."""
    if isinstance(model, ViT):
        return model(images())
    return model(*tokens_and_mask(padded))


CASES = [("vit", False), ("text", False), ("text", True)]  # (family, padding)


def make(family: str, seed: int = 0):
    return tiny_vit(seed) if family == "vit" else tiny_text(seed)


# ---------------------------------------------------------------------------- exact at init
@pytest.mark.parametrize("family,padded", CASES)
@pytest.mark.parametrize("gate", ["head", "layer"])
def test_gate_at_zero_gives_exactly_the_frozen_encoder(family, padded, gate):
    model = make(family)
    with torch.no_grad():
        base = run(model, padded)
        add_adapter(model, AdapterConfig(prompt_len=4, layers=2, gate=gate))
        adapted = run(model, padded)
    assert adapted_layers(model) == [1, 2]
    assert torch.equal(adapted, base)
    with torch.no_grad():
        open_gates_(model)
        assert not torch.allclose(run(model, padded), base, atol=1e-3)  # the gates do reach the output


@pytest.mark.parametrize("family,padded", CASES)
def test_ungated_prompts_change_the_output_before_any_training(family, padded):
    model = make(family)
    with torch.no_grad():
        base = run(model, padded)
        add_ungated_prompts(model, AdapterConfig(prompt_len=4, layers=2))
        assert not torch.allclose(run(model, padded), base, atol=1e-3)


# ---------------------------------------------------------------------------- efficient == literal
def capture_attention_inputs(model, inputs) -> dict[int, tuple]:
    """(x, mask) as each adapted attention layer receives them during one forward."""
    seen = {}
    hooks = [model.layers[i].attention.register_forward_pre_hook(
        lambda module, args, i=i: seen.update({i: (args[0], args[1] if len(args) > 1 else None)}))
        for i in adapted_layers(model)]
    try:
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def literal_attention(attn, x, mask, gated: bool):
    """One adapted encoder attention written out: queries, keys, values and the prompts' keys and
    values through the frozen W_k, W_v (with their biases, no position), then the literal form."""
    B, T, _ = x.shape
    q, k, v = (attn.split_heads(w(x), attn.n_heads) for w in (attn.wq, attn.wk, attn.wv))
    prompt = attn.adapter.prompt[None]  # (1, K, C)
    pk, pv = attn.split_heads(attn.wk(prompt), attn.n_heads), attn.split_heads(attn.wv(prompt), attn.n_heads)
    visible = torch.ones(B, 1, T, T, dtype=torch.bool) if mask is None else mask[:, None, None, :].expand(B, 1, T, T)
    if gated:
        out = zero_init_attention_literal(q, k, v, pk, pv, attn.adapter.gate_value(), token_mask=visible)
    else:
        out = joint_attention_literal(q, k, v, pk, pv, token_mask=visible)
    return attn.wo(out.transpose(1, 2).reshape(B, T, -1))


def model_inputs(model, padded):
    return (images(),) if isinstance(model, ViT) else tokens_and_mask(padded)


@pytest.mark.parametrize("family,padded", CASES)
@pytest.mark.parametrize("gate,act", [("head", "tanh"), ("layer", "identity"), ("none", "tanh")])
def test_efficient_attention_equals_the_literal_form_with_a_bidirectional_mask(family, padded, gate, act):
    model = make(family)
    attach(model, gate, prompt_len=4, layers=2, gate_activation=act)
    if gate != "none":
        open_gates_(model)
    with torch.no_grad():
        seen = capture_attention_inputs(model, model_inputs(model, padded))
        assert sorted(seen) == [1, 2]
        for i, (x, mask) in seen.items():
            attn = model.layers[i].attention
            fast = attn(x, mask)
            slow = literal_attention(attn, x, mask, gated=gate != "none")
            torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)
            # not vacuous: the causal literal form (LLaMA's, token_mask=None) gives another answer
            q, k, v = (attn.split_heads(w(x), attn.n_heads) for w in (attn.wq, attn.wk, attn.wv))
            pk, pv = attn.adapter.prompt_kv(attn)
            lit = (zero_init_attention_literal(q, k, v, pk, pv, attn.adapter.gate_value()) if gate != "none"
                   else joint_attention_literal(q, k, v, pk, pv))  # token_mask=None: causal
            assert not torch.allclose(attn.wo(lit.transpose(1, 2).flatten(2)), fast, atol=1e-3)


def test_joint_prompt_attention_with_any_mask_equals_one_literal_softmax():
    """The function level: per-query masks of any pattern (each query sees itself)."""
    gen = torch.Generator().manual_seed(0)
    B, H, T, K, d = 2, 3, 6, 4, 8
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))
    pk, pv = torch.randn(1, H, K, d, generator=gen), torch.randn(1, H, K, d, generator=gen)
    mask = (torch.rand(B, 1, T, T, generator=gen) > 0.4) | torch.eye(T, dtype=torch.bool)
    token_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fast = token_out + joint_prompt_attention(q, pk, pv, k, token_out, token_mask=mask)
    torch.testing.assert_close(fast, joint_attention_literal(q, k, v, pk, pv, token_mask=mask), atol=1e-5, rtol=1e-5)
    gate = torch.rand(1, H, 1, 1, generator=gen)
    two_softmaxes = zero_init_attention_literal(q, k, v, pk, pv, gate, token_mask=mask)
    from adapterlab.adapter import gated_prompt_attention
    torch.testing.assert_close(token_out + gated_prompt_attention(q, pk, pv, gate), two_softmaxes, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- bidirectional, padding
def test_text_attention_is_bidirectional_and_blind_to_padding():
    model = tiny_text()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, gate="head"))
    open_gates_(model)
    tokens, mask = tokens_and_mask(padded=True)
    with torch.no_grad():
        out = model(tokens, mask)
        later = tokens.clone()
        later[0, -1] = (later[0, -1] + 1) % VOCAB  # a later token changes earlier outputs (no causal mask)
        assert not torch.allclose(model(later, mask)[0, 0], out[0, 0], atol=1e-4)
        pads = tokens.clone()
        pads[~mask] = (pads[~mask] + 7) % VOCAB  # what sits under padding changes nothing real
        torch.testing.assert_close(model(pads, mask)[mask], out[mask], atol=1e-5, rtol=1e-5)
        shorter = model(tokens[2:, :4])  # the padded row alone, without its padding
        torch.testing.assert_close(shorter[0], out[2, :4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["head", "none"])
def test_padding_does_not_leak_through_the_prompts(gate):
    model = tiny_text()
    attach(model, gate, prompt_len=4, layers=3)
    if gate != "none":
        open_gates_(model)
    tokens, mask = tokens_and_mask(padded=True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[1:2, :7])[0], model(tokens, mask)[1, :7], atol=1e-5, rtol=1e-5)


def test_bad_text_inputs_are_clear():
    model = tiny_text()
    tokens, mask = tokens_and_mask(padded=True)
    with pytest.raises(ValueError, match="mask must have the tokens' shape"):
        model(tokens, mask[:, :5])
    with pytest.raises(ValueError, match="at least one real token"):
        model(tokens, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(17, dtype=torch.long))


def test_bad_pictures_are_clear():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"\(batch, 3, 16, 16\)"):
        model(torch.rand(2, 16, 16, 3))
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_bad_configs_are_clear():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ViTConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoderConfig(vocab_size=0)


# ---------------------------------------------------------------------------- gradients
def loss_of(model, padded: bool = False) -> torch.Tensor:
    out = run(model, padded)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return ((out - target) ** 2).mean()


def grads_by_name(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,padded", CASES)
@pytest.mark.parametrize("gate", ["head", "layer", "none"])
def test_gradients_reach_every_prompt_and_gate_and_nothing_frozen(family, padded, gate):
    model = make(family)
    attach(model, gate, prompt_len=4, layers=2)
    if gate != "none":
        open_gates_(model)
    loss_of(model, padded).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"layers.{i}.attention.adapter.{w}" for i in (1, 2) for w in ("prompt", "gate")
                if not (w == "gate" and gate == "none")}
    assert trainable == expected
    for name, grad in grads_by_name(model).items():
        if name in trainable:
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("family", ["vit", "text"])
def test_the_gate_opens_first_then_the_prompts_learn(family):
    """At the zero-init start the prompts' gradient is exactly 0 (it passes through the gate), the gate's is not."""
    model = make(family)
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, gate="head"))
    loss_of(model, padded=True).backward()
    for i in (1, 2):
        ap = model.layers[i].attention.adapter
        assert torch.count_nonzero(ap.prompt.grad) == 0
        assert torch.count_nonzero(ap.gate.grad) == ap.gate.numel()


def test_gate_log_records_encoder_gates(tmp_path):
    from adapterlab.gates import GateRecorder, read_gates

    model = tiny_vit()
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, gate="head"))
    recorder = GateRecorder(tmp_path, every=1, plot=False)
    recorder.on_start({"model": model, "start_step": 0, "total_steps": 1, "resumed": False})
    open_gates_(model)
    recorder.on_step(1, {"model": model, "epoch": 1.0, "loss": 0.5, "lr": 1e-3, "total_steps": 1})
    records = read_gates(tmp_path / "gates.jsonl")
    assert [r["layers"] for r in records] == [[1, 2], [1, 2]]
    assert torch.equal(torch.tensor(records[0]["gates"]), torch.zeros(2, 4))
    torch.testing.assert_close(torch.tensor(records[1]["gates"]), gate_values(model))


# ---------------------------------------------------------------------------- input prompts (shallow)
@pytest.mark.parametrize("family,padded", CASES)
def test_input_prompts_keep_shapes_change_the_output_and_learn(family, padded):
    model = make(family)
    with torch.no_grad():
        base = run(model, padded)
    add_input_prompts(model, 3, seed=1)
    assert count_trainable(model) == 3 * model.config.dim
    out = run(model, padded)
    assert out.shape == base.shape
    assert not torch.allclose(out, base, atol=1e-3)
    loss_of(model, padded).backward()
    grad = model.input_prompts.grad
    assert grad is not None and torch.count_nonzero(grad) == grad.numel()
    assert all(p.grad is None for n, p in model.named_parameters() if n != "input_prompts")
    model.input_prompts = None  # removed: the encoder is itself again
    with torch.no_grad():
        assert torch.equal(run(model, padded), base)


def test_input_prompts_see_no_padding_and_the_vit_feature_is_the_cls_state():
    model = tiny_text()
    add_input_prompts(model, 3)
    tokens, mask = tokens_and_mask(padded=True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[2:, :4])[0], model(tokens, mask)[2, :4], atol=1e-5, rtol=1e-5)
    vit = tiny_vit()
    add_input_prompts(vit, 2)
    x = images()
    h = vit.embed(x)
    assert h.shape == (3, 1 + 2 + 16, 32)
    assert torch.equal(h[:, 1:3], vit.input_prompts.expand(3, -1, -1))  # after CLS, in front of the patches
    for layer in vit.layers:
        h = layer(h)
    assert torch.equal(vit.features(x), vit.norm(h[:, 0]))


def test_deterministic_initialisation_and_heads():
    a, b = (init_encoder_weights(ViT(ViTConfig(dim=32, n_layers=2, n_heads=4, mlp_hidden=64)), seed=3) for _ in range(2))
    c = init_encoder_weights(ViT(ViTConfig(dim=32, n_layers=2, n_heads=4, mlp_hidden=64)), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["pos_embedding"], sc["pos_embedding"])
    assert torch.equal(sa["layers.0.attention.wq.bias"], torch.zeros(32))
    set_head(a, 7, seed=1)
    assert a.head.out_features == 7 and torch.equal(a.head.bias, torch.zeros(7))
    assert 0.01 < a.head.weight.std().item() < 0.03


# ---------------------------------------------------------------------------- files
@pytest.mark.parametrize("family", ["vit", "text"])
def test_save_and_load_round_trip_exactly(family, tmp_path):
    model = make(family)
    set_head(model, 3, seed=2)
    with torch.no_grad():
        model.head.bias.normal_()
        before = run(model, padded=True)
    add_adapter(model, AdapterConfig(prompt_len=4, layers=1))  # left out of the base's file
    save_encoder(model, tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["kind"] == family and config["head_out"] == 3 and config["n_layers"] == 3
    loaded = load_encoder(tmp_path / "enc")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert adapted_layers(loaded) == []
    with torch.no_grad():
        assert torch.equal(run(loaded, padded=True), before)
    assert not list((tmp_path / "enc").glob(".*.tmp"))


def test_loading_a_missing_or_foreign_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text('{"kind": "vit"}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_encoder(tmp_path / "half")
    save_encoder(tiny_vit(), tmp_path / "clip")
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(ValueError, match="not an adapterlab encoder"):
        load_encoder(tmp_path / "clip")
