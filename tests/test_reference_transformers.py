"""References nobody here wrote: transformers' LlamaForCausalLM and PEFT's adaption prompt.

Same random weights -> load_llama (HF folder single/sharded, Meta folder with 2 shards)
-> logits within 1e-5 of transformers in fp32. A PEFT adaption-prompt adapter with non-zero
gates -> load_adapter -> logits within 1e-5 of PEFT's, and the same greedy tokens.
Run with ``pytest -s`` to see the measured differences.
"""
import json

import pytest
import torch

pytest.importorskip("transformers")

from conftest import make_hf_llama, random_tokens  # noqa: E402

from adapterlab import load_adapter, load_llama  # noqa: E402
from adapterlab.generate import generate_tokens  # noqa: E402

TOL = 1e-5

CONFIGS = {  # name -> make_hf_llama arguments
    "mha": dict(dim=64, n_layers=3, n_heads=4),
    "gqa_theta5e5": dict(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, rope_theta=500000.0, seed=1),
    "tied": dict(dim=32, n_layers=2, n_heads=2, vocab_size=96, tied=True, seed=2),
}


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(input_ids=tokens).logits.float()


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def report(label, ours, ref):
    diff = (ours - ref).abs().max().item()
    print(f"\n[{label}] max |logits - reference| = {diff:.3e}  (logits std {ref.std().item():.2f})")
    assert ref.std() > 0.1, "reference logits are nearly constant: the test would be trivial"
    return diff


# --------------------------------------------------------------------------- HF folders
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_folder_matches_transformers(tmp_path, name, sharded):
    hf = make_hf_llama(**CONFIGS[name])
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "50GB")
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_llama(tmp_path, device="cpu", dtype=torch.float32)
    assert model.tokenizer is None
    tokens = random_tokens(2, 13, hf.config.vocab_size)
    diff = report(f"HF {name} {'sharded' if sharded else 'single'}", our_logits(model, tokens), hf_logits(hf, tokens))
    assert diff <= TOL


# --------------------------------------------------------------------------- Meta folders
def meta_rows_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Written independently of io.weights.hf_to_meta_rows: an explicit index per row.
    Meta row h*d + 2i + c holds HF row h*d + c*d/2 + i (c = 0, 1: the two halves of rotary pair i)."""
    d = w.shape[0] // n_heads
    index = torch.empty(w.shape[0], dtype=torch.long)
    for h in range(n_heads):
        for i in range(d // 2):
            for c in range(2):
                index[h * d + 2 * i + c] = h * d + c * (d // 2) + i
    return w[index]


HF_TO_META = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def write_meta_folder(hf, folder, n_shards=2, vocab_size_in_params=None):
    """Write hf's weights as Meta does: params.json + consolidated.NN.pth split for model parallelism."""
    c = hf.config
    state = {"tok_embeddings.weight": hf.model.embed_tokens.weight, "norm.weight": hf.model.norm.weight,
             "output.weight": hf.lm_head.weight}
    for i, layer in enumerate(hf.model.layers):
        for hf_name, meta_name in HF_TO_META.items():
            w = layer.get_submodule(hf_name).weight.detach()
            if hf_name == "self_attn.q_proj":
                w = meta_rows_from_hf(w, c.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                w = meta_rows_from_hf(w, c.num_key_value_heads)
            state[f"layers.{i}.{meta_name}.weight"] = w
    column, row = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")
    shards = [{"rope.freqs": torch.randn(8)} for _ in range(n_shards)]  # LLaMA-1 shards carry this; ignored
    for name, w in state.items():
        kind = name.split(".")[-2]
        w = w.detach().clone()
        parts = w.chunk(n_shards, 0) if kind in column else w.chunk(n_shards, 1) if kind in row else [w] * n_shards
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    folder.mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "multiple_of": 32, "ffn_dim_multiplier": None,
              "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"],
              "vocab_size": c.vocab_size if vocab_size_in_params is None else vocab_size_in_params}
    (folder / "params.json").write_text(json.dumps(params))
    return folder


@pytest.mark.parametrize("name", ["mha", "gqa_theta5e5"])
def test_meta_folder_with_two_shards_matches_transformers(tmp_path, name):
    hf = make_hf_llama(**CONFIGS[name])
    # vocab_size -1 (as LLaMA-1's params.json) for one of them: taken from the embedding.
    folder = write_meta_folder(hf, tmp_path / "meta", n_shards=2, vocab_size_in_params=-1 if name == "mha" else None)
    model = load_llama(folder, device="cpu", dtype=torch.float32)
    assert model.config.vocab_size == hf.config.vocab_size
    tokens = random_tokens(2, 13, hf.config.vocab_size)
    diff = report(f"Meta 2 shards {name}", our_logits(model, tokens), hf_logits(hf, tokens))
    assert diff <= TOL


# --------------------------------------------------------------------------- PEFT adaption prompt
def peft_model_with_open_gates(hf, adapter_len, adapter_layers, seed=5):
    import peft

    config = peft.AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, config).eval()
    gen = torch.Generator().manual_seed(seed)
    n_gates = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("adaption_gate"):  # zero at init: make the adapter matter
                p.copy_(torch.randn(p.shape, generator=gen))
                n_gates += 1
    assert n_gates == adapter_layers
    return pm


@pytest.mark.parametrize("name", ["mha", "gqa_theta5e5"])
def test_peft_adaption_prompt_matches(tmp_path, name):
    pytest.importorskip("peft")
    hf = make_hf_llama(**CONFIGS[name])
    hf.save_pretrained(tmp_path / "base")
    tokens = random_tokens(2, 11, hf.config.vocab_size)
    base_logits = hf_logits(hf, tokens)

    pm = peft_model_with_open_gates(hf, adapter_len=5, adapter_layers=2)
    pm.save_pretrained(tmp_path / "peft")
    ref = hf_logits(pm, tokens)
    assert (ref - base_logits).abs().max() > 1e-2, "the PEFT adapter does not change the output"

    model = load_llama(tmp_path / "base", device="cpu", dtype=torch.float32)
    load_adapter(model, tmp_path / "peft")
    assert model.adapter_config.gate == "layer" and model.adapter_config.gate_activation == "identity"
    assert [i for i, l in enumerate(model.layers) if l.attention.adapter is not None] == [1, 2]
    diff = report(f"PEFT adaption prompt {name}", our_logits(model, tokens), ref)
    assert diff <= TOL

    # Cached generation (prompt K/V once) gives PEFT's greedy tokens (PEFT recomputes them every step).
    pm.generation_config.eos_token_id = None
    pm.generation_config.pad_token_id = 0
    with torch.no_grad():
        hf_out = pm.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8,
                             do_sample=False)[:, tokens.shape[1]:]
    ours = generate_tokens(model, tokens.tolist(), max_new_tokens=8, greedy=True, stop_at_eos=False)
    print(f"[PEFT generate {name}] ours {ours[0]} | PEFT {hf_out[0].tolist()}")
    assert ours == hf_out.tolist()
