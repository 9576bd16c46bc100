"""Gated prompts on a Hugging Face CLIP vision tower: bit-identical at init, Eq. 7 == its literal
form on CLIP's own projections, gradients, and clear errors for folders that are not CLIP's."""
import json

import pytest
import torch

from adapterlab.adapter import AdapterConfig, zero_init_attention_literal
from adapterlab.studies.variants import add_ungated_prompts, joint_attention_literal
from conftest import randomize_
from adapterlab.encoders.clip import (
    GatedCLIPAttention,
    add_clip_prompts,
    clip_adapted_layers,
    clip_encoder_layers,
    clip_gate_values,
    load_clip_vision,
    remove_clip_prompts,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip_config():
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPVisionModel saved as transformers saves it. Every weight random, biases
    included (transformers starts them at 0, which would hide a bias added where it does not belong)."""
    model = randomize_(transformers.CLIPVisionModel(tiny_clip_config()), seed=0)
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    return folder


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def open_gates_(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in clip_adapted_layers(model):
            gate = clip_encoder_layers(model)[i].self_attn.adapter.gate
            gate.copy_(torch.randn(gate.shape, generator=gen))
    return model


@pytest.mark.parametrize("gate,layers", [("head", 2), ("layer", 1)])
def test_prompts_leave_the_output_bit_identical_at_init(clip_folder, gate, layers):
    model = load_clip_vision(clip_folder)
    with torch.no_grad():
        before = model(pixel_values=pixels())
        add_clip_prompts(model, AdapterConfig(prompt_len=4, layers=layers, gate=gate))
        after = model(pixel_values=pixels())
    assert clip_adapted_layers(model) == list(range(2 - layers, 2))
    assert torch.equal(after.last_hidden_state, before.last_hidden_state)
    assert torch.equal(after.pooler_output, before.pooler_output)
    assert torch.equal(clip_gate_values(model), torch.zeros(layers, 2))
    open_gates_(model)
    with torch.no_grad():
        opened = model(pixel_values=pixels())
    assert not torch.allclose(opened.pooler_output, before.pooler_output, atol=1e-3)  # the gates reach the output
    remove_clip_prompts(model)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels()).pooler_output, before.pooler_output)
    assert set(model.state_dict()) == set(load_clip_vision(clip_folder).state_dict())


@pytest.mark.parametrize("gate", ["head", "layer", "none"])
def test_the_wrapped_attention_is_eq7_on_clips_own_projections(clip_folder, gate):
    """The adapted layer == the literal form (one score matrix; two softmaxes, or one when ungated),
    built from CLIP's q/k/v projections, the prompts through k_proj and v_proj, then out_proj."""
    if gate == "none":  # the ungated study variant (studies.variants)
        model = add_ungated_prompts(load_clip_vision(clip_folder), AdapterConfig(prompt_len=4, layers=2))
    else:
        model = add_clip_prompts(load_clip_vision(clip_folder), AdapterConfig(prompt_len=4, layers=2, gate=gate))
    if gate != "none":
        open_gates_(model)
    wrapped = clip_encoder_layers(model)[1].self_attn
    assert isinstance(wrapped, GatedCLIPAttention)
    attn, prompt = wrapped.attention, wrapped.adapter.prompt
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(2))  # CLS + 16 patches
    with torch.no_grad():
        fast, _ = wrapped(x)
        heads = lambda t: t.unflatten(-1, (2, 16)).transpose(1, 2)  # (B, T, C) -> (B, H, T, d)
        q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
        pk, pv = heads(attn.k_proj(prompt[None])), heads(attn.v_proj(prompt[None]))
        everyone = torch.ones(1, 1, 17, 17, dtype=torch.bool)
        if gate == "none":
            slow = joint_attention_literal(q, k, v, pk, pv, token_mask=everyone)
        else:
            slow = zero_init_attention_literal(q, k, v, pk, pv, wrapped.adapter.gate_value(), token_mask=everyone)
        slow = attn.out_proj(slow.transpose(1, 2).flatten(2))
        torch.testing.assert_close(fast, slow, atol=2e-5, rtol=1e-5)
        assert not torch.allclose(fast, attn(x)[0], atol=1e-3)


def test_gradients_reach_prompts_and_gates_and_nothing_frozen(clip_folder):
    model = add_clip_prompts(load_clip_vision(clip_folder), AdapterConfig(prompt_len=4, layers=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter.prompt" in n or ".adapter.gate" in n for n in trainable)
    assert len(trainable) == 4

    model(pixel_values=pixels()).pooler_output.pow(2).sum().backward()  # at init: the gate opens first
    for name, p in model.named_parameters():
        if name.endswith("adapter.prompt"):
            assert torch.count_nonzero(p.grad) == 0, name
        elif name.endswith("adapter.gate"):
            assert torch.count_nonzero(p.grad) == p.numel(), name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"

    model.zero_grad(set_to_none=True)
    open_gates_(model)
    model(pixel_values=pixels()).pooler_output.pow(2).sum().backward()  # once open, the prompts learn too
    for name in trainable:
        assert torch.count_nonzero(model.get_parameter(name).grad) > 0, name


def test_a_full_clip_model_folder_gives_its_vision_tower(tmp_path):
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=99, max_position_embeddings=16)
    full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(),
                                                          vision_config=tiny_clip_config().to_dict(), projection_dim=16))
    full.save_pretrained(tmp_path / "full")
    vision = load_clip_vision(tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(vision(pixel_values=pixels()).pooler_output,
                           full.vision_model(pixel_values=pixels()).pooler_output)


def test_a_wrong_folder_is_a_clear_error(clip_folder, tmp_path):
    with pytest.raises(ValueError, match=r"nowhere is not a transformers CLIP folder: no such folder.*config\.json"):
        load_clip_vision(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a transformers CLIP folder: it has no config.json"):
        load_clip_vision(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_clip_vision(tmp_path / "llama")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights file.*model.safetensors"):  # also a FileNotFoundError
        load_clip_vision(tmp_path / "no-weights")


def test_bad_configurations_are_refused(clip_folder):
    model = load_clip_vision(clip_folder)
    with pytest.raises(ValueError, match="has 2 layers"):
        add_clip_prompts(model, AdapterConfig(prompt_len=4, layers=3))
    with pytest.raises(ValueError, match="visual_dim"):
        add_clip_prompts(model, AdapterConfig(prompt_len=4, layers=1, visual_dim=8))
    add_clip_prompts(model, AdapterConfig(prompt_len=4, layers=1))
    with pytest.raises(ValueError, match="already has prompts"):
        add_clip_prompts(model, AdapterConfig(prompt_len=4, layers=1))
