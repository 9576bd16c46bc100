"""io/weights.py and io/adapters.py: Meta folders (exact), official release .pth vs literal Eq. 5-8, our adapter
format round trip, the 7B adapter file size, and errors that speak to the user (GGUF files: test_gguf.py)."""
import json
import math

import pytest
import torch

from conftest import make_tiny_model, open_gates_, random_tokens

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter, load_adapter, load_llama, save_adapter
from adapterlab.adapter import adapted_layers, adapter_state_dict, remove_adapter, zero_init_attention_literal
from adapterlab.model import apply_rope, rope_angles
from adapterlab.tokenizer import Tokenizer


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def write_meta(model: Llama, folder, n_shards=1, params_override=None):
    """Our state dict already uses Meta's names: split it the way Meta's model parallelism does."""
    column, row = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")
    shards = [{} for _ in range(n_shards)]
    for name, w in model.state_dict().items():
        kind = name.split(".")[-2]
        parts = w.chunk(n_shards, 0) if kind in column else w.chunk(n_shards, 1) if kind in row else [w] * n_shards
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    folder.mkdir(parents=True, exist_ok=True)
    for k, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    params = {k: v for k, v in model.config.to_dict().items() if k != "max_seq_len"}
    params.update(params_override or {})
    (folder / "params.json").write_text(json.dumps(params))
    return folder


# =========================================================================== Meta folders
@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_folder_round_trip_is_exact(tmp_path, n_shards):
    model = make_tiny_model(n_kv_heads=2)
    folder = write_meta(model, tmp_path / "m", n_shards)
    loaded = load_llama(folder, device="cpu")
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x = random_tokens()
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert loaded.tokenizer is None and not loaded.training


def test_load_llama_dtype_and_tokenizer(tmp_path):
    model = make_tiny_model()
    folder = write_meta(model, tmp_path / "m")
    texts = [f"the {w} number {i} is {i * 7}" for i, w in enumerate(["red", "blue", "green", "big", "small"] * 8)]
    Tokenizer.train(texts, vocab_size=60).save(folder / "tokenizer.model")
    loaded = load_llama(folder, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert isinstance(loaded.tokenizer, Tokenizer) and loaded.tokenizer.eos_id == 2
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the red number", bos=True)) == "the red number"


# =========================================================================== official release .pth
def literal_forward(model: Llama, tokens, prompts: dict, gates: dict, activation=torch.tanh):
    """The whole model with every attention written as Eq. 5-8 (zero_init_attention_literal),
    prompts/gates taken from the raw file: prompts[i] (K, C), gates[i] raw g (``activation``
    applied here: tanh as the release's fine-tuning code, or none as its inference code)."""
    cfg = model.config
    B, T = tokens.shape
    cos, sin = rope_angles(cfg.head_dim, torch.arange(T), cfg.rope_theta)
    rep = cfg.n_heads // cfg.n_kv_heads

    def heads(x, n):
        return x.unflatten(-1, (n, cfg.head_dim)).transpose(1, 2)

    h = model.tok_embeddings(tokens)
    for i, layer in enumerate(model.layers):
        attn, x = layer.attention, layer.attention_norm(h)
        q = apply_rope(heads(attn.wq(x), cfg.n_heads), cos, sin)
        k = apply_rope(heads(attn.wk(x), cfg.n_kv_heads), cos, sin).repeat_interleave(rep, 1)
        v = heads(attn.wv(x), cfg.n_kv_heads).repeat_interleave(rep, 1)
        if i in prompts:
            pk = heads(attn.wk(prompts[i][None]), cfg.n_kv_heads).repeat_interleave(rep, 1)
            pv = heads(attn.wv(prompts[i][None]), cfg.n_kv_heads).repeat_interleave(rep, 1)
            o = zero_init_attention_literal(q, k, v, pk, pv, activation(gates[i]))
        else:
            s = (q @ k.transpose(-2, -1) / math.sqrt(cfg.head_dim)).masked_fill(
                ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            o = s.softmax(-1) @ v
        h = h + attn.wo(o.transpose(1, 2).reshape(B, T, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))


def write_official(path, n_layers, L, K, C, H, seed=0):
    """The release's layout: adapter_query.weight (K*L, C), bottom adapted layer first; a gate
    (1, H, 1, 1) in EVERY layer (the non-adapted ones are unused)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"adapter_query.weight": torch.randn(K * L, C, generator=g)}
    for i in range(n_layers):
        sd[f"layers.{i}.attention.gate"] = torch.randn(1, H, 1, 1, generator=g)
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("n_kv_heads,K,L", [(None, 10, 3), (2, 3, 2)])
def test_official_pth_matches_literal_equations(tmp_path, n_kv_heads, K, L):
    model = make_tiny_model(n_layers=4, n_kv_heads=n_kv_heads)
    C, H, N = model.config.dim, model.config.n_heads, model.config.n_layers
    sd = write_official(tmp_path / "adapter.pth", N, L, K, C, H)
    load_adapter(model, tmp_path / "adapter.pth", prompt_len=None if K == 10 else K)
    cfg = model.adapter_config
    assert (cfg.prompt_len, cfg.layers, cfg.gate, cfg.gate_activation) == (K, L, "head", "tanh")
    assert adapted_layers(model) == list(range(N - L, N))

    # Independent reading of the layout: rows j*K..(j+1)*K belong to layer N-L+j.
    prompts = {N - L + j: sd["adapter_query.weight"][j * K:(j + 1) * K] for j in range(L)}
    gates = {i: sd[f"layers.{i}.attention.gate"] for i in prompts}
    x = random_tokens(2, 9)
    with torch.no_grad():
        ref = literal_forward(model, x, prompts, gates)
        ours = model(x)
        base = literal_forward(model, x, {}, {})
    diff = (ours - ref).abs().max().item()
    print(f"\n[official .pth kv={n_kv_heads} K={K} L={L}] max |logits - literal Eq.5-8| = {diff:.3e}; "
          f"adapter changes logits by {(ref - base).abs().max().item():.3f}")
    assert (ref - base).abs().max() > 1e-2  # the gates are open: the check is not trivial
    assert diff <= 1e-5


def test_official_pth_with_wrong_prompt_len_is_explained(tmp_path):
    model = make_tiny_model(n_layers=4)
    write_official(tmp_path / "a.pth", 4, 2, 3, model.config.dim, model.config.n_heads)  # 6 rows
    with pytest.raises(ValueError, match=r"a\.pth.*6 rows.*prompt_len=10.*prompt_len"):
        load_adapter(model, tmp_path / "a.pth")  # default K = 10 does not divide 6 rows


def test_official_pth_both_forwards_of_the_release(tmp_path):
    """The release trains with tanh(g) and runs inference with g: both are reproducible, they
    differ once the gate is open, and the choice survives save_adapter/load_adapter."""
    N, K, L = 4, 3, 2
    path = tmp_path / "adapter.pth"
    sd = write_official(path, N, L, K, 64, 4)
    prompts = {N - L + j: sd["adapter_query.weight"][j * K:(j + 1) * K] for j in range(L)}
    gates = {i: sd[f"layers.{i}.attention.gate"] for i in prompts}
    x = random_tokens(2, 9)
    out = {}
    for activation, literal in (("tanh", torch.tanh), ("identity", lambda g: g)):
        model = load_adapter(make_tiny_model(n_layers=N), path, prompt_len=K, gate_activation=activation)
        assert model.adapter_config.gate_activation == activation
        with torch.no_grad():
            out[activation] = model(x)
            ref = literal_forward(model, x, prompts, gates, literal)
        assert (out[activation] - ref).abs().max() <= 1e-5, activation
        save_adapter(model, tmp_path / activation)  # the choice is recorded and comes back
        again = load_adapter(make_tiny_model(n_layers=N), tmp_path / activation)
        assert again.adapter_config.gate_activation == activation
        assert torch.equal(logits(again, x), out[activation])
    assert (out["tanh"] - out["identity"]).abs().max() > 1e-2  # open gates: the two forwards differ
    with pytest.raises(ValueError, match=r"identity.*adapter_config\.json.*gate_activation='tanh'.*leave gate_activation unset"):
        load_adapter(make_tiny_model(n_layers=N), tmp_path / "identity", gate_activation="tanh")
    with pytest.raises(ValueError, match=r"gate_activation must be one of \('tanh', 'identity'\).*'sigmoid'"):
        load_adapter(make_tiny_model(n_layers=N), path, gate_activation="sigmoid")


def test_official_training_checkpoint_with_its_namespace_loads_safely(tmp_path):
    """The release's fine-tuning code saves {"model", "optimizer", "epoch", "args": argparse.Namespace}:
    read with weights_only=True (Namespace allowed, nothing else), the adapter is found under "model"."""
    import argparse

    sd = write_official(tmp_path / "adapter.pth", 4, 2, 10, 64, 4)
    frozen = {k: v for k, v in make_tiny_model(n_layers=4).state_dict().items()}  # the base rides along
    torch.save({"model": {**frozen, **sd}, "optimizer": {"state": {}, "param_groups": [{"lr": 9e-3}]}, "epoch": 4,
                "args": argparse.Namespace(batch_size=4, adapter_len=10, adapter_layer=2, output_dir="./out")},
               tmp_path / "checkpoint-4.pth")
    direct = load_adapter(make_tiny_model(n_layers=4), tmp_path / "adapter.pth")
    wrapped = load_adapter(make_tiny_model(n_layers=4), tmp_path / "checkpoint-4.pth")
    for k, v in adapter_state_dict(direct).items():
        assert torch.equal(adapter_state_dict(wrapped)[k], v), k


class NotATensor:  # anything but tensors and the training arguments is refused, never run
    pass


def test_pickled_objects_are_refused_with_the_file_named(tmp_path):
    torch.save({"adapter_query.weight": torch.zeros(20, 64), "extra": NotATensor()}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth holds Python objects other than tensors.*weights_only=True"):
        load_adapter(make_tiny_model(n_layers=4), tmp_path / "odd.pth")


def test_gate_of_wrong_shape_in_a_higher_layer_is_named(tmp_path):
    path = tmp_path / "a.pth"
    sd = write_official(path, 4, 3, 10, 64, 4)
    sd["layers.3.attention.gate"] = torch.zeros(1, 8, 1, 1)  # the top layer, not the first adapted one
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"a\.pth: the number of heads \(the shape of layers\.3\.attention\.gate.*"
                                         r"is \(1, 8, 1, 1\) but the model has \(1, 4, 1, 1\)"):
        load_adapter(make_tiny_model(n_layers=4), path)


@pytest.mark.parametrize("kind", ["official", "ours", "peft"])
@pytest.mark.parametrize("cut", ["empty", "half"])
def test_truncated_adapter_file_is_named(tmp_path, kind, cut):
    model = make_tiny_model(n_layers=4)
    if kind == "official":
        write_official(tmp_path / "adapter.pth", 4, 2, 10, 64, 4)
        target = load_from = tmp_path / "adapter.pth"
    elif kind == "ours":
        donor = add_adapter(make_tiny_model(n_layers=4), AdapterConfig(prompt_len=2, layers=2))
        load_from = save_adapter(donor, tmp_path / "ours")
        target = load_from / "adapter.safetensors"
    else:
        load_from = tmp_path / "peft"
        load_from.mkdir()
        (load_from / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "ADAPTION_PROMPT", "adapter_len": 2, "adapter_layers": 2, "target_modules": "self_attn"}))
        target = load_from / "adapter_model.bin"
        torch.save({f"base_model.model.model.layers.{i}.self_attn.adaption_prompt": torch.zeros(1, 2, 64)
                    for i in (2, 3)}, target)
    data = target.read_bytes()
    target.write_bytes(b"" if cut == "empty" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{target.name} \([\d,]+ bytes\) cannot be read.*empty or cut short.*again"):
        load_adapter(model, load_from)


def test_save_llama_writes_a_meta_folder_that_load_llama_reads_exactly(tmp_path):
    from adapterlab.io.weights import save_llama

    model = add_adapter(make_tiny_model(), AdapterConfig(prompt_len=2, layers=1))  # the adapter is left out
    texts = [f"the {w} number {i} is {i * 7}" for i, w in enumerate(["red", "blue", "green", "big", "small"] * 8)]
    tok = Tokenizer.train(texts, vocab_size=60)
    folder = save_llama(model, tok, tmp_path / "base", extra={"made.json": {"steps": 3}})
    assert sorted(p.name for p in folder.iterdir()) == ["consolidated.00.pth", "made.json", "params.json", "tokenizer.model"]
    assert json.loads((folder / "made.json").read_text()) == {"steps": 3}
    loaded = load_llama(folder, device="cpu")
    assert not adapted_layers(loaded) and loaded.tokenizer.model_proto == tok.model_proto
    remove_adapter(model)
    x = random_tokens()
    assert torch.equal(logits(loaded, x), logits(model, x))


# =========================================================================== our format
@pytest.mark.parametrize("gate,activation", [("head", "tanh"), ("layer", "identity")])
def test_save_load_round_trip_is_bit_identical(tmp_path, gate, activation):
    model = make_tiny_model(n_kv_heads=2)
    add_adapter(model, AdapterConfig(prompt_len=4, layers=2, gate=gate, gate_activation=activation))
    open_gates_(model)
    x = random_tokens()
    expected = logits(model, x)
    folder = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    info = json.loads((folder / "adapter_config.json").read_text())
    assert info["format"] == "adapterlab-adapter" and info["format_version"] == 1
    assert (info["prompt_len"], info["layers"], info["gate"], info["gate_activation"]) == (4, 2, gate, activation)
    assert (info["dim"], info["n_layers"], info["n_heads"], info["adapted_layers"]) == (64, 3, 4, [1, 2])

    # into a fresh base (attach), from the folder and from the .safetensors file
    for source in (folder, folder / "adapter.safetensors"):
        fresh = make_tiny_model(n_kv_heads=2)
        load_adapter(fresh, source)
        for name, t in adapter_state_dict(model).items():
            assert torch.equal(adapter_state_dict(fresh)[name], t), name
        assert torch.equal(logits(fresh, x), expected)

    # into a model that already has a (different-valued) adapter of the same shape (fill)
    other = make_tiny_model(n_kv_heads=2)
    add_adapter(other, AdapterConfig(prompt_len=4, layers=2, gate=gate, gate_activation=activation))
    prompt_param = other.layers[2].attention.adapter.prompt
    load_adapter(other, folder)
    assert other.layers[2].attention.adapter.prompt is prompt_param  # filled in place, not replaced
    assert torch.equal(logits(other, x), expected)


def test_multimodal_adapter_round_trip(tmp_path):
    """The visual projection (Sec. 3.3) travels with the prompts and gates."""
    model = make_tiny_model()
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2, visual_dim=16))
    open_gates_(model)
    with torch.no_grad():
        for p in model.visual_proj.parameters():
            p.copy_(torch.randn(p.shape))
    save_adapter(model, tmp_path / "mm")
    fresh = make_tiny_model()
    load_adapter(fresh, tmp_path / "mm")
    assert fresh.adapter_config.visual_dim == 16
    saved = adapter_state_dict(model)
    assert any(k.startswith("visual_proj.") for k in saved)
    for name, t in saved.items():
        assert torch.equal(adapter_state_dict(fresh)[name], t), name


def test_save_adapter_needs_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="no adapter.*add_adapter"):
        save_adapter(make_tiny_model(), tmp_path / "a")


def test_7b_adapter_file_is_about_4_7_mb(tmp_path):
    """LLaMA-7B shape with the paper's K=10, L=30: 1,228,800 prompt values + 960 gates in fp32."""
    with torch.device("meta"):
        model = Llama(LlamaConfig())  # 7B shape, no memory
    add_adapter(model, AdapterConfig(prompt_len=10, layers=30))
    for i in adapted_layers(model):  # only the adapter gets real (CPU) memory
        model.layers[i].attention.adapter.to_empty(device="cpu")
        torch.nn.init.normal_(model.layers[i].attention.adapter.prompt)
    folder = save_adapter(model, tmp_path / "a7b")
    n_values = sum(t.numel() for t in adapter_state_dict(model).values())
    size = (folder / "adapter.safetensors").stat().st_size
    print(f"\n[7B adapter] {n_values:,} values, file {size:,} bytes = {size / 1e6:.3f} MB ({size / 2**20:.3f} MiB)")
    assert n_values == 10 * 30 * 4096 + 30 * 32
    assert 4.6e6 <= size <= 4.95e6


# =========================================================================== errors that speak
def test_folder_that_is_neither_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"neither a Meta.*params\.json.*config\.json.*notes\.txt"):
        load_llama(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="tinyworld"):
        load_llama(tmp_path / "nope", device="cpu")


def test_missing_meta_shard_is_named(tmp_path):
    folder = write_meta(make_tiny_model(), tmp_path / "m", n_shards=4)
    (folder / "consolidated.02.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"4 shards.*Missing shard\(s\): consolidated\.02\.pth"):
        load_llama(folder, device="cpu")


def test_extra_meta_shard_is_a_count_mismatch(tmp_path):
    folder = write_meta(make_tiny_model(), tmp_path / "m", n_shards=2)
    (folder / "consolidated.02.pth").write_bytes((folder / "consolidated.01.pth").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"2 shards.*Unexpected shard\(s\): consolidated\.02\.pth"):
        load_llama(folder, device="cpu")


def test_missing_hf_shard_is_named(tmp_path):
    pytest.importorskip("transformers")
    from conftest import make_hf_llama

    make_hf_llama(n_layers=2).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_llama(tmp_path, device="cpu")


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder = write_meta(make_tiny_model(), tmp_path / "m", params_override={"multiple_of": 128})
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.w1\.weight has shape \(192, 64\).*expects \(256, 64\)"):
        load_llama(folder, device="cpu")


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    folder = write_meta(make_tiny_model(), tmp_path / "m", params_override={"n_layers": 4})
    with pytest.raises(ValueError, match=r"Missing tensors: layers\.3\..*unexpected tensors: none"):
        load_llama(folder, device="cpu")


def test_adapter_width_mismatch(tmp_path):
    model = make_tiny_model(n_layers=4)
    write_official(tmp_path / "wide.pth", 4, 2, 10, 96, 4)
    with pytest.raises(ValueError, match=r"wide\.pth: the prompt width.*is 96 but the model has 64"):
        load_adapter(model, tmp_path / "wide.pth")


def test_adapter_head_count_mismatch(tmp_path):
    model = make_tiny_model(n_layers=4)
    write_official(tmp_path / "heads.pth", 4, 2, 10, 64, 8)
    with pytest.raises(ValueError, match=r"heads\.pth: the number of heads.*\(1, 8, 1, 1\) but the model has \(1, 4, 1, 1\)"):
        load_adapter(model, tmp_path / "heads.pth")
    # our format records n_heads too
    donor = make_tiny_model(n_heads=8)
    add_adapter(donor, AdapterConfig(prompt_len=2, layers=1))
    save_adapter(donor, tmp_path / "ours")
    with pytest.raises(ValueError, match=r"adapter_config\.json: n_heads is 8 but the model has 4"):
        load_adapter(make_tiny_model(), tmp_path / "ours")


def test_adapter_layer_count_mismatch(tmp_path):
    model = make_tiny_model(n_layers=2)
    write_official(tmp_path / "deep.pth", 4, 3, 10, 64, 4)
    with pytest.raises(ValueError, match=r"deep\.pth: .*3 adapted layers.*n_layers=2"):
        load_adapter(model, tmp_path / "deep.pth")
    # a PEFT folder whose adapter_layers exceeds the model's depth
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 3, "target_modules": "self_attn"}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: adapter_layers is 3 but the model has n_layers=2"):
        load_adapter(model, peft_dir)
    # our format saved from a deeper model
    donor = make_tiny_model(n_layers=4)
    add_adapter(donor, AdapterConfig(prompt_len=2, layers=2))
    save_adapter(donor, tmp_path / "ours")
    with pytest.raises(ValueError, match=r"n_layers is 4 but the model has 2"):
        load_adapter(model, tmp_path / "ours")


def test_loading_over_a_different_adapter_is_refused(tmp_path):
    donor = make_tiny_model()
    add_adapter(donor, AdapterConfig(prompt_len=4, layers=2))
    save_adapter(donor, tmp_path / "a")
    model = make_tiny_model()
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2))
    with pytest.raises(ValueError, match="already carries an adapter.*remove_adapter"):
        load_adapter(model, tmp_path / "a")
    remove_adapter(model)
    load_adapter(model, tmp_path / "a")
    assert model.adapter_config.prompt_len == 4


def test_unknown_adapter_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an adapter this package reads.*x.bin"):
        load_adapter(make_tiny_model(), tmp_path / "x.bin")
