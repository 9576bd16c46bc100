"""Text generation with a KV cache: prefill the prompts, then one token per step.

Prompts of different lengths need no padding mask (Meta's scheme): decoding starts at the
shortest prompt's length; at a position where a longer prompt still has a token, that token
is kept instead of the sampled one. Every row therefore only ever attends to real tokens.

The adapter's prompt keys/values depend on no token, so they are computed once per
generation and kept in ``KVCache.prompt_kv`` (PEFT recomputes them at every step).

Decoding: greedy (argmax), or temperature + top-p (nucleus) sampling as in the release
(temperature 0.1, top_p 0.75).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .model import KVCache, Llama, autocast_for
from .tokenizer import Tokenizer


def sample_top_p(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Sample one token per row from softmax(logits / temperature), restricted to the smallest
    set of most likely tokens whose probabilities sum to at least top_p. (B, V) -> (B,)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of strictly more likely tokens
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p, 0.0)  # the most likely token always stays
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)  # (B, 1)
    return order.gather(-1, choice).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: Llama,
    prompt_tokens: Sequence[Sequence[int]],
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    greedy: bool = False,
    seed: Optional[int] = None,
    visual: Optional[torch.Tensor] = None,
    stop_at_eos: bool = True,
    eos_id: int = 2,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids, BOS included) -> the new ids of each, EOS cut off.

    greedy=True (or temperature <= 0) takes the argmax; otherwise temperature + top-p sampling,
    reproducible with ``seed``. visual: the image token(s) exactly as ``model(tokens, visual=...)``
    takes them (multi-modal adapter), one row per prompt.
    """
    if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("every prompt needs at least one token (encode with bos=True)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    B = len(prompt_tokens)
    lengths = [len(p) for p in prompt_tokens]
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    max_seq_len = model.config.max_seq_len
    if max(lengths) >= max_seq_len:
        raise ValueError(
            f"the longest prompt has {max(lengths)} tokens; the model accepts at most max_seq_len={max_seq_len} "
            f"in all, leaving no room to generate. Shorten the prompt."
        )
    total_len = min(max_seq_len, max(lengths) + max_new_tokens)
    device = model.device

    # One row per prompt, prompt tokens at the front; is_prompt marks them.
    tokens = torch.zeros(B, total_len, dtype=torch.long, device=device)
    is_prompt = torch.zeros(B, total_len, dtype=torch.bool, device=device)
    for i, p in enumerate(prompt_tokens):
        tokens[i, : len(p)] = torch.tensor(list(p), dtype=torch.long, device=device)
        is_prompt[i, : len(p)] = True

    cache_dtype = torch.bfloat16 if device.type == "cuda" else model.tok_embeddings.weight.dtype  # autocast's dtype
    cache = KVCache(model.config, B, total_len, device=device, dtype=cache_dtype)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    greedy = greedy or temperature <= 0

    was_training = model.training
    model.eval()
    try:
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        prev_pos, end = 0, min(lengths)
        for cur_pos in range(min(lengths), total_len):
            with autocast_for(device):  # feed what the cache has not seen yet: the whole prompt first, then 1 token
                hidden = model(tokens[:, prev_pos:cur_pos], start_pos=prev_pos, cache=cache, visual=visual, return_hidden=True)
                logits = model.output(hidden[:, -1]).float()  # (B, vocab): only the last position is needed
            next_token = logits.argmax(-1) if greedy else sample_top_p(logits, temperature, top_p, generator)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            finished |= ~is_prompt[:, cur_pos] & (next_token == eos_id)
            prev_pos, end = cur_pos, cur_pos + 1
            if stop_at_eos and bool(finished.all()):
                break
    finally:
        model.train(was_training)

    out = []
    for i, n in enumerate(lengths):
        new = tokens[i, n : min(end, n + max_new_tokens)].tolist()
        if stop_at_eos and eos_id in new:
            new = new[: new.index(eos_id)]
        out.append(new)
    return out


def generate(
    model: Llama,
    tokenizer: Optional[Tokenizer],
    prompts: Union[Sequence[str], Sequence[Sequence[int]]],
    max_new_tokens: int = 128,
    temperature: float = 0.1,
    top_p: float = 0.75,
    greedy: bool = False,
    seed: Optional[int] = None,
    visual: Optional[torch.Tensor] = None,
    stop_at_eos: bool = True,
) -> list[str]:
    """Continue each prompt and return the generated text (without the prompt).

    prompts: strings (encoded with ``bos=True``: BOS first where the model's tokenizer puts one) or lists of
    token ids; for a chat model, ``tokenizer.chat(messages)`` gives the ids. tokenizer: None -> model.tokenizer.
    See :func:`generate_tokens` for the decoding options.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("generate needs a tokenizer: pass one (adapterlab.tokenizer.load_tokenizer(path)), or load the "
                         "model from a folder with tokenizer.model or tokenizer.json, or from a GGUF file")
    prompt_tokens = [tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompts]
    new_tokens = generate_tokens(
        model, prompt_tokens, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        greedy=greedy, seed=seed, visual=visual, stop_at_eos=stop_at_eos, eos_id=tokenizer.eos_id,
    )
    return [tokenizer.decode(t) for t in new_tokens]
