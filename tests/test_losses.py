"""Chunked cross-entropy (adapterlab.losses) and the opt-in compile path.

The reference is the textbook loss computed in float64 from the full logits; every mode must
match it in value and in gradient, keep no (tokens x vocab) tensor for the backward pass, and
skip tokens whose label is ignored. The last tests check the benchmark's CUDA-path helpers
(in-memory weight conversion to transformers, bf16) on the CPU.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter
from adapterlab.adapter import adapted_layers
from adapterlab.losses import IGNORE_INDEX, MODES, cross_entropy_from_hidden, lm_loss
from adapterlab.model import init_weights
from adapterlab.train import compile_model, uncompile_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def problem(N=37, C=16, V=53, seed=0, ignored=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, C, generator=g) / C**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.randperm(N, generator=g)[:ignored]] = IGNORE_INDEX
    return h, w, t


def reference(h, w, t, reduction="mean"):
    """Textbook cross-entropy in float64: -log softmax(h W^T)[target], over non-ignored tokens."""
    logits = h.double() @ w.double().t()
    keep = t != IGNORE_INDEX
    logp = logits.log_softmax(-1)[keep].gather(1, t[keep][:, None]).squeeze(1)
    total = -logp.sum()
    return total / keep.sum() if reduction == "mean" else total


def grads_of(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])  # 5 does not divide the 26 kept tokens
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_mode_matches_the_textbook_loss_and_gradients(mode, chunk_size, reduction):
    h, w, t = problem()
    ref = reference(h, w, t, reduction)
    ref_gh, ref_gw = grads_of(ref, h, w)
    loss = cross_entropy_from_hidden(h, w, t, chunk_size=chunk_size, mode=mode, reduction=reduction)
    gh, gw = grads_of(loss, h, w)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    assert (gh.double() - ref_gh).abs().max() < 1e-6
    assert (gw.double() - ref_gw).abs().max() < 1e-6
    # ignored tokens get exactly zero gradient
    assert torch.count_nonzero(gh[t == IGNORE_INDEX]) == 0


def test_the_comparison_can_fail():
    """Sanity: a wrong target or a missing token changes loss and gradient beyond the tolerances above."""
    h, w, t = problem()
    ref = reference(h, w, t)
    t2 = t.clone()
    i = int((t != IGNORE_INDEX).nonzero()[0])
    t2[i] = (t2[i] + 1) % w.shape[0]
    assert abs(cross_entropy_from_hidden(h, w, t2).item() - ref.item()) > 1e-4
    t3 = t.clone()
    t3[i] = IGNORE_INDEX
    assert abs(cross_entropy_from_hidden(h, w, t3).item() - ref.item()) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_batched_shapes_and_frozen_head(mode):
    """(B, T, C) hidden states, a frozen head (as in adapter training): gradient only for hidden."""
    h, w, t = problem(N=24)
    h3, t3 = h.detach().reshape(2, 12, -1).requires_grad_(), t.reshape(2, 12)
    w = w.detach()  # frozen output head
    ref_gh, = grads_of(reference(h3.reshape(24, -1), w, t3.reshape(-1)), h3)
    gh, = grads_of(cross_entropy_from_hidden(h3, w, t3, chunk_size=7, mode=mode), h3)
    assert gh.shape == h3.shape and (gh.double() - ref_gh).abs().max() < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_all_targets_ignored_gives_zero_not_nan(mode):
    h, w, t = problem()
    t[:] = IGNORE_INDEX
    loss = cross_entropy_from_hidden(h, w, t, mode=mode)
    gh, gw = grads_of(loss, h, w)
    assert loss.item() == 0.0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def saved_bytes_and_shapes(fn):
    """Run fn() and record every tensor autograd saves for the backward pass."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("mode", ["fused", "checkpoint"])
def test_chunked_modes_keep_no_logits_for_backward(mode):
    """The point of the module: nothing of shape (tokens, vocab) is saved for backward ("full" does)."""
    N, C, V = 64, 8, 101
    h, w, t = problem(N=N, C=C, V=V, ignored=0)
    w = w.detach()

    def has_logits(shapes):
        return any(V in s and s != (V, C) for s in shapes)  # the head itself (V, C) may be kept

    _, full = saved_bytes_and_shapes(lambda: cross_entropy_from_hidden(h, w, t, mode="full"))
    assert has_logits(full), "the reference mode does keep logits; otherwise this test proves nothing"
    loss, chunked = saved_bytes_and_shapes(lambda: cross_entropy_from_hidden(h, w, t, chunk_size=16, mode=mode))
    assert not has_logits(chunked), chunked
    loss.backward()  # and the gradient still arrives
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_fused_mode_computes_the_head_only_for_labelled_tokens():
    """Prompt tokens (label -100) never reach the output head: a head that records its input rows sees
    only the labelled ones."""
    h, w, t = problem(N=30, ignored=20)
    calls = []
    original = torch.Tensor.__matmul__

    def spy(a, b):
        calls.append(a.shape[0])
        return original(a, b)

    torch.Tensor.__matmul__ = spy
    try:
        cross_entropy_from_hidden(h, w.detach(), t, chunk_size=4, mode="fused")
    finally:
        torch.Tensor.__matmul__ = original
    # logits matmuls (rows, C) @ (C, V): their row counts add up to the 10 labelled tokens
    assert sum(calls[0::2]) == int((t != IGNORE_INDEX).sum()) == 10, calls


def test_bf16_fused_is_close_to_fp32_and_keeps_dtypes():
    h, w, t = problem(N=64, C=32, V=97)
    ref = reference(h, w, t)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss = cross_entropy_from_hidden(hb, wb, t, chunk_size=16)
    gh, gw = grads_of(loss, hb, wb)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())


def test_user_errors_name_the_problem():
    h, w, t = problem()
    with pytest.raises(ValueError, match="mode must be one of"):
        cross_entropy_from_hidden(h, w, t, mode="fast")
    with pytest.raises(ValueError, match="must agree"):
        cross_entropy_from_hidden(h, w, t[:-1])
    with pytest.raises(ValueError, match="does not match the output head"):
        cross_entropy_from_hidden(h, w[:, :-1], t)
    with pytest.raises(ValueError, match="chunk_size"):
        cross_entropy_from_hidden(h, w, t, chunk_size=0)


# ---------------------------------------------------------------------------- with the model
def adapted_model(seed=0, n_layers=3):
    cfg = LlamaConfig(dim=32, n_layers=n_layers, n_heads=4, vocab_size=61, multiple_of=16, max_seq_len=64)
    model = init_weights(Llama(cfg), seed=seed, std=0.2)
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i in adapted_layers(model):
            model.layers[i].attention.adapter.gate.copy_(torch.randn(1, 4, 1, 1, generator=g))
    return model


def batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 61, (3, 14), generator=g)
    labels = tokens.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt part
    labels[2, 10:] = IGNORE_INDEX  # padding of a shorter row
    return tokens, labels


@pytest.mark.parametrize("mode", MODES)
def test_lm_loss_equals_the_shifted_full_logits_loss_for_the_adapter(mode):
    model = adapted_model()
    tokens, labels = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    logits = model(tokens)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, trainable)
    loss = lm_loss(model, tokens, labels, mode=mode, chunk_size=4)
    grads = torch.autograd.grad(loss, trainable)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) < 1e-6
    assert all(g.abs().sum() > 0 for g in grads[1::2])  # every gate learns (prompts too, as gates are open)


def test_lm_loss_sum_reduction_and_default_labels():
    model = adapted_model()
    tokens, _ = batch()
    logits = model(tokens)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    assert abs(lm_loss(model, tokens, reduction="sum").item() - ref.item()) < 1e-3
    with pytest.raises(ValueError, match="labels"):
        lm_loss(model, tokens, tokens[:, :-1])


def test_loss_sum_fast_path_equals_the_readable_formula():
    """train()'s loss (loss_sum): the fused head (adapter: frozen head) and the full-logits line give the same value and gradients."""
    import torch.nn.functional as F

    from adapterlab.losses import _head_is_fusable, loss_sum
    from test_train import tiny_model

    model = tiny_model()
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2), seed=0)
    with torch.no_grad():
        for layer in model.layers:
            if layer.attention.adapter is not None:
                layer.attention.adapter.gate.fill_(0.3)  # open gates: the prompts matter
    tokens = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[:, :4] = IGNORE_INDEX  # prompt tokens carry no loss
    assert _head_is_fusable(model)
    fast = loss_sum(model, tokens, labels)
    fast_grads = torch.autograd.grad(fast, [p for p in model.parameters() if p.requires_grad])
    logits = model(tokens)
    slow = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    slow_grads = torch.autograd.grad(slow, [p for p in model.parameters() if p.requires_grad])
    assert abs(fast.item() - slow.item()) < 1e-4 * slow.item()
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    model.requires_grad_(True)  # full fine-tuning trains the head: the readable line is used
    assert not _head_is_fusable(model)
    assert abs(loss_sum(model, tokens, labels).item() - slow.item()) < 1e-4 * slow.item()


def test_loss_sum_passes_per_example_forward_args_to_the_model():
    """A multi-modal batch: image_features (and has_image) reach the model's forward; the image token
    is made inside it by the trainable projection, so its gradient flows; rows without a picture get 0."""
    from adapterlab.losses import loss_sum

    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=61, multiple_of=16, max_seq_len=64)
    model = init_weights(Llama(cfg), seed=0, std=0.2)
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2, visual_dim=8, visual_hidden=16))
    with torch.no_grad():
        for i in adapted_layers(model):
            model.layers[i].attention.adapter.gate.fill_(0.5)
    tokens, labels = batch()
    feats = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    has_image = torch.tensor([True, False, True])
    loss = loss_sum(model, tokens, labels, image_features=feats, has_image=has_image)
    visual = model.visual_proj(feats) * has_image[:, None].float()
    assert visual[1].abs().sum() == 0 and visual[0].abs().sum() > 0
    logits = model(tokens, visual=visual)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    assert abs(loss.item() - ref.item()) < 1e-4 * ref.item()
    loss.backward()
    assert model.visual_proj.fc1.weight.grad.abs().max() > 0
    no_picture = loss_sum(model, tokens, labels, image_features=feats, has_image=torch.zeros(3, dtype=torch.bool))
    assert abs(no_picture.item() - loss_sum(model, tokens, labels).item()) < 1e-5 * no_picture.item()
    with pytest.raises(ValueError, match="multi-modal adapter"):
        loss_sum(adapted_model(), tokens, labels, image_features=feats)


@pytest.mark.slow
def test_compile_model_gives_the_same_loss_and_gradients_and_undoes_cleanly():
    model = adapted_model(n_layers=3)
    tokens, labels = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = list(model.state_dict())

    def loss_and_grads():
        loss = lm_loss(model, tokens, labels)
        return loss.detach(), torch.autograd.grad(loss, trainable)

    ref_loss, ref_grads = loss_and_grads()
    compile_model(model)
    assert list(model.state_dict()) == names, "compiling must not rename parameters"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads = loss_and_grads()
        model.activation_checkpointing = True  # compiled blocks under checkpointing
        loss_ckpt, grads_ckpt = loss_and_grads()
    assert not [w for w in caught if "compile_model" in str(w.message)], "fell back to eager"
    for l_, g_ in ((loss, grads), (loss_ckpt, grads_ckpt)):
        assert abs(l_.item() - ref_loss.item()) < 1e-5
        assert max((a - b).abs().max().item() for a, b in zip(g_, ref_grads)) < 1e-5
    uncompile_model(model)
    assert all("forward" not in layer.__dict__ for layer in model.layers)


def test_compile_model_falls_back_to_eager_when_compilation_fails(monkeypatch):
    """A compiler that fails as torch.compile does without a C compiler or Triton."""
    import torch._dynamo.exc

    def failing_compile(fn, **kwargs):
        def call(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("simulated: no working C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    model = adapted_model(n_layers=2)
    tokens, labels = batch()
    ref = lm_loss(model, tokens, labels).item()
    compile_model(model)
    with pytest.warns(UserWarning, match="compile_model: torch.compile failed"):
        loss = lm_loss(model, tokens, labels)
    assert loss.item() == ref
    loss.backward()


# ---------------------------------------------------------------------------- benchmark helpers
def load_benchmark():
    spec = importlib.util.spec_from_file_location("adapterlab_benchmark_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_weight_conversion_matches_transformers_exactly():
    """The CUDA path builds transformers' model from our tensors in memory: logits must agree (fp32)."""
    pytest.importorskip("transformers")
    from adapterlab.io.weights import hf_to_meta_rows

    run = load_benchmark()
    w = torch.randn(4 * 8, 5)
    assert torch.equal(hf_to_meta_rows(run.meta_to_hf_rows(w, 4), 4), w)
    assert not torch.equal(run.meta_to_hf_rows(w, 4), w)
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=64)
    ours = run.random_llama(cfg, torch.device("cpu"), torch.float32, seed=0).eval()
    hf = run.hf_from_ours(ours, torch.float32).eval()
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        diff = (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.slow
def test_benchmark_cuda_code_path_runs_on_cpu_in_bf16(tmp_path):
    """Everything the GPU run does (in-memory build, bf16, parity, memory rows, generation, training
    rounds, summary, JSON) on a tiny shape on the CPU."""
    pytest.importorskip("peft")
    run = load_benchmark()
    out = tmp_path / "bench.json"
    run.main(["--shape", "tiny", "--device", "cpu", "--dtype", "bf16", "--build", "memory", "--compile", "off",
              "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    tiny = result["shapes"]["tiny"]
    assert "error" not in tiny, tiny
    assert result["train_speedup_vs_peft"] > 0 and result["generate_speedup_vs_peft"] > 0
    assert tiny["parity"]["greedy_tokens_equal"].split("/")[1] == "16"
    assert all(row["error"] is None and row["tok_s_median"] for row in tiny["train"])
    assert {r["batch"] for r in tiny["generate"]} == {1, 2}
    with_ckpt, without = tiny["checkpointing"]
    assert with_ckpt["peak_gib"] <= without["peak_gib"]
    for key in ("machine", "date", "padding", "flop_formula"):
        assert key in result
