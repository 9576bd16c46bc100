# %% [markdown]
# # 2. LLaMA from its blocks
#
# **Goal.** Take LLaMA apart and look at each piece on tensors small enough to print:
# RMSNorm, rotary position embeddings, grouped-query attention, the SwiGLU feed-forward,
# the transformer block, and the KV cache used for generation. Then put the pieces back
# together and check that our model computes the *same logits* as Hugging Face
# `transformers`' `LlamaForCausalLM` on the same weights.
#
# Everything here comes from `adapterlab.model`, which is written top to bottom in the
# order the data flows:
#
# ```
# tokens -> embedding -> [ RMSNorm -> attention (rotary, grouped-query, KV cache)
#                          -> RMSNorm -> SwiGLU feed-forward ] x n_layers
#        -> RMSNorm -> output head -> logits
# ```
#
# LLaMA-Adapter (notebook 3) changes exactly one of these pieces: the attention.
# So it pays to know them well.
#
# **Runtime:** under half a minute on 2 CPU cores (12 s measured), with or without a cache.

# %%
import math
import tempfile

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from adapterlab.model import (
    Attention, FeedForward, KVCache, Llama, LlamaConfig, RMSNorm, apply_rope, init_weights, rope_angles,
)
from adapterlab.exercises.llama_from_blocks import check_kv_cache_bytes, check_llama_param_count, check_rmsnorm

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3)})

# %% [markdown]
# A model shape is a `LlamaConfig`. Its field names are those of Meta's `params.json`.
# We use a tiny one throughout: width C = 64, 4 query heads but only 2 key/value heads
# (grouped-query attention, as in LLaMA-2 70B and LLaMA-3).

# %%
# NBVAL_CHECK_OUTPUT
config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32, max_seq_len=64)
print(config)
print("head width d = dim / n_heads =", config.head_dim)
print("feed-forward width =", config.ffn_hidden_dim)

# %% [markdown]
# ## 1. RMSNorm
#
# Before attention and before the feed-forward, each token vector $x \in \mathbb{R}^C$ is
# rescaled to unit root mean square, then multiplied by a learned weight:
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{C}\sum_i x_i^2 + \epsilon}} \odot w$$
#
# Unlike LayerNorm it does not subtract the mean, and it has no bias. Cheaper, and it works
# as well.

# %%
# NBVAL_CHECK_OUTPUT
x = torch.randn(2, 3, 8) + 3  # (B, T, C): rms about 3, mean about 3
norm = RMSNorm(8)
y = norm(x)
print("rms of every token after RMSNorm:", y.pow(2).mean(-1).sqrt().round(decimals=3).tolist())
print("the mean is kept (not subtracted):", bool((y.mean(-1).abs() > 0.1).all()))
print("learnable parameters:", [(name, tuple(p.shape)) for name, p in norm.named_parameters()])

# %%
v = x[0, 0]
fig, ax = plt.subplots()
width = 0.27
idx = torch.arange(8)
ax.bar(idx - width, v, width, label="x")
ax.bar(idx, F.layer_norm(v, (8,)).detach(), width, label="LayerNorm(x)")
ax.bar(idx + width, norm(v).detach(), width, label="RMSNorm(x)")
ax.axhline(0, color="k", lw=0.5)
ax.set_xlabel("feature")
ax.set_title("RMSNorm only rescales; LayerNorm also centres")
ax.legend(loc="upper left", bbox_to_anchor=(1, 1));

# %% [markdown]
# ## 2. Rotary position embeddings (RoPE)
#
# Attention by itself does not know where tokens are. LLaMA *rotates* each query and key
# according to its position: the head vector is cut into pairs
# $(x_0, x_1), (x_2, x_3), \dots$ and pair $i$ at position $m$ is turned by the angle
# $m \cdot \theta^{-2i/d}$ (with $\theta = 10000$). The first pairs spin fast, the last ones
# slowly, like the hands of a clock.
#
# `rope_angles` gives the cosines and sines; `apply_rope` rotates a `(B, H, T, d)` tensor.

# %%
# NBVAL_CHECK_OUTPUT
d = 8
cos, sin = rope_angles(d, torch.arange(16), theta=10000.0)
print("cos, sin shapes (positions, pairs):", tuple(cos.shape), tuple(sin.shape))

# %%
cos64, _ = rope_angles(64, torch.arange(128), theta=10000.0)  # a LLaMA-sized head: d = 64 -> 32 pairs
fig, ax = plt.subplots(figsize=(7, 3))
im = ax.imshow(cos64.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
ax.set_xlabel("position m")
ax.set_ylabel("pair i")
ax.set_title("cos of each pair's rotation angle: the first pairs spin fast, the last slowly")
fig.colorbar(im, ax=ax);


# %% [markdown]
# A rotation keeps lengths, and the dot product of a rotated query and a rotated key depends
# only on the **distance** between their positions, not on where they are. That is why RoPE
# encodes relative position. Let us check both facts.

# %%
def at_position(vec: torch.Tensor, pos: int) -> torch.Tensor:
    """Rotate one head vector (d,) as if it sat at position pos."""
    cos, sin = rope_angles(vec.shape[-1], torch.tensor([pos]), theta=10000.0)
    return apply_rope(vec.view(1, 1, 1, -1), cos, sin).view(-1)


q, k = torch.randn(64), torch.randn(64)

# %%
# NBVAL_CHECK_OUTPUT
print("length kept:", torch.allclose(at_position(q, 37).norm(), q.norm()))
scores = [at_position(q, m) @ at_position(k, m - 3) for m in (3, 10, 50)]
print("q.k at distance 3, from positions 3, 10 and 50 equal:", all(torch.allclose(s, scores[0], atol=1e-4) for s in scores))

# %%
distance = torch.arange(0, 256)
cos_n, sin_n = rope_angles(64, distance, theta=10000.0)
vectors = torch.randn(512, 1, 1, 64)  # many random head vectors
rotated = apply_rope(vectors.expand(-1, 1, len(distance), -1), cos_n, sin_n)  # each one at positions 0..255
similarity = ((rotated * vectors).sum(-1) / vectors.pow(2).sum(-1)).mean(0).flatten()  # average over vectors
fig, ax = plt.subplots()
ax.plot(distance, similarity)
ax.set_xlabel("distance between query and key positions")
ax.set_ylabel("q . R(n) q / |q|^2")
ax.set_title("On average, a vector looks less like itself the further apart the positions");

# %% [markdown]
# ## 3. Grouped-query attention
#
# Each query head has its own $W_q$ slice. With grouped-query attention there are fewer key
# and value heads (`n_kv_heads`); each serves `n_heads / n_kv_heads` query heads. Fewer
# key/value heads means a smaller KV cache at generation time, which is what limits batch
# size on a GPU.

# %%
# NBVAL_CHECK_OUTPUT
attn = Attention(config, layer_id=0)
for name, p in attn.named_parameters():
    print(f"{name:10s} {tuple(p.shape)}")
print("query heads per key/value head:", config.n_heads // config.n_kv_heads)

# %% [markdown]
# Grouped-query attention is *exactly* ordinary multi-head attention in which each key/value
# head is copied for its group of query heads. We build a multi-head layer with the copied
# weights and compare:

# %%
mha_config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=100, multiple_of=32)
mha = Attention(mha_config, layer_id=0)
group = config.n_heads // config.n_kv_heads
with torch.no_grad():
    mha.wq.weight.copy_(attn.wq.weight)
    mha.wo.weight.copy_(attn.wo.weight)
    for name in ("wk", "wv"):  # (n_kv_heads * d, C) -> (n_heads * d, C), each head repeated `group` times
        w = getattr(attn, name).weight.unflatten(0, (config.n_kv_heads, config.head_dim))
        getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).flatten(0, 1))

T = 6
x = torch.randn(1, T, config.dim)
cos, sin = rope_angles(config.head_dim, torch.arange(T), config.rope_theta)

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    print("output shape:", tuple(attn(x, cos, sin).shape))
    print("grouped-query == multi-head with copied k/v heads:", torch.allclose(attn(x, cos, sin), mha(x, cos, sin), atol=1e-6))

# %% [markdown]
# ## 4. SwiGLU feed-forward
#
# $$\mathrm{FFN}(x) = W_2\,\big(\mathrm{SiLU}(W_1 x) \odot W_3 x\big)$$
#
# Three matrices instead of two: $W_3 x$ is a learned *gate* on $\mathrm{SiLU}(W_1 x)$. To
# keep the parameter count of a classic 4C-wide feed-forward, the width is
# $\tfrac{2}{3} \cdot 4C$, rounded up to a multiple of `multiple_of` (256 for LLaMA).

# %%
# NBVAL_CHECK_OUTPUT
ffn = FeedForward(config)
for name, p in ffn.named_parameters():
    print(f"{name} {tuple(p.shape)}")
print("LLaMA-7B feed-forward width:", LlamaConfig().ffn_hidden_dim)

# %%
z = torch.linspace(-5, 3, 200)
fig, ax = plt.subplots()
ax.plot(z, F.relu(z), label="ReLU")
ax.plot(z, F.silu(z), label="SiLU = z * sigmoid(z)")
ax.axhline(0, color="k", lw=0.5)
ax.set_title("SiLU is a smooth ReLU that lets a little negative signal through")
ax.legend();

# %% [markdown]
# ## 5. The block and the model
#
# A block is two residual steps, each with its own RMSNorm in front ("pre-norm"):
#
# $$h = x + \mathrm{Attention}(\mathrm{RMSNorm}(x)), \qquad \mathrm{out} = h + \mathrm{FFN}(\mathrm{RMSNorm}(h))$$
#
# The model is an embedding, `n_layers` blocks, a final RMSNorm and an output head
# (not tied to the embedding). `init_weights` gives it random weights for training from scratch.

# %%
# NBVAL_CHECK_OUTPUT
model = init_weights(Llama(config), seed=0).eval()
tokens = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(tokens)
print("tokens", tuple(tokens.shape), "-> logits", tuple(logits.shape))
print("parameters:", f"{model.num_params():,}")
for name, p in model.named_parameters():
    if name.startswith("layers.0.") or not name.startswith("layers."):
        print(f"  {name:34s} {tuple(p.shape)}")

# %% [markdown]
# ## 6. The KV cache
#
# Generating text one token at a time, the keys and values of earlier tokens never change.
# A `KVCache` keeps them, so each new token costs one row of work instead of re-running the
# whole prefix. The result must be the same as running the full sequence at once:

# %%
# NBVAL_CHECK_OUTPUT
cache = KVCache(config, batch_size=2, max_len=config.max_seq_len)
with torch.no_grad():
    steps = [model(tokens[:, :4], start_pos=0, cache=cache)]  # "prefill": the prompt at once
    for t in range(4, tokens.shape[1]):  # then one token at a time
        steps.append(model(tokens[:, t:t + 1], start_pos=t, cache=cache))
incremental = torch.cat(steps, dim=1)
print("cache of one layer (B, n_kv_heads, max_len, d):", tuple(cache.k[0].shape))
print("token by token with the cache == all at once:", torch.allclose(incremental, logits, atol=1e-5))

# %% [markdown]
# How much does the cache save? Here is a bigger (still small) model reading 64 tokens one by one
# with and without the cache. Timings depend on your machine.

# %%
import time

big = init_weights(Llama(LlamaConfig(dim=256, n_layers=4, n_heads=8, vocab_size=100, max_seq_len=128)), seed=0).eval()
prefix = torch.randint(0, 100, (1, 64))


@torch.no_grad()
def run(use_cache: bool) -> float:
    t0 = time.perf_counter()
    cache = KVCache(big.config, 1, 128) if use_cache else None
    for t in range(1, prefix.shape[1] + 1):
        if use_cache:
            big(prefix[:, t - 1:t], start_pos=t - 1, cache=cache)
        else:
            big(prefix[:, :t])  # recompute everything so far
    return time.perf_counter() - t0


seconds = {"without cache": run(False), "with cache": run(True)}
fig, ax = plt.subplots(figsize=(5, 2))
ax.barh(list(seconds), list(seconds.values()))
ax.set_xlabel("seconds for 64 tokens")
print({k: round(v, 3) for k, v in seconds.items()})

# %% [markdown]
# ## 7. The 7B shape
#
# The default `LlamaConfig()` is LLaMA-7B. On the `meta` device PyTorch creates the modules
# with shapes but no memory, so we can count 6.7 billion parameters without allocating them.

# %%
# NBVAL_CHECK_OUTPUT
with torch.device("meta"):
    llama7b = Llama(LlamaConfig())
parts = {"embedding": 0, "attention": 0, "feed-forward": 0, "norms": 0, "output head": 0}
for name, p in llama7b.named_parameters():
    key = ("embedding" if name.startswith("tok_") else "output head" if name.startswith("output")
           else "norms" if "norm" in name else "attention" if ".attention." in name else "feed-forward")
    parts[key] += p.numel()
for key, n in parts.items():
    print(f"{key:13s} {n:>14,}")
print(f"{'total':13s} {llama7b.num_params():>14,}")

# %%
fig, ax = plt.subplots(figsize=(6, 2.2))
ax.barh(list(parts), [n / 1e9 for n in parts.values()])
ax.set_xlabel("billions of parameters")
ax.set_title("LLaMA-7B: two thirds of the weights are in the feed-forward layers");

# %% [markdown]
# ## 8. Checked against Hugging Face `transformers`
#
# Our code uses Meta's weight names and Meta's rotary layout (interleaved pairs); Hugging Face
# uses its own names and rotates halves instead of pairs, so its `q`/`k` rows are permuted.
# `adapterlab.load_llama` reads a Hugging Face folder and converts. If both models compute
# the same logits on the same weights, the conversion *and* every block above are right.
#
# (This cell needs the optional `transformers` package; it is skipped without it.)

# %%
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: skipping the comparison (pip install transformers)")

if transformers is not None:
    from adapterlab import load_llama

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar

    hf_config = transformers.LlamaConfig(
        hidden_size=config.dim, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, intermediate_size=config.ffn_hidden_dim,
        vocab_size=config.vocab_size, rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    # O(1)-scale random weights (matrices ~ N(0, 1/fan_in), norms ~ 1 + noise): with the tiny
    # default init the logits are ~0 and a wrong conversion would also differ by only ~1e-6.
    with torch.no_grad():
        for p in hf_model.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) if p.dim() == 2 else 1 + 0.1 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)  # config.json + model.safetensors
        ours = load_llama(folder, device="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
        our_logits = ours(tokens)
    diff = (hf_logits - our_logits).abs().max().item()
    print(f"logits spread (std): {hf_logits.std().item():.2f}, largest difference: {diff:.2e}")
    assert diff < 1e-5, "our model and transformers disagree"
    print("same logits as transformers.LlamaForCausalLM (within 1e-5):", diff < 1e-5)

# %% [markdown]
# ## Check yourself
#
# **Exercise 1.** Write RMSNorm as a plain function. `check_rmsnorm` runs it on inputs chosen
# to catch the usual mistakes and tells you which one it sees.

# %%
def my_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., C), weight: (C,). Normalise over the last dimension.
    return None  # <- your code here


check_rmsnorm(my_rmsnorm)

# %% [markdown]
# **Exercise 2.** How many parameters does LLaMA-13B have? Its shape: C = 5120, 40 layers,
# 40 heads (no grouped-query attention), vocabulary 32000, `multiple_of` = 256. Count by
# hand, term by term (you may use `LlamaConfig(dim=5120, n_layers=40, n_heads=40).ffn_hidden_dim`
# for the feed-forward width), and do not build the model.

# %%
answer = None  # <- your count, an integer
check_llama_param_count(answer)

# %% [markdown]
# **Exercise 3.** How many bytes does the KV cache of LLaMA-7B take for one sequence of
# 2048 tokens in fp16 (2 bytes per number)?

# %%
kv_bytes = None  # <- your answer, an integer
check_kv_cache_bytes(kv_bytes)

# %% [markdown]
# Worked solutions: `notebooks/solutions/02_llama_from_blocks_solutions.ipynb`.
#
# ## Summary
#
# - **RMSNorm** rescales each token to unit root mean square; no centring, no bias.
# - **RoPE** rotates query/key pairs by position; scores then depend on relative distance only.
# - **Grouped-query attention** shares each key/value head among several query heads: the same
#   math as multi-head attention with copied heads, and a smaller KV cache.
# - **SwiGLU** uses three matrices, about 8C/3 wide, rounded up.
# - The **KV cache** gives the same logits as recomputing, at a fraction of the work.
# - Our model matches `transformers`' `LlamaForCausalLM` on the same weights.
#
# Next, notebook 3 changes one thing in the attention: zero-init gated adaption prompts.
