"""Shared small fixtures: tiny random LLaMAs (ours and transformers') and helpers.

Weights are drawn with std 1/sqrt(fan_in) (and norms around 1), so activations and logits
are O(1): a wrong permutation or mapping changes the logits by O(1), not by 1e-6.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from adapterlab import Llama, LlamaConfig
from adapterlab.adapter import adapted_layers


def tiny_config(**overrides) -> LlamaConfig:
    """A small LlamaConfig (dim 64, 3 layers, 4 heads, vocab 128); any field can be overridden."""
    fields = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=None, vocab_size=128, multiple_of=32,
                  norm_eps=1e-5, max_seq_len=128)
    fields.update(overrides)
    return LlamaConfig(**fields)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place: matrices ~ N(0, 1/fan_in), vectors (norms) ~ 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "adapter" in name or "adaption" in name:
                continue
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return module


def make_tiny_model(seed: int = 0, **overrides) -> Llama:
    """Our Llama with random O(1)-scale weights, in eval mode (fp32, CPU)."""
    return randomize_(Llama(tiny_config(**overrides)), seed).eval()


def open_gates_(model: Llama, seed: int = 1, scale: float = 1.0) -> Llama:
    """Give every attached adapter random non-zero gates (and fresh prompts), so tests are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in adapted_layers(model):
            ap = model.layers[i].attention.adapter
            ap.gate.copy_(scale * torch.randn(ap.gate.shape, generator=gen))
            ap.prompt.copy_(torch.randn(ap.prompt.shape, generator=gen))
    return model


def make_hf_llama(seed: int = 0, dim: int = 64, n_layers: int = 3, n_heads: int = 4, n_kv_heads: Optional[int] = None,
                  vocab_size: int = 128, intermediate_size: Optional[int] = None, rope_theta: float = 10000.0,
                  tied: bool = False, max_position_embeddings: int = 128):
    """transformers' LlamaForCausalLM with random O(1)-scale weights, eager attention, fp32, eval mode."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    if intermediate_size is None:  # Meta's rule with multiple_of=32, so a Meta folder can be written too
        intermediate_size = tiny_config(dim=dim, n_heads=n_heads).ffn_hidden_dim
    cfg = HFLlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate_size, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads or n_heads, rope_theta=rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=max_position_embeddings,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    randomize_(model, seed)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def random_tokens(batch: int = 2, length: int = 12, vocab_size: int = 128, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_model() -> Llama:
    return make_tiny_model()


@pytest.fixture
def model_factory():
    """The make_tiny_model function, for tests that need several models or other shapes."""
    return make_tiny_model


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than several, and much faster on a busy machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A Meta-format folder (params.json, consolidated.00.pth, tokenizer.model) with a small random LLaMA,
    and an Alpaca file: stands in for a real LLaMA folder and alpaca_data.json."""
    from adapterlab.worlds import tinyworld as tw
    from adapterlab.io.weights import save_llama
    from adapterlab.data import save_alpaca
    from adapterlab.model import init_weights

    root = tmp_path_factory.mktemp("small")
    world = tw.make_world(0)
    records, _ = tw.instruction_set(world)
    tok = tw.train_tokenizer(tw.pretrain_corpus(world, passes=2), records, vocab_size=300)
    model = init_weights(Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words, multiple_of=16,
                                           max_seq_len=128)), seed=0)
    save_llama(model, tok, root / "base")
    save_alpaca(records[:48], root / "alpaca.json")
    return root
