"""The notebooks' automatic checkers (adapterlab.exercises) and the notebooks' shape.

A checker must accept the right answer (computed here independently, from a model or a
formula), reject the usual mistakes with feedback that names them, and never raise on a
blank or broken answer (a blank exercise cell must still run under nbval).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from adapterlab import AdapterConfig, KVCache, Llama, LlamaConfig, add_adapter
from adapterlab.adapter import count_trainable, zero_init_attention_literal
from adapterlab.exercises import (
    CheckResult,
    check_accumulation_steps,
    check_adapter_param_count,
    check_kv_cache_bytes,
    check_llama_param_count,
    check_rmsnorm,
    check_gqa_adapter_param_count,
    check_squad_f1,
    check_step0_gradients,
    check_adapted_layers,
    check_hf_to_meta_rows,
    check_most_open_layer,
    check_multimodal_param_count,
    check_target_token_count,
    check_training_state_bytes,
    check_uniform_loss,
    check_zero_init_attention,
    llama_param_count,
)

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def meta_params(config: LlamaConfig, adapter: AdapterConfig | None = None, trainable: bool = False) -> int:
    with torch.device("meta"):
        model = Llama(config)
    if adapter is not None:
        add_adapter(model, adapter)
    return count_trainable(model) if trainable else model.num_params()


def assert_wrong(result: CheckResult, *phrases: str) -> None:
    assert isinstance(result, CheckResult)
    assert not result, f"a wrong answer was accepted: {result!r}"
    text = repr(result)
    assert text.startswith("Not yet:"), text
    for phrase in phrases:
        assert phrase.lower() in text.lower(), f"feedback {text!r} does not mention {phrase!r}"


# --------------------------------------------------------------------------- blank answers
@pytest.mark.parametrize("checker", [
    check_rmsnorm, check_llama_param_count, check_kv_cache_bytes, check_zero_init_attention,
    check_adapter_param_count, check_step0_gradients, check_uniform_loss, check_adapted_layers,
    check_hf_to_meta_rows, check_multimodal_param_count, check_accumulation_steps, check_squad_f1,
    check_gqa_adapter_param_count,
])
@pytest.mark.parametrize("blank", [None, ...])
def test_blank_answer_asks_for_one_and_does_not_raise(checker, blank):
    result = checker(blank)
    assert not result and repr(result).startswith("No answer yet")


# --------------------------------------------------------------------------- RMSNorm
def rmsnorm_by_hand(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rmsnorm_accepts_correct_function():
    assert check_rmsnorm(rmsnorm_by_hand)


@pytest.mark.parametrize("wrong, phrase", [
    (lambda x, w, e: torch.nn.functional.layer_norm(x, x.shape[-1:], w, None, e), "LayerNorm"),
    (lambda x, w, e: x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + e), "weight"),
    (lambda x, w, e: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + e) * w, "inside the square root"),
    (lambda x, w, e: x / x.pow(2).mean(-1, keepdim=True).sqrt() * w, "eps is missing"),
    (lambda x, w, e: x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + e) * w, "mean"),
    (lambda x, w, e: x / torch.sqrt(x.pow(2).mean(0, keepdim=True) + e) * w, "wrong dimension"),
    (lambda x, w, e: x[..., :4], "shape"),
    (lambda x, w, e: None, "returned None"),
    (lambda x, w, e: 1 / 0, "ZeroDivisionError"),
    (lambda x, w, e: x * 2, "wrong values"),
])
def test_rmsnorm_names_the_mistake(wrong, phrase):
    assert_wrong(check_rmsnorm(wrong), phrase)


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("config", [
    LlamaConfig(dim=5120, n_layers=40, n_heads=40),  # LLaMA-13B (the exercise)
    LlamaConfig(),  # LLaMA-7B
    LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32),  # grouped-query
])
def test_llama_param_count_matches_the_model(config):
    truth = meta_params(config)
    assert llama_param_count(config) == truth
    assert check_llama_param_count(truth, config)
    assert check_llama_param_count(f"{truth:,}", config)  # "13,015,864,320" as text is fine


def test_llama_13b_is_the_published_size():
    assert check_llama_param_count(13_015_864_320)


@pytest.mark.parametrize("variant, phrase", [
    (dict(tied_embeddings=True), "not tied"),
    (dict(norms=False), "RMSNorm"),
    (dict(ffn_hidden=4 * 5120), "2/3"),
    (dict(ffn_matrices=2), "three"),
])
def test_llama_param_count_names_the_mistake(variant, phrase):
    config = LlamaConfig(dim=5120, n_layers=40, n_heads=40)
    assert_wrong(check_llama_param_count(llama_param_count(config, **variant), config), phrase)


def test_llama_param_count_gqa_mistake():
    config = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32)
    assert_wrong(check_llama_param_count(llama_param_count(config, kv_heads=4), config), "n_kv_heads")


def test_llama_param_count_rejects_rounded_and_odd_answers():
    assert_wrong(check_llama_param_count(13e9), "within 1%")
    assert_wrong(check_llama_param_count(13.5), "whole number")
    assert_wrong(check_llama_param_count("thirteen billion"), "number")
    assert_wrong(check_llama_param_count(7_000_000), "far from")


def test_kv_cache_bytes():
    cache = KVCache(LlamaConfig(), batch_size=1, max_len=2048, device="meta", dtype=torch.float16)
    truth = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert truth == 2**30  # 1 GiB for LLaMA-7B at 2048 tokens in fp16
    assert check_kv_cache_bytes(truth)
    assert_wrong(check_kv_cache_bytes(truth // 2), "only the keys")
    assert_wrong(check_kv_cache_bytes(truth // 32), "one layer")
    assert_wrong(check_kv_cache_bytes(truth * 2), "fp32")
    gqa = LlamaConfig(n_kv_heads=8)
    gqa_cache = KVCache(gqa, batch_size=1, max_len=2048, device="meta", dtype=torch.float16)
    gqa_truth = sum(t.numel() * t.element_size() for t in gqa_cache.k + gqa_cache.v)
    assert check_kv_cache_bytes(gqa_truth, config=gqa)
    assert_wrong(check_kv_cache_bytes(truth, config=gqa), "n_kv_heads")


def test_adapter_param_count_matches_the_model():
    truth = meta_params(LlamaConfig(), AdapterConfig(prompt_len=10, layers=30), trainable=True)
    assert truth == 1_229_760
    assert check_adapter_param_count(truth)
    small = meta_params(LlamaConfig(dim=64, n_layers=4, n_heads=4, vocab_size=100, multiple_of=32),
                        AdapterConfig(prompt_len=5, layers=2), trainable=True)
    assert check_adapter_param_count(small, prompt_len=5, layers=2, dim=64, n_heads=4, n_layers=4)


@pytest.mark.parametrize("wrong, phrase", [
    (1_228_800, "not the gates"),
    (1_228_800 + 30, "one gate per layer"),
    (10 * 32 * 4096 + 32 * 32, "top L=30"),
    (2 * 1_228_800 + 960, "separate key and value"),
    (10 * 30 * 128 + 960, "head width"),
])
def test_adapter_param_count_names_the_mistake(wrong, phrase):
    assert_wrong(check_adapter_param_count(wrong), phrase)


# --------------------------------------------------------------------------- zero-init attention
def eq_5_to_8(q, k, v, prompt_k, prompt_v, gate):
    """Written independently of the library: per query row, two softmaxes."""
    B, H, T, d = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s_p = prompt_k[0, h] @ q[b, h, t] / math.sqrt(d)  # (K,)
                s_t = k[b, h, : t + 1] @ q[b, h, t] / math.sqrt(d)  # (t+1,) causal
                g = gate.reshape(-1)[h] if gate.numel() > 1 else gate.reshape(-1)[0]
                out[b, h, t] = g * s_p.softmax(0) @ prompt_v[0, h] + s_t.softmax(0) @ v[b, h, : t + 1]
    return out


def test_zero_init_attention_accepts_independent_and_library_versions():
    assert check_zero_init_attention(eq_5_to_8)
    assert check_zero_init_attention(zero_init_attention_literal)


def one_softmax(q, k, v, pk, pv, gate):
    B, H, T, d = q.shape
    K = pk.shape[2]
    keys, values = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)
    S = q @ keys.transpose(-2, -1) / math.sqrt(d)
    mask = torch.cat([torch.ones(T, K, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    A = S.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.cat([gate * A[..., :K], A[..., K:]], -1) @ values


@pytest.mark.parametrize("wrong, phrase", [
    (one_softmax, "ONE softmax"),
    (lambda q, k, v, pk, pv, g: eq_5_to_8(q, k, v, pk, pv, torch.ones_like(g)), "not gated"),
    (lambda q, k, v, pk, pv, g: eq_5_to_8(q, k, v, pk, pv, torch.tanh(g)), "already the effective gate"),
    (lambda q, k, v, pk, pv, g: eq_5_to_8(q * math.sqrt(q.shape[-1]), k, v, pk, pv, g), "sqrt(d)"),
    (lambda q, k, v, pk, pv, g: eq_5_to_8(q, k, v, pk, pv, g)[..., :2], "shape"),
    (lambda q, k, v, pk, pv, g: "S^g V", "torch.Tensor"),
])
def test_zero_init_attention_names_the_mistake(wrong, phrase):
    assert_wrong(check_zero_init_attention(wrong), phrase)


def test_zero_init_attention_missing_causal_mask():
    def no_mask(q, k, v, pk, pv, g):
        d = q.shape[-1]
        S_p = q @ pk.transpose(-2, -1) / math.sqrt(d)
        S_t = q @ k.transpose(-2, -1) / math.sqrt(d)
        return g * S_p.softmax(-1) @ pv + S_t.softmax(-1) @ v

    assert_wrong(check_zero_init_attention(no_mask), "causal mask")


# --------------------------------------------------------------------------- step-0 gradients
def test_step0_gradients_answer_matches_a_real_backward_pass():
    """Derive the right answer from autograd on a tiny adapted model, then feed it to the checker."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=2, vocab_size=50, multiple_of=16))
    add_adapter(model, AdapterConfig(prompt_len=3, layers=1))
    tokens = torch.randint(0, 50, (2, 8))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    attn = model.layers[1].attention
    grads = {"prompt": attn.adapter.prompt.grad, "gate": attn.adapter.gate.grad, "wq": attn.wq.weight.grad,
             "wk": attn.wk.weight.grad, "wv": attn.wv.weight.grad, "wo": attn.wo.weight.grad,
             "embedding": model.tok_embeddings.weight.grad}
    nonzero = {name for name, g in grads.items() if g is not None and bool((g != 0).any())}
    assert check_step0_gradients(nonzero), nonzero
    assert check_step0_gradients(["gates"])  # plural and list are fine


@pytest.mark.parametrize("answer, phrase", [
    ({"prompt", "gate"}, "tanh(0) = 0"),
    ({"gate", "wq"}, "frozen"),
    (set(), "the gate does get a gradient"),
    ({"gate", "bias"}, "unknown"),
    (3, "set of names"),
])
def test_step0_gradients_names_the_mistake(answer, phrase):
    assert_wrong(check_step0_gradients(answer), phrase)


# --------------------------------------------------------------------------- losses and labels
def test_uniform_loss_is_the_loss_of_uniform_logits():
    V = 640
    truth = torch.nn.functional.cross_entropy(torch.zeros(5, V), torch.arange(5)).item()  # equal logits
    assert check_uniform_loss(truth, vocab_size=V)
    assert check_uniform_loss(torch.tensor(truth), vocab_size=V)
    assert_wrong(check_uniform_loss(math.log2(V), vocab_size=V), "bits")
    assert_wrong(check_uniform_loss(1 / V, vocab_size=V), "probability")
    assert_wrong(check_uniform_loss(-truth, vocab_size=V), "sign")
    assert_wrong(check_uniform_loss(math.log(32000), vocab_size=V), "32000")
    assert_wrong(check_uniform_loss(3.0, vocab_size=V), "not it")


@pytest.fixture(scope="module")
def small_tokenizer():
    from adapterlab.tokenizer import Tokenizer

    texts = [f"{n} lives in {c}. {n} has a {p}." for n in ("Ada", "Bruno", "Clara", "Dario")
             for c in ("Paris", "Oslo", "Lima") for p in ("cat", "dog", "parrot")]
    texts += ["Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request. ### Instruction: ### Input: ### Response: Where does live? What pet does have?"] * 5
    return Tokenizer.train(texts, vocab_size=120)


def test_target_token_count_matches_the_training_loss(small_tokenizer):
    """The right answer is what the training loop actually counts (TokenDataset.n_targets)."""
    from adapterlab.data import instruction_dataset

    record = {"instruction": "Where does Ada live?", "input": "", "output": "Ada lives in Paris."}
    truth = instruction_dataset([record], small_tokenizer, max_seq_len=512).n_targets([0])
    n_response = len(small_tokenizer.encode(record["output"], bos=False, eos=False))
    assert truth == n_response + 1
    assert check_target_token_count(truth, record, small_tokenizer)
    assert_wrong(check_target_token_count(n_response, record, small_tokenizer), "EOS")
    n_all = len(small_tokenizer.encode(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhere does Ada live?\n\n### Response:", bos=True)) + n_response + 1
    assert_wrong(check_target_token_count(n_all, record, small_tokenizer), "every token")
    assert repr(check_target_token_count(None, record, small_tokenizer)).startswith("No answer yet")


# --------------------------------------------------------------------------- gates
def test_adapted_layers_matches_add_adapter():
    from adapterlab.adapter import adapted_layers

    for n_layers, L in ((4, 2), (4, 4), (6, 1)):
        model = Llama(LlamaConfig(dim=32, n_layers=n_layers, n_heads=2, vocab_size=50, multiple_of=16))
        add_adapter(model, AdapterConfig(prompt_len=2, layers=L))
        assert check_adapted_layers(set(adapted_layers(model)), n_layers=n_layers, layers=L)
    assert check_adapted_layers([2, 3])
    assert_wrong(check_adapted_layers({0, 1}), "top")
    assert_wrong(check_adapted_layers({3, 4}), "start at 0")
    assert_wrong(check_adapted_layers({3}), "exactly 2")
    assert_wrong(check_adapted_layers("two"), "integers")


def gate_records():
    """Three records of a 3-layer, 4-head adapter (layers 1..3). At the end: layer 2 has the largest
    mean |gate|, layer 3 the largest single head, layer 1 the largest signed mean."""
    last = [[0.30, 0.30, 0.30, 0.30],  # layer 1: mean 0.30, mean |g| 0.30
            [0.50, -0.50, 0.50, -0.45],  # layer 2: mean 0.01, mean |g| 0.49
            [0.90, -0.30, 0.05, -0.30]]  # layer 3: max head 0.90, mean |g| 0.39
    zero = [[0.0] * 4] * 3
    mid = [[v / 2 for v in row] for row in last]
    return [{"step": s, "layers": [1, 2, 3], "gates": g, "loss": None, "lr": 0.0}
            for s, g in ((0, zero), (10, mid), (20, last))]


def test_most_open_layer(tmp_path):
    from adapterlab.gates import GateLog

    records = gate_records()
    assert check_most_open_layer(2, records)
    assert check_most_open_layer(2, GateLog.from_records(records))
    (tmp_path / "gates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert check_most_open_layer(2, tmp_path)
    assert_wrong(check_most_open_layer(3, records), "single most open head")
    assert_wrong(check_most_open_layer(1, records), "signed mean")
    assert_wrong(check_most_open_layer(0, records), "no adapter")


# --------------------------------------------------------------------------- training state
def test_training_state_bytes_matches_adamw():
    """Count the bytes AdamW really keeps after one step on a small model."""
    model = torch.nn.Linear(10, 7)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    params = list(model.parameters())
    state = [t for p in params for t in opt.state[p].values() if torch.is_tensor(t) and t.dim() > 0]
    truth = sum(t.numel() * t.element_size() for t in params + [p.grad for p in params] + state)
    n = sum(p.numel() for p in params)
    assert check_training_state_bytes(truth, n_params=n)
    assert check_training_state_bytes(16 * 6_738_415_616, n_params=6_738_415_616)
    assert_wrong(check_training_state_bytes(4 * n, n_params=n), "weights only")
    assert_wrong(check_training_state_bytes(8 * n, n_params=n), "two moment")
    assert_wrong(check_training_state_bytes(12 * n, n_params=n), "one tensor short")
    assert_wrong(check_training_state_bytes(8 * n + 1, n_params=n), "")


# --------------------------------------------------------------------------- checkpoints and multi-modal
def test_hf_to_meta_rows_agrees_with_the_rotary_math():
    """A correct permutation makes HF's rotate-halves RoPE equal to Meta's interleaved RoPE on the same input."""
    from adapterlab.model import apply_rope, rope_angles

    def independent(w, n_heads):  # written with an explicit index list
        d = w.shape[0] // n_heads
        order = [h * d + c * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for c in range(2)]
        return w[order]

    n_heads, d, C, T = 2, 8, 6, 5
    w_hf = torch.randn(n_heads * d, C)
    x = torch.randn(1, T, C)
    cos, sin = rope_angles(d, torch.arange(T), 10000.0)
    q_meta = apply_rope((x @ independent(w_hf, n_heads).T).view(1, T, n_heads, d).transpose(1, 2), cos, sin)
    q_hf = (x @ w_hf.T).view(1, T, n_heads, d).transpose(1, 2)  # rotate halves, as transformers does
    c2, s2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotate_half = torch.cat([-q_hf[..., d // 2:], q_hf[..., : d // 2]], -1)
    q_hf = q_hf * c2 + rotate_half * s2
    # the same features, only in another order within each head
    assert torch.allclose(q_meta, independent(q_hf.transpose(1, 2).reshape(T, n_heads * d).T, n_heads).T
                          .reshape(1, T, n_heads, d).transpose(1, 2), atol=1e-5)
    assert check_hf_to_meta_rows(independent)
    assert_wrong(check_hf_to_meta_rows(lambda w, n: w), "unchanged")
    inverse = lambda w, n: w.reshape(n, w.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(w.shape)  # noqa: E731
    assert_wrong(check_hf_to_meta_rows(inverse), "opposite direction")


def test_multimodal_param_count_matches_an_adapted_model():
    C, H, N, L, K, V = 64, 4, 4, 3, 5, 24
    model = Llama(LlamaConfig(dim=C, n_layers=N, n_heads=H, vocab_size=50, multiple_of=16))
    add_adapter(model, AdapterConfig(prompt_len=K, layers=L, visual_dim=V))
    truth = count_trainable(model)
    assert check_multimodal_param_count(truth, visual_dim=V, prompt_len=K, layers=L, dim=C, n_heads=H)
    assert_wrong(check_multimodal_param_count(K * L * C + L * H, visual_dim=V, prompt_len=K, layers=L, dim=C,
                                              n_heads=H), "text adapter only")
    from adapterlab.adapter import VisualProjection

    with torch.device("meta"):
        projection = sum(p.numel() for p in VisualProjection(1024, 4096).parameters())
    assert check_multimodal_param_count(1_228_800 + 960 + projection)  # the 7B default of the exercise


# --------------------------------------------------------------------------- distributed
def test_accumulation_steps_match_the_distributed_batch_rules():
    from adapterlab.data import check_batch_sizes

    for global_batch, world, micro in ((64, 8, 4), (64, 1, 8), (32, 2, 16), (64, 8, 3)):
        _, micro_batches = check_batch_sizes(global_batch, world, micro_batch=micro)  # what the loop does
        assert check_accumulation_steps(micro_batches, global_batch, world, micro), (global_batch, world, micro)
    assert_wrong(check_accumulation_steps(16), "share")
    assert_wrong(check_accumulation_steps(3), "not it")


# --------------------------------------------------------------------------- SQuAD F1 (notebook 11)
def test_squad_f1_accepts_the_hand_worked_score_and_names_the_mistake():
    # "the old red boat, the red one" -> old red boat red one (5 words). Against "a red boat" -> red boat:
    # 2 shared (red once: the reference has it once), P = 2/5, R = 2/2, F1 = 4/7; against the first
    # reference "The old boat in the harbour" -> old boat in harbour: P = 2/5, R = 2/4, F1 = 4/9.
    f1 = 2 * (2 / 5) * 1 / (2 / 5 + 1)
    assert math.isclose(f1, 4 / 7)
    for right in (f1, round(f1, 3), 100 * f1):
        assert check_squad_f1(right), right
    assert_wrong(check_squad_f1(4 / 9), "first reference")
    assert_wrong(check_squad_f1((4 / 7 + 4 / 9) / 2), "best")
    assert_wrong(check_squad_f1(2 / 5), "precision")
    assert_wrong(check_squad_f1(1.0), "recall")
    assert_wrong(check_squad_f1(0.0), "exact match")
    assert_wrong(check_squad_f1(0.7), "harmonic")  # (P + R) / 2
    assert_wrong(check_squad_f1(2 * (3 / 5) * (3 / 2) / (3 / 5 + 3 / 2)), "repeats")  # red twice: 3 "shared"
    assert_wrong(check_squad_f1(2 / 3), "distinct")  # sets: {old, red, boat, one} vs {red, boat}
    assert_wrong(check_squad_f1(100 * 2 / 5), "precision")
    assert_wrong(check_squad_f1(0.3), "not it")
    # SQuAD v2.0: no reference answer; only the empty prediction is right
    assert check_squad_f1(1, prediction="The.", references=[])
    assert check_squad_f1(0, prediction="Oslo", references=[])
    assert_wrong(check_squad_f1(1, prediction="Oslo", references=[]), "empty")


# --------------------------------------------------------------------------- a real model (notebook 12)
SMOLLM2 = LlamaConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152)  # tests/test_gguf.py reads it


def test_gqa_adapter_param_count_matches_an_adapted_model():
    truth = meta_params(SMOLLM2, AdapterConfig(prompt_len=10, layers=30), trainable=True)
    assert truth == 10 * 30 * 576 + 30 * 9
    assert check_gqa_adapter_param_count(truth)
    assert check_gqa_adapter_param_count(truth, SMOLLM2)
    small = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32)
    small_truth = meta_params(small, AdapterConfig(prompt_len=5, layers=3), trainable=True)
    assert check_gqa_adapter_param_count(small_truth, small, prompt_len=5, layers=3)
    assert_wrong(check_gqa_adapter_param_count(truth, small, prompt_len=5, layers=3))
    assert_wrong(check_gqa_adapter_param_count(small_truth, small, prompt_len=5, layers=9), "only 4")


@pytest.mark.parametrize("wrong, phrase", [
    (172_800, "not the gates"),
    (172_800 + 30 * 3, "key/value head"),
    (172_800 + 30, "one gate per layer"),
    (10 * 30 * 192 + 270, "key/value width"),
    (2 * 10 * 30 * 192 + 270, "keys and values"),
    (10 * 30 * 64 + 270, "head width"),
    (10 * 8 * 576 + 8 * 9, "L = 8"),
])
def test_gqa_adapter_param_count_names_the_mistake(wrong, phrase):
    assert_wrong(check_gqa_adapter_param_count(wrong, SMOLLM2), phrase)


# --------------------------------------------------------------------------- the notebooks themselves
def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_exist():
    assert notebooks(), f"no numbered notebooks in {NOTEBOOKS}"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_notebook_shape(path: Path):
    """Kernelspec (JupyterLab opens without a kernel dialog), an exercise with a checker, a solutions
    notebook, a line in notebooks/README.md, and checked cells that print facts only (no stderr, no
    figure). Notebooks are stored executed; their size and clean outputs are checked in test_packaging.py."""
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", f"{path.name}: no python3 kernelspec"
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    text = "\n".join("".join(c["source"]) for c in nb["cells"])
    assert "adapterlab.exercises" in text and re.search(r"\bcheck_\w+\(", text), f"{path.name}: no checker"
    assert re.search(r"check yourself", text, re.I), f"{path.name}: no 'Check yourself' section"
    assert re.search(r"^#+ Summary", text, re.M), f"{path.name}: no summary"
    solution = NOTEBOOKS / "solutions" / f"{path.stem}_solutions.ipynb"
    assert solution.is_file(), f"missing {solution.relative_to(NOTEBOOKS.parent)}"
    readme = (NOTEBOOKS / "README.md").read_text() if (NOTEBOOKS / "README.md").is_file() else ""
    assert path.name in readme, f"notebooks/README.md does not list {path.name}"
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        checked = "NBVAL_CHECK_OUTPUT" in "".join(cell["source"])
        for out in cell.get("outputs", []) if checked else ():
            assert out.get("name") != "stderr", f"{path.name}: a checked cell writes to stderr"
            assert not any(k.startswith("image/") for k in out.get("data", {})), f"{path.name}: image in checked cell"
    assert any("NBVAL_CHECK_OUTPUT" in c for c in code), f"{path.name}: no checked cell"


def test_each_notebook_imports_its_checkers_from_its_own_module():
    """The import line leads a student to the checker's code: notebook NN_name imports from
    adapterlab.exercises.name (01 borrows 03's step-0 checker), and the package re-exports every checker."""
    import importlib
    import pkgutil

    import adapterlab.exercises as package

    stored = notebooks() + sorted((NOTEBOOKS / "solutions").glob("[0-9][0-9]_*.ipynb"))
    assert len(stored) == 2 * len(notebooks())
    for path in stored:
        cells = json.loads(path.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        imports = re.findall(r"from adapterlab\.exercises(\.\w+)? import ([\w, ]+)", text)
        assert len(imports) == 1, f"{path.name}: expected one import line of checkers, found {imports}"
        module, names = imports[0]
        own = "zero_init_attention" if path.name.startswith("01_") else path.stem[3:].removesuffix("_solutions")
        assert module == f".{own}", f"{path.name} imports from adapterlab.exercises{module}; use .{own}"
        for name in names.split(", "):
            assert getattr(importlib.import_module(f"adapterlab.exercises.{own}"), name) is getattr(package, name)
    modules = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    checkers = {name for m in modules for name in vars(m) if name.startswith("check_")}
    assert len(modules) == 12 and checkers <= set(package.__all__), sorted(checkers - set(package.__all__))


def test_checkers_accept_numpy_and_torch_scalars_as_numbers():
    """A student's `log.gates[-1].mean(-1).argmax()` is a numpy int64; `x.sum()` a 0-d tensor: both are numbers."""
    import numpy as np

    from adapterlab.exercises.feedback import _as_float, _as_int

    for value in (np.int64(7), np.int32(7), np.float64(7.0), np.array(7), np.array([7]), torch.tensor(7), 7, 7.0, "7"):
        assert _as_int(value, "x") == (7, None), value
        assert _as_float(value, "x") == (7.0, None), value
    for bad in (np.array([1, 2]), torch.tensor([1.0, 2.0]), np.bool_(True), True):
        number, problem = _as_int(bad, "x")
        assert number is None and not problem, bad
    assert "whole number" in _as_int(np.float32(2.5), "x")[1].message
