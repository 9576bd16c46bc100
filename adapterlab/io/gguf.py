"""GGUF files (llama.cpp's format) -> our Llama: the shape from the file's metadata, every tensor
decoded with the ``gguf`` library, llama.cpp's tensor names mapped to Meta's (ours).

llama.cpp's converter stores the attn_q / attn_k rows in Meta's interleaved rotary layout (it undoes
the Hugging Face permutation), which is our model's layout, so no row is moved here. A file without
an ``output`` tensor ties the head to the token embedding: the model gets one shared parameter.
Quantized blocks are decoded once, at load, to the dtype asked for, and the model computes in that
dtype: a 4-bit file costs 32 bits per weight in float32, 16 in bfloat16.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import gguf  # the library (absolute import), not this module
import torch

from ..model import LlamaConfig
from ..tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
# Tensor types we decode: the float types and llama.cpp's classic block quantizations.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")

# llama.cpp name -> Meta name (ours)
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}


def read_gguf(path: Path, place: Callable[[torch.Tensor], torch.Tensor]
              ) -> tuple[LlamaConfig, dict[str, torch.Tensor], Optional[Tokenizer]]:
    """(config, Meta-named state dict, tokenizer or None) of a Llama GGUF file; ``place`` moves
    each decoded tensor to its device and dtype as soon as it is read."""
    reader = _open(path)
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.")}  # plain values
    config = gguf_config_to_llama(meta, reader, source=str(path))

    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    unsupported = sorted({k for k in kinds.values() if k not in SUPPORTED_TYPES})
    if unsupported:
        examples = [f"{name} ({kind})" for name, kind in kinds.items() if kind in unsupported]
        raise ValueError(
            f"{path}: tensor type(s) {', '.join(unsupported)} are not supported ({_preview(examples, 3)}); "
            f"adapterlab reads GGUF tensors of types {', '.join(SUPPORTED_TYPES)}. Use a file quantized to one "
            f"of these (e.g. Q8_0 or Q4_1), or re-quantize with llama.cpp's llama-quantize."
        )
    unknown = [t.name for t in reader.tensors if _our_name(t.name) is None]
    if unknown:
        raise ValueError(
            f"{path}: tensors that a plain Llama does not have: {_preview(unknown)}. adapterlab reads Llama GGUF "
            f"files without biases, rope scaling tables (rope_freqs) or experts."
        )
    state = {_our_name(t.name): place(_decode(t)) for t in reader.tensors}  # one tensor at a time: decode, place
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # tied: one tensor serves both
    return config, state, _tokenizer(reader, path)


def gguf_config_to_llama(meta: dict[str, Any], reader: gguf.GGUFReader, source: str) -> LlamaConfig:
    """Our LlamaConfig from a GGUF file's metadata (``llama.block_count`` ...). Every field is read
    from the file; llama.cpp's own defaults apply only where it has one (head_count_kv, freq_base)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: general.architecture is {arch!r}; adapterlab reads GGUF files of architecture "
            f"{', '.join(map(repr, SUPPORTED_ARCHITECTURES))} only (Llama, SmolLM, TinyLlama, Mistral-7B-v0.1 ...)."
        )

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is ...:
            raise ValueError(f"{source}: the metadata has no {arch}.{key}; a Llama GGUF file needs it "
                             f"(the file is incomplete or was not written by llama.cpp's converter)")
        return value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    hidden = get("feed_forward_length")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    unsupported = []
    for key, value in (("feed_forward_length", hidden), ("attention.head_count_kv", n_kv_heads)):
        if isinstance(value, list):
            unsupported.append(f"{arch}.{key} differs between layers ({value[:4]}...)")
    if get("expert_count", 0):
        unsupported.append(f"{arch}.expert_count={get('expert_count')} (mixture of experts)")
    head_dim = dim // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            unsupported.append(f"{arch}.{key}={get(key)} (the model needs embedding_length/head_count={head_dim})")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        unsupported.append(f"{arch}.rope.scaling.type={scaling!r} (only plain rotary embeddings are implemented)")
    if unsupported:
        raise ValueError(f"{source}: this Llama variant is not supported: " + "; ".join(unsupported))

    vocab_size = get("vocab_size", None)
    if vocab_size is None:  # older files: the tokenizer's list, else the embedding's rows
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab_size = len(tokens.data) if tokens is not None else int(embedding.shape[-1]) if embedding else None
    if vocab_size is None:
        raise ValueError(f"{source}: no {arch}.vocab_size, tokenizer.ggml.tokens or token_embd.weight; "
                         f"the vocabulary size is unknown")
    base = int(2 * 4 * dim / 3)  # Meta's SwiGLU rule, which our config derives the width from, made to land on `hidden`
    return LlamaConfig(
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        multiple_of=hidden,
        ffn_dim_multiplier=hidden / base if base > hidden else None,
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_seq_len=get("context_length"),
    )


def _preview(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _open(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # the reader's own errors for a bad file
        size = path.stat().st_size
        raise ValueError(
            f"{path} ({size:,} bytes) cannot be read as GGUF: it is cut short (an interrupted download?) or "
            f"another kind of file. Download or copy it again. ({type(e).__name__}: {e})"
        ) from e


def _our_name(name: str) -> Optional[str]:
    if name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}"
    return None


def _decode(t: gguf.ReaderTensor) -> torch.Tensor:
    """One tensor as float32 in torch's (out, in) order (GGUF lists the shape innermost first)."""
    values = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32, rows = output features
    shape = tuple(int(n) for n in reversed(t.shape))
    values = values if values.flags.writeable else values.copy()  # F32 comes as a view of the read-only file
    return torch.from_numpy(values.reshape(shape))


def _tokenizer(reader: gguf.GGUFReader, path: Path) -> Optional[Tokenizer]:
    """The tokenizer the file's metadata describes (tokenizer.ggml.*), or None when it has none or one that
    :meth:`Tokenizer.from_gguf` cannot rebuild (then a warning says why: the weights are still usable)."""
    if "tokenizer.ggml.model" not in reader.fields:
        return None
    fields = {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.")}
    try:
        return Tokenizer.from_gguf(fields, source=str(path))
    except ValueError as e:
        warnings.warn(f"{e} The model is loaded without a tokenizer (model.tokenizer is None).", stacklevel=4)
        return None
