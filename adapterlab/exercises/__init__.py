"""Automatic checkers for the notebooks' "check yourself" exercises.

Layer: the top (beside cli): the checkers may use any module of the package.

Every checker takes the student's answer (a number, a set of names, or a function) and
returns a :class:`CheckResult`: truthy when the answer is right, and displayed in Jupyter as
a short message. A wrong answer is compared against the mistakes people actually make
(one softmax instead of two, forgetting the gates, LayerNorm instead of RMSNorm, ...), so
the feedback names the likely mistake instead of just saying "wrong".

Checkers never raise on a wrong or missing answer: a notebook with the exercise still
blank runs top to bottom (that is how nbval runs it in CI).

    >>> from adapterlab.exercises import check_adapter_param_count
    >>> check_adapter_param_count(1_228_800)
    Not yet: 1,228,800 counts the prompts (K*L*C) but not the gates ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..adapter import zero_init_attention_literal
from ..model import Llama, LlamaConfig, RMSNorm

__all__ = [
    "CheckResult",
    "check_rmsnorm",
    "check_llama_param_count",
    "check_kv_cache_bytes",
    "check_zero_init_attention",
    "check_adapter_param_count",
    "check_step0_gradients",
    "llama_param_count",
    "check_uniform_loss",
    "check_target_token_count",
    "check_adapted_layers",
    "check_most_open_layer",
    "check_training_state_bytes",
    "check_hf_to_meta_rows",
    "check_multimodal_param_count",
    "check_accumulation_steps",
    "check_squad_f1",
]


# --------------------------------------------------------------------------- result
@dataclass
class CheckResult:
    """Outcome of a check: ``bool(result)`` says if it passed; ``repr`` is the feedback."""

    correct: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    def __repr__(self) -> str:
        return self.message


def _ok(message: str) -> CheckResult:
    return CheckResult(True, "Correct! " + message)


def _no(message: str) -> CheckResult:
    return CheckResult(False, "Not yet: " + message)


def _missing(what: str) -> CheckResult:
    return CheckResult(False, f"No answer yet: replace the placeholder with {what}, then run the cell again.")


def _is_blank(answer) -> bool:
    return answer is None or answer is Ellipsis


# --------------------------------------------------------------------------- helpers
def _one_number(answer, what: str):
    """A tensor, numpy array or numpy scalar holding one number -> that Python number (else a CheckResult)."""
    if isinstance(answer, (torch.Tensor, np.ndarray)):
        if answer.shape != () and math.prod(answer.shape) != 1:
            return _no(f"{what} should be one number; got an array of shape {tuple(answer.shape)}.")
        return answer.item()
    if isinstance(answer, np.generic):  # np.int64 from .argmax(), np.float32 from a mean
        return answer.item()
    return answer


def _as_int(answer, what: str) -> tuple[Optional[int], Optional[CheckResult]]:
    """Turn a numeric answer into an int, or explain why it cannot be one."""
    if isinstance(answer, (bool, np.bool_)):
        return None, _no(f"{what} should be a whole number, not {answer!r}.")
    if isinstance(answer, str):
        try:
            answer = float(answer.replace(",", "").replace("_", ""))
        except ValueError:
            return None, _no(f"{what} should be a number; got the text {answer!r}.")
    answer = _one_number(answer, what)
    if isinstance(answer, CheckResult):
        return None, answer
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        return None, _no(f"{what} should be a number; got {type(answer).__name__}.")
    if isinstance(answer, float) and not answer.is_integer():
        return None, _no(f"{what} is a whole number; got {answer!r}. Give the exact count, not a rounded value.")
    return int(answer), None


def _named_mistake(answer: int, expected: int, mistakes: list[tuple[int, str]],
                   shown: Optional[str] = None) -> Optional[CheckResult]:
    """The feedback naming every known mistake that gives ``answer`` (None when none does).
    A "mistake" that happens to equal the truth is ignored."""
    matched = [message for value, message in mistakes if value == answer and value != expected]
    if not matched:
        return None
    return _no(f"{answer if shown is None else shown} " + " Or it ".join(matched))


def _check_count(answer: int, expected: int, mistakes: list[tuple[int, str]], what: str, why: str) -> CheckResult:
    """Compare an integer answer with the expected one and with known wrong answers.

    ``mistakes``: (wrong value, what it means) pairs; different mistakes that give the same
    number are all named, and a "mistake" that happens to equal the truth is ignored.
    """
    if answer == expected:
        return _ok(why)
    named = _named_mistake(answer, expected, mistakes, shown=f"{answer:,}")
    if named is not None:
        return named
    rel = abs(answer - expected) / expected
    if rel < 0.01:
        return _no(f"{answer:,} is within 1% of {what} but not exact (off by {answer - expected:+,}). "
                   "Look for a small term: norms, gates, or a rounding of the feed-forward width.")
    if rel < 0.5:
        return _no(f"{answer:,} is off by {100 * (answer - expected) / expected:+.1f}%. "
                   "Write the count term by term and compare each with the model's parameters.")
    return _no(f"{answer:,} is far from {what} (off by a factor {answer / expected:.3g}). "
               "Check which dimensions multiply in each term.")


def _call(fn: Callable, args: tuple, name: str) -> tuple[Optional[torch.Tensor], Optional[CheckResult]]:
    """Run the student's function; turn an exception into feedback."""
    try:
        out = fn(*args)
    except Exception as e:  # the student's code: report whatever went wrong
        return None, _no(f"calling {name} raised {type(e).__name__}: {e}")
    if out is None:
        return None, _no(f"{name} returned None: compute the result and `return` it.")
    if not isinstance(out, torch.Tensor):
        return None, _no(f"{name} should return a torch.Tensor; it returned {type(out).__name__}.")
    return out, None


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def _diagnose(out: torch.Tensor, expected: torch.Tensor, mistakes: dict[str, torch.Tensor], name: str) -> CheckResult:
    if out.shape != expected.shape:
        return _no(f"{name} returned shape {tuple(out.shape)}; expected {tuple(expected.shape)}.")
    for message, wrong in mistakes.items():
        if _same(out, wrong):
            return _no(message)
    err = (out.float() - expected.float()).abs().max().item()
    return _no(f"{name} returns the right shape but the wrong values (largest difference {err:.3g}). "
               "Go through the formula one step at a time on a tiny input.")


# --------------------------------------------------------------------------- notebook 2: LLaMA blocks
def check_rmsnorm(fn: Optional[Callable]) -> CheckResult:
    """Exercise: write ``my_rmsnorm(x, weight, eps)`` = x / sqrt(mean(x^2) + eps) * weight over the last dim."""
    if _is_blank(fn):
        return _missing("your function my_rmsnorm(x, weight, eps)")
    if not callable(fn):
        return _no(f"pass the function itself (my_rmsnorm), not {type(fn).__name__}.")
    gen = torch.Generator().manual_seed(0)
    eps = 1e-5
    # Small values make eps matter; a non-zero mean tells RMSNorm from LayerNorm.
    x = (torch.randn(3, 4, 8, generator=gen) + 0.5) * 3e-3
    weight = torch.rand(8, generator=gen) + 0.5
    out, err = _call(fn, (x.clone(), weight.clone(), eps), "my_rmsnorm(x, weight, eps)")
    if err is not None:
        return err
    norm = RMSNorm(8, eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        expected = norm(x)
    ms = x.pow(2).mean(-1, keepdim=True)
    centered = x - x.mean(-1, keepdim=True)
    mistakes = {
        "you subtract the mean first: that is LayerNorm. RMSNorm only rescales, it never centres.":
            centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * weight,
        "the values are right before the last step: multiply by the learned `weight` at the end.":
            x * torch.rsqrt(ms + eps),
        "eps belongs inside the square root: x / sqrt(mean(x^2) + eps).":
            x / (ms.sqrt() + eps) * weight,
        "eps is missing: with tiny inputs, mean(x^2) is about the size of eps, so it matters.":
            x * torch.rsqrt(ms) * weight,
        "you divide by mean(x^2) + eps; take its square root first.":
            x / (ms + eps) * weight,
        "you sum x^2 over the features; RMSNorm takes the mean (root *mean* square).":
            x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight,
        "you average over the wrong dimension: normalise over the last one (the features), keepdim=True.":
            x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + eps) * weight,
        "you average over all elements; each token (last dimension) is normalised on its own.":
            x * torch.rsqrt(x.pow(2).mean() + eps) * weight,
    }
    if _same(out, expected):
        return _ok("Every token vector is divided by its root mean square, then scaled by the learned weight.")
    return _diagnose(out, expected, mistakes, "my_rmsnorm")


def llama_param_count(
    config: LlamaConfig,
    tied_embeddings: bool = False,
    norms: bool = True,
    ffn_hidden: Optional[int] = None,
    ffn_matrices: int = 3,
    kv_heads: Optional[int] = None,
) -> int:
    """Parameter count of a LLaMA shape, term by term (the variants model common mistakes)."""
    C, N, V, d = config.dim, config.n_layers, config.vocab_size, config.head_dim
    hidden = config.ffn_hidden_dim if ffn_hidden is None else ffn_hidden
    kv = config.n_kv_heads if kv_heads is None else kv_heads
    attention = C * C + 2 * C * kv * d + C * C  # wq, wk, wv, wo
    ffn = ffn_matrices * C * hidden  # w1, w2, w3
    per_layer = attention + ffn + (2 * C if norms else 0)
    head = 0 if tied_embeddings else V * C
    return V * C + N * per_layer + (C if norms else 0) + head


def check_llama_param_count(answer, config: Optional[LlamaConfig] = None) -> CheckResult:
    """Exercise: count the parameters of a LLaMA shape by hand (default: LLaMA-13B)."""
    if config is None:
        config = LlamaConfig(dim=5120, n_layers=40, n_heads=40)
    if _is_blank(answer):
        return _missing("your count (an integer)")
    n, err = _as_int(answer, "the parameter count")
    if err is not None:
        return err
    with torch.device("meta"):  # shapes only, no memory
        expected = Llama(config).num_params()
    C, V = config.dim, config.vocab_size
    mistakes = [  # (wrong value, what it means)
        (expected - V * C,
         f"is one {V}x{C} matrix short: LLaMA has both a token embedding and a separate output head "
         "(they are not tied)."),
        (llama_param_count(config, norms=False),
         "leaves out the RMSNorm weights: two per block (C each) plus the final norm."),
        (llama_param_count(config, ffn_hidden=4 * C),
         f"uses a feed-forward width of 4*C = {4 * C}; SwiGLU uses about 2/3 of that, rounded up to "
         f"multiple_of: config.ffn_hidden_dim = {config.ffn_hidden_dim}."),
        (llama_param_count(config, ffn_hidden=int(8 * C / 3)),
         f"uses 8C/3 = {int(8 * C / 3)} for the feed-forward width without rounding up to "
         f"multiple_of={config.multiple_of}: it is {config.ffn_hidden_dim}."),
        (llama_param_count(config, ffn_matrices=2),
         "counts two feed-forward matrices; SwiGLU has three (w1 and w3 go up, w2 comes down)."),
        (llama_param_count(config, kv_heads=config.n_heads),
         f"gives wk and wv {config.n_heads} heads; with grouped-query attention they have "
         f"n_kv_heads={config.n_kv_heads}."),
    ]
    return _check_count(n, expected, mistakes, "the parameter count",
                        f"{expected:,} parameters: embedding + output head (V*C each), and per block "
                        "wq, wk, wv, wo, w1, w2, w3 plus two norms, plus the final norm.")


def check_kv_cache_bytes(answer, config: Optional[LlamaConfig] = None, seq_len: int = 2048,
                         batch_size: int = 1, bytes_per_value: int = 2) -> CheckResult:
    """Exercise: memory of the KV cache for one sequence (default: LLaMA-7B, 2048 tokens, fp16)."""
    if config is None:
        config = LlamaConfig()
    if _is_blank(answer):
        return _missing("the number of bytes (an integer)")
    n, err = _as_int(answer, "the number of bytes")
    if err is not None:
        return err
    per_value = batch_size * seq_len * config.n_layers * config.n_kv_heads * config.head_dim
    expected = 2 * per_value * bytes_per_value
    mistakes = [  # (wrong value, what it means)
        (per_value * bytes_per_value, "counts only the keys (or only the values); the cache stores both."),
        (2 * per_value, f"counts numbers, not bytes: each one takes {bytes_per_value} bytes."),
        (2 * per_value * 4, "uses 4 bytes per number (fp32); the question asks for fp16 (2 bytes)."),
        (2 * batch_size * seq_len * config.n_layers * config.n_heads * config.head_dim * bytes_per_value,
         f"uses n_heads={config.n_heads}; keys/values have n_kv_heads={config.n_kv_heads} heads."),
        (2 * batch_size * seq_len * config.n_kv_heads * config.head_dim * bytes_per_value,
         f"is the size for one layer; every one of the {config.n_layers} layers keeps its own cache."),
    ]
    return _check_count(n, expected, mistakes, "the cache size",
                        f"{expected:,} bytes = 2 (k and v) x {config.n_layers} layers x {seq_len} tokens x "
                        f"{config.n_kv_heads} kv heads x {config.head_dim} x {bytes_per_value} bytes "
                        f"= {expected / 2**30:.3g} GiB.")


# --------------------------------------------------------------------------- notebook 3: zero-init attention
def check_zero_init_attention(fn: Optional[Callable]) -> CheckResult:
    """Exercise: write Eq. 5-8 yourself: ``fn(q, k, v, prompt_k, prompt_v, gate) -> S^g V``.

    q, k, v: (B, H, T, d) with causal token attention; prompt_k, prompt_v: (1, H, K, d);
    gate: the effective gate (already tanh'ed), shape (1, H, 1, 1).
    """
    if _is_blank(fn):
        return _missing("your function my_zero_init_attention(q, k, v, prompt_k, prompt_v, gate)")
    if not callable(fn):
        return _no(f"pass the function itself, not {type(fn).__name__}.")
    gen = torch.Generator().manual_seed(0)
    B, H, T, K, d = 2, 3, 5, 4, 8
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for _ in range(3))
    pk, pv = (torch.randn(1, H, K, d, generator=gen) for _ in range(2))
    gate = torch.tensor([0.5, -0.25, 0.9]).view(1, H, 1, 1)
    args = (q, k, v, pk, pv, gate)
    out, err = _call(fn, tuple(a.clone() for a in args), "your function")
    if err is not None:
        return err
    expected = zero_init_attention_literal(*args)

    # The mistakes, written the way people write them.
    scale = 1 / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    keys, values = torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)

    def two_softmax(S, g_prompt=gate, g_tokens=1.0, mask=True):
        S_K, S_T = S[..., :K], S[..., K:]
        if mask:
            S_T = S_T.masked_fill(~causal, float("-inf"))
        return torch.cat([g_prompt * S_K.softmax(-1), g_tokens * S_T.softmax(-1)], -1) @ values

    S = q @ keys.transpose(-2, -1) * scale
    full_mask = torch.cat([torch.ones(T, K, dtype=torch.bool), causal], 1)
    one = S.masked_fill(~full_mask, float("-inf")).softmax(-1)
    mistakes = {
        "you use ONE softmax over prompts and tokens together. Eq. 7 has two separate softmaxes: "
        "softmax(S^K) for the prompts and softmax(S^{M+1}) for the tokens, so the tokens' attention "
        "still sums to 1 and the output is unchanged when the gate is 0.":
            torch.cat([gate * one[..., :K], one[..., K:]], -1) @ values,
        "one softmax over prompts and tokens, and no gate. Eq. 7 gates the prompt part and uses "
        "two separate softmaxes.": one @ values,
        "one softmax over prompts and tokens, and no causal mask. Eq. 7 uses two separate softmaxes "
        "(prompts | tokens), gates the prompt part, and a token sees only itself and earlier tokens.":
            S.softmax(-1) @ values,
        "the gate multiplies the token part; it belongs on the prompt part: [g * softmax(S^K); softmax(S^{M+1})].":
            two_softmax(S, g_prompt=1.0, g_tokens=gate),
        "the prompt part is not gated: multiply softmax(S^K) by the gate.":
            two_softmax(S, g_prompt=1.0),
        "the gate you are given is already the effective gate (tanh(g)); do not apply tanh again.":
            two_softmax(S, g_prompt=torch.tanh(gate)),
        "the causal mask is missing: a token may only attend to itself and earlier tokens "
        "(the prompts are visible to every token).": two_softmax(S, mask=False),
        "the scores are not scaled: divide Q K^T by sqrt(d) (Eq. 5).":
            two_softmax(q @ keys.transpose(-2, -1)),
        "you divide the scores by d; Eq. 5 divides by sqrt(d).":
            two_softmax(q @ keys.transpose(-2, -1) / d),
    }
    if _same(out, expected):
        return _ok("Concatenated scores (Eq. 5-6), two separate softmaxes with the gate on the prompt "
                   "part (Eq. 7), times the concatenated values (Eq. 8).")
    return _diagnose(out, expected, mistakes, "your function")


def check_adapter_param_count(answer, prompt_len: int = 10, layers: int = 30, dim: int = 4096,
                              n_heads: int = 32, n_layers: int = 32) -> CheckResult:
    """Exercise: trainable values of LLaMA-Adapter (default: 7B, K=10, L=30 of N=32, C=4096, H=32, gate per head)."""
    if _is_blank(answer):
        return _missing("the number of trainable values (an integer)")
    n, err = _as_int(answer, "the number of trainable values")
    if err is not None:
        return err
    K, L, C, H = prompt_len, layers, dim, n_heads
    prompts, gates = K * L * C, L * H
    expected = prompts + gates
    mistakes = [  # (wrong value, what it means)
        (prompts, f"counts the prompts (K*L*C) but not the gates: one per head in each adapted layer, "
                  f"L*H = {gates:,}."),
        (prompts + L, "counts one gate per layer (as PEFT does); the paper's release learns one gate per "
                      "head: L*H."),
        (K * n_layers * C + n_layers * H,
         f"adapts all N={n_layers} layers; LLaMA-Adapter puts prompts in the top L={L} layers only."),
        (K * n_layers * C,
         f"adapts all N={n_layers} layers and forgets the gates. Prompts go in the top L={L} layers; add L*H gates."),
        (2 * prompts + gates, "counts separate key and value prompts. There is one prompt P_l (K x C) per "
                              "layer; its keys and values come from the layer's frozen W_k and W_v."),
        (K * L * (C // H) + gates, f"uses the head width d={C // H}; prompts live in the residual width C={C}."),
        (3 * prompts + gates, "adds new query/key/value projections; the adapter has none, it reuses the "
                              "frozen W_k and W_v."),
    ]
    return _check_count(n, expected, mistakes, "the adapter's size",
                        f"{prompts:,} prompt values (K*L*C) + {gates:,} gates (L*H) = {expected:,}: "
                        f"about {expected / 6.74e9 * 100:.3f}% of LLaMA-7B.")


STEP0_NAMES = ("prompt", "gate", "wq", "wk", "wv", "wo", "embedding")


def check_step0_gradients(answer: Optional[Iterable[str]]) -> CheckResult:
    """Exercise: which tensors get a NON-ZERO gradient at the very first training step?

    Answer with a set of names from ``STEP0_NAMES``: "prompt", "gate", "wq", "wk", "wv", "wo", "embedding".
    """
    if _is_blank(answer):
        return _missing('a set of names, e.g. {"prompt", "wq"}')
    if isinstance(answer, str):
        answer = {answer}
    try:
        names = {str(a).strip().lower() for a in answer}
        names = {n[:-1] if n not in STEP0_NAMES and n[:-1] in STEP0_NAMES else n for n in names}  # "gates"
    except TypeError:
        return _no(f"answer with a set of names such as {{'gate'}}; got {type(answer).__name__}.")
    unknown = names - set(STEP0_NAMES)
    if unknown:
        return _no(f"unknown name(s) {sorted(unknown)}; choose from {list(STEP0_NAMES)}.")
    problems = []
    if "prompt" in names:
        problems.append("the prompts' whole contribution is multiplied by tanh(g) = tanh(0) = 0, so the loss "
                        "does not depend on them yet: their gradient is exactly zero at step 0.")
    frozen = sorted(names & {"wq", "wk", "wv", "wo", "embedding"})
    if frozen:
        problems.append(f"{frozen} belong to the frozen base model (requires_grad=False): they get no gradient "
                        "at all, at any step.")
    if "gate" not in names:
        problems.append("the gate does get a gradient: d tanh(g)/dg = 1 at g = 0, times the prompt attention "
                        "output softmax(Q P_k^T / sqrt(d)) P_v, which is not zero (prompts start random).")
    if problems:
        return _no(" ".join(problems))
    return _ok("Only the gate. It opens first; once tanh(g) is no longer 0 the prompts start to learn too.")


# --------------------------------------------------------------------------- notebook 4: pretraining
def _as_float(answer, what: str) -> tuple[Optional[float], Optional[CheckResult]]:
    if isinstance(answer, (bool, np.bool_)):
        return None, _no(f"{what} should be a number, not {answer!r}.")
    answer = _one_number(answer, what)
    if isinstance(answer, CheckResult):
        return None, answer
    if isinstance(answer, str):
        try:
            answer = float(answer)
        except ValueError:
            return None, _no(f"{what} should be a number; got the text {answer!r}.")
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        return None, _no(f"{what} should be a number; got {type(answer).__name__}.")
    return float(answer), None


def check_uniform_loss(answer, vocab_size: int = 640) -> CheckResult:
    """Exercise: the cross-entropy loss of a model that predicts every token with equal probability."""
    if _is_blank(answer):
        return _missing("a number (the loss in nats)")
    x, err = _as_float(answer, "the loss")
    if err is not None:
        return err
    expected = math.log(vocab_size)

    def near(a: float, b: float) -> bool:
        return abs(a - b) <= 2e-3 * max(1.0, abs(b))

    if near(x, expected):
        return _ok(f"-log(1/V) = ln({vocab_size}) = {expected:.3f} nats. A freshly initialised model starts "
                   "close to this: it knows nothing yet, so every token is equally likely.")
    mistakes = [
        (math.log2(vocab_size), f"is log2({vocab_size}), the loss in bits. PyTorch's cross-entropy uses the natural "
                                "log (nats)."),
        (math.log10(vocab_size), "uses log10; PyTorch's cross-entropy uses the natural log."),
        (1 / vocab_size, "is the probability of each token. The loss is -log of that probability."),
        (-expected, "has the wrong sign: the loss is -log p, and log p < 0, so the loss is positive."),
        (math.log(32000), f"uses LLaMA's vocabulary of 32000; the tiny model has V = {vocab_size}."),
        (float(vocab_size), "is V itself; the loss is the log of it."),
    ]
    for value, message in mistakes:
        if near(x, value):
            return _no(f"{x:g} {message}")
    return _no(f"{x:g} is not it. If every one of the V = {vocab_size} tokens has probability 1/V, what is "
               "-log(probability of the right token)?")


# --------------------------------------------------------------------------- notebook 5: instruction tuning
def check_target_token_count(answer, record: dict, tokenizer, max_seq_len: int = 512) -> CheckResult:
    """Exercise: how many tokens of this Alpaca example count in the loss (response tokens + EOS)?"""
    from ..data import IGNORE_INDEX, encode_example, format_prompt

    if _is_blank(answer):
        return _missing("an integer")
    n, err = _as_int(answer, "the number of tokens")
    if err is not None:
        return err
    tokens, labels, _ = encode_example(tokenizer, record, max_seq_len)
    expected = sum(1 for x in labels[1:] if x != IGNORE_INDEX)  # position t predicts labels[t + 1]
    response = tokenizer.encode(record["output"], bos=False, eos=False)
    prompt = tokenizer.encode(format_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False)
    if n == expected:
        return _ok(f"the {len(response)} response tokens plus EOS: {expected}. The {len(prompt)} prompt tokens "
                   "(BOS included) are labelled -100 and ignored by the loss.")
    mistakes = [
        (len(response), "counts the response tokens but not EOS: the model must also learn to stop."),
        (len(tokens), "counts every token; the prompt's labels are -100, so only the response is learned."),
        (len(tokens) - 1, "counts every prediction; the prompt positions are masked (-100), only the response counts."),
        (len(prompt), "is the prompt's length: those are exactly the tokens the loss ignores."),
        (len(record["output"].split()), "counts words; the loss counts tokens (tokenizer.encode the output)."),
        (len(record["output"].split()) + 1, "counts words (+ EOS); the loss counts tokens, and a word may be "
                                            "several tokens."),
    ]
    named = _named_mistake(n, expected, mistakes)
    if named is not None:
        return named
    return _no(f"{n} is not it. Encode the example with adapterlab.data.encode_example and count the labels "
               "that are not -100.")


# --------------------------------------------------------------------------- notebook 6: gate dynamics
def _as_int_set(answer, what: str) -> tuple[Optional[set], Optional[CheckResult]]:
    if isinstance(answer, (int, str)) or not hasattr(answer, "__iter__"):
        answer = [answer]
    try:
        values = {int(a) for a in answer}
    except (TypeError, ValueError):
        return None, _no(f"{what} should be a set of integers such as {{0, 1}}; got {answer!r}.")
    return values, None


def check_adapted_layers(answer, n_layers: int = 4, layers: int = 2) -> CheckResult:
    """Exercise: which layer indices (0-based) carry an adapter with AdapterConfig(layers=L) on an N-layer model?"""
    if _is_blank(answer):
        return _missing("a set of layer indices, e.g. {0, 1}")
    got, err = _as_int_set(answer, "the answer")
    if err is not None:
        return err
    expected = set(range(n_layers - layers, n_layers))
    if got == expected:
        return _ok(f"the top L={layers} of N={n_layers} layers: {sorted(expected)}. The paper adapts the top layers, "
                   "where the representations are most abstract (30 of LLaMA-7B's 32).")
    if got == set(range(layers)):
        return _no(f"{sorted(got)} are the bottom {layers} layers; LLaMA-Adapter inserts prompts in the TOP L layers.")
    if got == set(range(n_layers - layers + 1, n_layers + 1)):
        return _no(f"{sorted(got)} counts from 1; layer indices start at 0 (the last layer is {n_layers - 1}).")
    if len(got) != layers:
        return _no(f"you gave {len(got)} layer(s); AdapterConfig(layers={layers}) adapts exactly {layers}.")
    return _no(f"{sorted(got)} is not it: the adapter goes in the top L={layers} layers of the N={n_layers}.")


def check_most_open_layer(answer, log) -> CheckResult:
    """Exercise: in a gate log (a run folder, gates.jsonl, records or GateLog), which adapted layer
    has the largest mean |gate| over its heads at the last record? Answer with the layer index."""
    from ..gates import GateLog

    if _is_blank(answer):
        return _missing("a layer index (an integer)")
    n, err = _as_int(answer, "the layer index")
    if err is not None:
        return err
    g = log if isinstance(log, GateLog) else GateLog.from_records(log) if isinstance(log, (list, tuple)) else GateLog.read(log)
    last = g.gates[-1]  # (L, H)
    mean_abs = abs(last).mean(-1)
    expected = g.layers[int(mean_abs.argmax())]
    if n == expected:
        return _ok(f"layer {expected}: mean |gate| {mean_abs.max():.3f} at step {int(g.steps[-1])}. Per layer: "
                   + ", ".join(f"{layer}: {v:.3f}" for layer, v in zip(g.layers, mean_abs)) + ".")
    if n not in g.layers:
        return _no(f"layer {n} has no adapter; the adapted layers are {g.layers}.")
    if n == g.layers[int(abs(last).max(-1).argmax())]:
        return _no(f"layer {n} has the single most open head, but the question asks for the largest MEAN |gate| "
                   "over the heads of a layer.")
    if n == g.layers[int(last.mean(-1).argmax())]:
        return _no(f"layer {n} has the largest signed mean. Gates can be negative (the prompts then subtract); "
                   "compare the mean of |gate|.")
    if n == g.layers[int(abs(g.gates[0]).mean(-1).argmax())] and n != expected:
        return _no("that is the first record (step 0), where all gates are 0; look at the last record.")
    return _no(f"layer {n} is not the one. Take the last record, average |gate| over the heads of each layer, "
               "and pick the largest.")


# --------------------------------------------------------------------------- notebook 7: ablations
def check_training_state_bytes(answer, n_params: int, bytes_per_value: int = 4) -> CheckResult:
    """Exercise: fp32 training state per trainable parameter with AdamW: weight + gradient + 2 moments."""
    if _is_blank(answer):
        return _missing("a number of bytes (an integer)")
    n, err = _as_int(answer, "the number of bytes")
    if err is not None:
        return err
    expected = 4 * bytes_per_value * n_params
    mistakes = [
        (bytes_per_value * n_params, "counts the weights only; training also keeps a gradient and AdamW's two "
                                     "moments (exp_avg, exp_avg_sq) per parameter."),
        (2 * bytes_per_value * n_params, "counts weights and gradients; AdamW adds two moment estimates per parameter."),
        (3 * bytes_per_value * n_params, "is one tensor short: weight, gradient, and TWO AdamW moments = 4 per parameter."),
        (4 * 2 * n_params, "uses 2 bytes per value (fp16); the question keeps everything in fp32 (4 bytes)."),
        (4 * n_params, "counts the values, not the bytes: each fp32 value takes 4 bytes."),
    ]
    return _check_count(n, expected, mistakes, "the training state",
                        f"4 tensors (weight, gradient, exp_avg, exp_avg_sq) x {bytes_per_value} bytes x "
                        f"{n_params:,} = {expected:,} bytes ({expected / 1e9:.3g} GB). Activations come on top.")


# --------------------------------------------------------------------------- notebook 10: real checkpoints
def check_hf_to_meta_rows(fn: Optional[Callable]) -> CheckResult:
    """Exercise: write ``fn(w, n_heads)`` that reorders the rows of a Hugging Face q or k weight
    (n_heads*d, C) into Meta's layout: Meta's row h*d + 2i + c is HF's row h*d + c*d/2 + i."""
    from ..io.checkpoints import hf_to_meta_rows

    if _is_blank(fn):
        return _missing("your function my_hf_to_meta(w, n_heads)")
    if not callable(fn):
        return _no(f"pass the function itself, not {type(fn).__name__}.")
    n_heads, d, C = 3, 8, 5
    w = torch.arange(n_heads * d * C, dtype=torch.float32).reshape(n_heads * d, C)  # every row is different
    out, err = _call(fn, (w.clone(), n_heads), "my_hf_to_meta(w, n_heads)")
    if err is not None:
        return err
    expected = hf_to_meta_rows(w, n_heads)
    mistakes = {
        "your function returns the rows unchanged: HF stores the two halves of each rotary pair d/2 rows apart, "
        "Meta stores them next to each other, so the rows must be reordered.": w,
        "this is the opposite direction (Meta -> HF): the half that HF keeps at row c*d/2 + i must land at Meta's "
        "row 2i + c.": w.reshape(n_heads, d // 2, 2, C).transpose(1, 2).reshape(w.shape),
        "you reorder across the whole matrix as if it were one head; the permutation is applied within each "
        "head's d rows.": w.reshape(1, 2, n_heads * d // 2, C).transpose(1, 2).reshape(w.shape),
    }
    if _same(out, expected, tol=0):
        return _ok("within each head, row c*d/2 + i moves to row 2i + c: reshape (H, 2, d/2, C), swap the middle "
                   "axes, reshape back.")
    return _diagnose(out, expected, mistakes, "my_hf_to_meta")


# --------------------------------------------------------------------------- notebook 8: several GPUs
def check_accumulation_steps(answer, global_batch: int = 64, world_size: int = 8, micro_batch: int = 4) -> CheckResult:
    """Exercise: gradient-accumulation steps per optimizer step on each rank = global / world / micro."""
    if _is_blank(answer):
        return _missing("an integer")
    n, err = _as_int(answer, "the number of accumulation steps")
    if err is not None:
        return err
    per_rank = global_batch // world_size
    expected = math.ceil(per_rank / micro_batch)
    if n == expected:
        return _ok(f"each of the {world_size} ranks takes {global_batch} / {world_size} = {per_rank} examples of every "
                   f"global batch, {micro_batch} per forward pass: {expected} micro-batches, then one all-reduce "
                   "and one optimizer step, the same update as one process with the whole batch.")
    mistakes = [
        (math.ceil(global_batch / micro_batch), f"splits the whole global batch of {global_batch} on every rank; each "
                                                 f"rank only takes its share, {global_batch} / {world_size} = {per_rank}."),
        (per_rank, f"is the number of examples per rank ({per_rank}), not of micro-batches of {micro_batch}."),
        (world_size, "is the number of ranks; accumulation happens within each rank."),
        (global_batch // (world_size * micro_batch) * world_size, "counts micro-batches over all ranks; the question "
                                                                  "asks per rank."),
    ]
    named = _named_mistake(n, expected, mistakes)
    if named is not None:
        return named
    return _no(f"{n} is not it: how many examples of one global batch does one rank get, and how many forward "
               "passes of micro_batch examples does that take?")


# --------------------------------------------------------------------------- notebook 9: multi-modal
def check_multimodal_param_count(answer, visual_dim: int = 1024, prompt_len: int = 10, layers: int = 30,
                                 dim: int = 4096, n_heads: int = 32) -> CheckResult:
    """Exercise: trainable values of the multi-modal adapter = prompts + gates + the projection
    ``adapterlab.adapter.VisualProjection(visual_dim, dim)`` (count it from ``print(VisualProjection(...))``)."""
    from ..adapter import VisualProjection

    if _is_blank(answer):
        return _missing("the number of trainable values (an integer)")
    n, err = _as_int(answer, "the number of trainable values")
    if err is not None:
        return err
    K, L, C, H = prompt_len, layers, dim, n_heads
    with torch.device("meta"):  # the library's projection, counted without allocating it
        projection = VisualProjection(visual_dim, dim)
    proj = sum(p.numel() for p in projection.parameters())
    wide = 2 * visual_dim + (visual_dim + 1) * C + (C + 1) * C + 2 * C  # the same MLP with hidden width C
    adapter = K * L * C + L * H
    expected = adapter + proj
    mistakes = [
        (adapter, "counts the text adapter only; the multi-modal one adds the projection visual_proj."),
        (proj, "counts the projection only; the prompts and gates still train."),
        (adapter + L * proj, "gives every layer its own projection; there is one, shared: I_p is made once and "
                             "added to the prompts of all L layers."),
        (expected - L * H, "forgets the gates (L*H)."),
        (expected - sum(p.numel() for name, p in projection.named_parameters() if name.endswith("bias")),
         "leaves out the biases (of the Linear layers and the LayerNorms)."),
    ]
    for name, module in projection.named_children():
        count = sum(p.numel() for p in module.parameters())
        mistakes.append((expected - count, f"leaves out visual_proj.{name} ({type(module).__name__}, {count:,} values)."))
    return _check_count(n, expected, mistakes, "the multi-modal adapter's size",
                        f"prompts {K * L * C:,} + gates {L * H:,} + projection {proj:,} = {expected:,}. "
                        f"(The projection is a bottleneck, {visual_dim} -> {projection.hidden} -> {C}: {proj / 1e6:.2f}M "
                        f"values, where a hidden layer of width C would make it {wide / 1e6:.0f}M.)")


# --------------------------------------------------------------------------- notebook 11: beyond LLaMA
F1_PREDICTION = "the old red boat, the red one"  # the exercise's prediction and reference answers
F1_REFERENCES = ("The old boat in the harbour", "a red boat")


def _shared_words(pred: list, ref: list) -> int:
    """Words in both answers, as a bag: each counts min(times in pred, times in ref) times."""
    from collections import Counter

    return sum((Counter(pred) & Counter(ref)).values())


def _bag_f1(pred: list, ref: list, count: str = "bag", score: str = "f1") -> float:
    """Token F1 (or one of the usual slips: count "set" / "each", score "precision" / "recall" / "mean")."""
    if not pred or not ref:
        return float(pred == ref)
    if count == "set":
        pred, ref = sorted(set(pred)), sorted(set(ref))
    shared = sum(w in ref for w in pred) if count == "each" else _shared_words(pred, ref)  # "each": repeats included
    if shared == 0:
        return 0.0
    p, r = shared / len(pred), shared / len(ref)
    return {"f1": 2 * p * r / (p + r), "precision": p, "recall": r, "mean": (p + r) / 2}[score]


def check_squad_f1(answer, prediction: str = F1_PREDICTION, references: Iterable[str] = F1_REFERENCES) -> CheckResult:
    """Exercise: the SQuAD F1 of ``prediction`` against a question's ``references`` (a fraction in
    [0, 1]; a percentage is accepted too): normalise, count shared words as a bag, F1 = 2PR / (P + R),
    the best over the references; no references (v2.0's no answer): 1 if the prediction is empty, else 0."""
    import string

    from ..metrics.squad import answer_tokens, normalize_answer, score_question

    if _is_blank(answer):
        return _missing("a number between 0 and 1 (the F1 score)")
    value, err = _as_float(answer, "the F1 score")
    if err is not None:
        return err
    refs = [r for r in references if normalize_answer(r)] or [""]
    expected = score_question(prediction, refs)[1]
    pred = answer_tokens(prediction)
    close = lambda a, b: abs(a - b) < 0.005  # noqa: E731 (answers rounded to two or three decimals pass)
    if close(value, expected) or (value > 1 and close(value / 100, expected)):
        if refs == [""]:
            why = "No reference answer: F1 is 1 exactly when the prediction is empty after normalisation, else 0."
        else:
            steps = []
            for r in refs:
                ref = answer_tokens(r)
                shared = _shared_words(pred, ref)
                steps.append(f"against {' '.join(ref)!r}: {shared} shared, P = {shared}/{len(pred)}, "
                             f"R = {shared}/{len(ref)}, F1 = {_bag_f1(pred, ref):.3f}")
            why = (f"The prediction normalises to {' '.join(pred)!r} ({len(pred)} words); " + "; ".join(steps)
                   + f"; the best over the references: {expected:.3f}.")
        return _ok(why)

    raw, lower = (lambda t: t.split()), (lambda t: t.lower().split())
    keep_articles = lambda t: "".join(c for c in t.lower() if c not in string.punctuation).split()  # noqa: E731
    best = lambda words, **kw: max(_bag_f1(words(prediction), words(r), **kw) for r in refs)  # noqa: E731
    mistakes = [
        (best(raw), "compares the words as they are written. SQuAD normalises both answers first: lower case, "
                    "no punctuation, no articles (a, an, the), single spaces - so 'boat,' and 'boat' are one word."),
        (best(lower), "lower-cases but keeps the punctuation and the articles: 'boat,' is not 'boat' until the "
                      "punctuation goes. Normalise fully (adapterlab.metrics.squad.normalize_answer)."),
        (best(keep_articles), "keeps the articles: the normalisation drops a, an and the, so 'the' is never a "
                              "shared word."),
        (_bag_f1(pred, answer_tokens(refs[0])), "scores against the first reference only; a question scores the "
                                                "best over all its reference answers."),
        (sum(_bag_f1(pred, answer_tokens(r)) for r in refs) / len(refs),
         "averages over the references; SQuAD takes the best (the maximum) of them."),
        (best(answer_tokens, count="set"), "counts each distinct word once. F1 counts words as a bag: a word the "
                                           "prediction repeats counts min(times in prediction, times in reference) times."),
        (best(answer_tokens, count="each"), "counts every predicted word that occurs in the reference, repeats "
                                            "included; a shared word counts at most as often as the reference has "
                                            "it: min(times in prediction, times in reference)."),
        (best(answer_tokens, score="precision"), "is the precision (shared / predicted words); F1 also needs the "
                                                 "recall (shared / reference words): 2PR / (P + R)."),
        (best(answer_tokens, score="recall"), "is the recall (shared / reference words); F1 also needs the "
                                              "precision (shared / predicted words): 2PR / (P + R)."),
        (best(answer_tokens, score="mean"), "averages precision and recall; F1 is their harmonic mean, 2PR / (P + R)."),
        (score_question(prediction, refs)[0], "is the exact match (EM); F1 gives partial credit for the shared words."),
    ]
    if refs == [""]:
        mistakes = [(1 - expected, "for a question without an answer (SQuAD v2.0) F1 is 1 exactly when the "
                                   "prediction is empty after normalisation, and 0 otherwise.")]
    scale = 100 if value > 1 else 1  # the same slips, given as a percentage
    matched = [m for v, m in mistakes if close(value / scale, v) and not close(v, expected)]
    if matched:
        return _no(f"{value:g} " + " Or it ".join(matched))
    if not 0 <= value <= 100:
        return _no(f"{value:g} is not a score: F1 lies between 0 and 1 (0 and 100 as a percentage).")
    return _no(f"{value:g} is not it. Normalise both answers, count the shared words as a bag, P = shared / "
               "predicted words, R = shared / reference words, F1 = 2PR / (P + R), and keep the best reference.")
