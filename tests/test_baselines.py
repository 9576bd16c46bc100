"""Baselines for Table 3: LoRA (checked against PEFT's LoRA) and full fine-tuning, through train()."""
import pytest
import torch

from conftest import make_hf_llama, make_tiny_model, random_tokens

from adapterlab.adapter import count_trainable, gate_values
from adapterlab.studies.baselines import (
    METHODS, LoRAConfig, add_lora, load_lora, lora_modules, lora_param_count, lora_state_dict, merge_lora, prepare,
    prepare_full_finetune, remove_lora, save_lora,
)
from adapterlab.data import TokenDataset
from adapterlab.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def fill_B_(model, seed=7, scale=0.5):
    """LoRA's B starts at zero: give it random values so the branch matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(scale * torch.randn(m.lora_B.shape, generator=gen))
    return model


# --------------------------------------------------------------------------- LoRA: the math
def test_lora_is_exactly_the_base_at_init(tiny_model):
    tokens = random_tokens()
    with torch.no_grad():
        before = tiny_model(tokens)
        add_lora(tiny_model, rank=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
        after = tiny_model(tokens)
    assert torch.equal(before, after)
    assert all(m.lora_A.abs().sum() > 0 for m in lora_modules(tiny_model).values())  # A random, B zero


def test_lora_matches_peft(tmp_path):
    """Same base, same A and B -> our logits equal PEFT's LoRA on transformers' Llama."""
    peft = pytest.importorskip("peft")
    from adapterlab import load_llama
    from adapterlab.io.weights import hf_to_meta_rows

    hf = make_hf_llama(dim=64, n_layers=3, n_heads=4)
    hf.save_pretrained(tmp_path / "base")
    ours = load_llama(tmp_path / "base", device="cpu", dtype=torch.float32)
    r, alpha = 4, 8
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, task_type="CAUSAL_LM")).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # zero at init: make the update matter
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    add_lora(ours, rank=r, alpha=alpha, targets=("wq", "wv"))
    with torch.no_grad():
        for i, layer in enumerate(pm.base_model.model.model.layers):
            for hf_name, ours_lin in (("q_proj", ours.layers[i].attention.wq), ("v_proj", ours.layers[i].attention.wv)):
                lin = getattr(layer.self_attn, hf_name)
                A, B = lin.lora_A["default"].weight, lin.lora_B["default"].weight
                if hf_name == "q_proj":  # HF permutes W_q's rows for its rotary layout: B's rows too
                    B = hf_to_meta_rows(B, 4)
                ours_lin.lora_A.copy_(A)
                ours_lin.lora_B.copy_(B)
    tokens = random_tokens(2, 11, 128)
    with torch.no_grad():
        ref = pm(input_ids=tokens).logits.float()
        got = ours(tokens)
        with pm.disable_adapter():
            base = pm(input_ids=tokens).logits.float()
    assert (ref - base).abs().max() > 1e-2, "the PEFT LoRA does not change the output: the test would be trivial"
    diff = (got - ref).abs().max().item()
    print(f"\n[PEFT LoRA] max |logits - PEFT| = {diff:.3e}")
    assert diff <= 1e-5


def test_gradients_reach_every_lora_tensor_and_nothing_else(tiny_model):
    add_lora(tiny_model, rank=2, targets=("wq", "wv", "w2"), layers=2)
    fill_B_(tiny_model)
    tiny_model(random_tokens()).square().mean().backward()
    lora = {n for n, _ in tiny_model.named_parameters() if ".lora_" in n}
    assert len(lora) == 2 * 3 * 2  # A and B, 3 targets, top 2 layers
    for n, p in tiny_model.named_parameters():
        if n in lora:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert {n.split(".")[1] for n in lora} == {"1", "2"}


def test_merge_equals_unmerged_and_remove_restores_the_base(model_factory):
    tokens = random_tokens()
    model = model_factory()
    with torch.no_grad():
        base = model(tokens)
        add_lora(model, rank=4, targets=("wq", "wv", "w1"))
        fill_B_(model)
        unmerged = model(tokens)
    assert (unmerged - base).abs().max() > 1e-2
    keys_before = set(model_factory().state_dict())
    merge_lora(model)
    assert not lora_modules(model) and set(model.state_dict()) == keys_before
    with torch.no_grad():
        assert torch.allclose(model(tokens), unmerged, atol=1e-5)

    model = model_factory()
    add_lora(model, rank=4)
    fill_B_(model)
    remove_lora(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), base)
    assert count_trainable(model) == 0


def test_trainable_count_formula(model_factory):
    model = model_factory(n_kv_heads=2)  # grouped-query: W_k, W_v are narrower
    c = model.config
    add_lora(model, rank=3, targets=("wq", "wv", "w2"), layers=2)
    r, kv = 3, c.n_kv_heads * c.head_dim
    expected = 2 * r * ((c.dim + c.dim) + (c.dim + kv) + (c.ffn_hidden_dim + c.dim))
    assert count_trainable(model) == expected == lora_param_count(model.lora_config, c)
    assert sum(v.numel() for v in lora_state_dict(model).values()) == expected
    # Alpaca-LoRA in the paper's Table 3: r=8 on W_q, W_v of LLaMA-7B -> 4.2M.
    from adapterlab import LlamaConfig
    assert lora_param_count(LoRAConfig(rank=8, targets=("wq", "wv")), LlamaConfig()) == 4_194_304


def test_bad_lora_settings_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="targets"):
        add_lora(tiny_model, targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_model, rank=0)
    with pytest.raises(ValueError, match="layers"):
        add_lora(tiny_model, layers=9)
    with pytest.raises(ValueError, match="layer indices"):
        add_lora(tiny_model, layers=[0, 5])
    add_lora(tiny_model)
    with pytest.raises(ValueError, match="already"):
        add_lora(tiny_model)
    with pytest.raises(ValueError, match="method"):
        prepare(tiny_model, "prefix")


def test_save_and_load_lora(model_factory, tmp_path):
    tokens = random_tokens()
    model = fill_B_(add_lora(model_factory(), rank=2, layers=[0, 2]))
    save_lora(model, tmp_path / "lora")
    other = load_lora(model_factory(), tmp_path / "lora")
    assert other.lora_config == model.lora_config
    with torch.no_grad():
        assert torch.equal(other(tokens), model(tokens))


def test_full_finetune_trains_everything(tiny_model):
    prepare_full_finetune(tiny_model)
    assert count_trainable(tiny_model) == tiny_model.num_params()
    assert gate_values(tiny_model).shape == (0, tiny_model.config.n_heads)  # no adapter: no gates, no crash


# --------------------------------------------------------------------------- one loop for all three
def toy_dataset(n=16, vocab=128, seed=1):
    """Random prompts, a fixed response (easy to learn even on a random base), prompt masked."""
    gen = torch.Generator().manual_seed(seed)
    tokens, labels = [], []
    for _ in range(n):
        prompt = [1] + torch.randint(3, vocab, (int(torch.randint(4, 10, (1,), generator=gen)),), generator=gen).tolist()
        response = [5, 6, 7, 2]
        tokens.append(prompt + response)
        labels.append([-100] * len(prompt) + response)
    return TokenDataset(tokens, labels)


@pytest.mark.parametrize("method", METHODS)
def test_train_reduces_the_loss_for_every_method(model_factory, tmp_path, method):
    model = model_factory()
    kw = {"zero_init": dict(prompt_len=4, layers=2), "lora": dict(rank=4), "full": {}}[method]
    prepare(model, method, **kw)
    lr = {"zero_init": 5e-2, "lora": 1e-2, "full": 1e-3}[method]
    config = TrainConfig(steps=20, batch_size=8, lr=lr, progress=False, out_dir=str(tmp_path), log_every=5)
    losses = []
    m = train(model, toy_dataset(), config, callbacks=[lambda step, info: losses.append(info["loss"])])
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, (method, losses)
    assert m["trainable_params"] == count_trainable(model)
    assert not (tmp_path / "gates.jsonl").exists()  # train() records gates only when given a GateRecorder


# --------------------------------------------------------------------------- the command line
def finetune_args(small_base, out, *extra):
    return ["finetune", "--base", str(small_base / "base"), "--data", str(small_base / "alpaca.json"),
            "--out", str(out), "--steps", "4", "--batch-size", "8", "--log-every", "2", "--no-progress", *extra]


def test_cli_finetune_lora_and_full(small_base, tmp_path, capsys):
    import json

    from adapterlab import load_llama
    from adapterlab.cli import main

    out = tmp_path / "lora"
    assert main(finetune_args(small_base, out, "--method", "lora", "--lora-rank", "2", "--lr", "0.01")) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "lora" and m["trainable_params"] == 2 * 2 * 2 * (32 + 32)  # layers * (q, v) * r (in + out)
    assert {"lora.safetensors", "lora_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "gates.jsonl").exists() and "no gate summary" in text
    base = load_llama(small_base / "base", device="cpu")
    load_lora(base, out)
    assert lora_modules(base) and lora_state_dict(base)["layers.0.attention.wq.lora_B"].abs().sum() > 0
    # generate --adapter reads the LoRA folder too, and answers as the tuned model does
    assert main(["generate", "--base", str(small_base / "base"), "--adapter", str(out), "--prompt", "Alice",
                 "--greedy", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    from adapterlab.generate import generate

    expected = generate(base, None, ["Alice"], max_new_tokens=5, greedy=True, stop_at_eos=False)[0].strip()
    assert expected and f">>> Alice\n{expected}\n" in printed

    out = tmp_path / "full"
    assert main(finetune_args(small_base, out, "--method", "full", "--lr", "1e-3")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "full" and m["trainable_params"] == m["base_params"] and m["trainable_fraction"] == 1.0
    tuned, base = load_llama(out, device="cpu"), load_llama(small_base / "base", device="cpu")
    assert not torch.equal(tuned.output.weight, base.output.weight)  # a new base, readable by load_llama


def test_cli_method_flags_are_checked(small_base, tmp_path, capsys):
    from adapterlab.cli import main

    for extra, needle in ((("--method", "full"), "--lr: full fine-tuning on this base needs a learning rate"),
                          (("--method", "lora", "--prompt-len", "4", "--lr", "0.01"), "--prompt-len do"),
                          (("--lora-rank", "4"), "--lora-rank do"),
                          (("--method", "lora", "--lora-targets", "q_proj", "--lr", "0.01"), "--lora-targets")):
        assert main(finetune_args(small_base, tmp_path / "a", *extra)) == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "a").exists()
